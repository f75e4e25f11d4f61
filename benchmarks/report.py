"""Benchmark records: what machine and software produced a number, summary statistics, and tables.

Stdlib only, so the record and table code is testable without numpy or any framework.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PACKAGES = ("numpy", "mlx", "tinygrad", "torch")


def hardware() -> dict[str, Any]:
    """CPU model, core count and the SIMD flags that decide kernel speed."""
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(),
                            "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and "cpu" not in info:
            info["cpu"] = value.strip()
        elif key == "flags" and "simd" not in info:
            flags = set(value.split())
            info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return info


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ru_maxrss is KiB on Linux but bytes on macOS."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """Median and spread of per-iteration times, in milliseconds."""
    ms = sorted(t * 1e3 for t in times_s)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median": statistics.median(ms), "min": ms[0], "max": ms[-1], "p25": q[0], "p75": q[2],
            "n": len(ms)}


def save(record: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def load(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        records.extend(data if isinstance(data, list) else [data])
    return records


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(records: Sequence[dict[str, Any]], reference: str = "torch") -> str:
    """A text table, one row per record; `vs ref` is tokens/s over the `reference` backend's record of
    the same preset (the reference must come from the same run for the ratio to mean anything)."""
    ref_tps = {r["preset"]: r["tokens_per_s"] for r in records if r["backend"] == reference}
    one_rank = {(r["backend"], r["preset"]): r["tokens_per_s"] for r in records if r.get("ranks", 1) == 1}
    header = ("backend", "preset", "ranks", "ms/iter", "spread (p25-p75)", "CPU ms/iter", "tok/s",
              f"vs {reference}", "scaling", "MFU", "warm-up s", "peak RSS MB")
    rows = [header]
    for r in records:
        ms, n = r["ms_per_iter"], r.get("ranks", 1)
        ref, base = ref_tps.get(r["preset"]), one_rank.get((r["backend"], r["preset"]))
        # scaling efficiency: tokens/s over n x the same backend's one-rank tokens/s (same run)
        scaling = r["tokens_per_s"] / (n * base) if base and n > 1 else None
        rows.append((
            r["backend"], r["preset"], str(n), _fmt(ms["median"], ".1f"), f"{ms['p25']:.1f}-{ms['p75']:.1f}",
            _fmt(r.get("cpu_ms_per_iter", {}).get("median"), ".1f"),
            _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["tokens_per_s"] / ref if ref else None, ".2f") + "x",
            _fmt(100 * scaling if scaling else None, ".0f") + ("%" if scaling else ""),
            _fmt(100 * r["mfu"], ".1f") + "%", _fmt(r["warmup_s"], ".1f"), _fmt(r["peak_rss_mb"], ".0f"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
