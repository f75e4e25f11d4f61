"""twinlm's int8/int4 quantized matmul kernel (`K.quantized_matmul`, twinlm/backends/kernels/csrc/quant.cpp)
against MLX's `mx.quantized_matmul(..., transpose=True)` and a float64 numpy unpack-dequantize-matmul of the
shared format (MLX's affine layout, weights made by mx.quantize): both bit widths, all group sizes, the GEMV
rows (M <= 32) and the tiled sgemm path, every GEMV loop this CPU runs, 1-3 threads; the gradient for x
against MLX's; the frozen weight's gradient and bad input raise; negative controls (a swapped nibble or byte
order, scales and biases swapped, a wrong gradient) are caught by the same checks."""

from __future__ import annotations

import numpy as np
import pytest

from twinlm.backends import kernels

mx = pytest.importorskip("mlx.core")
import twinlm.backends.mlx  # noqa: E402, F401  (loads the BLAS the kernels bind to, as twinlm runs)

K = kernels.load()
pytestmark = pytest.mark.skipif(K is None or not hasattr(K, "quantized_matmul"),
                                reason=f"kernels not active or too old: {kernels.status().reason}")
ISAS = ("avx512", "avx2", "portable")


def quantized(n_out: int, n_in: int, bits: int, group: int, seed: int = 0):
    rng = np.random.default_rng(seed + 7 * n_out + n_in + bits + group)
    w = mx.array(rng.standard_normal((n_out, n_in)).astype(np.float32))
    q, s, b = mx.quantize(w, group_size=group, bits=bits)
    mx.eval(q, s, b)
    return q, s, b


def xs(*shape, seed: int = 1):
    return mx.array(np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32))


def np_dequant(q, s, b, bits: int, group: int) -> np.ndarray:
    """Wt (n_out, n_in) in float64 from the packed words: element j of a word at bits [j*bits, (j+1)*bits)."""
    words = np.array(q).astype(np.uint64)
    shifts = np.arange(32 // bits, dtype=np.uint64) * np.uint64(bits)
    vals = ((words[..., None] >> shifts) & np.uint64((1 << bits) - 1)).reshape(words.shape[0], -1)
    rep = lambda a: np.repeat(np.array(a, dtype=np.float64), group, axis=1)  # noqa: E731
    return vals.astype(np.float64) * rep(s) + rep(b)


def close(got, want, n_sum: int) -> bool:
    """float32 sums of n_sum products of O(1) terms against float64: rounding grows like sqrt(n_sum)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=2e-5 * np.sqrt(n_sum) * 4)


def check(got, want, n_sum: int) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert close(got, want, n_sum), f"max abs error {np.max(np.abs(got - want)):.3g}"


@pytest.fixture
def isa_reset():
    yield
    K._set_quant_isa("auto")


@pytest.fixture
def threads_reset():
    before = K.threads()
    yield
    K.set_threads(before)


def test_the_numpy_reference_is_the_format() -> None:
    for bits in (4, 8):
        q, s, b = quantized(5, 128, bits, 32)
        np.testing.assert_allclose(np_dequant(q, s, b, bits, 32), np.array(mx.dequantize(q, s, b, 32, bits)),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 20, 64])  # 20: GEMV passes of 8, 8 and 4 rows; 64: the sgemm tiles
@pytest.mark.parametrize("n_in, n_out", [(128, 37), (384, 80)])  # n_out not a multiple of any vector width
def test_forward_against_mlx_and_float64(bits, group, m, n_in, n_out) -> None:
    q, s, b = quantized(n_out, n_in, bits, group)
    x = xs(m, n_in)
    y = K.quantized_matmul(x, q, s, b, group, bits)
    assert y.dtype == mx.float32 and y.shape == (m, n_out)
    check(y, mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group, bits=bits), n_in)
    check(y, np.array(x, dtype=np.float64) @ np_dequant(q, s, b, bits, group).T, n_in)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 2, 5, 8])  # each GEMV loop's row counts (two accumulators up to 4 on AVX2)
def test_every_gemv_loop(isa, bits, m, isa_reset) -> None:
    try:
        K._set_quant_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU or build does not run the {isa} loops")
    assert K.quant_isa() == isa
    for group in (32, 128):
        q, s, b = quantized(45, 256, bits, group)
        x = xs(m, 256)
        want = np.array(x, np.float64) @ np_dequant(q, s, b, bits, group).T
        check(K.quantized_matmul(x, q, s, b, group, bits), want, 256)


def test_leading_shape_and_strided_x() -> None:
    q, s, b = quantized(33, 128, 4, 64)
    wt = np_dequant(q, s, b, 4, 64)
    x3 = xs(2, 3, 128)
    y = K.quantized_matmul(x3, q, s, b, 64, 4)
    assert y.shape == (2, 3, 33)
    check(y, np.array(x3, np.float64) @ wt.T, 128)
    xt = xs(128, 6).T  # (6, 128), not row-contiguous
    check(K.quantized_matmul(xt, q, s, b, 64, 4), np.array(xt, np.float64) @ wt.T, 128)
    x1 = xs(128)  # a single vector
    check(K.quantized_matmul(x1, q, s, b, 64, 4), np.array(x1, np.float64) @ wt.T, 128)
    s_cols = mx.array(np.array(s).T.copy()).T  # evaluated, column-major: made row-contiguous first
    mx.eval(s_cols)
    check(K.quantized_matmul(x3, q, s_cols, b, 64, 4), np.array(x3, np.float64) @ wt.T, 128)


@pytest.mark.parametrize("m", [1, 4, 20, 40])
def test_thread_counts_give_the_same_result(m, threads_reset) -> None:
    q, s, b = quantized(301, 512, 4, 64)  # enough rows to split over 3 threads
    x = xs(m, 512)
    want = np.array(x, np.float64) @ np_dequant(q, s, b, 4, 64).T
    results = []
    for t in (1, 2, 3):
        K.set_threads(t)
        y = np.array(K.quantized_matmul(x, q, s, b, 64, 4))
        check(y, want, 512)
        results.append(y)
    if m <= 32:  # the GEMV rows: each output computed by one thread, in one order
        assert all(np.array_equal(results[0], r) for r in results[1:])


def test_several_tiles_forward_transposed_and_gradient() -> None:
    """n_out 600 x n_in 4096: the sgemm path takes the weight in two tiles of dequantized rows (512 + 88),
    and the gradient for x adds the second tile's product onto the first's."""
    q, s, b = quantized(600, 4096, 4, 128)
    wt = np_dequant(q, s, b, 4, 128)
    x, cot = xs(9, 4096), xs(9, 600, seed=3)
    check(K.quantized_matmul(x, q, s, b, 128, 4), np.array(x, np.float64) @ wt.T, 4096)
    check(K.quantized_matmul(cot, q, s, b, 128, 4, transpose=False), np.array(cot, np.float64) @ wt, 600)
    check(mx.grad(lambda x: mx.sum(K.quantized_matmul(x, q, s, b, 128, 4) * cot))(x),
          np.array(cot, np.float64) @ wt, 600)


def test_empty_rows_and_compile() -> None:
    q, s, b = quantized(20, 64, 8, 32)
    assert K.quantized_matmul(mx.zeros((0, 64)), q, s, b, 32, 8).shape == (0, 20)
    x = xs(3, 64)
    f = mx.compile(lambda x: K.quantized_matmul(x, q, s, b, 32, 8) * 2.0)
    check(f(x), 2.0 * (np.array(x, np.float64) @ np_dequant(q, s, b, 8, 32).T), 64)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 64])
def test_gradient_for_x_against_mlx(bits, m) -> None:
    group, n_in, n_out = 64, 256, 70
    q, s, b = quantized(n_out, n_in, bits, group)
    x, cot = xs(m, n_in), xs(m, n_out, seed=5)

    def loss(fn):
        return lambda x: mx.sum(fn(x) * cot)

    got = mx.grad(loss(lambda x: K.quantized_matmul(x, q, s, b, group, bits)))(x)
    want = mx.grad(loss(lambda x: mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group,
                                                        bits=bits)))(x)
    check(got, want, n_out)
    check(got, np.array(cot, np.float64) @ np_dequant(q, s, b, bits, group), n_out)
    # Negative control: the gradient through scales and biases swapped is not taken for the right one.
    wrong = mx.grad(loss(lambda x: K.quantized_matmul(x, q, b, s, group, bits)))(x)
    assert not close(wrong, want, n_out)


def test_gradient_for_the_frozen_weight_raises() -> None:
    q, s, b = quantized(16, 64, 4, 32)
    x = xs(2, 64)
    for argnum in (1, 2):  # scales, biases (qweight is integer: MLX never asks)
        def loss(x, s, b):
            return mx.sum(K.quantized_matmul(x, q, s, b, 32, 4))

        with pytest.raises(ValueError, match="frozen base"):
            mx.grad(loss, argnums=argnum)(x, s, b)


def test_negative_controls_are_caught() -> None:
    """A kernel that read the nibbles (4-bit) or bytes (8-bit) in the other order, or swapped scales and
    biases, would fail the checks the tests use: shown here by feeding it data transformed that way."""
    x = xs(3, 128)
    for bits in (4, 8):
        q, s, b = quantized(40, 128, bits, 64)
        want = np.array(x, np.float64) @ np_dequant(q, s, b, bits, 64).T
        assert close(K.quantized_matmul(x, q, s, b, 64, bits), want, 128)
        raw = np.array(q).view(np.uint8)
        if bits == 4:
            swapped = ((raw & 0x0F) << 4) | (raw >> 4)  # high nibble first
        else:
            swapped = raw.reshape(raw.shape[0], -1, 4)[:, :, ::-1].reshape(raw.shape)  # big end first
        q_wrong = mx.array(np.ascontiguousarray(swapped).view(np.uint32))
        for m in (1, 40):  # GEMV and tiles
            xm = xs(m, 128)
            want_m = np.array(xm, np.float64) @ np_dequant(q, s, b, bits, 64).T
            assert not close(K.quantized_matmul(xm, q_wrong, s, b, 64, bits), want_m, 128)
            assert not close(K.quantized_matmul(xm, q, b, s, 64, bits), want_m, 128)


@pytest.mark.parametrize("case, match", [
    (dict(bits=3), "bits must be 4 or 8"),
    (dict(group=16), "group_size must be 32, 64 or 128"),
    (dict(q_dtype="float32"), "qweight must be a 2-D uint32"),
    (dict(scales_shape=(16, 3)), "scales must be float32 \\(16, 2\\)"),
    (dict(biases_dtype="float16"), "biases must be float32"),
    (dict(x_dim=65), "x \\(2, 65\\) does not end in 64"),
    (dict(x_dtype="float16"), "x must be float32"),
])
def test_bad_input_gives_a_clear_error(case, match) -> None:
    q, s, b = quantized(16, 64, 4, 32)
    x = xs(2, case.get("x_dim", 64))
    if "x_dtype" in case:
        x = x.astype(getattr(mx, case["x_dtype"]))
    if "q_dtype" in case:
        q = q.astype(mx.float32)
    if "scales_shape" in case:
        s = mx.zeros(case["scales_shape"])
    if "biases_dtype" in case:
        b = b.astype(getattr(mx, case["biases_dtype"]))
    with pytest.raises(ValueError, match="quantized_matmul: " + match):
        K.quantized_matmul(x, q, s, b, case.get("group", 32), case.get("bits", 4))
