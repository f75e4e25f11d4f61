"""Corpus reading, tokenization into an on-disk token cache, and seeded random batches.

Corpus: one or several files, folders or globs (`.txt`, `.md`, `.jsonl` rows with a `text` field, and
`.gz` of these; see `twinlm.core.corpus`), or None for the built-in task corpus
(`twinlm.core.task.builtin_corpus`).

Token cache (`twinlm.core.token_cache`): the corpus is read and encoded in chunks, in memory that does not
grow with it, into a flat `<key>.bin` (uint16 ids when the vocabulary fits, else uint32) plus `<key>.json`
meta, and memory-mapped on use. The key is a SHA-256 of the corpus files (streamed), the tokenizer request
(kind + vocab size, or the exact tokenizer when one is given) and the errors mode, so an edited corpus or
another tokenizer misses the cache and a bpe tokenizer is not retrained on a hit. Where: `cache_dir` if
given, else $TWINLM_CACHE_DIR, else $XDG_CACHE_HOME/twinlm/tokens, else ~/.cache/twinlm/tokens. Entries are
written atomically (a kill never leaves one that loads); deleting the folder is always safe.

Split: the first (1 - val_fraction) of the tokens train, the rest validate (by token offset, like nanoGPT):
two views of one memory map, never a copy.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core import corpus as C
from twinlm.core.errors import TwinlmError
from twinlm.core.token_cache import (
    CACHE_ENV,
    DEFAULT_BPE_SAMPLE_MB,
    PhaseProgress,
    default_cache_dir,
    prepare_tokens,
    token_dtype,
)
from twinlm.core.tokenizers import Tokenizer

__all__ = ["CACHE_ENV", "Batcher", "Dataset", "check_fits", "default_cache_dir", "encode_whole", "prepare",
           "read_corpus", "token_dtype"]
ENCODING_ERRORS = C.ENCODING_ERRORS
Corpus = str | Path | Sequence[str | Path] | None


def read_corpus(path: Corpus, errors: str = "strict") -> tuple[str, str]:
    """(whole text, source name) of a corpus, or of the built-in corpus (None): the text `prepare`
    streams, joined in memory (for small texts and tests; training and `eval --data` stream instead).

    errors="replace" turns invalid UTF-8 into U+FFFD, "skip" drops it, instead of refusing the file.
    """
    if errors not in ENCODING_ERRORS:
        raise TwinlmError(f"encoding errors mode must be one of {', '.join(ENCODING_ERRORS)}, got {errors!r}")
    if path is None:
        from twinlm.core import task

        return task.builtin_corpus(), f"builtin:{task.NAME}"
    files, source = C.find_files(path)
    text = "".join(C.stream_text(files, errors))
    if not text:
        raise C.empty_error(files, source)
    return text, source


@dataclass
class Dataset:
    """Token ids of a corpus, split by position; train/val are read-only views of one memory map."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    source: str
    cache_file: Path | None = None
    from_cache: bool = False  # True when the token file was reused rather than encoded now


def prepare(path: Corpus, tokenizer: str = "char", vocab_size: int | None = None,
            cache_dir: Path | None = None, val_fraction: float = 0.1, errors: str = "strict",
            tok: Tokenizer | None = None, bpe_sample_mb: int = DEFAULT_BPE_SAMPLE_MB,
            log: Callable[[str], None] | None = None, progress: PhaseProgress | None = None,
            chunk_bytes: int = C.CHUNK_BYTES) -> Dataset:
    """Tokenize a corpus into the token cache (training a `tokenizer` of that kind, or using `tok` as
    given), streamed in bounded memory, and split it; `log` gets the one-line summary."""
    if not 0.0 < val_fraction < 1.0:
        raise TwinlmError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    data: Any = path
    if path is None:  # generated text, streamed like a file
        from twinlm.core import task

        data = [C.in_memory(task.builtin_corpus(), f"builtin:{task.NAME}")]
    p = prepare_tokens(data, tokenizer, vocab_size, cache_dir, errors, tok, bpe_sample_mb, chunk_bytes,
                       log, progress)
    n_tokens = p.meta["n_tokens"]
    tokens = np.memmap(p.bin_path, dtype=np.dtype(p.meta["dtype"]), mode="r", shape=(n_tokens,))
    n_train = int(n_tokens * (1.0 - val_fraction))
    return Dataset(train=tokens[:n_train], val=tokens[n_train:], tokenizer=p.tokenizer, source=p.source,
                   cache_file=p.bin_path, from_cache=p.from_cache)


def encode_whole(path: Corpus, tok: Tokenizer, cache_dir: Path | None = None, errors: str = "strict",
                 log: Callable[[str], None] | None = None, progress: PhaseProgress | None = None,
                 chunk_bytes: int = C.CHUNK_BYTES) -> Dataset:
    """A corpus encoded with `tok` through the token cache, streamed like `prepare`'s, all of it as both
    `train` and `val` (one memory map, never a copy): the text `twinlm eval --data` scores."""
    p = prepare_tokens(path, cache_dir=cache_dir, errors=errors, tok=tok, chunk_bytes=chunk_bytes, log=log,
                       progress=progress)
    tokens = np.memmap(p.bin_path, dtype=np.dtype(p.meta["dtype"]), mode="r", shape=(p.meta["n_tokens"],))
    return Dataset(train=tokens, val=tokens, tokenizer=p.tokenizer, source=p.source, cache_file=p.bin_path,
                   from_cache=p.from_cache)


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


def _file_view(tokens: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset) of a contiguous view of an np.memmap, or None for other arrays."""
    mm, name = getattr(tokens, "_mmap", None), getattr(tokens, "filename", None)
    if mm is None or name is None or not tokens.flags.c_contiguous or tokens.ndim != 1:
        return None
    mapped_from = tokens.offset - tokens.offset % mmap.ALLOCATIONGRANULARITY  # the file offset mapped at 0
    start = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    return str(name), mapped_from + tokens.ctypes.data - start


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
        # A token-cache memory map: reading windows through it would keep every page they touch (plus the
        # kernel's read-around, ~60 KB a window measured here) mapped in this process, so its RSS would
        # grow towards the whole file (nanoGPT re-creates its memmap each batch for this). Windows are
        # read with pread from the file instead: the same bytes, through the page cache, and no RSS.
        self._file = _file_view(tokens)
        self._fd = os.open(self._file[0], os.O_RDONLY) if self._file else None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both int32 of shape (batch_size, block_size)."""
        starts = self.rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        if self._fd is not None and self._file is not None:
            size = self.tokens.itemsize
            n = (self.block_size + 1) * size
            raw = b"".join(os.pread(self._fd, n, self._file[1] + int(s) * size) for s in starts)
            chunk = np.frombuffer(raw, dtype=self.tokens.dtype).reshape(self.batch_size, -1).astype(np.int32)
        else:
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
