"""Corpus reading, tokenization with an on-disk token cache, and seeded random batches.

Corpus: a UTF-8 text file, a folder of `.txt` files (sorted by name, joined with a newline where a file
does not end in one), or None for the built-in task corpus (`twinlm.core.task.builtin_corpus`).

Token cache: the encoded corpus is stored once as a flat `<key>.bin` (uint16 ids when the vocabulary
fits, else uint32) plus `<key>.json` meta, and memory-mapped on use. The key is a SHA-256 of the corpus
text and the tokenizer request (kind + vocab size, or the exact tokenizer when one is given), so an
edited corpus or another tokenizer misses the cache and a bpe tokenizer is not retrained on a hit.
Where: `cache_dir` if given, else $TWINLM_CACHE_DIR, else $XDG_CACHE_HOME/twinlm/tokens, else
~/.cache/twinlm/tokens. Files are written atomically; deleting the folder is always safe.

Split: the first (1 - val_fraction) of the tokens train, the rest validate (by position, like nanoGPT).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core.atomic import atomic_write_bytes, atomic_write_json
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import Tokenizer, tokenizer_from_dict, tokenizer_spec, train_tokenizer

CACHE_ENV = "TWINLM_CACHE_DIR"
CACHE_FORMAT = 1
ENCODING_ERRORS = ("strict", "replace")
# Bytes below 0x20 that plain text uses: tab, newline, vertical tab, form feed, carriage return.
_TEXT_CONTROLS = np.array([9, 10, 11, 12, 13], dtype=np.uint8)
_MAX_CONTROL_RATIO = 0.1


def read_corpus(path: str | Path | None, errors: str = "strict") -> tuple[str, str]:
    """(text, source name) of a corpus file, a folder of .txt files, or the built-in corpus (None).

    errors="replace" turns invalid UTF-8 into U+FFFD instead of refusing the file.
    """
    if errors not in ENCODING_ERRORS:
        raise TwinlmError(f"encoding errors mode must be one of {', '.join(ENCODING_ERRORS)}, got {errors!r}")
    if path is None:
        from twinlm.core import task

        return task.builtin_corpus(), f"builtin:{task.NAME}"
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise TwinlmError(f"corpus folder {path} has no .txt files")
        pieces = [t for t in (_read_text_file(p, errors, allow_empty=True) for p in files) if t]
        if not pieces:
            raise TwinlmError(f"corpus folder {path} has only empty .txt files")
        text = "".join(t if t.endswith("\n") else t + "\n" for t in pieces[:-1]) + pieces[-1]
        return text, f"{path} ({len(files)} files)"
    if not path.exists():
        raise TwinlmError(f"corpus not found: {path}")
    return _read_text_file(path, errors, allow_empty=False), str(path)


def _read_text_file(path: Path, errors: str, *, allow_empty: bool) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TwinlmError(f"cannot read corpus {path}: {e.strerror or e}") from None
    if not data:
        if allow_empty:
            return ""
        raise TwinlmError(f"corpus {path} is empty")
    _refuse_binary(path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors != "replace":
            raise TwinlmError(f"corpus {path} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
                              f"{e.start}); convert it to UTF-8, or substitute U+FFFD with errors='replace' "
                              "(twinlm train --errors replace)") from None
        text = data.decode("utf-8", errors="replace")
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the text


def _refuse_binary(path: Path, data: bytes) -> None:
    """Text corpora have no NUL bytes and few control bytes; anything else is a wrong file, not text."""
    arr = np.frombuffer(data, dtype=np.uint8)
    nul = np.flatnonzero(arr == 0)
    if nul.size:
        raise TwinlmError(f"corpus {path} looks binary, not text: {nul.size} NUL bytes (first at offset "
                          f"{nul[0]}); UTF-16 files must be converted to UTF-8")
    controls = int((((arr < 0x20) & ~np.isin(arr, _TEXT_CONTROLS)) | (arr == 0x7F)).sum())
    if controls > _MAX_CONTROL_RATIO * arr.size:
        raise TwinlmError(f"corpus {path} looks binary, not text: {controls} of its {arr.size} bytes are "
                          "control characters")


@dataclass
class Dataset:
    """Token ids of a corpus, split by position; train/val are read-only views of one memory map."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    source: str
    cache_file: Path | None = None
    from_cache: bool = False  # True when the token file was reused rather than encoded now


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "twinlm" / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare(path: str | Path | None, tokenizer: str = "char", vocab_size: int | None = None,
            cache_dir: Path | None = None, val_fraction: float = 0.1, errors: str = "strict",
            tok: Tokenizer | None = None) -> Dataset:
    """Read, tokenize (training a `tokenizer` of that kind, or using `tok` as given) and split a corpus."""
    if not 0.0 < val_fraction < 1.0:
        raise TwinlmError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    text, source = read_corpus(path, errors)
    request = tok.to_dict() if tok is not None else tokenizer_spec(tokenizer, vocab_size)
    corpus_sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "corpus": corpus_sha, "tokenizer": request},
                                    sort_keys=True).encode()).hexdigest()[:32]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    bin_path, meta_path = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"

    cached = _read_cache_meta(meta_path, bin_path, key)
    if cached is not None:
        tok = tok if tok is not None else tokenizer_from_dict(cached["tokenizer"])
        dtype, n_tokens = np.dtype(cached["dtype"]), cached["n_tokens"]
    else:
        if tok is None:
            tok = train_tokenizer(tokenizer, text, vocab_size)
            ids = tok.encode(text)
        else:
            try:
                ids = tok.encode(text)
            except TwinlmError as e:
                raise TwinlmError(f"corpus {source} does not fit the given tokenizer: {e}") from None
        dtype, n_tokens = token_dtype(tok.vocab_size), int(ids.size)
        meta = {"format": CACHE_FORMAT, "key": key, "corpus_sha256": corpus_sha, "source": source,
                "n_tokens": n_tokens, "dtype": dtype.name, "tokenizer": tok.to_dict()}
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(bin_path, ids.astype(dtype).tobytes())
            atomic_write_json(meta_path, meta)  # written last: its presence means the .bin is complete
        except OSError as e:
            raise TwinlmError(f"cannot write the token cache in {cache_dir}: {e.strerror or e}") from None

    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
    n_train = int(n_tokens * (1.0 - val_fraction))
    return Dataset(train=tokens[:n_train], val=tokens[n_train:], tokenizer=tok, source=source,
                   cache_file=bin_path, from_cache=cached is not None)


def _read_cache_meta(meta_path: Path, bin_path: Path, key: str) -> dict[str, Any] | None:
    """The cache entry's meta when it is complete and consistent, else None (the entry is rebuilt)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        ok = (meta.get("format") == CACHE_FORMAT and meta.get("key") == key
              and bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
              and meta["n_tokens"] > 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return meta if ok else None


def check_fits(ds: Dataset, block_size: int, batch_size: int) -> None:
    """Refuse a corpus too short for one (block_size + 1)-token window per split, or for a whole batch."""
    for name, value in (("block_size", block_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise TwinlmError(f"{name} must be a positive integer, got {value!r}")
    for split, tokens in (("train", ds.train), ("validation", ds.val)):
        if len(tokens) < block_size + 1:
            raise TwinlmError(f"the {split} split of {ds.source} has {len(tokens)} tokens, fewer than "
                              f"block_size + 1 = {block_size + 1}; use a longer corpus or a smaller "
                              "block size")
        windows = len(tokens) - block_size
        if batch_size > windows:
            raise TwinlmError(f"batch_size {batch_size} is larger than the {windows} distinct windows of "
                              f"{block_size} tokens in the {split} split of {ds.source}; use a smaller "
                              "batch size or a longer corpus")


class Batcher:
    """Random (x, y) windows from a token array, y = x shifted by one; fully determined by the seed.

    Offsets come from a numpy PCG64 generator owned here, so batches are the same on every backend, and
    `state()` / `set_state()` resume the exact sequence.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int) -> None:
        if len(tokens) < block_size + 1:
            raise TwinlmError(f"{len(tokens)} tokens are fewer than block_size + 1 = {block_size + 1}")
        if batch_size <= 0 or block_size <= 0:
            raise TwinlmError(f"batch_size and block_size must be positive, got {batch_size}, {block_size}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.count = 0  # batches drawn so far
        self._window = np.arange(block_size + 1)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both int32 of shape (batch_size, block_size)."""
        starts = self.rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        chunk = np.asarray(self.tokens[starts[:, None] + self._window], dtype=np.int32)  # (N, T + 1)
        self.count += 1
        return chunk[:, :-1], chunk[:, 1:]

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position in the batch sequence."""
        return {"bit_generator": json.loads(json.dumps(self.rng.bit_generator.state)), "count": self.count}

    def set_state(self, state: dict[str, Any]) -> None:
        try:
            self.rng.bit_generator.state = state["bit_generator"]
            self.count = int(state["count"])
        except (KeyError, TypeError, ValueError) as e:
            raise TwinlmError(f"invalid batcher state (from a checkpoint's meta?): {e}") from None
