"""Tokenizers: text <-> int32 ids, each fully described by a JSON dict so a checkpoint can rebuild it.

- "char": one id per distinct character of the training corpus (sorted by code point); nanoGPT's
  shakespeare_char. A character outside that set is an error, never a silent substitute.
- "byte": the 256 UTF-8 byte values; knows every text. Decoding replaces broken byte sequences with U+FFFD.
- "bpe": byte-level BPE (GPT-2 style, no prefix space, no special tokens) trained on the corpus with the
  Hugging Face `tokenizers` library. Its vocabulary starts from the 256 byte symbols, so `vocab_size >= 256`.
- "hf": a pretrained model's own `tokenizer.json` (BPE, WordPiece or Unigram), imported with the model.

Encoder runs need [PAD], [MASK] and [CLS]: `SpecialTokens` adds them after a tokenizer's own ids; an "hf"
tokenizer names the ones its file already has. Both answer `specials`, `id_of(name)` and `n_plain` (ids
below it are ordinary text tokens a masked-LM may draw at random).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core.atomic import atomic_write_json
from twinlm.core.errors import TwinlmError


def pack_json(text: str) -> bytes:
    """A tokenizer.json's text as held in memory by a loaded run (`HFTokenizer`, `RunMeta.tokenizer`):
    zlib-compressed UTF-8. As a str a byte-level vocabulary's JSON costs 2 bytes a character (its "Ġ"s
    are outside Latin-1): 14 MB for a Qwen2.5-sized one, beside the weights for the life of the process."""
    return zlib.compress(text.encode("utf-8"), 1)


def unpack_json(spec: str | bytes) -> str:
    """The text of a tokenizer.json given as text or as `pack_json` bytes."""
    return zlib.decompress(spec).decode("utf-8") if isinstance(spec, bytes) else spec


def pack_record(d: dict[str, Any]) -> dict[str, Any]:
    """A `Tokenizer.to_dict()` record with its tokenizer.json text (if any) packed (`pack_json`)."""
    return {**d, "hf_json": pack_json(d["hf_json"])} if isinstance(d.get("hf_json"), str) else d


def unpack_record(d: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of a record `pack_record` made (what a checkpoint's meta.json stores)."""
    return {**d, "hf_json": unpack_json(d["hf_json"])} if isinstance(d.get("hf_json"), bytes) else d


KINDS = ("char", "byte", "bpe")  # what `train --tokenizer` builds; "hf" comes with an imported model
DEFAULT_BPE_VOCAB = 512
MAX_BPE_VOCAB = 1 << 20
# Chunk boundary for BPE: just before a space or newline that follows a non-space character. GPT-2's
# pre-tokenizer always splits there and its pieces after that point do not depend on what came before, so
# encoding chunks separately gives exactly the ids of the whole text. (A cut after a newline is not safe:
# "a\n\nb" pre-tokenizes as "a", "\n", "\n", "b" but "a\n\n" alone ends in one "\n\n" piece.)
# Python's \S excludes every character the library's regex counts as whitespace, so the cut is safe there.
_BPE_CHUNK_CUT = re.compile(r"(?<=\S)(?=[ \n])")
_BPE_CHUNK_CHARS = 1 << 14  # small enough to spread a streamed chunk over the library's threads
# The cuts BPETokenizer.encode makes: the spaces among _BPE_CHUNK_CUT's cuts (a space after a non-space).
_BPE_SPACE_CUT = re.compile(r"(?<=\S) ")
_SPACE_AFTER_SPACE = re.compile(r"\s ")
# Distinct words BPETokenizer.encode remembers (about 100 bytes each with their ids), and their characters,
# before it starts over.
_BPE_CACHE_WORDS = 1 << 18
_BPE_CACHE_CHARS = 1 << 23


class Tokenizer:
    """Base class: `encode(text) -> int32 ids`, `decode(ids) -> text`, `to_dict()` for checkpoints."""

    kind: str
    vocab_size: int
    specials: tuple[str, ...] = ()

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def prompt_ids(self, text: str) -> np.ndarray:
        """The ids a generation prompt starts from (an "hf" tokenizer may put its BOS token first)."""
        return self.encode(text)

    def id_of(self, special: str) -> int:
        raise TwinlmError(f"the {self.kind} tokenizer has no special token {special}")

    @property
    def n_plain(self) -> int:
        return self.vocab_size

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    def _check_ids(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Ids as a flat int64 array; an id outside the vocabulary is an error, not a silent blank."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids)).reshape(-1)
        if arr.size == 0:
            return arr.astype(np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TwinlmError(f"token ids must be integers, got {arr.dtype}")
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise TwinlmError(f"token id {arr[bad][0]} is outside the {self.kind} tokenizer's vocabulary "
                              f"(0..{self.vocab_size - 1})")
        return arr.astype(np.int64)


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: str) -> None:
        if not chars:
            raise TwinlmError("a char tokenizer needs at least one character")
        if list(chars) != sorted(set(chars)):
            raise TwinlmError("char tokenizer vocabulary must be distinct characters in code-point order")
        self.chars = chars
        self.vocab_size = len(chars)
        codes = np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        # id of each code point up to the largest one (-1: not in the vocabulary), at least the 256 a
        # uint8 code can index: encoding is then one gather
        self._lut = np.full(max(256, int(codes[-1]) + 1), -1, dtype=np.int32)
        self._lut[codes] = np.arange(codes.size, dtype=np.int32)

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> np.ndarray:
        if text.isascii():  # one byte per character: no 4-byte code array
            ids = self._lut[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
            unknown = ids < 0
        else:
            codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            ids = self._lut[np.minimum(codes, self._lut.size - 1)]
            unknown = (ids < 0) | (codes >= self._lut.size)
        if unknown.any():
            pos = int(np.argmax(unknown))
            ch = text[pos]
            raise TwinlmError(f"character {ch!r} (U+{ord(ch):04X}, at position {pos}) is not in the char "
                              f"tokenizer's vocabulary of {self.vocab_size} characters")
        return ids

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return "".join(self.chars[i] for i in self._check_ids(ids).tolist())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer(Tokenizer):
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._check_ids(ids).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        self._tok = hf_tokenizer
        self.vocab_size = int(hf_tokenizer.get_vocab_size())
        self._forget()

    def _forget(self) -> None:
        """Empty the word cache: word -> row; the ids of " " + word are _flat[_starts[row]:][:_lens[row]]."""
        self._rows: dict[str, int] = {}
        self._chars = 0
        self._flat = np.zeros(0, np.int32)
        self._starts = np.zeros(0, np.int64)
        self._lens = np.zeros(0, np.int64)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        return cls.train_iter(iter(bpe_chunks(text)), vocab_size)

    @classmethod
    def train_iter(cls, chunks: Iterator[str], vocab_size: int) -> BPETokenizer:
        """Train on a stream of text chunks cut at safe boundaries (`bpe_last_cut`): the library counts
        pre-tokens as they come, so memory follows the distinct words, not the text."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(chunks, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, spec: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_str(spec))
        except Exception as e:  # the library raises plain Exception on malformed JSON
            raise TwinlmError(f"cannot rebuild the bpe tokenizer from its saved JSON: {e}") from None

    def encode(self, text: str) -> np.ndarray:
        """The whole text's ids, word by word. The text is cut before every space that follows a
        non-space (safe cuts, see _BPE_CHUNK_CUT), each distinct word (with the space before it) is encoded
        once by the library's batch encoder (multithreaded) and remembered, and the ids are gathered with
        numpy. Profiled on 10 MB of generated text: the library's encoder alone runs ~3.5 MB/s per thread;
        str.split, a dict lookup per word and numpy's gather run ~20 MB/s (natural text repeats its words)."""
        if not text:
            return np.zeros(0, dtype=np.int32)
        # str.split(" ") is ~2x faster than the regex and gives the same pieces when no space follows a
        # whitespace character (every space is then a safe cut)
        cut = text.split(" ") if _SPACE_AFTER_SPACE.search(text) is None else _BPE_SPACE_CUT.split(text)
        head, words = cut[0], cut[1:]  # each word stands for " " + word
        parts = []
        if head:
            encodings = self._tok.encode_batch_fast(bpe_chunks(head))
            parts += [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        if words:
            parts.append(self._encode_words(words))
        ids = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if len(self._rows) > _BPE_CACHE_WORDS or self._chars > _BPE_CACHE_CHARS:  # bounded memory
            self._forget()
        return ids

    def _encode_words(self, words: list[str]) -> np.ndarray:
        rows, get = self._rows, self._rows.get
        idx = np.array([get(w, -1) for w in words], dtype=np.int64)
        missing = np.flatnonzero(idx < 0)
        if missing.size:
            new = list(dict.fromkeys(words[i] for i in missing.tolist()))
            encodings = self._tok.encode_batch_fast([" " + w for w in new])
            lens = np.fromiter((len(e.ids) for e in encodings), np.int64, len(new))
            flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32,
                               int(lens.sum()))
            rows.update(zip(new, range(len(rows), len(rows) + len(new)), strict=True))
            self._chars += sum(map(len, new))
            self._starts = np.concatenate([self._starts, self._flat.size + np.cumsum(lens) - lens])
            self._lens = np.concatenate([self._lens, lens])
            self._flat = np.concatenate([self._flat, flat])
            idx[missing] = [rows[words[i]] for i in missing.tolist()]
        lens = self._lens[idx]
        ends = np.cumsum(lens)
        # output position p, inside word k, takes _flat[_starts[k] + p - (ends[k] - lens[k])]
        gather = np.repeat(self._starts[idx] - (ends - lens), lens) + np.arange(int(ends[-1]))
        return self._flat[gather]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._tok.decode(self._check_ids(ids).tolist(), skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "hf_json": self._tok.to_str()}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, as it came with an imported model. Text encodes without the
    special tokens the file's post-processor would add (a corpus is one stream); `prompt_ids` puts the
    model's BOS token first where its tokenizer_config asks for it (Llama). `roles` names the special
    tokens twinlm's tasks use ([PAD], [MASK], [CLS], bos, eos) by their id in this vocabulary."""

    kind = "hf"

    def __init__(self, hf_json: str | bytes, roles: dict[str, int] | None = None,
                 add_bos: bool = False) -> None:
        """`hf_json`: the file's text, or it packed (`pack_json`: kept as given, so a run's record and its
        tokenizer share one copy)."""
        from tokenizers import Tokenizer as Lib

        try:  # (packed: built from the UTF-8 bytes, never decoded to a str)
            self._tok = Lib.from_buffer(zlib.decompress(hf_json)) if isinstance(hf_json, bytes) \
                else Lib.from_str(hf_json)
        except Exception as e:  # the library raises plain Exception on a malformed file
            raise TwinlmError(f"cannot read the tokenizer.json: {_one_line(e)}") from None
        self._packed = hf_json if isinstance(hf_json, bytes) else pack_json(hf_json)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.roles = {k: int(v) for k, v in (roles or {}).items()}
        bad = {k: v for k, v in self.roles.items() if not 0 <= v < self.vocab_size}
        if bad:
            raise TwinlmError(f"special tokens outside the tokenizer's vocabulary: {bad}")
        self.specials = tuple(self.roles)
        self.add_bos = bool(add_bos) and "bos" in self.roles

    @property
    def hf_json(self) -> str:
        """The tokenizer.json's text as it was given (export-hf writes it back unchanged)."""
        return unpack_json(self._packed)

    def id_of(self, special: str) -> int:
        if special not in self.roles:
            return super().id_of(special)
        return self.roles[special]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def prompt_ids(self, text: str) -> np.ndarray:
        ids = self.encode(text)
        return np.concatenate([[self.roles["bos"]], ids]).astype(np.int32) if self.add_bos else ids

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._tok.decode(self._check_ids(ids).tolist(), skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "hf_json": self.hf_json, "roles": self.roles, "add_bos": self.add_bos}

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def bpe_chunks(text: str, size: int = _BPE_CHUNK_CHARS) -> list[str]:
    """Split text at safe boundaries (see _BPE_CHUNK_CUT) into pieces of about `size` characters."""
    chunks: list[str] = []
    start = 0
    while start < len(text):
        cut = _BPE_CHUNK_CUT.search(text, start + size)
        end = cut.start() if cut else len(text)
        chunks.append(text[start:end])
        start = end
    return chunks


def bpe_last_cut(text: str) -> int:
    """Index of the last safe BPE chunk boundary in `text` (see _BPE_CHUNK_CUT), 0 if there is none: the
    last space or newline after a non-space (str.isspace is the regex's \\s), found by rfind from the end."""
    end = len(text)
    while end > 1:
        at = max(text.rfind(" ", 1, end), text.rfind("\n", 1, end))
        if at <= 0:
            return 0
        if not text[at - 1].isspace():
            return at
        end = at
    return 0


class SpecialTokens(Tokenizer):
    """A tokenizer plus special tokens ("[CLS]", "[MASK]", "[PAD]", ...) with ids after its own. Their
    literal text in a string encodes to their id, so a user can write "ab[MASK]d" to `predict`."""

    def __init__(self, base: Tokenizer, specials: Iterable[str]) -> None:
        self.base, self.specials = base, tuple(specials)
        if not self.specials or len(set(self.specials)) != len(self.specials) or not all(self.specials):
            raise TwinlmError("special tokens must be distinct, non-empty strings")
        self.kind = base.kind
        self.vocab_size = base.vocab_size + len(self.specials)
        self._split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")

    def id_of(self, special: str) -> int:
        if special not in self.specials:
            return super().id_of(special)
        return self.base.vocab_size + self.specials.index(special)

    @property
    def n_plain(self) -> int:
        return self.base.vocab_size

    def encode(self, text: str) -> np.ndarray:
        parts = [np.array([self.id_of(part)], np.int32) if part in self.specials else self.base.encode(part)
                 for part in self._split.split(text) if part]
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        arr, n, out, run = self._check_ids(ids), self.base.vocab_size, [], []
        for i in arr.tolist():
            if i < n:
                run.append(i)
                continue
            out.append(self.base.decode(run) if run else "")
            out.append(self.specials[i - n])
            run = []
        return "".join(out) + (self.base.decode(run) if run else "")

    def to_dict(self) -> dict[str, Any]:
        return {**self.base.to_dict(), "specials": list(self.specials)}


def tokenizer_spec(kind: str, vocab_size: int | None = None) -> dict[str, Any]:
    """The validated request {"kind", "vocab_size"} for `train_tokenizer` (vocab_size resolved for bpe)."""
    if kind not in KINDS:
        raise TwinlmError(f"unknown tokenizer {kind!r}; choose from {', '.join(KINDS)}")
    if kind != "bpe":
        if vocab_size is not None:
            raise TwinlmError(f"vocab_size applies only to the bpe tokenizer; the {kind} tokenizer's "
                              "vocabulary is fixed by its kind and the corpus")
        return {"kind": kind, "vocab_size": None}
    vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
    is_int = isinstance(vocab_size, int) and not isinstance(vocab_size, bool)
    if not is_int or not 256 <= vocab_size <= MAX_BPE_VOCAB:
        raise TwinlmError(f"bpe vocab_size must be an integer in [256, {MAX_BPE_VOCAB}] (it starts from the "
                          f"256 byte symbols), got {vocab_size!r}")
    return {"kind": kind, "vocab_size": vocab_size}


def train_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer of `kind` from the corpus `text`; `vocab_size` applies to "bpe" only (default 512).

    A bpe vocabulary can come out smaller than asked when the corpus has too few distinct merges.
    """
    spec = tokenizer_spec(kind, vocab_size)
    if not text:
        raise TwinlmError("cannot build a tokenizer from empty text")
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "byte":
        return ByteTokenizer()
    return BPETokenizer.train(text, spec["vocab_size"])


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_dict()` (e.g. from a checkpoint's meta)."""
    if isinstance(d, dict) and "specials" in d:
        specials = d["specials"]
        if not isinstance(specials, list) or not all(isinstance(t, str) for t in specials):
            raise TwinlmError("tokenizer description's 'specials' must be a list of strings")
        return SpecialTokens(tokenizer_from_dict({k: v for k, v in d.items() if k != "specials"}), specials)
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, str):
            raise TwinlmError("char tokenizer description has no 'chars' string")
        return CharTokenizer(chars)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        roles, spec = d.get("roles", {}), d.get("hf_json")
        if not isinstance(spec, (str, bytes)) or not isinstance(roles, dict) \
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in roles.values()):
            raise TwinlmError("hf tokenizer description needs an 'hf_json' string and integer 'roles'")
        return HFTokenizer(spec, roles, bool(d.get("add_bos", False)))
    if kind == "bpe":
        spec = d.get("hf_json")
        if not isinstance(spec, (str, bytes)):
            raise TwinlmError("bpe tokenizer description has no 'hf_json' string")
        return BPETokenizer.from_json(unpack_json(spec))
    raise TwinlmError(f"unknown tokenizer kind {kind!r} (known: {', '.join(KINDS)}, hf)")


DIGEST_KEY = "sha256"  # of the rest of the file's JSON object, so a damaged file is an error, not a tokenizer


def _dict_digest(d: dict[str, Any]) -> str:
    canonical = json.dumps(d, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    d = tok.to_dict()
    atomic_write_json(Path(path), {**d, DIGEST_KEY: _dict_digest(d)})


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer `save_tokenizer` wrote to `path`, exactly, or a TwinlmError (never a near miss)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TwinlmError(f"tokenizer file not found: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: bad UTF-8 or JSON
        raise TwinlmError(f"cannot read tokenizer file {path}: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get(DIGEST_KEY), str):
        raise TwinlmError(f"tokenizer file {path} is damaged: no {DIGEST_KEY} of its contents")
    want = d.pop(DIGEST_KEY)
    if _dict_digest(d) != want:
        raise TwinlmError(f"tokenizer file {path} is damaged: its contents do not match their SHA-256")
    return tokenizer_from_dict(d)
