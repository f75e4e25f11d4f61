"""Where tinygrad's fine-tuning step time goes, beside MLX's (issue #19): a reduced model (fewer layers, the
real widths, vocabulary and batch x sequence), so every GEMM of the step has its real shape.

    python -m benchmarks.finetune_profile --case qwen-lora --layers 2       # real widths, ~minutes
    python -m benchmarks.finetune_profile --case smol-full --layers 2
    python -m benchmarks.finetune_profile --small                           # seconds: tiny shapes

Three measurements, each in its own child process, one after the other:
1. `step`: the real compiled training step (`benchmarks.runner`, what `twinlm train` runs) on MLX and on
   tinygrad: seconds per step after `--warmup` steps (the first compiles).
2. `kernels`: one tinygrad step (after warm-up, a replay of the captured TinyJit) under tinygrad's DEBUG=2,
   which times every kernel and reports its estimated FLOPs and bytes. Kernels are classed by kind:
   `matmul` (a reduce kernel doing >= 4 FLOP per byte moved, by tinygrad's own estimates: GEMMs, attention's
   QK^T and PV),
   `reduce` (other reduce kernels: sums, softmax's max and sum, norms, the loss), `elementwise`
   (E_ kernels: activations, AdamW, casts, the LoRA adds), `copy`. Time per class, its share, and the
   FLOP/s each class reaches.
3. `gemm`: the step's GEMM shapes (forward x @ W, backward dY @ W^T and, for trained weights, X^T @ dY) timed
   in one process on tinygrad (its generated C, as the step runs it), MLX (twinlm's MLX backend: the system
   OpenBLAS) and numpy: GFLOP/s per shape.

With DEBUG=2 tinygrad waits for each kernel, so the kernel sum can exceed the plain step time slightly; the
shares are what to read. On a shared machine absolute times move; the ratios within one run are steadier.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CASES = {"qwen-lora": ("Qwen2ForCausalLM", "qwen2", 8), "smol-full": ("LlamaForCausalLM", "llama", None)}
_ANSI = re.compile(r"\x1b\[(K|.*?m)")  # (tinygrad's ansistrip)
# "*** CPU     12 r_4_32_...  arg  3 mem   0.10 GB tm    123.45us/    1.23ms (   12 GFLOPS    3|4      GB/s)"
_KERNEL = re.compile(r"^\*\*\* \S+\s+\d+ (?P<name>.+?)\s+arg\s+\d+ mem\s+[\d.]+ GB "
                     r"tm\s+(?P<tm>[\d.]+)(?P<unit>us|ms|s)\s*/"
                     r".*?\(\s*(?P<gflops>[\d.]+) GFLOPS\s+(?P<gbs>[\d.]+)\|")


def model_config(case: str, layers: int, small: bool) -> Any:
    """The case's twinlm config at `layers` layers: its Hugging Face shape mapped by twinlm's own importer."""
    from benchmarks.finetune import QWEN05, SMALL_QWEN
    from benchmarks.serve import SMALL, SMOL
    from twinlm.core.config import ModelConfig
    from twinlm.hf.archs import ARCHS

    hf_arch, model_type, lora = CASES[case]
    shape = {"qwen-lora": SMALL_QWEN if small else QWEN05, "smol-full": SMALL if small else SMOL}[case]
    kw = ARCHS[hf_arch].config(dict(shape, architectures=[hf_arch], model_type=model_type))
    cfg = ModelConfig(**kw).replace(n_layer=layers)
    return cfg.replace(lora_rank=lora) if lora else cfg


def gemm_shapes(cfg: Any, tokens: int, only: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """(M, K, N) of each GEMM one training step runs per layer and once for the head: forward X @ W,
    backward dY @ W^T, and X^T @ dY where the weight itself trains (full fine-tuning, not LoRA)."""
    hs = cfg.head_size or cfg.d_model // cfg.n_head
    linears = [("qkv", cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * hs),
               ("o", cfg.n_head * hs, cfg.d_model),
               ("gate_up", cfg.d_model, 2 * cfg.d_ff), ("down", cfg.d_ff, cfg.d_model),
               ("head", cfg.d_model, cfg.vocab_size)]
    out = []
    for name, k, n in linears:
        if only and name not in only:
            continue
        per = 1 if name == "head" else cfg.n_layer
        out.append({"gemm": f"{name} fwd", "m": tokens, "k": k, "n": n, "count": per})
        out.append({"gemm": f"{name} dX", "m": tokens, "k": n, "n": k, "count": per})
        if not cfg.lora_rank:
            out.append({"gemm": f"{name} dW", "m": k, "k": tokens, "n": n, "count": per})
    return out


# ---- children ----------------------------------------------------------------------------------------


def child_step(backend: str, case: str, layers: int, small: bool, batch: int, seq: int, warmup: int,
               steps: int, profile: bool) -> None:
    import numpy as np

    from benchmarks.runner import make_trainer
    from twinlm.core.optim import AdamWConfig

    cfg = model_config(case, layers, small)
    trainer = make_trainer(backend, cfg, AdamWConfig())
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    times = []
    for it in range(warmup + steps):
        if profile and it == warmup:
            print("@@profiled-step-start", flush=True)
        t = time.perf_counter()
        trainer.step(x, y, it)
        times.append(time.perf_counter() - t)
        if profile and it == warmup:
            print("@@profiled-step-end", flush=True)
            break
    print("@@json " + json.dumps({"backend": backend, "times": times, "warmup": warmup}), flush=True)


def child_gemm(shapes: list[dict[str, Any]], repeats: int) -> None:
    import numpy as np

    from twinlm.backends import get_backend

    rng = np.random.default_rng(0)
    backends = {name: get_backend(name) for name in ("mlx", "tinygrad")}
    rows = []
    for s in shapes:
        m, k, n = s["m"], s["k"], s["n"]
        row = dict(s)
        b_np = rng.standard_normal((k, n), dtype=np.float32)
        for name, B in [*backends.items(), ("numpy", None)]:
            b = B.from_numpy(b_np) if B else b_np
            best = float("inf")
            for i in range(repeats + 1):  # the first: warm-up (tinygrad: compiles the kernel)
                a_np = rng.standard_normal((m, k), dtype=np.float32)  # fresh: tinygrad dedupes a repeat
                if B is None:
                    t = time.perf_counter()
                    a_np @ b
                else:
                    a = B.from_numpy(a_np)
                    B.sync(a)
                    t = time.perf_counter()
                    B.sync(a @ b)
                if i:
                    best = min(best, time.perf_counter() - t)
            row[f"{name}_gflops"] = round(2 * m * k * n / best / 1e9, 1)
        rows.append(row)
        print("@@gemm " + json.dumps(row), flush=True)


# ---- parent -------------------------------------------------------------------------------------------


def child(args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 600) -> str:
    env = {**os.environ, "DEV": os.environ.get("DEV", "CPU"), **(env_extra or {}),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.run([sys.executable, "-m", "benchmarks.finetune_profile", *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"child {args[:2]} exit {p.returncode}: {(p.stdout + p.stderr)[-1500:]}")
    return p.stdout


def kernel_classes(debug_out: str) -> dict[str, Any]:
    """Per-class time, count and FLOP/s of the kernels between the profiled step's markers."""
    text = _ANSI.sub("", debug_out)
    body = text.split("@@profiled-step-start", 1)[-1].split("@@profiled-step-end", 1)[0]
    classes: dict[str, dict[str, float]] = {}
    kernels = []
    for line in body.splitlines():
        m = _KERNEL.match(line.strip())
        if not m:
            continue
        tm = float(m["tm"]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m["unit"]]
        gflops, gbs, name = float(m["gflops"]), float(m["gbs"]), m["name"].strip()
        if name.startswith("copy"):
            kind = "copy"
        elif name.startswith("r"):
            kind = "matmul" if gflops > 0 and (gbs == 0 or gflops / gbs >= 4) else "reduce"
        else:
            kind = "elementwise"
        c = classes.setdefault(kind, {"kernels": 0, "seconds": 0.0, "gflop": 0.0})
        c["kernels"] += 1
        c["seconds"] += tm
        c["gflop"] += gflops * tm
        kernels.append((tm, kind, name, gflops))
    total = sum(c["seconds"] for c in classes.values())
    for c in classes.values():
        c["share"] = round(c["seconds"] / total, 3) if total else 0.0
        c["gflops"] = round(c["gflop"] / c["seconds"], 1) if c["seconds"] else 0.0
        c["seconds"], c["gflop"] = round(c["seconds"], 3), round(c["gflop"], 1)
    top = [{"seconds": round(t, 4), "kind": k, "name": n, "gflops": g}
           for t, k, n, g in sorted(kernels, reverse=True)[:8]]
    return {"total_s": round(total, 3), "classes": classes, "top": top}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="qwen-lora", choices=sorted(CASES))
    ap.add_argument("--layers", type=int, default=2, help="blocks kept (the real model: 24 qwen, 30 smol)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny shapes, batch 2 x 32 (seconds)")
    ap.add_argument("--parts", default="step,kernels,gemm")
    ap.add_argument("--gemm-repeats", type=int, default=2)
    ap.add_argument("--linears", default="", help="GEMMs of these linears only (qkv,o,gate_up,down,head)")
    ap.add_argument("--step-backends", default="mlx,tinygrad",
                    help="backends timed without DEBUG (the kernels part also times tinygrad's step)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per child process")
    ap.add_argument("--out", help="write the JSON record here")
    ap.add_argument("--child-step", help=argparse.SUPPRESS)
    ap.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-gemm", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.small:
        args.batch, args.seq = 2, 32
    if args.child_step:
        child_step(args.child_step, args.case, args.layers, args.small, args.batch, args.seq, args.warmup,
                   args.steps, args.child_profile)
        return
    if args.child_gemm:
        child_gemm(json.loads(args.child_gemm), args.gemm_repeats)
        return

    cfg = model_config(args.case, args.layers, args.small)
    common = ["--case", args.case, "--layers", str(args.layers), "--batch", str(args.batch), "--seq",
              str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps)] + (
        ["--small"] if args.small else [])
    parts = args.parts.split(",")
    rec: dict[str, Any] = {"case": args.case, "layers": args.layers, "batch": args.batch, "seq": args.seq,
                           "config": cfg.to_dict(), "load_start": os.getloadavg()[0]}
    print(f"{args.case}: {args.layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
          f"vocab {cfg.vocab_size}, "
          f"batch {args.batch} x {args.seq}; load average {rec['load_start']:.1f}")
    if "step" in parts:
        rec["step"] = {}
        for backend in args.step_backends.split(","):
            out = child(["--child-step", backend, *common], timeout=args.timeout)
            r = json.loads(out.split("@@json ", 1)[1].splitlines()[0])
            timed = r["times"][args.warmup:]
            rec["step"][backend] = {"first_s": round(r["times"][0], 2), "s_per_step": round(min(timed), 3)}
            print(f"step {backend:>8}: first (compile) {r['times'][0]:.1f} s, then {min(timed):.3f} s/step "
                  f"(best of {len(timed)})")
    if "kernels" in parts:
        out = child(["--child-step", "tinygrad", "--child-profile", *common], {"DEBUG": "2"}, args.timeout)
        if args.out:  # the raw DEBUG=2 lines, for any other grouping
            Path(args.out).with_suffix(".debug.txt").write_text(out)
        rec["kernels"] = k = kernel_classes(out)
        times = json.loads(out.split("@@json ", 1)[1].splitlines()[0])["times"]
        k["first_s"], k["profiled_step_s"] = round(times[0], 2), round(times[-1], 2)
        print(f"tinygrad, one step under DEBUG=2 (after {args.warmup} warm-up, the first {times[0]:.1f} s): "
              f"{times[-1]:.2f} s wall, {k['total_s']:.2f} s in kernels")
        for kind, c in sorted(k["classes"].items(), key=lambda kv: -kv[1]["seconds"]):
            print(f"  {kind:<12} {c['kernels']:>5} kernels {c['seconds']:>8.3f} s {100 * c['share']:>5.1f}% "
                  f"{c['gflops']:>7.1f} GFLOP/s")
        for t in k["top"]:
            print(f"    {t['seconds']:>8.4f} s {t['kind']:<11} {t['gflops']:>6.0f} GFLOP/s {t['name']}")
    if "gemm" in parts:
        shapes = gemm_shapes(cfg, args.batch * args.seq, tuple(n for n in args.linears.split(",") if n))
        out = child(["--child-gemm", json.dumps(shapes), "--gemm-repeats", str(args.gemm_repeats), *common],
                    timeout=args.timeout)
        rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("@@gemm ")]
        rec["gemm"] = rows
        print(f"{'GEMM (M x K x N)':<34} {'per step':>8} {'tinygrad':>9} {'MLX':>9} {'numpy':>9}  GFLOP/s")
        for r in rows:
            print(f"{r['gemm'] + ' ' + str(r['m']) + 'x' + str(r['k']) + 'x' + str(r['n']):<34} "
                  f"{r['count']:>8} {r['tinygrad_gflops']:>9} {r['mlx_gflops']:>9} {r['numpy_gflops']:>9}")
        for name in ("tinygrad", "mlx", "numpy"):  # the step's GEMM time at these rates
            rec[f"gemm_s_{name}"] = round(sum(2 * r["m"] * r["k"] * r["n"] * r["count"]
                                              / (r[f"{name}_gflops"] * 1e9) for r in rows), 3)
        print("the step's GEMMs at those rates: " + ", ".join(
            f"{n} {rec[f'gemm_s_{n}']:.2f} s" for n in ("tinygrad", "mlx", "numpy")))
    rec["load_end"] = os.getloadavg()[0]
    print(f"load average at the end {rec['load_end']:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=2) + "\n")


if __name__ == "__main__":
    main()
