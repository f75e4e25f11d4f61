"""The layer library every family is built from, written once against a Backend `B`.

Each layer reads its parameters from the flat dict `p` by name prefix and the config's options
(norm, activation, positions, bias, n_kv_head); the maths of each piece is a composite on `Backend`
(layer_norm, rms_norm, gelu, gelu_tanh, swiglu, rope, repeat_kv, attention), so adapters may fuse it
and the parity suite checks every override against the reference body.

Shapes: B batch, T tokens, C d_model, H query heads, Hkv key/value heads, hs head size.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from twinlm.core import spec as S
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.errors import ConfigError
from twinlm.core.quant import SUFFIXES as QUANTIZED
from twinlm.core.quant import check_format

Params = dict[str, Array]
# Attends q (N, H, Tq, hs) over the caller's keys: (layer, q, k, v) with k, v (N, Hkv, Tk, hs).
Attend = Callable[[int, Array, Array, Array], Array]


# ---- tables computed on the host ---------------------------------------------------------------

@lru_cache(maxsize=16)  # built on every forward (each token when generating): compute once, read-only
def sinusoidal_table(n_pos: int, d_model: int) -> np.ndarray:
    """The original paper's encoding: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)."""
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model))
    table = np.zeros((n_pos, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(pos * inv_freq)
    table[:, 1::2] = np.cos(pos * inv_freq)
    return _read_only(table.astype(np.float32))


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple = ()) -> np.ndarray:
    """The rotary frequencies theta^(-2i/hs) (float64, hs/2), with the config's scaling applied (pinned to
    transformers' `modeling_rope_utils`): `()` none; `("linear", f)` every frequency / f; `("llama3", f, lo,
    hi, n0)` Llama 3.1's: wavelengths 2 pi / freq above n0/lo divided by f, below n0/hi kept, and between
    them (1 - s) freq / f + s freq with s = (n0 / wavelength - lo) / (hi - lo)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return inv_freq
    kind, factor = scaling[0], scaling[1]
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"unknown RoPE scaling {kind!r}")
    lo, hi, n0 = scaling[2:]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > n0 / lo, inv_freq / factor, inv_freq)
    smooth = (n0 / wavelen - lo) / (hi - lo)
    medium = (wavelen >= n0 / hi) & (wavelen <= n0 / lo)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


@lru_cache(maxsize=16)
def rope_tables(n_pos: int, head_dim: int, theta: float,
                scaling: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (n_pos, hs/2) of pos * freq (`rope_inv_freq`), the angles `Backend.rope` rotates by."""
    angles = np.arange(n_pos, dtype=np.float64)[:, None] * rope_inv_freq(head_dim, theta, scaling)
    return _read_only(np.cos(angles).astype(np.float32)), _read_only(np.sin(angles).astype(np.float32))


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # a cached table is shared: nobody may change it in place
    return a


def causal_mask(t_q: int, t_k: int) -> np.ndarray:
    """Boolean (t_q, t_k), True where query i (at absolute position t_k - t_q + i) may see key j."""
    offset = t_k - t_q
    return np.arange(t_k)[None, :] <= (np.arange(t_q)[:, None] + offset)


def sliding_window_mask(causal: np.ndarray, window: int) -> np.ndarray:
    """`causal` (t_q, t_k) restricted to a band: query i (at absolute position t_k - t_q + i) sees key j
    only where position - j < window, itself and the window - 1 keys before it (transformers' rule)."""
    t_q, t_k = causal.shape
    pos = np.arange(t_q)[:, None] + (t_k - t_q)
    return causal & (pos - np.arange(t_k)[None, :] < window)


def padding_mask(lengths: np.ndarray, t: int) -> np.ndarray:
    """Boolean (N, 1, 1, t): True at the first lengths[b] positions (real tokens), the keys each query
    may see in a bidirectional encoder. Every row must keep a key: lengths >= 1."""
    lengths = np.asarray(lengths)
    if lengths.size and int(lengths.min()) < 1:
        raise ValueError("every example needs at least one real token (an all-padding row has no keys)")
    return (np.arange(t)[None, :] < lengths[:, None]).reshape(len(lengths), 1, 1, t)


# ---- parameter specs ---------------------------------------------------------------------------

def linear_spec(cfg: ModelConfig, name: str, n_in: int, n_out: int, std: float = S.INIT_STD,
                bias: bool | None = None) -> S.Spec:
    """weight (in, out) and bias (where `bias`, default the config's); plus LoRA's a (in, r) ~ N(0, 1/in)
    and b (r, out) = 0 where the config adapts this layer, so an adapted model starts exactly as the
    pretrained one."""
    if cfg.quant_bits:
        out = quant_spec(cfg, name, n_in, n_out)
    else:
        out = {f"{name}.weight": S.weight(n_in, n_out, std)}
    if cfg.bias if bias is None else bias:
        out[f"{name}.bias"] = S.bias(n_out)
    if lora_target(cfg, name):
        r = cfg.lora_rank
        out[f"{name}.lora_a"] = S.ParamSpec((n_in, r), "normal", n_in ** -0.5, decay=False, matmul=True)
        out[f"{name}.lora_b"] = S.ParamSpec((r, n_out), "zeros", decay=False, matmul=True)
    return out


def quant_spec(cfg: ModelConfig, name: str, n_in: int, n_out: int, table: bool = False) -> S.Spec:
    """A quantized linear layer's weight (`core.quant`'s format), frozen: packed words (n_out, n_in * bits /
    32) and per-group scales and biases (n_out, n_in / group_size). `table`: an embedding table (n_out rows
    of n_in), whose float form is stored as its rows, not transposed (see `embedding_spec`)."""
    bits, g = cfg.quant_bits, cfg.quant_group_size
    try:
        check_format(n_in, bits, g, f"layer {name}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {f"{name}.qweight": S.ParamSpec((n_out, n_in * bits // 32), "zeros", decay=False, trainable=False,
                                           dtype="uint32", table=table),
            f"{name}.scales": S.ParamSpec((n_out, n_in // g), "ones", decay=False, trainable=False),
            f"{name}.biases": S.ParamSpec((n_out, n_in // g), "zeros", decay=False, trainable=False)}


def embedding_spec(cfg: ModelConfig, name: str, n: int, d: int) -> S.Spec:
    """A token embedding table (n, d); with `quant_embedding`, quantized (`core.quant`) as the transposed
    weight of a linear layer d -> n, which it is for a tied head (logits = h @ E.T): one table serves the
    lookup (`embed`) and the head (`quantized_linear`)."""
    if cfg.quant_embedding:
        return quant_spec(cfg, name, d, n, table=True)
    return {f"{name}.weight": S.embedding(n, d)}


def head_spec(cfg: ModelConfig, name: str, n_in: int, n_out: int) -> S.Spec:
    """An untied LM head's weight (n_in, n_out), no bias; quantized with the embedding (`quant_embedding`)."""
    if cfg.quant_embedding:
        return quant_spec(cfg, name, n_in, n_out)
    return {f"{name}.weight": S.weight(n_in, n_out)}


def lora_target(cfg: ModelConfig, name: str) -> bool:
    """Whether LoRA adapts the linear layer `name`: a block's layer (blocks.<i>.<target>) in lora_targets."""
    parts = name.split(".")
    return bool(cfg.lora_rank) and parts[0] == "blocks" and ".".join(parts[2:]) in cfg.lora_targets


def norm_spec(cfg: ModelConfig, name: str) -> S.Spec:
    if cfg.norm == "none":
        return {}
    out = {f"{name}.weight": _gain(cfg, cfg.d_model)}
    if cfg.bias and cfg.norm == "layernorm":  # RMSNorm has no bias
        out[f"{name}.bias"] = S.bias(cfg.d_model)
    return out


def _gain(cfg: ModelConfig, n: int) -> S.ParamSpec:
    """A norm's gain: ones, or zeros where the config stores it as the offset from one (Gemma)."""
    return S.bias(n) if cfg.norm_offset else S.gain(n)


def attention_spec(cfg: ModelConfig, name: str, proj_std: float = S.INIT_STD) -> S.Spec:
    """One fused q|k|v projection (C -> (H + 2 Hkv) hs), then the output projection (H hs -> C); with
    `qk_norm`, a gain (hs) for q's and k's per-head RMSNorm."""
    hs = cfg.head_dim
    out = {**linear_spec(cfg, f"{name}.qkv", cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * hs,
                         bias=bool(cfg.bias or cfg.qkv_bias)),
           **linear_spec(cfg, f"{name}.proj", cfg.n_head * hs, cfg.d_model, proj_std)}
    if cfg.qk_norm:
        out |= {f"{name}.q_norm.weight": _gain(cfg, hs), f"{name}.k_norm.weight": _gain(cfg, hs)}
    return out


def mlp_spec(cfg: ModelConfig, name: str, proj_std: float = S.INIT_STD) -> S.Spec:
    """fc: C -> F (SwiGLU, GeGLU: C -> 2F, gate then up), proj: F -> C."""
    width = 2 * cfg.d_ff if cfg.activation in ("swiglu", "geglu_tanh") else cfg.d_ff
    return {**linear_spec(cfg, f"{name}.fc", cfg.d_model, width),
            **linear_spec(cfg, f"{name}.proj", cfg.d_ff, cfg.d_model, proj_std)}


def classifier_spec(cfg: ModelConfig) -> S.Spec:
    """The task head of a fine-tuned model: pooled (C) -> n_classes logits."""
    if not cfg.n_classes:
        return {}
    return {"cls.weight": S.weight(cfg.d_model, cfg.n_classes), "cls.bias": S.bias(cfg.n_classes)}


# ---- layers ------------------------------------------------------------------------------------

def linear(B: Backend, cfg: ModelConfig, p: Params, name: str, x: Array,
           drop: dict[str, Array] | None = None) -> Array:
    """x @ W + b, plus the LoRA adapter's (dropout(x) @ a) @ b * alpha / r where the layer has one."""
    if f"{name}.qweight" in p:  # a quantized layer (core.quant)
        y = B.quantized_linear(x, p[f"{name}.qweight"], p[f"{name}.scales"], p[f"{name}.biases"],
                               p.get(f"{name}.bias"), cfg.quant_bits, cfg.quant_group_size)
    else:
        y = B.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))
    if f"{name}.lora_a" in p:
        x_in = residual_dropout(x, drop or {}, f"{name}.lora")
        y = y + B.lora(x_in, p[f"{name}.lora_a"], p[f"{name}.lora_b"], cfg.lora_scale)
    return y


def embed(B: Backend, cfg: ModelConfig, p: Params, name: str, idx: Array) -> Array:
    """Rows of the embedding table `name` at token ids `idx` (...,) -> (..., C); a quantized table's rows
    dequantized (`Backend.quantized_take`) into the model's dtype (that of its float weights)."""
    if f"{name}.qweight" not in p:
        return B.take(p[f"{name}.weight"], idx)
    rows = B.quantized_take(p[f"{name}.qweight"], p[f"{name}.scales"], p[f"{name}.biases"], idx,
                            cfg.quant_bits, cfg.quant_group_size)
    ref = next((v for k, v in p.items() if not k.endswith(QUANTIZED)), None)
    return rows if ref is None else B.like(rows, ref)  # (a model without float weights: float32)


def tied_head(B: Backend, cfg: ModelConfig, p: Params, name: str, h: Array,
              bias: Array | None = None) -> Array:
    """h @ E.T (+ bias): the LM head tied to the embedding table `name`, read in its (V, C) layout
    (`Backend.matmul_t`); a quantized table (`quant_embedding`) is the head's transposed weight as is."""
    if f"{name}.qweight" in p:
        q, s, b = (p[f"{name}.{k}"] for k in ("qweight", "scales", "biases"))
        return B.quantized_linear(h, q, s, b, bias, cfg.quant_bits, cfg.quant_group_size)
    y = B.matmul_t(h, p[f"{name}.weight"])
    return y if bias is None else y + bias


def norm(B: Backend, cfg: ModelConfig, p: Params, name: str, x: Array) -> Array:
    if cfg.norm == "none":
        return x
    if cfg.norm == "rmsnorm":
        return rms_norm(B, cfg, p[f"{name}.weight"], x)
    return B.layer_norm(x, p[f"{name}.weight"], p.get(f"{name}.bias"), cfg.norm_eps)


def add_norm(B: Backend, cfg: ModelConfig, p: Params, name: str, x: Array, y: Array) -> tuple[Array, Array]:
    """The residual add x + y and the norm `name` of the sum, as (sum, normed): one composite, so an
    adapter can fuse the two passes over the residual stream (and their gradients) into one."""
    if cfg.norm == "none":
        s = x + y
        return s, s
    if cfg.norm == "rmsnorm":
        w = p[f"{name}.weight"]
        return B.add_rms_norm(x, y, w + 1.0 if cfg.norm_offset else w, cfg.norm_eps)
    return B.add_layer_norm(x, y, p[f"{name}.weight"], p.get(f"{name}.bias"), cfg.norm_eps)


def rms_norm(B: Backend, cfg: ModelConfig, w: Array, x: Array) -> Array:
    """RMSNorm over x's last axis with gain w, or 1 + w where the config stores the offset (Gemma)."""
    return B.rms_norm(x, w + 1.0 if cfg.norm_offset else w, cfg.norm_eps)


def mlp(B: Backend, cfg: ModelConfig, p: Params, name: str, x: Array,
        drop: dict[str, Array] | None = None) -> Array:
    h = linear(B, cfg, p, f"{name}.fc", x, drop)
    if cfg.activation == "swiglu":
        h = B.swiglu(h[..., :cfg.d_ff], h[..., cfg.d_ff:])
    elif cfg.activation == "geglu_tanh":
        h = B.gelu_tanh(h[..., :cfg.d_ff]) * h[..., cfg.d_ff:]
    elif cfg.activation == "gelu_tanh":
        h = B.gelu_tanh(h)
    else:
        h = B.gelu(h)
    return linear(B, cfg, p, f"{name}.proj", h, drop)


def rotate(B: Backend, x: Array, rope: tuple[Array, Array]) -> Array:
    """RoPE on the first 2 * cos.shape[-1] dimensions of each head of x (..., T, hs); the rest pass
    through (partial rotary: `ModelConfig.rope_dim`)."""
    r = 2 * rope[0].shape[-1]
    if r == x.shape[-1]:
        return B.rope(x, *rope)
    return B.concat([B.rope(x[..., :r], *rope), x[..., r:]], axis=-1)


def self_attention(B: Backend, cfg: ModelConfig, p: Params, name: str, layer: int, x: Array,
                   attend: Attend, rope: tuple[Array, Array] | None,
                   drop: dict[str, Array] | None = None) -> Array:
    """Multi-head (grouped-query when n_kv_head < n_head) self-attention of x (N, T, C); `rope` is the
    (cos, sin) rows of x's positions when the config uses rotary positions."""
    batch, t, _ = x.shape
    H, Hkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim

    qkv = linear(B, cfg, p, f"{name}.qkv", x, drop)  # (N, T, (H + 2 Hkv) hs)
    q, k, v = B.split_heads(qkv, H, Hkv, hs)  # (N, H, T, hs), (N, Hkv, T, hs) x 2
    if cfg.qk_norm:  # each head's q and k normalised over hs, before the rotation (Qwen3)
        q = rms_norm(B, cfg, p[f"{name}.q_norm.weight"], q)
        k = rms_norm(B, cfg, p[f"{name}.k_norm.weight"], k)
    if rope is not None:
        q, k = rotate(B, q, rope), rotate(B, k, rope)
    if cfg.query_scale:  # attention divides by sqrt(hs); the model wants sqrt(query_scale)
        q = q * float(np.sqrt(hs / cfg.query_scale))
    y = attend(layer, q, k, v)  # (N, H, T, hs)
    y = B.reshape(B.transpose(y, (0, 2, 1, 3)), (batch, t, H * hs))  # heads concatenated
    return linear(B, cfg, p, f"{name}.proj", y, drop)


def attend_all(B: Backend, cfg: ModelConfig, mask: Array | None, dropout: dict[str, Array],
               k_cache: list[tuple[Array, Array]] | None = None,
               window_mask: Array | None = None) -> tuple[Attend, list[tuple[Array, Array]]]:
    """An `Attend` over this call's keys (after the layer's cached ones, if any), recording each
    layer's (k, v) in the returned list (Hkv heads: grouped-query attention reads them as they are).
    Sliding-window layers (`cfg.sliding`) attend through `window_mask` instead of `mask`."""
    new_cache: list[tuple[Array, Array]] = []

    def attend(i: int, q: Array, k: Array, v: Array) -> Array:
        if k_cache:
            k = B.concat([k_cache[i][0], k], axis=2)
            v = B.concat([k_cache[i][1], v], axis=2)
        new_cache.append((k, v))
        m = window_mask if cfg.sliding(i) else mask
        keep = dropout.get(f"blocks.{i}.attn")
        return attention(B, cfg, q, k, v, m, keep)

    return attend, new_cache


def attention(B: Backend, cfg: ModelConfig, q: Array, k: Array, v: Array, mask: Array | None,
              dropout: Array | None = None) -> Array:
    """`B.grouped_attention` of q (N, H, Tq, hs) over k, v (N, Hkv, Tk, hs) as cached (grouped-query
    attention reads them without repeating them per query head), with the config's attention-logit soft-cap
    where it has one (Gemma 2)."""
    if cfg.attn_softcap:
        return B.grouped_attention(q, k, v, mask, dropout, softcap=cfg.attn_softcap)
    return B.grouped_attention(q, k, v, mask, dropout)


def residual_dropout(x: Array, drop: dict[str, Array], site: str) -> Array:
    return x * drop[site] if site in drop else x


def classify(B: Backend, cfg: ModelConfig, p: Params, pooled: Array) -> Array:
    """Class logits (N, n_classes) of the pooled representation (N, C)."""
    return linear(B, cfg, p, "cls", pooled)


def pool_at(B: Backend, h: Array, pool: Array) -> Array:
    """sum_t h[:, t] * pool[:, t]: the hidden state (N, C) at the position where the one-hot `pool`
    (N, T) is 1 (the last real token of a decoder, [CLS] of an encoder), differentiable on any backend."""
    return B.sum(h * B.like(B.reshape(pool, (*pool.shape, 1)), h), axis=1)
