"""The few-row GEMV against the memory's bandwidth: GB/s of weight read by `K.linear_lowp` (x @ W, W (K, N))
and `K.matmul_t_lowp` (the tied head x @ W.T, W (V, C)) at --rows rows, beside the roof measured in the same
run by a plain streaming read (numpy `a.sum()` over a buffer far larger than the caches, 1 thread and 2).

    python -m benchmarks.gemv_roof --small                    # seconds: proves the script runs
    python -m benchmarks.gemv_roof                            # SmolLM2-135M's layers + head, a Llama-1B layer
    python -m benchmarks.gemv_roof --compare /work/main .     # two trees' kernels, rounds interleaved

Each weight is held in enough copies (--min-mb in all) that a round reads them from memory, not from the
caches, as a decoding step does (the 30 layers' 425 MB); one round is every copy's call evaluated together
(`mx.eval` of the list, so MLX's per-op overhead is paid as in the model's step), the best of --repeat rounds
is reported, in wall time and in the process's CPU time (GB/s per CPU-second: on a shared machine, where
the wall time includes waiting for a core, the steadier measure of the kernel; with --threads 1 it is the
kernel's own thread). --compare runs this file once per tree per round (PYTHONPATH=TREE: that tree's twinlm
and its built kernels), alternating the trees, and prints each shape's best per tree and their ratios.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

# (name, kind, K, N, rows of w): "linear" is x (rows, K) @ W (K, N); "head" is x (rows, C) @ W.T, W (V, C).
SHAPES = (
    ("smol q / proj 576x576", "linear", 576, 576),
    ("smol k, v 576x192", "linear", 576, 192),
    ("smol gate, up 576x1536", "linear", 576, 1536),
    ("smol down 1536x576", "linear", 1536, 576),
    ("smol qkv fused 576x960", "linear", 576, 960),
    ("smol gate+up fused 576x3072", "linear", 576, 3072),
    ("smol tied head 49152x576 (x W^T)", "head", 49152, 576),
    ("llama-1b gate+up 2048x16384", "linear", 2048, 16384),
)
SMALL = (("tiny 64x96", "linear", 64, 96), ("tiny head 300x64", "head", 300, 64))


def roof(mb: int, repeat: int) -> dict[str, float]:
    """GB/s of a plain streaming read: numpy's sum of a float32 buffer of `mb` MB, on 1 thread and 2 (numpy
    lets go of the GIL in the reduction), best of `repeat`."""
    a = np.ones(mb * (1 << 20) // 4, np.float32)
    halves = np.array_split(a, 2)
    a.sum()
    best1 = best2 = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a.sum()
        best1 = min(best1, time.perf_counter() - t)
        ths = [threading.Thread(target=h.sum) for h in halves]
        t = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        best2 = min(best2, time.perf_counter() - t)
    return {"roof_1t_gbs": a.nbytes / best1 / 1e9, "roof_2t_gbs": a.nbytes / best2 / 1e9}


def measure(shapes: tuple, rows: int, dtypes: list[str], min_mb: float, repeat: int,
            threads: int = 0) -> list[dict[str, Any]]:
    from twinlm.backends import kernels
    from twinlm.backends import mlx as _mlx_backend  # noqa: F401  (the system OpenBLAS before mlx.core)

    mx = importlib.import_module("mlx.core")  # after the line above, which binds MLX to the system BLAS
    K = kernels.load()
    if K is None or not hasattr(K, "linear_lowp"):
        raise SystemExit(f"error: the kernels have no linear_lowp ({kernels.status().reason})")
    K.set_threads(threads)
    rng = np.random.default_rng(0)
    out = []
    for name, kind, k, n in shapes:
        for dtype in dtypes:
            dt = getattr(mx, dtype)
            item = np.dtype(np.float32).itemsize if dtype == "float32" else 2
            nbytes = k * n * item
            copies = max(1, int(np.ceil(min_mb * 1e6 / nbytes)))
            ws = [mx.array(rng.standard_normal((k, n), dtype=np.float32)).astype(dt) for _ in range(copies)]
            cols = n if kind == "head" else k  # x's width: the head's C, the layer's K
            x = mx.array(rng.standard_normal((rows, cols), dtype=np.float32))
            mx.eval(x, *ws)
            call = K.matmul_t_lowp if kind == "head" else (lambda x, w: K.linear_lowp(x, w, None))
            mx.eval([call(x, w) for w in ws])  # warm-up: the pool, the page faults of the outputs
            best = cpu = float("inf")
            for _ in range(repeat):
                t, c = time.perf_counter(), time.process_time()
                mx.eval([call(x, w) for w in ws])
                best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
            out.append({"shape": name, "dtype": dtype, "rows": rows, "copies": copies, "threads": K.threads(),
                        "ms_per_call": 1e3 * best / copies, "gbs": copies * nbytes / best / 1e9,
                        "cpu_gbs": copies * nbytes / max(cpu, 1e-9) / 1e9})
            del ws
    return out


def run_tree(tree: str, args: argparse.Namespace) -> dict[str, Any]:
    """This file in a child process with `tree` first on the path (its twinlm, its built kernels)."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = [sys.executable, os.path.abspath(__file__), "--json", "--rows", str(args.rows), "--dtypes",
           *args.dtypes, "--min-mb", str(args.min_mb), "--repeat", str(args.repeat), "--roof-mb",
           str(args.roof_mb), "--threads", str(args.threads)] + (["--small"] if args.small else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"error: {tree}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes and buffers: proves the script runs")
    p.add_argument("--rows", type=int, default=8, help="rows of x (the engine's batched streams)")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--min-mb", type=float, default=128.0, help="MB of weight copies per shape (> the caches)")
    p.add_argument("--repeat", type=int, default=5, help="rounds per shape (the best is reported)")
    p.add_argument("--roof-mb", type=int, default=512, help="MB the streaming read sums")
    p.add_argument("--compare", nargs="+", metavar="TREE", help="checkouts to compare (PYTHONPATH=TREE each)")
    p.add_argument("--rounds", type=int, default=2, help="--compare: runs per tree, alternating")
    p.add_argument("--threads", type=int, default=0, help="the kernels' threads (0: their default)")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args = p.parse_args(argv)
    if args.small:
        args.min_mb, args.roof_mb, args.repeat = min(args.min_mb, 2.0), min(args.roof_mb, 16), 2
    if args.compare:
        return compare(args)
    shapes = SMALL if args.small else SHAPES
    res = {"roof": roof(args.roof_mb, args.repeat),
           "rows": measure(shapes, args.rows, args.dtypes, args.min_mb, args.repeat, args.threads)}
    if args.json:
        print(json.dumps(res))
        return
    r = res["roof"]
    print(f"streaming read (numpy sum of {args.roof_mb} MB): {r['roof_1t_gbs']:.1f} GB/s 1 thread, "
          f"{r['roof_2t_gbs']:.1f} GB/s 2 threads")
    print(f"kernel threads: {res['rows'][0]['threads']}")
    print(f"{'weight':<34} {'dtype':<9} {'rows':>4} {'ms/call':>9} {'GB/s':>6} {'of 2t roof':>10} "
          f"{'GB/s CPU':>9}")
    for row in res["rows"]:
        print(f"{row['shape']:<34} {row['dtype']:<9} {row['rows']:>4} {row['ms_per_call']:>9.3f} "
              f"{row['gbs']:>6.1f} {row['gbs'] / r['roof_2t_gbs']:>9.0%} {row['cpu_gbs']:>9.1f}")


def compare(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in args.compare}
    for _ in range(args.rounds):
        for tree in args.compare:
            runs[tree].append(run_tree(tree, args))
    for n in ("1", "2"):
        roofs = [r["roof"][f"roof_{n}t_gbs"] for rs in runs.values() for r in rs]
        print(f"streaming read, {n} thread(s): {min(roofs):.1f}-{max(roofs):.1f} GB/s over the runs")
    names = [(row["shape"], row["dtype"]) for row in runs[args.compare[0]][0]["rows"]]
    head = f"{'weight':<34} {'dtype':<9}" + "".join(f" {os.path.basename(os.path.abspath(t))[:19]:>19}"
                                                    for t in args.compare) + "   first/last time"
    print(head)
    print(" " * 44 + " best of the runs per tree: ms per call, GB/s (wall), GB/s per CPU-second")
    for i, (shape, dtype) in enumerate(names):
        best = [min((r["rows"][i] for r in runs[t]), key=lambda row: row["ms_per_call"])
                for t in args.compare]
        cpu = [max(r["rows"][i]["cpu_gbs"] for r in runs[t]) for t in args.compare]
        cells = "".join(f" {b['ms_per_call']:>7.3f} {b['gbs']:>5.1f} {c:>5.1f}"
                        for b, c in zip(best, cpu, strict=True))
        speed = best[0]["ms_per_call"] / best[-1]["ms_per_call"]
        print(f"{shape:<34} {dtype:<9}{cells}   {speed:.2f}x wall, {cpu[-1] / cpu[0]:.2f}x CPU")
    if args.json:
        print(json.dumps({t: rs for t, rs in runs.items()}))


if __name__ == "__main__":
    main()
