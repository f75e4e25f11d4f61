"""The MLX CPU kernels' linear layer over bfloat16 / float16 weights, and float32 ones at a few rows
(`K.linear_lowp`, issue #21; MLXBackend.linear's GEMV for decoding): the
forward against float64 numpy and MLX's own float32 matmul on the same rounded values, on every vector path
this CPU has (portable, AVX2+F16C, AVX-512), through the GEMV rows (M <= 8) and the widen-and-sgemm rows,
odd widths (a partial 32-column tile), 1-3 threads; the VJP against MLX's autodiff of x @ W + b in float32;
deliberately wrong decodings caught by the same checks; the errors for what the kernel does not serve."""

from __future__ import annotations

import numpy as np
import pytest

from twinlm.backends import kernels

mx = pytest.importorskip("mlx.core")
from twinlm.backends import mlx as _mlx_backend  # noqa: E402,F401  (the system BLAS before the kernels run)

K = kernels.load()
needs_lowp = pytest.mark.skipif(K is None or not hasattr(K, "linear_lowp"),
                                reason=f"kernels without linear_lowp: {kernels.status().reason}")
CPU_ISA = K._lowp_isa() if K is not None and hasattr(K, "_lowp_isa") else 0
ISAS = list(range(CPU_ISA + 1))  # 0 portable, 1 AVX2+FMA+F16C, 2 AVX-512F: the ones this CPU runs
DTYPES = ("bfloat16", "float16")
KI, NO = 70, 77  # K not a multiple of 8 or 16; N = 2 whole 32-column tiles + 13 columns


@pytest.fixture
def isa():
    """Run a test on every vector path this CPU has, then restore the fastest."""
    yield
    K._lowp_isa(CPU_ISA)


def data(m, k, n, dtype, seed=0):
    """x (m, k) float32, w (k, n) in `dtype`, b (n,) float32; and all three as float64 numpy of the values
    the kernel sees (w after rounding to dtype)."""
    rng = np.random.default_rng(seed + m + k + n)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
    w = mx.array(rng.standard_normal((k, n)).astype(np.float32)).astype(getattr(mx, dtype))
    b = mx.array(rng.standard_normal(n).astype(np.float32))
    return x, w, b, [np.array(a.astype(mx.float32), dtype=np.float64) for a in (x, w, b)]


def forward_error(y, x64, w64, b64):
    want = x64 @ w64 + (0 if b64 is None else b64)
    return float(np.abs(np.array(y.astype(mx.float32), dtype=np.float64) - want).max())


ATOL = 1e-4  # float32 sums of 70 products of magnitude ~1: a wrong decoding is off by ~1 or more


@needs_lowp
@pytest.mark.parametrize("dtype", [*DTYPES, "float32"])  # float32: MLXBackend.linear's GEMV at few rows
@pytest.mark.parametrize("m", [1, 3, 8, 9, 64])  # 1-8: one GEMV pass; 9: two; 64: widened blocks, sgemm
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("level", ISAS)
def test_forward_against_float64_and_mlx(dtype, m, bias, level, isa) -> None:
    assert K._lowp_isa(level) == level
    x, w, b, (x64, w64, b64) = data(m, KI, NO, dtype)
    y = K.linear_lowp(x, w, b if bias else None)
    assert y.dtype == mx.float32 and y.shape == (m, NO)
    assert forward_error(y, x64, w64, b64 if bias else None) < ATOL
    ref = x @ w.astype(mx.float32) + (b if bias else 0)  # MLX's own float32 matmul, same rounded weight
    np.testing.assert_allclose(np.array(y), np.array(ref), atol=ATOL, rtol=1e-5)


@needs_lowp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("level", ISAS)
def test_special_weight_values(dtype, m, level, isa) -> None:
    """Subnormal weights (the portable f16 decoding's own branch), inf, -inf and NaN decode as MLX's astype
    does and propagate to their columns only."""
    K._lowp_isa(level)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((40, 70)).astype(np.float32)
    w[:, 8] *= 3e-7 if dtype == "float16" else 1e-39  # below the dtype's smallest normal
    w[0, 5], w[1, 6], w[2, 7] = np.inf, -np.inf, np.nan
    wl = mx.array(w).astype(getattr(mx, dtype))
    w64 = np.array(wl.astype(mx.float32), dtype=np.float64)
    assert 0 < np.abs(w64[:, 8]).max() < (6.2e-5 if dtype == "float16" else 1.2e-38)  # subnormal, not zero
    x = mx.array(rng.standard_normal((m, 40)).astype(np.float32))
    y = np.array(K.linear_lowp(x, wl, None), dtype=np.float64)
    want = np.array(x, dtype=np.float64) @ w64
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(y) & (y > 0), np.isinf(want) & (want > 0))
    finite = np.isfinite(want)
    scale = np.abs(w64[:, 8]).max() * 40
    np.testing.assert_allclose(y[:, 8], want[:, 8], atol=1e-3 * scale)
    np.testing.assert_allclose(y[finite], want[finite], atol=ATOL)


@needs_lowp
@pytest.mark.parametrize("dtype,fault", [("bfloat16", 1), ("float16", 2)])
@pytest.mark.parametrize("m", [1, 64])
def test_a_wrong_decoding_is_caught(dtype, fault, m) -> None:
    """Negative controls: bf16 bits widened into the low half of a float32, f16 bits read as bf16."""
    x, w, b, (x64, w64, b64) = data(m, KI, NO, dtype)
    assert forward_error(K.linear_lowp(x, w, b), x64, w64, b64) < ATOL
    assert forward_error(K._linear_lowp_faulty(x, w, b, fault), x64, w64, b64) > 100 * ATOL


@needs_lowp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_leading_axes_and_split_over_threads(dtype, m) -> None:
    """x (2, m, K): rows of both leading axes; N = 300 columns (9 tiles and a tail) over 1-3 threads give
    the same result (the GEMV's tiles are summed the same way whoever runs them: bit for bit)."""
    rng = np.random.default_rng(m)
    x = mx.array(rng.standard_normal((2, m, 130)).astype(np.float32))
    w = mx.array(rng.standard_normal((130, 300)).astype(np.float32)).astype(getattr(mx, dtype))
    b = mx.array(rng.standard_normal(300).astype(np.float32))
    before, runs = K.threads(), []
    try:
        for n in (1, 2, 3):
            K.set_threads(n)
            runs.append(np.array(K.linear_lowp(x, w, b)))
    finally:
        K.set_threads(before)
    want = np.array(x, np.float64) @ np.array(w.astype(mx.float32), np.float64) + np.array(b, np.float64)
    for r in runs:
        assert r.shape == (2, m, 300)
        np.testing.assert_allclose(r, want, atol=2e-4, rtol=1e-5)
        np.testing.assert_array_equal(r, runs[0])


@needs_lowp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 64])
def test_low_precision_x_and_bias(dtype, m) -> None:
    """x and the bias in the weight's dtype: the result in that dtype, the float32 sum rounded once."""
    dt = getattr(mx, dtype)
    x, w, b, _ = data(m, KI, NO, dtype)
    x, b = x.astype(dt), b.astype(dt)
    y = K.linear_lowp(x, w, b)
    assert y.dtype == dt
    want = x.astype(mx.float32) @ w.astype(mx.float32) + b.astype(mx.float32)
    # within one ulp of the dtype of the rounded float32 result (sums in another order may round apart)
    ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), np.array(want.astype(dt).astype(mx.float32)),
                               rtol=ulp, atol=1e-5)
    # a float32 x with a bias in the weight's dtype: float32 out
    y2 = K.linear_lowp(x.astype(mx.float32), w, b)
    assert y2.dtype == mx.float32
    np.testing.assert_allclose(np.array(y2), np.array(want), atol=ATOL)


def grads(fn, x, w, b, r):
    """sum(fn(x, w, b) * r) and its gradients in x, w, b: float64 numpy, with the gradients' dtypes."""
    g = mx.grad(lambda x, w, b: mx.sum(fn(x, w, b).astype(mx.float32) * r), argnums=(0, 1, 2))(x, w, b)
    return [(np.array(a.astype(mx.float32), dtype=np.float64), a.dtype) for a in g]


@needs_lowp
@pytest.mark.parametrize("dtype", [*DTYPES, "float32"])
@pytest.mark.parametrize("m", [3, 64])
@pytest.mark.parametrize("level", ISAS)
def test_vjp_against_mlx_autodiff(dtype, m, level, isa) -> None:
    K._lowp_isa(level)
    dt = getattr(mx, dtype)
    x, w, b, _ = data(m, KI, NO, dtype)
    r = mx.array(np.random.default_rng(7).standard_normal((m, NO)).astype(np.float32))
    w32 = w.astype(mx.float32)  # the same rounded values, differentiated in float32 by MLX
    want = grads(lambda x, w, b: x @ w + b, x, w32, b, r)
    got = grads(K.linear_lowp, x, w, b, r)
    assert [d for _, d in got] == [mx.float32, dt, mx.float32]
    np.testing.assert_allclose(got[0][0], want[0][0], atol=ATOL, rtol=1e-5)  # dx
    # dw is summed in float32 and rounded once to the weight's dtype: within half an ulp of it
    ulp = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 1e-5}[dtype]
    np.testing.assert_allclose(got[1][0], want[1][0], atol=ATOL, rtol=ulp)
    np.testing.assert_allclose(got[2][0], want[2][0], atol=ATOL, rtol=1e-5)  # db
    # negative controls: a wrong decoding in dx (a float32 weight has none), no bias gradient
    if dtype != "float32":
        fault = 1 if dtype == "bfloat16" else 2
        bad = grads(lambda x, w, b: K._linear_lowp_faulty(x, w, b, fault), x, w, b, r)
        assert np.abs(bad[0][0] - want[0][0]).max() > 100 * ATOL
    bad = grads(lambda x, w, b: K._linear_lowp_faulty(x, w, b, 3), x, w, b, r)
    assert np.abs(bad[2][0] - want[2][0]).max() > 100 * ATOL


@needs_lowp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 64])
def test_vjp_with_everything_in_the_low_dtype(dtype, m) -> None:
    """x, w and b all bf16 (or f16): each gradient in that dtype, within a few ulps of float32's."""
    dt = getattr(mx, dtype)
    x, w, b, _ = data(m, KI, NO, dtype)
    x, b = x.astype(dt), b.astype(dt)
    r = mx.array(np.random.default_rng(9).standard_normal((m, NO)).astype(np.float32))
    # MLX hands a bf16 output's cotangent over in bf16: the float32 reference gets the same rounded one
    want = grads(lambda x, w, b: x @ w + b, *(a.astype(mx.float32) for a in (x, w, b)),
                 r.astype(dt).astype(mx.float32))
    got = grads(K.linear_lowp, x, w, b, r)
    assert [d for _, d in got] == [dt, dt, dt]
    ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    for (g, _), (h, _) in zip(got, want, strict=True):
        np.testing.assert_allclose(g, h, rtol=2 * ulp, atol=1e-3)


@needs_lowp
@pytest.mark.parametrize("dtype", DTYPES)
def test_it_trains_a_frozen_low_precision_base_and_float32_master_weights(dtype) -> None:
    """LoRA over a frozen bf16/f16 base: dx only. Full training: a float32 master weight cast to the low
    dtype for the forward gets a float32 gradient (through astype's VJP), close to float32's own."""
    dt = getattr(mx, dtype)
    x, w, b, _ = data(64, KI, NO, dtype)
    r = mx.array(np.random.default_rng(3).standard_normal((64, NO)).astype(np.float32))
    w32 = w.astype(mx.float32)
    dx = mx.grad(lambda x: mx.sum(K.linear_lowp(x, w, b) * r))(x)
    dx_want = mx.grad(lambda x: mx.sum((x @ w32 + b) * r))(x)
    np.testing.assert_allclose(np.array(dx), np.array(dx_want), atol=ATOL, rtol=1e-5)
    dw = mx.grad(lambda m: mx.sum(K.linear_lowp(x, m.astype(dt), b) * r))(w32)
    dw_want = mx.grad(lambda m: mx.sum((x @ m + b) * r))(w32)
    assert dw.dtype == mx.float32
    np.testing.assert_allclose(np.array(dw), np.array(dw_want), atol=ATOL, rtol=2.0 ** -7)


@needs_lowp
def test_compile_and_empty_sizes() -> None:
    x, w, b, (x64, w64, b64) = data(2, KI, NO, "bfloat16")
    f = mx.compile(lambda x, w, b: K.linear_lowp(x, w, b))
    assert forward_error(f(x, w, b), x64, w64, b64) < ATOL
    zero_k = K.linear_lowp(mx.zeros((3, 0)), mx.zeros((0, 5), dtype=mx.bfloat16), b[:5])
    np.testing.assert_array_equal(np.array(zero_k), np.broadcast_to(np.array(b[:5]), (3, 5)))
    assert K.linear_lowp(mx.zeros((0, 4)), mx.zeros((4, 5), dtype=mx.float16), None).shape == (0, 5)


@needs_lowp
@pytest.mark.parametrize("args,match", [
    (lambda: (mx.zeros((2, 4)), mx.zeros((4, 3), dtype=mx.int32), None), "float32, not another dtype"),
    (lambda: (mx.zeros((2, 4), dtype=mx.float16), mx.zeros((4, 3), dtype=mx.bfloat16), None),
     "x must be float32 or the weight's dtype"),
    (lambda: (mx.zeros((2, 4), dtype=mx.int32), mx.zeros((4, 3), dtype=mx.bfloat16), None),
     "x must be float32"),
    (lambda: (mx.zeros((2, 4)), mx.zeros((5, 3), dtype=mx.bfloat16), None), r"x \(..., K\), weight \(K, N\)"),
    (lambda: (mx.zeros((2, 4)), mx.zeros((4, 3), dtype=mx.bfloat16), mx.zeros(4)), r"bias \(N,\)"),
    (lambda: (mx.zeros((2, 4)), mx.zeros((4, 3), dtype=mx.bfloat16), mx.zeros(3, dtype=mx.float16)),
     "bias must be in x's or the weight's dtype"),
])
def test_bad_input_is_a_clear_error(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        K.linear_lowp(*args())


@needs_lowp
def test_the_benchmark_runs_at_a_tiny_size(capsys) -> None:
    from benchmarks import lowp_matmul

    lowp_matmul.main(["--rows", "1", "20", "--shapes", "64x96", "--repeats", "1", "--inner", "1"])
    out = capsys.readouterr().out
    for name in ("mlx f32", "mlx bf16", "mlx f16", "twinlm bf16", "twinlm f16"):
        assert out.count(name) == 2, out


@needs_lowp
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 64])
def test_mlx_linear_takes_the_gemv_for_a_few_float32_rows(rows, monkeypatch) -> None:
    """MLXBackend.linear: up to LOWP_GEMV_MAX_ROWS rows of a float32 layer go to linear_lowp's GEMV (BLAS's
    sgemv read the weight at a third of the memory's rate), more to the BLAS kernel; both equal float64."""
    from twinlm.backends.mlx import MLXBackend

    B = MLXBackend()
    if B.kernels is None:
        pytest.skip("kernels not active")
    calls: list[str] = []
    for name in ("linear", "linear_lowp"):
        real = getattr(B.kernels, name)
        monkeypatch.setattr(B.kernels, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x, w, b, (x64, w64, b64) = data(rows, KI, NO, "float32")
    y = B.linear(x.reshape(1, rows, KI), w, b)
    assert calls == ["linear_lowp" if rows <= K.LOWP_GEMV_MAX_ROWS else "linear"]
    assert forward_error(y.reshape(rows, NO), x64, w64, b64) < ATOL
