"""`twinlm eval`: loss and perplexity of a saved run on a text file (default: the run's validation split)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from twinlm.cli.common import backend, backend_option, dtype_option
from twinlm.core import task as sort_task
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.data import Dataset, encode_whole, prepare
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import Tokenizer
from twinlm.run_meta import RunMeta
from twinlm.tasks import run_window
from twinlm.tasks.lm import ACCURACY_EXAMPLES, sort_accuracy
from twinlm.trainer import TrainConfig, classify_examples, eval_step, evaluate_loss, evaluate_task


@click.command("eval")
@click.argument("run_dir", type=click.Path())
@backend_option
@dtype_option
@click.option("--data", default=None, help="Text file to score (default: the run's validation split).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-windows", type=int, default=None, help="Score at most this many windows.")
@click.option("--block-size", "window", type=int, default=None,
              help="Window in tokens (default: the run's training window; for an imported model its context "
                   "up to 2048; never more than the text holds).")
def command(run_dir: str, backend_name: str | None, dtype: str | None, data: str | None, batch_size: int,
            max_windows: int | None, window: int | None) -> None:
    """Loss and perplexity of the model in RUN_DIR; on the built-in task, also its exact-match accuracy."""
    from twinlm.run_dir import load_model, run_dtype, to_backend

    if batch_size <= 0:
        raise TwinlmError(f"batch-size must be a positive integer, got {batch_size}")
    if window is not None and window < 2:
        raise TwinlmError(f"--block-size must be at least 2, got {window}")
    if not Path(run_dir).exists():
        raise TwinlmError(f"run directory not found: {run_dir}")
    cfg, np_params, tok, meta = load_model(run_dir)
    B = backend(backend_name)
    params = to_backend(B, np_params, run_dtype(meta, dtype))
    if window is not None and window > cfg.block_size:
        raise TwinlmError(f"--block-size {window}: this model reads at most {cfg.block_size} tokens")
    window = window or run_window(cfg, meta.train)
    if cfg.n_classes or cfg.kind == "encoder":
        _evaluate_task(B, cfg, params, tok, meta, data, batch_size, max_windows, window)
        return
    ds = _scored_text(data, tok, meta.train.get("data"))
    # A text shorter than the window is scored as one window of all of it (a long-context model on a
    # short validation split), not refused.
    window = max(1, min(window, len(ds.val) - 1))
    loss, n = evaluate_loss(B, cfg, params, ds.val, batch_size, max_windows, window)
    click.echo(f"{ds.source}: {n:,} tokens scored in windows of {window} on {B.name}")
    click.echo(f"loss {loss:.4f}  perplexity {math.exp(min(loss, 700.0)):.3f}")
    if meta.task == sort_task.NAME and data is None:
        acc, shown = sort_accuracy(B, cfg, params, tok, ACCURACY_EXAMPLES, samples=5)
        click.echo(f"accuracy {acc:.1%} exact match on {ACCURACY_EXAMPLES} held-out examples")
        for line in shown:
            click.echo(f"  {line}")


def _evaluate_task(B: Backend, cfg: ModelConfig, params: dict[str, Array], tok: Tokenizer, meta: RunMeta,
                   data: str | None, batch_size: int, max_windows: int | None, window: int) -> None:
    """Classifiers: accuracy and the confusion matrix; masked LMs: masked-token accuracy."""
    from twinlm.cli.train import confusion_table
    from twinlm.tasks.classify import Classify, read_examples
    from twinlm.tasks.mlm import MaskedLM

    known = TrainConfig().to_dict()
    saved = TrainConfig(**{k: v for k, v in meta.train.items() if k in known})
    if cfg.n_classes:
        examples = read_examples(data) if data is not None else classify_examples(saved)[1]
        source = data or f"{saved.data or 'the built-in task'} (validation split)"
        task = Classify([], examples, meta.labels, tok, cfg, batch_size, saved.seed, window)
    else:
        ds = _scored_text(data, tok, saved.data)
        source = ds.source
        n_batches = max(1, -(-max_windows // batch_size)) if max_windows else saved.eval_iters
        task = MaskedLM(ds, batch_size, window, saved.seed, n_batches)
    metrics = evaluate_task(B, cfg, task, params, eval_step(B, cfg, task))
    click.echo(f"{source}: evaluated on {B.name}")
    click.echo(f"loss {metrics['val_loss']:.4f}")
    if "masked_accuracy" in metrics:
        click.echo(f"masked-token accuracy {metrics['masked_accuracy']:.1%}")
    if "confusion" in metrics:
        click.echo(f"accuracy {metrics['accuracy']:.1%} on {metrics['n']} examples")
        click.echo(confusion_table(metrics["confusion"], metrics["labels"]))


def _scored_text(data: str | None, tok: Tokenizer, train_data: str | None) -> Dataset:
    """The text to score as the dataset's `val`: the whole --data file, else the run's validation split."""
    if data is None:
        ds = prepare(train_data, tok=tok)
        ds.source = f"{ds.source} (validation split)"
        return ds
    from twinlm.prepare_progress import prepare_display

    try:  # streamed into the token cache, like a training corpus: memory does not grow with the file
        return encode_whole(data, tok, progress=prepare_display())
    except TwinlmError as e:
        if "does not fit the given tokenizer" not in str(e):
            raise
        raise TwinlmError(str(e).replace("the given tokenizer", "this model's tokenizer")) from None
