"""Crash-safe file writes: temp file beside the target, fsync, `os.replace` into place, fsync the folder.

A reader then sees either the old file or the new one, never a mix, even after SIGKILL or power loss.

Every file-system call that changes something goes through the module-level `fs` object (a `FileOps`).
That single seam lets the tests fail or kill a save at each of its operations in turn
(tests/test_fault_injection.py) instead of hoping a random SIGKILL lands somewhere interesting.
Code that writes must call `atomic.fs.<op>` at call time (not bind the methods at import), so a
replaced `fs` takes effect.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO


class FileOps:
    """The mutating file-system operations of twinlm's writers, one method each."""

    def mkdir(self, path: Path, exist_ok: bool = False) -> None:
        Path(path).mkdir(parents=exist_ok, exist_ok=exist_ok)

    def create(self, path: Path) -> BinaryIO:
        """Open `path` for writing, truncating it."""
        return open(path, "wb")  # noqa: SIM115 (the caller closes it)

    def mkstemp(self, folder: Path, prefix: str) -> tuple[BinaryIO, str]:
        fd, name = tempfile.mkstemp(dir=folder, prefix=prefix)
        return os.fdopen(fd, "wb"), name

    def reopen(self, path: Path | str, size: int) -> BinaryIO:
        """Open an existing file to append after its first `size` bytes, cutting off what is beyond them
        (a resumed preparation goes on from its last durable checkpoint)."""
        f = open(path, "r+b")  # noqa: SIM115 (the caller closes it)
        try:
            f.truncate(size)
            f.seek(size)
        except BaseException:
            f.close()
            raise
        return f

    def write(self, f: BinaryIO, data: bytes) -> None:
        f.write(data)
        f.flush()

    def fsync(self, f: BinaryIO) -> None:
        os.fsync(f.fileno())

    def fsync_dir(self, path: Path) -> None:
        """Make a rename or file creation inside `path` durable."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems (and platforms) refuse fsync on a directory; nothing more to do
            pass
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def replace(self, src: Path | str, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path | str) -> None:
        os.unlink(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def rmtree(self, path: Path, ignore_errors: bool = False) -> None:
        """shutil.rmtree, spelled with this object's unlink/rmdir so each removal is one operation."""
        try:
            for root, dirs, files in os.walk(path, topdown=False):
                for name in files:
                    self.unlink(Path(root) / name)
                for name in dirs:
                    sub = Path(root) / name
                    self.unlink(sub) if sub.is_symlink() else self.rmdir(sub)
            self.rmdir(Path(path))
        except OSError:
            if not ignore_errors:
                raise


fs = FileOps()


def fsync_dir(path: Path) -> None:
    fs.fsync_dir(path)


def write_file_synced(path: Path, data: bytes) -> None:
    """Create (or truncate) `path` with `data` and fsync it; not atomic by itself."""
    with fs.create(path) as f:
        fs.write(f, data)
        fs.fsync(f)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    f, tmp = fs.mkstemp(path.parent, prefix=f".tmp-{path.name}-")
    try:
        with f:
            fs.write(f, data)
            fs.fsync(f)
        fs.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fs.fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))
