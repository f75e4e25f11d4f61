"""`python -m twinlm.devcheck`: its plan, device choice and verdicts. The whole dry run is
`make devcheck-dry`, which CI runs; here only what is fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twinlm import devcheck


def test_dry_run_plan_is_tiny_and_on_the_cpu() -> None:
    p = devcheck.plan(True, None, ("mlx", "tinygrad"))
    assert p.dry_run and p.device == "cpu" and p.preset == "tiny" and p.families == ("gpt",)
    assert p.train[p.train.index("--preset") + 1] == "tiny"
    full = devcheck.plan(False, None, ("mlx",))
    assert full.device is None and full.preset == "medium" and full.families == devcheck.FAMILIES


def test_default_device_takes_each_frameworks_accelerator() -> None:
    assert devcheck.default_device({"mlx": {"gpu": False}, "tinygrad": {"devices": ["CPU"]}}) is None
    assert devcheck.default_device({"mlx": {"gpu": True}, "tinygrad": {"devices": ["CUDA", "CL", "CPU"]}}) \
        == "mlx=gpu,tinygrad=CUDA"
    found = {"mlx": {"error": "x"}, "tinygrad": {"devices": ["CL", "CPU"]}}
    assert devcheck.default_device(found) == "tinygrad=CL"


def test_helpers_read_what_train_writes(tmp_path: Path) -> None:
    rows = ({"event": "train", "loss": 2.5}, {"event": "eval", "val_loss": 2.0},
            {"event": "train", "loss": 2.25})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert devcheck.losses(tmp_path) == [2.5, 2.25]
    line = "time: 3.0 s total, first step (compile) 1.25 s, steady 9 tokens/s"
    assert devcheck.compile_seconds(line) == 1.25
    assert devcheck.compile_seconds("no such line") is None


def test_unknown_backend_is_refused(capsys: pytest.CaptureFixture) -> None:
    assert devcheck.main(["--backends", "torch", "--dry-run"]) == 2
    assert "error: --backends takes mlx, tinygrad, not torch" in capsys.readouterr().err


def test_a_failing_step_is_reported_and_the_check_goes_on(tmp_path: Path) -> None:
    bad = devcheck.run("fails", ["python3", "-c", "import sys; print('boom'); sys.exit(3)"], {}, 30, tmp_path)
    slow = devcheck.run("slow", ["python3", "-c", "import time; time.sleep(5)"], {}, 0.5, tmp_path)
    good = devcheck.run("fine", ["python3", "-c", "print('ok')"], {}, 30, tmp_path)
    assert not bad.ok and bad.returncode == 3 and "boom" in bad.detail
    assert not slow.ok and "timed out" in slow.detail
    assert good.ok and good.returncode == 0
