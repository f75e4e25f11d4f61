"""Parameter names, shapes and initialisation: one function of the config, initialised in numpy.

Names follow GPT-2 (`blocks.0.attn.qkv.weight`, `ln_f.bias`, ...). Linear weights are stored as
(in_features, out_features) so the graph computes `x @ W + b` with no transpose.
"""

from __future__ import annotations

import math

import numpy as np

from twinlm.core.config import ModelConfig

INIT_STD = 0.02


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in a fixed order (the order initialisation draws in)."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, C)}
    if cfg.pos_encoding == "learned":
        shapes["wpe.weight"] = (cfg.block_size, C)

    def linear(name: str, n_in: int, n_out: int) -> None:
        shapes[f"{name}.weight"] = (n_in, n_out)
        if cfg.bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (C,)
        if cfg.bias:
            shapes[f"{name}.bias"] = (C,)

    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        norm(f"{p}.ln_1")
        linear(f"{p}.attn.qkv", C, 3 * C)
        linear(f"{p}.attn.proj", C, C)
        norm(f"{p}.ln_2")
        linear(f"{p}.mlp.fc", C, F)
        linear(f"{p}.mlp.proj", F, C)
    norm("ln_f")
    if not cfg.tie_embeddings:
        shapes["head.weight"] = (C, V)
    return shapes


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 style init in float32: N(0, 0.02) weights, residual projections scaled by
    1/sqrt(2 * n_layer), zero biases, unit norm gains. Same seed, same bits, on any backend."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".bias"):
            value = np.zeros(shape)
        elif ".ln_" in name or name.startswith("ln_f"):
            value = np.ones(shape)
        else:
            std = INIT_STD
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                std = INIT_STD / math.sqrt(2 * cfg.n_layer)
            value = rng.normal(0.0, std, size=shape)
        out[name] = value.astype(np.float32)
    return out


def count_params(params: dict[str, np.ndarray]) -> int:
    return int(sum(int(np.prod(p.shape)) for p in params.values()))


def check_params(cfg: ModelConfig, params: dict[str, object]) -> None:
    """Raise ValueError unless `params` has exactly the names and shapes `cfg` implies."""
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"parameters do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        got = tuple(params[name].shape)  # type: ignore[attr-defined]
        if got != shape:
            raise ValueError(f"parameter {name} has shape {got}, the config needs {shape}")
