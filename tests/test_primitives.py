"""Every primitive and composite of every backend against float64 numpy, forward and gradient
(`twinlm.parity.check_op`), fused overrides against the reference bodies, and the helper's own
ability to fail."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import ALL_BACKENDS, backend_or_skip

from twinlm import parity
from twinlm.core.backend import Backend

CASES = {case.name: case for case in parity.op_cases(seed=0)}
REQUIRED = {"exp", "log", "tanh", "sqrt", "rsqrt", "maximum", "minimum", "sum all", "max all", "mean all",
            "reshape", "transpose", "where", "take", "take_along_axis", "concat", "erf", "gelu", "softmax",
            "log_softmax", "layer_norm", "attention causal", "cross_entropy"}


def test_every_primitive_and_composite_has_a_case() -> None:
    assert REQUIRED <= set(CASES)
    assert {c.composite for c in CASES.values() if c.composite} == set(parity.COMPOSITES)


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_op_matches_numpy(backend_name: str, case_name: str) -> None:
    B = backend_or_skip(backend_name)
    checks = parity.check_op(B, CASES[case_name])
    expected = 1 + (len(CASES[case_name].diff) if B.supports_grad else 0)
    assert len(checks) == expected
    failed = [f"{c.label}: {c.max_abs:.3g} > {c.tol} {c.note}" for c in checks if not c.ok]
    assert not failed, failed


def test_mlx_fused_overrides_match_reference_bodies() -> None:
    B = backend_or_skip("mlx")
    assert {"layer_norm", "attention", "custom_grad"} <= set(parity.overridden_composites(B))
    checks = parity.override_checks(B)
    names = {c.name for c in checks}
    assert {"layer_norm forward", "layer_norm grad x1", "attention causal forward",
            "attention causal grad x2", "custom_grad grad x0"} <= names
    assert all(c.ok for c in checks), [c.label for c in checks if not c.ok]
    # MLXBackend(fused=False) is the reference path: it matches the fused one too.
    reference = type(B)(fused=False)
    for name in ("layer_norm", "attention causal", "attention no mask"):
        assert all(c.ok for c in parity.check_op(B, CASES[name], reference=reference))


def test_reference_mixin_restores_base_composites() -> None:
    B = backend_or_skip("mlx")
    reference = parity.with_mixin(B, parity._ReferenceComposites, "Reference")
    assert parity.overridden_composites(reference) == []
    assert reference.name == "mlx" and isinstance(reference, type(B))


class _ExpWithoutGradient:
    """Right forward, zero gradient: the gradient half of check_op must catch it."""

    def exp(self, x):
        return super().exp(self.stop_gradient(x))


class _GeluGradWithoutPdf:
    """Right forward, gradient Phi(x) without the x phi(x) term."""

    def _gelu_grad(self, x):
        return 0.5 * (1.0 + self.erf(x * (1.0 / math.sqrt(2.0))))


@pytest.mark.parametrize("backend_name", ("mlx", "tinygrad"))
def test_custom_grad_uses_the_given_derivative(backend_name: str) -> None:
    """GELU's gradient comes from `_gelu_grad`, not autodiff: a wrong derivative is caught, both by
    the custom-VJP override (MLX) and by the stop-gradient reference body (tinygrad)."""
    B = backend_or_skip(backend_name)
    broken = parity.with_mixin(B, _GeluGradWithoutPdf, "NoPdf")
    checks = {c.name: c.ok for c in parity.check_op(broken, CASES["gelu"])}
    assert checks == {"gelu forward": True, "gelu grad x0": False}


@pytest.mark.parametrize("backend_name", ("mlx", "numpy"))
def test_check_op_catches_injected_bugs(backend_name: str) -> None:
    B = backend_or_skip(backend_name)
    tanh_gelu = parity.with_mixin(B, parity.TanhGelu, "TanhGelu")
    failed = {c.name for c in parity.check_op(tanh_gelu, CASES["gelu"]) if not c.ok}
    assert "gelu forward" in failed
    if B.supports_grad:
        broken = parity.with_mixin(B, _ExpWithoutGradient, "NoGrad")
        exp_checks = {c.name: c.ok for c in parity.check_op(broken, CASES["exp"])}
        assert exp_checks == {"exp forward": True, "exp grad x0": False}
        # The fused-vs-reference check sees the tanh GELU as an override that disagrees.
        assert not all(c.ok for c in parity.override_checks(tanh_gelu) if c.name.startswith("gelu"))


def test_compare_rules() -> None:
    tol = parity.Tolerance(1e-3, 1e-2)
    ok = parity.compare("g", "t", np.float32([1.0, 2.0]), np.float64([1.005, 2.0]), tol, dtype=np.float32)
    assert ok.ok and ok.max_abs == pytest.approx(0.005, rel=1e-4)
    assert ok.margin == pytest.approx(0.005 / (1e-3 + 1e-2 * 1.005), rel=1e-4)
    assert not parity.compare("g", "t", np.float32([1.0, 2.0]), np.float64([1.02, 2.0]), tol).ok
    assert "dtype" in parity.compare("g", "t", np.float64([1.0]), np.float32([1.0]), tol).note
    shape = parity.compare("g", "t", np.zeros((2, 3)), np.zeros((3, 2)), tol)
    assert not shape.ok and "shape" in shape.note and shape.margin == math.inf
    assert parity.compare("g", "t", np.array([-np.inf, 1.0]), np.array([-np.inf, 1.0]), tol).ok
    assert not parity.compare("g", "t", np.array([np.nan]), np.array([1.0]), tol).ok
    assert not parity.compare("g", "t", np.array([np.inf]), np.array([-np.inf]), tol).ok
    exact = parity.Tolerance(0.0, 0.0)
    assert parity.compare("g", "t", np.ones(3), np.ones(3), exact).ok
    assert not parity.compare("g", "t", np.ones(3), np.ones(3) + 1e-12, exact).ok


def test_backend_protocol_is_complete() -> None:
    # Every primitive the base class declares is implemented by every available backend.
    primitives = [n for n, f in vars(Backend).items() if callable(f) and not n.startswith("_")
                  and n not in parity.COMPOSITES and n not in ("value_and_grad", "compile_step", "sync")
                  and n not in ("from_numpy_rows", "world", "all_sum")  # defaults: one device, one rank
                  and n != "checkpoint"  # default: no recomputation (an adapter may offer it: can_remat)
                  and n != "drop_cached_buffers"  # default: a no-op (an adapter may drop its cache)
                  and n != "like"]  # built on dtype_name and astype
    for name in ALL_BACKENDS:
        B = backend_or_skip(name)
        missing = [p for p in primitives if getattr(type(B), p) is getattr(Backend, p)]
        assert not missing, f"{name} lacks {missing}"
