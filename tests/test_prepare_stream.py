"""Streaming preparation (core.corpus, core.token_cache): the streamed tokens equal the whole text's for
every tokenizer and chunk size, sources and formats, one-line errors, a kill at every write, bounded memory.

Run as a script (`python tests/test_prepare_stream.py serve`), this module is the fork server of the kill
test: one fresh interpreter (no tokenizer threads yet) that forks a child per fault point.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from twinlm.core import atomic, data
from twinlm.core import corpus as C
from twinlm.core import token_cache as T
from twinlm.core.data import prepare, read_corpus
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import CharTokenizer, bpe_last_cut

# Multi-byte characters of every UTF-8 length, blank lines, spaces before newlines, runs of spaces, tabs,
# digits, contractions, a long word: the places a chunk boundary can change tokens.
DOCS = [
    "Première ligne — naïve café, 日本語のテキスト 🙂🚀 and it's 42 times.\n\n"
    "Line with trailing spaces   \n\n\n  indented\tline\r\n" + "supercalifragilistic" * 30 + " end",
    "second file:\u00a0nbsp, \u2028 separator, Ω≈ç√ ∫˜µ ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n",
    "",  # an empty document is skipped
    "third  doc  with   double spaces\n\n\nand more 123 456\n",
]
CHUNKS = (1, 2, 3, 5, 7, 64, 1 << 20)


def write_corpus(folder: Path) -> str:
    """A folder of every format; returns the joined text the corpus stands for (built independently)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_bytes(b"\xef\xbb\xbf" + DOCS[0].encode())  # a byte-order mark is dropped
    (folder / "b.md.gz").write_bytes(gzip.compress(DOCS[1].encode()))
    (folder / "c.txt").write_bytes(b"")
    rows = [{"text": DOCS[3]}, {"text": "row two"}, {"text": ""}, {"text": "row 🙂 three\n"}]
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    (folder / "ignored.csv").write_text("not, a corpus", encoding="utf-8")
    (folder / ".hidden.txt").write_text("hidden", encoding="utf-8")
    docs = [DOCS[0], DOCS[1], DOCS[3], "row two", "row 🙂 three\n"]
    return "".join(d if d.endswith("\n") or i == len(docs) - 1 else d + "\n" for i, d in enumerate(docs))


def all_tokens(ds) -> np.ndarray:
    return np.concatenate([ds.train, ds.val]).astype(np.int64)


def test_joined_stream_is_the_corpus_at_every_chunk_size(tmp_path):
    whole = write_corpus(tmp_path / "c")
    files, source = C.find_files(tmp_path / "c")
    assert [f.name for f in files] == ["a.txt", "b.md.gz", "c.txt", "sub/d.jsonl"] and "(4 files)" in source
    for chunk in CHUNKS:
        assert "".join(C.stream_text(files, chunk_bytes=chunk)) == whole, chunk
    assert read_corpus(tmp_path / "c")[0] == whole


@pytest.mark.parametrize("kind", ["char", "byte"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_streamed_tokens_equal_whole_text_tokens(tmp_path, kind, chunk):
    whole = write_corpus(tmp_path / "c")
    ds = prepare(tmp_path / "c", kind, cache_dir=tmp_path / "cache", chunk_bytes=chunk)
    want = (CharTokenizer.train(whole).encode(whole) if kind == "char"
            else np.frombuffer(whole.encode("utf-8"), np.uint8))
    assert np.array_equal(all_tokens(ds), want)
    if kind == "char":
        assert ds.tokenizer.to_dict() == CharTokenizer.train(whole).to_dict()


def raw_bpe(text: str, vocab_size: int):
    """The library on the whole text as one string: no chunking of ours anywhere."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.mark.parametrize("chunk", (1, 3, 7, 64, 1 << 20))
def test_streamed_bpe_equals_the_library_on_the_whole_text(tmp_path, chunk):
    whole = write_corpus(tmp_path / "c") * 3
    for i in range(3):
        (tmp_path / "c" / f"copy{i}.txt").write_text(whole, encoding="utf-8")
    whole = read_corpus(tmp_path / "c")[0]
    ref = raw_bpe(whole, 400)
    ds = prepare(tmp_path / "c", "bpe", vocab_size=400, bpe_sample_mb=0, cache_dir=tmp_path / "cache",
                 chunk_bytes=chunk)
    assert json.loads(ds.tokenizer._tok.to_str())["model"] == json.loads(ref.to_str())["model"]
    assert np.array_equal(all_tokens(ds), ref.encode(whole).ids)


def test_bpe_encoded_by_worker_processes_equals_the_library_on_the_whole_text(tmp_path, monkeypatch):
    """A big corpus's BPE chunks go to spawned worker processes (forced here on a small one): same ids, in
    order, as the library on the whole text, and the chunks really went to the pool."""
    from concurrent.futures import ProcessPoolExecutor

    monkeypatch.setattr(T, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(T, "ENCODE_WORKERS", 2)
    whole = write_corpus(tmp_path / "c") * 3
    for i in range(3):
        (tmp_path / "c" / f"copy{i}.txt").write_text(whole, encoding="utf-8")
    whole = read_corpus(tmp_path / "c")[0]
    ref = raw_bpe(whole, 400)
    sent: list[str] = []
    submit = ProcessPoolExecutor.submit
    monkeypatch.setattr(ProcessPoolExecutor, "submit", lambda self, fn, chunk: sent.append(chunk)
                        or submit(self, fn, chunk))
    ds = prepare(tmp_path / "c", "bpe", vocab_size=400, bpe_sample_mb=0, cache_dir=tmp_path / "cache",
                 chunk_bytes=64)
    assert np.array_equal(all_tokens(ds), ref.encode(whole).ids)
    assert len(sent) > 10 and "".join(sent) == whole
    assert T._workers(ds.tokenizer, 1) == 2 and T._workers(CharTokenizer("ab"), 1) == 0


def test_a_cut_after_a_newline_would_change_bpe_ids():
    """Negative control of the cut rule: the old one (after a newline before a non-space) splits a run of
    newlines that the library splits (and "\n\n" is a learned merge: it is one piece before a space)."""
    text = "a\n\nb" * 50 + "x\n\n y" * 50
    ref = raw_bpe(text, 300)
    old = re.compile(r"\n(?=\S)")

    def old_cut(t: str) -> int:
        ends = [m.end() for m in old.finditer(t)]
        return ends[-1] if ends else 0

    bad = [i for c in C.text_chunks(iter(text), 4, old_cut) for i in ref.encode(c).ids]
    good = [i for c in C.text_chunks(iter(text), 4, bpe_last_cut) for i in ref.encode(c).ids]
    assert good == ref.encode(text).ids and bad != good


def test_bpe_learns_from_a_bounded_sample(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 70_000, encoding="utf-8")  # 1.19 MB
    (tmp_path / "b.txt").write_text("zyxwv utsrq ponml\n" * 1000, encoding="utf-8")
    files = C.find_files(tmp_path)[0]
    whole = T.learn_tokenizer("bpe", 300, C.stream_text(files), bpe_sample_mb=0)
    sample = T.learn_tokenizer("bpe", 300, C.stream_text(files), bpe_sample_mb=1)  # the first 1 MB only
    assert "Ġutsrq" in whole._tok.get_vocab() and "Ġutsrq" not in sample._tok.get_vocab()
    assert T.DEFAULT_BPE_SAMPLE_MB == 64
    with pytest.raises(TwinlmError, match="bpe-sample-mb must be an integer >= 0"):
        prepare(tmp_path, "bpe", bpe_sample_mb=-1, cache_dir=tmp_path / "cache")


def test_cache_hit_reads_no_text_and_the_key_follows_content_tokenizer_and_errors(tmp_path, monkeypatch):
    write_corpus(tmp_path / "c")
    cache = tmp_path / "cache"
    lines: list[str] = []
    first = prepare(tmp_path / "c", "char", cache_dir=cache, log=lines.append)
    assert not first.from_cache and re.match(r"prepared .*: \d[\d,]* tokens from 4 files", lines[-1])
    assert "token file" in lines[-1] and "MB/s" in lines[-1]

    def no_text(*args, **kwargs):
        raise AssertionError("decoded the corpus despite a complete cache entry")

    with monkeypatch.context() as m:
        m.setattr(C, "stream_text", no_text)
        again = prepare(tmp_path / "c", "char", cache_dir=cache, log=lines.append)
    assert again.from_cache and again.cache_file == first.cache_file
    assert lines[-1].startswith("token cache: ") and np.array_equal(all_tokens(again), all_tokens(first))
    assert prepare(tmp_path / "c", "char", cache_dir=cache, errors="replace").cache_file != first.cache_file
    assert prepare(tmp_path / "c", "byte", cache_dir=cache).cache_file != first.cache_file
    (tmp_path / "c" / "c.txt").write_text("now not empty", encoding="utf-8")
    assert prepare(tmp_path / "c", "char", cache_dir=cache).cache_file != first.cache_file


def test_sources_glob_several_values_and_gzip(tmp_path):
    for name, text in (("x1.txt", "one\n"), ("x2.txt", "two\n"), ("y.md", "why\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert read_corpus(str(tmp_path / "x*.txt"))[0] == "one\ntwo\n"
    text, source = read_corpus([tmp_path / "y.md", str(tmp_path / "x*.txt")])
    assert text == "why\none\ntwo\n" and "(3 files)" in source
    (tmp_path / "plain.gz").write_bytes(gzip.compress(b"zipped text"))
    assert read_corpus(tmp_path / "plain.gz")[0] == "zipped text"


def test_invalid_utf8_offset_is_of_the_file_across_chunks(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("é".encode() * 10 + b"ok \xff rest")  # the bad byte at offset 23
    for chunk in (1, 4, 7, 1 << 20):
        with pytest.raises(TwinlmError, match=r"bad.txt is not valid UTF-8 \(byte 0xff at offset 23\).*"
                                              "--errors replace.*--errors skip"):
            prepare(path, cache_dir=tmp_path / "cache", chunk_bytes=chunk)
    # an incomplete character at the very end is an error at its first byte too
    (tmp_path / "cut.txt").write_bytes(b"abc" + "é".encode()[:1])
    with pytest.raises(TwinlmError, match=r"byte 0xc3 at offset 3"):
        read_corpus(tmp_path / "cut.txt")
    assert read_corpus(path, "replace")[0] == "é" * 10 + "ok \ufffd rest"
    assert read_corpus(path, "skip")[0] == "é" * 10 + "ok  rest"
    ds = prepare(path, "byte", errors="skip", cache_dir=tmp_path / "cache", chunk_bytes=3)
    assert bytes(all_tokens(ds).astype(np.uint8)) == ("é" * 10 + "ok  rest").encode()


@pytest.mark.parametrize("name, content, message", [
    ("e", None, r"corpus folder .*e has no .txt, .md or .jsonl files"),
    ("*.txt", None, r"no corpus files match .*\*.txt"),
    ("r.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', r"r.jsonl, line 3 has no 'text' string"),
    ("r.jsonl", b'{"text": "a"}\n{"messages": [{"role": "user"}]}\n',
     r"r.jsonl, line 2 is a chat/instruction row \(messages\)"),
    ("r.jsonl", b'{"prompt": "q", "completion": "a"}\n',
     r"r.jsonl, line 1 is a chat/instruction row \(prompt, completion\)"),
    ("r.jsonl", b'{"text": "a"}\n{oops\n', r"r.jsonl, line 2 is not valid JSON"),
    ("r.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n',
     r"r.jsonl, line 2 is not valid UTF-8 \(byte 0xff at offset 24\)"),
    ("z.txt.gz", gzip.compress(b"text", mtime=0)[:-6], r"cannot read corpus .*z.txt.gz"),
    ("n.txt", b"text\0", r"n.txt looks binary, not text: a NUL byte at offset 4"),
])
def test_one_line_errors(tmp_path, name, content, message):
    target = tmp_path / name
    if name == "e":
        target.mkdir()
    elif content is not None:
        target.write_bytes(content)
    with pytest.raises(TwinlmError, match=message) as e:
        prepare(str(target), cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("cache/*.bin"))


def test_given_tokenizer_that_does_not_fit(tmp_path):
    (tmp_path / "a.txt").write_text("abc" * 100 + "Z", encoding="utf-8")
    with pytest.raises(TwinlmError, match=r"does not fit the given tokenizer.*'Z'"):
        prepare(tmp_path / "a.txt", tok=CharTokenizer("abc"), cache_dir=tmp_path / "cache", chunk_bytes=16)
    assert not list((tmp_path / "cache").iterdir()) or not list((tmp_path / "cache").glob("*.bin"))


# ---- a kill at every write ---------------------------------------------------------------------------

KILL_TEXT = "".join(f"line {i}: naïve café 🙂\n" for i in range(60))
KILL_JOINED = KILL_TEXT[:700] + "\n" + KILL_TEXT[700:]  # a.txt does not end in a newline: one is put between


def kill_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(KILL_TEXT[:700], encoding="utf-8")
    (folder / "b.txt").write_text(KILL_TEXT[700:], encoding="utf-8")
    return folder


def naive_prepare(data: Path, cache_dir: Path) -> None:
    """Negative control: meta first, then a preallocated token file filled in place (np.memmap w+ style)."""
    p = T.prepare_tokens(data, "char", cache_dir=cache_dir / "scratch")  # the right tokens, elsewhere
    tokens = np.fromfile(p.bin_path, dtype=p.meta["dtype"])
    key = p.bin_path.stem
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name in list(cache_dir.glob("*")):
        if name.is_file():
            name.unlink()
    naive = json.loads(json.dumps(p.meta))
    with atomic.fs.create(cache_dir / f"{key}.json") as f:
        atomic.fs.write(f, json.dumps(naive).encode())
    with atomic.fs.create(cache_dir / f"{key}.bin") as f:
        atomic.fs.write(f, bytes(tokens.nbytes))  # preallocated
        f.seek(0)
        for i in range(0, tokens.size, 64):
            atomic.fs.write(f, tokens[i:i + 64].tobytes())


def interrupt(data: Path, cache_dir: Path, at_chunk: int = 3) -> None:
    """A preparation with a checkpoint after every chunk, stopped by Ctrl-C as it encodes chunk `at_chunk`
    (with the real file operations, whatever `atomic.fs` is)."""
    calls, plain = [], CharTokenizer.encode

    def encode(self: CharTokenizer, text: str) -> np.ndarray:
        calls.append(len(text))
        if len(calls) == at_chunk:
            raise KeyboardInterrupt
        return plain(self, text)

    old = CharTokenizer.encode, T.CHECKPOINT_CHARS, atomic.fs
    CharTokenizer.encode, T.CHECKPOINT_CHARS, atomic.fs = encode, 200, atomic.FileOps()
    try:
        with pytest.raises(KeyboardInterrupt):
            T.prepare_tokens(data, "char", cache_dir=cache_dir, chunk_bytes=256)
    finally:
        CharTokenizer.encode, T.CHECKPOINT_CHARS, atomic.fs = old
    assert list(cache_dir.glob(".tmp-*.resume.json")) and not list(cache_dir.glob("*.bin"))  # kept


def run_prepare(data: Path, cache_dir: Path, saver: str) -> None:
    if saver == "naive":
        naive_prepare(data, cache_dir)
        return
    old = T.CHECKPOINT_CHARS
    if saver == "resumed":  # the preparation that goes on from an interrupted one
        interrupt(data, cache_dir)
    if saver in ("checkpoints", "resumed"):  # a resume checkpoint after about every chunk
        T.CHECKPOINT_CHARS = 200
    try:
        T.prepare_tokens(data, "char", cache_dir=cache_dir, chunk_bytes=256)
    finally:
        T.CHECKPOINT_CHARS = old


def serve(jobs: list[dict]) -> None:
    from test_fault_injection import Injector

    for job in jobs:
        pid = os.fork()
        if pid == 0:
            try:
                atomic.fs = Injector(Path(job["cache"]), at=job["at"], mode="kill")
                run_prepare(Path(job["data"]), Path(job["cache"]), job["saver"])
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"cache": job["cache"], "killed": os.WIFSIGNALED(status)}), flush=True)


def record(data: Path, cache: Path, saver: str) -> list[str]:
    from test_fault_injection import Injector

    assert not cache.exists(), "a dry run needs an empty cache (a cache hit writes nothing)"
    spy = Injector(cache)
    old, atomic.fs = atomic.fs, spy
    try:
        run_prepare(data, cache, saver)
    finally:
        atomic.fs = old
    return spy.ops


def check_point(data: Path, cache: Path, want: np.ndarray, said: list[str] | None = None) -> list[str]:
    """What is wrong with the cache a killed preparation left (empty: nothing); `said` gets the next
    preparation's line about it ("" when it said none)."""
    problems = []
    for meta_path in cache.glob("*.json"):
        key = meta_path.stem
        meta = T.read_meta(meta_path, cache / f"{key}.bin", key)
        if meta is not None:
            got = np.fromfile(cache / f"{key}.bin", dtype=meta["dtype"])
            if not np.array_equal(got, want):
                problems.append("a cache entry loads as complete with other tokens")
    lines: list[str] = []
    leftovers = sorted(p.name for p in cache.glob(".tmp-*"))
    ds = prepare(data, "char", cache_dir=cache, log=lines.append)
    if not np.array_equal(all_tokens(ds), want):
        problems.append("the next preparation gives other tokens")
    which = [ln for ln in lines if "starting over" in ln or "resuming an interrupted" in ln]
    if leftovers and len(which) != 1:
        problems.append(f"the next preparation did not say in one line whether it resumes ({leftovers})")
    if said is not None:
        said.append(which[0] if which else "")
    if list(cache.glob(".tmp-*")):
        problems.append("the next preparation left temp files")
    return problems


def kill_everywhere(tmp_path: Path, saver: str, said: list[str] | None = None) -> dict[int, list[str]]:
    data = kill_corpus(tmp_path / "corpus")
    want = CharTokenizer.train(KILL_JOINED).encode(KILL_JOINED)
    ops = record(data, tmp_path / f"dry-{saver}", saver)
    assert len(ops) >= 10, ops
    jobs = [{"data": str(data), "cache": str(tmp_path / f"kill-{i}"), "at": i, "saver": saver}
            for i in range(len(ops))]
    proc = subprocess.run([sys.executable, __file__, "serve"], input=json.dumps(jobs), capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(jobs) and all(r["killed"] for r in results), "some fault never fired"
    return {i: check_point(data, tmp_path / f"kill-{i}", want, said) for i in range(len(ops))}


def test_a_kill_at_every_write_never_leaves_a_loadable_partial_entry(tmp_path):
    ops = record(kill_corpus(tmp_path / "corpus"), tmp_path / "dry", "streamed")
    kinds = {op.split()[0] for op in ops}
    assert {"mkstemp", "write", "fsync", "replace", "fsync_dir"} <= kinds, ops
    assert sum(op.startswith("write") for op in ops) >= 4  # several chunks: kills between appends
    problems = kill_everywhere(tmp_path, "streamed")
    assert not any(problems.values()), {i: p for i, p in problems.items() if p}


def test_a_kill_at_every_write_with_checkpoints_resumes_or_starts_over(tmp_path):
    """With a resume checkpoint after every chunk: a kill anywhere leaves nothing loadable, and the next
    preparation resumes (from the tokenizer alone, or from tokens already written) or starts over, says
    which in one line, and gives the whole corpus's tokens."""
    ops = record(kill_corpus(tmp_path / "corpus"), tmp_path / "dry", "checkpoints")
    assert sum(op.startswith("replace .tmp-") and "resume.json" in op for op in ops) >= 4, ops
    said: list[str] = []
    problems = kill_everywhere(tmp_path, "checkpoints", said)
    assert not any(problems.values()), {i: p for i, p in problems.items() if p}
    resumed = [int(re.search(r"\(([\d,]+) tokens written", line)[1].replace(",", ""))
               for line in said if "resuming" in line]
    assert len(resumed) >= 10 and max(resumed) > len(KILL_JOINED) // 2, said
    assert any("starting over" in line for line in said), said  # killed before the first checkpoint


def test_a_kill_at_every_write_of_a_resumed_preparation(tmp_path):
    ops = record(kill_corpus(tmp_path / "corpus"), tmp_path / "dry", "resumed")
    assert ops[0].startswith("reopen .tmp-") and any("resume.json" in op for op in ops[1:]), ops
    said: list[str] = []
    problems = kill_everywhere(tmp_path, "resumed", said)
    assert not any(problems.values()), {i: p for i, p in problems.items() if p}
    assert sum("resuming" in line for line in said) >= len(ops) - 8, said  # all but the last steps resume


def test_an_interrupted_preparation_resumes_and_encodes_only_the_rest(tmp_path, monkeypatch):
    data = kill_corpus(tmp_path / "corpus")
    want = CharTokenizer.train(KILL_JOINED).encode(KILL_JOINED)
    cache = tmp_path / "cache"
    interrupt(data, cache)  # Ctrl-C as the 3rd chunk encodes: 2 chunks checkpointed
    encoded: list[int] = []
    plain = CharTokenizer.encode
    monkeypatch.setattr(CharTokenizer, "encode", lambda self, t: encoded.append(len(t)) or plain(self, t))
    lines: list[str] = []
    ds = prepare(data, "char", cache_dir=cache, log=lines.append)
    assert np.array_equal(all_tokens(ds), want) and not ds.from_cache
    assert any("resuming an interrupted preparation" in line for line in lines), lines
    assert any("(the rest after its checkpoint)" in line for line in lines), lines
    assert 0 < sum(encoded) <= len(KILL_JOINED) - 2 * 256, encoded  # 2 checkpointed chunks not encoded again
    assert not list(cache.glob(".tmp-*"))
    # control: a checkpoint whose tokens do not match its temp file is not resumed from
    monkeypatch.undo()
    cache2 = tmp_path / "cache2"
    interrupt(data, cache2)
    tmp = next(p for p in cache2.glob(".tmp-*.bin-*"))
    tmp.write_bytes(b"\xff\xff" + tmp.read_bytes()[2:])  # one token changed
    lines = []
    ds = prepare(data, "char", cache_dir=cache2, log=lines.append)
    assert np.array_equal(all_tokens(ds), want)
    assert any("no checkpoint that matches them; starting over" in line for line in lines), lines


def test_the_corpus_is_not_read_again_while_its_files_are_unchanged(tmp_path, monkeypatch):
    """The content hash is remembered beside the files' stat; a file edited to the same size with its mtime
    put back is still noticed (its ctime moved), and hashed again."""
    import time

    monkeypatch.setattr(T, "STAT_MARGIN_NS", 0)
    write_corpus(tmp_path / "c")
    time.sleep(0.05)  # the files' ctime is older than the hashing (no clock tick hides an edit)
    first = prepare(tmp_path / "c", "char", cache_dir=tmp_path / "cache")
    hashed: list[int] = []
    content_hash = C.content_hash
    monkeypatch.setattr(C, "content_hash", lambda fs, *a: hashed.append(len(fs)) or content_hash(fs, *a))
    again = prepare(tmp_path / "c", "char", cache_dir=tmp_path / "cache")
    assert again.from_cache and hashed == []  # not read at all
    path = tmp_path / "c" / "a.txt"
    st = path.stat()
    time.sleep(0.05)
    data = bytearray(path.read_bytes())
    data[10:13] = b"XYZ"
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the ctime tells
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    changed = prepare(tmp_path / "c", "char", cache_dir=tmp_path / "cache")
    assert hashed == [4] and not changed.from_cache and changed.cache_file != first.cache_file
    assert "XYZ" in changed.tokenizer.decode(all_tokens(changed))
    # control: files too fresh to trust are hashed again on every run
    monkeypatch.setattr(T, "STAT_MARGIN_NS", 10**18)
    (tmp_path / "c" / "c.txt").write_text("new", encoding="utf-8")
    prepare(tmp_path / "c", "char", cache_dir=tmp_path / "cache")
    prepare(tmp_path / "c", "char", cache_dir=tmp_path / "cache")
    assert hashed == [4, 4, 4]


def test_a_naive_in_place_writer_is_caught(tmp_path):
    problems = kill_everywhere(tmp_path, "naive")
    assert any("loads as complete with other tokens" in p for ps in problems.values() for p in ps)


def test_a_failing_write_is_one_error_and_leaves_nothing_loadable(tmp_path):
    from test_fault_injection import Injector

    data = kill_corpus(tmp_path / "corpus")
    want = CharTokenizer.train(KILL_JOINED).encode(KILL_JOINED)
    n = len(record(data, tmp_path / "dry-fail", "streamed"))
    assert n >= 10
    failed = 0
    for at in range(n):
        cache = tmp_path / f"fail-{at}"
        old, atomic.fs = atomic.fs, Injector(cache, at=at)
        try:
            T.prepare_tokens(data, "char", cache_dir=cache, chunk_bytes=256)
        except TwinlmError as e:
            failed += 1
            assert "cannot write the token cache" in str(e) and "\n" not in str(e)
        finally:
            atomic.fs = old
        assert not list(cache.glob(".tmp-*")), at  # a failure cleans up after itself
        assert not check_point(data, cache, want), at
    assert failed == n  # every fault reached the user as one error (none was swallowed)


# ---- memory ----------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from pathlib import Path
    from twinlm.core import data
    from twinlm.core.tokenizers import CharTokenizer

    def status(field):  # kB
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    corpus, cache, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    CharTokenizer("ab").encode("ab")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = status("VmRSS")
    if mode == "whole":  # negative control: the corpus in memory, as before streaming
        text = data.read_corpus(corpus)[0]
        ids = CharTokenizer.train(text).encode(text)
    else:
        ds = data.prepare(corpus, "char", cache_dir=cache, chunk_bytes=1 << 16)
        b = data.Batcher(ds.train, 8, 64, 0)
        for _ in range(50):
            b.next()
    print(base, status("VmHWM"))
""")


def peak_growth_mb(corpus: Path, cache: Path, mode: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(cache), mode], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    base, peak = map(int, out.stdout.split())
    return (peak - base) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")
def test_memory_stays_bounded_on_a_corpus_several_times_the_limit(tmp_path):
    limit_mb = 8
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = np.array(["the", "naïve", "café", "cat", "sat", "on", "mat", "🙂", "and", "dog", "\n"])
    for i in range(4):  # 4 files of ~9 MB: 36 MB, 4.5x the limit
        (corpus / f"part{i}.txt").write_text(" ".join(rng.choice(words, 2_200_000)), encoding="utf-8")
    size_mb = sum(p.stat().st_size for p in corpus.iterdir()) / 2**20
    assert size_mb > 4 * limit_mb
    built = peak_growth_mb(corpus, tmp_path / "cache", "stream")
    hit = peak_growth_mb(corpus, tmp_path / "cache", "stream")  # from the cache, sampling batches
    whole = peak_growth_mb(corpus, tmp_path / "cache", "whole")
    assert built < limit_mb and hit < limit_mb, (built, hit, size_mb)
    assert whole > 2 * limit_mb, (whole, built, hit)  # the measurement sees a corpus held in memory


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve(json.load(sys.stdin))


def test_batches_read_from_the_token_file_equal_the_array_windows(tmp_path):
    write_corpus(tmp_path / "c")
    ds = prepare(tmp_path / "c", "char", cache_dir=tmp_path / "cache", val_fraction=0.3)
    for split in (ds.train, ds.val):
        from_file = data.Batcher(split, 4, 16, seed=3)
        assert from_file._fd is not None  # windows come by pread, not through the memory map
        in_memory = data.Batcher(np.array(split), 4, 16, seed=3)
        assert in_memory._fd is None
        for _ in range(20):
            got, want = from_file.next(), in_memory.next()
            assert all(g.dtype == w.dtype == np.int32 and np.array_equal(g, w)
                       for g, w in zip(got, want, strict=True))


# ---- the command line ------------------------------------------------------------------------------

def test_train_on_a_folder_and_on_a_jsonl_corpus(tmp_path):
    from test_cli_train import TINY, twinlm

    write_corpus(tmp_path / "notes")
    r = twinlm(tmp_path, "train", "--data", "notes", *TINY, "--max-iters", "2", "--eval-every", "2")
    assert r.returncode == 0, r.stderr
    assert re.search(r"prepared \S*/notes \(4 files\): [\d,]+ tokens from 4 files", r.stdout), r.stdout
    rows = "".join(json.dumps({"text": f"row {i}: the quick brown fox jumps over the lazy dog"}) + "\n"
                   for i in range(200))
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    r = twinlm(tmp_path, "train", "--data", "rows.jsonl.gz", "--tokenizer", "bpe", "--vocab-size", "300",
               *TINY, "--max-iters", "2", "--eval-every", "2", "--out", "runs/rows")
    assert r.returncode == 0, r.stderr
    summary = r"prepared \S*/rows.jsonl.gz: [\d,]+ tokens from 1 files .*200 documents"
    assert re.search(summary, r.stdout), r.stdout
    r = twinlm(tmp_path, "train", "--data", "rows.jsonl.gz", "--tokenizer", "bpe", "--vocab-size", "300",
               *TINY, "--max-iters", "2", "--eval-every", "2", "--out", "runs/rows2")
    assert r.returncode == 0 and "token cache: " in r.stdout, r.stdout


def test_eval_data_streams_through_the_token_cache(tmp_path):
    """`twinlm eval --data` encodes the file into the token cache (a folder works too), not in memory;
    the scores equal the whole text's; a file the model's tokenizer does not cover is one error line."""
    from test_cli_train import TINY, twinlm

    write_corpus(tmp_path / "notes")
    r = twinlm(tmp_path, "train", "--data", "notes", *TINY, "--max-iters", "2", "--eval-every", "2")
    assert r.returncode == 0, r.stderr
    whole = read_corpus(tmp_path / "notes")[0]
    (tmp_path / "one.txt").write_text(whole, encoding="utf-8")
    scores = []
    for target in ("one.txt", "notes", "one.txt"):
        before = set((tmp_path / "cache").glob("*.bin"))
        r = twinlm(tmp_path, "eval", "runs/notes", "--data", target)
        assert r.returncode == 0, r.stderr
        scores.append(re.search(r"([\d,]+) tokens scored.*\nloss (\S+)", r.stdout).groups())
        made = set((tmp_path / "cache").glob("*.bin")) - before
        assert len(made) == (1 if target == "one.txt" and len(scores) == 1 else 0), (target, made)
    # the joined text; the folder (whose tokens training's entry already holds); the first file again
    assert scores[0] == scores[1] == scores[2]
    (tmp_path / "greek.txt").write_text("αβγδ" * 100, encoding="utf-8")
    r = twinlm(tmp_path, "eval", "runs/notes", "--data", "greek.txt")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "does not fit this model's tokenizer" in lines[0], r.stderr


@pytest.mark.parametrize("files, args, message", [
    ({"empty/": None}, [], "/empty has no .txt, .md or .jsonl files"),
    ({"r.jsonl": '{"text": "ok"}\n{"txt": "typo"}\n'}, [], "r.jsonl, line 2 has no 'text' string"),
    # a .jsonl of chat rows is chat data (core.chat), which names the bad row
    ({"r.jsonl": '{"messages": []}\n'}, [], "r.jsonl:1: 'messages' must be a non-empty list"),
    ({"bad.txt": b"abc \xff def"}, [], "bad.txt is not valid UTF-8 (byte 0xff at offset 4)"),
    ({"a.txt": "x"}, ["--bpe-sample-mb", "-1", "--tokenizer", "bpe"],
     "bpe-sample-mb must be an integer >= 0"),
])
def test_bad_corpora_give_one_error_line(tmp_path, files, args, message):
    from test_cli_train import TINY, twinlm

    for name, content in files.items():
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        elif isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).write_text(content, encoding="utf-8")
    r = twinlm(tmp_path, "train", "--data", next(iter(files)).rstrip("/"), *TINY, *args, "--max-iters", "1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0], lines[0]


def test_errors_skip_and_replace_from_the_command_line(tmp_path):
    from test_cli_train import TINY, twinlm

    (tmp_path / "bad.txt").write_bytes(b"some text \xff with a bad byte\n" * 40)
    for mode in ("skip", "replace"):
        r = twinlm(tmp_path, "train", "--data", "bad.txt", "--errors", mode, *TINY, "--max-iters", "1",
                   "--out", f"runs/{mode}")
        assert r.returncode == 0, r.stderr
    # replace keeps one id per bad byte (U+FFFD), skip drops them: different vocabularies
    vocab = {m: json.loads((tmp_path / "runs" / m / "ckpt-00000001" / "meta.json").read_text())
             for m in ("skip", "replace")}
    assert "\ufffd" in json.dumps(vocab["replace"], ensure_ascii=False)
    assert "\ufffd" not in json.dumps(vocab["skip"], ensure_ascii=False)


def test_progress_bar_shows_rate_and_goes_away(tmp_path):
    import io

    from rich.console import Console

    from twinlm.prepare_progress import PrepareProgress

    write_corpus(tmp_path / "c")
    buf = io.StringIO()
    bar = PrepareProgress(Console(file=buf, force_terminal=True, width=120), min_interval=0.01)
    prepare(tmp_path / "c", "char", cache_dir=tmp_path / "cache", progress=bar, chunk_bytes=64)
    shown = buf.getvalue()
    assert "prepare encode" in shown and "prepare hash corpus" in shown and "/s" in shown
    assert bar._bar is None  # stopped by the final "done" call
    quiet = io.StringIO()
    silent = PrepareProgress(Console(file=quiet, force_terminal=False))
    prepare(tmp_path / "c", "byte", cache_dir=tmp_path / "cache", progress=silent)
    assert quiet.getvalue() == ""


def test_run_names_from_corpus_specs(tmp_path):
    (tmp_path / "data.v2").mkdir()
    assert C.corpus_name("rows.jsonl.gz") == "rows" and C.corpus_name("input.txt") == "input"
    assert C.corpus_name("notes/*.txt") == "notes" and C.corpus_name("/a/notes/**/*.md") == "notes"
    assert C.corpus_name(str(tmp_path / "data.v2")) == "data.v2" and C.corpus_name("*.txt") == "run"
    assert C.corpus_name(["x/a.txt", "y"]) == "a"


def test_an_unwritable_cache_folder_is_one_error(tmp_path):
    write_corpus(tmp_path / "c")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TwinlmError, match="cannot write the token cache"):
        prepare(tmp_path / "c", cache_dir=tmp_path / "file" / "cache")


def test_a_damaged_entry_is_rebuilt_and_said_so(tmp_path):
    write_corpus(tmp_path / "c")
    first = prepare(tmp_path / "c", "char", cache_dir=tmp_path / "cache")
    want = all_tokens(first)
    first.cache_file.write_bytes(first.cache_file.read_bytes()[:-2])  # one token short
    lines: list[str] = []
    again = prepare(tmp_path / "c", "char", cache_dir=tmp_path / "cache", log=lines.append)
    assert not again.from_cache and np.array_equal(all_tokens(again), want)
    assert any("incomplete or damaged" in line and "starting over" in line for line in lines), lines


def test_several_data_values_train_and_resume(tmp_path):
    from test_cli_train import TINY, twinlm

    write_corpus(tmp_path / "notes")
    (tmp_path / "extra.md").write_text("more text for the corpus\n" * 100, encoding="utf-8")
    r = twinlm(tmp_path, "train", "--data", "notes", "--data", "extra.md", *TINY, "--max-iters", "2",
               "--eval-every", "2")
    assert r.returncode == 0, r.stderr
    summary = r"prepared \S*/notes and 1 more \(5 files\): [\d,]+ tokens from 5 files"
    assert re.search(summary, r.stdout), r.stdout
    meta = json.loads((tmp_path / "runs" / "notes" / "ckpt-00000002" / "meta.json").read_text())
    assert meta["train"]["data"] == [str(tmp_path / "notes"), str(tmp_path / "extra.md")]
    r = twinlm(tmp_path, "train", "--resume", "runs/notes", "--max-iters", "3")
    assert r.returncode == 0 and "token cache: " in r.stdout and "done: iter 3" in r.stdout, r.stderr


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_a_resumed_run_finds_the_entry_its_tokenizer_was_learned_with(tmp_path, kind):
    from twinlm.core.tokenizers import SpecialTokens

    write_corpus(tmp_path / "c")
    kw = {"vocab_size": 300} if kind == "bpe" else {}
    first = prepare(tmp_path / "c", kind, cache_dir=tmp_path / "cache", **kw)
    for tok in (first.tokenizer, SpecialTokens(first.tokenizer, ["[PAD]", "[MASK]", "[CLS]"])):
        again = prepare(tmp_path / "c", tok=tok, cache_dir=tmp_path / "cache")
        assert again.from_cache and again.cache_file == first.cache_file and again.tokenizer is tok
    if kind == "char":  # control: another vocabulary is another entry
        wider = CharTokenizer("".join(sorted(set(first.tokenizer.chars + "~"))))
        other = prepare(tmp_path / "c", tok=wider, cache_dir=tmp_path / "cache")
        assert not other.from_cache and other.cache_file != first.cache_file


def test_special_tokens_and_imported_tokenizers_encode_as_the_whole_text(tmp_path):
    """An encoder run's tokenizer (special tokens after the corpus's ids; a literal "[MASK]" in the text is
    its id) and an imported model's "hf" tokenizer (here one whose normalizer prepends "▁" to every call,
    as Llama's does) give the whole text's ids at any chunk size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from twinlm.core.tokenizers import HFTokenizer, SpecialTokens

    whole = write_corpus(tmp_path / "c")
    (tmp_path / "c" / "m.txt").write_text("fill [MASK] in, [CLS]start and [PAD]\n" * 3, encoding="utf-8")
    whole = read_corpus(tmp_path / "c")[0]
    special = SpecialTokens(CharTokenizer.train(whole), ["[PAD]", "[MASK]", "[CLS]"])
    hf = Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    hf.train_from_iterator([whole], trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"],
                                                                 show_progress=False))
    imported = HFTokenizer(hf.to_str())
    for tok in (special, imported):
        want = tok.encode(whole)
        for chunk in (3, 7, 64):
            ds = prepare(tmp_path / "c", tok=tok, cache_dir=tmp_path / f"cache-{chunk}", chunk_bytes=chunk)
            assert np.array_equal(all_tokens(ds), want), (tok.kind, chunk)
    # controls: the imported tokenizer fed chunks, or special tokens cut anywhere, would give other ids
    pieces = list(C.text_chunks(iter(whole), 64, bpe_last_cut))
    assert np.concatenate([imported.encode(p) for p in pieces]).tolist() != imported.encode(whole).tolist()
    pieces = list(C.text_chunks(iter(whole), 3))
    assert np.concatenate([special.encode(p) for p in pieces]).tolist() != special.encode(whole).tolist()


def test_cache_clear_knows_the_resume_and_stat_files():
    from twinlm.cli.cache import _TOKEN_FILE

    key = "0123456789abcdef" * 2
    ours = [f"{key}.bin", f"{key}.json", f".tmp-{key}.bin-ab_12xyz", f".tmp-{key}.resume.json",
            f".tmp-.tmp-{key}.resume.json-ab_12xyz", f"{key}.stat.json", f".tmp-{key}.stat.json-ab_12xyz",
            f".{key}.lock"]
    assert all(_TOKEN_FILE.match(name) for name in ours)
    others = ("notes.txt", f"{key}.txt", "stat.json", f"{key[:-1]}.bin")
    assert not any(_TOKEN_FILE.match(name) for name in others)
