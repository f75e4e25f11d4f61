"""`twinlm plot DIR [DIR ...]`: train and validation loss curves of one or more runs in one PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from twinlm.backends import check_name
from twinlm.cli.common import BACKEND_METAVAR
from twinlm.core.errors import TwinlmError

METRICS_FILE = "metrics.jsonl"
X_KEYS = {"step": "iter", "tokens": "tokens"}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl. An unterminated last line (a write cut short by a kill)
    is skipped; any other malformed line is an error."""
    path = run_dir / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TwinlmError(f"no {METRICS_FILE} in {run_dir} (is it a run directory?)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TwinlmError(f"cannot read {path}: {e}") from None
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # no newline after it: a partial final write
                continue
            raise TwinlmError(f"{path}:{n} is not valid JSON") from None
        if not isinstance(rec, dict):
            raise TwinlmError(f"{path}:{n} is not a JSON object")
        records.append(rec)
    if not records:
        raise TwinlmError(f"{path} has no metrics yet")
    return records


def curve(records: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) of the records that have both keys with finite numbers."""
    xs, ys = [], []
    for r in records:
        x, y = r.get(x_key), r.get(y_key)
        if _finite(x) and _finite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def run_label(run_dir: Path, records: list[dict[str, Any]]) -> str:
    name = run_dir.resolve().name or str(run_dir)
    backend = next((r["backend"] for r in records if isinstance(r.get("backend"), str)), None)
    return f"{name} ({backend})" if backend else name


def plot_runs(run_dirs: list[Path], out: Path, x: str = "step") -> None:
    """Write a PNG: train loss (solid) and val loss (dashed, dots) per run, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    x_key = X_KEYS[x]
    runs = []  # everything is read and checked before a figure exists
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        train, val = curve(records, x_key, "loss"), curve(records, x_key, "val_loss")
        if not train[0] and not val[0]:
            raise TwinlmError(f"{run_dir / METRICS_FILE} has no loss or val_loss recorded against {x_key!r}")
        runs.append((run_label(run_dir, records), train, val))
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for i, (label, train, val) in enumerate(runs):
        color = f"C{i % 10}"
        if train[0]:
            ax.plot(*train, color=color, lw=1.2, alpha=0.85, label=f"{label} train")
        if val[0]:
            ax.plot(*val, color=color, lw=1.6, ls="--", marker="o", ms=3.5, label=f"{label} val")
    ax.set_xlabel("tokens seen" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"twinlm: loss over {len(runs)} run{'s' if len(runs) > 1 else ''}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


@click.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--out", default="loss.png", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@click.option("--x", "x_axis", type=click.Choice(list(X_KEYS)), default="step", show_default=True,
              help="Horizontal axis: optimizer step or tokens seen.")
@click.option("--backend", "backend_name", default=None, metavar=BACKEND_METAVAR,
              help="Accepted like on every command, and unused: plotting runs no model.")
def command(run_dirs: tuple[Path, ...], out: Path, x_axis: str, backend_name: str | None) -> None:
    """Plot train/val loss of one or more runs (each RUN_DIR's metrics.jsonl) into one PNG."""
    if backend_name is not None:
        check_name(backend_name)  # unused, but a typo is still an error
    plot_runs(list(run_dirs), out, x_axis)
    click.echo(f"wrote {out}")
