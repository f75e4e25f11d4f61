"""Dropout masks that are identical on every backend for the same (seed, step).

Frameworks' RNGs disagree for the same seed, so masks are drawn here in numpy with Philox, a
counter-based generator keyed by (seed, step): any step's masks can be recomputed on its own,
which also makes resume bit-identical without saving generator state.
"""

from __future__ import annotations

import numpy as np

from twinlm.core.config import ModelConfig
from twinlm.core.model import param_spec
from twinlm.core.models import family


def sites(cfg: ModelConfig, batch: int, t: int) -> dict[str, tuple[int, ...]]:
    """Each dropout site's name and mask shape, in drawing order (the family's)."""
    return family(cfg.arch).dropout_sites(cfg, batch, t)


def lora_dropout_sites(cfg: ModelConfig, batch: int, t: int) -> dict[str, tuple[int, ...]]:
    """The input of every adapter, where LoRA's dropout (rate lora_dropout) applies."""
    return {name[:-len(".lora_a")] + ".lora": (batch, t, s.shape[0])
            for name, s in param_spec(cfg).items() if name.endswith(".lora_a")}


def masks(cfg: ModelConfig, batch: int, t: int, seed: int, step: int) -> dict[str, np.ndarray]:
    """Keep-masks scaled by 1/(1-p) (inverted dropout), float32: the model's sites at rate `dropout`, then
    LoRA adapters' inputs at `lora_dropout`; empty when both are 0."""
    rng = np.random.Generator(np.random.Philox(key=np.array([seed, step], dtype=np.uint64)))
    out: dict[str, np.ndarray] = {}
    for p, where in ((cfg.dropout, sites), (cfg.lora_dropout, lora_dropout_sites)):
        if p > 0.0:
            scale = np.float32(1.0 / (1.0 - p))
            out |= {name: (rng.random(shape, dtype=np.float32) >= p).astype(np.float32) * scale
                    for name, shape in where(cfg, batch, t).items()}
    return out
