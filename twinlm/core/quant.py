"""Quantized linear weights (8- and 4-bit, per-group affine), in numpy: the one definition of the format.

It is MLX's "affine" layout, so `mx.quantized_matmul(x, w, scales, biases, transpose=True, ...)` and
`mx.dequantize` read it unchanged. A twinlm linear weight W is stored (n_in, n_out) and the graph computes
x @ W + b; quantized, layer `name` keeps `name.bias` and replaces `name.weight` by three tensors of the
transposed weight Wt = W.T (n_out, n_in), grouped along n_in in groups of `group_size`:

    name.qweight  uint32 (n_out, n_in * bits / 32): element j of a word sits at bits [j*bits, (j+1)*bits)
    name.scales   float32 (n_out, n_in / group_size)
    name.biases   float32 (n_out, n_in / group_size)      Wt[o, i] = q[o, i] * scale + bias (i's group)

The run's config carries `quant_bits` and `quant_group_size` (0: not quantized), and `quant_embedding`.
With it, the token embedding E (V, C) is quantized too, in the same layout: E *is* the transposed weight
Wt (n_out=V, n_in=C) of a tied head (logits = h @ E.T), so one table serves both the lookup (its rows'
words, scales and biases taken, then dequantized: `Backend.quantized_take`) and the head
(`quantized_linear`); its spec marks it `table` (the float form is E itself, not a transposed weight). An
untied head (C, V) is quantized as a linear weight. Without it (and in runs made before it existed), the
embedding and the head stay float.
"""

from __future__ import annotations

import numpy as np

from twinlm.core import dtypes
from twinlm.core.tensorfile import release

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
SUFFIXES = (".qweight", ".scales", ".biases")
BLOCK_ELEMENTS = 1 << 22  # `quantize` works through a weight in blocks of output rows of ~this many inputs


def check_format(n_in: int, bits: int, group_size: int, name: str = "a layer") -> None:
    """Raise ValueError unless `bits` and `group_size` are supported and the group size divides n_in."""
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"quantization group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                         f"got {group_size!r}")
    if n_in % group_size:
        raise ValueError(f"{name} has {n_in} inputs, not a multiple of the group size {group_size}")


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers q (n_out, n_in) in [0, 2^bits) -> uint32 words (n_out, n_in * bits / 32), little end first."""
    per = 32 // bits
    n_out, n_in = q.shape
    q = q.astype(np.uint32).reshape(n_out, n_in // per, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)


def unpack(qweight: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words (n_out, n_words) -> the integers (n_out, n_words * 32 / bits) as uint8."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    q = (qweight[..., None].astype(np.uint32) >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(*qweight.shape[:-1], qweight.shape[-1] * per).astype(np.uint8)


def quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(qweight, scales, biases) of a linear weight `w` stored (n_in, n_out): per group of `group_size`
    inputs, bias = the group's min and scale = (max - min) / (2^bits - 1), q = round((w - bias) / scale),
    computed in float64 and stored as float32 (a constant group gets q = 0, scale 1)."""
    n_in, n_out = w.shape
    check_format(n_in, bits, group_size)
    # C order: a transposed view would reach a backend as a strided array (measured: MLX's kernel then runs
    # 13x slower at decoding, copying it on every call)
    qweight = np.empty((n_out, n_in * bits // 32), np.uint32)
    scales = np.empty((n_out, n_in // group_size), np.float32)
    biases = np.empty((n_out, n_in // group_size), np.float32)
    # Blocks of output rows (each row's groups are independent): the float64 temporaries of a whole
    # 128,256 x 2,048 embedding would be 2 GB each
    step = max(1, BLOCK_ELEMENTS // n_in)
    for o in range(0, n_out, step):
        qweight[o:o + step], scales[o:o + step], biases[o:o + step] = _quantize_rows(
            w[:, o:o + step], bits, group_size)
    return qweight, scales, biases


def _quantize_rows(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_in, n_out = w.shape
    wt = np.asarray(dtypes.as_float32(w), np.float64).T.reshape(n_out, n_in // group_size, group_size)
    lo, hi = wt.min(axis=-1), wt.max(axis=-1)
    scales = ((hi - lo) / ((1 << bits) - 1)).astype(np.float32)
    scales[scales == 0] = 1.0
    biases = lo.astype(np.float32)
    # Rounded against the float32 scale and bias that will be stored, so q is the nearest level of them.
    q = np.rint((wt - biases[..., None].astype(np.float64)) / scales[..., None].astype(np.float64))
    q = np.clip(q, 0, (1 << bits) - 1).astype(np.uint32).reshape(n_out, n_in)
    return pack(q, bits), scales, biases


def dequantize(qweight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int,
               dtype: type = np.float32) -> np.ndarray:
    """The transposed weight Wt (n_out, n_in) = q * scale + bias, computed in `dtype` (float32: the same
    bits as `mx.dequantize`, two roundings: product, then sum)."""
    q = unpack(qweight, bits)
    n_out, n_in = q.shape
    g = q.reshape(n_out, n_in // group_size, group_size).astype(dtype)
    out = g * scales[..., None].astype(dtype) + biases[..., None].astype(dtype)
    return out.reshape(n_out, n_in)


def quantize_params(params: dict[str, np.ndarray], quant_spec: dict, bits: int,
                    group_size: int) -> dict[str, np.ndarray]:
    """A float model's `params` in the layout of `quant_spec` (the quantized config's parameter spec): each
    `X.weight` whose spec has `X.qweight` becomes X.qweight, X.scales and X.biases; the rest is kept. A
    `table` (an embedding, stored (n_out, n_in)) is quantized as the rows it stores."""
    layers = [name[:-len(".qweight")] for name in quant_spec if name.endswith(".qweight")]
    out = {k: v for k, v in params.items() if not any(k == f"{layer}.weight" for layer in layers)}
    for layer in layers:
        w = params[f"{layer}.weight"]
        q, s, b = quantize(w.T if quant_spec[f"{layer}.qweight"].table else w, bits, group_size)
        out |= {f"{layer}.qweight": q, f"{layer}.scales": s, f"{layer}.biases": b}
        release(w)  # a memory-mapped checkpoint's pages, read once: not resident beside the quantized model
    return out


def dequantize_params(params: dict[str, np.ndarray], quant_spec: dict, bits: int,
                      group_size: int) -> dict[str, np.ndarray]:
    """The float model of quantized `params` (whose parameter spec is `quant_spec`): each X.qweight/scales/
    biases back to X.weight, (n_in, n_out) for a linear layer, (n_out, n_in) for a `table`."""
    out = {k: v for k, v in params.items() if not k.endswith(SUFFIXES)}
    for name in params:
        if name.endswith(".qweight"):
            layer = name[:-len(".qweight")]
            wt = dequantize(params[name], params[f"{layer}.scales"], params[f"{layer}.biases"], bits,
                            group_size)
            out[f"{layer}.weight"] = wt if quant_spec[name].table else np.ascontiguousarray(wt.T)
    return out
