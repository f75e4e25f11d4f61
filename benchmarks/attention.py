"""Attention on MLX's CPU path, issue #23's fourth round: the fused attention kernel (`kernel`) against the
path before it (`blas`: BLAS products around the masked-softmax kernel), interleaved in one process.

    OPENBLAS_NUM_THREADS=1 TWINLM_KERNEL_THREADS=1 python -m benchmarks.attention      # baby
    python -m benchmarks.attention --preset baby --rounds 9 --inner 5

Two rows per preset, each compiled forward + backward, median over rounds of the process CPU ms (and wall ms)
per call: `attention layer` is one layer's head split of a qkv projection, causal attention and the heads'
merge as `core.layers.self_attention` does it (without its two linear layers; `kernel` includes the head
split's views and one-pass gradient gather, `split_heads`); `model` is the whole model's
loss and gradients (`model.lm_loss_fn`), every other kernel on. The two sides run the same graph but for the
attention and head-split composites (`MLXBackend.attention_kernel`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from benchmarks.step import BATCH


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="baby")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--inner", type=int, default=5, help="calls per round and side")
    args = ap.parse_args(argv)

    from twinlm.backends import mlx as mb

    mx = mb.mx
    from twinlm.core import layers, model
    from twinlm.core import params as P
    from twinlm.core.config import preset

    B = mb.MLXBackend()
    if B.kernels is None or not hasattr(B.kernels, "attention"):
        sys.exit("error: the kernels are not built: python -m twinlm.backends.kernels.build")
    cfg = preset(args.preset, vocab_size=65)
    n, t, H, hs = BATCH.get(args.preset, 12), cfg.block_size, cfg.n_head, cfg.head_dim
    rng = np.random.default_rng(0)
    qkv = mx.array(rng.standard_normal((n, t, 3 * H * hs)).astype(np.float32))
    gy = mx.array(rng.standard_normal((n, t, H * hs)).astype(np.float32))
    mask = mx.array(np.tril(np.ones((t, t), bool)))
    params = {k: B.from_numpy(v) for k, v in P.init_params(cfg, 0).items()}
    x, y = (mx.array(rng.integers(0, 65, (n, t)).astype(np.int32)) for _ in range(2))

    def layer(qkv):
        q, k, v = B.split_heads(qkv, H, H, hs)
        o = layers.attention(B, cfg, q, k, v, mask)
        return mx.sum(mx.reshape(mx.transpose(o, (0, 2, 1, 3)), (n, t, H * hs)) * gy)

    loss_fn = model.lm_loss_fn(B, cfg)
    def model_loss(p, x, y):
        return loss_fn(p, {"x": x, "y": y}, {})

    cases = {"attention layer": (lambda: mx.compile(mx.value_and_grad(layer)), (qkv,)),
             "model": (lambda: mx.compile(mx.value_and_grad(model_loss)), (params, x, y))}
    print(f"preset {args.preset}: batch {n}, {H} heads of {hs}, block {t}; kernel threads "
          f"{B.kernels.threads()}; compiled forward + backward, median of {args.rounds} rounds x "
          f"{args.inner} calls\n")
    print(f"{'case':18s} {'blas CPU ms':>12s} {'kernel CPU ms':>14s} {'blas wall':>10s} {'kernel wall':>12s} "
          f"{'speed-up (CPU)':>15s}")
    for name, (make, inputs) in cases.items():
        fns = {}
        for side in ("blas", "kernel"):
            B.attention_kernel = side == "kernel"
            fns[side] = make()
            for _ in range(2):  # compile and warm up with this side's graph
                mx.eval(fns[side](*inputs))
        cpu = {s: [] for s in fns}
        wall = {s: [] for s in fns}
        for _ in range(args.rounds):
            for side, f in fns.items():
                t0, w0 = time.process_time(), time.perf_counter()
                for _ in range(args.inner):
                    mx.eval(f(*inputs))
                cpu[side].append((time.process_time() - t0) / args.inner * 1e3)
                wall[side].append((time.perf_counter() - w0) / args.inner * 1e3)
        c = {s: statistics.median(v) for s, v in cpu.items()}
        w = {s: statistics.median(v) for s, v in wall.items()}
        print(f"{name:18s} {c['blas']:12.2f} {c['kernel']:14.2f} {w['blas']:10.2f} {w['kernel']:12.2f} "
              f"{c['blas'] / c['kernel']:14.2f}x", flush=True)


if __name__ == "__main__":
    main()
