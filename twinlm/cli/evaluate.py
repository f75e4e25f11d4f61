"""`twinlm eval`: loss and perplexity of a saved run on a text file (default: the run's validation split)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from twinlm.cli.common import backend, backend_option
from twinlm.core.data import prepare, read_corpus
from twinlm.core.errors import TwinlmError
from twinlm.train import ACCURACY_EXAMPLES, evaluate_loss, task_accuracy


@click.command("eval")
@click.argument("run_dir", type=click.Path())
@backend_option
@click.option("--data", default=None, help="Text file to score (default: the run's validation split).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-windows", type=int, default=None, help="Score at most this many block-size windows.")
def command(run_dir: str, backend_name: str | None, data: str | None, batch_size: int,
            max_windows: int | None) -> None:
    """Loss and perplexity of the model in RUN_DIR; on the built-in task, also its exact-match accuracy."""
    from twinlm.generate import load_model

    if batch_size <= 0:
        raise TwinlmError(f"batch-size must be a positive integer, got {batch_size}")
    if not Path(run_dir).exists():
        raise TwinlmError(f"run directory not found: {run_dir}")
    cfg, np_params, tok, meta = load_model(run_dir)
    B = backend(backend_name)
    params = {k: B.from_numpy(v) for k, v in np_params.items()}
    if data is not None:
        text, source = read_corpus(data)
        try:
            tokens = tok.encode(text)
        except TwinlmError as e:
            raise TwinlmError(f"{source} does not fit this model's tokenizer: {e}") from None
    else:
        train_data = (meta.get("train") or {}).get("data")
        ds = prepare(train_data, tok=tok)
        tokens, source = ds.val, f"{ds.source} (validation split)"
    loss, n = evaluate_loss(B, cfg, params, tokens, batch_size, max_windows)
    click.echo(f"{source}: {n:,} tokens scored on {B.name}")
    click.echo(f"loss {loss:.4f}  perplexity {math.exp(min(loss, 700.0)):.3f}")
    if meta.get("task") and data is None:
        acc, shown = task_accuracy(B, cfg, params, tok, ACCURACY_EXAMPLES, samples=5)
        click.echo(f"accuracy {acc:.1%} exact match on {ACCURACY_EXAMPLES} held-out examples")
        for line in shown:
            click.echo(f"  {line}")
