"""Corpus preparation: peak RSS and MB/s of twinlm's streamed preparation beside a nanoGPT-style one.

    python -m benchmarks.prepare --size-mb 100                 # char, byte and bpe; 100 MB of generated text
    python -m benchmarks.prepare --size-mb 20 --tokenizers char,bpe --files 50
    python -m benchmarks.prepare --size-mb 2000 --files 400 --corpus-dir /var/tmp/corpus-2g \
        --json benchmarks/results/prepare_2g.json              # the issue's 2 GB row (corpus kept for reruns)
    python -m benchmarks.prepare --file big.txt --tokenizers char --only twinlm --twinlm-from ../main

Generates an N-MB corpus of many files (perturbed generated text: words from a fixed vocabulary with
random case, punctuation, numbers, some non-ASCII, paragraphs; seeded, so the same every time), then prepares
it once per tokenizer, each in a fresh child process whose peak RSS (ru_maxrss) is reported:

- `twinlm`: `twinlm.core.data.prepare` into an empty token cache (hash, vocabulary, encode passes, each timed:
  the MB/s columns are of the corpus's bytes over the whole preparation and over the encode pass; BPE on a
  corpus of 64 MB or more encodes in worker processes, whose peak RSS is reported beside the main one's), then
  a second child that loads the cached entry and draws 200 batches (training from the cache).
- `nanoGPT`: nanoGPT's way for the same tokenizer, `tokenizers` for BPE (tiktoken's GPT-2 vocabulary would
  need a download), into a uint16 memmap. `whole` is shakespeare_char/prepare.py's shape: read all the
  text, build the vocabulary (char), train BPE on the first `--bpe-sample-mb` MB, encode it whole (BPE with
  the library's multithreaded batch encoder over paragraphs), write the memmap; its memory grows with the
  corpus, so it runs only up to `--whole-max-mb` (default 200). `per-file` is openwebtext/prepare.py's shape:
  the vocabulary pass (char) or BPE training on the same sample, then each file encoded alone and appended,
  so it fits any size.

`--file PATH` instead prepares one file, and `--twinlm-from DIR` runs the `twinlm` children on another
checkout's code (e.g. the main branch's, to measure the code before streaming on the same input).
Not a timed test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in a is that it was for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out "
         "them then she many some so these would other into has more her two like him see time could no make "
         "than first been its who now people my made over did down only way find use may water long little "
         "very after words called just where most know king queen castle river mountain forest dragon "
         "naïve café résumé über straße 東京 данные ελληνικά 🙂").split()

CHILD_TWINLM = textwrap.dedent("""
    import json, resource, sys, time
    from twinlm.core import data
    corpus, cache, kind, mode = sys.argv[1:5]
    phases, cpu, at = {}, {}, [None, 0.0, 0.0]
    def progress(phase, done, total):
        now, now_cpu = time.perf_counter(), time.process_time()  # CPU: all threads of the process
        if phase != at[0]:
            if at[0] is not None:
                phases[at[0]] = phases.get(at[0], 0.0) + now - at[1]
                cpu[at[0]] = cpu.get(at[0], 0.0) + now_cpu - at[2]
            at[:] = [phase, now, now_cpu]
    t = time.perf_counter()
    kw = {"vocab_size": 512} if kind == "bpe" else {}
    ds = data.prepare(corpus, kind, cache_dir=cache, progress=progress, **kw)
    if mode == "train":
        b = data.Batcher(ds.train, 64, 256, 0)
        for _ in range(200):
            b.next()
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "tokens": int(len(ds.train) + len(ds.val)), "from_cache": ds.from_cache,
                      "code": data.__file__, "phases_s": phases, "phases_cpu_s": cpu,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      # BPE on a big corpus encodes in worker processes: the largest one's peak, and their CPU
                      "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "workers_cpu_s": sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])}))
""")

CHILD_NANOGPT = textwrap.dedent("""
    import json, os, resource, sys, time
    from pathlib import Path
    import numpy as np
    corpus, out, kind, shape, sample_mb = sys.argv[1:6]
    sample = int(sample_mb) * 1_000_000
    t = time.perf_counter()
    paths = sorted(Path(corpus).rglob("*.txt")) if Path(corpus).is_dir() else [Path(corpus)]
    def read(p):
        return p.read_text(encoding="utf-8")
    def bpe_tokenizer(texts):  # twinlm's trainer settings, on the first `sample` bytes
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        def docs():
            n = 0
            for text in texts:
                for doc in text.split("\\n\\n"):
                    yield doc
                    n += len(doc)
                    if n >= sample:
                        return
        tok.train_from_iterator(docs(), trainer=trainer)
        return tok
    def encode(text, stoi, tok):
        if kind == "char":
            return np.array([stoi[c] for c in text], dtype=np.uint16)  # shakespeare_char/prepare.py
        if kind == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        parts = [np.array(e.ids, dtype=np.uint16) for e in tok.encode_batch_fast(text.split("\\n\\n"))]
        return np.concatenate(parts)
    stoi = tok = None
    if shape == "whole":
        text = "".join(read(p) for p in paths)      # the whole corpus in memory
        if kind == "char":
            stoi = {c: i for i, c in enumerate(sorted(set(text)))}
        if kind == "bpe":
            tok = bpe_tokenizer([text])
        t_enc, c_enc = time.perf_counter(), time.process_time()
        ids = encode(text, stoi, tok)
        arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(len(ids),))  # nanoGPT's uint16 memmap
        arr[:] = ids
        arr.flush()
        n = len(ids)
    else:  # openwebtext/prepare.py: one document (here a file) at a time, appended
        if kind == "char":
            chars = set()
            for p in paths:
                chars.update(read(p))
            stoi = {c: i for i, c in enumerate(sorted(chars))}
        if kind == "bpe":
            tok = bpe_tokenizer(read(p) for p in paths)
        t_enc, c_enc = time.perf_counter(), time.process_time()
        n = 0
        with open(out, "wb") as f:
            for p in paths:
                ids = encode(read(p), stoi, tok)
                ids.tofile(f)
                n += len(ids)
        arr = np.memmap(out, dtype=np.uint16, mode="r", shape=(n,))
    now = time.perf_counter()
    print(json.dumps({"wall_s": now - t, "tokens": int(n), "phases_s": {"encode": now - t_enc},
                      "phases_cpu_s": {"encode": time.process_time() - c_enc},
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def generate(folder: Path, size_mb: float, n_files: int, seed: int = 0) -> int:
    """Write about `size_mb` MB of text into `n_files` files; returns the bytes written."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    per_file = int(size_mb * 1e6 / n_files)
    total = 0
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        parts: list[str] = []
        n = 0
        while n < per_file:
            k = int(rng.integers(40, 200))  # a paragraph
            w = words[rng.integers(0, len(words), k)]
            caps = rng.random(k) < 0.08
            w = np.where(caps, np.char.capitalize(w), w)
            punct = rng.choice(np.array(["", "", "", "", ",", ".", ";", "!", "?"]), k)
            nums = rng.random(k) < 0.02
            w = np.where(nums, rng.integers(0, 10_000, k).astype(str), w)
            para = " ".join(np.char.add(w, punct).tolist()) + "\n\n"
            parts.append(para)
            n += len(para.encode("utf-8"))
        data = "".join(parts).encode("utf-8")
        (folder / f"part-{i:05d}.txt").write_bytes(data)
        total += len(data)
    return total


def run_child(python: str, script: str, args: list[str], pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    t = time.perf_counter()
    # cwd: `python -c` puts the working directory first on sys.path, which would shadow PYTHONPATH's twinlm
    proc = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=4 * 3600, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
        raise SystemExit(f"child failed: {last}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t
    return out


def corpus_at(folder: Path, size_mb: float, n_files: int) -> int:
    """The generated corpus in `folder`: made once, reused while its size and file count match."""
    stamp = folder / "corpus.json"
    want = {"size_mb": size_mb, "files": n_files, "generator": 1}
    if stamp.exists() and json.loads(stamp.read_text()).get("want") == want:
        size = json.loads(stamp.read_text())["bytes"]
        print(f"reusing the {size / 1e6:.1f} MB corpus in {folder}")
        return size
    t = time.perf_counter()
    size = generate(folder / "text", size_mb, n_files)
    stamp.write_text(json.dumps({"want": want, "bytes": size}))
    print(f"generated {size / 1e6:.1f} MB in {n_files} files in {time.perf_counter() - t:.1f} s")
    return size


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=100.0, help="corpus size to generate (MB)")
    ap.add_argument("--files", type=int, default=100, help="files to spread it over")
    ap.add_argument("--corpus-dir", default=None,
                    help="generate the corpus here and keep it (reused by the next run of the same size)")
    ap.add_argument("--tokenizers", default="char,byte,bpe")
    ap.add_argument("--file", default=None, help="prepare this file instead of a generated corpus")
    ap.add_argument("--only", choices=("twinlm", "nanogpt", "both"), default="both")
    ap.add_argument("--whole-max-mb", type=float, default=200.0,
                    help="run nanoGPT's whole-text preparation only up to this corpus size (its memory grows "
                         "with the corpus: ~10x for char)")
    ap.add_argument("--bpe-sample-mb", type=int, default=64,
                    help="nanoGPT-style BPE trains on this much text (twinlm's default sample)")
    ap.add_argument("--twinlm-from", default=None, metavar="DIR",
                    help="checkout whose twinlm the twinlm children import (default: this one); another "
                         "checkout measures other code on the same input")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    pythonpath = str(Path(args.twinlm_from).resolve() if args.twinlm_from else root)
    with tempfile.TemporaryDirectory(prefix="twinlm-prepare-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.file:
            corpus, size = Path(args.file), Path(args.file).stat().st_size
        else:
            folder = Path(args.corpus_dir) if args.corpus_dir else tmp_path / "corpus"
            size = corpus_at(folder, args.size_mb, args.files)
            corpus = folder / "text"
        shapes = ["per-file"] + (["whole"] if size / 1e6 <= args.whole_max_mb else [])
        rows = []
        for kind in args.tokenizers.split(","):
            if args.only in ("twinlm", "both"):
                cache = tmp_path / f"cache-{kind}"
                r = run_child(sys.executable, CHILD_TWINLM, [str(corpus), str(cache), kind, "prepare"],
                              pythonpath)
                print(f"twinlm children import {r['code']}")
                rows.append({"tokenizer": kind, "how": "twinlm prepare", **r})
                print(rows[-1], flush=True)
                r = run_child(sys.executable, CHILD_TWINLM, [str(corpus), str(cache), kind, "train"],
                              pythonpath)
                rows.append({"tokenizer": kind, "how": "twinlm cached + 200 batches", **r})
            if args.only in ("nanogpt", "both"):
                for shape in shapes:
                    out = str(tmp_path / f"{kind}.bin")
                    r = run_child(sys.executable, CHILD_NANOGPT,
                                  [str(corpus), out, kind, shape, str(args.bpe_sample_mb)], None)
                    rows.append({"tokenizer": kind, "how": f"nanoGPT-style ({shape})", **r})
                    print(rows[-1], flush=True)
                    os.unlink(out)
        print(f"\ncorpus {size / 1e6:.1f} MB ({'1 file' if args.file else f'{args.files} files'}); "
              "peak RSS = the child's ru_maxrss; encode MB/s = corpus MB / the encode pass's wall seconds; "
              "per CPU-s: / its CPU seconds (all threads), what a core of its own would give")
        print("| tokenizer | how                          | tokens        | wall s | MB/s  | encode MB/s | "
              "encode MB per CPU-s | peak RSS MB | workers' peak RSS MB |")
        print("|-----------|------------------------------|--------------:|-------:|------:|------------:|"
              "--------------------:|------------:|---------------------:|")
        for r in rows:
            enc, enc_cpu = r.get("phases_s", {}).get("encode"), r.get("phases_cpu_s", {}).get("encode")
            if enc_cpu and r.get("workers_cpu_s"):  # the workers' CPU is all encoding
                enc_cpu += r["workers_cpu_s"]
            enc_rate = f"{size / 1e6 / enc:>11.1f}" if enc else f"{'-':>11}"
            cpu_rate = f"{size / 1e6 / enc_cpu:>19.1f}" if enc_cpu else f"{'-':>19}"
            print(f"| {r['tokenizer']:<9} | {r['how']:<28} | {r['tokens']:>13,} | {r['wall_s']:>6.1f} | "
                  f"{size / 1e6 / r['wall_s']:>5.1f} | {enc_rate} | {cpu_rate} | "
                  f"{r['peak_rss_mb']:>11,.0f} | {_workers(r):>20} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"size_bytes": size, "files": args.files, "rows": rows,
                                                   "cpu": _cpu()}, indent=2) + "\n")


def _workers(r: dict) -> str:
    peak = r.get("workers_peak_rss_mb") or 0
    return f"{peak:,.0f} each" if peak > 0 else "-"


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    main()
