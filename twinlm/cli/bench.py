"""`twinlm bench`: time the real training step per backend against a PyTorch eager reference.

The harness lives in the repository's `benchmarks/` folder (it is not part of the installed
package), so this command works from a source checkout: `pip install -e .[bench]`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import click

from twinlm.cli.common import chosen_backend_name, device_option
from twinlm.core.errors import TwinlmError


def _harness() -> ModuleType:
    root = Path(__file__).resolve().parents[2]
    if (root / "benchmarks" / "step.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module("benchmarks.step")
    except ImportError as e:
        raise TwinlmError("twinlm bench needs the benchmarks/ folder of a source checkout "
                          f"(pip install -e '.[bench]'): {e}") from e


@click.command("bench")
@device_option  # reaches benchmarks.step through $TWINLM_DEVICE
@click.option("--backend", "backends", default=None,
              help="mlx | tinygrad | torch | all, or a comma-separated list (default: the group's --backend, "
                   "$TWINLM_BACKEND, else all).")
@click.option("--preset", default="baby", show_default=True, help="Model size (tiny, small, baby, medium).")
@click.option("--batch", type=int, default=None, help="Batch size (default: nanoGPT's for the preset).")
@click.option("--iters", type=int, default=30, show_default=True, help="Timed iterations after warm-up.")
@click.option("--warmup-iters", type=int, default=3, show_default=True, help="Untimed first steps.")
@click.option("--max-seconds", type=float, default=60.0, show_default=True,
              help="Stop timing a backend after this long (at least 3 iterations).")
@click.option("--threads", type=int, default=None, help="Same thread count for every backend.")
@click.option("--ranks", default="1", show_default=True,
              help="Data-parallel ranks to time, comma-separated (e.g. 1,2): MLX processes, tinygrad "
                   "devices.")
@click.option("--beam", type=int, default=0, show_default=True,
              help="tinygrad: BEAM search width (its cost is reported as warm-up).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the JSON records here.")
@click.option("--compare", "compare", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Print a table of saved JSON records instead of running (repeatable).")
def command(backends: str | None, preset: str, batch: int | None, iters: int, warmup_iters: int,
            max_seconds: float, threads: int | None, ranks: str, beam: int, out: str | None,
            compare: tuple[str, ...]) -> None:
    """Time the training step per backend, side by side with PyTorch eager; print ratios and MFU."""
    backends = chosen_backend_name(backends) or "all"
    args = ["--compare", *compare] if compare else [
        "--backend", backends, "--preset", preset, "--iters", str(iters), "--warmup-iters", str(warmup_iters),
        "--max-seconds", str(max_seconds), *(["--batch", str(batch)] if batch else []),
        *(["--threads", str(threads)] if threads else []), *(["--out", out] if out else []),
        "--ranks", ranks, "--beam", str(beam)]
    try:
        _harness().main(args)
    except SystemExit as e:  # argparse reports bad input by exiting
        if e.code:
            raise TwinlmError(f"bench: invalid arguments {args}") from e
