"""safetensors bytes that carry a digest of their own contents, and a loader that never trusts its input.

`dumps` stores a SHA-256 of every tensor's name, dtype, shape and bytes in the file's `__metadata__`
(key `twinlm.sha256`), so a twinlm-written file proves its integrity on its own, without a manifest:
a flipped bit, a changed dtype or shape, or a truncation is an error, never a different array.
`loads` turns every failure of the safetensors library (it raises assorted types, and a Rust panic is
not even an `Exception`) into a `TensorFileError`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from typing import Any

import numpy as np

from twinlm.core import dtypes as D
from twinlm.core.errors import TwinlmError

DIGEST_KEY = "twinlm.sha256"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class TensorFileError(TwinlmError):
    """Bytes that are not a valid (or not an intact) safetensors file."""


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of every array's name, dtype, shape and bytes (arrays read from a memory map are `release`d
    once hashed, so hashing a file's tensors never holds the whole file in memory)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        kind = "bf16" if D.is_bf16(a) else a.dtype.str  # (bfloat16 bits are uint16 to numpy)
        h.update(json.dumps([name, kind, list(a.shape)]).encode() + b"\0")
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8) if a.size else b"")
        release(a)
    return h.hexdigest()


def sha256_hex(data: bytes | bytearray | memoryview | mmap.mmap) -> str:
    """SHA-256 of `data`; a memory map is read in chunks, each released once hashed (see `release`)."""
    if not isinstance(data, mmap.mmap):
        return hashlib.sha256(data).hexdigest()
    h, chunk = hashlib.sha256(), 16 * 2**20
    with memoryview(data) as view:  # slices of a memoryview are views, slices of a mmap are copies
        for at in range(0, len(data), chunk):
            h.update(view[at:at + chunk])
            _dontneed(data, at, min(chunk, len(data) - at))
    return h.hexdigest()


def release(a: np.ndarray) -> None:
    """Let the kernel drop the pages behind `a` from this process's memory when `a` is a view of a
    read-only file mapping (they are read again from the file, usually from the page cache, if touched);
    any other array is left alone. A mapped file's pages count in the resident set once read, so without
    this, a model loaded through a memory map and copied to a backend sits in memory twice."""
    mm = _read_only_map(a)
    if mm is None or a.nbytes == 0:
        return
    start = a.__array_interface__["data"][0] - np.frombuffer(mm, np.uint8).__array_interface__["data"][0]
    if 0 <= start and start + a.nbytes <= len(mm):
        _dontneed(mm, start, a.nbytes)


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): a freed array from the heap
    (glibc serves allocations below its mmap threshold, or all of them once MLX has set malloc up, from
    the heap) otherwise stays in the resident set, and freeing arrays as they are copied would not lower
    the peak. A no-op where glibc is not the allocator."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def is_mapped(a: np.ndarray) -> bool:
    """Whether `a` is a view of a read-only file mapping (what `release` acts on)."""
    return _read_only_map(a) is not None


def _read_only_map(a: object) -> mmap.mmap | None:
    """The read-only mmap.mmap under `a` (through numpy bases and memoryviews), or None."""
    for _ in range(16):
        if isinstance(a, mmap.mmap):
            with memoryview(a) as view:
                return a if view.readonly else None  # a writable map's pages may hold unsaved data
        if isinstance(a, memoryview):
            a = a.obj
        elif isinstance(a, np.ndarray):
            a = a.base
        else:
            return None
    return None


def _dontneed(mm: mmap.mmap, start: int, length: int) -> None:
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return  # (not on this platform: the pages stay until the map is closed)
    with memoryview(mm) as view:
        if not view.readonly:
            return
    lo = start - start % mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, lo, start + length - lo)


# numpy dtype <-> safetensors dtype name (the ones twinlm writes or could meet in its own files).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
           "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(t): name for name, t in _DTYPES.items()}
# BF16: read as tagged uint16 bits (`core.dtypes.BF16`; numpy has no bfloat16), written from them.


def _name(a: np.ndarray) -> str | None:
    return "BF16" if D.is_bf16(a) else _NAMES.get(a.dtype.newbyteorder("="))


def dumps(arrays: dict[str, np.ndarray], consume: bool = False,
          metadata: dict[str, str] | None = None) -> bytearray | np.ndarray:
    """safetensors bytes of `arrays` (little-endian, C order) with their content digest in the metadata,
    built in one buffer: the weights are copied once, never through per-tensor intermediates.

    With `consume`, each array is removed from `arrays` once copied and the buffer is a numpy uint8 array
    whose pages (calloc'd) become resident only as they are filled: where `arrays` holds the only
    references (an import), the arrays are freed as the buffer grows and the whole never sits in memory
    twice. `metadata`: more `__metadata__` entries (transformers wants {"format": "pt"})."""
    ready: dict[str, np.ndarray] = {}
    for k, v in arrays.items():
        # np.asarray, not np.ascontiguousarray: the latter turns 0-d arrays into shape (1,)
        a = np.asarray(v, order="C")
        if not isinstance(k, str) or not k or _name(a) is None:
            raise TensorFileError(f"cannot serialise array {k!r} of dtype {a.dtype}")
        ready[k] = a if D.is_bf16(a) else a.astype(a.dtype.newbyteorder("<"), copy=False)
    v = a = None  # (no reference left behind to the last array: `consume` frees each one as it is copied)
    header: dict[str, Any] = {"__metadata__": {**(metadata or {}), DIGEST_KEY: content_digest(ready)}}
    offset = 0
    for k in sorted(ready):
        a = ready[k]
        header[k] = {"dtype": _name(a), "shape": list(a.shape),
                     "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the library writes it
    size = 8 + len(head) + offset
    out = np.zeros(size, np.uint8) if consume else bytearray(size)
    at, view = 8 + len(head), np.frombuffer(out, dtype=np.uint8)
    view[:at] = np.frombuffer(struct.pack("<Q", len(head)) + head, np.uint8)
    for k in sorted(ready):
        n = ready[k].nbytes
        copy_releasing(view[at:at + n], ready[k].reshape(-1).view(np.uint8))
        if consume:
            del ready[k], arrays[k]
            if n >= 2**20:
                trim_heap()
        at += n
    return out


COPY_CHUNK = 64 * 2**20


def copy_releasing(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[:] = src (flat uint8), where `src` is a view of a read-only file mapping (an import's
    untransposed tensors: a 1B model's 1 GB embedding) in chunks, each chunk's mapped pages released once
    copied: copied whole, the source's pages and the growing buffer would both be resident, and the peak of
    writing a checkpoint would be the file plus its largest mapped tensor."""
    if not is_mapped(src):
        dst[:] = src
        return
    for lo in range(0, src.size, COPY_CHUNK):
        part = src[lo:lo + COPY_CHUNK]
        dst[lo:lo + part.size] = part
        release(part)


def loads(data: bytes | bytearray | memoryview | Any, source: str = "safetensors data",
          require_digest: bool = True) -> dict[str, np.ndarray]:
    """The arrays in `data`, exactly as saved, or a TensorFileError. The arrays are read-only views into
    `data` (no copy), which may be a memory map.

    With `require_digest` a file without twinlm's digest is refused (a file from elsewhere has none:
    pass False, and the structural checks here are all there is)."""
    metadata = _metadata(data, source)
    arrays = _views(data, source)
    want = metadata.get(DIGEST_KEY)
    if want is None and require_digest:
        raise TensorFileError(f"{source} has no {DIGEST_KEY} digest in its metadata (damaged, or not "
                              "written by twinlm)")
    if want is not None and content_digest(arrays) != want:
        raise TensorFileError(f"{source} is damaged: its tensors do not match their recorded SHA-256")
    return arrays


def _views(data: Any, source: str) -> dict[str, np.ndarray]:
    """Every tensor as a view into `data`, after the checks the safetensors library makes: known dtypes,
    non-negative shapes whose size matches the byte range, ranges that tile the data exactly."""
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    body = memoryview(data)[8 + n:]
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = D.BF16 if info["dtype"] == "BF16" else np.dtype(_DTYPES[info["dtype"]])
            shape, (start, end) = info["shape"], info["data_offsets"]
            ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) \
                and type(start) is int and type(end) is int and 0 <= start <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or (end - start) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise TensorFileError(f"{source} has a damaged entry for tensor {name!r}: {str(info)[:80]}")
        entries.append((start, end, name, dtype, shape))
    entries.sort(key=lambda e: e[:2])
    at = 0
    for start, end, name, _, _ in entries:
        if start != at:
            raise TensorFileError(f"{source} is damaged: tensor {name!r} does not start where the last ends")
        at = end
    if at != len(body):
        raise TensorFileError(f"{source} is damaged or truncated: tensors cover {at} of {len(body)} bytes")
    out = {}
    for start, end, name, dtype, shape in entries:
        little = dtype.newbyteorder("<")
        a = np.frombuffer(body[start:end], dtype=little) if end > start else np.zeros(0, dtype)
        a = a.reshape(shape)
        if dtype is D.BF16:
            a = a.view(D.BF16)
        a.flags.writeable = False
        out[name] = a
    return out


def _metadata(data: bytes, source: str) -> dict[str, Any]:
    """The header's `__metadata__` after checking the header is a JSON object of the length it claims."""
    if len(data) < 8:
        raise TensorFileError(f"{source} is truncated: {len(data)} bytes, less than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise TensorFileError(f"{source} is damaged or truncated: its header claims {n} bytes, "
                              f"the file has {len(data) - 8} after the length field")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except ValueError as e:
        raise TensorFileError(f"{source} has a damaged header: {e}") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise TensorFileError(f"{source} has a damaged header: not a JSON object with a metadata object")
    return meta
