"""tinygrad adapter (0.14): `Tensor.gradient` for autograd, `TinyJit` for the whole train step.

With `devices=N` (`twinlm train --ranks N`) one process trains data-parallel on N devices (`CPU:0`,
`CPU:1`, ... or N GPUs): parameters and optimizer state are replicated (`Tensor.shard` with no axis),
batch rows and dropout masks are split across the devices, and tinygrad's multi-device graph reduces
the gradients of the replicated parameters itself, inside the one captured TinyJit: the loss is the
global batch's own, with no per-rank scaling. tinygrad has no inter-process collective, so this is
its data-parallel form. On the CPU each device has its own queue and worker thread in tinygrad 0.14
(a multi-device kernel is written into every device's ring), so the devices can run at once; whether
that beats one device is measured by `python -m benchmarks.step --backend tinygrad --ranks 1,2`.
Multi-device graphs skip the JIT cache (it stores single-device buffers)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tinygrad import Device, Tensor, TinyJit, dtypes

from twinlm.backends import tinygrad_jitcache as jitcache
from twinlm.core import dtypes as D
from twinlm.core import tensorfile
from twinlm.core.backend import LAYER_NORM_EPS, RMS_NORM_EPS, Array, Backend, Step

_DTYPES = {np.dtype(np.float32): dtypes.float32, np.dtype(np.float64): dtypes.float64,
           np.dtype(np.int32): dtypes.int32, np.dtype(np.int64): dtypes.int64,
           np.dtype(np.bool_): dtypes.bool, np.dtype(np.float16): dtypes.float16,
           np.dtype(np.uint16): dtypes.uint16, np.dtype(np.uint32): dtypes.uint32}
# tinygrad's CPU (clang) device runs half natively. Its C renderer writes bfloat16 as clang's `__bf16`, which
# clang before 17 refuses on x86 ("__bf16 is not supported on this target", Debian's clang 14 here) in any
# kernel that stores one; so on the CPU twinlm has tinygrad emulate it (EMULATED_DTYPES: computed in float32,
# stored as 16 bits), which runs on any clang. Measured here: forward, gradients and casts all run.
_FLOATS = {"float32": dtypes.float32, "bfloat16": dtypes.bfloat16, "float16": dtypes.float16}
_NAMES = {v: k for k, v in _FLOATS.items()}


class TinygradBackend(Backend):
    name = "tinygrad"

    def __init__(self, devices: int = 1) -> None:
        self.device = Device.DEFAULT  # --device set it before this (twinlm.backends.device)
        self.n_devices = devices
        base = Device.DEFAULT.split(":")[0]
        self.devices = tuple(f"{base}:{i}" for i in range(devices)) if devices > 1 else None
        if base == "CPU":
            # Set once here, not before the first bfloat16 kernel: the setting is in the JIT cache's key
            # (tinygrad_jitcache), so setting it lazily gave one process's float32 step another key than
            # a fresh process's after any bfloat16 work. It changes only bfloat16 kernels (see _FLOATS).
            from tinygrad.helpers import EMULATED_DTYPES

            names = [n for n in EMULATED_DTYPES.value.split(",") if n]
            if "bfloat16" not in names:
                EMULATED_DTYPES.value = ",".join([*names, "bfloat16"])

    @property
    def supports_float64(self) -> bool:  # type: ignore[override]
        # Asked of the device's renderer: Metal has no double, OpenCL only with cl_khr_fp64.
        from twinlm.backends import device

        return device.tinygrad_float64(self.device)

    def device_info(self) -> dict:
        from twinlm.backends import device

        return device.describe(self.name, self.device)

    def from_numpy(self, a: np.ndarray) -> Array:
        if D.is_bf16(a):  # tagged bfloat16 bits: copied as uint16, then the same buffer read as bfloat16
            return self.from_numpy(a.view(np.uint16)).bitcast(dtypes.bfloat16).realize()
        a = np.ascontiguousarray(a)
        _DTYPES[a.dtype]  # (a KeyError for a dtype twinlm does not use)
        # No dtype argument: tinygrad takes numpy's own (the same one), and given one it first makes a
        # numpy copy (`astype`), a third copy of the largest tensor while a model loads. Off the CPU a
        # read-only array (a memory-mapped weight, a cached table) is copied first: OpenCL's copy into the
        # device takes the address of a writable buffer (tinygrad's ops_cl._copyin).
        if not a.flags.writeable and self.device.split(":")[0] != "CPU":
            a = a.copy()
        if (not self.devices and self.device.split(":")[0] == "CPU" and a.ndim
                and a.nbytes > tensorfile.COPY_CHUNK and tensorfile.is_mapped(a)):
            return _from_mapped(a, self.device)
        t = Tensor(a, device=None if self.devices else self.device)
        return (t.shard(self.devices) if self.devices else t).realize()  # replicated on every device

    def from_numpy_rows(self, a: np.ndarray, axis: int = 0) -> Array:
        if not self.devices:
            return self.from_numpy(a)
        a = np.ascontiguousarray(a)
        return Tensor(a, dtype=_DTYPES[a.dtype]).shard(self.devices, axis=axis).realize()

    def to_numpy(self, x: Array) -> np.ndarray:
        if x.dtype == dtypes.bfloat16:  # numpy has no bfloat16: its values, exactly, in float32
            x = x.cast(dtypes.float32)
        return x.numpy().copy()

    def to_host(self, x: Array) -> np.ndarray:
        if x.dtype == dtypes.bfloat16:
            return x.bitcast(dtypes.uint16).numpy().copy().view(D.BF16)
        return self.to_numpy(x)

    def astype(self, x: Array, dtype: str) -> Array:
        return x.cast(_FLOATS[dtype])

    def dtype_name(self, x: Array) -> str:
        return _NAMES.get(x.dtype, "float32")

    def exp(self, x: Array) -> Array:
        return x.exp()

    def log(self, x: Array) -> Array:
        return x.log()

    def tanh(self, x: Array) -> Array:
        return x.tanh()

    def sqrt(self, x: Array) -> Array:
        return x.sqrt()

    def rsqrt(self, x: Array) -> Array:
        return x.rsqrt()

    def maximum(self, a: Array, b: Array | float) -> Array:
        return a.maximum(b)

    def minimum(self, a: Array, b: Array | float) -> Array:
        return a.minimum(b)

    def sum(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return x.sum(axis=axis, keepdim=keepdims)

    def max(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return x.max(axis=axis, keepdim=keepdims)

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return x.mean(axis=axis, keepdim=keepdims)

    def reshape(self, x: Array, shape: Sequence[int]) -> Array:
        return x.reshape(tuple(shape))

    def transpose(self, x: Array, axes: Sequence[int]) -> Array:
        return x.permute(tuple(axes))

    def where(self, cond: Array, a: Array | float, b: Array | float) -> Array:
        return cond.where(a, b)

    def take(self, table: Array, ids: Array) -> Array:
        if table.dtype == dtypes.bfloat16 and self.device.split(":")[0] == "CPU":
            # Emulated bfloat16 (_FLOATS): tinygrad's gather of a table of ~65K rows or more fails to
            # compile ("UOp verification failed ... Ops.AFTER"; a Qwen2.5 vocabulary of 151,936 in `sample`).
            # Gathered in float32 (the cast fused into the gather) it compiles, and the gradient still flows.
            return table.cast(dtypes.float32)[ids].cast(dtypes.bfloat16)
        return table[ids]

    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        return x.gather(axis, idx)

    def concat(self, xs: Sequence[Array], axis: int) -> Array:
        return xs[0].cat(*xs[1:], dim=axis)

    def stop_gradient(self, x: Array) -> Array:
        return x.detach()

    def isfinite(self, x: Array) -> Array:
        return ((x == x) & (x.abs() != float("inf"))).all()

    def dequantize(self, qweight: Array, scales: Array, biases: Array, bits: int, group_size: int) -> Array:
        # Unpacked inside the graph (shift and mask of the uint32 words, which tinygrad's CPU renderer emits
        # as plain C integer ops), so the weights stay packed in memory between calls.
        per = 32 // bits
        n_out, n_words = qweight.shape
        shifts = Tensor(np.arange(per, dtype=np.uint32) * bits, device=qweight.device)
        q = (qweight.reshape(n_out, n_words, 1) >> shifts) & ((1 << bits) - 1)
        g = q.cast(dtypes.float32).reshape(n_out, -1, group_size)
        w = g * scales.reshape(*scales.shape, 1) + biases.reshape(*biases.shape, 1)
        return w.reshape(n_out, n_words * per)

    # ---- composites: the core's maths, with materialisation hints for the scheduler ------------
    def softmax(self, x: Array, axis: int = -1) -> Array:
        # Without a realised softmax the scheduler fuses its recomputation (exp, max, sum) into the
        # attention-gradient reductions, redoing it for every output element (~1 GFLOP/s kernels).
        return super().softmax(x, axis).contiguous().contiguous_backward()

    def attention(self, q: Array, k: Array, v: Array, mask: Array | None,
                  dropout: Array | None = None, softcap: float = 0.0) -> Array:
        # Realise dq, dk, dv separately: otherwise one kernel computes all three inside the 3C-wide
        # gradient of the fused qkv projection, redoing the T x T reductions for each slice.
        q, k, v = (t.contiguous_backward() for t in (q, k, v))
        return super().attention(q, k, v, mask, dropout, softcap)

    def gelu(self, x: Array) -> Array:
        # Realised once, not re-evaluated (erf polynomial included) inside the next matmul's loop.
        return super().gelu(x).contiguous()

    def swiglu(self, gate: Array, up: Array) -> Array:
        # gate and up are two halves of one fused projection: realise each half's gradient on its own, or
        # the scheduler rebuilds both inside the projection's backward (baby Llama step: 3.5 s -> 0.56 s).
        return super().swiglu(gate.contiguous_backward(), up.contiguous_backward()).contiguous()

    def rope(self, x: Array, cos: Array, sin: Array) -> Array:
        return super().rope(x, cos, sin).contiguous()

    def layer_norm(self, x: Array, weight: Array, bias: Array | None, eps: float = LAYER_NORM_EPS) -> Array:
        return super().layer_norm(x, weight, bias, eps).contiguous()

    def rms_norm(self, x: Array, weight: Array, eps: float = RMS_NORM_EPS) -> Array:
        return super().rms_norm(x, weight, eps).contiguous()

    # ---- autograd, compile, sync ------------------------------------------------------------
    def value_and_grad(self, fn: Callable[..., Array]) -> Callable[..., tuple[Array, dict[str, Array]]]:
        def wrapped(params: dict[str, Array], *args: object) -> tuple[Array, dict[str, Array]]:
            value = fn(params, *args)
            grads = value.gradient(*params.values())
            return value, dict(zip(params, grads, strict=True))
        return wrapped

    def compile_step(self, fn: Callable, state: dict[str, Array]) -> Step:
        return _JitStep(fn, state, self)

    def sync(self, *xs: object) -> None:
        tensors = [x for x in xs if isinstance(x, Tensor)]
        if tensors:
            Tensor.realize(*tensors)


class _JitStep(Step):
    """The state goes into the JIT as an explicit input, updated in place with `assign`, so a captured
    JIT can be stored and reloaded in another process (`tinygrad_jitcache`) and still update
    `self.state`, whichever tensors it holds (fresh, or replaced on resume)."""

    def __init__(self, fn: Callable, state: dict[str, Array], backend: Backend) -> None:
        super().__init__(fn, state, backend)
        self._names = list(self.state)
        self._jit: Any = None
        self._save_to: Path | None = None  # where to store the JIT once captured

        def run(state_list: list[Tensor], *inputs: object) -> tuple[Array, ...]:
            st = dict(zip(self._names, state_list, strict=True))
            outputs, new = fn(st, *inputs)
            for k, t in new.items():
                st[k].assign(t)
            outputs = tuple(o.contiguous() for o in outputs)
            Tensor.realize(*outputs, *st.values())
            return outputs

        self._run = run

    def _state_list(self) -> list[Tensor]:
        return [self.state[k] for k in self._names]

    def _load_or_capture(self, inputs: tuple[object, ...]) -> Any:
        # The JIT cache stores single-device graphs only (a multi-device one holds MultiBuffers).
        multi = getattr(self.backend, "devices", None) is not None
        if not multi and (folder := jitcache.cache_dir()) is not None:
            state = self._state_list()
            outputs, new = self.fn(dict(zip(self._names, state, strict=True)), *inputs)
            key = jitcache.graph_key([*state, *_tensors(inputs)], [*outputs, *new.values()])
            self._save_to = folder / f"{key}.jit"
            if (jit := jitcache.load(self._save_to)) is not None:
                self._save_to = None
                return jit
        jit = TinyJit(self._run)
        jit.cnt = 1  # capture on the first call: an eager run first would schedule everything twice
        return jit

    def __call__(self, *inputs: object) -> tuple[Array, ...]:
        if self._jit is None:
            self._jit = self._load_or_capture(inputs)
        outputs = self._jit(self._state_list(), *inputs)
        if self._save_to is not None:
            jitcache.save(self._jit, self._save_to)
            self._save_to = None
        # TinyJit reuses its output buffers: copy out before the next call overwrites them.
        return tuple(o.clone().realize() for o in outputs)


def _from_mapped(a: np.ndarray, device: str) -> Tensor:
    """A large array read from a memory-mapped file (a checkpoint's tensor), written into one CPU buffer in
    chunks, each chunk's mapped pages released once copied (`tensorfile.copy_releasing`). Whole, the mapped
    pages of the tensor being copied sat beside its copy: loading a Llama-3.2-1B run peaked 1 GB (its
    embedding) above the weights. The buffer is the CPU device's own memory, written through its zero-copy
    view before any kernel reads it."""
    t = Tensor.empty(*a.shape, dtype=_DTYPES[a.dtype], device=device)
    buf = t.uop.buffer.ensure_allocated()
    dst = np.frombuffer(buf.as_memoryview(force_zero_copy=True), np.uint8)
    tensorfile.copy_releasing(dst, a.reshape(-1).view(np.uint8))
    return t


def _tensors(inputs: Sequence[object]) -> list[Tensor]:
    """The tensors among the step's inputs, one level into dicts and sequences (as TinyJit finds them)."""
    out: list[Tensor] = []
    for x in inputs:
        items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else [x]
        out += [t for t in items if isinstance(t, Tensor)]
    return out


def create(devices: int = 1) -> TinygradBackend:
    if Device.DEFAULT == "CPU" and shutil.which("clang") is None:
        raise RuntimeError("tinygrad's CPU device needs clang on PATH (Debian/Ubuntu: apt-get install clang)")
    return TinygradBackend(devices)
