"""MLX adapter. The process-wide set-up MLX needs before it is imported (the system OpenBLAS, malloc
settings) is `twinlm.backends.mlx_native`'s. On the CPU it serves the linear layer, the embedding, GELU,
GELU-tanh, SwiGLU, RoPE, LayerNorm, RMSNorm, attention (and its head split) and cross-entropy with twinlm's
compiled kernels (`twinlm.backends.kernels`) when they are built; TWINLM_KERNELS=0 turns them off."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

# mlx_native must run before mlx.core is imported (see its docstring): keep this order.
# isort: off
from twinlm.backends import kernels as _kernels
from twinlm.backends.mlx_native import BLAS, MALLOC
from twinlm.core import dtypes as D
from twinlm.core import tensorfile
from twinlm.core.backend import Array, Backend, Step

import mlx.core as mx
# isort: on

_DTYPES = {np.dtype(np.float32): mx.float32, np.dtype(np.float64): mx.float64,
           np.dtype(np.int32): mx.int32, np.dtype(np.int64): mx.int64, np.dtype(np.bool_): mx.bool_,
           np.dtype(np.float16): mx.float16, np.dtype(np.uint32): mx.uint32, np.dtype(np.uint16): mx.uint16}
_FLOATS = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_NAMES = {v: k for k, v in _FLOATS.items()}


_LOW = (mx.bfloat16, mx.float16)


def _float32_kernel(back: bool = True) -> Callable[[Callable], Callable]:
    """A composite whose kernel serves float32 only, given bfloat16/float16 inputs on the CPU with kernels on:
    its float inputs widened to float32, the kernel run, the result rounded back to the input's dtype once
    (`back`; the loss stays float32). MLX's own CPU ops in these dtypes are scalar-speed on x86 (measured at
    the SmolLM2-135M shape, 256 rows: attention 17x, SwiGLU 56x, RMSNorm 5x float32's time), and the
    activations are small beside the weights; statistics stay float32, as the reference bodies keep them."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self: MLXBackend, *args: object, **kw: object) -> object:
            low = next((a.dtype for a in args if isinstance(a, mx.array) and a.dtype in _LOW), None)
            if low is None or self.kernels is None or not self.fused or mx.default_device() != mx.cpu:
                return method(self, *args, **kw)
            wide = [a.astype(mx.float32) if isinstance(a, mx.array) and a.dtype in _LOW else a for a in args]
            out = method(self, *wide, **kw)
            if not back:
                return out
            return tuple(o.astype(low) for o in out) if isinstance(out, tuple) else out.astype(low)
        return run
    return wrap


class MLXBackend(Backend):
    name = "mlx"
    # MLX accepts float64 on the CPU but evaluates exp and friends in float32 precision
    # (measured: exp(1) = 2.71828175), so float64 gradient checks would be meaningless.
    supports_float64 = False
    can_remat = True  # mx.checkpoint

    def __init__(self, fused: bool = True, kernels: bool = True) -> None:
        self.fused = fused
        self.blas = BLAS
        self.malloc = MALLOC
        self.group = _group()
        # twinlm's CPU kernels (None: not built, failed to load, TWINLM_KERNELS=0, or not asked for).
        self.kernels = _kernels.load() if fused and kernels else None
        # The fused attention kernel (short key axes); False keeps BLAS products around the masked-softmax
        # kernel (benchmarks switch it to compare the two in one process).
        self.attention_kernel = True
        # The all-reduce between ranks: "shm" (same host, shared memory) or "ring"; "" with one process.
        self._shm_sum, self.all_reduce = _all_reduce(self.group, self.kernels)
        self.device = "gpu" if mx.default_device() == mx.gpu else "cpu"  # set by --device before this

    def device_info(self) -> dict:
        from twinlm.backends import device

        return device.describe(self.name)

    def _kernel(self, *xs: Array):
        """The kernels module when it can serve these arrays (float32, on the CPU) and fused kernels are on,
        else None."""
        K = self.kernels
        if (K is None or not self.fused or any(x.dtype != mx.float32 for x in xs)
                or mx.default_device() != mx.cpu):
            return None
        return K

    # ---- data parallel: mx.distributed ---------------------------------------------------------
    def world(self) -> tuple[int, int]:
        return (self.group.rank(), self.group.size()) if self.group is not None else (0, 1)

    def all_sum(self, x: Array) -> Array:
        # Inside mx.compile: measured to compile and run as one graph with the collective in it (both kinds).
        if self.group is None:
            return x
        if self._shm_sum is not None and x.dtype == mx.float32:  # what the step sums; the ring takes the rest
            return self._shm_sum(x)
        return mx.distributed.all_sum(x, group=self.group)

    def from_numpy(self, a: np.ndarray) -> Array:
        # C order: MLX keeps a numpy view's strides, and a strided weight is copied by every kernel call that
        # reads it (measured: a transposed quantized weight decoded 13x slower)
        a = np.asarray(a)
        if D.is_bf16(a):  # tagged bfloat16 bits: copied as uint16, then the same buffer read as bfloat16
            return self.from_numpy(a.view(np.uint16)).view(mx.bfloat16)
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would also make a 0-d array 1-d)
            a = np.ascontiguousarray(a)
        if a.nbytes > _CHUNK_BYTES and a.ndim and a.flags.c_contiguous and tensorfile.is_mapped(a):
            return _from_mapped(a)
        # Pass the dtype: MLX would silently turn float64 into float32.
        return mx.array(a, dtype=_DTYPES[a.dtype])

    def to_numpy(self, x: Array) -> np.ndarray:
        if x.dtype == mx.bfloat16:  # numpy has no bfloat16: its values, exactly, in float32
            x = x.astype(mx.float32)
        return np.array(x, copy=True)

    def to_host(self, x: Array) -> np.ndarray:
        if x.dtype == mx.bfloat16:
            return np.array(x.view(mx.uint16), copy=True).view(D.BF16)
        return self.to_numpy(x)

    def astype(self, x: Array, dtype: str) -> Array:
        return x.astype(_FLOATS[dtype])

    def dtype_name(self, x: Array) -> str:
        return _NAMES.get(x.dtype, "float32")

    def exp(self, x: Array) -> Array:
        return mx.exp(x)

    def log(self, x: Array) -> Array:
        return mx.log(x)

    def tanh(self, x: Array) -> Array:
        return mx.tanh(x)

    def sqrt(self, x: Array) -> Array:
        return mx.sqrt(x)

    def rsqrt(self, x: Array) -> Array:
        return mx.rsqrt(x)

    def maximum(self, a: Array, b: Array | float) -> Array:
        return mx.maximum(a, b)

    def minimum(self, a: Array, b: Array | float) -> Array:
        return mx.minimum(a, b)

    def sum(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return mx.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return mx.max(x, axis=axis, keepdims=keepdims)

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return mx.mean(x, axis=axis, keepdims=keepdims)

    def reshape(self, x: Array, shape: Sequence[int]) -> Array:
        return mx.reshape(x, tuple(shape))

    def transpose(self, x: Array, axes: Sequence[int]) -> Array:
        return mx.transpose(x, tuple(axes))

    def where(self, cond: Array, a: Array | float, b: Array | float) -> Array:
        return mx.where(cond, a, b)

    def take(self, table: Array, ids: Array) -> Array:
        # Rows of a (V, C) table: the embedding kernel (its backward a scatter-add split over columns).
        K = self._kernel(table)
        if K is not None and table.ndim == 2 and mx.issubdtype(ids.dtype, mx.integer):
            return K.embedding(table, ids)
        return mx.take(table, ids, axis=0)

    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        return mx.take_along_axis(x, idx, axis=axis)

    def concat(self, xs: Sequence[Array], axis: int) -> Array:
        return mx.concatenate(list(xs), axis=axis)

    def stop_gradient(self, x: Array) -> Array:
        return mx.stop_gradient(x)

    def isfinite(self, x: Array) -> Array:
        return mx.all(mx.isfinite(x))

    def dequantize(self, qweight: Array, scales: Array, biases: Array, bits: int, group_size: int) -> Array:
        return mx.dequantize(qweight, scales, biases, group_size=group_size, bits=bits)

    # ---- fused overrides (checked against the reference bodies by the parity suite) ---------
    def quantized_linear(self, x: Array, qweight: Array, scales: Array, biases: Array, bias: Array | None,
                         bits: int, group_size: int) -> Array:
        if not self.fused:
            return super().quantized_linear(x, qweight, scales, biases, bias, bits, group_size)
        # twinlm's CPU kernel where it is built (float32 on the CPU), else MLX's own (scalar on x86); both
        # read the format unchanged and give the gradient with respect to x (a frozen base: QLoRA).
        if x.dtype != mx.float32:  # a bfloat16/float16 model: the float32 kernel, the result in x's dtype
            y = self.quantized_linear(x.astype(mx.float32), qweight, scales, biases, None, bits, group_size)
            return y.astype(x.dtype) if bias is None else (y + bias).astype(x.dtype)
        K = self._kernel(x, scales, biases)
        qmm = getattr(K, "quantized_matmul", None)
        # Frozen: mx.checkpoint (train --grad-checkpoint) asks every input of the block for its gradient,
        # and both quantized matmuls refuse the weights'. Only then: otherwise three idle graph nodes per
        # layer and token (363 of a 4-bit SmolLM2-135M token's).
        if self.remat:
            qweight, scales, biases = (mx.stop_gradient(t) for t in (qweight, scales, biases))
        if qmm is not None:
            y = qmm(x, qweight, scales, biases, group_size, bits)
        else:
            y = mx.quantized_matmul(x, qweight, scales, biases, transpose=True, group_size=group_size,
                                    bits=bits)
        return y if bias is None else y + bias

    @_float32_kernel()
    def gelu(self, x: Array) -> Array:
        K = self._kernel(x)  # the base class's pinned value and derivative, in one kernel
        return super().gelu(x) if K is None else K.gelu(x)

    @_float32_kernel()
    def gelu_tanh(self, x: Array) -> Array:
        K = self._kernel(x)
        return super().gelu_tanh(x) if K is None else K.gelu(x, True)

    @_float32_kernel()
    def lora(self, x: Array, a: Array, b: Array, scale: float) -> Array:
        # bf16: (x @ a) @ b by BLAS in float32 (MLX's own bf16 matmul: 2.5x slower per adapter, 7 per block)
        return super().lora(x, a, b, scale)

    @_float32_kernel()
    def swiglu(self, gate: Array, up: Array) -> Array:
        K = self._kernel(gate, up)
        if K is None or gate.shape != up.shape:
            return super().swiglu(gate, up)
        return K.swiglu(gate, up)

    def checkpoint(self, fn: Callable, params: dict[str, Array], x: Array) -> Array:
        return mx.checkpoint(fn)(params, x) if self.remat else fn(params, x)

    def linear(self, x: Array, weight: Array, bias: Array | None) -> Array:
        if weight.dtype in (mx.bfloat16, mx.float16):
            return self._linear_lowp(x, weight, bias)
        # One BLAS sgemm onto the bias (beta = 1) and its VJP in one primitive; MLX's own matmul passes
        # beta = 0 (BLAS zeroes C first) and adds the bias, and reduces its gradient, as separate ops.
        K = self._kernel(x, weight, *([] if bias is None else [bias]))
        if (K is None or x.ndim < 1 or weight.ndim != 2 or x.shape[-1] != weight.shape[0]
                or (bias is not None and bias.shape != (weight.shape[1],))):
            return super().linear(x, weight, bias)
        if hasattr(K, "linear_lowp") and x.size <= K.LOWP_GEMV_MAX_ROWS * x.shape[-1]:
            # A few rows (decoding): the lowp kernel's GEMV streams the (in, out) weight at the memory's rate;
            # BLAS's sgemv for x @ W read it at 8-12 GB/s where this machine reads ~27 (benchmarks/README.md).
            return K.linear_lowp(x, weight, bias)
        return K.linear(x, weight, bias)

    def _linear_lowp(self, x: Array, weight: Array, bias: Array | None) -> Array:
        """A bfloat16/float16 weight: the kernel converts it in registers with float32 sums (MLX's own CPU
        matmul in these dtypes is 3-10x slower than in float32: measured 1.6 GB/s of weights), else MLX."""
        K = self.kernels if self.fused and mx.default_device() == mx.cpu else None
        if (K is not None and hasattr(K, "linear_lowp") and x.ndim >= 1 and weight.ndim == 2
                and x.shape[-1] == weight.shape[0] and x.dtype in (mx.float32, weight.dtype)
                and (bias is None or (bias.shape == (weight.shape[1],)
                                      and bias.dtype in (x.dtype, weight.dtype)))):
            return K.linear_lowp(x, weight, bias)
        return super().linear(x, weight, bias)

    def matmul_t(self, x: Array, weight: Array) -> Array:
        """x @ weight.T: the kernel reads the weight's rows in place with float32 sums. bf16/f16: MLX's own
        CPU matmul in these dtypes is scalar-speed on x86 (the tied head was 40% of a bf16 decode token, and
        16x float32's time at 256 rows); float32 at a few rows: MLX's BLAS call read the (V, C) head at a
        third of the memory's rate (more rows: the same sgemm either way)."""
        K = self.kernels if self.fused and mx.default_device() == mx.cpu else None
        if (K is not None and hasattr(K, "matmul_t_lowp") and weight.dtype in (*_LOW, mx.float32)
                and x.ndim >= 1 and weight.ndim == 2 and x.shape[-1] == weight.shape[1]
                and x.dtype in (mx.float32, weight.dtype)):
            return K.matmul_t_lowp(x, weight)
        return super().matmul_t(x, weight)

    @_float32_kernel()
    def rope(self, x: Array, cos: Array, sin: Array) -> Array:
        K = self._kernel(x, cos, sin)
        if K is None or cos.ndim != 2 or cos.shape != sin.shape or x.ndim < 2 \
                or cos.shape != (x.shape[-2], x.shape[-1] // 2) or x.shape[-1] % 2:
            return super().rope(x, cos, sin)
        return K.rope(x, cos, sin)

    @_float32_kernel()
    def layer_norm(self, x: Array, weight: Array, bias: Array | None, eps: float = 1e-5) -> Array:
        if not self.fused:
            return super().layer_norm(x, weight, bias, eps)
        K = self._kernel(x, weight, *([] if bias is None else [bias]))
        if K is not None and weight.ndim == 1 and (bias is None or bias.ndim == 1):
            return K.layer_norm(x, weight, bias, eps)
        return mx.fast.layer_norm(x, weight, bias, eps)

    @_float32_kernel()
    def rms_norm(self, x: Array, weight: Array, eps: float = 1e-5) -> Array:
        if not self.fused:
            return super().rms_norm(x, weight, eps)
        K = self._kernel(x, weight)
        if K is not None and weight.ndim == 1:
            return K.rms_norm(x, weight, eps)
        return mx.fast.rms_norm(x, weight, eps)

    def _add_norm_kernel(self, x: Array, y: Array, weight: Array, bias: Array | None):
        """The kernels module when add + norm can run fused (same shapes, float32, (C,) gains)."""
        K = self._kernel(x, y, weight, *([] if bias is None else [bias]))
        C = x.shape[-1] if x.ndim else -1
        if (K is None or not hasattr(K, "add_layer_norm") or x.shape != y.shape or weight.shape != (C,)
                or (bias is not None and bias.shape != (C,))):
            return None
        return K

    @_float32_kernel()
    def add_layer_norm(self, x: Array, y: Array, weight: Array, bias: Array | None,
                       eps: float = 1e-5) -> tuple[Array, Array]:
        # One pass writes the sum and its norm; the backward adds the residual's gradient in the same pass.
        K = self._add_norm_kernel(x, y, weight, bias)
        if K is None:
            return super().add_layer_norm(x, y, weight, bias, eps)
        return K.add_layer_norm(x, y, weight, bias, eps)

    @_float32_kernel()
    def add_rms_norm(self, x: Array, y: Array, weight: Array, eps: float = 1e-5) -> tuple[Array, Array]:
        K = self._add_norm_kernel(x, y, weight, None)
        if K is None:
            return super().add_rms_norm(x, y, weight, eps)
        return K.add_rms_norm(x, y, weight, eps)

    def split_heads(self, qkv: Array, n_head: int, n_kv_head: int,
                    head_dim: int) -> tuple[Array, Array, Array]:
        # Views of qkv, and one gather for the gradient: MLX's slices would each add a zero-filled slice
        # update of qkv's whole size to the backward, and two adds of them (a quarter of an attention layer's
        # time at the baby shape). Only with the fused attention kernel, which reads such views in place.
        K = self._kernel(qkv)
        if (K is None or not self.attention_kernel or not hasattr(K, "split_heads") or qkv.ndim != 3
                or qkv.shape[-1] != (n_head + 2 * n_kv_head) * head_dim):
            return super().split_heads(qkv, n_head, n_kv_head, head_dim)
        q, k, v = K.split_heads(qkv, n_head, n_kv_head, head_dim)
        return q, k, v

    @_float32_kernel()
    def attention(self, q: Array, k: Array, v: Array, mask: Array | None,
                  dropout: Array | None = None, softcap: float = 0.0) -> Array:
        if softcap:  # neither fused path soft-caps the scores
            return super().attention(q, k, v, mask, dropout, softcap)
        scale = 1.0 / math.sqrt(q.shape[-1])
        K = self._kernel(q, k, v)
        if (K is not None and self.attention_kernel and dropout is None and hasattr(K, "attention")
                and (mask is None or mask.dtype == mx.bool_) and q.ndim == 4 and k.shape == v.shape
                and k.ndim == 4 and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1]
                and 0 < k.shape[2] <= K.ATTENTION_MAX_KEYS):
            # One primitive per call: each (batch, head)'s scores, softmax and product with v in cache;
            # q, k, v read where the head split's views put them, the result laid out so that the merge
            # is a view.
            return K.attention(q, k, v, mask, scale)
        if K is not None and (mask is None or mask.dtype == mx.bool_):
            # BLAS matmuls around one fused masked, scaled softmax (forward and backward kernels; the
            # probabilities are kept once, for the backward). Rows with no key left give zeros.
            att = K.masked_softmax(q @ mx.swapaxes(k, -1, -2), mask, scale)  # (N, H, Tq, Tk)
            if dropout is not None:
                att = att * dropout
            return att @ v
        if not self.fused or dropout is not None:  # the fused kernel has no dropout input
            return super().attention(q, k, v, mask, dropout)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    @_float32_kernel(back=False)
    def cross_entropy(self, logits: Array, targets: Array, weights: Array | None = None) -> Array:
        K = self._kernel(logits)
        if K is None:
            return super().cross_entropy(logits, targets, weights)
        nll = K.cross_entropy_rows(mx.reshape(logits, (-1, logits.shape[-1])), mx.reshape(targets, (-1,)))
        nll = mx.reshape(nll, targets.shape)
        if weights is None:
            return mx.mean(nll)
        return mx.sum(nll * weights) / mx.maximum(mx.sum(weights), 1.0)

    def sum_squares(self, xs: Sequence[Array]) -> Array:
        K = self._kernel(*xs)
        if K is None or not xs:
            return super().sum_squares(xs)
        return K.sum_squares(list(xs))

    def adamw(self, params: Sequence[Array], grads: Sequence[Array], m: Sequence[Array],
              v: Sequence[Array], *, lr: Array | float, bc1: Array | float, bc2: Array | float, beta1: float,
              beta2: float, eps: float, decay: Sequence[float], scale: Array | None = None,
              keep: Array | None = None) -> tuple[list[Array], list[Array], list[Array]]:
        # One primitive over every tensor: MLX's compiled elementwise code for the same update ran ~15 ops
        # per tensor in scalar code (baby: 7.5 ms CPU of a ~60 ms step; PyTorch's clip + AdamW: 3.4 ms).
        K = self._kernel(*params, *grads, *m, *v)
        if K is None or not params:
            return super().adamw(params, grads, m, v, lr=lr, bc1=bc1, bc2=bc2, beta1=beta1, beta2=beta2,
                                 eps=eps, decay=decay, scale=scale, keep=keep)

        def f32(x: Array | float | None, default: float) -> Array:
            x = default if x is None else x
            return x.astype(mx.float32) if isinstance(x, mx.array) else mx.array(x, dtype=mx.float32)

        keep = mx.array(True) if keep is None else keep.astype(mx.bool_)
        out = K.adamw(list(params), list(grads), list(m), list(v), f32(lr, 0.0), f32(bc1, 1.0),
                      f32(bc2, 1.0), f32(scale, 1.0), keep, float(beta1), float(beta2), float(eps),
                      [float(d) for d in decay])
        n = len(params)
        return out[:n], out[n:2 * n], out[2 * n:]

    # ---- autograd, compile, sync ------------------------------------------------------------
    def value_and_grad(self, fn: Callable[..., Array]) -> Callable[..., tuple[Array, dict[str, Array]]]:
        return mx.value_and_grad(fn)

    def custom_grad(self, f: Callable[[Array], Array], df: Callable[[Array], Array], x: Array) -> Array:
        if not self.fused:
            return super().custom_grad(f, df, x)
        # A custom VJP keeps only x for the backward, not f's intermediates (GB at the medium preset).
        # `depends` holds df back until its cotangent exists; otherwise df(x), which needs only x,
        # may be evaluated early and held for every layer at once (measured: 2x peak memory).
        fn = mx.custom_function(f)
        fn.vjp(lambda primal, cotangent, output: cotangent * df(mx.depends(primal, cotangent)))
        return fn(x)

    def compile_step(self, fn: Callable, state: dict[str, Array]) -> Step:
        if self.remat:  # train --grad-checkpoint: memory for compute, the evaluation bounded too
            return _BoundedStep(mx.compile(fn), state, self)
        return Step(mx.compile(fn), state, self)

    def sync(self, *xs: object) -> None:
        mx.eval(*xs)

    def drop_cached_buffers(self) -> None:
        # To malloc, whose free lists serve the next step's arrays of any size (MLX's cache reuses a buffer
        # only for a request of about its size): 32 MB held after 64 tokens of SmolLM2-135M, ~0 with this.
        mx.clear_cache()


_CHUNK_BYTES = 4 * 2**20  # rows copied from a mapped file at a time (`_from_mapped`)

# Transient memory a step under `remat` may hold beyond what is alive when it starts (see _BoundedStep).
REMAT_TRANSIENT_BYTES = 1 << 30


class _BoundedStep(Step):
    """A step whose evaluation holds at most ~REMAT_TRANSIENT_BYTES beyond the memory alive when it starts
    (the state, mostly). MLX's CPU evaluation allocates each op's output when it queues the op and frees its
    inputs when the op has run, and it queues far ahead of the worker: on the Llama-3.2-1B QLoRA step one
    block's forward alone held 404 MiB at once (its ops' outputs side by side) where 208 MiB suffice, and the
    step 1,762 MiB above its state where 1,098 MiB suffice (2 layers of that shape, `benchmarks/README.md`).
    Above MLX's memory limit it waits for queued ops before queuing more; so during the step the limit is
    the memory alive at its start plus the budget, and the process's limit again after it. Scheduling only:
    the same ops on the same inputs, bit-identical results. Each op queued while over the limit waits for
    the ones before it (measured: every op waiting, a budget of 0, made that step 1.4-2x slower on a shared
    machine); only the stretch around the 1B step's LM head (its logits and their gradient, 2 x 501 MiB) comes
    near 1 GiB, and that bound held the proxy step at 1,230 MiB above its state, with no measurable extra time
    (one sample), and the whole 1B step's peak RSS at 2,662 MiB (2,985 unbounded)."""

    def __call__(self, *inputs: Array) -> tuple[Array, ...]:
        previous = mx.set_memory_limit(mx.get_active_memory() + REMAT_TRANSIENT_BYTES)
        try:
            return super().__call__(*inputs)
        finally:
            mx.set_memory_limit(previous)


def _from_mapped(a: np.ndarray) -> Array:
    """A large array read from a memory-mapped file, copied in chunks of rows straight into the buffer of one
    MLX array (a writable numpy view of it: no MLX temporaries), each chunk's mapped pages released once
    copied. Whole, the mapped pages of the tensor being copied would sit beside its copy (on a Llama 3.2 1B's
    tied 128,256 x 2,048 embedding, 1 GB more at the peak of loading); through per-chunk `mx.array`s and
    slice updates, two chunks more, whose freed buffers stayed resident (malloc is untrimmed:
    `mlx_native.keep_freed_memory`)."""
    out = mx.zeros(a.shape, dtype=_DTYPES[a.dtype])
    mx.eval(out)  # its own contiguous buffer, written below before anything reads it
    dst = np.array(out, copy=False)
    rows = max(1, _CHUNK_BYTES // max(1, a[0].nbytes))
    for i in range(0, a.shape[0], rows):
        dst[i:i + rows] = a[i:i + rows]
        tensorfile.release(a[i:i + rows])
    del dst
    return out


def _group() -> mx.distributed.Group | None:
    """The data-parallel group when this process was started as a rank (by `twinlm train --ranks N` or
    `mlx.launch`, which set MLX_RANK), else None. The ring backend unless MLX_DISTRIBUTED_BACKEND says."""
    if "MLX_RANK" not in os.environ:
        return None
    backend = os.environ.get("MLX_DISTRIBUTED_BACKEND", "any")
    group = mx.distributed.init(strict=True, backend=backend)
    return group if group.size() > 1 else None


def _all_reduce(group: mx.distributed.Group | None, K) -> tuple[Callable[[Array], Array] | None, str]:
    """(the shared-memory all-sum or None, "shm" / "ring" / ""). Shared memory when the ranks were started
    by twinlm's launcher (all on this host: it set $TWINLM_SHM_ID) and the kernels are active, unless
    $TWINLM_ALLREDUCE says `ring`; `shm` there makes its absence an error (see twinlm.backends.shm)."""
    from twinlm.backends import BackendUnavailable, shm

    if group is None:
        return None, ""
    mode = shm.mode()
    if mode == "ring":
        return None, "ring"
    launch_id = os.environ.get(shm.ID_ENV)
    why = ("the ranks were not started by twinlm's launcher (`twinlm train --ranks N`), so they may be on "
           "several hosts" if not launch_id else
           f"twinlm's MLX CPU kernels are not active ({_kernels.status().reason})" if K is None else
           "the kernels were built without it (Linux only; rebuild: python -m twinlm.backends.kernels.build)"
           if not hasattr(K, "shm_all_sum") else "")
    if why:
        if mode == "shm":
            raise BackendUnavailable(f"${shm.MODE_ENV}=shm: {why}; use {shm.MODE_ENV}=ring")
        return None, "ring"
    name, rank, size = shm.segment_name(launch_id), group.rank(), group.size()
    slot, timeout = shm.slot_floats(size), shm.timeout_s()
    try:  # attach now: a failure is one error line, not a traceback in the first step
        mx.eval(K.shm_all_sum(mx.zeros((0,), mx.float32), name, rank, size, slot, timeout))
    except (RuntimeError, ValueError) as e:
        raise BackendUnavailable(f"{e}; use {shm.MODE_ENV}=ring") from e
    return (lambda x: K.shm_all_sum(x, name, rank, size, slot, timeout)), "shm"


def create() -> MLXBackend:
    return MLXBackend()
