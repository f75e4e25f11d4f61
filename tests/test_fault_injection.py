"""A fault at every file-system operation of a save, as an exception and as a hard kill.

Every mutating call the checkpoint writer makes goes through `twinlm.core.atomic.fs`. A dry run of each
scenario's save records its operations; then, for each operation in turn, the save is repeated on a fresh
copy of the run with that one operation failing (OSError) or with the process SIGKILLing itself just
before it (in a forked child). After each: the previous checkpoint loads bit-identically, the latest and
best pointers resolve to whole checkpoints of the right content, no hidden work dir is taken for a
checkpoint, the next save removes every leftover, and training resumed from what is there continues
bit-identically. A naive in-place saver run through the same injector must be caught (negative control).

Run as a script (`python tests/test_fault_injection.py serve`), this module is also the fork server of
the kill variant: one fresh interpreter that forks a child per fault point.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinlm.core import atomic, checkpoint
from twinlm.core.checkpoint import (
    CheckpointError,
    best_checkpoint,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

END_STEP = 6  # the resumed run trains (and saves) up to here
KEEP = 2
# The operations an injector can fail; rmtree is not one: it is made of unlink and rmdir calls.
OPS = ("mkdir", "create", "mkstemp", "write", "fsync", "fsync_dir", "rename", "replace", "unlink", "rmdir")


class Kill(Exception):
    """Stands for SIGKILL where the injector runs in the test process (never raised in kill mode)."""


class Injector(atomic.FileOps):
    """Records each mutating operation; the one numbered `at` fails with `error` or kills the process
    (and later operations named in `then_fail` fail too: a disk that stays full)."""

    def __init__(self, root: Path, at: int | None = None, mode: str = "raise",
                 error: OSError | None = None, then_fail: frozenset[str] = frozenset()) -> None:
        self.root, self.at, self.mode, self.then_fail = root, at, mode, then_fail
        self.error = error or OSError(errno.EIO, "injected I/O error")
        self.ops: list[str] = []
        self.fired = False
        self.temp_names: dict[int, str] = {}  # a mkstemp file object is named by its descriptor

    def _tick(self, op: str, path: Any) -> None:
        n = len(self.ops)
        name = path if isinstance(path, (str, os.PathLike)) else path.name  # a file object names its path
        self.ops.append(f"{op} {_label(self.root, self.temp_names.get(name, name))}")
        if self.at is not None and (n == self.at or (n > self.at and op in self.then_fail)):
            self.fired = True
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise self.error


def _label(root: Path, path: Any) -> str:
    try:
        rel = str(Path(path).relative_to(root))
    except ValueError:
        rel = str(path)
    return re.sub(r"(ckpt-\d{8}|\.json)-[0-9a-z_]{8}", r"\1-*", rel)  # uuid / mkstemp suffixes vary


def _wrap(op: str) -> Callable[..., Any]:
    def method(self: Injector, *args: Any, **kwargs: Any) -> Any:
        self._tick(op, args[0] if op != "mkstemp" else Path(args[0]) / kwargs.get("prefix", args[-1]))
        result = getattr(atomic.FileOps, op)(self, *args, **kwargs)
        if op == "mkstemp":
            self.temp_names[result[0].name] = result[1]
        return result
    return method


for _op in OPS:
    setattr(Injector, _op, _wrap(_op))
Injector.reopen = _wrap("reopen")  # only the token cache's resume uses it (tests/test_prepare_stream.py)


# ---- a toy training run whose state is a pure function of (version, step) -----------------------------

def initial_state(version: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(version)
    w = rng.standard_normal((8, 8), dtype=np.float32)
    w.flat[:3] = [-0.0, np.float32(1e-45), np.inf]  # bit patterns a lossy path would change
    return {"param.w": w, "m.w": rng.standard_normal(64, dtype=np.float32) * 1e-3,
            "v.w": np.float16(rng.random(7)), "param.ids": rng.integers(0, 97, (3, 2), dtype=np.int32),
            "param.scalar": np.float32(version)}


def advance(state: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """One 'training step': every array changes, in its own dtype, as a function of the previous state."""
    s = np.float32(step)
    return {"param.w": state["param.w"] * np.float32(0.99) + s * np.float32(1e-3),
            "m.w": state["m.w"] * np.float32(0.9) + state["param.w"].reshape(-1) * np.float32(0.1),
            "v.w": (state["v.w"] * np.float16(0.5) + np.float16(step % 3)).astype(np.float16),
            "param.ids": (state["param.ids"] * 3 + step) % 97,
            "param.scalar": np.float32(state["param.scalar"] + s)}


def state_at(version: int, step: int) -> dict[str, np.ndarray]:
    state = initial_state(version)
    for t in range(1, step + 1):
        state = advance(state, t)
    return state


def meta_of(version: int, step: int, best: bool = False) -> dict[str, Any]:
    return {"version": version, "step": step, "best": best, "batcher": {"pos": step * 7}}


def same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return set(got) == set(want) and all(
        got[k].dtype == np.asarray(w).dtype and got[k].shape == np.shape(w)
        and got[k].tobytes() == np.asarray(w).tobytes() for k, w in want.items())


# ---- scenarios: a prepared run dir and the one save that is faulted -----------------------------------

@dataclass(frozen=True)
class Scenario:
    name: str
    saves: tuple[tuple[int, int, bool], ...]  # (version, step, best) saved before, with keep=None
    target: tuple[int, int, bool]  # (version, step, best) of the faulted save (keep=KEEP)
    leftovers: bool = False  # debris of an earlier interrupted save lies in the run dir

    def prepare(self, run_dir: Path) -> None:
        for version, step, best in self.saves:
            save_checkpoint(run_dir, state_at(version, step), meta_of(version, step, best), step=step,
                            keep=None, best=best)
        if self.leftovers:
            junk = run_dir / ".tmp-ckpt-00000009-deadbeef"
            junk.mkdir()
            (junk / "state.safetensors").write_bytes(b"half a file")
            (run_dir / ".tmp-latest.json-k2j4h1x0").write_text('{"checkpoint": "ckpt-0')

    def previous(self) -> tuple[int, int, bool]:
        return self.saves[-1]


SCENARIOS = (
    # a new step: cleans the debris of a crash, builds, commits, moves latest and best, prunes two
    Scenario("new-step", saves=((0, 1, False), (0, 2, True), (0, 3, False)), target=(0, 4, True),
             leftovers=True),
    # the same step saved again (after a resume, with other content): the best pointer to it is dropped,
    # the old dir set aside, the new one renamed in, the old one deleted
    Scenario("same-step", saves=((0, 1, False), (0, 2, True)), target=(1, 2, False)),
)


Saver = Callable[..., Any]


def target_save(scn: Scenario, run_dir: Path, saver: Saver) -> None:
    version, step, best = scn.target
    saver(run_dir, state_at(version, step), meta_of(version, step, best), step=step, keep=KEEP, best=best)


def naive_save(run_dir: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], *, step: int,
               keep: int, best: bool) -> None:
    """The negative control: every file written in place, old checkpoints deleted in place."""
    final = run_dir / checkpoint_name(step)
    atomic.fs.mkdir(final, exist_ok=True)
    state, meta_b = checkpoint._safetensors_bytes(arrays), atomic.json_bytes(meta)
    atomic.write_file_synced(final / checkpoint.STATE_FILE, state)
    atomic.write_file_synced(final / checkpoint.META_FILE, meta_b)
    manifest = {"format": 1, "step": step, "files": {checkpoint.STATE_FILE: checkpoint._digest(state),
                                                     checkpoint.META_FILE: checkpoint._digest(meta_b)}}
    atomic.write_file_synced(final / checkpoint.MANIFEST_FILE, atomic.json_bytes(manifest))
    pointer = atomic.json_bytes({"checkpoint": final.name, "step": step})
    atomic.write_file_synced(run_dir / checkpoint.LATEST_FILE, pointer)
    if best:
        atomic.write_file_synced(run_dir / checkpoint.BEST_FILE, pointer)
    for _, path in checkpoint._checkpoints(run_dir)[:-keep]:
        if path.name not in (final.name, checkpoint._pointer_name(run_dir / checkpoint.BEST_FILE)):
            atomic.fs.rmtree(path)


SAVERS: dict[str, Saver] = {"twinlm": save_checkpoint, "naive": naive_save}


# ---- what must hold after a fault ---------------------------------------------------------------------

def check_run(scn: Scenario, run_dir: Path) -> list[str]:
    """Problems found in a run dir after a faulted save (empty: it survived)."""
    problems: list[str] = []
    prev_v, prev_s, _ = scn.previous()
    new_v, new_s, new_best = scn.target
    try:
        loaded, meta = load_checkpoint(run_dir)
    except CheckpointError as e:
        return [f"the latest checkpoint does not load: {e}"]
    latest = latest_checkpoint(run_dir)
    if latest is None or latest.name.startswith((checkpoint._TMP, checkpoint._DEL)):
        problems.append(f"latest resolves to {latest}")
    if (meta["version"], meta["step"]) not in ((prev_v, prev_s), (new_v, new_s)):
        problems.append(f"latest is neither the previous nor the new checkpoint: {meta}")
    if not same_arrays(loaded, state_at(meta["version"], meta["step"])):
        problems.append("latest checkpoint's arrays differ from what was saved")
    if prev_s != new_s:  # a new step never prunes the previous one (KEEP >= 2)
        try:
            arrays, _ = load_checkpoint(run_dir / checkpoint_name(prev_s))
            if not same_arrays(arrays, state_at(prev_v, prev_s)):
                problems.append("the previous checkpoint changed")
        except CheckpointError as e:
            problems.append(f"the previous checkpoint is lost: {e}")
    for ckpt in sorted(run_dir.glob("ckpt-*")):  # every dir that looks like a checkpoint is whole
        if (ckpt / checkpoint.MANIFEST_FILE).exists():
            try:
                arrays, m = load_checkpoint(ckpt)
                if not same_arrays(arrays, state_at(m["version"], m["step"])):
                    problems.append(f"{ckpt.name} holds other arrays than its meta says")
            except CheckpointError as e:
                problems.append(f"a visible checkpoint is damaged: {e}")
    best = best_checkpoint(run_dir)
    if best is not None:
        try:
            _, m = load_checkpoint(best)
            if not m["best"]:
                problems.append(f"best.json names a checkpoint not saved as best: {m}")
        except CheckpointError as e:
            problems.append(f"best.json names a damaged checkpoint: {e}")
    if problems:
        return problems
    return check_resume(run_dir, loaded, meta)


def check_resume(run_dir: Path, loaded: dict[str, np.ndarray], meta: dict[str, Any]) -> list[str]:
    """Train on from what was loaded to END_STEP, saving each step; the result must be bit-identical to
    an uninterrupted run, and the first save must clear every leftover of the faulted one."""
    version, state = meta["version"], loaded
    for step in range(meta["step"] + 1, END_STEP + 1):
        state = advance(state, step)
        save_checkpoint(run_dir, state, meta_of(version, step), step=step, keep=KEEP)
        debris = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))
        if debris:
            return [f"the next save left {debris}"]
    arrays, meta = load_checkpoint(run_dir)
    if meta["step"] != END_STEP or not same_arrays(arrays, state_at(version, END_STEP)):
        return ["the resumed run does not continue bit-identically"]
    return []


# ---- running the points ----------------------------------------------------------------------------

def record_ops(scn: Scenario, base: Path, saver: Saver) -> list[str]:
    """The operations of the scenario's save, in order (a dry run without a fault)."""
    run_dir = base / f"dry-{scn.name}"
    scn.prepare(run_dir)
    spy = Injector(run_dir)
    old, atomic.fs = atomic.fs, spy
    try:
        target_save(scn, run_dir, saver)
    finally:
        atomic.fs = old
    return spy.ops


def fault_in_process(scn: Scenario, run_dir: Path, at: int, saver: Saver) -> str | None:
    """Fail operation `at` with OSError; None if the save then failed cleanly, else what went wrong."""
    scn.prepare(run_dir)
    injector = Injector(run_dir, at=at)
    old, atomic.fs = atomic.fs, injector
    try:
        target_save(scn, run_dir, saver)
    except CheckpointError:
        pass
    except OSError as e:
        if saver is save_checkpoint:
            return f"an OSError escaped the saver: {e!r}"
    finally:
        atomic.fs = old
    return None if injector.fired else "the fault never fired"


def serve(jobs: list[dict[str, Any]]) -> None:
    """Fork server: for each job, fork a child that runs the save and SIGKILLs itself at operation
    `at`; print one JSON line per job with how the child ended."""
    for job in jobs:
        scn = next(s for s in SCENARIOS if s.name == job["scenario"])
        run_dir = Path(job["run_dir"])
        pid = os.fork()
        if pid == 0:  # the child: nothing but the save, then an exit that skips all clean-up
            try:
                atomic.fs = Injector(run_dir, at=job["at"], mode="kill")
                target_save(scn, run_dir, SAVERS[job["saver"]])
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"run_dir": job["run_dir"], "signal": os.WTERMSIG(status)
                          if os.WIFSIGNALED(status) else None}), flush=True)


def kill_at_each(points: list[tuple[Scenario, int]], base: Path, saver: str) -> dict[Path, int | None]:
    """Prepare a run dir per point, kill a child at each point, return {run_dir: signal}."""
    jobs = []
    for scn, at in points:
        run_dir = point_dir(base, f"kill-{saver}", scn, at)
        scn.prepare(run_dir)
        jobs.append({"scenario": scn.name, "run_dir": str(run_dir), "at": at, "saver": saver})
    proc = subprocess.run([sys.executable, __file__, "serve"], input=json.dumps(jobs), capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr
    return {Path(r["run_dir"]): r["signal"] for r in map(json.loads, proc.stdout.splitlines())}


def all_points(base: Path, saver: Saver) -> list[tuple[Scenario, int, str]]:
    return [(scn, i, op) for scn in SCENARIOS for i, op in enumerate(record_ops(scn, base, saver))]


def test_the_dry_runs_cover_every_kind_of_operation(tmp_path) -> None:
    points = all_points(tmp_path, save_checkpoint)
    kinds = {op.split()[0] for _, _, op in points}
    assert kinds == set(OPS) and len(points) >= 30, kinds
    labels = [op for _, _, op in points]
    for needle in ("rename .tmp-ckpt-00000004-*", "replace .tmp-best.json-*", "unlink best.json",
                   "unlink .del-ckpt-00000001-*/state.safetensors", "rmdir .old-ckpt-00000002-*",
                   "unlink .tmp-latest.json-*", "fsync_dir .tmp-ckpt-00000004-*",
                   "mkstemp .tmp-latest.json-"):
        assert needle in labels, (needle, labels)


def point_dir(base: Path, tag: str, scn: Scenario, at: int) -> Path:
    return base / f"{tag}-{scn.name}-{at:03d}"


def survivors(points: list[tuple[Scenario, int, str]], faulted: Callable[[Scenario, int], list[str]],
              run_dir: Callable[[Scenario, int], Path], mode: str) -> None:
    """Check every point's run dir after its fault (`faulted` gives the problems of the fault itself)."""
    failures = []
    for scn, at, op in points:
        problems = faulted(scn, at) or check_run(scn, run_dir(scn, at))
        if problems:
            failures.append(f"{scn.name} #{at} ({op}): {problems}")
    print(f"\nfault injection ({mode}): {len(points)} points, {len(points) - len(failures)} survived")
    assert not failures, "\n".join(failures)


def test_an_exception_at_every_operation_of_a_save_loses_nothing(tmp_path) -> None:
    def run_dir(scn: Scenario, at: int) -> Path:
        return point_dir(tmp_path, "raise-twinlm", scn, at)

    def faulted(scn: Scenario, at: int) -> list[str]:
        problem = fault_in_process(scn, run_dir(scn, at), at, save_checkpoint)
        return [problem] if problem else []
    survivors(all_points(tmp_path, save_checkpoint), faulted, run_dir, "exception")


def test_a_kill_at_every_operation_of_a_save_loses_nothing(tmp_path) -> None:
    points = all_points(tmp_path, save_checkpoint)
    signals = kill_at_each([(scn, at) for scn, at, _ in points], tmp_path, "twinlm")

    def run_dir(scn: Scenario, at: int) -> Path:
        return point_dir(tmp_path, "kill-twinlm", scn, at)

    def faulted(scn: Scenario, at: int) -> list[str]:
        got = signals[run_dir(scn, at)]
        return [] if got == signal.SIGKILL else [f"the child ended with signal {got}, not SIGKILL"]
    survivors(points, faulted, run_dir, "kill")


@pytest.mark.filterwarnings("ignore::twinlm.core.checkpoint.CheckpointWarning")  # it breaks latest.json
def test_a_naive_in_place_saver_is_caught(tmp_path) -> None:
    """Negative control: the same injector and checks catch a saver that writes in place."""
    points = all_points(tmp_path, naive_save)
    caught_raise = 0
    for scn, at, _ in points:
        run_dir = point_dir(tmp_path, "raise-naive", scn, at)
        assert fault_in_process(scn, run_dir, at, naive_save) is None
        caught_raise += bool(check_run(scn, run_dir))
    signals = kill_at_each([(scn, at) for scn, at, _ in points], tmp_path, "naive")
    caught_kill = sum(bool(check_run(scn, point_dir(tmp_path, "kill-naive", scn, at)))
                      for scn, at, _ in points)
    print(f"\nnaive saver caught at {caught_raise} (exception), {caught_kill} (kill) of {len(points)} points")
    assert set(signals.values()) == {signal.SIGKILL}
    assert caught_raise >= 3 and caught_kill >= 3


# ---- disk full -----------------------------------------------------------------------------------------

def test_disk_full_fails_cleanly_and_keeps_the_previous_checkpoint(tmp_path) -> None:
    scn = SCENARIOS[0]
    ops = record_ops(scn, tmp_path, save_checkpoint)
    first_write = next(i for i, op in enumerate(ops) if op.startswith("write"))
    run_dir = tmp_path / "full"
    scn.prepare(run_dir)
    before = tree_digest(run_dir)
    full = Injector(run_dir, at=first_write, error=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                    then_fail=frozenset({"mkdir", "create", "mkstemp", "write", "fsync"}))
    old, atomic.fs = atomic.fs, full
    try:
        try:
            target_save(scn, run_dir, save_checkpoint)
            raise AssertionError("a save on a full disk succeeded")
        except CheckpointError as e:
            message = str(e)
    finally:
        atomic.fs = old
    assert message == f"cannot write checkpoint 4 in {run_dir}: No space left on device"
    visible = {k: v for k, v in tree_digest(run_dir).items() if not k.startswith(".")}
    assert visible == {k: v for k, v in before.items() if not k.startswith(".")}
    assert not list(run_dir.glob(".tmp-ckpt-00000004-*"))  # the half-written dir is given back at once
    assert check_run(scn, run_dir) == []  # once there is room again, the next save cleans up and goes on


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve(json.load(sys.stdin))
