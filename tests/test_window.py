"""One notion of the training window: a fine-tune with `--block-size` shorter than its base's context
trains, evaluates, counts tokens (header, metrics.jsonl, tokens/s, summary) and reports FLOPs on that
window, and `twinlm eval` scores the run's window, never refusing a long-context model on a short text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from benchmarks import flops
from twinlm.backends import get_backend
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.tasks import DEFAULT_WINDOW, run_window, training_window
from twinlm.trainer import TrainConfig, Trainer

CORPUS = "".join(f"{w} and {v} went up the hill; {v} came down.\n" for w in ("jack", "jill", "bob")
                 for v in ("ann", "tom", "sue", "max")) * 20
SMALL = dict(batch_size=4, eval_iters=2, warmup=2, log_every=1, eval_every=3, lr=3e-3)
BASE_BLOCK, WINDOW = 32, 8


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture
def base_run(tmp_path, corpus) -> Path:
    Trainer(TrainConfig(data=str(corpus), out=str(tmp_path / "base"), preset="tiny", block_size=BASE_BLOCK,
                        max_iters=2, **SMALL), get_backend("mlx"), log=lambda m: None).fit()
    return tmp_path / "base"


def test_the_window_rule() -> None:
    assert training_window(64, None, from_base=False) == 64  # a fresh model's block is its window
    assert training_window(64, 16, from_base=True) == 16
    assert training_window(131_072, None, from_base=True) == DEFAULT_WINDOW  # not 131,072-token examples
    assert training_window(512, None, from_base=True) == 512
    for bad in (1, 65):
        with pytest.raises(TwinlmError, match="reads 2 to 64"):
            training_window(64, bad, from_base=True)
    cfg = ModelConfig(block_size=131_072, n_layer=1, d_model=32)
    assert run_window(cfg, {}) == DEFAULT_WINDOW  # imported or merged: never trained as it is
    assert run_window(cfg, {"base": "/b", "block_size": 256}) == 256
    assert run_window(cfg.replace(block_size=64), {"base": None, "block_size": 64}) == 64


def test_reported_tokens_are_the_tokens_each_step_consumed(base_run, tmp_path, corpus) -> None:
    tc = TrainConfig(data=str(corpus), out=str(tmp_path / "ft"), base=str(base_run), block_size=WINDOW,
                     max_iters=4, grad_accum=2, **SMALL)
    t = Trainer(tc, get_backend("mlx"), log=lambda m: None)
    assert t.cfg.block_size == BASE_BLOCK and t.task.window == WINDOW
    consumed: list[int] = []
    draw = t.task.next_batch
    t.task.next_batch = lambda it: (b := draw(it), consumed.append(b["x"].size))[0]  # type: ignore[method-assign]
    result = t.fit()
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    per_iter = 4 * 2 * WINDOW  # batch x accumulation x window, not x the base's 32-token context
    assert sum(consumed) == 4 * per_iter
    for row in rows:
        assert row["tokens"] == sum(consumed[:2 * row["iter"]]), row
    assert rows[-1]["tokens"] == sum(consumed)
    # tokens/s is tokens over the steady steps' time: the same count, so a wrong count would show as a ratio
    steady = [r for r in rows if r["event"] == "train" and r["tokens_per_s"]]
    assert steady and result.tokens_per_s is not None
    assert t.tokens_per_iter == per_iter
    # evaluation scores the window too
    assert {b["x"].shape for b in t.task.val_batches()} == {(4, WINDOW)}


def test_header_and_eval_use_the_window(base_run, tmp_path, corpus, capsys, monkeypatch) -> None:
    out = tmp_path / "ft"
    code, stdout, err = run_cli(["train", "--init-from", str(base_run), "--data", str(corpus), "--block-size",
                                 str(WINDOW), "--max-iters", "3", "--batch-size", "4", "--eval-iters", "1",
                                 "--out", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert f"window {WINDOW} (context {BASE_BLOCK})" in stdout and f"block {BASE_BLOCK}" not in stdout
    code, stdout, err = run_cli(["eval", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert f"in windows of {WINDOW} on" in stdout
    short = tmp_path / "short.txt"
    short.write_text("jack and ann")  # 12 characters: fewer than the base's 33 and the run's 9
    code, stdout, err = run_cli(["eval", str(base_run), "--data", str(short)], capsys, monkeypatch)
    assert code == 0, err
    assert "11 tokens scored in windows of 11" in stdout  # one window of all of it, not a refusal
    code, _, err = run_cli(["eval", str(base_run), "--block-size", "99"], capsys, monkeypatch)
    assert code != 0 and err.startswith("error: --block-size 99") and err.count("\n") == 1


def test_resuming_a_fine_tune_keeps_its_window(base_run, tmp_path, corpus) -> None:
    tc = TrainConfig(data=str(corpus), out=str(tmp_path / "ft"), base=str(base_run), block_size=WINDOW,
                     max_iters=2, **SMALL)
    Trainer(tc, get_backend("mlx"), log=lambda m: None).fit()
    resume = str(tmp_path / "ft")
    again = Trainer(TrainConfig(max_iters=3, block_size=WINDOW), get_backend("mlx"), resume=resume,
                    log=lambda m: None)
    assert again.task.window == WINDOW
    with pytest.raises(TwinlmError, match=f"--block-size 16 conflicts with .* block_size = {WINDOW}"):
        Trainer(TrainConfig(max_iters=3, block_size=16), get_backend("mlx"), resume=resume,
                log=lambda m: None)


def test_flops_count_the_window_and_the_attention_width() -> None:
    cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, d_model=64, head_size=32, block_size=4096)
    n = flops.matmul_params(cfg)
    # attention over n_head * head_dim = 128 channels (not d_model = 64), over the 256-position window
    assert flops.train_flops_per_token(cfg, 256) == 6 * n + 12 * 2 * 128 * 256
    assert flops.train_flops_per_token(cfg, 256) < flops.train_flops_per_token(cfg)


def test_benchmark_step_trains_the_window() -> None:
    from benchmarks.step import bench_one

    record = bench_one("mlx", "tiny", batch=2, iters=3, warmup_iters=1, max_seconds=5.0, window=8)
    assert record["window"] == 8 and record["tokens_per_iter"] == 2 * 8
    assert record["flops_per_token"] == flops.train_flops_per_token(
        ModelConfig.from_dict(record["config"]), 8)
    with pytest.raises(TwinlmError, match="--window 64"):
        bench_one("mlx", "tiny", batch=2, iters=3, warmup_iters=1, max_seconds=5.0, window=64)
    assert np.isfinite(record["loss_last"])
