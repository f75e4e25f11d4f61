"""Host-to-device dropout traffic per training step: float32 masks (before) against boolean masks plus their
0-d scales (now, `core.dropout.keep_masks` expanded in the step), with the host time to draw and hand each
set to a backend (`from_numpy` plus a sync, which on a GPU is the copy).

    python -m benchmarks.dropout_traffic --preset medium --batch 64 --dropout 0.2 --backend mlx

Prints one JSON row: bytes per step each way, the ratio, and the median host milliseconds of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.step import bench_config
from twinlm.core import dropout


def measure(preset: str, batch: int, p: float, backend: str | None, repeats: int = 3) -> dict[str, Any]:
    cfg = bench_config(preset).replace(dropout=p)
    t = cfg.block_size
    floats = dropout.masks(cfg, batch, t, 0, 0)
    keep = dropout.keep_masks(cfg, batch, t, 0, 0)
    assert all(np.array_equal(m.astype(np.float32) * dropout.scales(cfg)[dropout.SCALE], floats[k])
               for k, m in keep.items())  # the same draws: only the encoding changed
    before = sum(m.nbytes for m in floats.values())
    after = sum(m.nbytes for m in keep.values()) + sum(v.nbytes for v in dropout.scales(cfg).values())
    row: dict[str, Any] = {"preset": preset, "batch": batch, "block": t, "dropout": p, "sites": len(keep),
                           "float32_bytes_per_step": before, "bool_bytes_per_step": after,
                           "saved_bytes_per_step": before - after, "ratio": before / after}
    if backend:
        from twinlm.backends import get_backend

        B = get_backend(backend)

        def host_ms(draw: Any) -> float:
            times = []
            for step in range(repeats):
                t0 = time.perf_counter()
                sent = {k: B.from_numpy(m) for k, m in draw(step).items()}
                B.sync(*sent.values())
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)

        row["backend"] = B.name
        row["device"] = B.device_info()["device"]
        row["float32_host_ms"] = host_ms(lambda s: dropout.masks(cfg, batch, t, 0, s))
        row["bool_host_ms"] = host_ms(lambda s: dropout.keep_masks(cfg, batch, t, 0, s))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--backend", default=None, help="also time drawing and handing over (mlx, tinygrad)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(measure(args.preset, args.batch, args.dropout, args.backend, args.repeats), indent=2))


if __name__ == "__main__":
    main()
