"""Measured fp32 GEMM peak on this machine: numpy (its bundled OpenBLAS) on square n x n matrices.

Run as `python -m benchmarks.gemm` (prints JSON); `benchmarks.step` runs it in a child process so its
large matrices never count towards a backend's peak RSS.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def gemm_peak(n: int = 4096, repeats: int = 3) -> dict[str, float | int | str]:
    """Best of `repeats` timings of an (n, n) @ (n, n) float32 matmul, in FLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {})
    return {"flops": 2.0 * n ** 3 / best, "n": n, "seconds": best,
            "blas": f"numpy {np.__version__} {blas.get('name', '?')} {blas.get('version', '')}".strip()}


if __name__ == "__main__":
    json.dump(gemm_peak(int(sys.argv[1]) if len(sys.argv) > 1 else 4096), sys.stdout)
    print()
