"""benchmarks/finetune.py: its timing rule and data (fast), and the --small run end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import finetune


def test_steady_differences_two_step_times() -> None:
    times = {1: 5.0, 2: 5.5, 3: 6.0, 4: 6.5}  # step 1 compiles: its 5 s must not count
    r = finetune.steady(times, warmup=1, steps=3, tokens_per_step=1024)
    assert r["tok_s"] == pytest.approx(1024 * 3 / 1.5)
    assert r["step_ms"] == pytest.approx(500.0)
    with pytest.raises(RuntimeError, match="step times missing"):
        finetune.steady(times, warmup=2, steps=3, tokens_per_step=1024)


def test_a_peer_stopped_at_its_timeout_reports_the_bound_of_its_open_step() -> None:
    args = finetune.argparse.Namespace(batch=4, seq=256, warmup=1)
    rec = {"times": {"0": 0.0, "1": 10.0}, "trainable": 7, "clock_start_epoch": 1000.0}
    r = finetune.unfinished(rec, killed_epoch=1040.0, args=args, rss=512.4)
    # step 2 had run 30 s (1040 - 1000 - 10) unfinished: under 1024 / 30 tokens/s
    assert r == {"unfinished_step": 2, "open_s": 30.0, "tok_s_below": round(1024 / 30, 2),
                 "peak_rss_mb_so_far": 512, "trainable_params": 7}
    rec["times"]["2"] = 11.0  # past the warm-up (step 1): the finished timed steps are a measurement
    r = finetune.unfinished(rec, killed_epoch=1040.0, args=args, rss=512.4)
    assert r["tok_s"] == pytest.approx(1024.0) and r["steps_timed"] == 1 and r["peak_rss_mb"] == 512


def test_rows_are_seq_minus_one_words_clear_of_special_tokens(tmp_path: Path) -> None:
    data = finetune.write_data(tmp_path, vocab=50, seq=32, rows=10)
    rows = [json.loads(line)["text"].split() for line in (data / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(len(r) == 31 for r in rows)  # + mlx-lm's EOS = 32 tokens
    ids = {w[1:] for r in rows for w in r}
    assert all(int(i) < 50 and i[0] not in "01" for i in ids)  # "t1..." would split on the special "t1"


@pytest.mark.slow  # ~40 s: builds two tiny transformers folders and runs both tools in subprocesses
def test_small_run_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("mlx_lm")
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "-m", "benchmarks.finetune", "--small", "--tools", "twinlm-mlx,mlx-lm",
                    "--work", str(tmp_path / "w"), "--out", str(out)], check=True, cwd=finetune.ROOT)
    rows = json.loads(out.read_text())["results"]
    cases = ("qwen-lora", "smol-full")  # the default --cases
    assert {(r["case"], r["tool"]) for r in rows} == {(c, t) for c in cases for t in ("twinlm-mlx", "mlx-lm")}
    assert all("error" not in r and r["tok_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows), rows
    # The fairness claim: mlx-lm's batches of these rows are exactly batch x seq positions (+1 for targets).
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import iterate_batches

    for case in cases:  # every row is 31 words + EOS: no word split in two, none encoded as nothing
        tok = finetune.folder_tokenizer(tmp_path / "w" / f"{finetune.CASES[case].key(True)}-hf")
        ds = CacheDataset(load_local_dataset(tmp_path / "w" / f"{case}-data", tok, SimpleNamespace())[0])
        assert all(len(ds[i][0]) == 32 for i in range(len(ds))), case
        batch, _ = next(iterate_batches(ds, 2, 33))
        assert batch.shape == (2, 33)
