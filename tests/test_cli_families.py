"""End to end through the CLI: the defaults chain `train --arch bert` -> `finetune` -> `predict` / `eval`,
a fine-tune resumed on the other backend, Llama with GQA on tinygrad, the built-in classification data,
and (slow) pretraining beating training from scratch on the built-in classification task."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import backend_or_skip

from twinlm.core import task as sort_task
from twinlm.tasks import classify as C

SMALL = ["--preset", "tiny", "--batch-size", "8", "--eval-iters", "2"]


def twinlm(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TWINLM_BACKEND", "TWINLM_DEBUG")}
    env |= {"TWINLM_CACHE_DIR": str(cwd / "cache"), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "twinlm.cli.main", *args], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_bert_train_finetune_predict_eval_with_defaults(tmp_path: Path) -> None:
    backend_or_skip("mlx")
    r = twinlm(tmp_path, "train", "--arch", "bert", *SMALL, "--max-iters", "30", "--eval-every", "30")
    assert r.returncode == 0, r.stderr
    assert "model bert" in r.stdout and "task mlm" in r.stdout and "masked-token accuracy" in r.stdout
    base = tmp_path / "runs" / "sort-bert"
    assert (base / "latest.json").exists()

    r = twinlm(tmp_path, "finetune", str(base), "--max-iters", "20", "--eval-every", "10",
               "--batch-size", "16")
    assert r.returncode == 0, r.stderr
    assert "labels no, yes" in r.stdout and "confusion (rows: true, columns: predicted)" in r.stdout
    run = tmp_path / "runs" / "sort-bert-classify"
    meta = json.loads(next(run.glob("ckpt-*/meta.json")).read_text())
    assert meta["labels"] == ["no", "yes"] and meta["task"] == "classify" and meta["model"]["n_classes"] == 2

    r = twinlm(tmp_path, "predict", str(run), "12345>12345", "54321>12354")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()
    assert len(rows) == 2 and all(re.match(r"^(yes|no)\t", row) for row in rows)
    probs = [float(p) for p in re.findall(r"(?:yes|no) (\d\.\d+)", rows[0])]
    assert len(probs) == 2 and abs(sum(probs) - 1) < 2e-3

    r = twinlm(tmp_path, "predict", str(base), "12345>123[MASK]5")
    assert r.returncode == 0, r.stderr
    filled = r.stdout.split("\t")[0]
    assert len(filled) == len("12345>12345") and "[MASK]" not in filled

    r = twinlm(tmp_path, "eval", str(run))
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and f"on {C.BUILTIN_VAL} examples" in r.stdout
    r = twinlm(tmp_path, "eval", str(base))
    assert r.returncode == 0 and "masked-token accuracy" in r.stdout, r.stderr

    # A fine-tune resumes on the other backend, keeping its task, labels and head.
    backend_or_skip("tinygrad")
    r = twinlm(tmp_path, "--backend", "tinygrad", "train", "--resume", str(run), "--max-iters", "22",
               timeout=900)
    assert r.returncode == 0, r.stderr
    assert "resuming at iter 20 of 22" in r.stdout and "task classify" in r.stdout


def test_finetune_own_csv_with_frozen_base(tmp_path: Path) -> None:
    backend_or_skip("mlx")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"good day {i}\nbad day {i}\n" for i in range(300)))
    r = twinlm(tmp_path, "train", "--data", str(corpus), "--arch", "llama", "--n-kv-head", "1", *SMALL,
               "--max-iters", "20", "--eval-every", "20", "--out", "base")
    assert r.returncode == 0, r.stderr
    data = tmp_path / "labels.csv"
    rows = "".join(f"{w} day {i},{w}\n" for i in range(60) for w in ("good", "bad"))
    data.write_text("text,label\n" + rows)
    r = twinlm(tmp_path, "finetune", "base", "--data", str(data), "--freeze-base", "--max-iters", "20",
               "--out", "cls")
    assert r.returncode == 0, r.stderr
    assert f"({32 * 2 + 2:,} trained)" in r.stdout, r.stdout  # the head only: cls.weight (32, 2) and bias
    r = twinlm(tmp_path, "eval", "cls", "--data", str(data))
    assert r.returncode == 0 and "confusion" in r.stdout, r.stderr


def test_llama_gqa_trains_and_samples_on_tinygrad(tmp_path: Path) -> None:
    backend_or_skip("tinygrad")
    r = twinlm(tmp_path, "--backend", "tinygrad", "train", "--arch", "llama", "--n-kv-head", "1", *SMALL,
               "--max-iters", "6", "--eval-every", "6", "--out", "llama", timeout=900)
    assert r.returncode == 0, r.stderr
    assert "(1 kv)" in r.stdout and "rmsnorm, swiglu, rope positions" in r.stdout
    r = twinlm(tmp_path, "--backend", "tinygrad", "sample", "llama", "-n", "5", "-t", "0", timeout=900)
    assert r.returncode == 0, r.stderr


def test_builtin_classification_data() -> None:
    train, val = C.builtin_examples("train"), C.builtin_examples("val")
    assert (len(train), len(val)) == (C.BUILTIN_TRAIN, C.BUILTIN_VAL)
    assert train == C.builtin_examples.__wrapped__("train")  # regenerated from scratch: the same
    for text, label in train[:500] + val:
        left, right = text.split(">")
        assert (sorted(left) == list(right)) == (label == "yes")
    assert 0.4 < sum(lab == "yes" for _, lab in train) / len(train) < 0.6
    # Validation texts come from strings the sort corpus holds out, so pretraining never saw them.
    assert all(sort_task.is_held_out([int(c) for c in t.split(">")[0]]) for t, _ in val)
    assert not any(sort_task.is_held_out([int(c) for c in t.split(">")[0]]) for t, _ in train)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_pretraining_beats_training_from_scratch(tmp_path: Path, arch: str) -> None:
    backend_or_skip("mlx")
    assert twinlm(tmp_path, "train", "--arch", arch, "--out", "base").returncode == 0
    acc = {}
    for how in ("", "--from-scratch"):
        r = twinlm(tmp_path, "finetune", "base", *([how] if how else []), "--out", f"cls{how}")
        assert r.returncode == 0, r.stderr
        acc[how] = float(re.search(r"accuracy: ([\d.]+)% on", r.stdout).group(1))
    assert acc[""] > acc["--from-scratch"] + 5, acc
