"""Time to quality: train the baby preset on Tiny Shakespeare (characters) and report the val loss
reached after a fixed number of iterations, with the wall time, per backend.

    python -m benchmarks.quality --backend torch,mlx,tinygrad --iters 2000 --out results/quality.json

Same data, same batches (numpy, seeded), same init and schedule (nanoGPT's shakespeare_char
settings: lr 1e-3 -> 1e-4 cosine over the run, warmup 100, beta2 0.99, wd 0.1, clip 1.0) on every
backend; the val loss is the mean over a fixed set of held-out batches, identical for all backends.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def train(backend: str, iters: int, batch_size: int, eval_batches: int, data_path: Path,
          seed: int = 0) -> dict[str, Any]:
    from benchmarks.runner import make_trainer
    from twinlm.core.config import preset
    from twinlm.core.data import Batcher, prepare
    from twinlm.core.optim import AdamWConfig

    ds = prepare(data_path, tokenizer="char")  # the trainer's own char tokenizer and 90/10 split
    cfg = preset("baby", vocab_size=ds.tokenizer.vocab_size)
    opt = AdamWConfig(max_iters=iters)
    t0 = time.perf_counter()
    trainer = make_trainer(backend, cfg, opt, seed)
    batches = Batcher(ds.train, batch_size, cfg.block_size, seed)
    losses = []
    first_step_s = None
    for it in range(iters):
        losses.append(trainer.step(*batches.next(), it))
        if first_step_s is None:
            first_step_s = time.perf_counter() - t0
    train_s = time.perf_counter() - t0
    val_batches = Batcher(ds.val, batch_size, cfg.block_size, 12345)
    val = [trainer.eval_loss(*val_batches.next()) for _ in range(eval_batches)]
    return {"backend": backend, "preset": "baby", "iters": iters, "batch": batch_size,
            "val_loss": float(np.mean(val)), "train_loss_last50": float(np.mean(losses[-50:])),
            "train_wall_s": train_s, "first_step_s": first_step_s, "eval_batches": eval_batches,
            "hardware": report.hardware(), "versions": report.versions(), "config": cfg.to_dict(),
            "optimizer": opt.to_dict()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="torch,mlx,tinygrad", help="comma-separated backends")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.data.is_file():
        ap.error(f"no data at {args.data} (pass --data PATH to tinyshakespeare.txt)")
    if args.child:
        report.save(train(args.backend, args.iters, args.batch, args.eval_batches, args.data), args.child)
        return
    records = []
    for name in args.backend.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            print(f"[{name}] training baby for {args.iters} iterations ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "benchmarks.quality", "--child", tmp.name, "--backend", name,
                   "--iters", str(args.iters), "--batch", str(args.batch), "--eval-batches",
                   str(args.eval_batches), "--data", str(args.data)]
            proc = subprocess.run(cmd, text=True, capture_output=True)
            if proc.returncode:
                print(f"[{name}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            records.append(json.loads(Path(tmp.name).read_text()))
            r = records[-1]
            print(f"[{name}] val loss {r['val_loss']:.4f} after {r['iters']} iters, "
                  f"{r['train_wall_s']:.0f} s wall", file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            report.save(records, args.out)  # type: ignore[arg-type]
    for r in records:
        print(f"{r['backend']:9s} iters {r['iters']}  val loss {r['val_loss']:.4f}  "
              f"train loss (last 50) {r['train_loss_last50']:.4f}  wall {r['train_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
