"""The GPT graph, written once against a Backend `B` that is passed in.

    tokens (B, T) -> wte + positional encoding -> n_layer x [x + attn(ln_1(x)); x + mlp(ln_2(x))]
                  -> ln_f -> logits (B, T, V)

Pre-norm blocks, causal multi-head self-attention, exact-erf GELU feed-forward, each inside a
residual connection. Dropout masks come in from outside (see `core.dropout`) so both backends
drop the same units.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig

# Per-layer (k, v) of shape (B, H, T_past, hs), for incremental generation.
KVCache = list[tuple[Array, Array]]


def sinusoidal_table(n_pos: int, d_model: int) -> np.ndarray:
    """The original paper's encoding: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)."""
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model))
    table = np.zeros((n_pos, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(pos * inv_freq)
    table[:, 1::2] = np.cos(pos * inv_freq)
    return table.astype(np.float32)


def causal_mask(t_q: int, t_k: int) -> np.ndarray:
    """Boolean (t_q, t_k), True where query i (at absolute position t_k - t_q + i) may see key j."""
    offset = t_k - t_q
    return np.arange(t_k)[None, :] <= (np.arange(t_q)[:, None] + offset)


def check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    """Out-of-range ids give a silent zero row on both frameworks, so refuse them here."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def _linear(B: Backend, x: Array, p: dict[str, Array], name: str) -> Array:
    y = x @ p[f"{name}.weight"]
    bias = p.get(f"{name}.bias")
    return y if bias is None else y + bias


def _norm(B: Backend, x: Array, p: dict[str, Array], name: str) -> Array:
    return B.layer_norm(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def _pos_table(B: Backend, cfg: ModelConfig, p: dict[str, Array]) -> Array:
    """(block_size, C) rows added to the token embeddings, one per absolute position."""
    if cfg.pos_encoding == "learned":
        return p["wpe.weight"]
    return B.from_numpy(sinusoidal_table(cfg.block_size, cfg.d_model))


def _block(B: Backend, cfg: ModelConfig, p: dict[str, Array], i: int, x: Array,
           attend: Callable[[int, Array, Array, Array], Array], drop: dict[str, Array]) -> Array:
    """Block i on x (B, T, C); `attend(i, q, k, v)` -> (B, H, T, hs) attends over the caller's keys."""
    batch, t, C = x.shape
    H, hs = cfg.n_head, cfg.head_dim
    pre = f"blocks.{i}"

    def heads(z: Array) -> Array:
        return B.transpose(B.reshape(z, (batch, t, H, hs)), (0, 2, 1, 3))  # (B, H, T, hs)

    qkv = _linear(B, _norm(B, x, p, f"{pre}.ln_1"), p, f"{pre}.attn.qkv")  # (B, T, 3C)
    y = attend(i, heads(qkv[..., :C]), heads(qkv[..., C:2 * C]), heads(qkv[..., 2 * C:]))
    y = B.reshape(B.transpose(y, (0, 2, 1, 3)), (batch, t, C))  # heads concatenated
    y = _linear(B, y, p, f"{pre}.attn.proj")
    if f"{pre}.resid_attn" in drop:
        y = y * drop[f"{pre}.resid_attn"]
    x = x + y

    h = _norm(B, x, p, f"{pre}.ln_2")
    h = _linear(B, B.gelu(_linear(B, h, p, f"{pre}.mlp.fc")), p, f"{pre}.mlp.proj")
    if f"{pre}.resid_mlp" in drop:
        h = h * drop[f"{pre}.resid_mlp"]
    return x + h


def _head(B: Backend, cfg: ModelConfig, p: dict[str, Array], x: Array) -> Array:
    x = _norm(B, x, p, "ln_f")
    head = B.transpose(p["wte.weight"], (1, 0)) if cfg.tie_embeddings else p["head.weight"]
    return x @ head


def forward(B: Backend, cfg: ModelConfig, p: dict[str, Array], idx: Array, *,
            dropout: dict[str, Array] | None = None, cache: KVCache | None = None,
            mask_fn: Any = causal_mask) -> tuple[Array, KVCache]:
    """Logits (B, T, V) for token ids `idx` (B, T), and the updated KV cache.

    With `cache` (from an earlier call), `idx` holds only the new tokens, which sit at positions
    after the cached ones. `dropout` maps site names (see `core.dropout.sites`) to scaled keep masks.
    """
    t_new = idx.shape[1]
    t_past = 0 if not cache else cache[0][0].shape[2]
    t_total = t_past + t_new
    if t_total > cfg.block_size:
        raise ValueError(f"sequence length {t_total} exceeds block_size {cfg.block_size}")
    drop = dropout or {}

    x = B.take(p["wte.weight"], idx) + _pos_table(B, cfg, p)[t_past:t_total]  # (B, T, C)
    if "emb" in drop:
        x = x * drop["emb"]

    mask = B.from_numpy(mask_fn(t_new, t_total))
    new_cache: KVCache = []

    def attend(i: int, q: Array, k: Array, v: Array) -> Array:
        if cache:
            k = B.concat([cache[i][0], k], axis=2)
            v = B.concat([cache[i][1], v], axis=2)
        new_cache.append((k, v))
        return B.attention(q, k, v, mask, drop.get(f"blocks.{i}.attn"))

    for i in range(cfg.n_layer):
        x = _block(B, cfg, p, i, x, attend, drop)
    return _head(B, cfg, p, x), new_cache


def decode_inputs(pos: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The position inputs of `decode_step` for the token at `pos`: (pos_ids (1,) int32,
    write_mask (1, 1, block_size, 1) bool, True at pos; attn_mask (1, block_size) bool, True up to pos)."""
    slots = np.arange(block_size)
    return (np.array([pos], dtype=np.int32), (slots == pos).reshape(1, 1, block_size, 1),
            (slots <= pos).reshape(1, block_size))


def decode_step(B: Backend, cfg: ModelConfig, p: dict[str, Array], idx: Array, pos_ids: Array,
                write_mask: Array, attn_mask: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Logits (B, 1, V) of one new token `idx` (B, 1), with a fixed-shape KV cache.

    `cache` holds per layer (k, v) buffers (B, H, block_size, hs); the new token's k and v are
    written into the slot where `write_mask` is True and attention sees the slots where `attn_mask`
    is True (see `decode_inputs`). Every shape is fixed, so one compiled graph serves all positions.
    """
    x = B.take(p["wte.weight"], idx) + B.take(_pos_table(B, cfg, p), pos_ids)  # (B, 1, C)
    new_cache: KVCache = []

    def attend(i: int, q: Array, k: Array, v: Array) -> Array:
        k = B.where(write_mask, k, cache[i][0])  # (B, H, 1, hs) broadcast into (B, H, block_size, hs)
        v = B.where(write_mask, v, cache[i][1])
        new_cache.append((k, v))
        return B.attention(q, k, v, attn_mask)

    for i in range(cfg.n_layer):
        x = _block(B, cfg, p, i, x, attend, {})
    return _head(B, cfg, p, x), new_cache


def logits(B: Backend, cfg: ModelConfig, p: dict[str, Array], idx: Array, **kw: Any) -> Array:
    return forward(B, cfg, p, idx, **kw)[0]


def loss(B: Backend, cfg: ModelConfig, p: dict[str, Array], idx: Array, targets: Array,
         dropout: dict[str, Array] | None = None) -> Array:
    """Mean next-token cross-entropy."""
    return B.cross_entropy(logits(B, cfg, p, idx, dropout=dropout), targets)
