"""Llama (with RoPE scaling), Qwen2 (q/k/v biases), Qwen3 (explicit head size, q/k norms), Mistral
(sliding window) and Phi-3 (fused qkv and gate|up): one decoder, several sets of options."""

from __future__ import annotations

from typing import Any

from twinlm.core.config import ModelConfig
from twinlm.hf.archs.common import HFError, Link, _get, _refuse_unless

ROPE_KEYS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
             "high_freq_factor": "rope_high_freq_factor",
             "original_max_position_embeddings": "rope_original_positions"}


def _rope(hf: dict[str, Any], head_dim: int = 0, partial: bool = False) -> dict[str, Any]:
    """rope_theta and the RoPE scaling fields, from `rope_parameters` (transformers >= 5) or the older
    `rope_theta` + `rope_scaling`; scalings twinlm does not compute are refused by name. `partial`: the class
    rotates the first partial_rotary_factor of each head (Phi-3's attention; Llama's would fail on it)."""
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
    out: dict[str, Any] = dict(rope_theta=float(rope.get("rope_theta") or _get(hf, "rope_theta", 10000.0)))
    if prf != 1.0:
        rope_dim = int(head_dim * prf)  # transformers' own rounding
        if not partial:
            raise HFError(f"config.json has partial_rotary_factor = {prf!r}; this class rotates whole heads")
        if not 0 < rope_dim <= head_dim or rope_dim % 2:
            raise HFError(f"config.json's partial_rotary_factor {prf!r} gives {rope_dim} of {head_dim} "
                          "dimensions to rotate; twinlm rotates an even number of them")
        out["rope_dim"] = 0 if rope_dim == head_dim else rope_dim
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
    if cfg.rope_dim:
        rope["partial_rotary_factor"] = cfg.rope_dim / cfg.head_dim
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_positions)
    return dict(rope_scaling=None, rope_parameters=rope)


def llama_config(hf: dict[str, Any], qkv_bias: bool = False, qk_norm: bool = False,
                 sliding: bool = False, partial_rotary: bool = False) -> dict[str, Any]:
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
        **_rope(hf, head_dim, partial_rotary),
    )


def phi3_config(hf: dict[str, Any]) -> dict[str, Any]:
    """Phi-3: a Llama with fused qkv_proj and gate_up_proj (twinlm's own layout) and Mistral's window."""
    out = mistral_config(hf, partial_rotary=True)  # Phi-4-mini: partial_rotary_factor 0.75
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


def mistral_config(hf: dict[str, Any], partial_rotary: bool = False) -> dict[str, Any]:
    if hf.get("layer_types"):
        raise HFError("config.json has layer_types; twinlm's Mistral slides its window on every layer "
                      "(MistralForCausalLM ignores layer_types too)")
    return llama_config(hf, sliding=True, partial_rotary=partial_rotary)


def qwen2_config(hf: dict[str, Any]) -> dict[str, Any]:
    return llama_config(hf, qkv_bias=True)


def qwen3_config(hf: dict[str, Any]) -> dict[str, Any]:
    _refuse_unless(hf, "attention_bias", (False,), False)
    return llama_config(hf, qk_norm=True)


def decoder_hf_config(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    """The config.json fields every Llama-line decoder shares (Llama, Qwen, Mistral, Phi-3, Gemma)."""
    return dict(
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.block_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.dropout,
    )


def llama_hf_config(cfg: ModelConfig, hf_arch: str = "LlamaForCausalLM") -> dict[str, Any]:
    out = dict(
        **decoder_hf_config(cfg, "llama"),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
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
