"""Parameter specs: each family says, per parameter, its shape, initialisation, whether AdamW decays
it and whether it trains. Init, weight decay, frozen weights, FLOP counts, the torch reference and
the parity suite's unit-scale weights all read the spec; nothing matches parameter names by pattern.

Initialisation happens in numpy from one seed, drawing in spec order (zeros and ones draw nothing),
so both backends start bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

INIT_STD = 0.02


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    init: str = "normal"  # "normal" (N(0, std)) | "zeros" | "ones"
    std: float = INIT_STD
    decay: bool = True  # AdamW's decoupled weight decay applies
    trainable: bool = True
    matmul: bool = False  # multiplies activations (counted in FLOPs; N(0, 1/fan_in) at unit scale)
    dtype: str = "float32"  # numpy dtype name: "uint32" for a quantized layer's packed words (core.quant)
    # A quantized tensor of a table whose float form is stored (n_out, n_in), rows as quantized (an
    # embedding), not (n_in, n_out) as a linear layer's weight: core.quant reads it when (de)quantizing
    table: bool = False

    @property
    def fan_in(self) -> int:
        return self.shape[0]


Spec = dict[str, ParamSpec]


def weight(n_in: int, n_out: int, std: float = INIT_STD) -> ParamSpec:
    """A linear layer's weight, stored (in, out) so the graph computes x @ W."""
    return ParamSpec((n_in, n_out), "normal", std, decay=True, matmul=True)


def bias(n: int) -> ParamSpec:
    return ParamSpec((n,), "zeros", decay=False)


def gain(n: int) -> ParamSpec:
    return ParamSpec((n,), "ones", decay=False)


def embedding(n: int, d: int, std: float = INIT_STD) -> ParamSpec:
    return ParamSpec((n, d), "normal", std, decay=True)


def init_params(spec: Spec, seed: int) -> dict[str, np.ndarray]:
    """float32 arrays for every parameter in `spec`, drawn in order from one generator."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, s in spec.items():
        if s.init == "zeros":
            value = np.zeros(s.shape)
        elif s.init == "ones":
            value = np.ones(s.shape)
        elif s.init == "normal":
            value = rng.normal(0.0, s.std, size=s.shape)
        else:
            raise ValueError(f"unknown init {s.init!r} for {name}")
        out[name] = value.astype(s.dtype)
    return out


def unit_scale_params(spec: Spec, seed: int) -> dict[str, np.ndarray]:
    """Weights that keep activations at unit variance (matmul weights N(0, 1/fan_in), embeddings
    N(0, 1/d), gains N(1, 0.1), biases N(0, 0.1)): where nonlinearities reach their curved region,
    so parity checks compare more than the near-linear regime of a 0.02 init."""
    rng = np.random.default_rng([seed, 3])
    out: dict[str, np.ndarray] = {}
    for name, s in spec.items():
        if s.dtype == "uint32":  # a quantized layer's packed words: any bits (quantize a float model instead)
            out[name] = rng.integers(0, 2**32, size=s.shape, dtype=np.uint32)
            continue
        if s.init == "ones":
            value = 1.0 + 0.1 * rng.standard_normal(s.shape)
        elif s.init == "zeros":
            value = 0.1 * rng.standard_normal(s.shape)
        else:
            fan = s.fan_in if s.matmul else s.shape[-1]
            value = rng.standard_normal(s.shape) / np.sqrt(fan)
        out[name] = value.astype(np.float32)
    return out


def check_params(spec: Spec, params: dict[str, object]) -> None:
    """Raise ValueError unless `params` has exactly the names and shapes of `spec`."""
    missing = sorted(set(spec) - set(params))
    extra = sorted(set(params) - set(spec))
    if missing or extra:
        raise ValueError(f"parameters do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, s in spec.items():
        got = tuple(params[name].shape)  # type: ignore[attr-defined]
        if got != s.shape:
            raise ValueError(f"parameter {name} has shape {got}, the config needs {s.shape}")


def count(spec: Spec, trainable_only: bool = False) -> int:
    return sum(int(np.prod(s.shape)) for s in spec.values() if s.trainable or not trainable_only)


def frozen_except(spec: Spec, trainable: list[str]) -> Spec:
    """The same spec with every parameter but `trainable` frozen (e.g. fine-tuning only a task head)."""
    return {name: replace(s, trainable=name in trainable) for name, s in spec.items()}
