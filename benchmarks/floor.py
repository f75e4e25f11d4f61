"""What MLX's step costs with the core's composites taken away: the floor no composite kernel can go below.

    python -m benchmarks.floor                      # baby (batch 12, block 64, 128 wide)
    python -m benchmarks.floor --preset medium --iters 3

Times MLX's compiled forward and forward + backward of the real model (`model.lm_loss_fn`, kernels on),
then (with the fused attention kernel) once with attention on the path before it, then again with the
composites replaced one after another by stand-ins that compute nothing (attention returns v, LayerNorm
and GELU return x, cross-entropy is a mean of the logits). What is left in the last row is the linear
layers (twinlm's sgemm-onto-the-bias kernel where the kernels are on: OpenBLAS GEMMs and the bias
gradients' column sums), the head transposes, embeddings and residual adds; a last row swaps the
linear layers back to MLX's matmul, bias add and reduction, for the difference. Beside it, PyTorch's whole
training step (`torch_ref`, AdamW included) and MLX's (`core.step`, AdamW included), in the same process.
The stand-ins change the graph's numbers, never its shapes, so the GEMMs are the same calls.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from benchmarks.step import BATCH


def _median_ms(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _batch(preset: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    batch = BATCH.get(preset, 12)
    x, y = (rng.integers(0, 65, (batch, block)).astype(np.int32) for _ in range(2))
    return x, y


def _whole_step(backend: str, preset_name: str, iters: int) -> None:
    """Print the median ms of the real training step (benchmarks.runner) of one backend."""
    from benchmarks.runner import make_trainer
    from twinlm.core.config import preset
    from twinlm.core.optim import AdamWConfig

    cfg = preset(preset_name, vocab_size=65)
    xs, ys = _batch(preset_name, cfg.block_size)
    trainer = make_trainer(backend, cfg, AdamWConfig())
    print(_median_ms(lambda: trainer.step(xs, ys, 0), iters))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="baby")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--step-of", choices=("torch", "mlx"), help=argparse.SUPPRESS)  # one child's job
    args = ap.parse_args(argv)
    if args.step_of:
        return _whole_step(args.step_of, args.preset, args.iters)

    from twinlm.backends import get_backend

    B = get_backend("mlx")  # first: loads the system OpenBLAS before mlx.core is imported
    import mlx.core as mx

    from benchmarks import report
    from twinlm.core import model
    from twinlm.core import params as P
    from twinlm.core.config import preset

    cfg = preset(args.preset, vocab_size=65)
    xs, ys = _batch(args.preset, cfg.block_size)
    batch = xs.shape[0]
    params = {k: B.from_numpy(v) for k, v in P.init_params(cfg, 0).items()}
    x, y = mx.array(xs), mx.array(ys)

    def timed(tag: str) -> None:
        loss_fn = model.lm_loss_fn(B, cfg)
        fwd = mx.compile(lambda p, x, y: loss_fn(p, {"x": x, "y": y}, {}))
        both = mx.compile(mx.value_and_grad(lambda p, x, y: loss_fn(p, {"x": x, "y": y}, {})))
        f = _median_ms(lambda: mx.eval(fwd(params, x, y)), args.iters)
        fb = _median_ms(lambda: mx.eval(both(params, x, y)), args.iters)
        print(f"{tag:44s} {f:9.1f} {fb:13.1f}", flush=True)

    hw = report.hardware()
    simd = "+".join(hw.get("simd", [])) or "no SIMD flags"
    print(f"{hw.get('cpu', hw['machine'])} ({hw['cpus']} cores, {simd}); mlx {mx.__version__}")
    print(f"preset {args.preset}, batch {batch}, block {cfg.block_size}; median ms of {args.iters} calls\n")
    for name in ("torch", "mlx"):  # each in its own process: two libraries' thread pools never share one
        out = subprocess.run([sys.executable, "-m", "benchmarks.floor", "--preset", args.preset, "--iters",
                              str(args.iters), "--step-of", name], capture_output=True, text=True, check=True)
        ms = float(out.stdout.split()[-1])
        print(f"{name + ' whole training step (AdamW included)':44s} {'':9s} {ms:13.1f}", flush=True)
    print(f"\n{'MLX, kernels on':44s} {'forward':>9s} {'fwd+bwd':>13s}")
    timed("the model")
    if getattr(B, "attention_kernel", False):  # issue #23's fourth round: the path before the fused kernel
        B.attention_kernel = False
        timed("  attention as BLAS + masked softmax instead")
        B.attention_kernel = True
    B.attention = lambda q, k, v, mask, dropout=None: v
    timed("  attention -> v")
    B.layer_norm = lambda x, w, b, eps=1e-5: x
    B.add_layer_norm = lambda x, y, w, b, eps=1e-5: (x + y, x + y)  # the residual add stays, its norm goes
    timed("  + LayerNorm -> x")
    B.gelu = lambda x: x
    timed("  + GELU -> x")
    B.cross_entropy = lambda logits, targets, weights=None: mx.mean(logits)
    timed("  + cross-entropy -> mean (MLX's own ops left)")
    if B.kernels is not None:  # the same floor with MLX's matmul, bias add and reduction (the reference body)
        B.linear = lambda x, w, b: x @ w if b is None else x @ w + b
        timed("  linear layers on MLX's matmul + add instead")


if __name__ == "__main__":
    main()
