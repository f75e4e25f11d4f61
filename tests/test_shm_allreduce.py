"""The kernels' same-host shared-memory all-reduce (`shm_all_sum`, issue #23), with 2 and 3 real processes:
the sum equals numpy's rank-order sum bit for bit on every rank (vectors in several chunks, twice in a row,
inside mx.compile, and its VJP), with negative controls (no barrier reads stale slots; reverse rank order
is caught by the bitwise check on data where order matters); a dead or silent peer is one error line and
a non-zero exit, not a hang; the segment's name is gone afterwards; the mode and timeout settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from twinlm.backends import kernels, shm
from twinlm.core.errors import TwinlmError

mx = pytest.importorskip("mlx.core")
import twinlm.backends.mlx  # noqa: E402,F401  (the system BLAS before mlx.core, as every run)

K = kernels.load()
pytestmark = pytest.mark.skipif(K is None or not hasattr(K, "shm_all_sum"),
                                reason=f"kernels' shm_all_sum not built: {kernels.status().reason}")

# One rank: `python -c WORKER MODE NAME RANK SIZE N SLOT TIMEOUT FAULT DELAY OUT`.
WORKER = r"""
import sys, time
import numpy as np
from twinlm.backends import kernels
import twinlm.backends.mlx
import mlx.core as mx
mode, name = sys.argv[1], sys.argv[2]
rank, size, n, slot = (int(a) for a in sys.argv[3:7])
timeout, fault, delay, out = float(sys.argv[7]), int(sys.argv[8]), float(sys.argv[9]), sys.argv[10]
K = kernels.load()
def data(r, salt):  # magnitudes over 6 decades: the order of the sum changes its bits
    g = np.random.default_rng(1000 * salt + r)
    return (g.standard_normal(n) * 10.0 ** g.uniform(-3, 3, n)).astype(np.float32)
f = lambda v: K.shm_all_sum(v, name, rank, size, slot, timeout, fault)
mx.eval(f(mx.zeros((0,), mx.float32)))  # attach
if mode == "die":
    sys.exit(0)
if mode == "sleep":
    time.sleep(60)
    sys.exit(0)
time.sleep(delay)
step = mx.compile(f)
y1 = step(mx.array(data(rank, 1)))
mx.eval(y1)
y2 = step(mx.array(data(rank, 2)))
w = mx.array(data(rank, 3))
g = mx.grad(lambda v: mx.sum(f(v) * w))(mx.array(data(rank, 1)))
mx.eval(y2, g)
np.savez(out, y1=np.array(y1), y2=np.array(y2), g=np.array(g))
"""


def _data(r: int, salt: int, n: int) -> np.ndarray:
    g = np.random.default_rng(1000 * salt + r)
    return (g.standard_normal(n) * 10.0 ** g.uniform(-3, 3, n)).astype(np.float32)


def _rank_order_sum(size: int, salt: int, n: int) -> np.ndarray:
    total = _data(0, salt, n)
    for r in range(1, size):
        total = total + _data(r, salt, n)  # float32, left to right
    return total


def _start(tmp_path: Path, mode: str, name: str, rank: int, size: int, n: int, slot: int,
           timeout: float = 60.0, fault: int = 0, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "TWINLM_KERNEL_THREADS": "1"}
    args = [mode, name, rank, size, n, slot, timeout, fault, delay, tmp_path / f"rank{rank}.npz"]
    return subprocess.Popen([sys.executable, "-c", WORKER, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _segment(tag: str) -> str:
    return shm.segment_name(f"test-{tag}-{uuid.uuid4().hex[:8]}")


def _run(tmp_path: Path, size: int, n: int, slot: int, faults: dict[int, int] | None = None,
         delays: dict[int, float] | None = None) -> list[dict[str, np.ndarray]]:
    name = _segment("sum")
    procs = [_start(tmp_path, "sum", name, r, size, n, slot, fault=(faults or {}).get(r, 0),
                    delay=(delays or {}).get(r, 0.0)) for r in range(size)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert not Path("/dev/shm", name.lstrip("/")).exists()  # the last rank to attach removed the name
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(size)]


@pytest.mark.parametrize("size, n, slot", [(2, 10_007, 1000), (3, 5000, 4096)])
def test_sum_is_the_rank_order_sum_bit_for_bit_on_every_rank(size, n, slot, tmp_path):
    outs = _run(tmp_path, size, n, slot)  # several chunks, the last one partial
    for out in outs:
        np.testing.assert_array_equal(out["y1"], _rank_order_sum(size, 1, n))
        np.testing.assert_array_equal(out["y2"], _rank_order_sum(size, 2, n))  # the next call: slots reused
        np.testing.assert_array_equal(out["g"], _rank_order_sum(size, 3, n))  # VJP: the cotangents summed
        assert out["y1"].tobytes() == outs[0]["y1"].tobytes()


def test_negative_control_reverse_rank_order_is_caught(tmp_path):
    size, n = 3, 5000
    want = _rank_order_sum(size, 1, n)
    reverse = _data(2, 1, n) + _data(1, 1, n) + _data(0, 1, n)
    assert np.sum(reverse != want) > 10  # the data makes the order visible
    outs = _run(tmp_path, size, n, 4096, faults={r: 2 for r in range(size)})
    assert all(np.sum(o["y1"] != want) > 10 for o in outs)


def test_negative_control_skipped_barrier_reads_a_stale_slot(tmp_path):
    n = 3000
    # No rank waits, and rank 1 writes late: rank 0 sums its own data with rank 1's empty slot.
    outs = _run(tmp_path, 2, n, 1024, faults={0: 1, 1: 1}, delays={1: 1.0})
    np.testing.assert_array_equal(outs[0]["y1"], _data(0, 1, n) + 0.0)
    assert not np.array_equal(outs[0]["y1"], _rank_order_sum(2, 1, n))


@pytest.mark.parametrize("peer, timeout, said", [
    ("die", 60.0, "rank 1 (pid {pid}) died before the all-reduce"),
    ("sleep", 1.0, "rank 1 did not reach the all-reduce within 1.0 s")])
def test_dead_or_silent_peer_is_an_error_line_not_a_hang(peer, timeout, said, tmp_path):
    name = _segment(peer)
    other = _start(tmp_path, peer, name, 1, 2, 100, 64)
    try:
        t0 = time.monotonic()
        rank0 = _start(tmp_path, "sum", name, 0, 2, 100, 64, timeout=timeout)
        _, err = rank0.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        other.kill()
        other.wait()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rank0.returncode == 1 and lines and lines[-1].startswith("error: shm all-reduce (rank 0 of 2"), err
    assert said.format(pid=other.pid) in lines[-1] and "Traceback" not in err, err
    assert elapsed < 30, elapsed
    shm.unlink(name.split("allreduce-", 1)[1])


def test_bad_calls_raise_before_running():
    x = mx.zeros((4,), mx.float32)
    for args, message in [((x, "/t", 2, 2, 8, 1.0), "rank < size"), ((x, "no-slash", 0, 2, 8, 1.0), "name"),
                          ((x.astype(mx.float16), "/t", 0, 2, 8, 1.0), "float32 only"),
                          ((x, "/t", 0, 2, 0, 1.0), "slot_floats")]:
        with pytest.raises(ValueError, match=message):
            K.shm_all_sum(*args)


def test_mode_and_timeout_settings(monkeypatch):
    monkeypatch.delenv(shm.MODE_ENV, raising=False)
    assert shm.mode() == "auto"
    monkeypatch.setenv(shm.MODE_ENV, "Ring")
    assert shm.mode() == "ring"
    monkeypatch.setenv(shm.MODE_ENV, "tcp")
    with pytest.raises(TwinlmError, match="expected one of auto, shm, ring"):
        shm.mode()
    monkeypatch.setenv(shm.TIMEOUT_ENV, "0")
    with pytest.raises(TwinlmError, match="seconds > 0"):
        shm.timeout_s()
    assert shm.slot_floats(2) == 1 << 20 and 2 * 64 * shm.slot_floats(64) * 4 <= shm.SEGMENT_BYTES


class _Group:  # stands in for an mx.distributed group of 2
    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 2


def test_backend_choice_ring_without_the_launcher_and_shm_forced_is_an_error(monkeypatch):
    from twinlm.backends.mlx import _all_reduce

    monkeypatch.delenv(shm.ID_ENV, raising=False)
    monkeypatch.delenv(shm.MODE_ENV, raising=False)
    assert _all_reduce(None, K) == (None, "")  # one process
    assert _all_reduce(_Group(), K) == (None, "ring")  # ranks not started by twinlm: maybe on several hosts
    monkeypatch.setenv(shm.MODE_ENV, "shm")
    with pytest.raises(TwinlmError, match="not started by twinlm's launcher"):
        _all_reduce(_Group(), K)
    monkeypatch.setenv(shm.ID_ENV, "test-choice")
    with pytest.raises(TwinlmError, match="kernels are not active"):
        _all_reduce(_Group(), None)
    monkeypatch.setenv(shm.MODE_ENV, "ring")
    assert _all_reduce(_Group(), K) == (None, "ring")
    monkeypatch.setenv(shm.MODE_ENV, "auto")
    fn, kind = _all_reduce(_Group(), K)  # attaches as rank 0 of 2 (rank 1 never comes: nothing is summed)
    assert kind == "shm" and callable(fn)
    shm.unlink("test-choice")
