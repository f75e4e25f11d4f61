"""Data-parallel training: which rows a rank takes, the local launcher behind `--ranks N`, and its watchdog.

Semantics that do not change with the number of ranks N: every rank draws the SAME global batch and the
same dropout masks (for every row, as one process would) and keeps its contiguous slice of rows; its loss
is scaled by its share of the global loss weight (`share`: its tokens, or its weighted targets, over the
global count), so the sum over ranks of the scaled losses and gradients is exactly the single-process
loss and gradient, up to float32 reassociation; not an average of per-rank averages. One all-reduce per
step carries the loss, a stop flag and every gradient (`core.step.make_train_step(all_sum=...)`).

MLX runs one process per rank on `mx.distributed` (the ring backend: `MLX_RANK` and `MLX_HOSTFILE`,
which `mlx.launch` sets too); ranks started here sum through shared memory instead of the ring's TCP
loopback (`$TWINLM_SHM_ID`, one per launch; see twinlm.backends.shm). `launch` starts N local ranks,
gives each cores // N BLAS threads, and watches them: a rank that exits non-zero or stops reporting
progress ends the whole run with one line naming it; the others are killed, so a run never hangs on a
dead peer. Rank 0 alone writes checkpoints, metrics and the progress bar, so the last checkpoint is
always one rank 0 completed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from twinlm.backends import shm
from twinlm.core.errors import TwinlmError

RANK_ENV = "TWINLM_RANK"  # set by `launch` in each rank (MLX_RANK is MLX's own)
HEARTBEAT_ENV = "TWINLM_HEARTBEAT"  # folder where each rank records the iterations it finished
SKIP_ENV = "TWINLM_SKIP_ALLREDUCE"  # negative control for tests: ranks skip the all-reduce
TIMEOUT_ENV = "TWINLM_RANK_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0  # no step finished on some rank for this long: the run is declared hung
FIRST_STEP_GRACE_S = 300.0  # added for set-up and the first (compiling) step
POLL_S = 0.2
BAD_INPUT = 2  # the CLI's exit status for bad input (one `error:` line)
Batch = dict[str, np.ndarray]


class RankFailed(TwinlmError):
    """A rank died or hung; the message names it."""


# ---- which rows a rank takes ----------------------------------------------------------------
def loss_weight(batch: Batch) -> float:
    """What a task's loss is a mean over: the weighted targets (`w`, 0/1) if it has them, else every
    target position (a plain mean over tokens)."""
    return float(np.sum(batch["w"])) if "w" in batch else float(np.asarray(batch["y"]).size)


def sharder(rank: int, size: int, accum: bool) -> Callable[[Batch, Batch], tuple[Batch, Batch]]:
    """`shard(batch, masks) -> (rank's batch + "share", rank's masks)`: rank's contiguous rows of the global
    batch (axis 1 under gradient accumulation, whose batches are (A, b, ...)). `share` (per micro-batch
    under accumulation) is the rank's loss weight over the global one: the factor that makes the sum over
    ranks of rank losses the global loss."""
    axis = 1 if accum else 0

    def shard(batch: Batch, masks: Batch) -> tuple[Batch, Batch]:
        rows = batch["x"].shape[axis]
        if rows % size:
            raise TwinlmError(f"batch size {rows} does not split evenly over {size} ranks")
        lo, hi = rank * rows // size, (rank + 1) * rows // size
        part = {k: np.ascontiguousarray(np.take(v, np.arange(lo, hi), axis=axis)) for k, v in batch.items()}
        if accum:
            micro = [({k: v[a] for k, v in batch.items()}, {k: v[a] for k, v in part.items()})
                     for a in range(batch["x"].shape[0])]
            share = np.array([_ratio(loss_weight(p), loss_weight(g)) for g, p in micro], np.float32)
        else:
            share = np.asarray(_ratio(loss_weight(part), loss_weight(batch)), np.float32)
        drop = {k: np.ascontiguousarray(np.take(m, np.arange(lo, hi), axis=axis)) for k, m in masks.items()}
        return {**part, "share": share}, drop

    return shard


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def skip_all_reduce() -> bool:
    """The tests' negative control: every rank updates from its own slice alone."""
    return os.environ.get(SKIP_ENV) == "1"


# ---- progress reports (read by the launcher's watchdog) ---------------------------------------
class Heartbeat:
    """Each rank writes the iteration it starts to `$TWINLM_HEARTBEAT/rank-R.start` and the last one it
    finished to `rank-R` (a no-op when unset). A rank that never started the step its peers wait in is
    the one the watchdog names."""

    def __init__(self, rank: int) -> None:
        folder = os.environ.get(HEARTBEAT_ENV)
        self.path = Path(folder) / f"rank-{rank}" if folder else None

    def start(self, it: int) -> None:
        if self.path is not None:
            _write(self.path.with_name(self.path.name + ".start"), it)

    def beat(self, it: int) -> None:
        if self.path is not None:
            _write(self.path, it)


def _write(path: Path, it: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(it))
    os.replace(tmp, path)


# ---- the local launcher ------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def rank_threads(ranks: int) -> int:
    """BLAS threads per rank so that ranks x threads fits the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // ranks)


def launch(ranks: int, argv: Sequence[str], *, timeout_s: float | None = None,
           module: str = "twinlm.cli.main") -> int:
    """Run `python -m MODULE ARGV` as `ranks` local MLX ranks over the ring backend and wait.
    Returns rank 0's exit status (also when rank 0 stopped on bad input, which it reported in its own
    `error:` line); raises RankFailed (after killing every rank) when a rank exits non-zero first, or no
    rank finishes a step for `timeout_s` seconds. Ranks > 0 print nothing: their stderr is kept, and the
    last `error:` line of a failed one goes into the RankFailed message."""
    timeout_s = timeout_s or float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    launch_id = shm.new_id()  # names this launch's shared-memory all-reduce segment (all ranks are local)
    with tempfile.TemporaryDirectory(prefix="twinlm-ranks-") as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(ranks)]))
        beats = Path(tmp) / "beats"
        beats.mkdir()
        threads = str(rank_threads(ranks))
        procs: list[subprocess.Popen] = []
        logs = [Path(tmp) / f"rank-{r}.err" for r in range(ranks)]
        for r in range(ranks):
            env = {**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile), RANK_ENV: str(r),
                   HEARTBEAT_ENV: str(beats), "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
                   shm.ID_ENV: launch_id}
            quiet = r > 0  # rank 0 reports; the others would repeat it
            with open(logs[r], "wb") as err:
                procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env,
                                              stdout=subprocess.DEVNULL if quiet else None,
                                              stderr=err if quiet else None,
                                              stdin=subprocess.DEVNULL if quiet else None))
        # Ctrl-C reaches every rank (one process group); they stop together after the same step.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return _watch(procs, beats, timeout_s, logs)
        finally:
            signal.signal(signal.SIGINT, previous)
            _kill_all(procs)
            shm.unlink(launch_id)  # normally gone already (the last rank to attach removes the name)


def _watch(procs: list[subprocess.Popen], beats: Path, timeout_s: float, logs: list[Path]) -> int:
    start = time.monotonic()
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes)
                  if c not in (None, 0) and not (c == 130 and all(x in (None, 130) for x in codes))]
        if failed:
            # The cause, not a consequence: a rank killed by a signal makes its peers fail too (a lost
            # ring connection), and by the time we look they may all have exited.
            r, c = min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))  # type: ignore[operator]
            if c == BAD_INPUT and _rank0_exit(procs[0]) == BAD_INPUT:
                _kill_all(procs)
                return BAD_INPUT  # every rank refused the same input; rank 0 said why in one line
            _kill_all(procs)
            said = _last_error(logs[r]) if r > 0 else ""
            raise RankFailed(f"rank {r} {_how(c)} at iter {_last_iter(beats, r)}{said}; stopped all "
                             f"{len(procs)} ranks (the last checkpoint is intact; resume with --resume)")
        if all(c is not None for c in codes):
            return codes[0]  # type: ignore[return-value]
        now, elapsed = time.time(), time.monotonic() - start
        ages = [_age(beats / f"rank-{r}", now) for r in range(len(procs))]
        # Before its first finished step a rank also gets the set-up and compile grace.
        stale = [r for r, a in enumerate(ages) if codes[r] is None
                 and (a > timeout_s if a is not None else elapsed > timeout_s + FIRST_STEP_GRACE_S)]
        if stale:
            # The culprit: the rank that got least far (started, then finished), then the longest silent.
            r = min(stale, key=lambda i: (_last_iter(beats, i, ".start"), _last_iter(beats, i),
                                          -(ages[i] or 0.0)))
            _kill_all(procs)
            raise RankFailed(f"rank {r} made no progress for {timeout_s:.0f} s (last finished iter "
                             f"{_last_iter(beats, r)}); stopped all {len(procs)} ranks (the last checkpoint "
                             "is intact; resume with --resume)")
        time.sleep(POLL_S)


def _rank0_exit(rank0: subprocess.Popen, wait_s: float = 5.0) -> int | None:
    try:
        return rank0.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return None


def _last_error(log: Path) -> str:
    """` (<message>)` from the last `error:` line a rank wrote, or nothing."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("error: ")]
    except OSError:
        return ""
    return f" ({lines[-1][len('error: '):]})" if lines else ""


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _age(path: Path, now: float) -> float | None:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _last_iter(beats: Path, rank: int, suffix: str = "") -> int:
    try:
        return int((beats / f"rank-{rank}{suffix}").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
