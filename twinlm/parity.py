"""Cross-backend parity: every primitive, composite, the whole model and the training loop,
compared across backends and against numpy, with negative controls that must be caught.

The pieces, bottom up:
- `compare` turns two arrays and a `Tolerance` into a `Check` (max abs/rel diff, margin, pass).
- `check_op` is the one helper for primitives and composites (like tinygrad's `helper_test_op`):
  forward against an independent float64 numpy reference, gradient of sum(f(x) * w) from
  `B.value_and_grad` against float64 central finite differences of that reference, each with
  its own tolerance; the backend is an argument.
- `model_run`, `train_run`, `leakage_checks` and `fd_gradient_checks` cover the whole graph.
- `Control`s inject one known bug on one side (a backend subclass or a parameter of the check);
  `Suite.run(control)` must then fail, which `twinlm parity --self-test` and the tests verify.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinlm.core import layers, model, optim, step
from twinlm.core import spec as SP
from twinlm.core.backend import LAYER_NORM_EPS, RMS_NORM_EPS, Array, Backend
from twinlm.core.config import ModelConfig, preset
from twinlm.core.models import attends
from twinlm.core.params import init_params


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


# ---- primitives and composites --------------------------------------------------------------

COMPOSITES = ("erf", "custom_grad", "gelu", "gelu_tanh", "sigmoid", "silu", "swiglu", "lora", "rope",
              "repeat_kv", "softmax", "log_softmax", "layer_norm", "rms_norm", "attention", "cross_entropy")


@dataclass(frozen=True)
class OpCase:
    """`fn(B, *inputs)` on a backend vs `ref(*inputs)` in float64 numpy; `diff` are the indices
    of the inputs to differentiate; `composite` names the Backend composite it exercises."""

    name: str
    fn: Callable[..., Array]
    ref: Callable[..., np.ndarray]
    inputs: tuple[np.ndarray, ...]
    diff: tuple[int, ...] = (0,)
    composite: str | None = None


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _np_log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    s = x - x.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def _np_layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * w
    return y if b is None else y + b


def _np_rms_norm(x: np.ndarray, w: np.ndarray, eps: float = RMS_NORM_EPS) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _np_gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _np_silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _np_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (x[i], x[i + hs/2]) by the angle whose cos/sin are given: the half-split layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    return np.repeat(x, n_rep, axis=1)  # kv head j serves query heads j * n_rep ... (j + 1) * n_rep - 1


def _np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                  keep: np.ndarray | None = None) -> np.ndarray:
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    att = _np_softmax(scores)
    return (att if keep is None else att * keep) @ v


def _np_cross_entropy(logits: np.ndarray, targets: np.ndarray,
                      weights: np.ndarray | None = None) -> np.ndarray:
    nll = -np.take_along_axis(_np_log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return nll.mean() if weights is None else (nll * weights).sum() / max(weights.sum(), 1.0)


def op_cases(seed: int = 0) -> list[OpCase]:
    """Every primitive and composite, on small inputs drawn from `seed` (away from kinks and ties)."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    def positive(*shape: int) -> np.ndarray:
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)

    x, a, b = normal(3, 5), normal(3, 5), normal(3, 5)
    cond = rng.random((3, 5)) < 0.5
    table, ids = normal(6, 4), rng.integers(0, 6, (2, 3)).astype(np.int32)
    idx = rng.integers(0, 5, (3, 1)).astype(np.int32)
    q, k, v = normal(1, 2, 4, 3), normal(1, 2, 4, 3), normal(1, 2, 4, 3)
    causal = model.causal_mask(4, 4)
    keep = ((rng.random((1, 2, 4, 4)) >= 0.25) / 0.75).astype(np.float32)
    xn, w, bias = normal(2, 3, 8), (1.0 + 0.1 * normal(8)), 0.1 * normal(8)
    cos, sin = layers.rope_tables(4, 6, 10000.0)
    xr = normal(1, 2, 4, 6)
    pad = layers.padding_mask(np.array([3]), 4)  # (1, 1, 1, 4): the last key is padding
    logits, targets = normal(4, 7), rng.integers(0, 7, (4,)).astype(np.int32)
    weights = np.array([1, 0, 1, 1], dtype=np.float32)
    return [
        OpCase("exp", lambda B, x: B.exp(x), np.exp, (x,)),
        OpCase("log", lambda B, x: B.log(x), np.log, (positive(3, 5),)),
        OpCase("tanh", lambda B, x: B.tanh(x), np.tanh, (x,)),
        OpCase("sqrt", lambda B, x: B.sqrt(x), np.sqrt, (positive(3, 5),)),
        OpCase("rsqrt", lambda B, x: B.rsqrt(x), lambda x: 1.0 / np.sqrt(x), (positive(3, 5),)),
        OpCase("maximum", lambda B, a, b: B.maximum(a, b), np.maximum, (a, b), (0, 1)),
        OpCase("maximum scalar", lambda B, x: B.maximum(x, 0.3), lambda x: np.maximum(x, 0.3), (x,)),
        OpCase("minimum", lambda B, a, b: B.minimum(a, b), np.minimum, (a, b), (0, 1)),
        OpCase("minimum scalar", lambda B, x: B.minimum(x, 0.3), lambda x: np.minimum(x, 0.3), (x,)),
        OpCase("sum all", lambda B, x: B.sum(x), np.sum, (x,)),
        OpCase("sum axis 1 keepdims", lambda B, x: B.sum(x, axis=1, keepdims=True),
               lambda x: x.sum(axis=1, keepdims=True), (x,)),
        OpCase("max all", lambda B, x: B.max(x), np.max, (x,)),
        OpCase("max axis -1", lambda B, x: B.max(x, axis=-1), lambda x: x.max(axis=-1), (x,)),
        OpCase("mean all", lambda B, x: B.mean(x), np.mean, (x,)),
        OpCase("mean axis 0 keepdims", lambda B, x: B.mean(x, axis=0, keepdims=True),
               lambda x: x.mean(axis=0, keepdims=True), (x,)),
        OpCase("reshape", lambda B, x: B.reshape(x, (5, 3)), lambda x: x.reshape(5, 3), (x,)),
        OpCase("transpose", lambda B, x: B.transpose(x, (2, 0, 1)), lambda x: x.transpose(2, 0, 1),
               (normal(2, 3, 4),)),
        OpCase("where", lambda B, c, a, b: B.where(c, a, b), np.where, (cond, a, b), (1, 2)),
        OpCase("take", lambda B, t, i: B.take(t, i), lambda t, i: t[i], (table, ids)),
        OpCase("take_along_axis", lambda B, x, i: B.take_along_axis(x, i, axis=-1),
               lambda x, i: np.take_along_axis(x, i, axis=-1), (x, idx)),
        OpCase("concat", lambda B, a, b: B.concat([a, b], axis=1),
               lambda a, b: np.concatenate([a, b], axis=1), (normal(2, 3), normal(2, 2)), (0, 1)),
        OpCase("matmul", lambda B, a, b: a @ b, np.matmul, (normal(2, 3, 4), normal(4, 5)), (0, 1)),
        OpCase("erf", lambda B, x: B.erf(x), _erf, (rng.uniform(-3, 3, (3, 5)).astype(np.float32),),
               composite="erf"),
        OpCase("custom_grad", lambda B, x: B.custom_grad(B.tanh, lambda t: 1.0 - B.tanh(t) ** 2, x), np.tanh,
               (x,), composite="custom_grad"),
        OpCase("gelu", lambda B, x: B.gelu(x), lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
               (2 * x,), composite="gelu"),
        OpCase("gelu_tanh", lambda B, x: B.gelu_tanh(x), _np_gelu_tanh, (2 * x,), composite="gelu_tanh"),
        OpCase("sigmoid", lambda B, x: B.sigmoid(x), lambda x: 1 / (1 + np.exp(-x)), (4 * x,),
               composite="sigmoid"),
        OpCase("silu", lambda B, x: B.silu(x), _np_silu, (2 * x,), composite="silu"),
        OpCase("swiglu", lambda B, a, b: B.swiglu(a, b), lambda a, b: _np_silu(a) * b, (a, b), (0, 1),
               composite="swiglu"),
        OpCase("lora", lambda B, x, a, b: B.lora(x, a, b, 2.5), lambda x, a, b: (x @ a) @ b * 2.5,
               (normal(2, 3, 4), normal(4, 2), normal(2, 5)), (0, 1, 2), composite="lora"),
        OpCase("rope", lambda B, x, c, s: B.rope(x, c, s), _np_rope, (xr, cos, sin), composite="rope"),
        OpCase("repeat_kv", lambda B, x: B.repeat_kv(x, 2), lambda x: _np_repeat_kv(x, 2), (xr,),
               composite="repeat_kv"),
        OpCase("softmax", lambda B, x: B.softmax(x, axis=-1), _np_softmax, (x,), composite="softmax"),
        OpCase("log_softmax", lambda B, x: B.log_softmax(x, axis=-1), _np_log_softmax, (x,),
               composite="log_softmax"),
        OpCase("layer_norm", lambda B, x, w, b: B.layer_norm(x, w, b), _np_layer_norm, (xn, w, bias),
               (0, 1, 2), composite="layer_norm"),
        OpCase("layer_norm no bias", lambda B, x, w: B.layer_norm(x, w, None),
               lambda x, w: _np_layer_norm(x, w, None), (xn, w), (0, 1), composite="layer_norm"),
        OpCase("rms_norm", lambda B, x, w: B.rms_norm(x, w), _np_rms_norm, (xn, w), (0, 1),
               composite="rms_norm"),
        OpCase("attention padding", lambda B, q, k, v, m: B.attention(q, k, v, m), _np_attention,
               (q, k, v, pad), (0, 1, 2), composite="attention"),
        OpCase("attention causal", lambda B, q, k, v, m: B.attention(q, k, v, m), _np_attention,
               (q, k, v, causal), (0, 1, 2), composite="attention"),
        OpCase("attention no mask", lambda B, q, k, v: B.attention(q, k, v, None),
               lambda q, k, v: _np_attention(q, k, v, None), (q, k, v), (0, 1, 2), composite="attention"),
        OpCase("attention dropout", lambda B, q, k, v, m, d: B.attention(q, k, v, m, d), _np_attention,
               (q, k, v, causal, keep), (0, 1, 2), composite="attention"),
        OpCase("cross_entropy", lambda B, x, t: B.cross_entropy(x, t), _np_cross_entropy, (logits, targets),
               composite="cross_entropy"),
        OpCase("cross_entropy weighted", lambda B, x, t, w: B.cross_entropy(x, t, w), _np_cross_entropy,
               (logits, targets, weights), composite="cross_entropy"),
    ]


def _grad_weights(case: OpCase) -> np.ndarray:
    """Fixed random weights w for the scalar sum(f(x) * w), so every output element matters."""
    out = case.ref(*(a.astype(np.float64) if a.dtype.kind == "f" else a for a in case.inputs))
    return np.random.default_rng(len(case.name)).standard_normal(np.shape(out)).astype(np.float32)


def op_outputs(B: Backend, case: OpCase, w: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Forward output and (if B has autograd) d sum(f(x) * w) / dx for each differentiated input."""
    args = [B.from_numpy(a) for a in case.inputs]
    if not B.supports_grad:
        y = case.fn(B, *args)
        return B.to_numpy(y), None
    outputs: list[Array] = []

    def objective(params: dict[str, Array]) -> Array:
        full = list(args)
        for i in case.diff:
            full[i] = params[f"x{i}"]
        y = case.fn(B, *full)
        outputs.append(y)  # the forward value, realised in the same graph as the gradient
        return B.sum(y * B.from_numpy(w))

    value, grads = B.value_and_grad(objective)({f"x{i}": args[i] for i in case.diff})
    B.sync(outputs[-1], value, *grads.values())
    return B.to_numpy(outputs[-1]), [B.to_numpy(grads[f"x{i}"]) for i in case.diff]


def fd_grads(case: OpCase, w: np.ndarray, h: float = 1e-6) -> list[np.ndarray]:
    """float64 central finite differences of sum(ref(x) * w) for each differentiated input."""
    base = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in case.inputs]
    w64 = w.astype(np.float64)
    grads = []
    for i in case.diff:
        g = np.zeros_like(base[i])
        for j in np.ndindex(base[i].shape):
            vals = []
            for sign in (1.0, -1.0):
                args = list(base)
                args[i] = base[i].copy()
                args[i][j] += sign * h
                vals.append(float(np.sum(case.ref(*args) * w64)))
            g[j] = (vals[0] - vals[1]) / (2 * h)
        grads.append(g)
    return grads


def _float_dtype(B: Backend) -> np.dtype:
    """The dtype B hands back for float32 input (float64 for the numpy reference backend)."""
    return np.dtype(getattr(B, "dtype", np.float32))


def check_op(B: Backend, case: OpCase, *, reference: Backend | None = None, group: str | None = None,
             fwd_tol: Tolerance = FORWARD_TOL, grad_tol: Tolerance = GRAD_TOL) -> list[Check]:
    """Forward and gradient of `case` on B against float64 numpy (or against `reference`, another
    backend running the same case), with separate tolerances; shapes and dtypes exact."""
    group = group or f"{B.name} ops"
    w = _grad_weights(case)
    y, grads = op_outputs(B, case, w)
    if reference is None:
        want_y = case.ref(*(a.astype(np.float64) if a.dtype.kind == "f" else a for a in case.inputs))
        want_grads = fd_grads(case, w) if grads is not None else None
    else:
        want_y, want_grads = op_outputs(reference, case, w)
    dtype = _float_dtype(B)
    checks = [compare(group, f"{case.name} forward", y, want_y, fwd_tol, dtype=dtype)]
    for i, g, want in zip(case.diff, grads or [], want_grads or [], strict=False):
        checks.append(compare(group, f"{case.name} grad x{i}", g, want, grad_tol, dtype=dtype))
    return checks


class _ReferenceComposites:
    """Mixin restoring the base-class reference bodies of every composite."""

    locals().update({name: getattr(Backend, name) for name in COMPOSITES})


def with_mixin(B: Backend, mixin: type, tag: str) -> Backend:
    """A copy of B whose class is a subclass of B's with `mixin`'s methods taking precedence."""
    clone = copy.copy(B)
    clone.__class__ = type(f"{type(B).__name__}{tag}", (mixin, type(B)), {})
    return clone


def overridden_composites(B: Backend) -> list[str]:
    return [name for name in COMPOSITES if getattr(type(B), name) is not getattr(Backend, name)]


def override_checks(B: Backend, seed: int = 0, group: str | None = None) -> list[Check]:
    """Each composite B overrides (e.g. MLX's fused kernels) against the reference body in
    core/backend.py run on B's own primitives."""
    names = overridden_composites(B)
    reference = with_mixin(B, _ReferenceComposites, "Reference")
    checks: list[Check] = []
    for case in op_cases(seed):
        if case.composite in names:
            checks += check_op(B, case, reference=reference, group=group or f"{B.name} fused vs reference")
    return checks


def primitive_checks(B: Backend, seed: int = 0, group: str | None = None) -> list[Check]:
    return [c for case in op_cases(seed) for c in check_op(B, case, group=group)]


# ---- negative controls ------------------------------------------------------------------------

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


class TanhGate:
    """LSTM gates squashed by tanh instead of the sigmoid: gates in (-1, 1) instead of (0, 1)."""

    def sigmoid(self: Any, x: Array) -> Array:
        return self.tanh(x)


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
                  dropout: Array | None = None) -> Array:
        if mask is not None and len(mask.shape) == 4:
            mask = None
        return super().attention(q, k, v, mask, dropout)  # type: ignore[misc]


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
    Control("lstm-tanh-gate", "LSTM gates through tanh instead of the sigmoid", mixin=TanhGate,
            applies=lambda c: c.arch == "lstm"),
)


def control_named(name: str) -> Control:
    return next(c for c in CONTROLS if c.name == name)


@dataclass(frozen=True)
class Side:
    """One participant in a comparison: a backend plus the (possibly injected) settings."""

    label: str
    backend: Backend
    mask_fn: Callable[[int, int], np.ndarray] = model.causal_mask
    bias_correction: bool = True

    @classmethod
    def clean(cls, B: Backend) -> Side:
        return cls(B.name, B)

    @classmethod
    def injected(cls, B: Backend, control: Control) -> Side:
        backend = with_mixin(B, control.mixin, control.name.title().replace("-", "")) if control.mixin else B
        return cls(f"{B.name}+{control.name}", backend, control.mask_fn, control.bias_correction)


# ---- whole model --------------------------------------------------------------------------------

Batch = dict[str, np.ndarray]


def parity_batch(cfg: ModelConfig, rng: np.random.Generator, batch: int, t: int) -> Batch:
    """Random tokens: {"x", "y"} next tokens for a decoder; for an encoder, targets at ~30% of the
    real positions ("w") and rows of different lengths with the rest padding ("mask")."""
    seq = rng.integers(0, cfg.vocab_size, (batch, t + 1)).astype(np.int32)
    out = {"x": seq[:, :-1], "y": seq[:, 1:]}
    if cfg.kind == "encoder":
        lengths = rng.integers(max(1, t // 2), t + 1, batch)
        lengths[0] = t
        real = np.arange(t)[None, :] < lengths[:, None]
        w = (rng.random((batch, t)) < 0.3) & real
        w[:, 0] = True
        out |= {"w": w.astype(np.float32), "mask": layers.padding_mask(lengths, t)}
    return out


def _on(B: Backend, batch: Batch) -> dict[str, Array]:
    return {k: B.from_numpy(v) for k, v in batch.items()}


def side_logits(side: Side, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
                drop: dict[str, Array] | None = None) -> Array:
    """LM logits the way training computes them: causal (with the side's mask) or over padding."""
    if cfg.kind == "decoder":
        return model.logits(side.backend, cfg, p, batch["x"], dropout=drop, mask_fn=side.mask_fn)
    return model.logits(side.backend, cfg, p, batch["x"], dropout=drop, mask=batch["mask"])


def side_loss(side: Side, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
              drop: dict[str, Array] | None = None) -> Array:
    return side.backend.cross_entropy(side_logits(side, cfg, p, batch, drop), batch["y"], batch.get("w"))


@dataclass
class ModelRun:
    logits: np.ndarray
    loss: np.ndarray
    grads: dict[str, np.ndarray] | None


def model_run(side: Side, cfg: ModelConfig, params: dict[str, np.ndarray], batch: Batch) -> ModelRun:
    """Logits, loss and (where there is autograd) every parameter gradient, in one graph."""
    B = side.backend
    p = {k: B.from_numpy(v) for k, v in params.items()}
    captured: list[Array] = []

    def loss_fn(p: dict[str, Array], b: dict[str, Array]) -> Array:
        lg = side_logits(side, cfg, p, b)
        captured.append(lg)
        return B.cross_entropy(lg, b["y"], b.get("w"))

    arrays = _on(B, batch)
    grads: dict[str, Array] = {}
    if B.supports_grad:
        spec = model.param_spec(cfg)
        trainable = {k: v for k, v in p.items() if spec[k].trainable}
        loss, grads = B.value_and_grad(lambda t, b: loss_fn({**p, **t}, b))(trainable, arrays)
    else:
        loss = loss_fn(p, arrays)
    B.sync(captured[-1], loss, *grads.values())
    return ModelRun(B.to_numpy(captured[-1]), B.to_numpy(loss),
                    {k: B.to_numpy(g) for k, g in grads.items()} if B.supports_grad else None)


def unit_scale_params(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Weights with unit-variance activations (`spec.unit_scale_params`). At GPT-2 init the GELU inputs
    are ~0.1, where the erf and tanh forms agree to 1e-7, so the model is also compared here, where
    activations reach the nonlinearities' curved region."""
    return SP.unit_scale_params(model.param_spec(cfg), seed)


def compare_model(group: str, got: ModelRun, want: ModelRun) -> list[Check]:
    f32 = np.float32
    checks = [compare(group, "logits", got.logits, want.logits, LOGITS_TOL, dtype=f32),
              compare(group, "loss", got.loss, want.loss, LOSS_TOL, dtype=f32)]
    if got.grads is not None and want.grads is not None:
        checks += [compare(group, f"grad {k}", g, want.grads[k], MODEL_GRAD_TOL, dtype=f32)
                   for k, g in got.grads.items()]
    return checks


def leakage_checks(side: Side, cfg: ModelConfig, params: dict[str, np.ndarray], batch: Batch,
                   seed: int = 0) -> list[Check]:
    """Decoders: changing tokens after position t must leave logits at positions <= t exactly unchanged.
    Encoders: changing padded tokens must leave the logits of every real position exactly unchanged."""
    B = side.backend
    p = {k: B.from_numpy(v) for k, v in params.items()}

    def logits_of(x: np.ndarray) -> np.ndarray:
        return B.to_numpy(side_logits(side, cfg, p, _on(B, {**batch, "x": x})))

    x = batch["x"]
    base = logits_of(x)
    rng = np.random.default_rng(seed)
    checks = []
    if cfg.kind == "encoder":
        real = batch["mask"][:, 0, 0, :]
        changed = np.where(real, x, (x + rng.integers(1, cfg.vocab_size, x.shape)) % cfg.vocab_size)
        got = logits_of(changed.astype(np.int32))
        return [compare(f"{suite_name(cfg)} padding {side.label}",
                        "logits of real positions with padded tokens "
                        "changed", got[real], base[real], LEAK_TOL)]
    t_len = x.shape[1]
    for t in sorted({0, t_len // 2, t_len - 2}):
        changed = x.copy()
        shift = rng.integers(1, cfg.vocab_size, x[:, t + 1:].shape)  # every later token really changes
        changed[:, t + 1:] = (x[:, t + 1:] + shift) % cfg.vocab_size
        checks.append(compare(f"{suite_name(cfg)} causal {side.label}",
                              f"logits[:, :{t + 1}] with tokens {t + 1}.. changed",
                              logits_of(changed)[:, :t + 1], base[:, :t + 1], LEAK_TOL))
    return checks


# ---- training -----------------------------------------------------------------------------------

@dataclass
class TrainRun:
    losses: np.ndarray
    params: dict[str, np.ndarray]


def train_opt(steps: int) -> optim.AdamWConfig:
    """Warm up in 2 steps and decay over the run, so every step moves the weights visibly."""
    return optim.AdamWConfig(lr=1e-3, min_lr=1e-4, warmup=2, max_iters=max(steps, 3))


def train_batches(cfg: ModelConfig, batch: int, t: int, steps: int, seed: int) -> list[Batch]:
    rng = np.random.default_rng([seed, 1])
    return [parity_batch(cfg, rng, batch, t) for _ in range(steps)]


def train_run(side: Side, cfg: ModelConfig, params: dict[str, np.ndarray], batches: Sequence[Batch],
              opt: optim.AdamWConfig, seed: int) -> TrainRun:
    """N AdamW steps through `make_train_step` + `B.compile_step`, exactly as the trainer runs them;
    dropout masks from `core.dropout.masks`, so both sides drop the same units."""
    B = side.backend
    spec = model.param_spec(cfg)
    state = {k: B.from_numpy(v) for k, v in step.init_state(params, spec).items()}
    loss_fn = lambda p, b, drop: side_loss(side, cfg, p, b, drop)  # noqa: E731
    train_step = B.compile_step(step.make_train_step(B, spec, opt, loss_fn), state)
    losses = [step.drive(B, train_step, cfg, opt, batch, it, seed, bias_correction=side.bias_correction)[0]
              for it, batch in enumerate(batches)]
    return TrainRun(np.array(losses, dtype=np.float32),
                    {k: B.to_numpy(v) for k, v in step.params_of(train_step.state).items()})


def compare_train(group: str, got: TrainRun, want: TrainRun) -> list[Check]:
    f32 = np.float32
    n = len(want.losses)
    checks = [compare(group, f"loss at step {i + 1}", got.losses[i], want.losses[i], TRAIN_LOSS_TOL,
                      dtype=f32) for i in range(n)]
    checks += [compare(group, f"{k} after {n} steps", v, want.params[k], TRAIN_PARAM_TOL, dtype=f32)
               for k, v in got.params.items()]
    return checks


# ---- float64 finite differences of the core graph -----------------------------------------------

def fd_gradient_checks(B: Backend, cfg: ModelConfig, params: dict[str, np.ndarray], batch: Batch,
                       seed: int = 0) -> list[Check]:
    """In float64: for each trainable parameter tensor, the directional derivative g . d along a random
    unit direction d in that tensor against (L(p + h d) - L(p - h d)) / 2h; and the loss against the
    float64 numpy reference backend."""
    from twinlm.backends.numpy_ref import NumpyBackend

    side, spec = Side.clean(B), model.param_spec(cfg)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    arrays = _on(B, batch)

    def loss_at(values: dict[str, np.ndarray]) -> float:
        p = {k: B.from_numpy(v) for k, v in values.items()}
        return float(B.to_numpy(side_loss(side, cfg, p, arrays)))

    frozen = {k: B.from_numpy(v) for k, v in p64.items() if not spec[k].trainable}
    value_and_grad = B.value_and_grad(lambda p, b: side_loss(side, cfg, {**frozen, **p}, b))
    loss, grads = value_and_grad({k: B.from_numpy(v) for k, v in p64.items() if spec[k].trainable}, arrays)
    B.sync(loss, *grads.values())
    group = f"{suite_name(cfg)} {B.name} float64 finite differences"
    ref = NumpyBackend()
    ref_loss = side_loss(Side.clean(ref), cfg, p64, _on(ref, batch))
    checks = [compare(group, "loss vs numpy float64", B.to_numpy(loss), ref_loss, FLOAT64_LOSS_TOL)]
    rng = np.random.default_rng(seed)
    for name in grads:
        value = p64[name]
        d = rng.standard_normal(value.shape)
        d /= np.linalg.norm(d)
        analytic = float(np.sum(B.to_numpy(grads[name]) * d))
        plus, minus = dict(p64), dict(p64)
        plus[name], minus[name] = value + FD64_STEP * d, value - FD64_STEP * d
        numeric = (loss_at(plus) - loss_at(minus)) / (2 * FD64_STEP)
        checks.append(compare(group, f"grad {name} . d", np.float64(analytic), np.float64(numeric), FD64_TOL))
    return checks


# ---- the suite ----------------------------------------------------------------------------------

PHASES = ("primitives", "fused", "model", "causal", "train", "float64")
ARCHS = ("gpt", "llama", "bert", "lora", "lstm", "rnn")  # "lora": GPT with LoRA adapters on every block layer
# The recurrent baselines unroll their window in the graph, and tinygrad compiles every unrolled step's
# kernels (minutes for 16 steps here): 4 steps check the recurrence (state carried across 3 transitions,
# every gradient through it) and keep the suite's growth small.
RECURRENT_BLOCK = 4


def suite_name(cfg: ModelConfig) -> str:
    return f"{cfg.arch}+lora" if cfg.lora_rank else cfg.arch


def arch_config(arch: str, preset_name: str = "small", vocab_size: int = 65) -> ModelConfig:
    """The parity suite's model of each family: Llama with grouped-query attention (half the heads
    as kv heads) and an untied head, so every option's code path runs; "lora" is GPT with rank-4
    adapters (scale 2, dropout 0.1 on their input) on the frozen weights."""
    if arch == "lora":
        gpt = arch_config("gpt", preset_name, vocab_size)
        return gpt.replace(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
    extra: dict[str, Any] = {}
    if arch == "llama":  # at least 2 kv heads of 2 queries each, so a wrong head mapping shows
        n_head = max(4, preset(preset_name, vocab_size=vocab_size).n_head)
        extra = dict(n_head=n_head, n_kv_head=n_head // 2, tie_embeddings=False)
    if arch in ("lstm", "rnn"):
        extra = dict(block_size=min(RECURRENT_BLOCK, preset(preset_name).block_size))
    return preset(preset_name, vocab_size=vocab_size, arch=arch, **extra)


class Suite:
    """The whole parity suite over `backends`, caching each side's results so that negative
    controls re-run only the injected side."""

    def __init__(self, backends: Sequence[Backend], cfg: ModelConfig, *, steps: int = 10, seed: int = 0,
                 dropout: float = 0.1, batch: int = 4, fd_cfg: ModelConfig | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        # Sides with autograd first, so the float64 numpy reference is always the `want` side.
        self.backends = sorted(backends, key=lambda B: not B.supports_grad)
        self.cfg, self.steps, self.seed, self.dropout, self.batch = cfg, steps, seed, dropout, batch
        self.fd_cfg = fd_cfg or arch_config("lora" if cfg.lora_rank else cfg.arch, "tiny", cfg.vocab_size)
        self.progress = progress or (lambda msg: None)
        self.params = init_params(cfg, seed)
        self.data = parity_batch(cfg, np.random.default_rng([seed, 0]), batch, cfg.block_size)
        self._cache: dict[tuple[str, str], Any] = {}

    def controls(self) -> list[Control]:
        """The negative controls that touch a piece of this suite's model."""
        return [c for c in CONTROLS if c.applies(self.cfg)]

    def _cached(self, side: Side, what: str, compute: Callable[[], Any]) -> Any:
        key = (side.label, what)
        if key not in self._cache:
            self.progress(f"{suite_name(self.cfg)} {what}: {side.label}")
            self._cache[key] = compute()
        return self._cache[key]

    def _train_configs(self) -> list[float]:
        return [0.0] + ([self.dropout] if self.dropout > 0 else [])

    def run(self, control: Control | None = None, phases: Sequence[str] = PHASES) -> Report:
        """Clean run: every side against every other. With `control`: the control is injected
        into the first backend with autograd, which is compared against every clean side."""
        report = Report()
        clean = [Side.clean(B) for B in self.backends]
        if control is None:
            sides, pairs = clean, [(a, b) for i, a in enumerate(clean) for b in clean[i + 1:]]
        else:
            target = next((B for B in self.backends if B.supports_grad), None)
            if target is None:
                raise ValueError("negative controls need a backend with autograd (mlx or tinygrad)")
            injected = Side.injected(target, control)
            sides, pairs = [injected], [(injected, other) for other in clean]
        for phase in phases:
            getattr(self, f"_phase_{phase}")(sides, pairs, control, report)
        return report

    def _phase_primitives(self, sides: list[Side], pairs: list, control: Control | None,
                          report: Report) -> None:
        for side in sides:
            report.extend(self._cached(side, "primitives", lambda s=side: primitive_checks(
                s.backend, self.seed, f"ops {s.label} vs numpy float64")))

    def _phase_fused(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        for side in sides:
            report.extend(self._cached(side, "fused overrides", lambda s=side: override_checks(
                s.backend, self.seed, f"fused {s.label} vs reference body")))

    def _phase_model(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        weight_sets = {"init": self.params, "unit-scale": unit_scale_params(self.cfg, self.seed)}
        for weights, params in weight_sets.items():
            for a, b in pairs:
                runs = [self._cached(s, f"model ({weights} weights)", lambda s=s, p=params: model_run(
                    s, self.cfg, p, self.data)) for s in (a, b)]
                group = f"{suite_name(self.cfg)} model ({weights} weights) {a.label} vs {b.label}"
                report.extend(compare_model(group, *runs))

    def _phase_causal(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        for side in sides:
            report.extend(self._cached(side, "causal", lambda s=side: leakage_checks(
                s, self.cfg, self.params, self.data, self.seed)))

    def _phase_train(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        opt = train_opt(self.steps)
        trainable = [(a, b) for a, b in pairs if a.backend.supports_grad and b.backend.supports_grad]
        if not trainable:
            report.notes.append("train: skipped (needs two backends with autograd)")
        for p in self._train_configs():
            cfg = self.cfg.replace(dropout=p)
            batches = train_batches(cfg, self.batch, cfg.block_size, self.steps, self.seed)
            for a, b in trainable:
                runs = [self._cached(s, f"train dropout {p:g}", lambda s=s, c=cfg, data=batches: train_run(
                    s, c, self.params, data, opt, self.seed)) for s in (a, b)]
                group = f"{suite_name(self.cfg)} train dropout {p:g} {a.label} vs {b.label}"
                report.extend(compare_train(group, *runs))

    def _phase_float64(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        if control is not None:
            return  # self-consistency of fwd and grad: an injected maths change is consistent in both
        capable = [s for s in sides if s.backend.supports_float64 and s.backend.supports_grad]
        if not capable:
            report.notes.append("float64: skipped (no backend here supports float64 autograd)")
        for s in sides:  # say which device lacks it (tinygrad on Metal, OpenCL without cl_khr_fp64)
            if s.backend.supports_grad and not s.backend.supports_float64 and s.backend.name != "mlx":
                report.notes.append(f"float64: skipped for {s.label} (device "
                                    f"{s.backend.device_info()['device']} has no float64)")
        params = init_params(self.fd_cfg, self.seed)
        batch = parity_batch(self.fd_cfg, np.random.default_rng([self.seed, 2]), 2, 8)
        for side in capable:
            report.extend(self._cached(side, "float64 finite differences", lambda s=side: fd_gradient_checks(
                s.backend, self.fd_cfg, params, batch, self.seed)))
