"""What the data-parallel all-reduce costs at a preset's size, apart from the step (issue #23).

    python -m benchmarks.allreduce                       # baby: 2 ranks, one vector of every gradient
    python -m benchmarks.allreduce --preset medium --ranks 2 --iters 20 --kind shm

Starts the ranks exactly as `twinlm train --ranks N` does (`trainer.distributed.launch`: cores // N BLAS
and kernel threads each), once per `--kind` of all-reduce ($TWINLM_ALLREDUCE): `ring` (mx.distributed's
ring backend over 127.0.0.1) and `shm` (the kernels' same-host shared-memory all-reduce, the default for
launched ranks). Each rank sums one float32 vector as long as the step's (every gradient, the loss and the
stop flag: `core.step.all_sum_fused`) through `MLXBackend.all_sum` inside mx.compile and evaluates it,
`--iters` times after 3 untimed calls; rank 0 prints the median wall ms and the process CPU ms per call
(all its threads: what the collective takes from the step's compute on a machine with no core to spare).
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
    if float(y[0]) != want or float(y[-1]) != want:  # the sum really crossed the ranks
        sys.exit(f"error: all_sum gave {float(y[0])}, expected {want}")
    if rank == 0:
        print(f"{preset_name} {B.all_reduce}: {size} ranks, {n:,} floats ({n * 4 / 1e6:.1f} MB) per call: "
              f"{statistics.median(walls):.2f} ms wall (p25-p75 {np.percentile(walls, 25):.2f}-"
              f"{np.percentile(walls, 75):.2f}), {statistics.median(cpus):.2f} ms CPU per call", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.allreduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="baby")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--kind", default="ring,shm", help="all-reduces to time, comma-separated: ring, shm")
    args = ap.parse_args(argv)
    if args.ranks < 2:
        ap.error("--ranks must be at least 2")
    kinds = [k.strip() for k in args.kind.split(",") if k.strip()]
    if not kinds or set(kinds) - {"ring", "shm"}:
        ap.error("--kind: ring, shm or both")
    if "MLX_RANK" in os.environ:  # one rank's job
        from twinlm.core.errors import TwinlmError

        try:
            _rank(args.preset, args.iters)
        except TwinlmError as e:  # e.g. --kind shm where it cannot run
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    from twinlm.backends import shm
    from twinlm.trainer import distributed as D

    argv_rank = ["--preset", args.preset, "--ranks", str(args.ranks), "--iters", str(args.iters)]
    code, before = 0, os.environ.get(shm.MODE_ENV)
    try:
        for kind in kinds:  # the launcher passes its environment on: the ranks read the kind there
            os.environ[shm.MODE_ENV] = kind
            code = code or D.launch(args.ranks, argv_rank, module="benchmarks.allreduce")
    finally:
        if before is None:
            os.environ.pop(shm.MODE_ENV, None)
        else:
            os.environ[shm.MODE_ENV] = before
    return code


if __name__ == "__main__":
    sys.exit(main())
