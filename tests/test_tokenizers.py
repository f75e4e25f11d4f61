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


# Every kind of whitespace either regex may count (tab, CR, NBSP, U+2028, ideographic space, U+0085, the
# information separators Python calls whitespace), letters, digits, punctuation, contractions, emoji.
NASTY = [" ", " ", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u2028", "\u3000", "\x85", "\x1c",
         "\x0b", "a", "the", "The", "naïve", "日本", "42", "7", "'s", "'t", "'ll", "!", ".", ",", "--", "🙂",
         "é", "x"]


def nasty_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(NASTY, int(rng.integers(1, 60)))) for _ in range(n)]


def test_bpe_word_cache_encodes_as_the_library_on_the_whole_text():
    """BPETokenizer.encode cuts the text at spaces and remembers words: on random texts of every kind of
    whitespace (both its str.split and its regex path), cold and warm, it gives the library's own ids."""
    texts = nasty_texts(400)
    tok = train_tokenizer("bpe", "".join(texts) * 3, vocab_size=320)
    assert len(tok._tok.get_vocab()) == 320  # merges learned, across whitespace too
    paths = {tokenizers._SPACE_AFTER_SPACE.search(t) is None for t in texts}
    assert paths == {True, False}
    for warm in (False, True):
        for text in texts:
            assert tok.encode(text).tolist() == tok._tok.encode(text).ids, (warm, text)
    joined = "".join(texts)
    assert tok.encode(joined).tolist() == tok._tok.encode(joined).ids
    # the cache forgets when it is full and still encodes exactly
    old = tokenizers._BPE_CACHE_WORDS
    tokenizers._BPE_CACHE_WORDS = 3
    try:
        for text in texts[:50]:
            assert tok.encode(text).tolist() == tok._tok.encode(text).ids
        assert len(tok._rows) <= 3 + max(len(t.split(" ")) for t in texts[:50])
    finally:
        tokenizers._BPE_CACHE_WORDS = old


def test_bpe_last_cut_is_the_last_match_of_the_cut_rule():
    """The rfind scan finds the cut the regex rule's last match gives, on every prefix of nasty texts."""
    def by_regex(text: str) -> int:
        return max((m.start() for m in tokenizers._BPE_CHUNK_CUT.finditer(text, 1)), default=0)

    checked = 0
    for text in nasty_texts(300, seed=1):
        for k in range(len(text) + 1):
            assert tokenizers.bpe_last_cut(text[:k]) == by_regex(text[:k]), repr(text[:k])
            checked += by_regex(text[:k]) > 0
    assert checked > 1000


def test_cutting_at_every_space_would_change_bpe_ids():
    """Negative control of the comparison above: cutting before a space that follows whitespace (str.split
    without the check) changes ids on these texts."""
    texts = nasty_texts(400)
    tok = train_tokenizer("bpe", "".join(texts) * 3, vocab_size=320)
    differ = 0
    for text in texts:
        head, *words = text.split(" ")
        pieces = ([head] if head else []) + [" " + w for w in words]
        ids = [i for p in pieces for i in tok._tok.encode(p).ids]
        differ += ids != tok._tok.encode(text).ids
    assert differ > 10


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
