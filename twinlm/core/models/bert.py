"""BERT: a bidirectional post-LayerNorm encoder, pretrained on masked tokens.

    tokens (N, T) -> emb_ln(wte + wpe + tte[type]) -> n_layer x [x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))]
        masked-LM head: ln(gelu(dense(h))) @ wte^T + bias        (N, T, V)
        pooler:         tanh(dense(h[:, 0]))                      (N, C), the [CLS] position

Post-norm, LayerNorm eps 1e-12, exact GELU, token-type embeddings and the tied masked-LM decoder are
the original BERT's (Hugging Face `BertForMaskedLM`), so real BERT checkpoints can be mapped onto this
graph. Attention sees every real token; padding is masked by the caller's (N, 1, 1, T) `mask`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twinlm.core import layers as L
from twinlm.core import spec as S
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.models.decoder import dropout_sites  # noqa: F401  (the same sites as a decoder)

KIND = "encoder"
DEFAULTS = dict(bias=True, pos_encoding="learned", norm="layernorm", activation="gelu", norm_eps=1e-12,
                type_vocab_size=2)
CHOICES: dict[str, tuple] = {"pos_encoding": ("learned", "sinusoidal", "rope", "none"), "residual": (True,)}


def param_spec(cfg: ModelConfig) -> S.Spec:
    """Hugging Face BERT's init: N(0, 0.02) everywhere, zero biases, unit gains. The pooler trains
    only under a classification head (masked-LM pretraining never reads it)."""
    C = cfg.d_model
    spec: S.Spec = L.embedding_spec(cfg, "wte", cfg.vocab_size, C)
    if cfg.pos_encoding == "learned":
        spec["wpe.weight"] = S.embedding(cfg.block_size, C)
    if cfg.type_vocab_size:
        spec["tte.weight"] = S.embedding(cfg.type_vocab_size, C)
    spec |= L.norm_spec(cfg, "emb_ln")
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}"
        spec |= L.attention_spec(cfg, f"{pre}.attn")
        spec |= L.norm_spec(cfg, f"{pre}.ln_1")
        spec |= L.mlp_spec(cfg, f"{pre}.mlp")
        spec |= L.norm_spec(cfg, f"{pre}.ln_2")
    spec |= L.linear_spec(cfg, "mlm.dense", C, C)
    spec |= L.norm_spec(cfg, "mlm.ln")
    spec["mlm.bias"] = S.bias(cfg.vocab_size)
    for name, s in L.linear_spec(cfg, "pooler", C, C).items():  # (a quantized pooler stays frozen)
        spec[name] = replace(s, trainable=cfg.n_classes > 0 and s.trainable, matmul=True)
    return spec | L.classifier_spec(cfg)


def hidden(B: Backend, cfg: ModelConfig, p: L.Params, idx: Array, *, dropout: dict[str, Array] | None = None,
           cache: Any = None, mask: Array | None = None, mask_fn: Any = None,  # mask_fn: decoders only
           types: Array | None = None) -> tuple[Array, list]:
    """Hidden states (N, T, C) of every position; `mask` (N, 1, 1, T), True = real token, or None
    (no padding); `types` (N, T) token-type ids, or None (all segment 0)."""
    if cache:
        raise ValueError("an encoder has no KV cache: it reads the whole text at once")
    t = idx.shape[1]
    if t > cfg.block_size:
        raise ValueError(f"sequence length {t} exceeds block_size {cfg.block_size}")
    drop = dropout or {}
    x = L.embed(B, cfg, p, "wte", idx)  # (N, T, C)
    if cfg.pos_encoding == "learned":
        x = x + p["wpe.weight"][:t]
    elif cfg.pos_encoding == "sinusoidal":
        x = x + B.from_numpy(L.sinusoidal_table(t, cfg.d_model))
    if cfg.type_vocab_size:
        x = x + (p["tte.weight"][0] if types is None else B.take(p["tte.weight"], types))
    x = L.residual_dropout(L.norm(B, cfg, p, "emb_ln", x), drop, "emb")
    rope = None
    if cfg.pos_encoding == "rope":
        tables = L.rope_tables(t, cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
        rope = tuple(B.from_numpy(a) for a in tables)
    attend, _ = L.attend_all(B, cfg, mask, drop)
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}"
        y = L.self_attention(B, cfg, p, f"{pre}.attn", i, x, attend, rope, drop)  # type: ignore[arg-type]
        x = L.norm(B, cfg, p, f"{pre}.ln_1", x + L.residual_dropout(y, drop, f"{pre}.resid_attn"))
        h = L.mlp(B, cfg, p, f"{pre}.mlp", x, drop)
        x = L.norm(B, cfg, p, f"{pre}.ln_2", x + L.residual_dropout(h, drop, f"{pre}.resid_mlp"))
    return x, []


def lm_logits(B: Backend, cfg: ModelConfig, p: L.Params, h: Array) -> Array:
    """The masked-LM head; its decoder is the token embedding (tied), plus a per-token bias."""
    h = L.norm(B, cfg, p, "mlm.ln", B.gelu(L.linear(B, cfg, p, "mlm.dense", h)))
    return L.tied_head(B, cfg, p, "wte", h, p["mlm.bias"])


def pooled(B: Backend, cfg: ModelConfig, p: L.Params, h: Array, pool: Array) -> Array:
    """BERT's pooler on the position `pool` marks ([CLS], position 0)."""
    return B.tanh(L.linear(B, cfg, p, "pooler", L.pool_at(B, h, pool)))
