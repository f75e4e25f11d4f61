"""x @ W over a bfloat16 / float16 weight: twinlm's `linear_lowp` kernel against MLX on the CPU, one process.

    python -m benchmarks.lowp_matmul                        # M = 1 and 256, the five shapes of issue #21
    python -m benchmarks.lowp_matmul --rows 1 --shapes 576x1536 --repeats 3   # a quick check

For each weight shape (K, N) and row count M: the median time of MLX float32 `x @ W` (the baseline),
MLX's own `x @ W` with W (and x) in bf16 / f16, and `K.linear_lowp(x, W, None)` with x float32 and W in
bf16 / f16, each evaluated alone (`mx.eval`) `--inner` times per round, rounds interleaved. Columns: ms
per call, GB/s of weight bytes (K * N * itemsize / time: what bounds decoding), and the speed-up over
float32 (> 1: faster). The machine's other load counts: run it on an idle machine for numbers to keep.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import numpy as np

SHAPES = ((576, 1536), (1536, 576), (896, 4864), (2048, 8192), (8192, 2048))


def parse_shape(s: str) -> tuple[int, int]:
    k, n = s.lower().split("x")
    return int(k), int(n)


def cases(K, x32, w32, xb, wb, xh, wh) -> dict:
    """name -> (a call returning the unevaluated result, the weight's bytes per element)."""
    return {
        "mlx f32": (lambda: x32 @ w32, 4),
        "mlx bf16": (lambda: xb @ wb, 2),
        "mlx f16": (lambda: xh @ wh, 2),
        "twinlm bf16": (lambda: K.linear_lowp(x32, wb, None), 2),
        "twinlm f16": (lambda: K.linear_lowp(x32, wh, None), 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 256], help="M, the rows of x")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=list(SHAPES), help="KxN weight shapes")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (the median is reported)")
    p.add_argument("--inner", type=int, default=0, help="calls per round (0: about 20 ms of float32 work)")
    p.add_argument("--threads", type=int, default=0, help="the kernels' thread count (0: their default)")
    args = p.parse_args(argv)

    from twinlm.backends import kernels
    from twinlm.backends import mlx as _mlx_backend  # noqa: F401  (the system OpenBLAS before mlx.core)

    mx = importlib.import_module("mlx.core")  # after the line above, which binds MLX to the system BLAS

    K = kernels.load()
    if K is None or not hasattr(K, "linear_lowp"):
        raise SystemExit(f"error: the kernels have no linear_lowp ({kernels.status().reason})")
    K.set_threads(args.threads)
    print(f"kernels: {K.simd_level()}, linear_lowp ISA level {K._lowp_isa()}, {K.threads()} threads; "
          f"mlx {mx.__version__}")
    rng = np.random.default_rng(0)
    head = (f"{'M':>4} {'K x N':>12} {'variant':<18} {'ms':>9} {'GB/s W':>8} {'vs f32':>7}")
    print(head)
    print("-" * len(head))
    for m in args.rows:
        for k, n in args.shapes:
            x32 = mx.array(rng.standard_normal((m, k)).astype(np.float32))
            w32 = mx.array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))
            wb, wh = w32.astype(mx.bfloat16), w32.astype(mx.float16)
            xb, xh = x32.astype(mx.bfloat16), x32.astype(mx.float16)
            mx.eval(wb, wh, xb, xh)
            variants = cases(K, x32, w32, xb, wb, xh, wh)
            for fn, _ in variants.values():  # warm-up (thread pools, page faults)
                mx.eval(fn())
            inner = args.inner
            if inner <= 0:
                t = time.perf_counter()
                mx.eval(variants["mlx f32"][0]())
                inner = max(1, min(200, int(0.02 / max(time.perf_counter() - t, 1e-6))))
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, (fn, _) in variants.items():
                    t = time.perf_counter()
                    for _ in range(inner):
                        mx.eval(fn())
                    times[name].append((time.perf_counter() - t) / inner)
            base = statistics.median(times["mlx f32"])
            for name, (_, itemsize) in variants.items():
                sec = statistics.median(times[name])
                gbs = k * n * itemsize / sec / 1e9
                print(f"{m:>4} {f'{k}x{n}':>12} {name:<18} {sec * 1e3:>9.3f} {gbs:>8.1f} {base / sec:>6.2f}x")
            print()


if __name__ == "__main__":
    main()
