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
import struct
from typing import Any

import numpy as np

from twinlm.core.errors import TwinlmError

DIGEST_KEY = "twinlm.sha256"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class TensorFileError(TwinlmError):
    """Bytes that are not a valid (or not an intact) safetensors file."""


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode() + b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


def dumps(arrays: dict[str, np.ndarray]) -> bytes:
    """safetensors bytes of `arrays` (little-endian, C order) with their content digest in the metadata."""
    from safetensors.numpy import save

    # np.asarray, not np.ascontiguousarray: the latter turns 0-d arrays into shape (1,)
    ready = {}
    for k, v in arrays.items():
        a = np.asarray(v, order="C")
        ready[k] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    try:
        return save(ready, metadata={DIGEST_KEY: content_digest(ready)})
    except Exception as e:  # safetensors raises assorted types for bad names or dtypes
        raise TensorFileError(f"cannot serialise arrays: {e}") from None


def loads(data: bytes, source: str = "safetensors data",
          require_digest: bool = True) -> dict[str, np.ndarray]:
    """The arrays in `data`, exactly as saved, or a TensorFileError.

    With `require_digest` a file without twinlm's digest is refused (a file from elsewhere has none:
    pass False, and the library's structural checks are all there is)."""
    metadata = _metadata(data, source)
    from safetensors.numpy import load

    try:
        arrays = load(bytes(data))
    except BaseException as e:  # includes pyo3's PanicException, which is not an Exception
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise TensorFileError(f"{source} is not a valid safetensors file: {e}") from None
    want = metadata.get(DIGEST_KEY)
    if want is None and require_digest:
        raise TensorFileError(f"{source} has no {DIGEST_KEY} digest in its metadata (damaged, or not "
                              "written by twinlm)")
    if want is not None and content_digest(arrays) != want:
        raise TensorFileError(f"{source} is damaged: its tensors do not match their recorded SHA-256")
    return arrays


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
