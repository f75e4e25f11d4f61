"""`twinlm train`: train a model; with no arguments, the built-in sorting task to a stated accuracy."""

from __future__ import annotations

import math
import signal
import sys
from typing import Any

import click

from twinlm.cli.common import backend, backend_option
from twinlm.core import task
from twinlm.core.config import preset_training
from twinlm.core.params import param_shapes
from twinlm.train import ACCURACY_EXAMPLES as ACCURACY_N
from twinlm.train import TARGET_ACCURACY, Progress, TrainConfig, Trainer, load_toml

INTERRUPTED_EXIT = 130


@click.command("train")
@backend_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of settings (option names as keys); flags override it.")
@click.option("--data", default=None, help="Text file or folder of .txt files (default: the built-in task).")
@click.option("--tokenizer", type=click.Choice(["char", "byte", "bpe"]), default=None, help="Default: char.")
@click.option("--errors", type=click.Choice(["strict", "replace"]), default=None,
              help="Invalid UTF-8 in the corpus: refuse it (strict, the default) or substitute U+FFFD.")
@click.option("--vocab-size", type=int, default=None, help="BPE vocabulary size.")
@click.option("--out", default=None, help="Run directory (default: runs/<data name>).")
@click.option("--resume", default=None, metavar="DIR", help="Continue the run saved in DIR.")
@click.option("--preset", default=None,
              help="Model size: default, tiny, small, baby, medium (baby and medium also set batch size, lr "
                   "and iterations, unless given).")
@click.option("--n-layer", type=int, default=None)
@click.option("--n-head", type=int, default=None)
@click.option("--d-model", type=int, default=None)
@click.option("--block-size", type=int, default=None)
@click.option("--dropout", type=float, default=None)
@click.option("--batch-size", type=int, default=None,
              help="Windows per micro-batch (default: 32, or the preset's).")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step.")
@click.option("--max-iters", type=int, default=None,
              help="Total iterations of the run (default: 2000, or the preset's); resuming at 10 with 20 "
                   "runs 10 more.")
@click.option("--lr", type=float, default=None,
              help="Peak learning rate (default: 3e-3, or the preset's).")
@click.option("--min-lr", type=float, default=None)
@click.option("--warmup", type=int, default=None)
@click.option("--lr-decay-iters", type=int, default=None, help="Cosine decay length (default: max-iters).")
@click.option("--weight-decay", type=float, default=None)
@click.option("--grad-clip", type=float, default=None)
@click.option("--eval-every", type=int, default=None)
@click.option("--eval-iters", type=int, default=None)
@click.option("--log-every", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--keep", type=int, default=None, help="Checkpoints to keep (plus the best).")
def command(backend_name: str | None, config_file: str | None, resume: str | None, **flags: Any) -> None:
    """Train a model. With no arguments: the built-in digit-sorting task, to a stated accuracy."""
    settings = load_toml(config_file) if config_file else {}
    backend_name = backend_name or settings.pop("backend", None)
    resume = resume or settings.pop("resume", None)
    settings.update({k: v for k, v in flags.items() if v is not None})
    if not resume:  # a resumed run keeps its own settings
        settings = {**preset_training(settings.get("preset")), **settings}
    tc = TrainConfig(**settings)
    B = backend(backend_name)
    out = click.echo
    from rich.console import Console

    console = Console(stderr=False)
    trainer = Trainer(tc, B, resume=resume, log=lambda m: click.echo(m, err=True))
    tc, cfg = trainer.tc, trainer.cfg
    n_params = sum(math.prod(s) for s in param_shapes(cfg).values())
    out(f"backend {B.name}  |  data {trainer.ds.source}  |  {len(trainer.ds.train):,} train tokens  |  "
        f"tokenizer {trainer.ds.tokenizer.kind} ({cfg.vocab_size} ids)")
    out(f"model {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, block {cfg.block_size}: "
        f"{n_params:,} parameters  |  batch {tc.batch_size} x {tc.grad_accum}  |  run dir {trainer.out}")
    if resume:
        out(f"resuming at iter {trainer.iter} of {tc.max_iters}")
    if trainer.is_task:
        out(f"task: sort {task.DIGITS} digits; target: >= {TARGET_ACCURACY:.0%} exact match on {ACCURACY_N} "
            "held-out examples")
    result = trainer.fit(Progress(console, every=tc.log_every * 10, eval_every=tc.eval_every))
    speed = f"{result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else "n/a"
    out(f"done: iter {result.iter}  loss {_f(result.loss)}  val loss {_f(result.val_loss)}  "
        f"(best {_f(result.best_val_loss)})  skipped steps {result.skipped}")
    out(f"time: {result.wall_s:.1f} s total, first step (compile) {result.compile_s:.1f} s, steady {speed}")
    if result.checkpoint:
        out(f"checkpoint: {result.checkpoint}")
    if trainer.is_task and not result.interrupted:
        acc, shown = trainer.task_accuracy(samples=8)
        verdict = "reached" if acc >= TARGET_ACCURACY else "NOT reached"
        out(f"accuracy: {acc:.1%} exact match on {ACCURACY_N} held-out examples "
            f"(target {TARGET_ACCURACY:.0%}: {verdict})")
        for line in shown:
            out(f"  {line}")
    if result.interrupted:
        # The checkpoint is written; ignore further Ctrl-C so the exit status stays 130 even while
        # Python shuts down (it restores the default, killing handler then).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        click.echo(f"interrupted at iter {result.iter}; resume with: twinlm train --resume {trainer.out}",
                   err=True)
        sys.exit(INTERRUPTED_EXIT)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"

