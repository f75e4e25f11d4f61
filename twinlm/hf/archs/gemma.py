"""Gemma 2 and Gemma 3 (text): RMSNorm `x * (1 + w)`, scaled embeddings, GeGLU, post norms, soft-caps,
local/global layers."""

from __future__ import annotations

from typing import Any

from twinlm.core.config import ModelConfig
from twinlm.hf.archs.common import HFError, Link, _get, _refuse_unless
from twinlm.hf.archs.llama import _hf_rope, _rope, decoder_hf_config, llama_links


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
        **decoder_hf_config(cfg, "gemma3_text"),
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
