"""Comparing two arrays: a `Tolerance`, the `Check` it gives (max abs/rel diff, margin, pass) and the
`Report` that collects them; the suite's tolerances."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Pass where |got - want| <= atol + rtol * |want| elementwise (numpy.allclose's rule)."""

    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol {self.atol:g}" + (f" rtol {self.rtol:g}" if self.rtol else "")


FORWARD_TOL = Tolerance(1e-6, 1e-3)
GRAD_TOL = Tolerance(1e-4, 1e-3)
LOGITS_TOL = Tolerance(1e-4, 1e-4)
LOSS_TOL = Tolerance(1e-5, 0.0)
MODEL_GRAD_TOL = Tolerance(1e-5, 1e-4)
TRAIN_LOSS_TOL = Tolerance(1e-4, 0.0)
TRAIN_PARAM_TOL = Tolerance(1e-4, 0.0)
# Causality: logits at positions <= t must not move at all when tokens after t change.
LEAK_TOL = Tolerance(0.0, 0.0)
# float64 directional derivative vs central difference (h = 1e-5: truncation and rounding ~1e-10).
FD64_TOL = Tolerance(1e-8, 1e-6)
FD64_STEP = 1e-5
FLOAT64_LOSS_TOL = Tolerance(1e-10, 1e-10)


@dataclass(frozen=True)
class Check:
    group: str  # what was compared, e.g. "model mlx vs tinygrad"
    name: str  # the tensor, e.g. "grad blocks.0.ln_1.weight"
    max_abs: float
    max_rel: float
    tol: Tolerance
    margin: float  # max over elements of |diff| / (atol + rtol * |want|); pass <= 1
    ok: bool
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.group}: {self.name}"


def compare(group: str, name: str, got: Any, want: Any, tol: Tolerance, *,
            dtype: Any = None) -> Check:
    """Compare `got` with `want`; shape must match exactly and `got` must have `dtype`
    (default: want's dtype). Non-finite values pass only where both sides are identical."""
    got, want = np.asarray(got), np.asarray(want)
    expected = np.dtype(dtype) if dtype is not None else want.dtype
    notes = []
    if got.dtype != expected:
        notes.append(f"dtype {got.dtype}, expected {expected}")
    if got.shape != want.shape:
        notes.append(f"shape {got.shape}, expected {want.shape}")
        return Check(group, name, math.inf, math.inf, tol, math.inf, False, "; ".join(notes))
    g, w = got.astype(np.float64), want.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(g == w, 0.0, np.abs(g - w))
    diff = np.where(np.isnan(diff), np.inf, diff)
    bound = tol.atol + tol.rtol * np.abs(np.where(np.isfinite(w), w, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / bound)
        rel = np.where(diff == 0, 0.0, diff / np.maximum(np.abs(w), np.finfo(np.float64).tiny))
    max_abs = float(diff.max(initial=0.0))
    margin = float(ratio.max(initial=0.0))
    ok = not notes and margin <= 1.0
    return Check(group, name, max_abs, float(rel.max(initial=0.0)), tol, margin, ok, "; ".join(notes))


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def extend(self, checks: Sequence[Check]) -> None:
        self.checks.extend(checks)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)

    @property
    def worst(self) -> Check | None:
        return max(self.checks, key=lambda c: c.margin, default=None)

    def groups(self) -> dict[str, list[Check]]:
        out: dict[str, list[Check]] = {}
        for c in self.checks:
            out.setdefault(c.group, []).append(c)
        return out


# Low precision (`--dtype`): tolerances from the dtype's unit roundoff u (bfloat16 2^-8, float16 2^-11,
# `core.dtypes.UNIT_ROUNDOFF`). Every side holds the same rounded weights; a low-precision side then rounds
# each matmul output, activation and residual add, and two sides' roundings differ. The logits may differ by
# DTYPE_LOGITS_ULPS * u * max|logits| (measured on the suite's gpt, llama, bert, lora and modern models, both
# dtypes, every pair of sides: at most 0.5 of that). The loss is computed in float32 and averages the
# rounding errors of B * T positions, which cancel: it must agree to DTYPE_LOSS_ULPS * u * max(1, |loss|)
# (measured: at most 0.17 of that on gpt/llama/lora; the masked batches of bert and modern average fewer
# terms, up to 0.6). The negative control (softmax, norm statistics and loss kept in the low dtype) rounds
# the loss itself, an error of up to u / 2 of it: caught on gpt, llama and lora at 1.6-4.5x the
# tolerance, not on bert or modern (0.1-1.0x), so the dtype phase runs on gpt and llama (suite.DTYPE_ARCHS).
DTYPE_LOGITS_ULPS = 8.0
DTYPE_LOSS_ULPS = 0.125


def dtype_tolerances(dtype: str, logits_scale: float, loss: float) -> tuple[Tolerance, Tolerance]:
    """(logits, loss) tolerances of a comparison in `dtype`, scaled by the reference's magnitudes."""
    from twinlm.core.dtypes import UNIT_ROUNDOFF

    u = UNIT_ROUNDOFF[dtype]
    return (Tolerance(DTYPE_LOGITS_ULPS * u * max(logits_scale, 1e-3), 0.0),
            Tolerance(DTYPE_LOSS_ULPS * u * max(1.0, abs(loss)), 0.0))
