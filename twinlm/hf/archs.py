"""The Hugging Face architectures twinlm reads and writes, each as two small functions:

    config(hf: dict) -> dict         the ModelConfig fields of a `config.json` (refusing what twinlm lacks)
    links(cfg, hf_arch) -> [Link]     which Hugging Face tensors make each twinlm parameter

One link table serves both directions: import concatenates (and transposes) the Hugging Face tensors
into the twinlm parameter; export splits it back. twinlm stores every linear weight as (in, out) and
fuses q|k|v (and SwiGLU's gate|up) into one matrix; HF GPT-2's Conv1D is (in, out) already, `nn.Linear`
(Llama, BERT) is (out, in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError


class HFError(TwinlmError):
    """A Hugging Face folder twinlm cannot read or a run it cannot write as one."""


@dataclass(frozen=True)
class Link:
    twin: str  # the twinlm parameter
    hf: tuple[str, ...]  # the Hugging Face tensors, concatenated along the last axis
    transpose: bool = False  # the HF tensors are (out, in)
    sizes: tuple[int, ...] = ()  # the last-axis size of each HF part (several parts only)


def _get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key)
    return default if value is None else value


def _refuse_unless(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    value = _get(hf, key, default)
    if value not in allowed:
        raise HFError(
            f"config.json has {key} = {value!r}; twinlm implements only "
            f"{' or '.join(repr(a) for a in allowed)}, so it refuses this model rather than "
            "compute something else"
        )


def _activation(hf: dict[str, Any], key: str, default: str) -> str:
    act = _get(hf, key, default)
    mapped = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if mapped is None:
        raise HFError(
            f"config.json has {key} = {act!r}; twinlm implements gelu (exact erf) and the tanh "
            "form (gelu_new, gelu_pytorch_tanh)"
        )
    return mapped


def _hf_activation(cfg: ModelConfig) -> str:
    return {"gelu": "gelu", "gelu_tanh": "gelu_new"}[cfg.activation]  # type: ignore[index]


# ---- GPT-2 ---------------------------------------------------------------------------------------


def gpt2_config(hf: dict[str, Any]) -> dict[str, Any]:
    _refuse_unless(hf, "scale_attn_weights", (True,), True)
    _refuse_unless(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    _refuse_unless(hf, "add_cross_attention", (False,), False)
    d = int(hf["n_embd"])
    return dict(
        arch="gpt",
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        d_model=d,
        d_ff=_get(hf, "n_inner", 4 * d),
        activation=_activation(hf, "activation_function", "gelu_new"),
        norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
        dropout=float(_get(hf, "resid_pdrop", 0.0)),
    )


def gpt2_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        model_type="gpt2",
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.d_model,
        n_inner=cfg.d_ff,
        activation_function=_hf_activation(cfg),
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
    )


def gpt2_links(cfg: ModelConfig, hf_arch: str) -> list[Link]:
    out = [Link("wte.weight", ("transformer.wte.weight",)), Link("wpe.weight", ("transformer.wpe.weight",))]
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}", f"blocks.{i}"
        for twin, ours in (
            ("ln_1", "ln_1"),
            ("attn.qkv", "attn.c_attn"),
            ("attn.proj", "attn.c_proj"),
            ("ln_2", "ln_2"),
            ("mlp.fc", "mlp.c_fc"),
            ("mlp.proj", "mlp.c_proj"),
        ):
            out += [Link(f"{b}.{twin}.{k}", (f"{h}.{ours}.{k}",)) for k in ("weight", "bias")]
    out += [Link("ln_f.weight", ("transformer.ln_f.weight",)), Link("ln_f.bias", ("transformer.ln_f.bias",))]
    if not cfg.tie_embeddings:
        out.append(Link("head.weight", ("lm_head.weight",), transpose=True))
    return out


# ---- Llama, Qwen2, Qwen3 (one decoder, three sets of options) -------------------------------------

ROPE_KEYS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
             "high_freq_factor": "rope_high_freq_factor",
             "original_max_position_embeddings": "rope_original_positions"}


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and the RoPE scaling fields, from `rope_parameters` (transformers >= 5) or the older
    `rope_theta` + `rope_scaling`; scalings twinlm does not compute are refused by name."""
    scaling, params = dict(_get(hf, "rope_scaling", {})), dict(_get(hf, "rope_parameters", {}))
    kinds = {d.get("rope_type") or d.get("type") or "default" for d in (scaling, params)} - {"default"}
    if len(kinds) > 1:
        raise HFError(
            f"config.json's rope_scaling and rope_parameters disagree ({' vs '.join(sorted(kinds))})"
        )
    kind = kinds.pop() if kinds else "default"
    # the scaling's own numbers come from whichever dict names it (an old rope_scaling beside a default
    # rope_parameters that a newer transformers wrote is still a scaling)
    named_by_scaling = (scaling.get("rope_type") or scaling.get("type")) == kind
    rope = {**params, **scaling} if named_by_scaling else {**scaling, **params}
    if kind not in ("default", "linear", "llama3"):
        raise HFError(
            f"config.json asks for RoPE scaling {kind!r}; twinlm implements rope_type 'default', 'linear' "
            "and 'llama3'"
        )
    prf = rope.get("partial_rotary_factor", _get(hf, "partial_rotary_factor", 1.0))
    if prf != 1.0:
        raise HFError(f"config.json has partial_rotary_factor = {prf!r}; twinlm rotates whole heads (1.0)")
    out: dict[str, Any] = dict(rope_theta=float(rope.get("rope_theta") or _get(hf, "rope_theta", 10000.0)))
    if kind == "default":
        return out
    needed = ("factor",) if kind == "linear" else tuple(ROPE_KEYS)
    for key in needed:
        if rope.get(key) is None:
            raise HFError(f"config.json's {kind} RoPE scaling has no {key}")
        out[ROPE_KEYS[key]] = rope[key]
    return dict(out, rope_type=kind, rope_factor=float(rope["factor"]))


def _hf_rope(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_positions)
    return dict(rope_scaling=None, rope_parameters=rope)


def llama_config(hf: dict[str, Any], qkv_bias: bool = False, qk_norm: bool = False,
                 sliding: bool = False) -> dict[str, Any]:
    """A Llama-style decoder; Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms and an explicit head_dim,
    Mistral (`sliding`) a sliding window on every layer where config.json sets one."""
    _refuse_unless(hf, "hidden_act", ("silu",), "silu")
    if not qkv_bias:  # Qwen2's q/k/v biases are unconditional; Llama's attention_bias would bias o too
        _refuse_unless(hf, "attention_bias", (False,), False)
    _refuse_unless(hf, "mlp_bias", (False,), False)
    if not sliding:
        _refuse_unless(hf, "use_sliding_window", (False,), False)
    window = int(_get(hf, "sliding_window", 0)) if sliding else 0
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(_get(hf, "head_dim", d // heads))
    return dict(
        arch="llama",
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_kv_head=_get(hf, "num_key_value_heads", heads),
        d_model=d,
        d_ff=hf["intermediate_size"],
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        dropout=float(_get(hf, "attention_dropout", 0.0)),
        head_size=0 if head_dim * heads == d else head_dim,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        sliding_window=window,
        **_rope(hf),
    )


def phi3_config(hf: dict[str, Any]) -> dict[str, Any]:
    """Phi-3: a Llama with fused qkv_proj and gate_up_proj (twinlm's own layout) and Mistral's window."""
    out = mistral_config(hf)
    return dict(out, dropout=float(_get(hf, "resid_pdrop", 0.0)))


def phi3_links(cfg: ModelConfig, hf_arch: str) -> list[Link]:
    """Llama's links with q|k|v and gate|up each one Hugging Face tensor, in twinlm's order already."""
    fused = {"attn.qkv.weight": "self_attn.qkv_proj.weight", "mlp.fc.weight": "mlp.gate_up_proj.weight"}
    out = []
    for link in llama_links(cfg, hf_arch):
        block, _, name = link.twin.partition(".")[2].partition(".")
        if name in fused:
            link = Link(link.twin, (f"model.layers.{block}.{fused[name]}",), transpose=True)
        out.append(link)
    return out


def mistral_config(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("layer_types"):
        raise HFError("config.json has layer_types; twinlm's Mistral slides its window on every layer "
                      "(MistralForCausalLM ignores layer_types too)")
    return llama_config(hf, sliding=True)


def qwen2_config(hf: dict[str, Any]) -> dict[str, Any]:
    return llama_config(hf, qkv_bias=True)


def qwen3_config(hf: dict[str, Any]) -> dict[str, Any]:
    _refuse_unless(hf, "attention_bias", (False,), False)
    return llama_config(hf, qk_norm=True)


def llama_hf_config(cfg: ModelConfig, hf_arch: str = "LlamaForCausalLM") -> dict[str, Any]:
    out = dict(
        model_type="llama",
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.block_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.dropout,
        **_hf_rope(cfg),
    )
    if cfg.qkv_bias:
        out.update(model_type="qwen2", use_sliding_window=False)
        del out["attention_bias"], out["mlp_bias"]
    if cfg.qk_norm:
        out.update(model_type="qwen3", use_sliding_window=False)
        del out["mlp_bias"]
    if cfg.sliding_window or hf_arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        phi3 = hf_arch == "Phi3ForCausalLM"
        out.update(model_type="phi3" if phi3 else "mistral", sliding_window=cfg.sliding_window or None)
        del out["attention_bias"], out["mlp_bias"]
        if phi3:
            out.update(resid_pdrop=cfg.dropout, embd_pdrop=0.0,
                       original_max_position_embeddings=cfg.block_size)
    return out


def llama_links(cfg: ModelConfig, hf_arch: str) -> list[Link]:
    hs = cfg.head_dim
    qkv = (cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs)
    out = [Link("wte.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}", f"blocks.{i}"
        out += [
            Link(f"{b}.ln_1.weight", (f"{h}.input_layernorm.weight",)),
            Link(f"{b}.attn.qkv.weight", tuple(f"{h}.self_attn.{x}_proj.weight" for x in "qkv"), True, qkv),
            Link(f"{b}.attn.proj.weight", (f"{h}.self_attn.o_proj.weight",), True),
            Link(f"{b}.ln_2.weight", (f"{h}.post_attention_layernorm.weight",)),
            Link(
                f"{b}.mlp.fc.weight",
                (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"),
                True,
                (cfg.d_ff, cfg.d_ff),
            ),
            Link(f"{b}.mlp.proj.weight", (f"{h}.mlp.down_proj.weight",), True),
        ]
        if cfg.qkv_bias:
            biases = tuple(f"{h}.self_attn.{x}_proj.bias" for x in "qkv")
            out.append(Link(f"{b}.attn.qkv.bias", biases, False, qkv))
        if cfg.qk_norm:
            out += [Link(f"{b}.attn.{x}_norm.weight", (f"{h}.self_attn.{x}_norm.weight",)) for x in "qk"]
    out.append(Link("ln_f.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        out.append(Link("head.weight", ("lm_head.weight",), transpose=True))
    return out


# ---- Gemma 3 (text) -------------------------------------------------------------------------------


def gemma3_config(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's text decoder: the Llama stack with Gemma's pieces (see ModelConfig: norm_offset,
    embed_scale, post_norms, query_scale, rope_local_theta) and a window on its sliding_attention layers."""
    _refuse_unless(hf, "hidden_activation", ("gelu_pytorch_tanh",), "gelu_pytorch_tanh")
    _refuse_unless(hf, "attention_bias", (False,), False)
    _refuse_unless(hf, "attn_logit_softcapping", (None,), None)
    _refuse_unless(hf, "use_bidirectional_attention", (False,), False)
    d, heads, n_layer = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
    params = dict(_get(hf, "rope_parameters", {}))
    if "full_attention" in params:  # transformers >= 5: one RoPE per layer type
        full, local = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    else:
        full = {**dict(_get(hf, "rope_scaling", {})), "rope_theta": _get(hf, "rope_theta", 1e6)}
        local = {"rope_theta": _get(hf, "rope_local_base_freq", 1e4)}
    if (local.get("rope_type") or local.get("type") or "default") != "default":
        raise HFError(
            f"config.json scales the sliding layers' RoPE ({local}); twinlm scales only the global ones"
        )
    rope = _rope({"rope_parameters": full})
    pattern = int(_get(hf, "sliding_window_pattern", _get(hf, "_sliding_window_pattern", 6)))
    types = _get(hf, "layer_types", [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)
    ])
    return dict(
        arch="llama",
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=n_layer,
        n_head=heads,
        n_kv_head=_get(hf, "num_key_value_heads", heads),
        d_model=d,
        d_ff=hf["intermediate_size"],
        activation="geglu_tanh",
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
        dropout=float(_get(hf, "attention_dropout", 0.0)),
        head_size=int(_get(hf, "head_dim", 256)),
        qk_norm=True,
        sliding_window=int(_get(hf, "sliding_window", 4096)),
        layer_types=tuple(types),
        rope_local_theta=float(local.get("rope_theta") or 1e4),
        norm_offset=True,
        embed_scale=True,
        post_norms=True,
        query_scale=float(_get(hf, "query_pre_attn_scalar", 256)),
        final_softcap=float(_get(hf, "final_logit_softcapping", 0.0)),
        **rope,
    )


def gemma2_config(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2: Gemma 3's stack without q/k norms, one RoPE base for every layer, every other layer sliding,
    and soft-capped attention scores (attn_logit_softcapping) and final logits (final_logit_softcapping)."""
    _refuse_unless(hf, "hidden_activation", ("gelu_pytorch_tanh",), "gelu_pytorch_tanh")
    _refuse_unless(hf, "attention_bias", (False,), False)
    n_layer = int(hf["num_hidden_layers"])
    types = _get(hf, "layer_types", [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layer)
    ])
    as_gemma3 = {k: v for k, v in hf.items() if k not in ("attn_logit_softcapping", "rope_parameters")}
    rope = _rope(hf)
    out = gemma3_config({**as_gemma3, "layer_types": types,
                         "rope_parameters": {"full_attention": {"rope_theta": rope["rope_theta"]},
                                             "sliding_attention": {"rope_theta": rope["rope_theta"]}}})
    return dict(out, qk_norm=False, rope_local_theta=0.0, **rope,
                attn_softcap=float(_get(hf, "attn_logit_softcapping", 0.0)))


def gemma2_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    out = gemma3_hf_config(cfg)
    out.update(model_type="gemma2", attn_logit_softcapping=cfg.attn_softcap or None, **_hf_rope(cfg))
    del out["use_bidirectional_attention"]
    return out


def gemma3_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    rope = _hf_rope(cfg)["rope_parameters"]
    return dict(
        model_type="gemma3_text",
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.block_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=False,
        attn_logit_softcapping=None,
        final_logit_softcapping=cfg.final_softcap or None,
        query_pre_attn_scalar=int(q) if (q := float(cfg.query_scale)).is_integer() else q,
        sliding_window=cfg.sliding_window,
        layer_types=list(cfg.layer_types),
        use_bidirectional_attention=False,
        rope_scaling=None,
        rope_parameters={"full_attention": rope,
                         "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.dropout,
    )


def gemma3_links(cfg: ModelConfig, hf_arch: str) -> list[Link]:
    """Llama's links, with Gemma's four norms a block: its post_attention_layernorm is the attention output's
    norm (twinlm ln_post_attn), pre_feedforward_layernorm the MLP input's (ln_2)."""
    out = [link for link in llama_links(cfg, hf_arch) if ".ln_2." not in link.twin]
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}", f"blocks.{i}"
        out += [
            Link(f"{b}.ln_post_attn.weight", (f"{h}.post_attention_layernorm.weight",)),
            Link(f"{b}.ln_2.weight", (f"{h}.pre_feedforward_layernorm.weight",)),
            Link(f"{b}.ln_post_mlp.weight", (f"{h}.post_feedforward_layernorm.weight",)),
        ]
    return out


# ---- BERT ----------------------------------------------------------------------------------------


def bert_config(hf: dict[str, Any]) -> dict[str, Any]:
    _refuse_unless(hf, "position_embedding_type", ("absolute",), "absolute")
    _refuse_unless(hf, "is_decoder", (False,), False)
    _refuse_unless(hf, "add_cross_attention", (False,), False)
    arch = (hf.get("architectures") or ["BertModel"])[0]
    n_classes = 0
    if arch == "BertForSequenceClassification":
        n_classes = len(_get(hf, "id2label", {})) or int(_get(hf, "num_labels", 2))
        if (
            n_classes < 2
            or _get(hf, "problem_type", "single_label_classification") != "single_label_classification"
        ):
            raise HFError(
                "twinlm fine-tunes single-label classifiers with at least two labels; this "
                f"BertForSequenceClassification is {hf.get('problem_type') or 'a regression'} "
                f"with {n_classes} label(s)"
            )
    if arch == "BertForMaskedLM" and not _get(hf, "tie_word_embeddings", True):
        raise HFError(
            "config.json unties the masked-LM decoder from the word embeddings; twinlm's BERT ties them"
        )
    return dict(
        arch="bert",
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        activation=_activation(hf, "hidden_act", "gelu"),
        norm_eps=float(_get(hf, "layer_norm_eps", 1e-12)),
        type_vocab_size=int(_get(hf, "type_vocab_size", 2)),
        dropout=float(_get(hf, "hidden_dropout_prob", 0.0)),
        n_classes=n_classes,
    )


def bert_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.pos_encoding != "learned" or not cfg.type_vocab_size:
        raise HFError(
            "Hugging Face BERT has learned positions and token types; this run's BERT has "
            f"{cfg.pos_encoding} positions and {cfg.type_vocab_size} token types"
        )
    return dict(
        model_type="bert",
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.block_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        hidden_act=_hf_activation(cfg),
        layer_norm_eps=cfg.norm_eps,
        type_vocab_size=cfg.type_vocab_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        position_embedding_type="absolute",
        tie_word_embeddings=True,
        is_decoder=False,
    )


def bert_links(cfg: ModelConfig, hf_arch: str) -> list[Link]:
    pre = "" if hf_arch == "BertModel" else "bert."
    e = f"{pre}embeddings"
    out = [
        Link("wte.weight", (f"{e}.word_embeddings.weight",)),
        Link("wpe.weight", (f"{e}.position_embeddings.weight",)),
        Link("tte.weight", (f"{e}.token_type_embeddings.weight",)),
        Link("emb_ln.weight", (f"{e}.LayerNorm.weight",)),
        Link("emb_ln.bias", (f"{e}.LayerNorm.bias",)),
    ]
    C = cfg.d_model
    for i in range(cfg.n_layer):
        h, b = f"{pre}encoder.layer.{i}", f"blocks.{i}"
        sa = f"{h}.attention.self"
        out += [
            Link(
                f"{b}.attn.qkv.weight",
                tuple(f"{sa}.{x}.weight" for x in ("query", "key", "value")),
                True,
                (C, C, C),
            ),
            Link(
                f"{b}.attn.qkv.bias",
                tuple(f"{sa}.{x}.bias" for x in ("query", "key", "value")),
                False,
                (C, C, C),
            ),
        ]
        for twin, ours, t in (
            ("attn.proj", "attention.output.dense", True),
            ("ln_1", "attention.output.LayerNorm", False),
            ("mlp.fc", "intermediate.dense", True),
            ("mlp.proj", "output.dense", True),
            ("ln_2", "output.LayerNorm", False),
        ):
            out += [
                Link(f"{b}.{twin}.weight", (f"{h}.{ours}.weight",), t),
                Link(f"{b}.{twin}.bias", (f"{h}.{ours}.bias",)),
            ]
    if hf_arch in ("BertModel", "BertForSequenceClassification"):
        out += [
            Link("pooler.weight", (f"{pre}pooler.dense.weight",), True),
            Link("pooler.bias", (f"{pre}pooler.dense.bias",)),
        ]
    if hf_arch == "BertForMaskedLM":
        t = "cls.predictions.transform"
        out += [
            Link("mlm.dense.weight", (f"{t}.dense.weight",), True),
            Link("mlm.dense.bias", (f"{t}.dense.bias",)),
            Link("mlm.ln.weight", (f"{t}.LayerNorm.weight",)),
            Link("mlm.ln.bias", (f"{t}.LayerNorm.bias",)),
            Link("mlm.bias", ("cls.predictions.bias",)),
        ]
    if hf_arch == "BertForSequenceClassification":
        out += [Link("cls.weight", ("classifier.weight",), True), Link("cls.bias", ("classifier.bias",))]
    return out


@dataclass(frozen=True)
class Arch:
    model_type: str
    config: Callable[[dict[str, Any]], dict[str, Any]]
    hf_config: Callable[[ModelConfig], dict[str, Any]]
    links: Callable[[ModelConfig, str], list[Link]]
    ignored: tuple[str, ...] = ()  # tensor-name endings that carry no weights (buffers, tied copies)


ARCHS: dict[str, Arch] = {
    "GPT2LMHeadModel": Arch(
        "gpt2", gpt2_config, gpt2_hf_config, gpt2_links, (".attn.bias", ".attn.masked_bias")
    ),
    "LlamaForCausalLM": Arch("llama", llama_config, llama_hf_config, llama_links, ("rotary_emb.inv_freq",)),
    "Qwen2ForCausalLM": Arch("qwen2", qwen2_config, llama_hf_config, llama_links, ("rotary_emb.inv_freq",)),
    "Qwen3ForCausalLM": Arch("qwen3", qwen3_config, llama_hf_config, llama_links, ("rotary_emb.inv_freq",)),
    "Phi3ForCausalLM": Arch(
        "phi3", phi3_config, lambda c: llama_hf_config(c, "Phi3ForCausalLM"), phi3_links,
        ("rotary_emb.inv_freq",),
    ),
    "Gemma2ForCausalLM": Arch(
        "gemma2", gemma2_config, gemma2_hf_config, gemma3_links, ("rotary_emb.inv_freq",)
    ),
    "Gemma3ForCausalLM": Arch("gemma3_text", gemma3_config, gemma3_hf_config, gemma3_links,
                              ("rotary_emb.inv_freq", "rotary_emb_local.inv_freq")),
    "MistralForCausalLM": Arch(
        "mistral", mistral_config, lambda c: llama_hf_config(c, "MistralForCausalLM"), llama_links,
        ("rotary_emb.inv_freq",),
    ),
    "BertForMaskedLM": Arch(
        "bert",
        bert_config,
        bert_hf_config,
        bert_links,
        ("position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
    ),
    "BertModel": Arch("bert", bert_config, bert_hf_config, bert_links, ("position_ids",)),
    "BertForSequenceClassification": Arch("bert", bert_config, bert_hf_config, bert_links, ("position_ids",)),
}


def export_arch(cfg: ModelConfig, imported_as: str | None) -> str:
    """The Hugging Face class a run exports as: the one it was imported from where that still fits."""
    if cfg.arch in ("gpt", "bert") and cfg.activation not in ("gelu", "gelu_tanh"):
        raise HFError(
            f"Hugging Face {cfg.arch.upper()} has a GELU feed-forward; this run's is {cfg.activation}"
        )
    if cfg.arch != "llama" and (cfg.qkv_bias or cfg.qk_norm or cfg.head_size or cfg.rope_type != "default"
                                or cfg.sliding_window):
        raise HFError(f"Hugging Face has no {cfg.arch} with q/k/v-only biases, q/k norms, an explicit head "
                      "size, RoPE scaling or a sliding window")
    if cfg.arch == "gpt":
        if (
            cfg.pos_encoding != "learned"
            or cfg.norm != "layernorm"
            or not cfg.bias
            or cfg.n_kv_head != cfg.n_head
        ):
            raise HFError(
                "GPT2LMHeadModel has learned positions, LayerNorm, biases and full multi-head "
                "attention; this run's GPT differs, so it has no GPT-2 form"
            )
        return "GPT2LMHeadModel"
    gemma = (cfg.norm_offset, cfg.embed_scale, cfg.post_norms, cfg.query_scale, cfg.final_softcap,
             cfg.rope_local_theta, cfg.attn_softcap, cfg.activation == "geglu_tanh")
    if cfg.arch == "llama" and any(gemma):
        if not (cfg.norm_offset and cfg.embed_scale and cfg.post_norms and cfg.activation == "geglu_tanh"
                and not cfg.qkv_bias and (cfg.qk_norm or not cfg.rope_local_theta)):
            raise HFError("this run has some of Gemma's pieces but not all, so it has no Gemma form")
        if cfg.qk_norm and cfg.attn_softcap:
            raise HFError(
                "this run has q/k norms (Gemma 3) and attention soft-capping (Gemma 2): neither class"
            )
        return "Gemma3ForCausalLM" if cfg.qk_norm else "Gemma2ForCausalLM"
    if cfg.arch == "llama":
        if cfg.pos_encoding != "rope" or cfg.norm != "rmsnorm" or cfg.activation != "swiglu" or cfg.bias:
            raise HFError(
                "LlamaForCausalLM has rotary positions, RMSNorm, SwiGLU and no biases; this run's "
                "model differs, so it has no Llama form"
            )
        if cfg.qkv_bias and cfg.qk_norm:
            raise HFError(
                "this run has both q/k/v biases (Qwen2) and q/k norms (Qwen3): no Hugging Face class has both"
            )
        if cfg.sliding_window and (cfg.qkv_bias or cfg.qk_norm or cfg.layer_types):
            raise HFError("this run has a sliding window with q/k/v biases, q/k norms or per-layer types: "
                          "twinlm exports a sliding window only as MistralForCausalLM (every layer)")
        if imported_as == "Phi3ForCausalLM" and not (cfg.qkv_bias or cfg.qk_norm or cfg.layer_types):
            return "Phi3ForCausalLM"
        if cfg.sliding_window or imported_as == "MistralForCausalLM":
            return "MistralForCausalLM"
        if cfg.qk_norm:
            return "Qwen3ForCausalLM"
        return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    if cfg.arch == "bert":
        if cfg.n_classes:
            return "BertForSequenceClassification"
        return imported_as if imported_as in ("BertModel", "BertForMaskedLM") else "BertForMaskedLM"
    raise HFError(f"--arch {cfg.arch} has no Hugging Face form in twinlm")
