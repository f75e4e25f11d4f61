"""The floating-point dtypes a run computes in (`--dtype`), by name, with no framework imported.

float32 is today's default; bfloat16 and float16 hold weights and activations in 16 bits while the
composites keep softmax, the norm statistics and the loss in float32 (`core.backend`).

numpy has no bfloat16: a bf16 array on the host is its raw bits, a uint16 array whose dtype carries the tag
`BF16` (numpy keeps a dtype's metadata through slicing, reshaping and copying, and drops it in arithmetic,
so tagged bits are never mistaken for numbers by an operation that would compute on them). `round_to` rounds
float32 values to a dtype's grid (round to nearest even, as the frameworks' casts do) for the numpy reference.
"""

from __future__ import annotations

import numpy as np

NAMES = ("float32", "bfloat16", "float16")
# Unit roundoff u = 2^-(mantissa bits + 1): the relative error of one rounding to the dtype's grid.
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
           "half": "float16"}

BF16 = np.dtype(np.uint16, metadata={"twinlm": "bfloat16"})


def check(name: str) -> str:
    """The canonical name of dtype `name` (aliases: bf16, fp16, fp32); a ValueError naming the choices."""
    canon = ALIASES.get(str(name).lower(), str(name).lower())
    if canon not in NAMES:
        raise ValueError(f"unknown dtype {name!r}: choose float32, bfloat16 or float16")
    return canon


def is_bf16(a: np.ndarray) -> bool:
    """Whether `a` holds tagged bfloat16 bits (see the module's docstring)."""
    md = a.dtype.metadata
    return a.dtype == np.uint16 and md is not None and md.get("twinlm") == "bfloat16"


def name_of(a: np.ndarray) -> str | None:
    """The dtype name of a float host array (tagged bf16 bits included); None for anything else."""
    if is_bf16(a):
        return "bfloat16"
    return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(a.dtype)


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as tagged bits. NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    odd = (u >> np.uint32(16)) & np.uint32(1)
    rounded = ((u + np.uint32(0x7FFF) + odd) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():  # the rounding increment could carry a NaN's payload into infinity
        rounded[nan] = 0x7FC0
    return rounded.view(BF16)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Tagged (or plain uint16) bfloat16 bits as float32 values (exact)."""
    return (np.asarray(bits).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_host(a: np.ndarray, name: str) -> np.ndarray:
    """Float array `a` stored as dtype `name` on the host: float32, float16, or tagged bf16 bits."""
    name = check(name)
    if name_of(a) == name:
        return a
    f32 = as_float32(a)
    if name == "bfloat16":
        return bf16_bits(f32)
    return f32.astype(np.float16 if name == "float16" else np.float32)


def as_float32(a: np.ndarray) -> np.ndarray:
    """A float host array (tagged bf16 bits included) as float32 values."""
    return bf16_to_float32(a) if is_bf16(a) else np.asarray(a, dtype=np.float32)


def round_to(a: np.ndarray, name: str) -> np.ndarray:
    """Values of `a` rounded to dtype `name`'s grid, returned in a's float dtype (float32 or float64):
    the emulation the numpy reference uses for a low-precision cast."""
    name = check(name)
    a = np.asarray(a)
    if name == "float32":
        return a if a.dtype == np.float64 else a.astype(np.float32)
    low = bf16_to_float32(bf16_bits(a)) if name == "bfloat16" else a.astype(np.float16)
    return low.astype(a.dtype if a.dtype.kind == "f" else np.float64)
