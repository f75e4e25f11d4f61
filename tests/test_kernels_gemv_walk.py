"""The few-row kernels' walks over the weight (issue #20's batched decode): `K.linear_lowp`'s GEMV (passes of
16 rows of K over every 32-column tile of a chunk, a prefetch that wraps into the next pass) and
`K.matmul_t_lowp`'s dot products (AVX-512: up to 8 rows of x per walk, in two passes of <= 4 over groups of 6
or 8 rows of W, then single rows; 16 sums reduced at once). Every row count 1-8 (and 16: two passes), on every
vector path this CPU has, against float64 numpy, at the shapes that take each branch: K below, at and off a
multiple of the pass (16), N of one tile or one group, N off a multiple of the tile (32) or the group (6, 8),
chunks of one tile over 3 threads (the same bits whoever runs them). Negative controls: the same check rejects
the results a broken walk would give (the last pass of K dropped, the last whole tile or the last group of W's
rows left out), so a tolerance loose enough to hide such a bug would fail here."""

from __future__ import annotations

import numpy as np
import pytest

from twinlm.backends import kernels

mx = pytest.importorskip("mlx.core")
from twinlm.backends import mlx as _mlx_backend  # noqa: E402,F401  (the system BLAS before the kernels run)

K = kernels.load()
needs = pytest.mark.skipif(K is None or not hasattr(K, "matmul_t_lowp"),
                           reason=f"kernels without the lowp GEMV: {kernels.status().reason}")
CPU_ISA = K._lowp_isa() if K is not None and hasattr(K, "_lowp_isa") else 0
ISAS = list(range(CPU_ISA + 1))
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
ATOL = 1e-4  # float32 sums of <= 70 products of magnitude ~1; a dropped row or column is off by ~1


@pytest.fixture
def isa():
    yield
    K._lowp_isa(CPU_ISA)


def arrays(m, k, n, dtype, transposed):
    """x (m, k) float32 and w (k, n) (transposed: (n, k)) in `dtype`; both as float64 of the values seen."""
    rng = np.random.default_rng(1000 * m + 10 * k + n)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
    w = mx.array(rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32)).astype(
        getattr(mx, dtype))
    return x, w, np.array(x, np.float64), np.array(w.astype(mx.float32), np.float64)


def err(y, want):
    return float(np.abs(np.array(y, np.float64) - want).max())


# (K, N): K < 16, K = 16, K = 2 passes + 1 row; N one tile, one tile + 1, 9 tiles + 13 columns
GEMV_SHAPES = ((7, 32), (16, 33), (33, 301), (70, 64))


@needs
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("level", ISAS)
def test_gemv_walk_rows_1_to_8_against_float64(dtype, level, isa) -> None:
    assert K._lowp_isa(level) == level
    for k, n in GEMV_SHAPES:
        for m in ROWS:
            x, w, x64, w64 = arrays(m, k, n, dtype, False)
            want = x64 @ w64
            y = K.linear_lowp(x, w, None)
            assert y.shape == (m, n)
            assert err(y, want) < ATOL, (k, n, m)
            # negative controls: what a walk that dropped its last pass of K or its last whole tile would give
            if k > 16:
                tail = (k - 1) // 16 * 16
                assert err(y, x64[:, :tail] @ w64[:tail]) > 100 * ATOL, (k, n, m)
            if n >= 64:
                last = (n // 32 - 1) * 32
                short = want.copy()
                short[:, last:last + 32] = 0
                assert err(y, short) > 100 * ATOL, (k, n, m)


@needs
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemv_walk_chunks_of_one_tile_over_threads(dtype) -> None:
    """N = 5 tiles + 7 columns at K = 600 (37 passes and a row): chunks of one tile (2 and 3 threads) whose
    prefetch wraps into the next pass; 1, 2 and 3 threads give the same bits, all equal to float64."""
    before, runs = K.threads(), []
    x, w, x64, w64 = arrays(8, 600, 167, dtype, False)
    try:
        for t in (1, 2, 3):
            K.set_threads(t)
            runs.append(np.array(K.linear_lowp(x, w, None)))
    finally:
        K.set_threads(before)
    for r in runs:
        np.testing.assert_array_equal(r, runs[0])
    assert err(runs[0], x64 @ w64) < 1e-3  # 600 products a sum


# (N, K) of W: N one group of 6 / of 8, N = 6 groups + 5 single rows, 3 groups of 8 + 1; K < 16, off 16, = 48
HEAD_SHAPES = ((6, 17), (8, 16), (41, 70), (25, 48), (13, 5))


@needs
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("level", ISAS)
def test_head_walk_rows_1_to_8_against_float64(dtype, level, isa) -> None:
    assert K._lowp_isa(level) == level
    for n, k in HEAD_SHAPES:
        for m in ROWS:
            x, w, x64, w64 = arrays(m, k, n, dtype, True)
            want = x64 @ w64.T
            y = K.matmul_t_lowp(x, w)
            assert y.shape == (m, n)
            assert err(y, want) < ATOL, (n, k, m)
            # negative controls: the last group of 6 rows of W left out; the K % 16 tail dropped
            short = want.copy()
            short[:, max(0, n - 6):] = 0
            assert err(y, short) > 100 * ATOL, (n, k, m)
            if k % 16:
                assert err(y, x64[:, : k // 16 * 16] @ w64[:, : k // 16 * 16].T) > 100 * ATOL, (n, k, m)


@needs
def test_the_roof_benchmark_runs_at_a_tiny_size(capsys) -> None:
    from benchmarks import gemv_roof

    gemv_roof.main(["--small"])
    out = capsys.readouterr().out
    assert "streaming read" in out and "tiny 64x96" in out and "tiny head 300x64" in out, out
