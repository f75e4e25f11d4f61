"""Dropout masks that are identical on every backend for the same (seed, step).

Frameworks' RNGs disagree for the same seed, so masks are drawn here in numpy with Philox, a
counter-based generator keyed by (seed, step): any step's masks can be recomputed on its own,
which also makes resume bit-identical without saving generator state.
"""

from __future__ import annotations

import numpy as np

from twinlm.core.backend import Array, Backend
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


# The scale of each group of sites travels beside the boolean masks, as 0-d float32 arrays under these keys;
# a LoRA site's name ends in ".lora" (lora_dropout_sites), no model site's does.
SCALE, LORA_SCALE = "@scale", "@scale.lora"


def keep_masks(cfg: ModelConfig, batch: int, t: int, seed: int, step: int) -> dict[str, np.ndarray]:
    """Boolean keep-masks (True: kept), the same draws as `masks`: what goes to the device each step, one
    byte per unit instead of four; `expand` turns them into `masks`' values there."""
    rng = np.random.Generator(np.random.Philox(key=np.array([seed, step], dtype=np.uint64)))
    out: dict[str, np.ndarray] = {}
    for p, where in ((cfg.dropout, sites), (cfg.lora_dropout, lora_dropout_sites)):
        if p > 0.0:
            out |= {name: rng.random(shape, dtype=np.float32) >= p
                    for name, shape in where(cfg, batch, t).items()}
    return out


def scales(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """1/(1-p) per group of sites with p > 0 (inverted dropout), 0-d float32, keyed SCALE/LORA_SCALE."""
    out = {}
    for key, p in ((SCALE, cfg.dropout), (LORA_SCALE, cfg.lora_dropout)):
        if p > 0.0:
            out[key] = np.asarray(1.0 / (1.0 - p), dtype=np.float32)
    return out


def masks(cfg: ModelConfig, batch: int, t: int, seed: int, step: int) -> dict[str, np.ndarray]:
    """Keep-masks scaled by 1/(1-p) (inverted dropout), float32: the model's sites at rate `dropout`, then
    LoRA adapters' inputs at `lora_dropout`; empty when both are 0. The oracle for `expand`."""
    s = scales(cfg)
    return {k: m.astype(np.float32) * s[LORA_SCALE if k.endswith(".lora") else SCALE]
            for k, m in keep_masks(cfg, batch, t, seed, step).items()}


def expand(B: Backend, drop: dict[str, Array]) -> dict[str, Array]:
    """Inside the step: `keep_masks` plus `scales` (as sent) -> the float32 masks of `masks`, bit for bit
    (`where` picks the float32 scale or 0). Masks sent as float32 already (no scale keys) pass through."""
    if SCALE not in drop and LORA_SCALE not in drop:
        return drop
    return {k: B.where(m, drop[LORA_SCALE if k.endswith(".lora") else SCALE], 0.0)
            for k, m in drop.items() if k not in (SCALE, LORA_SCALE)}
