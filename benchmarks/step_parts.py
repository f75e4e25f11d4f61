"""Where a training step's time goes, part by part, MLX beside PyTorch eager, interleaved in one process.

    python -m benchmarks.step_parts                          # baby, default threads
    python -m benchmarks.step_parts --preset gpt2 --rounds 3 --calls 1
    OPENBLAS_NUM_THREADS=1 TWINLM_KERNEL_THREADS=1 OMP_NUM_THREADS=1 python -m benchmarks.step_parts

Each part is timed as its own compiled function (MLX) or eager code (PyTorch) on the same batch:
`forward` (the loss), `fwd+bwd` (loss and gradients: `core.step.grad_part`), `update` (global-norm clip +
AdamW over every parameter: `core.step.update_part`, on fixed gradients, so nothing is updated in place),
`step` (the real compiled training step, as the trainer and `benchmarks.step` run it), and for MLX `step,
optimizer on MLX ops`: the same step with AdamW and the global norm on the core's reference bodies instead of
their kernels (the optimizer kernels' A/B in one process). The rounds alternate over every part and both
libraries, so a load that changes during the run moves all of them alike; each cell is the median over rounds
of the mean of `--calls` calls (wall ms, and process CPU ms: all threads).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from benchmarks.step import BATCH, bench_config


def _timed(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) * 1000 / calls, (time.process_time() - c) * 1000 / calls


def mlx_parts(cfg, xs: np.ndarray, ys: np.ndarray, seed: int = 0) -> dict[str, Callable[[], object]]:
    """The MLX parts, each a zero-argument call that returns once MLX has finished."""
    from twinlm.backends import get_backend

    B = get_backend("mlx")  # first: the system OpenBLAS before mlx.core
    import mlx.core as mx

    from benchmarks.runner import make_trainer
    from twinlm import parity
    from twinlm.core import model
    from twinlm.core import params as P
    from twinlm.core import step as S
    from twinlm.core.optim import AdamWConfig

    opt = AdamWConfig()
    spec = model.param_spec(cfg)
    state = {k: B.from_numpy(v) for k, v in S.init_state(P.init_params(cfg, seed), spec).items()}
    params = S.params_of(state)
    loss_fn = model.lm_loss_fn(B, cfg)
    batch = {"x": mx.array(xs), "y": mx.array(ys)}
    fwd = mx.compile(lambda p: loss_fn(p, batch, {}))
    grads_of = mx.compile(S.grad_part(B, spec, loss_fn))
    loss, grads = grads_of(params, batch, {})
    mx.eval(loss, grads)
    update = mx.compile(S.update_part(B, spec, opt))
    lr, bc1, bc2 = (mx.array(v) for v in S.step_scalars(0, opt))
    trainer = make_trainer("mlx", cfg, opt, seed)
    # The same step with the optimizer on MLX's own ops (the core's reference bodies of `adamw` and
    # `sum_squares`; every other kernel on): the optimizer kernels' A/B inside one process.
    Bops = parity.with_mixin(B, _OptimizerOnOps, "OptimizerOnOps", fused=True)
    ops_state = {k: Bops.from_numpy(v) for k, v in S.init_state(P.init_params(cfg, seed), spec).items()}
    ops_step = Bops.compile_step(S.make_train_step(Bops, spec, opt, model.lm_loss_fn(Bops, cfg)), ops_state)
    host = {"x": xs, "y": ys}
    return {
        "forward": lambda: mx.eval(fwd(params)),
        "fwd+bwd": lambda: mx.eval(grads_of(params, batch, {})),
        "update": lambda: mx.eval(update(state, grads, lr, bc1, bc2)),
        "step": lambda: trainer.step(xs, ys, 0),
        "step, optimizer on MLX ops": lambda: S.drive(Bops, ops_step, cfg, opt, host, 0, seed),
    }


class _OptimizerOnOps:
    from twinlm.core.backend import Backend

    adamw, sum_squares = Backend.adamw, Backend.sum_squares


def torch_parts(cfg, xs: np.ndarray, ys: np.ndarray, seed: int = 0) -> dict[str, Callable[[], object]]:
    import torch

    from benchmarks.torch_ref import TorchTrainer, forward_loss
    from twinlm.core import params as P
    from twinlm.core.optim import AdamWConfig

    opt = AdamWConfig()
    tr = TorchTrainer(cfg, opt, P.init_params(cfg, seed))
    x, y = torch.from_numpy(xs).long(), torch.from_numpy(ys).long()

    def fwd_bwd() -> None:
        tr.adamw.zero_grad(set_to_none=True)
        forward_loss(cfg, tr.params, x, y).backward()

    fwd_bwd()

    def update() -> None:  # on the gradients left by the last fwd+bwd (never cleared here)
        torch.nn.utils.clip_grad_norm_(tr.trained, opt.grad_clip)
        tr.adamw.step()

    def forward() -> None:
        with torch.no_grad():
            forward_loss(cfg, tr.params, x, y)

    return {"forward": forward, "fwd+bwd": fwd_bwd, "update": update, "step": lambda: tr.step(xs, ys, 0)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="baby")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5, help="calls per part per round")
    ap.add_argument("--libs", default="mlx,torch")
    args = ap.parse_args(argv)
    cfg = bench_config(args.preset)
    rng = np.random.default_rng(0)
    xs, ys = (rng.integers(0, cfg.vocab_size, (BATCH.get(args.preset, 12), cfg.block_size)).astype(np.int32)
              for _ in range(2))
    libs = args.libs.split(",")
    parts = {lib: (mlx_parts if lib == "mlx" else torch_parts)(cfg, xs, ys) for lib in libs}
    for fns in parts.values():  # warm-up: compile, first-touch allocations
        for fn in fns.values():
            fn(), fn()
    cells: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for lib, fns in parts.items():
            for name, fn in fns.items():
                cells.setdefault((lib, name), []).append(_timed(fn, args.calls))
    import os

    print(f"preset {args.preset}, batch {xs.shape[0]} x {cfg.block_size}; median of {args.rounds} rounds x "
          f"{args.calls} calls; load {os.getloadavg()[0]:.1f}")
    print(f"{'part':27s}" + "".join(f" {lib + ' ms':>10s} {lib + ' CPU':>10s}" for lib in libs))
    for name in ("forward", "fwd+bwd", "update", "step", "step, optimizer on MLX ops"):
        row = f"{name:27s}"
        for lib in libs:
            ts = cells.get((lib, name), [(float("nan"), float("nan"))])
            row += f" {statistics.median(t[0] for t in ts):10.2f} {statistics.median(t[1] for t in ts):10.2f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
