"""A disk cache of captured TinyJits, so a second process skips tinygrad's scheduling and codegen.

tinygrad's own kernel cache (CACHEDB) only skips the C compiler: scheduling, rewriting and rendering
the ~560 kernels of a training step is redone in every process (~1 min for the baby preset). A
captured TinyJit pickles with its compiled programs, so it is stored here and loaded instead.

The key is a hash of the traced graph itself (the step's lazy UOp graph with its inputs replaced by
numbered placeholders, plus the contents of any constant buffers it holds), so the model config,
shapes, dtypes, loss function, dropout and optimizer settings are all in it without being listed.
Added to it: the tinygrad version, device, renderer, tinygrad's settings (BEAM, NOOPT, threads, ...)
and the source of twinlm's core and tinygrad adapter, so an edit to either invalidates old entries.

Location: $TWINLM_JIT_CACHE if set ("0" disables the cache), else $XDG_CACHE_HOME/twinlm/tinygrad-jit
(~/.cache/...). Files are written atomically; one that cannot be loaded is ignored and replaced.
Entries are pickles: like tinygrad's CACHEDB, only point the cache at a directory you trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tempfile
import warnings
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tinygrad import Device, Tensor, helpers
from tinygrad.device import Buffer
from tinygrad.engine.jit import _TinyJit
from tinygrad.helpers import ContextVar
from tinygrad.uop.ops import Ops, ParamArg, UOp, buffers

from twinlm.backends import jit_cache_dir

FORMAT = 1  # bump when the stored layout changes
# The most recently used entries are kept up to this total size; older ones are removed. A training step is
# 2-4 MB; `twinlm parity` stores ~80 graphs (~150 MB), and a count limit would evict its own entries.
MAX_BYTES = 512 * 2**20
# tinygrad settings that only change diagnostics or compile parallelism, never the kernels; DEV is
# covered by the device and renderer (tinygrad exports it to the environment once it picks a device)
_NOT_IN_KEY = {"DEV", "DEBUG", "VIZ", "PROFILE", "TRACK_MATCH_STATS", "CAPTURE_PROCESS_REPLAY", "NO_COLOR",
               "TRACEMETA", "PARALLEL", "CCACHE", "CACHELEVEL", "IGNORE_BEAM_CACHE", "CAPTURING"}
_ENV_PREFIXES = ("BEAM", "JITBEAM", "CC", "CPU_", "CLANG")


def _source_hash() -> str:
    """twinlm's core and this adapter as this process loaded them (read once, at import)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pattern in ("core/*.py", "backends/tinygrad*.py"):
        for p in sorted(root.glob(pattern)):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


_SOURCE_HASH = _source_hash()


cache_dir = jit_cache_dir  # defined without tinygrad, so `twinlm cache` can show it without importing it


def _environment_key() -> bytes:
    dev = Device[Device.DEFAULT]
    # tinygrad.helpers' settings (a fixed set: other modules add theirs only once imported) and the
    # environment variables that steer kernel search and the C compiler
    knobs = sorted((v.key, str(v.value)) for v in vars(helpers).values()
                   if isinstance(v, ContextVar) and v.key not in _NOT_IN_KEY)
    knobs += sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
    return repr((FORMAT, version("tinygrad"), Device.DEFAULT, type(dev.renderer).__name__,
                 getattr(dev.renderer, "target", None), type(getattr(dev, "compiler", None)).__name__,
                 knobs, _SOURCE_HASH)).encode()


def graph_key(inputs: Sequence[Tensor], results: Sequence[Tensor]) -> str:
    """Hash of the lazy graph of `results` over `inputs` (in order), independent of buffer identity."""
    sink = UOp.sink(*(t.uop for t in results))
    placeholders = {t.uop: UOp.param(i, t.uop.dtype, t.uop.shape, t.uop.device) for i, t in enumerate(inputs)}
    sink = sink.substitute(placeholders)
    # Buffers created inside the step (e.g. the causal mask) are baked into the graph: hash their
    # contents, and number them so the per-process ids in their args do not enter the key.
    h = hashlib.sha256(_environment_key())
    consts = [u for u in sink.toposort() if u.op is Ops.BUFFER]
    for u in consts:
        h.update(bytes(buffers[u].as_memoryview()) if u in buffers else b"unrealized")
    n = len(inputs)
    sink = sink.substitute({u: UOp.param(n + j, u.dtype, u.shape, u.device) for j, u in enumerate(consts)})
    h.update(sink.key)
    return h.hexdigest()


class _JitUnpickler(pickle.Unpickler):
    """Gives each device buffer of the stored JIT a new slot number of this process.

    tinygrad interns UOps by value, and a BUFFER UOp's value is a per-process counter (its slot) plus its
    size, dtype and device. Rebuilt with the saving process's slots, a stored buffer could come back as
    a live BUFFER of this process that happens to hold the same slot (the live UOp is returned and the
    stored Buffer dropped), or a buffer this process creates later could take a stored one's slot: the
    JIT then reads or writes a tensor it does not own (seen as wrong gradients when two test workers
    shared one cache folder). Fresh slots from this process's counter collide with neither."""

    def __init__(self, file: io.BufferedReader) -> None:
        super().__init__(file)
        self.slots: dict[int, int] = {}  # stored slot -> this process's

    def _uop(self, op: Ops, *args: Any) -> UOp:
        # (a device buffer: kernel-local and register BUFFERs have no device and keep their slots)
        arg = args[2] if len(args) > 2 else None
        if op is Ops.BUFFER and isinstance(arg, ParamArg) and arg.device is not None:
            if arg.slot not in self.slots:
                self.slots[arg.slot] = next(UOp.unique_num)
            args = (*args[:2], dataclasses.replace(arg, slot=self.slots[arg.slot]), *args[3:])
        return UOp(op, *args)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == (UOp.__module__, "UOp"):
            return self._uop
        return super().find_class(module, name)


def load(path: Path) -> _TinyJit | None:
    """The captured JIT stored at `path`, or None if it is missing or cannot be loaded."""
    try:
        with open(path, "rb") as f:
            jit = _JitUnpickler(f).load()
        if not isinstance(jit, _TinyJit) or jit.captured is None:
            return None
        os.utime(path)  # last use, for pruning
        return jit
    except Exception:  # a truncated, corrupt or incompatible entry: trace again and overwrite it
        return None


class _JitPickler(pickle.Pickler):
    """Leaves out the contents of buffers the JIT writes (intermediates and outputs): they are
    recomputed on every call, and for large models they are gigabytes."""

    def __init__(self, file: io.BufferedWriter, skip: set[int]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.skip = skip

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Buffer) and obj._base is None and id(obj) in self.skip:
            return Buffer, (obj.device, obj.size, obj.dtype, None, obj.options, None, obj.uop_refcount)
        return NotImplemented


def save(jit: _TinyJit, path: Path) -> None:
    """Store a captured JIT atomically; a cache that cannot be written is skipped, never fatal."""
    assert jit.captured is not None
    skip = set()
    for u in jit.captured._written_uops:
        if (b := buffers.get(u)) is not None and isinstance(b, Buffer):
            skip.add(id(b.base))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                _JitPickler(f, skip).dump(jit)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _prune(path.parent)
    except Exception as e:  # a full disk, a read-only home, an object pickle cannot store: run uncached
        warnings.warn(f"tinygrad JIT cache: could not store {path.name} ({type(e).__name__}: {e})",
                      stacklevel=2)


def _prune(folder: Path) -> None:
    """Remove the least recently used entries beyond MAX_BYTES in all (the newest one always stays)."""
    entries = sorted(((p, p.stat()) for p in folder.glob("*.jit")), key=lambda e: e[1].st_mtime, reverse=True)
    total = 0
    for i, (path, st) in enumerate(entries):
        total += st.st_size
        if i and total > MAX_BYTES:
            path.unlink(missing_ok=True)
