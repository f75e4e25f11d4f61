"""What the data-parallel all-reduce costs at a preset's size, apart from the step (issue #23).

    python -m benchmarks.allreduce                       # baby: 2 ranks, one vector of every gradient
    python -m benchmarks.allreduce --preset medium --ranks 2 --iters 20

Starts the ranks exactly as `twinlm train --ranks N` does (`trainer.distributed.launch`: the ring backend
over 127.0.0.1, cores // N BLAS and kernel threads each). Each rank sums one float32 vector as long as
the step's (every gradient, the loss and the stop flag: `core.step.all_sum_fused`) with
`mx.distributed.all_sum` and evaluates it, `--iters` times after 3 untimed calls; rank 0 prints the median
wall ms and the process CPU ms per call (all its threads: what the collective takes from the step's
compute on a machine with no core to spare).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _rank(preset_name: str, iters: int) -> None:
    import numpy as np

    from twinlm.backends import get_backend

    B = get_backend("mlx")  # loads the system OpenBLAS before mlx.core, and joins the group
    import mlx.core as mx

    from twinlm.core import params as P
    from twinlm.core.config import preset

    rank, size = B.world()
    cfg = preset(preset_name, vocab_size=65)
    n = 2 + sum(int(np.prod(v.shape)) for v in P.init_params(cfg, 0).values())
    x = mx.array(np.full(n, rank + 1.0, dtype=np.float32))
    f = mx.compile(B.all_sum)  # as the step runs it: inside mx.compile
    for _ in range(3):
        mx.eval(f(x))
    walls, cpus = [], []
    for _ in range(iters):
        w, c = time.perf_counter(), time.process_time()
        y = f(x)
        mx.eval(y)
        walls.append((time.perf_counter() - w) * 1e3)
        cpus.append((time.process_time() - c) * 1e3)
    want = size * (size + 1) / 2
    if float(y[0]) != want:  # the sum really crossed the ranks
        sys.exit(f"error: all_sum gave {float(y[0])}, expected {want}")
    if rank == 0:
        print(f"{preset_name}: {size} ranks, {n:,} floats ({n * 4 / 1e6:.1f} MB) per all-reduce: "
              f"{statistics.median(walls):.2f} ms wall (p25-p75 {np.percentile(walls, 25):.2f}-"
              f"{np.percentile(walls, 75):.2f}), {statistics.median(cpus):.2f} ms CPU per call", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.allreduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="baby")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    if args.ranks < 2:
        ap.error("--ranks must be at least 2")
    if "MLX_RANK" in os.environ:  # one rank's job
        _rank(args.preset, args.iters)
        return 0
    from twinlm.trainer import distributed as D

    argv_rank = ["--preset", args.preset, "--ranks", str(args.ranks), "--iters", str(args.iters)]
    return D.launch(args.ranks, argv_rank, module="benchmarks.allreduce")


if __name__ == "__main__":
    sys.exit(main())
