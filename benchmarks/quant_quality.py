"""Validation perplexity of a model trained here, in float32 and after 8- and 4-bit quantization (issue #21).

Trains the baby preset (nanoGPT's CPU baby GPT: 4 layers, 4 heads, 128 wide, block 64) on Tiny Shakespeare
with `twinlm train`'s trainer, quantizes it with `twinlm quantize`'s code (8-bit and 4-bit, group 64 unless
told), and scores every version on the run's validation split with `twinlm eval`'s loss, on each backend asked
for. Targets (the issue's): 8-bit within 1% of float32's perplexity, 4-bit (group 64) within 10%.

    python -m benchmarks.quant_quality                                  # 500 iterations, MLX, whole val split
    python -m benchmarks.quant_quality --iters 2000 --backend mlx,tinygrad
    python -m benchmarks.quant_quality --iters 20 --max-windows 32     # a check that it runs (seconds)

Not a test: it needs ../shared/data/tinyshakespeare.txt (or --data) and minutes of CPU.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="Text to train on (default: Tiny Shakespeare).")
    ap.add_argument("--iters", type=int, default=500, help="Training iterations (baby preset, batch 12).")
    ap.add_argument("--backend", default="mlx",
                    help="Backends to score on, comma-separated (trains on the first)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--max-windows", type=int, default=None, help="Score at most this many val windows")
    ap.add_argument("--run", default=None, help="Score this trained run instead of training one.")
    args = ap.parse_args()

    from twinlm.backends import get_backend
    from twinlm.cli.quantize import quantize_run
    from twinlm.core.data import prepare
    from twinlm.run_dir import load_model, to_backend
    from twinlm.tasks import run_window
    from twinlm.trainer import TrainConfig, Trainer, evaluate_loss

    backends = args.backend.split(",")
    work = Path(tempfile.mkdtemp(prefix="twinlm-quant-quality-"))
    run = Path(args.run) if args.run else work / "float"
    if not args.run:
        t0 = time.perf_counter()
        tc = TrainConfig(data=args.data, preset="baby", max_iters=args.iters, out=str(run),
                         eval_every=max(args.iters, 1), eval_iters=10)
        result = Trainer(tc, get_backend(backends[0]), log=lambda m: None).fit()
        print(f"trained the baby preset {args.iters} iterations on {backends[0]} in "
              f"{time.perf_counter() - t0:.0f}s (last val loss {result.val_loss})")
    runs = {"float32": run}
    for bits in (8, 4):
        runs[f"{bits}-bit g{args.group_size}"] = work / f"q{bits}"
        quantize_run(run, work / f"q{bits}", bits, args.group_size)
    cfg, _, tok, meta = load_model(run)
    val = prepare(meta.train.get("data"), tok=tok).val
    window = run_window(cfg, meta.train)
    print(f"validation split: {len(val):,} tokens, windows of {window}"
          + (f", at most {args.max_windows}" if args.max_windows else ""))
    print(f"{'backend':9} {'weights':14} {'loss':>8} {'perplexity':>11} {'vs float32':>11}")
    for name in backends:
        B = get_backend(name)
        base = None
        for label, path in runs.items():
            qcfg, params, _, _ = load_model(path)
            loss, _ = evaluate_loss(B, qcfg, to_backend(B, params), val, 32, args.max_windows, window)
            ppl = math.exp(loss)
            base = base or ppl
            print(f"{name:9} {label:14} {loss:8.4f} {ppl:11.4f} {100 * (ppl / base - 1):+10.2f}%")
    print(f"(runs in {work})")


if __name__ == "__main__":
    main()
