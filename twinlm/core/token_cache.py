"""Streaming preparation of a corpus into the token cache: bounded memory, kill-safe, one summary line.

Passes over the corpus, each `corpus.CHUNK_BYTES` at a time (memory does not grow with the corpus):
1. hash: SHA-256 of the files as stored -> the cache key (with the tokenizer request and errors mode). A
   complete entry under that key is used as it is: nothing is decoded. The hash is remembered beside the
   files' (path, device, inode, size, mtime, ctime) in `<sig>.stat.json`; while every one of those is the
   same, the files are not read again. Any change (an edit sets ctime, even when mtime is put back) misses
   and hashes; files changed less than STAT_MARGIN_NS before hashing began are not remembered (a clock
   tick could hide a later edit).
2. vocabulary (char: the set of code points, kept as a 0x110000-entry table; bpe: `train_from_iterator` over
   the first `bpe_sample_mb` MB of text, all of it with 0; byte and a given tokenizer: skipped).
3. encode: chunk by chunk (BPE chunks end at boundaries where its pre-tokenizer always splits, so the ids
   equal the whole text's), appended to a temp file beside the entry.

Kill-safety, as checkpoints (core.atomic, whose `fs` seam the fault-injection tests drive): the tokens go to
`.tmp-<key>.bin-*`, are fsynced and renamed to `<key>.bin`; then `<key>.json` (n_tokens, dtype, the SHA-256
of the token bytes, the tokenizer) is written the same way. The meta is the manifest: an entry without a
consistent one is never loaded, it is rebuilt. One preparation per key at a time (an flock on
`.<key>.lock`; MLX ranks wait for rank 0's and then read it); temp files found under the lock belong to a
killed (or interrupted) preparation.

Resuming: as encoding starts and then every CHECKPOINT_CHARS characters, the temp token file is fsynced and
`.tmp-<key>.resume.json` records (atomically) the learned tokenizer, the tokens written so far with their
SHA-256, and where in the corpus they end (the joiner's state at the start of that file). The next
preparation of the same key checks the record against the temp file (the prefix's SHA-256) and goes on from
there, cutting off what came after the checkpoint, or, when anything does not match, starts over; it says
which in one line. An error (a bad byte, a full disk) removes the temp files; an interrupt (Ctrl-C) keeps
them to resume from.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core import atomic
from twinlm.core import corpus as C
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    SpecialTokens,
    Tokenizer,
    bpe_chunks,
    bpe_last_cut,
    tokenizer_from_dict,
    tokenizer_spec,
)

CACHE_ENV = "TWINLM_CACHE_DIR"
CACHE_FORMAT = 2
DEFAULT_BPE_SAMPLE_MB = 64
RESUME_FORMAT = 1
CHECKPOINT_CHARS = 1 << 26  # text encoded between two resume checkpoints (read at call time: tests lower it)
STAT_MARGIN_NS = 2_000_000_000  # files changed this shortly before hashing are hashed again next time
PARALLEL_MIN_BYTES = 64_000_000  # BPE encodes in worker processes from this corpus size on
ENCODE_WORKERS: int | None = None  # None: one per CPU this process may use (at most 8)

# phase ("hash", "vocab", "encode"), bytes done, bytes total: a progress display's view. Bytes are those of
# the files on disk (compressed for .gz). A last call with phase "done" ends it, also after an error.
PhaseProgress = Callable[[str, int, int], None]


class EmptyText(TwinlmError):
    """The corpus has no text to learn a vocabulary from."""


@dataclass
class Prepared:
    bin_path: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    source: str
    from_cache: bool


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def read_meta(meta_path: Path, bin_path: Path, key: str) -> dict[str, Any] | None:
    """The entry's meta when it is complete and consistent with its token file, else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        ok = (meta.get("format") == CACHE_FORMAT and meta.get("key") == key
              and bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
              and meta["n_tokens"] > 0 and isinstance(meta.get("tokens_sha256"), str))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return meta if ok else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (released by the kernel if this process dies)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one preparation at a time is then up to the user
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TwinlmError(f"cannot write the token cache in {path.parent}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _Phases:
    def __init__(self, report: PhaseProgress | None, total: int) -> None:
        self.report, self.total, self.done, self.phase = report, total, 0, ""

    def start(self, phase: str) -> C.Progress | None:
        self.phase, self.done = phase, 0
        if self.report is None:
            return None
        self.report(phase, 0, self.total)
        return self.advance

    def advance(self, n: int) -> None:
        self.done += n
        if self.report is not None:
            self.report(self.phase, self.done, self.total)


def prepare_tokens(data: Any, tokenizer: str = "char", vocab_size: int | None = None,
                   cache_dir: Path | None = None, errors: str = "strict", tok: Tokenizer | None = None,
                   bpe_sample_mb: int = DEFAULT_BPE_SAMPLE_MB, chunk_bytes: int = C.CHUNK_BYTES,
                   log: Callable[[str], None] | None = None,
                   progress: PhaseProgress | None = None) -> Prepared:
    """The cache entry of the corpus `data` (files, folders, globs) with this tokenizer, built if needed."""
    if errors not in C.ENCODING_ERRORS:
        raise TwinlmError(f"encoding errors mode must be one of {', '.join(C.ENCODING_ERRORS)}, "
                          f"got {errors!r}")
    if isinstance(bpe_sample_mb, bool) or not isinstance(bpe_sample_mb, int) or bpe_sample_mb < 0:
        raise TwinlmError(f"bpe-sample-mb must be an integer >= 0 (0: the whole corpus), "
                          f"got {bpe_sample_mb!r}")
    files, source = C.find_files(data)
    phases = _Phases(progress, sum(cf.size for cf in files))
    try:
        return _prepare(files, source, phases, tokenizer, vocab_size, cache_dir, errors, tok, bpe_sample_mb,
                        chunk_bytes, log or (lambda message: None))
    finally:
        if progress is not None:
            progress("done", phases.total, phases.total)


def _prepare(files: list[C.CorpusFile], source: str, phases: _Phases, tokenizer: str, vocab_size: int | None,
             cache_dir: Path | None, errors: str, tok: Tokenizer | None, bpe_sample_mb: int, chunk_bytes: int,
             say: Callable[[str], None]) -> Prepared:
    t0 = time.perf_counter()
    request = tok.to_dict() if tok is not None else tokenizer_spec(tokenizer, vocab_size)
    if tok is None and request["kind"] == "bpe":
        request = {**request, "bpe_sample_mb": bpe_sample_mb}
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus_sha = corpus_hash(files, cache_dir, phases, chunk_bytes)
    key = _key(corpus_sha, request, errors)
    bin_path, meta_path = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"
    meta = read_meta(meta_path, bin_path, key)
    if meta is None and tok is not None:  # a resumed run: the entry its first run built, if it is there
        found = _entry_of_learned(tok, corpus_sha, errors, cache_dir)
        if found is not None:
            bin_path, meta = found
    if meta is None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TwinlmError(f"cannot write the token cache in {cache_dir}: {e.strerror or e}") from None
        with _locked(cache_dir / f".{key}.lock"):
            meta = read_meta(meta_path, bin_path, key)  # another process may have built it meanwhile
            if meta is None:
                resume = _resume_or_start_over(cache_dir, key, bin_path, tok, len(files), say)
                meta = _build(files, source, key, corpus_sha, bin_path, meta_path, tokenizer, vocab_size, tok,
                              errors, bpe_sample_mb, chunk_bytes, phases, resume)
                wall = time.perf_counter() - t0
                rate = (f"{phases.total / 1e6 / max(wall, 1e-9):.1f} MB/s" if resume is None
                        else "the rest after its checkpoint")
                say(f"prepared {source}: {meta['n_tokens']:,} tokens from {meta['files']:,} files "
                    f"({human_bytes(phases.total)}, {meta['documents']:,} documents) in {wall:.1f} s "
                    f"({rate}); token file {human_bytes(bin_path.stat().st_size)} ({meta['dtype']}) at "
                    f"{bin_path}")
                return Prepared(bin_path, meta, tok or tokenizer_from_dict(meta["tokenizer"]), source, False)
    say(f"token cache: {meta['n_tokens']:,} tokens of {source} from {bin_path}")
    return Prepared(bin_path, meta, tok or tokenizer_from_dict(meta["tokenizer"]), source, True)


def _key(corpus_sha: str, request: dict[str, Any], errors: str) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "corpus": corpus_sha, "tokenizer": request,
                                      "errors": errors}, sort_keys=True).encode()).hexdigest()[:32]


def _entry_of_learned(tok: Tokenizer, corpus_sha: str, errors: str,
                      cache_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The entry built by learning a tokenizer equal to `tok` (its plain part: an encoder's special tokens
    come after the corpus's ids) from this corpus, so a resumed run or an eval does not encode it again."""
    plain = tok.base if isinstance(tok, SpecialTokens) else tok
    want = plain.to_dict()
    requests: list[dict[str, Any]] = []
    if plain.kind in ("char", "byte"):
        requests.append({"kind": plain.kind, "vocab_size": None})
    elif plain.kind == "bpe":  # the vocabulary asked for is usually the one learned; the default sample
        requests.append({"kind": "bpe", "vocab_size": plain.vocab_size,
                         "bpe_sample_mb": DEFAULT_BPE_SAMPLE_MB})
    for request in requests:
        key = _key(corpus_sha, request, errors)
        meta = read_meta(cache_dir / f"{key}.json", cache_dir / f"{key}.bin", key)
        if meta is not None and meta.get("tokenizer") == want:
            return cache_dir / f"{key}.bin", meta
    return None


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "twinlm" / "tokens"


def _stat_rows(files: list[C.CorpusFile]) -> list[list[Any]] | None:
    rows = []
    for cf in files:
        if cf.content is not None:
            return None
        try:
            st = os.stat(cf.path)
        except OSError:
            return None
        rows.append([str(Path(cf.path).resolve()), cf.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                     st.st_ctime_ns])
    return rows


def corpus_hash(files: list[C.CorpusFile], cache_dir: Path, phases: _Phases | None = None,
                chunk_bytes: int = C.CHUNK_BYTES) -> str:
    """The corpus's content hash (`corpus.content_hash`), read from `cache_dir/<sig>.stat.json` when the
    files' stat rows are the ones it was computed with, else computed (and remembered unless fresh)."""
    rows = _stat_rows(files)
    record = None
    if rows is not None:
        sig = hashlib.sha256(json.dumps(rows).encode("utf-8", "surrogateescape")).hexdigest()[:32]
        record = cache_dir / f"{sig}.stat.json"
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
            if saved.get("stat") == rows and isinstance(saved.get("corpus_sha256"), str):
                return saved["corpus_sha256"]
        except (OSError, ValueError, AttributeError):
            pass
    began = time.time_ns()
    sha = C.content_hash(files, phases.start("hash") if phases else None, chunk_bytes)
    if record is not None and _stat_rows(files) == rows \
            and all(max(r[5], r[6]) < began - STAT_MARGIN_NS for r in rows):
        _write_shortcut(record, {"stat": rows, "corpus_sha256": sha})
    return sha


def _write_shortcut(path: Path, obj: Any) -> None:
    """Write a record that only saves work (a lost or unreadable one means hashing again): temp file and
    rename, so no reader sees half of it, but no fsync, and outside the `atomic.fs` seam, so the fault-
    injection tests see the same writes whether or not the corpus's files are old enough to be remembered."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
        with os.fdopen(fd, "wb") as f:
            f.write(atomic.json_bytes(obj))
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@dataclass
class _Resume:
    tmp: Path
    n_tokens: int
    chars: int  # of the joined text, encoded into the n_tokens
    start: C.Stats  # the stream's state at the start of the file the checkpoint falls in
    tokenizer: Tokenizer
    digest: Any  # SHA-256 of the n_tokens' bytes, to go on updating


def _resume_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f".tmp-{key}.resume.json"


def _read_resume(cache_dir: Path, key: str, tok: Tokenizer | None) -> _Resume | None:
    """The checkpoint an interrupted preparation of `key` left, if it matches its temp file, else None."""
    try:
        rec = json.loads(_resume_path(cache_dir, key).read_text(encoding="utf-8"))
        name = rec["tmp"]
        if rec["format"] != RESUME_FORMAT or rec["key"] != key or not isinstance(name, str) \
                or Path(name).name != name or not name.startswith(f".tmp-{key}.bin-"):
            return None
        if tok is not None and rec["tokenizer"] != tok.to_dict():
            return None
        learned = tok if tok is not None else tokenizer_from_dict(rec["tokenizer"])
        n_tokens, chars = int(rec["n_tokens"]), int(rec["chars"])
        start = C.Stats(**rec["start"])
        nbytes = n_tokens * token_dtype(learned.vocab_size).itemsize
        tmp = cache_dir / name
        if n_tokens < 0 or tmp.stat().st_size < nbytes or not 0 <= start.chars <= chars:
            return None
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            left = nbytes
            while left and (block := f.read(min(left, 1 << 22))):
                digest.update(block)
                left -= len(block)
        if left or digest.hexdigest() != rec["tokens_sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TwinlmError):
        return None
    return _Resume(tmp, n_tokens, chars, start, learned, digest)


def _resume_or_start_over(cache_dir: Path, key: str, bin_path: Path, tok: Tokenizer | None, n_files: int,
                          say: Callable[[str], None]) -> _Resume | None:
    """What a killed or interrupted preparation of this key left (we hold the lock, so nobody is writing
    it): a checkpoint to go on from, said so; else its files are removed, and the start over said so."""
    leftovers = sorted(cache_dir.glob(f".tmp-*{key}*"))
    partial = bin_path.exists()  # a token file renamed into place whose meta was never written
    resume = _read_resume(cache_dir, key, tok) if leftovers and not partial else None
    keep = {resume.tmp, _resume_path(cache_dir, key)} if resume else set()
    if resume is not None:
        say(f"token cache: resuming an interrupted preparation of this corpus from its checkpoint "
            f"({resume.n_tokens:,} tokens written, at file {resume.start.files + 1:,} of {n_files:,})")
    elif leftovers:
        say(f"token cache: an interrupted preparation of this corpus left {len(leftovers)} temp "
            f"file{'s' * (len(leftovers) != 1)} and no checkpoint that matches them; starting over")
    elif partial:
        say("token cache: this corpus's entry is incomplete or damaged (its token file does not match a "
            "complete meta); starting over")
    for p in leftovers:
        if p not in keep:
            with contextlib.suppress(FileNotFoundError):
                atomic.fs.unlink(p)
    return resume


def _build(files: list[C.CorpusFile], source: str, key: str, corpus_sha: str, bin_path: Path, meta_path: Path,
           kind: str, vocab_size: int | None, tok: Tokenizer | None, errors: str, bpe_sample_mb: int,
           chunk_bytes: int, phases: _Phases, resume: _Resume | None = None) -> dict[str, Any]:
    given = tok is not None
    empty = C.empty_error(files, source)
    if resume is not None:
        tok = resume.tokenizer
    elif tok is None and kind == "byte":
        tok = ByteTokenizer()  # nothing to learn: no pass before encoding (which checks the text as well)
    elif tok is None:
        seen = C.Stats()
        try:
            pieces = C.stream_text(files, errors, chunk_bytes, phases.start("vocab"), seen)
            tok = learn_tokenizer(kind, vocab_size, pieces, bpe_sample_mb, chunk_bytes)
        except EmptyText:
            raise empty from None
        if seen.chars == 0:
            raise empty
    dtype = token_dtype(tok.vocab_size)
    cut, size = _chunking(tok, chunk_bytes)
    record = _resume_path(bin_path.parent, key)
    tmp: str | Path | None = None
    try:
        if resume is not None:
            tmp, n_tokens, chars, digest = resume.tmp, resume.n_tokens, resume.chars, resume.digest
            f = atomic.fs.reopen(tmp, n_tokens * dtype.itemsize)
            stats = dataclasses.replace(resume.start)
        else:
            f, tmp = atomic.fs.mkstemp(bin_path.parent, prefix=f".tmp-{bin_path.name}-")
            n_tokens, chars, digest, stats = 0, 0, hashlib.sha256(), C.Stats()

        def checkpoint(start: C.Stats) -> None:
            atomic.fs.fsync(f)
            atomic.atomic_write_json(record, {
                "format": RESUME_FORMAT, "key": key, "tmp": Path(tmp).name, "n_tokens": n_tokens,
                "chars": chars, "tokens_sha256": digest.copy().hexdigest(),
                "start": dataclasses.asdict(start), "tokenizer": tok.to_dict()})

        with f:
            if resume is None:
                checkpoint(C.Stats())  # the learned tokenizer is kept even if no chunk is
            progress = phases.start("encode")
            if progress is not None:
                progress(sum(cf.size for cf in files[:stats.files]))
            starts: list[C.Stats] = []
            pieces = C.stream_text(files[stats.files:], errors, chunk_bytes, progress, stats, starts)
            if resume is not None:
                pieces = C.skip_chars(pieces, chars - resume.start.chars)
            saved = chars
            total = sum(cf.size for cf in files)
            for chunk, ids in _encoded(tok, C.text_chunks(pieces, size, cut), _workers(tok, total)):
                if isinstance(ids, TwinlmError):
                    if not given:
                        raise ids
                    raise TwinlmError(f"corpus {source} does not fit the given tokenizer: {ids}") from None
                data = ids.astype(dtype).tobytes()
                atomic.fs.write(f, data)
                digest.update(data)
                n_tokens += ids.size
                chars += len(chunk)
                if chars - saved >= CHECKPOINT_CHARS:
                    while len(starts) > 1 and starts[1].chars <= chars:
                        starts.pop(0)  # the last file start at or before `chars` stays first
                    checkpoint(starts[0])
                    saved = chars
            atomic.fs.fsync(f)
        if stats.chars == 0:
            raise empty
        atomic.fs.replace(tmp, bin_path)
        tmp = None
        atomic.fs.fsync_dir(bin_path.parent)
        atomic.fs.unlink(record)  # before the meta: a kill in between leaves a token file, rebuilt
        meta = {"format": CACHE_FORMAT, "key": key, "corpus_sha256": corpus_sha, "source": source,
                "files": stats.files, "documents": stats.documents, "chars": stats.chars,
                "n_tokens": n_tokens, "dtype": dtype.name, "tokens_sha256": digest.hexdigest(),
                "tokenizer": tok.to_dict()}
        atomic.atomic_write_json(meta_path, meta)  # written last: the manifest of a complete entry
    except OSError as e:
        _remove(tmp, record)
        raise TwinlmError(f"cannot write the token cache in {bin_path.parent}: {e.strerror or e}") from None
    except Exception:
        _remove(tmp, record)  # a bad byte, an empty corpus: nothing to resume (the corpus must change)
        raise
    return meta


def _workers(tok: Tokenizer, corpus_bytes: int) -> int:
    """Processes that encode BPE chunks side by side (0: this one alone). Its Python part (splitting, the
    word cache) holds the GIL, so threads would not help; worth their start-up (~0.5 s) on a big corpus."""
    if type(tok) is not BPETokenizer or corpus_bytes < PARALLEL_MIN_BYTES:
        return 0
    n = ENCODE_WORKERS if ENCODE_WORKERS is not None else min(len(os.sched_getaffinity(0))
                                                               if hasattr(os, "sched_getaffinity")
                                                               else (os.cpu_count() or 1), 8)
    return n if n > 1 else 0


_worker_tok: Tokenizer | None = None


def _worker_init(spec: dict[str, Any]) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _worker_tok = tokenizer_from_dict(spec)


def _worker_encode(chunk: str) -> np.ndarray | TwinlmError:
    assert _worker_tok is not None
    try:
        return _worker_tok.encode(chunk)
    except TwinlmError as e:
        return TwinlmError(str(e))


def _encoded(tok: Tokenizer, chunks: Iterator[str],
             workers: int = 0) -> Iterator[tuple[str, np.ndarray | TwinlmError]]:
    """(chunk, its ids or the error encoding it raised), in order: here, or by `workers` spawned processes
    with a few chunks in flight each (memory stays bounded; the ids are the same, chunk by chunk)."""
    if workers <= 0:
        for chunk in chunks:
            try:
                yield chunk, tok.encode(chunk)
            except TwinlmError as e:
                yield chunk, e
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the tokenizers library's threads do not survive a fork
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(tok.to_dict(),))
    try:
        pending: collections.deque[tuple[str, Any]] = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(_worker_encode, chunk)))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _remove(*paths: str | Path | None) -> None:
    for p in paths:
        if p is not None:
            with contextlib.suppress(OSError):
                os.unlink(p)


def _chunking(tok: Tokenizer, chunk_bytes: int) -> tuple[Callable[[str], int] | None, int]:
    """(cut, chunk size) under which encoding chunk by chunk gives the whole text's ids. char and byte: any
    cut. Byte-level BPE, and special tokens around char/byte/bpe (their literals have no spaces): before a
    space or newline after a non-space. Another tokenizer (an imported model's "hf" one, whose normalizer
    may prepend to every call) is not cut: its corpus is encoded in one piece, as before streaming."""
    if type(tok) in (CharTokenizer, ByteTokenizer):
        return None, chunk_bytes
    wrapped = isinstance(tok, SpecialTokens) and tok.kind in ("char", "byte", "bpe")
    if isinstance(tok, BPETokenizer) or wrapped:
        return bpe_last_cut, chunk_bytes
    return None, 1 << 62


def learn_tokenizer(kind: str, vocab_size: int | None, pieces: Iterator[str],
                    bpe_sample_mb: int = DEFAULT_BPE_SAMPLE_MB,
                    chunk_bytes: int = C.CHUNK_BYTES) -> Tokenizer:
    """A tokenizer of `kind` learned from a stream of text (see `tokenizers.train_tokenizer`)."""
    spec = tokenizer_spec(kind, vocab_size)
    if kind == "byte":
        for _ in pieces:  # still read it: bad input fails here, not half-way through encoding
            pass
        return ByteTokenizer()
    if kind == "char":
        seen = np.zeros(0x110000, dtype=bool)
        for piece in pieces:
            if piece.isascii():  # a count of the 128 byte values is cheaper than a scatter
                seen[:128] |= np.bincount(np.frombuffer(piece.encode("ascii"), np.uint8), minlength=128) > 0
            else:
                seen[np.frombuffer(piece.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)] = True
        codes = np.flatnonzero(seen)
        if not codes.size:
            raise EmptyText("cannot build a tokenizer from empty text")
        return CharTokenizer("".join(map(chr, codes.tolist())))
    limit = bpe_sample_mb * 1_000_000 if bpe_sample_mb else None

    def sample() -> Iterator[str]:
        n = 0
        for chunk in C.text_chunks(pieces, chunk_bytes, bpe_last_cut):
            yield from bpe_chunks(chunk, 1 << 14)  # small items: the trainer spreads them over its threads
            n += len(chunk)
            if limit is not None and n >= limit:
                return

    return BPETokenizer.train_iter(sample(), spec["vocab_size"])
