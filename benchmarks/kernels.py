"""Per-kernel speed of twinlm's MLX CPU kernels against MLX's own ops, side by side in one process.

    python -m benchmarks.kernels                     # baby shapes (batch 12, block 64, 128 wide)
    python -m benchmarks.kernels --preset medium     # medium shapes (batch 64, block 256, 384 wide)

Each composite runs through `MLXBackend(kernels=False)` (what MLX runs without the kernels:
mx.fast.layer_norm / rms_norm / scaled_dot_product_attention, the reference bodies elsewhere) and
`MLXBackend()` (the kernels), each wrapped in `mx.compile` as the trainer's step is, forward alone and
forward + backward (`mx.vjp` with a fixed cotangent). The two are timed interleaved, `--repeats` rounds
of `--inner` calls each; the table gives the median per call, ns per input element, and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

SHAPES = {  # (batch, heads, block, width, vocab)
    "baby": (12, 4, 64, 128, 65),
    "medium": (64, 6, 256, 384, 65),
}


def cases(preset: str):
    """(name, n_elements, fn(B) -> function of the inputs, inputs)."""
    import mlx.core as mx

    from twinlm.core.layers import rope_tables

    b, h, t, c, v = SHAPES[preset]
    rng = np.random.default_rng(0)

    def arr(*shape, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))

    x_mlp = arr(b * t, 4 * c, scale=2.0)
    x_res, w, bias = arr(b, t, c), arr(c), arr(c)
    q, k, vv = (arr(b, h, t, c // h) for _ in range(3))
    causal = mx.array(np.tril(np.ones((t, t), dtype=bool)))
    logits = arr(b * t, v, scale=3.0)
    gate, up = arr(b * t, 4 * c, scale=2.0), arr(b * t, 4 * c)
    cos, sin = (mx.array(a.astype(np.float32)) for a in rope_tables(t, c // h, 10000.0))
    targets = mx.array(rng.integers(0, v, b * t).astype(np.int32))
    x_in, x_fc = arr(b, t, c), arr(b, t, 4 * c)
    wte, ids = arr(v, c), mx.array(rng.integers(0, v, (b, t)).astype(np.int32))
    w_qkv, w_fc, w_proj = arr(c, 3 * c, scale=0.02), arr(c, 4 * c, scale=0.02), arr(4 * c, c, scale=0.02)
    b_qkv, b_fc, b_proj = arr(3 * c), arr(4 * c), arr(c)
    return [
        # The linear layers of a block (elements: of the output): one sgemm onto the bias against
        # MLX's matmul (beta = 0), bias add and bias-gradient reduction.
        ("linear qkv", b * t * 3 * c, lambda B: B.linear, (x_in, w_qkv, b_qkv)),
        ("linear fc", b * t * 4 * c, lambda B: B.linear, (x_in, w_fc, b_fc)),
        ("linear proj", b * t * c, lambda B: B.linear, (x_fc, w_proj, b_proj)),
        ("embedding", b * t * c, lambda B: lambda tab: B.take(tab, ids), (wte,)),  # mx.take vs the kernel
        ("gelu", x_mlp.size, lambda B: B.gelu, (x_mlp,)),
        ("gelu_tanh", x_mlp.size, lambda B: B.gelu_tanh, (x_mlp,)),
        ("swiglu", gate.size, lambda B: B.swiglu, (gate, up)),
        ("rope", q.size, lambda B: lambda x: B.rope(x, cos, sin), (q,)),
        ("layer_norm", x_res.size, lambda B: lambda x, w, bb: B.layer_norm(x, w, bb), (x_res, w, bias)),
        ("rms_norm", x_res.size, lambda B: lambda x, w: B.rms_norm(x, w), (x_res, w)),
        ("attention causal", b * h * t * t, lambda B: lambda q, k, v: B.attention(q, k, v, causal),
         (q, k, vv)),
        ("cross_entropy", logits.size, lambda B: lambda lg: B.cross_entropy(lg, targets), (logits,)),
    ]


def timed(fn, inner: int) -> float:
    import mlx.core as mx

    t0 = time.perf_counter()
    for _ in range(inner):
        mx.eval(fn())
    return (time.perf_counter() - t0) / inner


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="baby", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=0, help="calls per timing (default: by size)")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args(argv)

    from twinlm.backends import kernels
    from twinlm.backends import mlx as mlx_backend  # loads the system OpenBLAS before MLX (the matmuls)

    mx, MLXBackend = mlx_backend.mx, mlx_backend.MLXBackend

    ops, fast = MLXBackend(kernels=False), MLXBackend()
    st = kernels.status()
    if fast.kernels is None:
        sys.exit(f"the kernels are not active: {st.reason}")
    print(f"kernels: {st.simd}, {st.threads} threads; MLX BLAS: {ops.blas}; preset {args.preset}; "
          f"median of {args.repeats} interleaved rounds\n")
    header = (f"{'op':<18} {'pass':<9} {'elements':>10} {'MLX ops ms':>10} {'kernel ms':>10} "
              f"{'MLX ns/el':>9} {'kern ns/el':>10} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    only = set(args.only.split(",")) if args.only else None
    for name, n, make, inputs in cases(args.preset):
        if only and name not in only:
            continue
        fns = {}
        for label, B in (("ops", ops), ("kernel", fast)):
            f = make(B)
            fwd = mx.compile(f)
            cot = mx.ones_like(f(*inputs))

            def both(*xs, f=f, cot=cot):
                out, grads = mx.vjp(f, list(xs), [cot])
                return out + grads

            fns[label] = (fwd, mx.compile(both))
        for pi, pass_name in enumerate(("forward", "fwd+bwd")):
            a, b = fns["ops"][pi], fns["kernel"][pi]
            mx.eval(a(*inputs), b(*inputs))  # compile, warm up
            inner = args.inner or max(3, min(200, int(2e6 / n)))
            ta, tb = [], []
            for _ in range(args.repeats):
                ta.append(timed(lambda a=a, xs=inputs: a(*xs), inner))
                tb.append(timed(lambda b=b, xs=inputs: b(*xs), inner))
            ma, mb = statistics.median(ta), statistics.median(tb)
            print(f"{name:<18} {pass_name:<9} {n:>10,} {ma * 1e3:>10.3f} {mb * 1e3:>10.3f} "
                  f"{ma * 1e9 / n:>9.2f} {mb * 1e9 / n:>10.2f} {ma / mb:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
