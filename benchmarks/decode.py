"""Decoding speed and memory in every precision: twinlm (MLX, tinygrad) beside mlx-lm on the same folder.

    python -m benchmarks.decode --small                                  # seconds: proves the script runs
    python -m benchmarks.decode --shapes smollm2-135m --out benchmarks/results/decode.json
    python -m benchmarks.decode --shapes llama3.2-1b --precisions float32,q4   # 4.9 GB: a quiet machine

For each shape (`benchmarks.memory.SHAPES`: the real config's fields, random weights made by transformers) a
float32 and a bfloat16 Hugging Face folder are built once. Each precision is then prepared for each tool:
- twinlm: `import-hf` of the folder of that dtype (float32, bfloat16); `twinlm quantize --bits 8|4
  --group-size 64` of the float32 import (q8, q4);
- mlx-lm: the folder itself (float32, bfloat16); `mlx_lm convert -q --q-bits 8|4 --q-group-size 64` of the
  float32 folder (q8, q4).
Each (tool, precision) decodes in its own process: load, prefill a short prompt, then --tokens greedy tokens
with no stop token (twinlm's `generate.generate(..., stop=())`, mlx-lm's `generate_step`). Decode tokens/s =
(tokens - 1) / (time of the last token - time of the first): loading and prefill are left out. Peak RSS is
the process's own VmHWM after decoding; "weights" is the size of the files the tool loaded. mlx-lm runs with
the system OpenBLAS preloaded (the BLAS twinlm's MLX loads; its best case on Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.finetune import lscpu_model
from benchmarks.memory import SHAPES
from benchmarks.serve import openblas

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("float32", "bfloat16", "q8", "q4")
TOOLS = ("twinlm-mlx", "mlx-lm", "twinlm-tinygrad")
GROUP = 64
PROMPT = [2, 3, 4, 5, 6, 7, 8, 9]


def child_env(tool: str) -> dict[str, str]:
    env = {**os.environ, "DEV": os.environ.get("DEV", "CPU"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("LD_PRELOAD", None)
    if tool == "mlx-lm" and openblas():
        env["LD_PRELOAD"] = openblas()
    return env


def sh(cmd: list[str], tool: str = "", timeout: float = 3600) -> str:
    proc = subprocess.run(cmd, env=child_env(tool), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc.stdout


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def prepare(tool: str, precision: str, folders: dict[str, Path], work: Path) -> Path:
    """The model path `tool` loads for `precision` (built once, kept in `work`)."""
    twin = "twinlm" if tool.startswith("twinlm") else tool
    out = work / f"{twin}-{precision}"
    if out.exists():
        return out
    src = folders["bfloat16" if precision == "bfloat16" else "float32"]
    if twin == "mlx-lm":
        if not precision.startswith("q"):
            return src
        sh([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out), "-q",
            "--q-bits", precision[1:], "--q-group-size", str(GROUP)], "mlx-lm")
        return out
    if not precision.startswith("q"):
        sh([sys.executable, "-m", "twinlm.cli.main", "import-hf", str(src), "--out", str(out)])
        return out
    base = prepare(tool, "float32", folders, work)
    sh([sys.executable, "-m", "twinlm.cli.main", "quantize", str(base), "--bits", precision[1:],
        "--group-size", str(GROUP), "--out", str(out)])
    return out


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(tool: str, path: str, tokens: int) -> dict[str, Any]:
    """Load, prefill PROMPT, decode `tokens` greedy tokens; the time of each token."""
    times: list[float] = []
    if tool == "mlx-lm":
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.generate import generate_step

        model, _ = load(path)
        steps = generate_step(mx.array(PROMPT), model, max_tokens=tokens)
        for _, _ in zip(range(tokens), steps, strict=False):
            times.append(time.perf_counter())
    else:
        import numpy as np

        import twinlm
        from twinlm.generate import generate

        m = twinlm.load(path, backend=tool.split("-")[1])
        prompt = np.array([PROMPT], np.int32)
        for _ in generate(m.backend, m.config, m.params, prompt, tokens, temperature=0.0, stop=()):
            times.append(time.perf_counter())
    if len(times) != tokens:
        raise RuntimeError(f"{tool} produced {len(times)} of {tokens} tokens")
    return {"tok_s": (tokens - 1) / (times[-1] - times[0]), "peak_rss": vm_hwm()}


def measure(tool: str, path: Path, tokens: int, timeout: float) -> dict[str, Any]:
    out = sh([sys.executable, "-m", "benchmarks.decode", "--child", tool, "--path", str(path), "--tokens",
              str(tokens)], tool, timeout)
    return json.loads(out.strip().splitlines()[-1])


def build(shape: str, folder: Path, dtype: str) -> None:
    """In a child, as `benchmarks.memory` builds: this process never imports torch."""
    sh([sys.executable, "-m", "benchmarks.memory", "--shape", shape, "--build", str(folder),
        "--dtype", dtype])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="The tiny shape, 16 tokens: seconds.")
    ap.add_argument("--shapes", default="smollm2-135m", help=f"Comma-separated: {', '.join(sorted(SHAPES))}.")
    ap.add_argument("--precisions", default=",".join(PRECISIONS),
                    help="Comma-separated: float32, bfloat16, q8, q4.")
    ap.add_argument("--tools", default="twinlm-mlx,mlx-lm", help=f"Comma-separated: {', '.join(TOOLS)}.")
    ap.add_argument("--tokens", type=int, default=None, help="Tokens decoded (default 64; --small 16).")
    ap.add_argument("--timeout", type=float, default=3600, help="Seconds allowed to each subprocess.")
    ap.add_argument("--work", type=Path, default=None, help="Keep the folders here (default: a temp dir).")
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    tokens = args.tokens or (16 if args.small else 64)
    if args.child:
        print(json.dumps(child(args.child, args.path, tokens)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="twinlm-decode-"))
    shapes = ["tiny"] if args.small else args.shapes.split(",")
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        folders = {}
        for dtype in ("float32", "bfloat16"):
            folders[dtype] = work / shape / f"hf-{dtype}"
            if not (folders[dtype] / "config.json").exists():
                build(shape, folders[dtype], dtype)
        for precision in args.precisions.split(","):
            for tool in args.tools.split(","):
                row: dict[str, Any] = dict(shape=shape, precision=precision, tool=tool)
                try:
                    path = prepare(tool, precision, folders, work / shape)
                    row |= measure(tool, path, tokens, args.timeout)
                    row["weights"] = folder_bytes(path)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    row["error"] = str(e).splitlines()[0][:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
    cpu = lscpu_model()
    print(f"\ndecode, {tokens} greedy tokens after an {len(PROMPT)}-token prompt; CPU {cpu}")
    print("| shape | precision | tool | decode tok/s | vs mlx-lm | vs own float32 | peak RSS MB | "
          "weights MB | RSS / weights |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['precision']} | {r['tool']} | error: {r['error'][:80]} | | | | | |")
            continue
        peer = next((p for p in rows if p["shape"] == r["shape"] and p["precision"] == r["precision"]
                     and p["tool"] == "mlx-lm" and "tok_s" in p), None)
        own = next((p for p in rows if p["shape"] == r["shape"] and p["precision"] == "float32"
                    and p["tool"] == r["tool"] and "tok_s" in p), None)
        vs_peer = f"{r['tok_s'] / peer['tok_s']:.2f}x" if peer and r["tool"] != "mlx-lm" else ""
        vs_own = f"{r['tok_s'] / own['tok_s']:.2f}x" if own and r["precision"] != "float32" else ""
        mb, weights = r["peak_rss"] / 2**20, r["weights"] / 2**20
        print(f"| {r['shape']} | {r['precision']} | {r['tool']} | {r['tok_s']:.2f} | {vs_peer} | {vs_own} | "
              f"{mb:.0f} | {weights:.0f} | {mb / weights:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(dict(cpu=cpu, tokens=tokens, rows=rows), indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
