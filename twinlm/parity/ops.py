"""Every primitive and composite against an independent float64 numpy reference (forward) and float64
central finite differences of it (gradient), like tinygrad's `helper_test_op`; and every fused override
against the reference body in core/backend.py."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from twinlm.core import layers, model, quant
from twinlm.core.backend import RMS_NORM_EPS, Array, Backend
from twinlm.parity.checks import FORWARD_TOL, GRAD_TOL, Check, Tolerance, compare

COMPOSITES = ("erf", "custom_grad", "gelu", "gelu_tanh", "sigmoid", "silu", "swiglu", "linear", "lora",
              "matmul_t", "rope", "repeat_kv", "softmax", "log_softmax", "layer_norm", "rms_norm",
              "attention", "grouped_attention", "cross_entropy", "add_layer_norm", "add_rms_norm",
              "quantized_linear", "quantized_take", "split_heads", "adamw", "sum_squares")


@dataclass(frozen=True)
class OpCase:
    """`fn(B, *inputs)` on a backend vs `ref(*inputs)` in float64 numpy; `diff` are the indices
    of the inputs to differentiate; `composite` names the Backend composite it exercises."""

    name: str
    fn: Callable[..., Array]
    ref: Callable[..., np.ndarray]
    inputs: tuple[np.ndarray, ...]
    diff: tuple[int, ...] = (0,)
    composite: str | None = None


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _np_log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    s = x - x.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def _np_layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * w
    return y if b is None else y + b


def _np_rms_norm(x: np.ndarray, w: np.ndarray, eps: float = RMS_NORM_EPS) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _np_gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _np_silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _np_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (x[i], x[i + hs/2]) by the angle whose cos/sin are given: the half-split layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    return np.repeat(x, n_rep, axis=1)  # kv head j serves query heads j * n_rep ... (j + 1) * n_rep - 1


def _np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                  keep: np.ndarray | None = None, softcap: float = 0.0) -> np.ndarray:
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    att = _np_softmax(scores)
    return (att if keep is None else att * keep) @ v


def _np_cross_entropy(logits: np.ndarray, targets: np.ndarray,
                      weights: np.ndarray | None = None) -> np.ndarray:
    nll = -np.take_along_axis(_np_log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return nll.mean() if weights is None else (nll * weights).sum() / max(weights.sum(), 1.0)


def op_cases(seed: int = 0) -> list[OpCase]:
    """Every primitive and composite, on small inputs drawn from `seed` (away from kinks and ties)."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    def positive(*shape: int) -> np.ndarray:
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)

    x, a, b = normal(3, 5), normal(3, 5), normal(3, 5)
    cond = rng.random((3, 5)) < 0.5
    table, ids = normal(6, 4), rng.integers(0, 6, (2, 3)).astype(np.int32)
    idx = rng.integers(0, 5, (3, 1)).astype(np.int32)
    q, k, v = normal(1, 2, 4, 3), normal(1, 2, 4, 3), normal(1, 2, 4, 3)
    causal = model.causal_mask(4, 4)
    keep = ((rng.random((1, 2, 4, 4)) >= 0.25) / 0.75).astype(np.float32)
    xn, w, bias = normal(2, 3, 8), (1.0 + 0.1 * normal(8)), 0.1 * normal(8)
    cos, sin = layers.rope_tables(4, 6, 10000.0)
    xr = normal(1, 2, 4, 6)
    pad = layers.padding_mask(np.array([3]), 4)  # (1, 1, 1, 4): the last key is padding
    logits, targets = normal(4, 7), rng.integers(0, 7, (4,)).astype(np.int32)
    weights = np.array([1, 0, 1, 1], dtype=np.float32)
    return [
        OpCase("exp", lambda B, x: B.exp(x), np.exp, (x,)),
        OpCase("log", lambda B, x: B.log(x), np.log, (positive(3, 5),)),
        OpCase("tanh", lambda B, x: B.tanh(x), np.tanh, (x,)),
        OpCase("sqrt", lambda B, x: B.sqrt(x), np.sqrt, (positive(3, 5),)),
        OpCase("rsqrt", lambda B, x: B.rsqrt(x), lambda x: 1.0 / np.sqrt(x), (positive(3, 5),)),
        OpCase("maximum", lambda B, a, b: B.maximum(a, b), np.maximum, (a, b), (0, 1)),
        OpCase("maximum scalar", lambda B, x: B.maximum(x, 0.3), lambda x: np.maximum(x, 0.3), (x,)),
        OpCase("minimum", lambda B, a, b: B.minimum(a, b), np.minimum, (a, b), (0, 1)),
        OpCase("minimum scalar", lambda B, x: B.minimum(x, 0.3), lambda x: np.minimum(x, 0.3), (x,)),
        OpCase("sum all", lambda B, x: B.sum(x), np.sum, (x,)),
        OpCase("sum axis 1 keepdims", lambda B, x: B.sum(x, axis=1, keepdims=True),
               lambda x: x.sum(axis=1, keepdims=True), (x,)),
        OpCase("max all", lambda B, x: B.max(x), np.max, (x,)),
        OpCase("max axis -1", lambda B, x: B.max(x, axis=-1), lambda x: x.max(axis=-1), (x,)),
        OpCase("mean all", lambda B, x: B.mean(x), np.mean, (x,)),
        OpCase("mean axis 0 keepdims", lambda B, x: B.mean(x, axis=0, keepdims=True),
               lambda x: x.mean(axis=0, keepdims=True), (x,)),
        OpCase("reshape", lambda B, x: B.reshape(x, (5, 3)), lambda x: x.reshape(5, 3), (x,)),
        OpCase("transpose", lambda B, x: B.transpose(x, (2, 0, 1)), lambda x: x.transpose(2, 0, 1),
               (normal(2, 3, 4),)),
        OpCase("where", lambda B, c, a, b: B.where(c, a, b), np.where, (cond, a, b), (1, 2)),
        OpCase("take", lambda B, t, i: B.take(t, i), lambda t, i: t[i], (table, ids)),
        OpCase("take_along_axis", lambda B, x, i: B.take_along_axis(x, i, axis=-1),
               lambda x, i: np.take_along_axis(x, i, axis=-1), (x, idx)),
        OpCase("concat", lambda B, a, b: B.concat([a, b], axis=1),
               lambda a, b: np.concatenate([a, b], axis=1), (normal(2, 3), normal(2, 2)), (0, 1)),
        OpCase("matmul", lambda B, a, b: a @ b, np.matmul, (normal(2, 3, 4), normal(4, 5)), (0, 1)),
        OpCase("erf", lambda B, x: B.erf(x), _erf, (rng.uniform(-3, 3, (3, 5)).astype(np.float32),),
               composite="erf"),
        OpCase("custom_grad", lambda B, x: B.custom_grad(B.tanh, lambda t: 1.0 - B.tanh(t) ** 2, x), np.tanh,
               (x,), composite="custom_grad"),
        OpCase("gelu", lambda B, x: B.gelu(x), lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
               (2 * x,), composite="gelu"),
        OpCase("gelu_tanh", lambda B, x: B.gelu_tanh(x), _np_gelu_tanh, (2 * x,), composite="gelu_tanh"),
        OpCase("sigmoid", lambda B, x: B.sigmoid(x), lambda x: 1 / (1 + np.exp(-x)), (4 * x,),
               composite="sigmoid"),
        OpCase("silu", lambda B, x: B.silu(x), _np_silu, (2 * x,), composite="silu"),
        OpCase("swiglu", lambda B, a, b: B.swiglu(a, b), lambda a, b: _np_silu(a) * b, (a, b), (0, 1),
               composite="swiglu"),
        OpCase("lora", lambda B, x, a, b: B.lora(x, a, b, 2.5), lambda x, a, b: (x @ a) @ b * 2.5,
               (normal(2, 3, 4), normal(4, 2), normal(2, 5)), (0, 1, 2), composite="lora"),
        OpCase("rope", lambda B, x, c, s: B.rope(x, c, s), _np_rope, (xr, cos, sin), composite="rope"),
        OpCase("repeat_kv", lambda B, x: B.repeat_kv(x, 2), lambda x: _np_repeat_kv(x, 2), (xr,),
               composite="repeat_kv"),
        OpCase("softmax", lambda B, x: B.softmax(x, axis=-1), _np_softmax, (x,), composite="softmax"),
        OpCase("log_softmax", lambda B, x: B.log_softmax(x, axis=-1), _np_log_softmax, (x,),
               composite="log_softmax"),
        OpCase("layer_norm", lambda B, x, w, b: B.layer_norm(x, w, b), _np_layer_norm, (xn, w, bias),
               (0, 1, 2), composite="layer_norm"),
        OpCase("layer_norm no bias", lambda B, x, w: B.layer_norm(x, w, None),
               lambda x, w: _np_layer_norm(x, w, None), (xn, w), (0, 1), composite="layer_norm"),
        OpCase("rms_norm", lambda B, x, w: B.rms_norm(x, w), _np_rms_norm, (xn, w), (0, 1),
               composite="rms_norm"),
        OpCase("attention padding", lambda B, q, k, v, m: B.attention(q, k, v, m), _np_attention,
               (q, k, v, pad), (0, 1, 2), composite="attention"),
        OpCase("attention causal", lambda B, q, k, v, m: B.attention(q, k, v, m), _np_attention,
               (q, k, v, causal), (0, 1, 2), composite="attention"),
        OpCase("attention sliding window", lambda B, q, k, v, m: B.attention(q, k, v, m), _np_attention,
               (q, k, v, layers.sliding_window_mask(causal, 2)), (0, 1, 2), composite="attention"),
        OpCase("attention soft-capped", lambda B, q, k, v, m: B.attention(q, k, v, m, softcap=0.5),
               lambda q, k, v, m: _np_attention(q, k, v, m, softcap=0.5), (2 * q, k, v, causal), (0, 1, 2),
               composite="attention"),  # Gemma 2: 0.5 * tanh(s / 0.5), a cap the scores exceed
        OpCase("rms_norm per head", lambda B, x, w: B.rms_norm(x, w), _np_rms_norm, (xr, w[:6]), (0, 1),
               composite="rms_norm"),  # Qwen3's q/k norm: a gain of head size over (N, H, T, hs)
        OpCase("attention no mask", lambda B, q, k, v: B.attention(q, k, v, None),
               lambda q, k, v: _np_attention(q, k, v, None), (q, k, v), (0, 1, 2), composite="attention"),
        OpCase("attention dropout", lambda B, q, k, v, m, d: B.attention(q, k, v, m, d), _np_attention,
               (q, k, v, causal, keep), (0, 1, 2), composite="attention"),
        OpCase("cross_entropy", lambda B, x, t: B.cross_entropy(x, t), _np_cross_entropy, (logits, targets),
               composite="cross_entropy"),
        OpCase("cross_entropy weighted", lambda B, x, t, w: B.cross_entropy(x, t, w), _np_cross_entropy,
               (logits, targets, weights), composite="cross_entropy"),
        # Last, so the cases above keep their draws from rng.
        # 24 rows: MLX's BLAS kernel; at most 16 (decoding), MLX's float32 GEMV (linear_lowp): both paths.
        OpCase("linear", lambda B, x, w, b: B.linear(x, w, b), lambda x, w, b: x @ w + b,
               (normal(4, 6, 4), normal(4, 5), normal(5)), (0, 1, 2), composite="linear"),
        OpCase("linear no bias", lambda B, x, w: B.linear(x, w, None), np.matmul,
               (normal(3, 4), normal(4, 5)), (0, 1), composite="linear"),
        OpCase("linear few rows", lambda B, x, w, b: B.linear(x, w, b), lambda x, w, b: x @ w + b,
               (normal(2, 3, 4), normal(4, 5), normal(5)), (0, 1, 2), composite="linear"),
        # The residual add + norm pair (both outputs, side by side, so each one's gradient counts).
        OpCase("add_layer_norm", lambda B, x, y, w, b: B.concat(list(B.add_layer_norm(x, y, w, b)), axis=-1),
               lambda x, y, w, b: np.concatenate([x + y, _np_layer_norm(x + y, w, b)], axis=-1),
               (xn, normal(2, 3, 8), w, bias), (0, 1, 2, 3), composite="add_layer_norm"),
        OpCase("add_layer_norm no bias",
               lambda B, x, y, w: B.concat(list(B.add_layer_norm(x, y, w, None)), axis=-1),
               lambda x, y, w: np.concatenate([x + y, _np_layer_norm(x + y, w, None)], axis=-1),
               (xn, normal(2, 3, 8), w), (0, 1, 2), composite="add_layer_norm"),
        OpCase("add_rms_norm", lambda B, x, y, w: B.concat(list(B.add_rms_norm(x, y, w)), axis=-1),
               lambda x, y, w: np.concatenate([x + y, _np_rms_norm(x + y, w)], axis=-1),
               (xn, normal(2, 3, 8), w), (0, 1, 2), composite="add_rms_norm"),
        *_quant_cases(normal),  # last again: the cases above keep their draws
        OpCase("matmul_t", lambda B, x, w: B.matmul_t(x, w), lambda x, w: x @ w.T,
               (normal(2, 3, 4), normal(5, 4)), (0, 1), composite="matmul_t"),  # the tied head, (V, C) weight
        # Attention on the head split's strided views of one qkv projection, merged back, as the layers do
        # it (a fused kernel reads the views in place and lays its result out so that the merge is a view).
        OpCase("attention heads split", _attention_heads, _np_attention_heads,
               (normal(2, 5, 18), model.causal_mask(5, 5)), (0,), composite="attention"),
        # q, k, v of 2, 1, 1 heads of 4 from one (N, T, 16) projection, side by side along the head axis.
        OpCase("split_heads", lambda B, x: B.concat(list(B.split_heads(x, 2, 1, 4)), axis=1),
               lambda x: np.transpose(x.reshape(2, 3, 4, 4), (0, 2, 1, 3)), (normal(2, 3, 16),),
               composite="split_heads"),
        *_grouped_cases(normal, rng, causal, pad),  # last: the cases above keep their draws
        *_optimizer_cases(normal, positive),  # last again
    ]


# AdamW at step 3 (lr, bias corrections) on a matrix with weight decay and a vector without, the gradients
# clipped by 0.5 first, as core.step's update runs it (optim.bias_corrections(3) at betas 0.9, 0.99).
_ADAMW = dict(lr=0.01, bc1=0.271, bc2=0.029701, beta1=0.9, beta2=0.99, eps=1e-8, decay=[0.1, 0.0], scale=0.5)


def _adamw(B: Backend, p: Array, g: Array, m: Array, v: Array, p2: Array, g2: Array, m2: Array,
           v2: Array) -> Array:
    ps, ms, vs = B.adamw([p, p2], [g, g2], [m, m2], [v, v2], **_ADAMW)
    return B.concat([B.reshape(x, (-1,)) for x in (*ps, *ms, *vs)], axis=0)


def _np_adamw(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, p2: np.ndarray, g2: np.ndarray,
              m2: np.ndarray, v2: np.ndarray) -> np.ndarray:
    a = _ADAMW
    ps, ms, vs = [], [], []
    for x, gx, mx_, vx, wd in ((p, g, m, v, a["decay"][0]), (p2, g2, m2, v2, a["decay"][1])):
        gx = gx * a["scale"]
        m1 = a["beta1"] * mx_ + (1 - a["beta1"]) * gx
        v1 = a["beta2"] * vx + (1 - a["beta2"]) * gx * gx
        ps.append(x * (1 - a["lr"] * wd) - a["lr"] * (m1 / a["bc1"]) / (np.sqrt(v1 / a["bc2"]) + a["eps"]))
        ms.append(m1)
        vs.append(v1)
    return np.concatenate([x.ravel() for x in (*ps, *ms, *vs)])


def _optimizer_cases(normal: Callable[..., np.ndarray], positive: Callable[..., np.ndarray]) -> list[OpCase]:
    """AdamW over two tensors in one call (no gradient: the step never differentiates it) and the global
    norm's sum of squares."""
    tensors = (normal(3, 5), normal(3, 5), 0.1 * normal(3, 5), 0.01 * positive(3, 5),
               normal(5), normal(5), 0.1 * normal(5), 0.01 * positive(5))
    return [
        OpCase("adamw", _adamw, _np_adamw, tensors, (), composite="adamw"),
        OpCase("sum_squares", lambda B, a, b: B.sum_squares([a, b]),
               lambda a, b: np.sum(a * a) + np.sum(b * b), (normal(3, 5), normal(7)), (0, 1),
               composite="sum_squares"),
    ]


def _np_grouped(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                keep: np.ndarray | None = None) -> np.ndarray:
    n_rep = q.shape[1] // k.shape[1]
    return _np_attention(q, _np_repeat_kv(k, n_rep), _np_repeat_kv(v, n_rep), mask, keep)


def _grouped_cases(normal: Callable[..., np.ndarray], rng: np.random.Generator, causal: np.ndarray,
                   pad: np.ndarray) -> list[OpCase]:
    """Grouped-query attention (4 query heads on 2 kv heads): the causal (Tq, Tk) mask (tiled when the
    query heads are folded), a per-example padding mask, one query over a cache with a row per example
    (decoding), attention dropout, and a per-head mask (the repeat_kv path)."""
    q, k, v = normal(2, 4, 4, 3), normal(2, 2, 4, 3), normal(2, 2, 4, 3)
    keep = ((rng.random((2, 4, 4, 4)) >= 0.25) / 0.75).astype(np.float32)
    rows = np.array([[True, True, False, False], [True, True, True, False]]).reshape(2, 1, 1, 4)
    per_head = rng.random((1, 4, 4, 4)) < 0.7
    per_head[..., 0] = True  # every row keeps a key

    def grouped(B: Backend, q: Array, k: Array, v: Array, m: Array, *d: Array) -> Array:
        return B.grouped_attention(q, k, v, m, *d)

    return [
        OpCase("grouped_attention causal", grouped, _np_grouped, (q, k, v, causal), (0, 1, 2),
               composite="grouped_attention"),
        OpCase("grouped_attention padding", grouped, _np_grouped, (q, k, v, np.concatenate([pad, pad])),
               (0, 1, 2), composite="grouped_attention"),
        OpCase("grouped_attention decoding", grouped, _np_grouped, (q[:, :, :1], k, v, rows), (0, 1, 2),
               composite="grouped_attention"),
        OpCase("grouped_attention dropout", grouped, _np_grouped, (q, k, v, causal, keep), (0, 1, 2),
               composite="grouped_attention"),
        OpCase("grouped_attention per-head mask", grouped, _np_grouped, (q, k, v, per_head), (0, 1, 2),
               composite="grouped_attention"),
    ]


def _attention_heads(B: Backend, qkv: Array, mask: Array) -> Array:
    """Causal attention of (N, T, 3 H hs) qkv split into H = 2 heads (hs = 3), merged back to (N, T, H hs)."""
    n, t, c = qkv.shape
    hs = c // 6
    o = B.attention(*B.split_heads(qkv, 2, 2, hs), mask)
    return B.reshape(B.transpose(o, (0, 2, 1, 3)), (n, t, 2 * hs))


def _np_attention_heads(qkv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n, t, c = qkv.shape
    hs = c // 6
    q, k, v = (np.transpose(z.reshape(n, t, 2, hs), (0, 2, 1, 3)) for z in np.split(qkv, 3, axis=-1))
    return np.transpose(_np_attention(q, k, v, mask), (0, 2, 1, 3)).reshape(n, t, 2 * hs)


def _quant_cases(normal: Callable[..., np.ndarray]) -> list[OpCase]:
    """The dequantize primitive (times x, so it has an input to differentiate) and the quantized linear layer
    (gradient with respect to x and the bias: its weights are frozen), 8- and 4-bit, group 32 (core.quant)."""
    out = []
    for bits in quant.BITS:
        qsb = quant.quantize(normal(64, 5) / 8.0, bits, 32)

        def deq(q: np.ndarray, s: np.ndarray, b: np.ndarray, bits: int = bits) -> np.ndarray:
            return quant.dequantize(q, s, b, bits, 32, np.float64)

        out += [
            OpCase(f"dequantize {bits}-bit",
                   lambda B, x, q, s, b, bits=bits: x * B.dequantize(q, s, b, bits, 32),
                   lambda x, q, s, b, deq=deq: x * deq(q, s, b), (normal(5, 64), *qsb)),
            OpCase(f"quantized_linear {bits}-bit",
                   lambda B, x, q, s, b, c, bits=bits: B.quantized_linear(x, q, s, b, c, bits, 32),
                   lambda x, q, s, b, c, deq=deq: x @ deq(q, s, b).T + c, (normal(2, 3, 64), *qsb, normal(5)),
                   (0, 4), composite="quantized_linear"),
        ]
    # A quantized embedding's lookup (a table of 5 rows of 64, 8- and 4-bit): rows at ids (2, 3), every row
    # read, one twice; times x, so it has an input to differentiate (the table itself is frozen).
    ids = np.array([[4, 0, 2], [1, 3, 4]], np.int32)
    for bits in quant.BITS:
        qsb = quant.quantize(normal(64, 5) / 8.0, bits, 32)

        def rows(ids: np.ndarray, q: np.ndarray, s: np.ndarray, b: np.ndarray,
                 bits: int = bits) -> np.ndarray:
            return quant.dequantize(q, s, b, bits, 32, np.float64)[ids]

        out.append(OpCase(f"quantized_take {bits}-bit",
                          lambda B, x, i, q, s, b, bits=bits: x * B.quantized_take(q, s, b, i, bits, 32),
                          lambda x, i, q, s, b, rows=rows: x * rows(i, q, s, b),
                          (normal(2, 3, 64), ids, *qsb),
                          composite="quantized_take"))
    return out


def _grad_weights(case: OpCase) -> np.ndarray:
    """Fixed random weights w for the scalar sum(f(x) * w), so every output element matters."""
    out = case.ref(*(a.astype(np.float64) if a.dtype.kind == "f" else a for a in case.inputs))
    return np.random.default_rng(len(case.name)).standard_normal(np.shape(out)).astype(np.float32)


def op_outputs(B: Backend, case: OpCase, w: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Forward output and (if B has autograd) d sum(f(x) * w) / dx for each differentiated input."""
    args = [B.from_numpy(a) for a in case.inputs]
    if not B.supports_grad or not case.diff:  # (a case with nothing to differentiate: forward only)
        y = case.fn(B, *args)
        return B.to_numpy(y), None

    outputs: list[Array] = []

    def objective(params: dict[str, Array]) -> Array:
        full = list(args)
        for i in case.diff:
            full[i] = params[f"x{i}"]
        y = case.fn(B, *full)
        outputs.append(y)  # the forward value, realised in the same graph as the gradient
        return B.sum(y * B.from_numpy(w))

    value, grads = B.value_and_grad(objective)({f"x{i}": args[i] for i in case.diff})
    B.sync(outputs[-1], value, *grads.values())
    return B.to_numpy(outputs[-1]), [B.to_numpy(grads[f"x{i}"]) for i in case.diff]


def fd_grads(case: OpCase, w: np.ndarray, h: float = 1e-6) -> list[np.ndarray]:
    """float64 central finite differences of sum(ref(x) * w) for each differentiated input."""
    base = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in case.inputs]
    w64 = w.astype(np.float64)
    grads = []
    for i in case.diff:
        g = np.zeros_like(base[i])
        for j in np.ndindex(base[i].shape):
            vals = []
            for sign in (1.0, -1.0):
                args = list(base)
                args[i] = base[i].copy()
                args[i][j] += sign * h
                vals.append(float(np.sum(case.ref(*args) * w64)))
            g[j] = (vals[0] - vals[1]) / (2 * h)
        grads.append(g)
    return grads


def _float_dtype(B: Backend) -> np.dtype:
    """The dtype B hands back for float32 input (float64 for the numpy reference backend)."""
    return np.dtype(getattr(B, "dtype", np.float32))


def check_op(B: Backend, case: OpCase, *, reference: Backend | None = None, group: str | None = None,
             fwd_tol: Tolerance = FORWARD_TOL, grad_tol: Tolerance = GRAD_TOL) -> list[Check]:
    """Forward and gradient of `case` on B against float64 numpy (or against `reference`, another
    backend running the same case), with separate tolerances; shapes and dtypes exact."""
    group = group or f"{B.name} ops"
    w = _grad_weights(case)
    y, grads = op_outputs(B, case, w)
    if reference is None:
        want_y = case.ref(*(a.astype(np.float64) if a.dtype.kind == "f" else a for a in case.inputs))
        want_grads = fd_grads(case, w) if grads is not None else None
    else:
        want_y, want_grads = op_outputs(reference, case, w)
    dtype = _float_dtype(B)
    checks = [compare(group, f"{case.name} forward", y, want_y, fwd_tol, dtype=dtype)]
    for i, g, want in zip(case.diff, grads or [], want_grads or [], strict=False):
        checks.append(compare(group, f"{case.name} grad x{i}", g, want, grad_tol, dtype=dtype))
    return checks


class _ReferenceComposites:
    """Mixin restoring the base-class reference bodies of every composite."""

    locals().update({name: getattr(Backend, name) for name in COMPOSITES})


def with_mixin(B: Backend, mixin: type, tag: str, *, fused: bool = False) -> Backend:
    """A copy of B whose class is a subclass of B's with `mixin`'s methods taking precedence. By default the
    copy runs the composites' reference bodies (`fused = False`), so a piece the mixin replaces (a
    negative control's erf, silu, ...) is used everywhere, never bypassed by one of B's fused kernels."""
    clone = copy.copy(B)
    clone.__class__ = type(f"{type(B).__name__}{tag}", (mixin, type(B)), {})
    clone.fused = fused
    return clone


def overridden_composites(B: Backend) -> list[str]:
    return [name for name in COMPOSITES if getattr(type(B), name) is not getattr(Backend, name)]


def override_checks(B: Backend, seed: int = 0, group: str | None = None) -> list[Check]:
    """Each composite B overrides (e.g. MLX's fused kernels) against the reference body in
    core/backend.py run on B's own primitives."""
    names = overridden_composites(B)
    reference = with_mixin(B, _ReferenceComposites, "Reference")
    checks: list[Check] = []
    for case in op_cases(seed):
        if case.composite in names:
            checks += check_op(B, case, reference=reference, group=group or f"{B.name} fused vs reference")
    return checks


def primitive_checks(B: Backend, seed: int = 0, group: str | None = None) -> list[Check]:
    return [c for case in op_cases(seed) for c in check_op(B, case, group=group)]
