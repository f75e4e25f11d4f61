"""Parameters of a config: names, shapes and numpy initialisation, all read from the family's spec
(`core.spec`). Linear weights are stored (in_features, out_features) so the graph computes x @ W + b."""

from __future__ import annotations

import numpy as np

from twinlm.core import spec as S
from twinlm.core.config import ModelConfig
from twinlm.core.model import param_spec


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in spec order (the order initialisation draws in)."""
    return {name: s.shape for name, s in param_spec(cfg).items()}


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The family's init in float32; same seed, same bits, on any backend."""
    return S.init_params(param_spec(cfg), seed)


def count_params(params: dict[str, np.ndarray]) -> int:
    return int(sum(int(np.prod(p.shape)) for p in params.values()))


def check_params(cfg: ModelConfig, params: dict[str, object]) -> None:
    """Raise ValueError unless `params` has exactly the names and shapes `cfg` implies."""
    S.check_params(param_spec(cfg), params)
