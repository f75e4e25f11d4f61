"""Tokenizers: exact round trips, vocabulary rules, and rebuilding from their saved description."""

import json

import numpy as np
import pytest

from twinlm.core import tokenizers
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import load_tokenizer, save_tokenizer, tokenizer_from_dict, train_tokenizer

MIXED = "Héllo, wörld — ÆØÅ 日本語 🙂\nsecond line\ttab\r\n"
WORDS = ("the quick brown fox jumps over the lazy dog while seven wizards quietly hex "
         "jovial bumpkins and thirty zebras graze near the riverbank at dawn ")


def english_corpus(n_lines: int = 400) -> str:
    rng = np.random.default_rng(0)
    words = WORDS.split()
    return "".join(" ".join(rng.choice(words, size=9)) + ".\n" for _ in range(n_lines))


@pytest.fixture(scope="module")
def bpe() -> tokenizers.Tokenizer:
    return train_tokenizer("bpe", english_corpus(), vocab_size=300)


def test_char_round_trip_and_vocabulary_order():
    tok = train_tokenizer("char", MIXED)
    ids = tok.encode(MIXED)
    assert ids.dtype == np.int32 and ids.shape == (len(MIXED),)
    assert tok.vocab_size == len(set(MIXED))
    assert tok.decode(ids) == MIXED
    # ids follow code-point order: "\t" is the smallest character, "🙂" the largest
    assert tok.encode("\t").tolist() == [0]
    assert tok.encode("🙂").tolist() == [tok.vocab_size - 1]


def test_char_unknown_character_is_named():
    tok = train_tokenizer("char", "abc")
    with pytest.raises(TwinlmError, match=r"'z' \(U\+007A, at position 2\)"):
        tok.encode("abz")


def test_byte_round_trip_and_broken_utf8_decodes_with_replacement():
    tok = train_tokenizer("byte", "anything")
    assert tok.vocab_size == 256
    assert tok.encode("é").tolist() == [0xC3, 0xA9]
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert tok.decode([0x61, 0xC3]) == "a\ufffd"


def test_bpe_honours_vocab_size_and_round_trips_unseen_text(bpe):
    assert bpe.vocab_size == 300
    text = english_corpus(20)
    ids = bpe.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 300
    assert len(ids) < 0.6 * len(text)  # merges learned: fewer tokens than bytes
    assert bpe.decode(ids) == text
    assert bpe.decode(bpe.encode(MIXED)) == MIXED  # byte-level: characters never seen still round-trip


def test_bpe_chunked_encoding_equals_whole_text_encoding(bpe):
    text = english_corpus(50) + "\n\n  indented\n \nx" + MIXED
    chunks = tokenizers.bpe_chunks(text, 40)
    assert len(chunks) > 10 and "".join(chunks) == text
    whole = bpe._tok.encode(text).ids
    pieces = [i for c in chunks for i in bpe._tok.encode(c).ids]
    assert pieces == whole
    assert bpe.encode(text).tolist() == whole


def test_bpe_vocab_size_must_cover_the_bytes():
    with pytest.raises(TwinlmError, match="vocab_size must be an integer in \\[256"):
        train_tokenizer("bpe", "abc", vocab_size=100)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_dict_and_file_round_trip(kind, bpe, tmp_path):
    tok = bpe if kind == "bpe" else train_tokenizer(kind, english_corpus(5) + MIXED)
    d = json.loads(json.dumps(tok.to_dict()))
    assert d["kind"] == kind
    text = english_corpus(3) + MIXED
    again = tokenizer_from_dict(d)
    assert again.vocab_size == tok.vocab_size
    assert np.array_equal(again.encode(text), tok.encode(text))
    save_tokenizer(tok, tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert loaded.to_dict() == tok.to_dict()
    assert loaded.decode(loaded.encode(text)) == text


def test_bad_requests_are_user_errors(tmp_path):
    with pytest.raises(TwinlmError, match="unknown tokenizer 'word'"):
        train_tokenizer("word", "abc")
    with pytest.raises(TwinlmError, match="unknown tokenizer kind 'word'"):
        tokenizer_from_dict({"kind": "word"})
    with pytest.raises(TwinlmError, match="vocab_size applies only to the bpe"):
        train_tokenizer("char", "abc", vocab_size=300)
    with pytest.raises(TwinlmError, match="outside the char tokenizer's vocabulary"):
        train_tokenizer("char", "abc").decode([0, 3])
    with pytest.raises(TwinlmError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
