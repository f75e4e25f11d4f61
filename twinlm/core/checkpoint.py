"""Full-state checkpoints: numpy arrays in safetensors + JSON meta, written atomically, verified on load.

Layout of a run directory:

    run_dir/ckpt-00000100/state.safetensors   arrays ("param.<name>", "m.<name>", "v.<name>", ...)
    run_dir/ckpt-00000100/meta.json           model config, tokenizer, iteration, seed, ... (any JSON)
    run_dir/ckpt-00000100/manifest.json       step, size and SHA-256 of the two files above; written last
    run_dir/latest.json                       {"checkpoint": "ckpt-00000100", "step": 100}
    run_dir/best.json                         the same for the checkpoint saved with best=True

Crash safety: a checkpoint is built in a hidden temp dir inside run_dir (files fsynced, then the dir),
renamed into place in one `rename`, and only then is latest.json replaced (temp file, fsync, os.replace).
So a SIGKILL or power loss at any moment leaves every earlier checkpoint and pointer intact. Pruned
checkpoints are renamed to a hidden name before they are deleted, so no half-deleted checkpoint is ever
visible. Hidden leftovers of an interrupted save are removed by the next save. If latest.json ever names
a missing checkpoint, the complete checkpoint with the highest step is used instead (with a warning).
Every file-system change goes through `atomic.fs`, so tests can fail or kill a save at each operation.
state.safetensors also carries a digest of its tensors (`tensorfile`), checked on load when present.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core import atomic, tensorfile
from twinlm.core.atomic import atomic_write_json, fsync_dir, json_bytes, write_file_synced
from twinlm.core.errors import TwinlmError, TwinlmWarning

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest.json"
BEST_FILE = "best.json"
MANIFEST_FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{8,})$")
# Hidden work dirs: ".tmp-" (being built), ".old-ckpt-N-" (replaced by a save of the same step),
# ".del-" (being pruned).
_TMP, _OLD, _DEL = ".tmp-", ".old-", ".del-"


class CheckpointError(TwinlmError):
    """A checkpoint that is missing, incomplete or damaged."""


class CheckpointWarning(TwinlmWarning):
    """A run whose pointer file is broken: loading goes on from a scan of its checkpoints."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def save_checkpoint(run_dir: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], *, step: int,
                    keep: int | None = 3, best: bool = False, consume: bool = False) -> Path:
    """Write checkpoint `step` atomically, point latest.json (and best.json if `best`) at it, prune.

    `consume` empties `arrays` as they are serialised (`tensorfile.dumps`), so a caller that holds no other
    reference to them (import-hf) never holds the weights twice.

    Keeps the `keep` highest-step checkpoints (None: all) plus the best one. Saving a step that already
    exists replaces that checkpoint whole; if it was the best and this save is not, best.json is removed.
    Returns the checkpoint dir.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise CheckpointError(f"keep must be a positive integer or None, got {keep!r}")
    state_bytes = _safetensors_bytes(arrays, consume)
    try:
        meta_bytes = json_bytes(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta is not JSON-serialisable: {e}") from None

    run_dir = Path(run_dir)
    try:
        return _write(run_dir, step, state_bytes, meta_bytes, keep, best)
    except OSError as e:  # disk full, permissions, ...: what was there before is untouched
        raise CheckpointError(f"cannot write checkpoint {step} in {run_dir}: {e.strerror or e}") from None


def _write(run_dir: Path, step: int, state_bytes: bytes, meta_bytes: bytes, keep: int | None,
           best: bool) -> Path:
    atomic.fs.mkdir(run_dir, exist_ok=True)
    _clean_leftovers(run_dir)
    name = checkpoint_name(step)
    final = run_dir / name
    tmp = run_dir / f"{_TMP}{name}-{uuid.uuid4().hex[:8]}"
    atomic.fs.mkdir(tmp)
    try:
        write_file_synced(tmp / STATE_FILE, state_bytes)
        write_file_synced(tmp / META_FILE, meta_bytes)
        manifest = {"format": MANIFEST_FORMAT, "step": step,
                    "files": {STATE_FILE: _digest(state_bytes), META_FILE: _digest(meta_bytes)}}
        write_file_synced(tmp / MANIFEST_FILE, json_bytes(manifest))  # last: a manifest means a complete dir
        fsync_dir(tmp)
    except BaseException:  # e.g. a full disk: give the space back now rather than at the next save
        atomic.fs.rmtree(tmp, ignore_errors=True)
        raise

    old = None
    if final.exists():  # same step saved again (e.g. after a resume): set the old one aside, never mix
        if not best and _pointer_name(run_dir / BEST_FILE) == name:
            # The best checkpoint is about to be replaced by one that is not known to be best: drop the
            # pointer first, so a crash can lose it but never leave it naming the wrong weights.
            atomic.fs.unlink(run_dir / BEST_FILE)
            fsync_dir(run_dir)
        old = run_dir / f"{_OLD}{name}-{uuid.uuid4().hex[:8]}"
        atomic.fs.rename(final, old)
    atomic.fs.rename(tmp, final)
    fsync_dir(run_dir)
    pointer = {"checkpoint": name, "step": step}
    atomic_write_json(run_dir / LATEST_FILE, pointer)
    if best:
        atomic_write_json(run_dir / BEST_FILE, pointer)
    if old is not None:
        atomic.fs.rmtree(old)
    _prune(run_dir, keep)
    return final


def _safetensors_bytes(arrays: dict[str, np.ndarray], consume: bool = False) -> Any:
    try:
        return tensorfile.dumps(arrays, consume)
    except tensorfile.TensorFileError as e:
        raise CheckpointError(f"cannot serialise checkpoint arrays: {e}") from None


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _clean_leftovers(run_dir: Path) -> None:
    """Remove what an interrupted save left; restore a same-step checkpoint that was set aside."""
    for p in run_dir.iterdir():
        if not p.is_dir():
            if p.name.startswith(_TMP):  # the temp file of an interrupted latest.json / best.json write
                atomic.fs.unlink(p)
            continue
        if p.name.startswith(_OLD):
            original = run_dir / p.name[len(_OLD):].rsplit("-", 1)[0]
            if _NAME.match(original.name) and not (original / MANIFEST_FILE).exists():
                if original.exists():
                    atomic.fs.rmtree(original)
                atomic.fs.rename(p, original)
                continue
        if p.name.startswith((_TMP, _OLD, _DEL)):
            atomic.fs.rmtree(p, ignore_errors=True)


def _prune(run_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    protected = {_pointer_name(run_dir / LATEST_FILE), _pointer_name(run_dir / BEST_FILE)}
    for _, path in _checkpoints(run_dir)[:-keep]:
        if path.name not in protected:
            doomed = run_dir / f"{_DEL}{path.name}-{uuid.uuid4().hex[:8]}"
            atomic.fs.rename(path, doomed)  # the checkpoint vanishes whole, then is deleted at leisure
            atomic.fs.rmtree(doomed, ignore_errors=True)


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint dirs (with a manifest), by step."""
    found = []
    for p in run_dir.iterdir():
        m = _NAME.match(p.name)
        if m and (p / MANIFEST_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _pointer_name(pointer: Path) -> str | None:
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and _NAME.match(name) else None


def _resolve(run_dir: Path, pointer_file: str, fall_back: bool) -> Path | None:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    name = _pointer_name(run_dir / pointer_file)
    if name is not None:
        if (run_dir / name / MANIFEST_FILE).is_file():
            return run_dir / name
        # A save of the same step was interrupted between its two renames: the named one is set aside.
        for aside in sorted(run_dir.glob(f"{_OLD}{name}-*")):
            if (aside / MANIFEST_FILE).is_file():
                return aside
    if not fall_back:
        return None
    found = _checkpoints(run_dir)
    if found:
        pointer = run_dir / pointer_file
        why = (f"names {name}, which is missing or incomplete" if name is not None
               else "is damaged" if pointer.exists() else "is missing")
        warnings.warn(CheckpointWarning(f"{pointer} {why}; using {found[-1][1].name}, the complete "
                                        "checkpoint with the highest step"), stacklevel=3)
    return found[-1][1] if found else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint latest.json names (or, if it is missing, the complete one with the highest step)."""
    return _resolve(run_dir, LATEST_FILE, fall_back=True)


def best_checkpoint(run_dir: Path) -> Path | None:
    return _resolve(run_dir, BEST_FILE, fall_back=False)


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of a checkpoint dir, or of the latest checkpoint in a run dir; hashes verified."""
    path = Path(path)
    if path.is_file() and path.name in (STATE_FILE, META_FILE, MANIFEST_FILE):
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not (path / MANIFEST_FILE).exists():
        if (path / STATE_FILE).exists() or (path / META_FILE).exists():
            raise CheckpointError(f"checkpoint {path} is incomplete or damaged: {MANIFEST_FILE} is missing")
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CheckpointError(f"no checkpoint in {path}")
        path = ckpt
    files = _verified_files(path)
    try:
        # The manifest already vouches for the bytes; checkpoints from before the digest have none.
        arrays = tensorfile.loads(files[STATE_FILE], f"{path / STATE_FILE}", require_digest=False)
        meta = json.loads(bytes(files[META_FILE]).decode("utf-8"))
    except (TwinlmError, ValueError) as e:  # hashes matched: a file written wrong, not damage in storage
        raise CheckpointError(f"checkpoint {path} cannot be decoded: {e}") from None
    return arrays, meta


def _read(path: Path) -> Any:
    """The file's bytes as a read-only memory map (arrays loaded from it are views, not copies)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _verified_files(ckpt: Path) -> dict[str, Any]:
    """Each file the manifest lists, read once and checked against its recorded size and SHA-256."""
    try:
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text(encoding="utf-8"))
        listed = manifest["files"]
        if not isinstance(listed, dict) or set(listed) != {STATE_FILE, META_FILE}:
            raise ValueError(f"lists {listed!r:.80}")
        for want in listed.values():
            if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) \
                    or not isinstance(want.get("sha256"), str):
                raise ValueError(f"a file entry is not {{bytes, sha256}}: {want!r:.80}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has a damaged {MANIFEST_FILE}: {e}") from None
    out = {}
    for fname, want in listed.items():
        try:
            data = _read(ckpt / fname)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {fname} is missing") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {ckpt / fname}: {e.strerror or e}") from None
        if len(data) != want.get("bytes"):
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {fname} has {len(data)} bytes, "
                                  f"expected {want.get('bytes')} (truncated?)")
        if tensorfile.sha256_hex(data) != want.get("sha256"):
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {fname} does not match its SHA-256")
        out[fname] = data
    return out
