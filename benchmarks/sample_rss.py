"""Where a sampling process's memory goes, stage by stage (issue #21's "peak RSS within 1.2x the weights").

    python -m benchmarks.sample_rss --path RUN                 # a run or checkpoint dir (import-hf, quantize)
    python -m benchmarks.sample_rss --path RUN --tokens 16 --json

Loads and samples as `twinlm sample` does (`run_dir.load_model`, `run_dir.to_backend`, `generate.generate`,
greedy, no stop token, an 8-token prompt of ids as `benchmarks.decode` feeds), on MLX. After each stage it
prints the process's VmRSS / VmHWM and their file-backed and anonymous parts (`/proc/self/status`), MLX's
active / peak / cache memory, and the stage's own peak: VmHWM is reset before each stage (writing 5 to
`/proc/self/clear_refs`), so "stage peak" is the highest resident set *during* that stage, not since start.
"weights" is the size of the safetensors files under the path (what `benchmarks.decode` divides by).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

MB = 2**20
PROMPT = [2, 3, 4, 5, 6, 7, 8, 9]


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Stages:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.resettable = reset_peak()
        self.overall = 0

    def mark(self, name: str) -> None:
        s = status()
        self.overall = max(self.overall, s["VmHWM"])
        row: dict[str, Any] = {"stage": name, "s": time.perf_counter() - self.t0, **s}
        import sys
        if "mlx.core" in sys.modules:
            import mlx.core as mx
            row |= {"mx_active": mx.get_active_memory(), "mx_peak": mx.get_peak_memory(),
                    "mx_cache": mx.get_cache_memory()}
        self.rows.append(row)
        self.resettable = reset_peak()

    def table(self, weights: int) -> str:
        lines = [f"weights (safetensors under the path): {weights / MB:.1f} MB; VmHWM reset per stage: "
                 f"{self.resettable}",
                 "| stage | s | VmRSS | stage peak (VmHWM) | RssAnon | RssFile | mx active | mx peak "
                 "| mx cache |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            mx_cols = (f"{r['mx_active'] / MB:.1f} | {r['mx_peak'] / MB:.1f} | {r['mx_cache'] / MB:.1f}"
                       if "mx_active" in r else " | | ")
            lines.append(f"| {r['stage']} | {r['s']:.2f} | {r['VmRSS'] / MB:.1f} | {r['VmHWM'] / MB:.1f} | "
                         f"{r['RssAnon'] / MB:.1f} | {r['RssFile'] / MB:.1f} | {mx_cols} |")
        lines.append(f"process peak (max of the stage peaks): {self.overall / MB:.1f} MB = "
                     f"{self.overall / weights:.3f}x the weights")
        return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True, type=Path, help="A run or checkpoint dir.")
    ap.add_argument("--tokens", type=int, default=16, help="Greedy tokens decoded (default 16).")
    ap.add_argument("--dtype", default=None, help="As `twinlm sample --dtype` (default: the run's own).")
    ap.add_argument("--json", action="store_true", help="Also print the rows as one JSON line.")
    args = ap.parse_args()
    st = Stages()
    st.mark("start (python, argparse)")
    import numpy as np

    st.mark("import numpy")
    from twinlm.backends import get_backend
    from twinlm.generate import generate
    from twinlm.run_dir import load_model, run_dtype, to_backend

    st.mark("import twinlm (generate, run_dir)")
    B = get_backend("mlx")
    st.mark("backend: import mlx, adapter, kernels")
    cfg, params_np, tok, meta = load_model(args.path)
    st.mark("load_model: checkpoint verified, mapped, tokenizer")
    dtype = run_dtype(meta, args.dtype)
    params = to_backend(B, params_np, dtype)
    st.mark(f"to_backend ({dtype})")
    del params_np
    st.mark("host views dropped")
    steps = generate(B, cfg, params, np.array([PROMPT], np.int32), args.tokens, temperature=0.0, stop=())
    next(steps)
    st.mark(f"prefill ({len(PROMPT)} tokens) + first token")
    n = 1
    for _ in steps:
        n += 1
        if n == 2:
            st.mark("second token")
    st.mark(f"decode to {n} tokens")
    weights = sum(p.stat().st_size for p in args.path.rglob("*.safetensors"))
    print(f"{args.path} ({cfg.arch}, {tok.kind} tokenizer, vocab {cfg.vocab_size})")
    print(st.table(weights))
    if args.json:
        print(json.dumps({"path": str(args.path), "weights": weights, "peak": st.overall, "rows": st.rows}))


if __name__ == "__main__":
    main()
