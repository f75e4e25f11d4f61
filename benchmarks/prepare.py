"""Corpus preparation: peak RSS and MB/s of twinlm's streamed preparation beside a nanoGPT-style one.

    python -m benchmarks.prepare --size-mb 100                 # char, byte and bpe; 100 MB of generated text
    python -m benchmarks.prepare --size-mb 20 --tokenizers char,bpe --files 50
    python -m benchmarks.prepare --file big.txt --tokenizers char --only twinlm --twinlm-from ../main

Generates an N-MB corpus of many files (perturbed generated text: words from a fixed vocabulary with
random case, punctuation, numbers, some non-ASCII, paragraphs; seeded, so the same every time), then prepares
it once per tokenizer, each in a fresh child process whose peak RSS (ru_maxrss) is reported:

- `twinlm`: `twinlm.core.data.prepare` into an empty token cache (hash, vocabulary, encode passes), then a
  second child that loads the cached entry and draws 200 batches (training from the cache).
- `nanogpt`: the nanoGPT way for the same tokenizer: read all the text, build the vocabulary (char), train
  BPE on all of it (`tokenizers`, the same trainer settings), encode it whole, write a uint16 memmap.

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
    t = time.perf_counter()
    kw = {"vocab_size": 512} if kind == "bpe" else {}
    ds = data.prepare(corpus, kind, cache_dir=cache, **kw)
    if mode == "train":
        b = data.Batcher(ds.train, 64, 256, 0)
        for _ in range(200):
            b.next()
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "tokens": int(len(ds.train) + len(ds.val)), "from_cache": ds.from_cache,
                      "code": data.__file__,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

CHILD_NANOGPT = textwrap.dedent("""
    import json, os, resource, sys, time
    from pathlib import Path
    import numpy as np
    corpus, out, kind = sys.argv[1:4]
    t = time.perf_counter()
    paths = sorted(Path(corpus).rglob("*.txt")) if Path(corpus).is_dir() else [Path(corpus)]
    text = "".join(p.read_text(encoding="utf-8") for p in paths)      # the whole corpus in memory
    if kind == "char":
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        ids = np.array([stoi[c] for c in text], dtype=np.uint16)     # nanoGPT's shakespeare_char/prepare.py
    elif kind == "byte":
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        docs = text.split("\\n\\n")
        tok.train_from_iterator(docs, trainer=trainer)
        ids = np.concatenate([np.array(e.ids, dtype=np.uint16) for e in tok.encode_batch_fast(docs)])
    arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(len(ids),))  # nanoGPT's uint16 memmap
    arr[:] = ids
    arr.flush()
    print(json.dumps({"wall_s": time.perf_counter() - t, "tokens": int(len(ids)),
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
                          timeout=3600, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
        raise SystemExit(f"child failed: {last}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=100.0, help="corpus size to generate (MB)")
    ap.add_argument("--files", type=int, default=100, help="files to spread it over")
    ap.add_argument("--tokenizers", default="char,byte,bpe")
    ap.add_argument("--file", default=None, help="prepare this file instead of a generated corpus")
    ap.add_argument("--only", choices=("twinlm", "nanogpt", "both"), default="both")
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
            corpus = tmp_path / "corpus"
            t = time.perf_counter()
            size = generate(corpus, args.size_mb, args.files)
            print(f"generated {size / 1e6:.1f} MB in {args.files} files in {time.perf_counter() - t:.1f} s")
        rows = []
        for kind in args.tokenizers.split(","):
            if args.only in ("twinlm", "both"):
                cache = tmp_path / f"cache-{kind}"
                r = run_child(sys.executable, CHILD_TWINLM, [str(corpus), str(cache), kind, "prepare"],
                              pythonpath)
                print(f"twinlm children import {r['code']}")
                rows.append({"tokenizer": kind, "how": "twinlm prepare", **r})
                r = run_child(sys.executable, CHILD_TWINLM, [str(corpus), str(cache), kind, "train"],
                              pythonpath)
                rows.append({"tokenizer": kind, "how": "twinlm cached + 200 batches", **r})
            if args.only in ("nanogpt", "both"):
                out = str(tmp_path / f"{kind}.bin")
                r = run_child(sys.executable, CHILD_NANOGPT, [str(corpus), out, kind], None)
                rows.append({"tokenizer": kind, "how": "nanoGPT-style (whole text)", **r})
        print(f"\ncorpus {size / 1e6:.1f} MB ({'1 file' if args.file else f'{args.files} files'}); "
              f"peak RSS = the child's ru_maxrss")
        print("| tokenizer | how                          | tokens      | wall s | MB/s  | peak RSS MB |")
        print("|-----------|------------------------------|------------:|-------:|------:|------------:|")
        for r in rows:
            print(f"| {r['tokenizer']:<9} | {r['how']:<28} | {r['tokens']:>11,} | {r['wall_s']:>6.1f} | "
                  f"{size / 1e6 / r['wall_s']:>5.1f} | {r['peak_rss_mb']:>11,.0f} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"size_bytes": size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
