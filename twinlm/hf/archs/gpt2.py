"""GPT-2 (`GPT2LMHeadModel`): Conv1D weights, (in, out) like twinlm's."""

from __future__ import annotations

from typing import Any

from twinlm.core.config import ModelConfig
from twinlm.hf.archs.common import Link, _activation, _get, _hf_activation, _refuse_unless


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
