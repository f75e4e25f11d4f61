"""x @ W.T over a (N, K) bfloat16 / float16 / float32 weight (`K.matmul_t_lowp`, the tied head `h @ wte.T`,
issue #21): the forward against float64 numpy on every vector path this CPU has (portable, AVX2+F16C,
AVX-512), through the dot-product GEMV (M <= 16: groups of 1-4 rows of x, blocks of 4 rows of W and the odd
ones) and the widen-and-sgemm rows, odd K (the vector tail); its VJP (dx, dw) against MLX's float32 autodiff;
the Backend primitive `matmul_t`'s MLX override against its reference body `x @ transpose(w)` (and numpy's);
wrong decodings and a mixed-up row index caught by the same checks; clear errors for what the kernel does not
serve; TWINLM_KERNELS=0."""

from __future__ import annotations

import numpy as np
import pytest

from twinlm.backends import kernels

mx = pytest.importorskip("mlx.core")
from twinlm.backends import mlx as _mlx_backend  # noqa: E402  (the system BLAS before the kernels run)

K = kernels.load()
needs_t = pytest.mark.skipif(K is None or not hasattr(K, "matmul_t_lowp"),
                             reason=f"kernels without matmul_t_lowp: {kernels.status().reason}")
CPU_ISA = K._lowp_isa() if K is not None and hasattr(K, "_lowp_isa") else 0
ISAS = list(range(CPU_ISA + 1))
DTYPES = ("bfloat16", "float16")
WDTYPES = (*DTYPES, "float32")  # the kernel's weights (float32: the GEMV at a few rows, one sgemm beyond)
KI, NO = 70, 77  # K not a multiple of 8 or 16 (the tail); N = 19 blocks of 4 rows + 1
ATOL = 1e-4  # float32 sums of 70 products of magnitude ~1: a wrong decoding or row is off by ~1 or more


@pytest.fixture
def isa():
    yield
    K._lowp_isa(CPU_ISA)


def data(m, k, n, dtype, seed=0):
    """x (m, k) float32 and w (n, k) in `dtype`, and both as float64 numpy of the values the kernel sees."""
    rng = np.random.default_rng(seed + m + k + n)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32)).astype(getattr(mx, dtype))
    return x, w, [np.array(a.astype(mx.float32), dtype=np.float64) for a in (x, w)]


def error(y, x64, w64):
    return float(np.abs(np.array(y.astype(mx.float32), dtype=np.float64) - x64 @ w64.T).max())


@needs_t
@pytest.mark.parametrize("dtype", WDTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 17, 40])  # 1-16: the GEMV in groups of rows; 17+: sgemm
@pytest.mark.parametrize("level", ISAS)
def test_forward_against_float64(dtype, m, level, isa) -> None:
    assert K._lowp_isa(level) == level
    x, w, (x64, w64) = data(m, KI, NO, dtype)
    y = K.matmul_t_lowp(x, w)
    assert y.dtype == mx.float32 and y.shape == (m, NO)
    assert error(y, x64, w64) < ATOL
    # negative controls, through the same check: bf16 widened from the low half / f16 read as bf16, and
    # each row of W read at its neighbour's offset (a transposed or shifted index)
    if dtype != "float32":
        assert error(K._matmul_t_lowp_faulty(x, w, 1 if dtype == "bfloat16" else 2), x64, w64) > 100 * ATOL
    assert error(K._matmul_t_lowp_faulty(x, w, 4), x64, w64) > 100 * ATOL


@needs_t
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 24])
def test_low_precision_x_leading_axes_and_threads(dtype, m) -> None:
    """x (2, m, K) in the weight's dtype: the result in that dtype, within an ulp of the rounded float32
    product; 1-3 threads give the same bits."""
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(m)
    x = mx.array(rng.standard_normal((2, m, 130)).astype(np.float32)).astype(dt)
    w = mx.array(rng.standard_normal((301, 130)).astype(np.float32)).astype(dt)
    before, runs = K.threads(), []
    try:
        for n in (1, 2, 3):
            K.set_threads(n)
            runs.append(K.matmul_t_lowp(x, w))
    finally:
        K.set_threads(before)
    want = (x.astype(mx.float32) @ w.astype(mx.float32).T).astype(dt).astype(mx.float32)
    ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    for r in runs:
        assert r.dtype == dt and r.shape == (2, m, 301)
        np.testing.assert_allclose(np.array(r.astype(mx.float32)), np.array(want), rtol=ulp, atol=1e-4)
        np.testing.assert_array_equal(np.array(r.astype(mx.float32)), np.array(runs[0].astype(mx.float32)))


def grads(fn, x, w, r):
    g = mx.grad(lambda x, w: mx.sum(fn(x, w).astype(mx.float32) * r), argnums=(0, 1))(x, w)
    return [(np.array(a.astype(mx.float32), dtype=np.float64), a.dtype) for a in g]


@needs_t
@pytest.mark.parametrize("dtype", WDTYPES)
@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("level", ISAS)
def test_vjp_against_mlx_autodiff(dtype, m, level, isa) -> None:
    """dx = g W and dw = g^T x (full fine-tuning trains a tied embedding): against MLX's float32 autodiff of
    x @ W.T on the same rounded weight; dw rounded once to the weight's dtype."""
    K._lowp_isa(level)
    dt = getattr(mx, dtype)
    x, w, _ = data(m, KI, NO, dtype)
    r = mx.array(np.random.default_rng(7).standard_normal((m, NO)).astype(np.float32))
    want = grads(lambda x, w: x @ w.T, x, w.astype(mx.float32), r)
    got = grads(K.matmul_t_lowp, x, w, r)
    assert [d for _, d in got] == [mx.float32, dt]
    np.testing.assert_allclose(got[0][0], want[0][0], atol=ATOL, rtol=1e-5)
    ulp = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 1e-5}[dtype]
    np.testing.assert_allclose(got[1][0], want[1][0], atol=ATOL, rtol=ulp)
    # negative control: the mixed-up row index reaches both gradients
    bad = grads(lambda x, w: K._matmul_t_lowp_faulty(x, w, 4), x, w, r)
    assert np.abs(bad[0][0] - want[0][0]).max() > 100 * ATOL
    # dw alone (x frozen) and dx alone (a frozen embedding under LoRA)
    dw = mx.grad(lambda w: mx.sum(K.matmul_t_lowp(x, w) * r))(w)
    np.testing.assert_allclose(np.array(dw.astype(mx.float32)), got[1][0], atol=1e-6)
    dx = mx.grad(lambda x: mx.sum(K.matmul_t_lowp(x, w) * r))(x)
    np.testing.assert_allclose(np.array(dx), got[0][0], atol=1e-6)


@needs_t
def test_compile_and_empty_sizes() -> None:
    x, w, (x64, w64) = data(2, KI, NO, "bfloat16")
    assert error(mx.compile(K.matmul_t_lowp)(x, w), x64, w64) < ATOL
    zero_k = K.matmul_t_lowp(mx.zeros((3, 0)), mx.zeros((5, 0), dtype=mx.bfloat16))
    np.testing.assert_array_equal(np.array(zero_k), np.zeros((3, 5)))
    assert K.matmul_t_lowp(mx.zeros((0, 4)), mx.zeros((5, 4), dtype=mx.float16)).shape == (0, 5)


@needs_t
@pytest.mark.parametrize("args,match", [
    (lambda: (mx.zeros((2, 4)), mx.zeros((3, 4), dtype=mx.int32)),
     "bfloat16, float16 or float32, not another"),
    (lambda: (mx.zeros((2, 4), dtype=mx.bfloat16), mx.zeros((3, 4))),
     "x must be float32 or the weight's dtype"),
    (lambda: (mx.zeros((2, 4), dtype=mx.float16), mx.zeros((3, 4), dtype=mx.bfloat16)),
     "x must be float32 or the weight's dtype"),
    (lambda: (mx.zeros((2, 4)), mx.zeros((4, 3), dtype=mx.bfloat16)), r"x \(..., K\) and weight \(N, K\)"),
])
def test_bad_input_is_a_clear_error(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        K.matmul_t_lowp(*args())


# ---- the Backend primitive: MLX's override against the reference body ------------------------------------

def _head(dtype: str, m: int):
    from twinlm.core import dtypes as D

    rng = np.random.default_rng(11 + m)
    h = D.round_to(rng.standard_normal((2, m, 72)).astype(np.float32), dtype)
    wte = D.round_to(rng.standard_normal((203, 72)).astype(np.float32), dtype)
    return h, wte


@pytest.mark.parametrize("dtype", ["float32", *DTYPES])
@pytest.mark.parametrize("m", [1, 20])
def test_matmul_t_override_matches_the_reference_body(dtype, m) -> None:
    """MLXBackend.matmul_t (the kernel for bf16/f16) against Backend.matmul_t (x @ transpose(w), here run by
    MLX itself) and the float64 numpy reference, within the dtype's rounding; a transposed-index control
    (x @ w read as (K, N)-shaped rows: reshape, not transpose) fails the same check."""
    from twinlm.backends.numpy_ref import NumpyBackend
    from twinlm.core import dtypes as D
    from twinlm.core.backend import Backend

    B = _mlx_backend.MLXBackend()
    h, wte = _head(dtype, m)
    hb, wb = (B.astype(B.from_numpy(a), dtype) for a in (h, wte))
    got = B.to_numpy(B.astype(B.matmul_t(hb, wb), "float32")).astype(np.float64)
    ref = B.to_numpy(B.astype(Backend.matmul_t(B, hb, wb), "float32")).astype(np.float64)
    N = NumpyBackend()
    ref64 = N.to_numpy(N.matmul_t(N.from_numpy(h.astype(np.float64)), N.from_numpy(wte.astype(np.float64))))
    assert B.dtype_name(B.matmul_t(hb, wb)) == dtype
    scale = float(np.abs(ref64).max())
    tol = 4 * D.UNIT_ROUNDOFF[dtype] * scale if dtype != "float32" else 1e-5 * scale
    assert np.abs(got - ref64).max() <= tol
    assert np.abs(got - ref).max() <= 2 * tol  # both within rounding of the float64 value
    bad = hb @ B.reshape(wb, (72, 203))  # the weight's bytes read as (n_in, n_out): no transposition
    assert np.abs(B.to_numpy(B.astype(bad, "float32")) - ref64).max() > 20 * tol
    if K is not None and hasattr(K, "matmul_t_lowp"):  # the override runs the kernel
        calls: list[str] = []

        class Spy:
            def matmul_t_lowp(self, x, w):
                calls.append(B.dtype_name(w))
                return K.matmul_t_lowp(x, w)

        B.kernels = Spy()
        B.matmul_t(hb, wb)
        assert calls == [dtype]


def test_matmul_t_with_the_kernels_off(monkeypatch) -> None:
    """TWINLM_KERNELS=0: the adapter has no kernels and matmul_t is MLX's own product, still correct."""
    monkeypatch.setenv("TWINLM_KERNELS", "0")
    kernels.reset()
    try:
        B = _mlx_backend.MLXBackend()
        assert B.kernels is None
        h, wte = _head("bfloat16", 3)
        hb, wb = (B.astype(B.from_numpy(a), "bfloat16") for a in (h, wte))
        want = h.astype(np.float64) @ wte.astype(np.float64).T
        np.testing.assert_allclose(B.to_numpy(B.matmul_t(hb, wb)), want, rtol=2 ** -7, atol=0.05)
    finally:
        monkeypatch.delenv("TWINLM_KERNELS")
        kernels.reset()
        kernels.load()
