"""A full disk during `twinlm train`: one `error:` line, exit 2, the previous checkpoint intact, and the run
resumes (once there is room) to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from conftest import backend_or_skip, run_cli

from twinlm.core import atomic
from twinlm.core.checkpoint import load_checkpoint

TEXT = "".join(f"line {i}: the {['quick', 'lazy', 'brown'][i % 3]} fox jumps over {i * 7 % 13} dogs.\n"
               for i in range(200))


class DiskFull(atomic.FileOps):
    """Every write to a file under `full` fails with ENOSPC (the token cache elsewhere still has room)."""

    def __init__(self, full: Path) -> None:
        self.full, self.temp_names = full, {}

    def mkstemp(self, folder: Path, prefix: str) -> tuple[BinaryIO, str]:
        f, name = super().mkstemp(folder, prefix)
        self.temp_names[f.name] = name
        return f, name

    def write(self, f: BinaryIO, data: bytes) -> None:
        if self.full in Path(self.temp_names.get(f.name, f.name)).parents:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write(f, data)


def checkpoint_files(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != "metrics.jsonl"}


def test_disk_full_while_training(tmp_path, capsys, monkeypatch) -> None:
    backend_or_skip("mlx")
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)

    def train(out: str, *extra: str) -> tuple[int, str, str]:
        args = ["train", "--backend", "mlx", "--out", str(tmp_path / out), "--eval-every", "2",
                "--eval-iters", "1", "--preset", "tiny", "--block-size", "16", "--batch-size", "4", *extra]
        return run_cli(args, capsys, monkeypatch)

    code, _, err = train("ref", "--data", str(corpus), "--max-iters", "4")
    assert code == 0, err
    code, _, err = train("run", "--data", str(corpus), "--max-iters", "2")
    assert code == 0, err
    run = tmp_path / "run"
    before = checkpoint_files(run)

    monkeypatch.setattr(atomic, "fs", DiskFull(run))
    code, out, err = train("run", "--resume", str(run), "--max-iters", "4")
    monkeypatch.setattr(atomic, "fs", atomic.FileOps())
    assert code == 2
    assert err.splitlines() == [f"error: cannot write checkpoint 4 in {run}: No space left on device"], err
    assert "Traceback" not in out + err
    assert checkpoint_files(run) == before  # nothing written, nothing lost
    assert load_checkpoint(run)[1]["iter"] == 2

    code, _, err = train("run", "--resume", str(run), "--max-iters", "4")
    assert code == 0, err
    got, want = load_checkpoint(run)[0], load_checkpoint(tmp_path / "ref")[0]
    assert set(got) == set(want) and all(got[k].tobytes() == want[k].tobytes() for k in want)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]

