"""The pre-norm causal decoder stack shared by GPT and Llama-style families.

    tokens (N, T) -> wte (+ learned or sinusoidal positions) -> n_layer x [x + attn(norm_1(x));
                     x + mlp(norm_2(x))] -> norm_f -> logits (N, T, V)

(`residual=False` drops the `x +`, `norm="none"` the norms: the ablations of `twinlm experiment
norm-residual`.)

Rotary positions, when chosen, rotate q and k inside attention instead of adding to x. Dropout masks
come in from outside (see `core.dropout`) so both backends drop the same units.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from twinlm.core import layers as L
from twinlm.core import spec as S
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig

__all__ = ["BLOCK_CHECKPOINTS", "HEAD_PARAMS", "KIND", "decode_cache_shapes", "decode_step", "dropout_sites",
           "hidden", "lm_logits", "param_spec", "pooled"]

KIND = "decoder"
BLOCK_CHECKPOINTS = True
HEAD_PARAMS = ("wte.", "head.")  # what `lm_logits` reads (the chunked loss passes only these per chunk)
# Per-layer (k, v) of shape (N, Hkv, T_past, hs), for incremental generation.
KVCache = list[tuple[Array, Array]]


def param_spec(cfg: ModelConfig) -> S.Spec:
    """GPT-2 names and init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
    C = cfg.d_model
    spec: S.Spec = L.embedding_spec(cfg, "wte", cfg.vocab_size, C)
    if cfg.pos_encoding == "learned":
        spec["wpe.weight"] = S.embedding(cfg.block_size, C)
    proj_std = S.INIT_STD / math.sqrt(2 * cfg.n_layer)
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}"
        spec |= L.norm_spec(cfg, f"{pre}.ln_1")
        spec |= L.attention_spec(cfg, f"{pre}.attn", proj_std)
        spec |= L.norm_spec(cfg, f"{pre}.ln_2")
        spec |= L.mlp_spec(cfg, f"{pre}.mlp", proj_std)
        if cfg.post_norms:
            spec |= L.norm_spec(cfg, f"{pre}.ln_post_attn") | L.norm_spec(cfg, f"{pre}.ln_post_mlp")
    spec |= L.norm_spec(cfg, "ln_f")
    if not cfg.tie_embeddings:
        spec |= L.head_spec(cfg, "head", C, cfg.vocab_size)
    return spec | L.classifier_spec(cfg)


def dropout_sites(cfg: ModelConfig, batch: int, t: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"emb": (batch, t, cfg.d_model)}
    for i in range(cfg.n_layer):
        out[f"blocks.{i}.attn"] = (batch, cfg.n_head, t, t)
        out[f"blocks.{i}.resid_attn"] = (batch, t, cfg.d_model)
        out[f"blocks.{i}.resid_mlp"] = (batch, t, cfg.d_model)
    return out


def _block(B: Backend, cfg: ModelConfig, p: L.Params, i: int, x: Array, attend: L.Attend,
           drop: dict[str, Array], rope: tuple[Array, Array] | None) -> Array:
    pre = f"blocks.{i}"
    y = L.self_attention(B, cfg, p, f"{pre}.attn", i, L.norm(B, cfg, p, f"{pre}.ln_1", x), attend, rope, drop)
    if cfg.post_norms:
        y = L.norm(B, cfg, p, f"{pre}.ln_post_attn", y)
    y = L.residual_dropout(y, drop, f"{pre}.resid_attn")
    if cfg.residual:  # the add and ln_2 in one composite (one fused pass on MLX's CPU kernels)
        x, normed = L.add_norm(B, cfg, p, f"{pre}.ln_2", x, y)
    else:
        x, normed = y, L.norm(B, cfg, p, f"{pre}.ln_2", y)
    h = L.mlp(B, cfg, p, f"{pre}.mlp", normed, drop)
    if cfg.post_norms:
        h = L.norm(B, cfg, p, f"{pre}.ln_post_mlp", h)
    h = L.residual_dropout(h, drop, f"{pre}.resid_mlp")
    return x + h if cfg.residual else h


def _positions(B: Backend, cfg: ModelConfig, p: L.Params, rows: Any,
               take: bool) -> tuple[Array | None, Any]:
    """(rows added to the embeddings, per layer rope (cos, sin) or None) at positions `rows`: a slice, or
    (with `take`) a device array of position ids gathered inside the graph. Sliding-window layers rotate
    by their own unscaled base where the config has `rope_local_theta` (Gemma 3)."""
    def pick(table: np.ndarray) -> Array:
        # A slice is cut on the host: only its rows go to the device, not the table of every position
        # (131,072 rows on a Llama 3.2), which would make each generated token cost the whole context.
        return B.take(B.from_numpy(table), rows) if take else B.from_numpy(table[rows])

    # The host tables span the positions in use, not the whole context: a slice's table has the power of two
    # of rows that holds it (each row is computed alone, so a prefix of a longer table, bit for bit), so that
    # a short generation from a long-context model (32,768 positions on a Qwen2.5, 131,072 on a Llama 3.2)
    # does not build, and keep cached, tables of every position (with their float64 temporaries: 25 MB at
    # the Qwen2.5-0.5B shape, ~100 MB at Llama 3.2's). Device ids (`take`) may point anywhere: all rows.
    n_pos = cfg.block_size if take else min(cfg.block_size, max(64, 1 << max(rows.stop - 1, 0).bit_length()))
    if cfg.pos_encoding == "learned":
        wpe = p["wpe.weight"]
        return (B.take(wpe, rows) if take else wpe[rows]), [None] * cfg.n_layer
    if cfg.pos_encoding == "sinusoidal":
        return pick(L.sinusoidal_table(n_pos, cfg.d_model)), [None] * cfg.n_layer
    if cfg.pos_encoding == "rope":
        cos, sin = L.rope_tables(n_pos, cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
        rope = (pick(cos), pick(sin))
        local = rope
        if cfg.rope_local_theta:
            cos, sin = L.rope_tables(n_pos, cfg.rotary_dim, cfg.rope_local_theta)
            local = (pick(cos), pick(sin))
        return None, [local if cfg.sliding(i) else rope for i in range(cfg.n_layer)]
    return None, [None] * cfg.n_layer


def _embed(B: Backend, cfg: ModelConfig, p: L.Params, idx: Array) -> Array:
    x = L.embed(B, cfg, p, "wte", idx)  # (N, T, C)
    return x * float(np.float32(math.sqrt(cfg.d_model))) if cfg.embed_scale else x  # Gemma: in float32


def hidden(B: Backend, cfg: ModelConfig, p: L.Params, idx: Array, *, dropout: dict[str, Array] | None = None,
           cache: KVCache | None = None, mask: Array | None = None, mask_fn: Any = L.causal_mask,
           types: Array | None = None) -> tuple[Array, KVCache]:
    """Final hidden states (N, T, C) for token ids `idx` (N, T), and the updated KV cache.

    With `cache` (from an earlier call), `idx` holds only the new tokens, which sit at positions after
    the cached ones. `mask` (boolean, broadcastable to (N, H, T, T_total)) replaces the causal mask."""
    t_new = idx.shape[1]
    t_past = 0 if not cache else cache[0][0].shape[2]
    t_total = t_past + t_new
    if t_total > cfg.block_size:
        raise ValueError(f"sequence length {t_total} exceeds block_size {cfg.block_size}")
    drop = dropout or {}
    x = _embed(B, cfg, p, idx)  # (N, T, C)
    added, rope = _positions(B, cfg, p, slice(t_past, t_total), take=False)
    if added is not None:
        x = x + B.like(added, x)
    x = L.residual_dropout(x, drop, "emb")
    window = None
    if cfg.sliding_window:
        if mask is not None:
            raise ValueError("a sliding-window model takes no explicit mask (its window comes from mask_fn)")
        window = B.from_numpy(L.sliding_window_mask(mask_fn(t_new, t_total), cfg.sliding_window))
    if mask is None:
        mask = B.from_numpy(mask_fn(t_new, t_total))
    attend, new_cache = L.attend_all(B, cfg, mask, drop, cache, window)
    for i in range(cfg.n_layer):
        def block(bp: L.Params, x: Array, i: int = i) -> Array:
            return _block(B, cfg, bp, i, x, attend, drop, rope[i])
        # A recomputing checkpoint takes the block's own weights as explicit inputs (so it differentiates
        # them); otherwise the whole dict serves, without a scan of every name per layer on each forward.
        bp = {k: v for k, v in p.items() if k.startswith(f"blocks.{i}.")} if B.remat else p
        x = B.checkpoint(block, bp, x)
    return L.norm(B, cfg, p, "ln_f", x), new_cache


def lm_logits(B: Backend, cfg: ModelConfig, p: L.Params, h: Array) -> Array:
    # untied: a linear layer (C, V), quantized or not
    logits = L.tied_head(B, cfg, p, "wte", h) if cfg.tie_embeddings else L.linear(B, cfg, p, "head", h)
    if cfg.final_softcap:  # Gemma 2: cap * tanh(logits / cap)
        logits = B.tanh(logits * (1.0 / cfg.final_softcap)) * cfg.final_softcap
    return logits


def pooled(B: Backend, cfg: ModelConfig, p: L.Params, h: Array, pool: Array) -> Array:
    """The last real token's hidden state: the only position that has read the whole text."""
    return L.pool_at(B, h, pool)


def decode_inputs(pos: int, block_size: int, window: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The position inputs of `decode_step` for the token at `pos`: (pos_ids (1,) int32,
    write_mask (1, 1, block_size, 1) bool, True at pos; attn_mask (1, block_size) bool, True up to pos;
    with a sliding `window`, (2, block_size): a second row True only for the window's last slots)."""
    slots = np.arange(block_size)
    attn = (slots <= pos).reshape(1, block_size)
    if window:
        attn = np.concatenate([attn, attn & (pos - slots < window)[None, :]])
    return np.array([pos], dtype=np.int32), (slots == pos).reshape(1, 1, block_size, 1), attn


def decode_masks(B: Backend, pos_ids: Array, length: int, window: int = 0) -> tuple[Array, Array]:
    """`decode_inputs`' two masks computed inside the graph from the position ids, for a cache of `length`
    slots, so that a compiled decode step takes only the token and its position as inputs. `pos_ids` (1,)
    gives write_mask (1, 1, length, 1) and attn_mask (1, length) (with a `window`, (2, length) as in
    `decode_inputs`); one position per row (N, 1) gives (N, 1, length, 1) and (N, length)."""
    slots = B.reshape(B.from_numpy(np.arange(length, dtype=np.int32)), (1, length))
    pos = pos_ids if len(pos_ids.shape) == 2 else B.reshape(pos_ids, (1, 1))
    attn = slots <= pos
    write = B.reshape(slots == pos, (pos.shape[0], 1, length, 1))
    if window and len(pos_ids.shape) == 1:
        attn = B.concat([attn, attn & (pos - slots < window)], axis=0)
    return write, attn


def decode_cache_shapes(cfg: ModelConfig, batch: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per layer the shapes of the fixed-shape KV cache (k, v) `decode_step` reads and returns."""
    shape = (batch, cfg.n_kv_head, cfg.block_size, cfg.head_dim)
    return [(shape, shape)] * cfg.n_layer


def decode_step(B: Backend, cfg: ModelConfig, p: L.Params, idx: Array, pos_ids: Array,
                write_mask: Array, attn_mask: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Logits (N, 1, V) of one new token `idx` (N, 1), with a fixed-shape KV cache.

    `cache` holds per layer (k, v) buffers (N, Hkv, block_size, hs); the new token's k and v are
    written into the slot where `write_mask` is True and attention sees the slots where `attn_mask`
    is True (see `decode_inputs`). Every shape is fixed, so one compiled graph serves all positions.
    """
    x = _embed(B, cfg, p, idx)  # (N, 1, C)
    added, rope = _positions(B, cfg, p, pos_ids, take=True)
    if added is not None:
        x = x + B.like(added, x)
    per_row = len(pos_ids.shape) == 2  # a position per row (N, 1) (twinlm.engine): attn_mask (N, T) per row
    if per_row:  # (a window shorter than the cache is refused by the engine: one mask row serves all layers)
        attn_mask = B.reshape(attn_mask, (attn_mask.shape[0], 1, 1, attn_mask.shape[-1]))
        # (N, 1, hs/2) -> (N, 1, 1, hs/2), against q and k (N, H, 1, hs)
        rope = [None if r is None else tuple(B.reshape(t, (t.shape[0], 1, 1, t.shape[-1])) for t in r)
                for r in rope]
    new_cache: KVCache = []

    def attend(i: int, q: Array, k: Array, v: Array) -> Array:
        k = B.where(write_mask, k, cache[i][0])  # (N, Hkv, 1, hs) broadcast into (N, Hkv, block_size, hs)
        v = B.where(write_mask, v, cache[i][1])
        new_cache.append((k, v))
        m = attn_mask if per_row else attn_mask[1:2] if cfg.sliding(i) else attn_mask[:1]  # see decode_inputs
        return L.attention(B, cfg, q, k, v, m)  # grouped-query: the cache is read as it is, not repeated

    for i in range(cfg.n_layer):
        x = _block(B, cfg, p, i, x, attend, {}, rope[i])
    return lm_logits(B, cfg, p, L.norm(B, cfg, p, "ln_f", x)), new_cache
