"""Corpus reading and its errors, the token cache, the train/val split, and seeded batches."""

import json

import numpy as np
import pytest

from twinlm.core import data, task
from twinlm.core.data import Batcher, check_fits, prepare, read_corpus
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import CharTokenizer, train_tokenizer

TEXT = "".join(f"line {i}: the quick brown fox — naïve café {i * i}\n" for i in range(300))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# --- reading -------------------------------------------------------------------------------------


def test_read_file_folder_and_builtin(tmp_path, corpus):
    assert read_corpus(corpus) == (TEXT, str(corpus))
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "b.txt").write_text("second\n", encoding="utf-8")
    (folder / "a.txt").write_text("first", encoding="utf-8")  # no final newline: one is added
    (folder / "c.md").write_text("markdown", encoding="utf-8")
    (folder / "d.csv").write_text("not a corpus file", encoding="utf-8")
    text, source = read_corpus(folder)
    assert text == "first\nsecond\nmarkdown"
    assert "3 files" in source
    builtin, name = read_corpus(None)
    assert builtin == task.builtin_corpus() and name == f"builtin:{task.NAME}"


def test_utf8_bom_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfabc")
    assert read_corpus(tmp_path / "bom.txt")[0] == "abc"


@pytest.mark.parametrize("content, message", [
    (None, "corpus not found"),
    (b"", "is empty"),
    (b"ok text \xff\xfe more", r"not valid UTF-8 \(byte 0xff at offset 8\).*errors='replace'"),
    (b"ab" + b"\0" * 4096, "looks binary, not text: a NUL byte at offset 2"),
    ("text in UTF-16".encode("utf-16"), "looks binary.*UTF-16"),
    (bytes(range(1, 9)) * 64 + b"some text", "looks binary, not text: 512 of its 521 bytes are control"),
])
def test_bad_corpus_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TwinlmError, match=message):
        read_corpus(path)


def test_invalid_utf8_replace_is_the_escape_hatch(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    assert read_corpus(path, errors="replace")[0] == "caf\ufffd au lait"
    with pytest.raises(TwinlmError, match="encoding errors mode"):
        read_corpus(path, errors="ignore")


def test_bad_corpus_folders(tmp_path):
    (tmp_path / "notes.csv").write_text("hello", encoding="utf-8")
    with pytest.raises(TwinlmError, match=r"has no .txt, .md or .jsonl files \(nor .gz of them\)"):
        read_corpus(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(TwinlmError, match=r"\(1 files\) has no text \(its files are empty\)"):
        read_corpus(tmp_path)


# --- prepare and the token cache -----------------------------------------------------------------


def test_prepare_splits_by_position(tmp_path, corpus):
    ds = prepare(corpus, "char", cache_dir=tmp_path / "cache")
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint16
    assert len(ds.train) == int(len(TEXT) * 0.9) and len(ds.train) + len(ds.val) == len(TEXT)
    assert ds.tokenizer.decode(ds.train) + ds.tokenizer.decode(ds.val) == TEXT
    assert ds.source == str(corpus) and not ds.from_cache
    with pytest.raises(TwinlmError, match="val_fraction"):
        prepare(corpus, cache_dir=tmp_path / "cache", val_fraction=1.0)


def test_cache_is_reused_without_encoding_and_invalidated_by_edits(tmp_path, corpus, monkeypatch):
    cache = tmp_path / "cache"
    first = prepare(corpus, "char", cache_dir=cache)
    mtime = first.cache_file.stat().st_mtime_ns

    def no_encoding(self, text):
        raise AssertionError("encoded again despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(CharTokenizer, "encode", no_encoding)
        second = prepare(corpus, "char", cache_dir=cache)
    assert second.from_cache and second.cache_file == first.cache_file
    assert second.cache_file.stat().st_mtime_ns == mtime
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert second.tokenizer.to_dict() == first.tokenizer.to_dict()

    corpus.write_text(TEXT + "an edit with new letters: XYZ\n", encoding="utf-8")
    edited = prepare(corpus, "char", cache_dir=cache)
    assert not edited.from_cache and edited.cache_file != first.cache_file
    assert edited.tokenizer.decode(np.concatenate([edited.train, edited.val])).endswith("XYZ\n")
    assert prepare(corpus, "byte", cache_dir=cache).cache_file not in (first.cache_file, edited.cache_file)


def test_damaged_cache_entry_is_rebuilt(tmp_path, corpus):
    cache = tmp_path / "cache"
    first = prepare(corpus, "char", cache_dir=cache)
    first.cache_file.write_bytes(first.cache_file.read_bytes()[:100])  # truncated token file
    again = prepare(corpus, "char", cache_dir=cache)
    assert not again.from_cache
    assert again.tokenizer.decode(np.concatenate([again.train, again.val])) == TEXT


def test_bpe_cache_reuses_the_trained_tokenizer(tmp_path, corpus):
    first = prepare(corpus, "bpe", vocab_size=300, cache_dir=tmp_path)
    second = prepare(corpus, "bpe", vocab_size=300, cache_dir=tmp_path)
    assert second.from_cache and second.tokenizer.to_dict() == first.tokenizer.to_dict()
    assert first.tokenizer.vocab_size <= 300
    assert second.tokenizer.decode(np.concatenate([second.train, second.val])) == TEXT
    meta = json.loads(first.cache_file.with_suffix(".json").read_text(encoding="utf-8"))
    assert meta["n_tokens"] == len(first.train) + len(first.val) and meta["dtype"] == "uint16"


def test_given_tokenizer_is_used_and_unknown_characters_are_refused(tmp_path, corpus):
    tok = train_tokenizer("char", TEXT + "QZ")
    ds = prepare(corpus, tok=tok, cache_dir=tmp_path)
    assert ds.tokenizer is tok and tok.decode(ds.train[:6]) == TEXT[:6]
    narrow = train_tokenizer("char", TEXT.replace("é", "e"))
    with pytest.raises(TwinlmError, match=r"does not fit the given tokenizer.*'é'"):
        prepare(corpus, tok=narrow, cache_dir=tmp_path)


def test_token_dtype_widens_past_uint16():
    assert data.token_dtype(1 << 16) == np.uint16
    assert data.token_dtype((1 << 16) + 1) == np.uint32


def test_check_fits(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("abcdefghij" * 10, encoding="utf-8")  # 100 chars: 90 train, 10 val
    ds = prepare(path, cache_dir=tmp_path)
    check_fits(ds, block_size=8, batch_size=2)  # val has 10 - 8 = 2 windows
    with pytest.raises(TwinlmError, match="validation split .* has 10 tokens, fewer than block_size"):
        check_fits(ds, block_size=16, batch_size=1)
    with pytest.raises(TwinlmError, match="batch_size 3 is larger than the 2 distinct windows"):
        check_fits(ds, block_size=8, batch_size=3)
    with pytest.raises(TwinlmError, match="block_size must be a positive integer"):
        check_fits(ds, block_size=0, batch_size=1)


# --- batches -------------------------------------------------------------------------------------


def draw(batcher, n):
    return [batcher.next() for _ in range(n)]


def test_batches_are_shifted_windows_covering_every_offset():
    tokens = np.arange(40, dtype=np.uint16)  # row r of x is then start_r + arange(T)
    b = Batcher(tokens, batch_size=8, block_size=5, seed=3)
    starts = set()
    for x, y in draw(b, 60):
        assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == y.shape == (8, 5)
        assert np.array_equal(x, x[:, :1] + np.arange(5))
        assert np.array_equal(y, x + 1)
        starts.update(x[:, 0].tolist())
    assert starts == set(range(40 - 5))  # every window, and none running past the end
    assert b.count == 60


def test_same_seed_same_batches_and_state_resumes_the_sequence():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = Batcher(tokens, 4, 8, seed=7), Batcher(tokens, 4, 8, seed=7)
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(draw(a, 5), draw(b, 5), strict=True))
    other = Batcher(tokens, 4, 8, seed=8).next()[0]
    assert not np.array_equal(other, a.next()[0])

    saved = json.loads(json.dumps(a.state()))  # goes through a checkpoint's JSON meta
    expected = draw(a, 5)
    resumed = Batcher(tokens, 4, 8, seed=999)
    resumed.set_state(saved)
    assert resumed.count == 6
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(draw(resumed, 5), expected, strict=True))
    with pytest.raises(TwinlmError, match="invalid batcher state"):
        resumed.set_state({"count": 1})
