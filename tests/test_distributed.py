"""Data-parallel training: N ranks x batch b/N equal one rank x batch b (losses within 1e-5, every parameter
within 1e-4 after 10 AdamW steps), with negative controls; a killed rank ends the whole run with one line
naming it, the last checkpoint loads and resumes with another rank count; bad --ranks/--beam input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import backend_or_skip, run_cli

from twinlm.core import dropout
from twinlm.core import step as S
from twinlm.core.checkpoint import load_checkpoint
from twinlm.trainer import TrainConfig, Trainer, task_loss
from twinlm.trainer import distributed as D

LOSS_TOL, PARAM_TOL = 1e-5, 1e-4
TEXT = "".join(f"line {i}: the {['quick', 'lazy', 'brown'][i % 3]} fox jumps over {i * 7 % 13} dogs.\n"
               for i in range(300))
# 10 AdamW steps of a tiny model with dropout on, logging every loss.
ARGS = ["train", "--preset", "tiny", "--block-size", "16", "--batch-size", "8", "--max-iters", "10",
        "--eval-every", "10", "--eval-iters", "2", "--log-every", "1", "--warmup", "2", "--dropout", "0.1",
        "--seed", "3"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TWINLM_BACKEND", "TWINLM_DEBUG", "MLX_RANK",
                                                              D.SKIP_ENV)}
    return {**env, "TWINLM_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200", **extra}


def twinlm(tmp_path: Path, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinlm.cli.main", *args], capture_output=True, text=True,
                          env=_env(tmp_path, **env), cwd=tmp_path, timeout=timeout)


def _losses(run: Path) -> np.ndarray:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in rows if r["event"] == "train"])


def _params(run: Path) -> dict[str, np.ndarray]:
    arrays, _ = load_checkpoint(run)
    return {k: v for k, v in arrays.items() if k.startswith("param.")}


def _worst(a: Path, b: Path) -> tuple[float, float]:
    """(max |loss difference|, max |parameter difference|) of two finished runs."""
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == 10
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    return float(np.max(np.abs(la - lb))), max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)


# ---- the exact loss shares, in one process -----------------------------------------------------
@pytest.mark.parametrize("arch, accum", [("gpt", 1), ("bert", 1), ("bert", 2)])
def test_rank_shares_sum_to_the_global_loss_and_gradient(arch, accum, corpus, tmp_path, monkeypatch):
    """Each rank's slice, scaled by its share (per micro-batch under accumulation), sums to the one-batch
    loss and gradient; BERT's masked-LM loss is a weighted mean, where the negative control (an average of
    per-rank averages) is caught."""
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))
    B = backend_or_skip("mlx")
    t = Trainer(TrainConfig(data=str(corpus), arch=arch, preset="tiny", block_size=16, batch_size=8,
                            grad_accum=accum, dropout=0.1, eval_iters=1, out=str(tmp_path / "run")), B,
                log=lambda m: None)
    grads_of = S.grad_part(B, t.spec, task_loss(B, t.cfg, t.task, accum))
    params = t.params()
    batch = t._batch(0)
    masks = dropout.masks(t.cfg, 8 * accum, 16, seed=1, step=0)
    if accum > 1:
        masks = {k: m.reshape(accum, 8, *m.shape[1:]) for k, m in masks.items()}
    shard = [D.sharder(r, 4, accum=accum > 1) for r in range(4)]

    def run(b: dict, m: dict) -> tuple[float, dict[str, np.ndarray]]:
        loss, g = grads_of(params, {k: B.from_numpy(v) for k, v in b.items()},
                           {k: B.from_numpy(v) for k, v in m.items()})
        return float(B.to_numpy(loss)), {k: B.to_numpy(v) for k, v in g.items()}

    want_loss, want = run(batch, masks)
    parts = [run(*shard[r](batch, masks)) for r in range(4)]
    got_loss = sum(p[0] for p in parts)
    got = {k: sum(p[1][k] for p in parts) for k in want}
    assert abs(got_loss - want_loss) < LOSS_TOL
    assert max(float(np.max(np.abs(got[k] - want[k]))) for k in want) < LOSS_TOL
    # Negative control: equal shares (1/N of each rank's own mean), i.e. an average of averages.
    naive = []
    for r in range(4):
        b, m = shard[r](batch, masks)
        naive.append(run({**b, "share": np.full_like(b["share"], 0.25)}, m)[0])
    if arch == "bert":
        assert abs(sum(naive) - want_loss) > 10 * LOSS_TOL
    else:  # a plain mean over tokens: equal shares are exact
        assert abs(sum(naive) - want_loss) < LOSS_TOL


def test_sharder_splits_rows_and_masks_and_refuses_uneven_batches():
    x = np.arange(24, dtype=np.int32).reshape(2, 3, 4)  # (A, b, T) under accumulation
    w = np.array([[[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]],
                 np.float32)
    b, m = D.sharder(1, 3, accum=True)({"x": x, "y": x, "w": w}, {"attn": np.ones((2, 3, 5), np.float32)})
    assert np.array_equal(b["x"], x[:, 1:2]) and m["attn"].shape == (2, 1, 5)
    np.testing.assert_allclose(b["share"], [2 / 3, 0.0])
    with pytest.raises(Exception, match="does not split evenly"):
        D.sharder(0, 2, accum=False)({"x": x[0], "y": x[0]}, {})


# ---- MLX: 2 processes on mx.distributed --------------------------------------------------------
def test_mlx_two_ranks_equal_one_rank_and_skipping_the_all_reduce_is_caught(corpus, tmp_path):
    backend_or_skip("mlx")
    one = twinlm(tmp_path, *ARGS, "--backend", "mlx", "--data", str(corpus), "--out", "one")
    assert one.returncode == 0, one.stderr
    two = twinlm(tmp_path, *ARGS, "--backend", "mlx", "--data", str(corpus), "--out", "two", "--ranks", "2")
    assert two.returncode == 0, two.stderr
    assert "2 ranks" in two.stdout and two.stdout.count("done: iter 10") == 1  # rank 0 alone reports
    dl, dp = _worst(tmp_path / "one", tmp_path / "two")
    assert dl < LOSS_TOL and dp < PARAM_TOL, (dl, dp)
    # The same-host shared-memory all-reduce (the default for launched ranks when the kernels are built)
    # and the ring give the same bits: two summands in rank order, as the ring adds them.
    ring = twinlm(tmp_path, *ARGS, "--backend", "mlx", "--data", str(corpus), "--out", "ring", "--ranks", "2",
                  TWINLM_ALLREDUCE="ring")
    assert ring.returncode == 0 and "2 ranks (ring all-reduce)" in ring.stdout, ring.stderr
    if "2 ranks (shm all-reduce)" in two.stdout:
        assert _worst(tmp_path / "ring", tmp_path / "two") == (0.0, 0.0)
    else:  # no kernels here: the ring is the one all-reduce
        assert "2 ranks (ring all-reduce)" in two.stdout
    # Negative control: ranks that skip the all-reduce each learn from half the batch only.
    skip = twinlm(tmp_path, *ARGS, "--backend", "mlx", "--data", str(corpus), "--out", "skip", "--ranks", "2",
                  **{D.SKIP_ENV: "1"})
    assert skip.returncode == 0, skip.stderr
    dl, dp = _worst(tmp_path / "one", tmp_path / "skip")
    assert dl > LOSS_TOL and dp > PARAM_TOL, (dl, dp)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of `rank` among the launcher's children (they carry TWINLM_RANK in their environment)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"{D.RANK_ENV}={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"rank {rank} not found among {children}")


def _fault_mid_run(tmp_path: Path, corpus: Path, sig: signal.Signals, **env: str) -> tuple[int, float, str]:
    """Start 2 MLX ranks on a long run, wait for a checkpoint, send `sig` to rank 1 (SIGINT: to the whole
    process group, as Ctrl-C at a terminal); (exit status, seconds from the signal to the launcher's exit,
    its stderr)."""
    args = ["train", "--backend", "mlx", "--data", str(corpus), "--preset", "tiny", "--block-size", "16",
            "--batch-size", "8", "--max-iters", "100000", "--eval-every", "5", "--eval-iters", "1",
            "--out", "run", "--ranks", "2"]
    launcher = subprocess.Popen([sys.executable, "-m", "twinlm.cli.main", *args], env=_env(tmp_path, **env),
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "latest.json").exists():  # wait for a checkpoint
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
            time.sleep(0.2)
        if sig == signal.SIGINT:
            os.killpg(launcher.pid, sig)
        else:
            os.kill(_rank_pid(launcher, 1), sig)
        t0 = time.monotonic()
        _, err = launcher.communicate(timeout=90)
        return launcher.returncode, time.monotonic() - t0, err
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds ranks through /proc")
def test_killed_rank_ends_the_run_with_one_line_and_the_checkpoint_resumes_alone(corpus, tmp_path):
    backend_or_skip("mlx")
    code, elapsed, err = _fault_mid_run(tmp_path, corpus, signal.SIGKILL)
    assert code == 1 and elapsed < 30, (code, elapsed, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: rank 1 was killed by SIGKILL") and "Traceback" not in err, err
    arrays, meta = load_checkpoint(tmp_path / "run")
    step = meta["iter"]
    assert step >= 5 and all(np.all(np.isfinite(v)) for v in arrays.values())
    # A checkpoint written with 2 ranks resumes with 1.
    resumed = twinlm(tmp_path, "train", "--resume", "run", "--max-iters", str(step + 2), "--backend", "mlx")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at iter {step}" in resumed.stdout and f"done: iter {step + 2}" in resumed.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds ranks through /proc")
def test_hung_rank_ends_the_run_within_the_timeout(corpus, tmp_path):
    backend_or_skip("mlx")
    code, elapsed, err = _fault_mid_run(tmp_path, corpus, signal.SIGSTOP, **{D.TIMEOUT_ENV: "3"})
    assert code == 1 and elapsed < 30, (code, elapsed, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: rank ") and "made no progress for 3 s" in lines[-1], err
    assert load_checkpoint(tmp_path / "run")[1]["iter"] >= 5


def test_ctrl_c_stops_every_rank_after_the_same_step_and_rank_0_saves_it(corpus, tmp_path):
    """The stop flag rides in the all-reduce, so ranks interrupted at slightly different moments agree."""
    backend_or_skip("mlx")
    code, elapsed, err = _fault_mid_run(tmp_path, corpus, signal.SIGINT)
    assert code == 130 and elapsed < 30, (code, elapsed, err)
    said = [line for line in err.splitlines() if line.startswith("interrupted at iter ")]
    assert len(said) == 1 and "Traceback" not in err, err  # rank 0 alone reports
    step = int(said[0].split()[3].rstrip(";"))
    assert load_checkpoint(tmp_path / "run")[1]["iter"] == step


# ---- tinygrad: devices in one process -------------------------------------------------------------
@pytest.mark.slow
def test_tinygrad_two_devices_equal_one_device_and_one_slice_alone_is_caught(corpus, tmp_path, monkeypatch):
    """tinygrad's data-parallel form (batch rows split over CPU:0 and CPU:1, gradients reduced by tinygrad)
    equals one device; the negative control (a rank that skips the all-reduce = training on its rows
    alone) is caught by the same check."""
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))
    from twinlm.backends import get_backend

    cfg = dict(data=str(corpus), preset="tiny", n_layer=1, block_size=16, batch_size=8, dropout=0.1, warmup=2,
               eval_iters=1, seed=3)
    runs = {}
    for devices in (1, 2):
        t = Trainer(TrainConfig(out=str(tmp_path / f"d{devices}"), **cfg), get_backend("tinygrad", devices),
                    log=lambda m: None)
        losses = [t.train_step()[0] for _ in range(10)]
        runs[devices] = np.array(losses), {k: t.B.to_numpy(v) for k, v in t.params().items()}
    one_slice = Trainer(TrainConfig(out=str(tmp_path / "half"), **cfg), get_backend("tinygrad"),
                        log=lambda m: None)
    shard = D.sharder(0, 2, accum=False)
    half = []
    for _ in range(10):  # rank 0's rows only, as a rank that skipped the reduction would train
        batch = one_slice._batch(one_slice.iter)
        b, m = shard(batch, dropout.masks(one_slice.cfg, 8, 16, 3, one_slice.iter))
        half.append(S.drive(one_slice.B, one_slice.step, one_slice.cfg, one_slice.opt,
                            {k: v for k, v in b.items() if k != "share"}, one_slice.iter, 3)[0])
        one_slice.iter += 1
    half_params = {k: one_slice.B.to_numpy(v) for k, v in one_slice.params().items()}

    def worst(a: tuple, b_losses: np.ndarray, b_params: dict) -> tuple[float, float]:
        return (float(np.max(np.abs(a[0] - b_losses))),
                max(float(np.max(np.abs(a[1][k] - b_params[k]))) for k in b_params))

    dl, dp = worst(runs[1], *runs[2])
    assert dl < LOSS_TOL and dp < PARAM_TOL, (dl, dp)
    dl, dp = worst(runs[1], np.array(half), half_params)
    assert dl > LOSS_TOL and dp > PARAM_TOL, (dl, dp)


@pytest.mark.slow
def test_tinygrad_cli_two_devices_then_resume_on_mlx_alone(corpus, tmp_path):
    """`twinlm --backend tinygrad train --ranks 2` end to end; its checkpoint resumes on MLX with one rank."""
    backend_or_skip("tinygrad")
    backend_or_skip("mlx")
    args = ["train", "--data", str(corpus), "--preset", "tiny", "--block-size", "16", "--batch-size", "8",
            "--max-iters", "4", "--eval-every", "2", "--eval-iters", "1", "--out", "run"]
    two = twinlm(tmp_path, "--backend", "tinygrad", *args, "--ranks", "2", timeout=1200)
    assert two.returncode == 0 and "2 devices" in two.stdout and "done: iter 4" in two.stdout, two.stderr
    again = twinlm(tmp_path, "train", "--resume", "run", "--max-iters", "6", "--backend", "mlx")
    assert again.returncode == 0 and "resuming at iter 4" in again.stdout, again.stderr
    assert "done: iter 6" in again.stdout


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["train", "--ranks", "0"], "--ranks must be an integer >= 1"),
    (["train", "--ranks", "2", "--backend", "numpy"], "--ranks needs a backend that trains"),
    (["train", "--beam", "2", "--backend", "mlx"], "--beam is tinygrad's kernel search"),
    (["train", "--ranks", "2", "--batch-size", "5", "--backend", "mlx"], "does not split evenly over 2"),
    (["train", "--beam", "-1", "--backend", "tinygrad"], "--beam must be an integer >= 0"),
])
def test_bad_parallel_input_is_one_error_line_and_exit_2(args, message, capsys, monkeypatch):
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_input_seen_by_every_rank_is_one_line_and_exit_2(tmp_path):
    backend_or_skip("mlx")
    r = twinlm(tmp_path, "train", "--backend", "mlx", "--ranks", "2", "--data", "missing.txt")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: corpus not found"), r.stderr
