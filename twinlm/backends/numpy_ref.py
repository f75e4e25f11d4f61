"""A forward-only float64 numpy backend: the third opinion in parity checks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from twinlm.core import dtypes as D
from twinlm.core import quant
from twinlm.core.backend import Array, Backend


class NumpyBackend(Backend):
    name = "numpy"
    supports_float64 = True
    supports_grad = False

    def device_info(self) -> dict:
        from twinlm.backends import device

        return device.describe(self.name)

    def __init__(self, dtype: type = np.float64) -> None:
        self.dtype = dtype

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if D.is_bf16(a):
            return D.bf16_to_float32(a).astype(self.dtype)
        return a.astype(self.dtype) if a.dtype.kind == "f" else a.copy()

    def to_host(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    def dtype_name(self, x: Array) -> str:
        return "float32"  # (see astype: the reference never computes in a low dtype)

    def astype(self, x: Array, dtype: str) -> Array:
        # Emulated: the values rounded to the dtype's grid, held in this backend's own float dtype (float32
        # leaves a float64 reference as it is). dtype_name stays "float32": the reference keeps computing
        # at its own precision after the cast.
        return D.round_to(np.asarray(x), dtype).astype(self.dtype)

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    def exp(self, x: Array) -> Array:
        return np.exp(x)

    def log(self, x: Array) -> Array:
        return np.log(x)

    def tanh(self, x: Array) -> Array:
        return np.tanh(x)

    def sqrt(self, x: Array) -> Array:
        return np.sqrt(x)

    def rsqrt(self, x: Array) -> Array:
        return 1.0 / np.sqrt(x)

    def maximum(self, a: Array, b: Array | float) -> Array:
        return np.maximum(a, b)

    def minimum(self, a: Array, b: Array | float) -> Array:
        return np.minimum(a, b)

    def sum(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return np.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return np.max(x, axis=axis, keepdims=keepdims)

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return np.mean(x, axis=axis, keepdims=keepdims)

    def reshape(self, x: Array, shape: Sequence[int]) -> Array:
        return np.reshape(x, tuple(shape))

    def transpose(self, x: Array, axes: Sequence[int]) -> Array:
        return np.transpose(x, tuple(axes))

    def where(self, cond: Array, a: Array | float, b: Array | float) -> Array:
        return np.where(cond, a, b)

    def take(self, table: Array, ids: Array) -> Array:
        return table[ids]

    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        return np.take_along_axis(x, idx, axis=axis)

    def concat(self, xs: Sequence[Array], axis: int) -> Array:
        return np.concatenate(list(xs), axis=axis)

    def stop_gradient(self, x: Array) -> Array:
        return x

    def isfinite(self, x: Array) -> Array:
        return np.all(np.isfinite(x))

    def dequantize(self, qweight: Array, scales: Array, biases: Array, bits: int, group_size: int) -> Array:
        return quant.dequantize(qweight, scales, biases, bits, group_size, self.dtype)


def create() -> NumpyBackend:
    return NumpyBackend()
