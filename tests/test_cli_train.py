"""`twinlm train` / `twinlm eval` end to end, in fresh processes: output, resume, Ctrl-C, bad input."""

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
from conftest import backend_or_skip

from twinlm.core.checkpoint import load_checkpoint

TINY = ["--preset", "tiny", "--block-size", "16", "--batch-size", "4", "--eval-iters", "2", "--warmup", "2",
        "--log-every", "1"]
TEXT = "".join(f"line {i}: the {['quick', 'lazy', 'brown'][i % 3]} fox jumps over {i * 7 % 13} dogs.\n"
               for i in range(300))


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, TWINLM_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")
    env.pop("TWINLM_BACKEND", None)
    env.pop("TWINLM_DEBUG", None)
    return env


def twinlm(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinlm.cli.main", *args], capture_output=True, text=True,
                          env=_env(tmp_path), cwd=tmp_path, timeout=timeout)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def _train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def test_train_then_eval_on_a_text_file(tmp_path, corpus):
    run = tmp_path / "run"
    r = twinlm(tmp_path, "train", "--data", str(corpus), "--out", str(run), *TINY, "--max-iters", "20",
               "--eval-every", "10", "--lr", "1e-2")
    assert r.returncode == 0, r.stderr
    assert "backend mlx" in r.stdout and "done: iter 20" in r.stdout and "first step (compile)" in r.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x["event"] == "train"]
    evals = [x for x in rows if x["event"] == "eval"]
    assert len(train) == 20 and [e["iter"] for e in evals] == [10, 20]
    for key in ("iter", "tokens", "loss", "lr", "tokens_per_s", "time", "backend"):
        assert key in train[-1]
    assert train[-1]["tokens"] == 20 * 4 * 16 and train[-1]["loss"] < train[0]["loss"]
    _, meta = load_checkpoint(run)
    assert meta["iter"] == 20 and meta["train"]["data"] == str(corpus)

    r = twinlm(tmp_path, "eval", str(run))
    assert r.returncode == 0, r.stderr
    assert "validation split" in r.stdout and "perplexity" in r.stdout
    val = float(r.stdout.split("loss ")[1].split()[0])
    assert 0.5 < val < evals[-1]["val_loss"] + 0.5  # a trained model: far below log(vocab) ~ 3.4
    other = tmp_path / "other.txt"
    other.write_text(TEXT[:2000])
    r = twinlm(tmp_path, "eval", str(run), "--data", str(other))
    assert r.returncode == 0 and "1,984 tokens scored" in r.stdout, r.stdout + r.stderr


def test_builtin_task_reports_target_accuracy_and_samples(tmp_path):
    r = twinlm(tmp_path, "train", "--out", "task", *TINY, "--max-iters", "5", "--eval-every", "5")
    assert r.returncode == 0, r.stderr
    assert "target: >= 90% exact match on 200 held-out examples" in r.stdout
    assert "accuracy: " in r.stdout and "NOT reached" in r.stdout  # 5 steps cannot learn to sort
    assert r.stdout.count("want ") + r.stdout.count("  ok") >= 8  # the samples
    r = twinlm(tmp_path, "eval", "task")
    assert r.returncode == 0 and "exact match on 200 held-out examples" in r.stdout, r.stderr


def test_resume_in_a_new_process_is_bit_identical(tmp_path, corpus):
    # On the CPU: MLX's GPU embedding gradient is a scatter-add with atomics, whose sums may differ per run.
    common = ["--data", str(corpus), *TINY, "--eval-every", "4", "--dropout", "0.1", "--lr-decay-iters", "8",
              "--device", "cpu"]
    assert twinlm(tmp_path, "train", *common, "--out", "a", "--max-iters", "8").returncode == 0
    assert twinlm(tmp_path, "train", *common, "--out", "b", "--max-iters", "4").returncode == 0
    r = twinlm(tmp_path, "train", "--resume", "b", "--max-iters", "8")
    assert r.returncode == 0 and "resuming at iter 4 of 8" in r.stdout, r.stderr
    assert _train_losses(tmp_path / "a") == _train_losses(tmp_path / "b")
    a, _ = load_checkpoint(tmp_path / "a")
    b, meta = load_checkpoint(tmp_path / "b")
    assert meta["iter"] == 8 and all(np.array_equal(a[k], b[k]) for k in a)


def _cross_backend(tmp_path: Path, corpus: Path, first: str, second: str) -> None:
    for name in (first, second):
        backend_or_skip(name)
    # tinygrad schedules each new graph for seconds: few steps there, and one validation batch.
    common = ["--data", str(corpus), *TINY, "--eval-every", "100", "--eval-iters", "1",
              "--lr-decay-iters", "6"]
    r = twinlm(tmp_path, "train", *common, "--backend", first, "--out", "a", "--max-iters", "6")
    assert r.returncode == 0, r.stderr
    r = twinlm(tmp_path, "train", *common, "--backend", first, "--out", "b", "--max-iters", "4")
    assert r.returncode == 0, r.stderr
    r = twinlm(tmp_path, "--backend", second, "train", "--resume", "b", "--max-iters", "6")
    assert r.returncode == 0 and f"backend {second}" in r.stdout, r.stderr
    la, lb = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert len(la) == len(lb) == 6 and la[:4] == lb[:4]
    assert np.allclose(la, lb, rtol=0, atol=1e-4)
    a, _ = load_checkpoint(tmp_path / "a")
    b, meta = load_checkpoint(tmp_path / "b")
    assert meta["backend"] == second
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a if k.startswith("param.")) < 1e-4
    # Negative control: the resumed steps did change the weights, by far more than the tolerance.
    c, _ = load_checkpoint(tmp_path / "b" / "ckpt-00000004")
    assert max(float(np.abs(c[k] - b[k]).max()) for k in c if k.startswith("param.")) > 1e-3


def test_cross_backend_resume_mlx_to_tinygrad(tmp_path, corpus):
    _cross_backend(tmp_path, corpus, "mlx", "tinygrad")


@pytest.mark.slow
def test_cross_backend_resume_tinygrad_to_mlx(tmp_path, corpus):
    _cross_backend(tmp_path, corpus, "tinygrad", "mlx")


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, corpus):
    proc = subprocess.Popen([sys.executable, "-m", "twinlm.cli.main", "train", "--data", str(corpus),
                             "--out", "run", *TINY, "--max-iters", "1000000", "--eval-every", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                            cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() or len(_train_losses(tmp_path / "run")) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C must not cut the save short
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "resume with: twinlm train --resume run" in err and "Traceback" not in err
    arrays, meta = load_checkpoint(tmp_path / "run")
    assert meta["iter"] >= 3 and all(np.all(np.isfinite(v)) for v in arrays.values())


def _bad_inputs(tmp_path: Path, corpus: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("just a few words\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 200)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "nockpt").mkdir()
    (tmp_path / "bad.toml").write_text("learning_rate = 0.1\n")
    return {
        "missing": (["train", "--data", "nope.txt"], "corpus not found"),
        "empty": (["train", "--data", "empty.txt"], "is empty"),
        "short": (["train", "--data", "short.txt", *TINY], "fewer than block_size + 1"),
        "utf8": (["train", "--data", "latin1.txt"], "not valid UTF-8"),
        "binary": (["train", "--data", "blob.bin"], "looks binary"),
        "no_ckpt": (["train", "--resume", "nockpt"], "no checkpoint in nockpt"),
        "batch": (["train", "--data", str(corpus), *TINY, "--batch-size", "100000"],
                  "batch_size 100000 is larger"),
        "shape": (["train", "--n-head", "3", "--d-model", "64"], "must be divisible by n_head"),
        "backend": (["train", "--backend", "pytorch"], "unknown backend 'pytorch'"),
        "toml": (["train", "--config", "bad.toml"], "unknown keys in config file bad.toml: learning_rate"),
        "eval_missing": (["eval", "nowhere"], "run directory not found"),
        "eval_no_ckpt": (["eval", "nockpt"], "no checkpoint in nockpt"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "short", "utf8", "binary", "no_ckpt", "batch", "shape",
                                  "backend", "toml", "eval_missing", "eval_no_ckpt"])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, corpus, case):
    args, message = _bad_inputs(tmp_path, corpus)[case]
    r = twinlm(tmp_path, *args, "--max-iters", "1") if args[0] == "train" else twinlm(tmp_path, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_resume_with_a_conflicting_size_flag_is_refused(tmp_path, corpus):
    r = twinlm(tmp_path, "train", "--data", str(corpus), "--out", "r", *TINY, "--max-iters", "2")
    assert r.returncode == 0, r.stderr
    r = twinlm(tmp_path, "train", "--resume", "r", "--d-model", "64")
    assert r.returncode == 2 and "--d-model 64 conflicts with the checkpoint's d_model = 32" in r.stderr


def test_config_file_values_apply_and_flags_override(tmp_path, corpus):
    (tmp_path / "cfg.toml").write_text(f'data = "{corpus}"\npreset = "tiny"\nblock-size = 16\n'
                                       'batch_size = 4\nmax-iters = 3\neval-every = 3\neval-iters = 1\n'
                                       'lr = 0.002\n')
    r = twinlm(tmp_path, "train", "--config", "cfg.toml", "--out", "c", "--lr", "0.004")
    assert r.returncode == 0, r.stderr
    _, meta = load_checkpoint(tmp_path / "c")
    assert meta["iter"] == 3 and meta["train"]["lr"] == 0.004 and meta["model"]["block_size"] == 16


def test_errors_replace_trains_on_invalid_utf8(tmp_path, corpus):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(corpus.read_bytes() + "caf\xe9\n".encode("latin-1"))
    r = twinlm(tmp_path, "train", "--data", str(bad), "--out", "rep", *TINY, "--max-iters", "2")
    assert r.returncode == 2 and "--errors replace" in r.stderr
    r = twinlm(tmp_path, "train", "--data", str(bad), "--out", "rep", *TINY, "--max-iters", "2",
               "--errors", "replace")
    assert r.returncode == 0, r.stderr
    _, meta = load_checkpoint(tmp_path / "rep")
    assert "\ufffd" in meta["tokenizer"]["chars"] and meta["train"]["errors"] == "replace"
