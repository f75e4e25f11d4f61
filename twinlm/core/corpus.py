"""Corpus sources, read as a stream of text pieces in bounded memory.

A corpus is one or several of: a file, a folder (every `.txt`, `.md` and `.jsonl` file below it, and their
`.gz`, sorted by relative path; hidden names skipped), or a glob pattern (`books/**/*.txt`). A file named
directly is read as plain text unless it ends in `.jsonl` (`.gz` is decompressed either way).

- Text files are read `chunk_bytes` at a time and decoded with an incremental UTF-8 decoder, so a multi-byte
  character split across two reads decodes exactly as in the whole file. A leading byte-order mark is dropped.
- `.jsonl` files: one JSON object per line whose `text` string is a document; blank lines are skipped. Rows
  with `messages` or `prompt`/`completion` are chat/instruction data, which a plain corpus refuses.
- Documents (files, jsonl rows) are joined with a newline where one does not already end in one; empty
  documents are skipped. `read_corpus` (core.data) joins the same pieces, so streamed and whole text agree.
- Invalid UTF-8: `errors="strict"` refuses it (file and byte offset), "replace" substitutes U+FFFD, "skip"
  drops the undecodable bytes. A file with NUL bytes or mostly control bytes is refused as binary.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from twinlm.core.errors import TwinlmError

ENCODING_ERRORS = ("strict", "replace", "skip")
_DECODER_ERRORS = {"strict": "strict", "replace": "replace", "skip": "ignore"}
SUFFIXES = (".txt", ".md", ".jsonl")
# Bytes read (and characters tokenized) at a time: preparation's memory is a small multiple of it (a few
# arrays of 4-byte codes and ids per character; ~17 MB above the interpreter measured at 256 KB).
CHUNK_BYTES = 1 << 18
# Control bytes plain text does not use: below 0x20 but tab, newline, vertical tab, form feed, carriage
# return; and DEL. Counted with bytes.translate (C speed, no per-byte arrays).
_CONTROL_BYTES = bytes(b for b in [*range(0x20), 0x7F] if b not in (9, 10, 11, 12, 13))
_MAX_CONTROL_RATIO = 0.1
_CHAT_KEYS = ("messages", "prompt", "completion")

Progress = Callable[[int], None]  # called with the on-disk bytes just consumed


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    name: str  # relative to the folder it was found in (or as given): part of the content hash
    jsonl: bool
    gz: bool
    size: int  # on disk (compressed for .gz)
    content: bytes | None = None  # text given in memory (the built-in corpus) instead of a file


def _format(name: str) -> tuple[str, bool] | None:
    """(suffix, gzipped) of a corpus file name, or None when it is not one."""
    lower = name.lower()
    gz = lower.endswith(".gz")
    base = lower[:-3] if gz else lower
    return next(((s, gz) for s in SUFFIXES if base.endswith(s)), None)


def _entry(path: Path, name: str) -> CorpusFile:
    fmt = _format(path.name)
    jsonl, gz = (fmt[0] == ".jsonl", fmt[1]) if fmt else (False, path.name.lower().endswith(".gz"))
    try:
        size = path.stat().st_size
    except OSError as e:
        raise TwinlmError(f"cannot read corpus {path}: {e.strerror or e}") from None
    return CorpusFile(path, name, jsonl, gz, size)


def find_files(data: str | Path | Sequence[str | Path | CorpusFile]) -> tuple[list[CorpusFile], str]:
    """The corpus files of one or several --data values, in reading order, and a source name."""
    specs = [data] if isinstance(data, (str, Path)) else list(data)
    if not specs:
        raise TwinlmError("no corpus given")
    if all(isinstance(s, CorpusFile) for s in specs):  # already found (or in memory)
        return list(specs), ", ".join(s.name for s in specs)  # type: ignore[misc]
    files: list[CorpusFile] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _format(p.name)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise TwinlmError(f"corpus folder {path} has no .txt, .md or .jsonl files (nor .gz of them)")
            files += [_entry(p, p.relative_to(path).as_posix()) for p in found]
        elif path.is_file():
            files.append(_entry(path, path.name))
        elif glob.has_magic(str(spec)):
            found = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
            if not found:
                raise TwinlmError(f"no corpus files match {spec}")
            files += [_entry(p, p.as_posix()) for p in found]
        else:
            raise TwinlmError(f"corpus not found: {path}")
    if len(specs) == 1 and len(files) == 1 and Path(specs[0]).is_file():
        source = str(specs[0])
    else:
        shown = str(specs[0]) if len(specs) == 1 else f"{specs[0]} and {len(specs) - 1} more"
        source = f"{shown} ({len(files)} files)"
    return files, source


def in_memory(text: str, name: str) -> CorpusFile:
    """A generated corpus (the built-in task's) as a corpus file."""
    data = text.encode("utf-8")
    return CorpusFile(Path(name), name, jsonl=False, gz=False, size=len(data), content=data)


def empty_error(files: list[CorpusFile], source: str) -> TwinlmError:
    one = len(files) == 1 and source == str(files[0].path)
    return TwinlmError(f"corpus {source} is empty" if one
                       else f"corpus {source} has no text (its files are empty)")


def resolve_data(data: str | Path | Sequence[str | Path]) -> str | list[str]:
    """--data value(s) as absolute paths (a run resumed from elsewhere finds them): a string, or a list
    for several values. A glob stays a glob, made absolute."""
    if isinstance(data, (str, Path)):
        return str(Path(data).resolve())
    return [str(Path(d).resolve()) for d in data]


def corpus_name(data: str | Path | Sequence[str | Path]) -> str:
    """A short name for runs trained on `data`: the file's name without its suffixes (`rows.jsonl.gz` ->
    rows), a folder's name, a glob's folder (`notes/*.txt` -> notes); the first of several values."""
    spec = str(data if isinstance(data, (str, Path)) else (list(data) or ["run"])[0])
    parts = Path(spec).parts
    magic = next((i for i, part in enumerate(parts) if glob.has_magic(part)), None)
    if magic is not None:
        parts = parts[:magic]
    name = parts[-1] if parts else ""
    if magic is None and not Path(spec).is_dir():
        name = name[:-3] if name.lower().endswith(".gz") else name
        name = Path(name).stem
    return name if name not in ("", ".", "..", "/") else "run"


def _open(cf: CorpusFile) -> BinaryIO:
    if cf.content is not None:
        return io.BytesIO(cf.content)
    try:
        raw = open(cf.path, "rb")  # noqa: SIM115 (closed by the caller's with)
    except OSError as e:
        raise TwinlmError(f"cannot read corpus {cf.path}: {e.strerror or e}") from None
    return gzip.GzipFile(fileobj=raw, mode="rb") if cf.gz else raw  # type: ignore[return-value]


def _disk_pos(f: BinaryIO, cf: CorpusFile) -> int:
    """Bytes of the file on disk consumed so far (for progress: compressed bytes for .gz)."""
    return f.fileobj.tell() if cf.gz else f.tell()  # type: ignore[attr-defined]


def content_hash(files: list[CorpusFile], progress: Progress | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> str:
    """SHA-256 of every file's name, size and bytes as stored (a .gz file's compressed bytes), streamed."""
    h = hashlib.sha256()
    for cf in files:
        name = cf.name.encode("utf-8", "surrogateescape")
        h.update(f"{len(name)}:".encode() + name + f":{cf.size}:".encode())
        try:
            with _open(cf) if cf.content is not None else open(cf.path, "rb") as f:
                while block := f.read(chunk_bytes):
                    h.update(block)
                    if progress:
                        progress(len(block))
        except OSError as e:
            raise TwinlmError(f"cannot read corpus {cf.path}: {e.strerror or e}") from None
    return h.hexdigest()


def _decode_error(cf: CorpusFile, e: UnicodeDecodeError, offset: int, where: str = "") -> TwinlmError:
    gz = " (decompressed)" if cf.gz else ""
    return TwinlmError(f"corpus {cf.path}{where} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at "
                       f"offset {offset}{gz}); convert it to UTF-8, or substitute U+FFFD with --errors "
                       "replace (errors='replace'), or drop such bytes with --errors skip")


def _text_pieces(cf: CorpusFile, errors: str, chunk_bytes: int,
                 progress: Progress | None) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(_DECODER_ERRORS[errors])
    offset, controls, first, disk = 0, 0, True, 0
    try:
        with _open(cf) as f:
            while True:
                raw = f.read(chunk_bytes)
                if raw:
                    nul = raw.find(b"\0")
                    if nul >= 0:
                        raise TwinlmError(f"corpus {cf.path} looks binary, not text: a NUL byte at offset "
                                          f"{offset + nul}; UTF-16 files must be converted to UTF-8")
                    controls += len(raw) - len(raw.translate(None, _CONTROL_BYTES))
                buffered = len(decoder.getstate()[0])  # bytes of a character cut by the previous read
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise _decode_error(cf, e, offset - buffered + e.start) from None
                offset += len(raw)
                if first and text:
                    text, first = text.removeprefix("\ufeff"), False  # a byte-order mark is not text
                if progress:
                    now = _disk_pos(f, cf)
                    progress(now - disk)
                    disk = now
                if text:
                    yield text
                if not raw:
                    break
    except (OSError, EOFError, zlib.error) as e:
        raise TwinlmError(f"cannot read corpus {cf.path}: {getattr(e, 'strerror', None) or e}") from None
    if offset and controls > _MAX_CONTROL_RATIO * offset:
        raise TwinlmError(f"corpus {cf.path} looks binary, not text: {controls} of its {offset} bytes are "
                          "control characters")


def _jsonl_pieces(cf: CorpusFile, errors: str, progress: Progress | None) -> Iterator[str]:
    """Each row's `text`, as its own document (the joiner puts newlines between them)."""
    offset, disk = 0, 0
    try:
        with _open(cf) as f:
            for lineno, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
                if progress and lineno % 1024 == 0:
                    now = _disk_pos(f, cf)
                    progress(now - disk)
                    disk = now
                if not line.strip():
                    continue
                where = f", line {lineno}"
                try:
                    row = json.loads(line.decode("utf-8", _DECODER_ERRORS[errors]))
                except UnicodeDecodeError as e:
                    raise _decode_error(cf, e, start + e.start, where) from None
                except ValueError as e:
                    raise TwinlmError(f"corpus {cf.path}{where} is not valid JSON: {e}") from None
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str):
                    if isinstance(row, dict) and any(k in row for k in _CHAT_KEYS):
                        raise TwinlmError(f"corpus {cf.path}{where} is a chat/instruction row ("
                                          f"{', '.join(k for k in _CHAT_KEYS if k in row)}); a plain corpus "
                                          "needs a 'text' string in every row")
                    raise TwinlmError(f"corpus {cf.path}{where} has no 'text' string (a .jsonl corpus needs "
                                      'one per row: {"text": "..."})')
                yield text
            if progress:
                progress(_disk_pos(f, cf) - disk)
    except (OSError, EOFError, zlib.error) as e:
        raise TwinlmError(f"cannot read corpus {cf.path}: {getattr(e, 'strerror', None) or e}") from None


@dataclass
class Stats:
    """What a pass over the corpus saw; at a file's start, all the joiner needs to go on from there."""

    files: int = 0
    documents: int = 0
    chars: int = 0
    need_newline: bool = False  # the text so far does not end in a newline: the next document needs one


def stream_text(files: list[CorpusFile], errors: str = "strict", chunk_bytes: int = CHUNK_BYTES,
                progress: Progress | None = None, stats: Stats | None = None,
                file_starts: list[Stats] | None = None) -> Iterator[str]:
    """The corpus text as pieces (each at most about `chunk_bytes` characters; jsonl rows may be smaller).

    Pieces end anywhere (not at a character a tokenizer could split differently: `text_chunks` handles
    that); their concatenation is exactly the joined corpus. `file_starts` gets a copy of `stats` as each
    file starts: streaming `files[s.files:]` from such a copy `s` gives the joined text from `s.chars` on
    (how an interrupted preparation resumes).
    """
    if errors not in ENCODING_ERRORS:
        raise TwinlmError(f"encoding errors mode must be one of {', '.join(ENCODING_ERRORS)}, got {errors!r}")
    stats = stats if stats is not None else Stats()
    for cf in files:
        if file_starts is not None:
            file_starts.append(dataclasses.replace(stats))
        stats.files += 1
        docs = (_jsonl_pieces(cf, errors, progress) if cf.jsonl
                else _one_document(_text_pieces(cf, errors, chunk_bytes, progress)))
        for doc in docs:
            started = False
            for piece in ([doc] if isinstance(doc, str) else doc):
                if not piece:
                    continue
                if not started:
                    started = True
                    stats.documents += 1
                    if stats.need_newline:
                        stats.chars += 1
                        yield "\n"
                stats.chars += len(piece)
                stats.need_newline = not piece.endswith("\n")
                yield piece


def skip_chars(pieces: Iterator[str], n: int) -> Iterator[str]:
    """`pieces` without their first `n` characters."""
    for piece in pieces:
        if n >= len(piece):
            n -= len(piece)
            continue
        yield piece[n:] if n else piece
        n = 0


def _one_document(pieces: Iterator[str]) -> Iterator[Iterator[str]]:
    yield pieces


def text_chunks(pieces: Iterator[str], size: int, cut: Callable[[str], int] | None = None) -> Iterator[str]:
    """Regroup pieces into chunks of at least `size` characters (the last may be shorter). With `cut`
    (text -> index of the last safe boundary, 0 if none), each chunk ends at such a boundary and the rest
    carries over, so a tokenizer that must not see a word split (BPE) encodes chunks as the whole text."""
    buf: list[str] = []
    n, retry_at = 0, size
    for piece in pieces:
        buf.append(piece)
        n += len(piece)
        if n < retry_at:
            continue
        text = "".join(buf)
        at = cut(text) if cut is not None else len(text)
        if at <= 0:  # no safe boundary yet (one very long word): read on, retrying at twice the length
            buf, retry_at = [text], 2 * n
            continue
        rest = text[at:]
        yield text[:at]
        buf, n, retry_at = ([rest] if rest else []), len(rest), size
    if buf:
        text = "".join(buf)
        if text:
            yield text
