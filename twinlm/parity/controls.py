"""Negative controls: one known bug each, injected on one side only (a backend mixin, a mask or an optimizer
setting); the suite must then fail. Controls for a family's own pieces are declared in its module
(`ABLATIONS` in core/models/)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from twinlm.core import model
from twinlm.core.backend import LAYER_NORM_EPS, RMS_NORM_EPS, Array
from twinlm.core.config import ModelConfig
from twinlm.core.models import FAMILIES, attends, family


class TanhGelu:
    """GELU's tanh approximation (tinygrad's native default) instead of the pinned erf form."""

    def gelu(self: Any, x: Array) -> Array:
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + self.tanh(c * (x + 0.044715 * (x * x * x))))


WRONG_LAYER_NORM_EPS = 1e-6


class WrongLayerNormEps:
    """LayerNorm with a framework default eps instead of the config's: 1e-6 for the pinned 1e-5, and
    PyTorch's 1e-5 for anything else (BERT's 1e-12)."""

    def layer_norm(self: Any, x: Array, weight: Array, bias: Array | None,
                   eps: float = LAYER_NORM_EPS) -> Array:
        wrong = WRONG_LAYER_NORM_EPS if eps == LAYER_NORM_EPS else LAYER_NORM_EPS
        return super().layer_norm(x, weight, bias, wrong)  # type: ignore[misc]


WRONG_RMS_NORM_EPS = 1e-6


class WrongRmsNormEps:
    """RMSNorm with eps 1e-6 (tinygrad's default) instead of the pinned 1e-5."""

    def rms_norm(self: Any, x: Array, weight: Array, eps: float = RMS_NORM_EPS) -> Array:
        return super().rms_norm(x, weight, WRONG_RMS_NORM_EPS)  # type: ignore[misc]


class InterleavedRope:
    """RoPE on interleaved pairs (x[2i], x[2i+1]) (Meta's original layout) instead of the half split."""

    def rope(self: Any, x: Array, cos: Array, sin: Array) -> Array:
        b, h, t, hs = x.shape
        pairs = self.reshape(x, (b, h, t, hs // 2, 2))
        x1, x2 = (self.reshape(pairs[..., i:i + 1], (b, h, t, hs // 2)) for i in (0, 1))
        return super().rope(self.concat([x1, x2], axis=-1), cos, sin)  # type: ignore[misc]


class TiledKV:
    """Grouped-query heads mapped to kv head h % Hkv (tiling) instead of h // n_rep."""

    def repeat_kv(self: Any, x: Array, n_rep: int) -> Array:
        return x if n_rep == 1 else self.concat([x] * n_rep, axis=1)


class IgnorePadding:
    """Attention that drops a per-example (padding) mask: padded tokens are attended to."""

    def attention(self: Any, q: Array, k: Array, v: Array, mask: Array | None,
                  dropout: Array | None = None, softcap: float = 0.0) -> Array:
        if mask is not None and len(mask.shape) == 4:
            mask = None
        return super().attention(q, k, v, mask, dropout, softcap)  # type: ignore[misc]


class UnscaledLora:
    """LoRA adapters added without their alpha / rank scale."""

    def lora(self: Any, x: Array, a: Array, b: Array, scale: float) -> Array:
        return super().lora(x, a, b, 1.0)  # type: ignore[misc]


def shifted_causal_mask(t_q: int, t_k: int) -> np.ndarray:
    """The causal mask shifted by one: each query also sees the next token (a leak)."""
    return np.arange(t_k)[None, :] <= np.arange(t_q)[:, None] + (t_k - t_q) + 1


@dataclass(frozen=True)
class Control:
    """One injected bug. Applied to one side only; the suite must then fail. `applies` says whether a
    config has the piece the bug touches (a tanh GELU cannot be caught in a SwiGLU model)."""

    name: str
    description: str
    mixin: type | None = None
    mask_fn: Callable[[int, int], np.ndarray] = model.causal_mask
    bias_correction: bool = True
    applies: Callable[[ModelConfig], bool] = lambda cfg: True


CONTROLS = (
    Control("tanh-gelu", "GELU by the tanh approximation", mixin=TanhGelu,
            applies=lambda c: c.activation == "gelu" and attends(c)),
    Control("no-bias-correction", "AdamW without bias correction (bc1 = bc2 = 1)", bias_correction=False),
    Control("layer-norm-eps", f"LayerNorm eps {WRONG_LAYER_NORM_EPS:g} instead of {LAYER_NORM_EPS:g} "
            f"({LAYER_NORM_EPS:g} instead of BERT's 1e-12)",
            mixin=WrongLayerNormEps, applies=lambda c: c.norm == "layernorm"),
    Control("shifted-mask", "causal mask shifted by one (sees the next token)", mask_fn=shifted_causal_mask,
            applies=lambda c: c.kind == "decoder" and attends(c)),
    Control("rms-norm-eps", f"RMSNorm eps {WRONG_RMS_NORM_EPS:g} instead of {RMS_NORM_EPS:g}",
            mixin=WrongRmsNormEps, applies=lambda c: c.norm == "rmsnorm"),
    Control("rope-interleaved", "RoPE on interleaved pairs instead of the half split", mixin=InterleavedRope,
            applies=lambda c: c.pos_encoding == "rope"),
    Control("gqa-tiled", "grouped-query heads mapped to the wrong kv head", mixin=TiledKV,
            applies=lambda c: 1 < c.n_kv_head < c.n_head),  # else every mapping is the same one
    Control("padding-ignored", "attention ignores the padding mask", mixin=IgnorePadding,
            applies=lambda c: c.kind == "encoder"),
    Control("lora-unscaled", "LoRA adapters without their alpha / rank scale", mixin=UnscaledLora,
            applies=lambda c: c.lora_rank > 0 and c.lora_scale != 1.0),
    # The families' own (core/models/*: ABLATIONS).
    *(Control(name, what, mixin=mixin, applies=lambda c, a=arch: c.arch == a)
      for arch in FAMILIES for name, what, mixin in getattr(family(arch), "ABLATIONS", {}).get(arch, ())),
)


def control_named(name: str) -> Control:
    return next(c for c in CONTROLS if c.name == name)
