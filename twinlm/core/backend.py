"""The Backend protocol: ~20 primitives each adapter supplies, and the composites built from them.

The composites below are the single source of truth for the maths. An adapter may override one
with a fused kernel; the parity suite checks every override against the reference body here.

Pinned conventions (the frameworks' native defaults disagree on most of these):
- GELU is the exact form 0.5 * x * (1 + erf(x / sqrt(2))), with erf computed by the rational
  approximation below on every backend (max abs error vs true erf < 1e-6 in float32). Its
  gradient is the analytic Phi(x) + x * phi(x) (via `custom_grad`) on every backend, not autodiff
  through the polynomial: fewer operations, and (with MLX's custom VJP) only x is kept for the backward.
- LayerNorm uses the biased variance and eps = 1e-5 unless the model config says otherwise (BERT: 1e-12).
- RMSNorm is x / sqrt(mean(x^2) + eps) * weight, eps = 1e-5 by default (MLX's and SmolLM/TinyLlama's;
  tinygrad's default is 1e-6, so eps is always passed explicitly).
- GELU-tanh is 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's `gelu_new`.
- SiLU is x * sigmoid(x), sigmoid = 1 / (1 + exp(-x)); SwiGLU(g, u) = silu(g) * u.
- The sigmoid composite (LSTM gates) is computed as 0.5 * (1 + tanh(x / 2)), the same function, whose
  autodiff gradient stays finite for any x (through 1 / (1 + exp(-x)) it is 0 * inf = NaN below x ~ -88).
- RoPE rotates the two halves of each head (x[:hs/2], x[hs/2:]) as one complex pair per frequency:
  out = [x1 cos - x2 sin, x2 cos + x1 sin], the "rotate_half" layout of Hugging Face Llama, so HF
  checkpoints load without permuting q/k (Meta's original checkpoints interleave pairs instead).
- Attention masks are boolean, True = may attend; masked scores become -inf before softmax.
- Softmax subtracts the (gradient-stopped) row max for stability.
- Precision (`--dtype`, `core.dtypes`): in a bfloat16/float16 run the composites compute softmax (and
  log-softmax), the norms' statistics and normalisation, and the loss in float32, and return the input's
  dtype (the loss stays float32); RoPE's float32 tables are cast to x's dtype. Everything else (matmuls,
  activations, residual adds) runs in the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Array = Any  # a backend's array type (mx.array, tinygrad.Tensor, np.ndarray)

LAYER_NORM_EPS = 1e-5
RMS_NORM_EPS = 1e-5
GELU_TANH_C = math.sqrt(2.0 / math.pi)

# erf(x) ~= x * P(x^2) / Q(x^2) on [-4, 4] (clamped outside, where erf is +-1 in float32).
# Coefficients from Eigen's generic_fast_erf_float (also XLA's ErfImpl32): only multiply, add
# and one divide, so it vectorises on every backend, unlike MLX's scalar CPU erf.
ERF_CLAMP = 4.0
ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
             -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)
SQRT_HALF = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class Backend:
    """Base class: adapters implement the primitives; composites have reference bodies here."""

    name: str = "base"
    supports_float64: bool = False
    supports_grad: bool = True
    # False: every composite runs its reference body here, never an adapter's fused kernel (the parity
    # suite's negative controls switch it off, so the pieces they replace are the ones that run).
    fused: bool = True
    # Gradient checkpointing: `can_remat` says the framework can recompute a function's activations in the
    # backward pass (`checkpoint`); the trainer turns `remat` on for `train --grad-checkpoint`.
    can_remat: bool = False
    remat: bool = False
    # False: the composites keep a low-precision input's softmax, norm statistics and loss in its own dtype
    # instead of float32 (only the parity suite's negative control turns it off).
    stats_float32: bool = True

    def device_info(self) -> dict[str, Any]:
        """Where this backend computes: {"device", "name", "memory_bytes", "float64", "tf32"} (None where
        unknown); adapters say more (`twinlm.backends.device.describe`)."""
        return {"device": "cpu", "name": None, "memory_bytes": None, "float64": self.supports_float64,
                "tf32": False}

    # ---- primitives -------------------------------------------------------------------------
    def from_numpy(self, a: np.ndarray) -> Array:
        raise NotImplementedError

    def to_numpy(self, x: Array) -> np.ndarray:
        raise NotImplementedError

    def exp(self, x: Array) -> Array:
        raise NotImplementedError

    def log(self, x: Array) -> Array:
        raise NotImplementedError

    def tanh(self, x: Array) -> Array:
        raise NotImplementedError

    def sqrt(self, x: Array) -> Array:
        raise NotImplementedError

    def rsqrt(self, x: Array) -> Array:
        raise NotImplementedError

    def maximum(self, a: Array, b: Array | float) -> Array:
        raise NotImplementedError

    def minimum(self, a: Array, b: Array | float) -> Array:
        raise NotImplementedError

    def sum(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        raise NotImplementedError

    def max(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        raise NotImplementedError

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        raise NotImplementedError

    def reshape(self, x: Array, shape: Sequence[int]) -> Array:
        raise NotImplementedError

    def transpose(self, x: Array, axes: Sequence[int]) -> Array:
        raise NotImplementedError

    def where(self, cond: Array, a: Array | float, b: Array | float) -> Array:
        raise NotImplementedError

    def take(self, table: Array, ids: Array) -> Array:
        """Rows of `table` (V, C) at integer `ids` (...,) -> (..., C)."""
        raise NotImplementedError

    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        raise NotImplementedError

    def concat(self, xs: Sequence[Array], axis: int) -> Array:
        raise NotImplementedError

    def stop_gradient(self, x: Array) -> Array:
        raise NotImplementedError

    def isfinite(self, x: Array) -> Array:
        raise NotImplementedError

    def dequantize(self, qweight: Array, scales: Array, biases: Array, bits: int, group_size: int) -> Array:
        """A quantized weight (`core.quant`'s format: uint32 words (n_out, n_in * bits / 32), float32 scales
        and biases (n_out, n_in / group_size)) as float32 (n_out, n_in): q * scale + bias per group."""
        raise NotImplementedError

    def to_host(self, x: Array) -> np.ndarray:
        """`x` on the host in its own dtype for storage: float32, float16, or bfloat16 as tagged bits
        (`core.dtypes.BF16`); `to_numpy` gives a bfloat16 array's values in float32 instead."""
        return self.to_numpy(x)

    def astype(self, x: Array, dtype: str) -> Array:
        """`x` (a float array) in dtype `dtype`: "float32", "bfloat16" or "float16" (`core.dtypes`)."""
        raise NotImplementedError

    def dtype_name(self, x: Array) -> str:
        """The `core.dtypes` name of float array `x`'s dtype ("float32" for any other float dtype)."""
        return "float32"

    def _float32(self, x: Array) -> tuple[Array, str]:
        """(x in float32 where it is in a low dtype and `stats_float32` is on, x's own dtype name)."""
        dt = self.dtype_name(x)
        return (self.astype(x, "float32") if dt != "float32" and self.stats_float32 else x), dt

    def like(self, a: Array, x: Array) -> Array:
        """Float array `a` in `x`'s dtype (a float32 table or mask added to a bfloat16 x would promote it)."""
        dt = self.dtype_name(x)
        return a if self.dtype_name(a) == dt else self.astype(a, dt)

    def _back(self, y: Array, dt: str) -> Array:
        """A composite's float32 result `y` returned in its input's dtype `dt`."""
        return y if dt == "float32" or self.dtype_name(y) == dt else self.astype(y, dt)

    def from_numpy_rows(self, a: np.ndarray, axis: int = 0) -> Array:
        """A batch array whose rows (along `axis`) an adapter with several devices splits across them;
        elsewhere `from_numpy`."""
        return self.from_numpy(a)

    # ---- data parallel (one process per rank) ------------------------------------------------
    def world(self) -> tuple[int, int]:
        """(rank, number of ranks) of this process's data-parallel group; (0, 1) alone."""
        return 0, 1

    def all_sum(self, x: Array) -> Array:
        """`x` summed over every rank of the group (inside a compiled step); alone, `x` itself."""
        return x

    # ---- autograd, compile, sync ------------------------------------------------------------
    def value_and_grad(self, fn: Callable[..., Array]) -> Callable[..., tuple[Array, dict[str, Array]]]:
        """`fn(params: dict, *args) -> scalar` becomes `(params, *args) -> (value, grads dict)`."""
        raise NotImplementedError(f"backend {self.name!r} has no autograd")

    def custom_grad(self, f: Callable[[Array], Array], df: Callable[[Array], Array], x: Array) -> Array:
        """`f(x)` for an elementwise `f` whose derivative is `df(x)`, instead of autodiff through f.
        Reference body: value f(x) + 0, gradient df(x), on any backend with stop_gradient; adapters
        may override it with their custom-VJP mechanism (which also keeps only x for the backward)."""
        sx = self.stop_gradient(x)
        return f(sx) + (x - sx) * df(sx)

    def compile_step(self, fn: Callable[..., tuple[tuple[Array, ...], dict[str, Array]]],
                     state: dict[str, Array]) -> Step:
        """Compile `fn(state, *inputs) -> (outputs, new_state)` into a stateful step."""
        return Step(fn, state, self)

    def sync(self, *xs: Any) -> None:
        """Force evaluation of lazy arrays (a no-op for eager backends)."""

    def drop_cached_buffers(self) -> None:
        """Hand the freed buffers the framework keeps for reuse back to the allocator (a no-op where it keeps
        none). For loops whose arrays grow by a little every step (a KV cache growing by one token), whose
        freed buffers no later request fits, so a cache of them only grows."""

    # ---- composites (reference bodies) --------------------------------------------------------
    def erf(self, x: Array) -> Array:
        x = self.minimum(self.maximum(x, -ERF_CLAMP), ERF_CLAMP)
        x2 = x * x
        p = x2 * ERF_ALPHA[0] + ERF_ALPHA[1]
        for c in ERF_ALPHA[2:]:
            p = p * x2 + c
        q = x2 * ERF_BETA[0] + ERF_BETA[1]
        for c in ERF_BETA[2:]:
            q = q * x2 + c
        return x * p / q

    def gelu(self, x: Array) -> Array:
        return self.custom_grad(self._gelu_value, self._gelu_grad, x)

    def _gelu_value(self, x: Array) -> Array:
        return 0.5 * x * (1.0 + self.erf(x * SQRT_HALF))

    def _gelu_grad(self, x: Array) -> Array:
        """d/dx [x Phi(x)] = Phi(x) + x phi(x), Phi from the forward's erf. (The exact derivative of the
        rational erf avoids exp but, split into several fused kernels, kept ~8 more activation-sized
        arrays alive at the backward's peak on MLX: +14% peak memory, medium preset at batch 8.)"""
        return 0.5 * (1.0 + self.erf(x * SQRT_HALF)) + x * (self.exp(-0.5 * (x * x)) * INV_SQRT_2PI)

    def gelu_tanh(self, x: Array) -> Array:
        return 0.5 * x * (1.0 + self.tanh(GELU_TANH_C * (x + 0.044715 * (x * x * x))))

    def sigmoid(self, x: Array) -> Array:
        return 0.5 * (1.0 + self.tanh(0.5 * x))

    def silu(self, x: Array) -> Array:
        return x / (1.0 + self.exp(-x))

    def linear(self, x: Array, weight: Array, bias: Array | None) -> Array:
        """A linear layer's x @ weight (+ bias): x (..., n_in), weight (n_in, n_out), bias (n_out,)."""
        y = x @ weight
        return y if bias is None else y + bias

    def matmul_t(self, x: Array, weight: Array) -> Array:
        """x @ weight.T for a weight stored (n_out, n_in), as the tied head reads the token embedding
        (`h @ wte.T`): x (..., n_in) -> (..., n_out). An adapter may read the weight's rows in place."""
        return x @ self.transpose(weight, (1, 0))

    def quantized_linear(self, x: Array, qweight: Array, scales: Array, biases: Array, bias: Array | None,
                         bits: int, group_size: int) -> Array:
        """A quantized linear layer (`core.quant`): x (..., n_in) @ dequantize(...).T (+ bias). Its weights
        are frozen: an adapter's fused kernel may give the gradient with respect to x only."""
        # Gradient-stopped: a recomputing checkpoint (`remat`) would otherwise ask for their gradients too.
        qweight, scales, biases = (self.stop_gradient(t) for t in (qweight, scales, biases))
        wt = self.dequantize(qweight, scales, biases, bits, group_size)  # (n_out, n_in), float32
        # computed in x's dtype, as a float weight of the model's dtype would be
        return self.linear(x, self.transpose(self.like(wt, x), (1, 0)), bias)

    def quantized_take(self, qweight: Array, scales: Array, biases: Array, ids: Array, bits: int,
                       group_size: int) -> Array:
        """Rows of a quantized table (`core.quant`: qweight (V, C * bits / 32), scales and biases (V, C /
        group_size)) at integer `ids` (...,) -> float32 (..., C): each tensor's rows taken, then only those
        dequantized (a quantized embedding; its table is frozen, so no gradient flows into it)."""
        shape = tuple(ids.shape)
        flat = self.reshape(ids, (math.prod(shape),))  # (dequantize reads 2-D words)
        q, s, b = (self.take(self.stop_gradient(t), flat) for t in (qweight, scales, biases))
        rows = self.dequantize(q, s, b, bits, group_size)  # (n, C)
        return self.reshape(rows, (*shape, rows.shape[-1]))

    def checkpoint(self, fn: Callable[[dict[str, Array], Array], Array], params: dict[str, Array],
                   x: Array) -> Array:
        """fn(params, x), a model block; with `remat` on, an adapter keeps only its inputs for the backward
        pass and recomputes the rest there (memory for compute). The value is the same either way."""
        return fn(params, x)

    def lora(self, x: Array, a: Array, b: Array, scale: float) -> Array:
        """A low-rank adapter's output (x @ a) @ b * scale: x (..., n_in), a (n_in, r), b (r, n_out)."""
        return ((x @ a) @ b) * scale

    def swiglu(self, gate: Array, up: Array) -> Array:
        return self.silu(gate) * up

    def rope(self, x: Array, cos: Array, sin: Array) -> Array:
        """Rotary embedding of x (N, H, T, hs) with cos/sin tables (T, hs/2), half-split layout."""
        half = x.shape[-1] // 2
        dt = self.dtype_name(x)
        if dt != "float32":  # the tables are float32: they would promote x
            cos, sin = self._back(cos, dt), self._back(sin, dt)
        x1, x2 = x[..., :half], x[..., half:]
        return self.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def softmax(self, x: Array, axis: int = -1) -> Array:
        x, dt = self._float32(x)
        e = self.exp(x - self.stop_gradient(self.max(x, axis=axis, keepdims=True)))
        return self._back(e / self.sum(e, axis=axis, keepdims=True), dt)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        x, dt = self._float32(x)
        shifted = x - self.stop_gradient(self.max(x, axis=axis, keepdims=True))
        return self._back(shifted - self.log(self.sum(self.exp(shifted), axis=axis, keepdims=True)), dt)

    def layer_norm(self, x: Array, weight: Array, bias: Array | None, eps: float = LAYER_NORM_EPS) -> Array:
        x, dt = self._float32(x)
        mu = self.mean(x, axis=-1, keepdims=True)
        xc = x - mu
        var = self.mean(xc * xc, axis=-1, keepdims=True)
        y = self._back(xc * self.rsqrt(var + eps), dt) * weight
        return y if bias is None else y + bias

    def add_layer_norm(self, x: Array, y: Array, weight: Array, bias: Array | None,
                       eps: float = LAYER_NORM_EPS) -> tuple[Array, Array]:
        """A pre-norm block's residual add and the next norm: (s, layer_norm(s)) with s = x + y, x and y
        of one shape. Both are returned: s carries on as the residual stream, the normed value feeds the
        next sub-layer (an adapter may fuse the pair into one pass, forward and backward)."""
        s = x + y
        return s, self.layer_norm(s, weight, bias, eps)

    def add_rms_norm(self, x: Array, y: Array, weight: Array,
                     eps: float = RMS_NORM_EPS) -> tuple[Array, Array]:
        """(s, rms_norm(s)) with s = x + y: `add_layer_norm` for RMSNorm models."""
        s = x + y
        return s, self.rms_norm(s, weight, eps)

    def split_heads(self, qkv: Array, n_head: int, n_kv_head: int,
                    head_dim: int) -> tuple[Array, Array, Array]:
        """A fused projection's output (N, T, (H + 2 Hkv) hs) as q (N, H, T, hs) and k, v (N, Hkv, T, hs),
        each head's hs columns in order (an adapter may return views of qkv and gather the three gradients
        into one in a single pass, instead of three zero-filled slice updates and their sum)."""
        n, t, _ = qkv.shape
        a, b = n_head * head_dim, (n_head + n_kv_head) * head_dim

        def heads(z: Array, h: int) -> Array:
            return self.transpose(self.reshape(z, (n, t, h, head_dim)), (0, 2, 1, 3))  # (N, h, T, hs)

        return heads(qkv[..., :a], n_head), heads(qkv[..., a:b], n_kv_head), heads(qkv[..., b:], n_kv_head)

    def repeat_kv(self, x: Array, n_rep: int) -> Array:
        """Grouped-query attention: (N, Hkv, T, hs) -> (N, Hkv * n_rep, T, hs), where query head h
        reads key/value head h // n_rep (Hugging Face's `repeat_kv`)."""
        if n_rep == 1:
            return x
        b, h, t, hs = x.shape
        x = self.reshape(x, (b, h, 1, t, hs))
        return self.reshape(self.concat([x] * n_rep, axis=2), (b, h * n_rep, t, hs))

    def grouped_attention(self, q: Array, k: Array, v: Array, mask: Array | None,
                          dropout: Array | None = None, softcap: float = 0.0) -> Array:
        """`attention` with k and v of Hkv heads for q's H = Hkv * n_rep (grouped-query attention; query
        head h reads kv head h // n_rep, as `repeat_kv` maps them), without repeating k and v: the n_rep
        query heads of a kv head are folded into its query axis, q (N, H, Tq, hs) -> (N, Hkv, n_rep * Tq,
        hs) (a reshape: head h = g * n_rep + r goes to group g, row r * Tq + t), the mask tiled to match.
        The same products and sums as attention over repeated k and v, but a decoding step no longer copies
        every layer's KV cache n_rep times (benchmarks/README.md, "Serving"). A per-head mask, or a dropout
        mask of another shape than (N, H, Tq, Tk), takes the repeat_kv path."""
        n, h, tq, hs = q.shape
        hkv = k.shape[1]
        n_rep = h // hkv
        folded = self._folded_mask(mask, n_rep, tq)
        if n_rep == 1 or folded is False or (dropout is not None and tuple(dropout.shape[:3]) != (n, h, tq)):
            return self._attention_repeating_kv(q, k, v, mask, dropout, softcap)
        if dropout is not None:  # (N, H, Tq, Tk) -> (N, Hkv, n_rep * Tq, Tk): the same order as q's rows
            dropout = self.reshape(dropout, (n, hkv, n_rep * tq, dropout.shape[-1]))
        y = self.attention(self.reshape(q, (n, hkv, n_rep * tq, hs)), k, v, folded, dropout, softcap)
        return self.reshape(y, (n, h, tq, v.shape[-1]))

    def _attention_repeating_kv(self, q: Array, k: Array, v: Array, mask: Array | None,
                                dropout: Array | None = None, softcap: float = 0.0) -> Array:
        """`grouped_attention` the plain way: k and v repeated per query head (`repeat_kv`), then
        `attention` (its fallback; a mixin that must see each query head's keys takes it as its own)."""
        n_rep = q.shape[1] // k.shape[1]
        return self.attention(q, self.repeat_kv(k, n_rep), self.repeat_kv(v, n_rep), mask, dropout, softcap)

    def _folded_mask(self, mask: Array | None, n_rep: int, tq: int) -> Array | None | bool:
        """`mask` (broadcastable to (N, H, Tq, Tk)) for the folded query axis of `grouped_attention`: as it is
        when every query shares one row, else tiled n_rep times along the query axis; False for a per-head
        mask (no fold)."""
        if mask is None:
            return None
        shape = (1,) * (4 - len(mask.shape)) + tuple(mask.shape)
        if shape[1] != 1:
            return False
        if shape[2] == 1:
            return mask
        m = self.reshape(mask, shape)
        return self.concat([m] * n_rep, axis=2)  # row r * Tq + t reads query t's row

    def rms_norm(self, x: Array, weight: Array, eps: float = RMS_NORM_EPS) -> Array:
        x, dt = self._float32(x)
        return self._back(x * self.rsqrt(self.mean(x * x, axis=-1, keepdims=True) + eps), dt) * weight

    def attention(self, q: Array, k: Array, v: Array, mask: Array | None,
                  dropout: Array | None = None, softcap: float = 0.0) -> Array:
        """softmax(q k^T / sqrt(d_k)) v over (N, H, T, hs); `mask` boolean, True = attend, broadcastable
        to (N, H, Tq, Tk): (Tq, Tk) for causal, (N, 1, Tq, Tk) with padding (every row must keep a key);
        `dropout` an optional keep-mask already scaled by 1/(1-p), shape (N, H, Tq, Tk); `softcap` > 0
        bounds the scaled scores to (-softcap, softcap) by softcap * tanh(s / softcap) before the mask
        (Gemma 2)."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = (q @ self.transpose(k, (0, 1, 3, 2))) * scale  # (N, H, Tq, Tk)
        if softcap:
            scores = self.tanh(scores * (1.0 / softcap)) * softcap
        if mask is not None:
            scores = self.where(mask, scores, -math.inf)
        att = self.softmax(scores, axis=-1)
        if dropout is not None:
            att = att * dropout
        return att @ v  # (N, H, Tq, hs)

    def cross_entropy(self, logits: Array, targets: Array, weights: Array | None = None) -> Array:
        """Mean negative log-likelihood of integer `targets` under `logits` (..., V); with `weights`
        (same shape as targets, 0/1) the mean is over positions with weight 1. Computed (and returned)
        in float32 whatever the logits' dtype."""
        logits, _ = self._float32(logits)
        logp = self.log_softmax(logits, axis=-1)
        nll = -self.take_along_axis(logp, self.reshape(targets, (*targets.shape, 1)), axis=-1)
        nll = self.reshape(nll, targets.shape)
        if weights is None:
            return self.mean(nll)
        return self.sum(nll * weights) / self.maximum(self.sum(weights), 1.0)

    def sum_squares(self, xs: Sequence[Array]) -> Array:
        """The sum over tensors `xs` (at least one) of sum(x * x), one sum per tensor, added in list order:
        the square of the global gradient norm."""
        total = None
        for x in xs:
            s = self.sum(x * x)
            total = s if total is None else total + s
        if total is None:
            raise ValueError("sum_squares needs at least one tensor")
        return total

    def adamw(self, params: Sequence[Array], grads: Sequence[Array], m: Sequence[Array],
              v: Sequence[Array], *, lr: Array | float, bc1: Array | float, bc2: Array | float, beta1: float,
              beta2: float, eps: float, decay: Sequence[float], scale: Array | None = None,
              keep: Array | None = None) -> tuple[list[Array], list[Array], list[Array]]:
        """One AdamW update of every tensor (the maths: `core.optim`'s docstring); returns the new (params,
        m, v) lists. `decay[i]` is tensor i's weight decay (0: none). Each gradient is multiplied by `scale`
        first where given (the global-norm clip); where `keep` (a 0-d bool) is given and False, every tensor
        keeps its old p, m and v (a step with non-finite gradients)."""
        ps, ms, vs = [], [], []
        for p, g, m0, v0, wd in zip(params, grads, m, v, decay, strict=True):
            if scale is not None:
                g = g * scale
            m1 = beta1 * m0 + (1.0 - beta1) * g
            v1 = beta2 * v0 + (1.0 - beta2) * (g * g)
            update = (m1 / bc1) / (self.sqrt(v1 / bc2) + eps)
            p1 = p * (1.0 - lr * wd) if wd else p
            p1 = p1 - lr * update
            if keep is not None:
                p1, m1, v1 = self.where(keep, p1, p), self.where(keep, m1, m0), self.where(keep, v1, v0)
            ps.append(p1)
            ms.append(m1)
            vs.append(v1)
        return ps, ms, vs


class Step:
    """An uncompiled stateful step; adapters return a compiled equivalent."""

    def __init__(self, fn: Callable, state: dict[str, Array], backend: Backend) -> None:
        self.fn, self.state, self.backend = fn, dict(state), backend

    def __call__(self, *inputs: Array) -> tuple[Array, ...]:
        outputs, self.state = self.fn(self.state, *inputs)
        self.backend.sync(*outputs, *self.state.values())
        return outputs
