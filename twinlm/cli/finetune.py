"""`twinlm finetune`: a pretrained run plus a classification head, trained on labelled text."""

from __future__ import annotations

import click

from twinlm.cli.common import backend_option
from twinlm.cli.train import lora_options, run
from twinlm.core.dtypes import NAMES
from twinlm.trainer import TrainConfig


@click.command("finetune")
@click.argument("base_run", type=click.Path())
@backend_option
@click.option("--data", default=None,
              help="CSV (text,label columns) or JSONL of {text, label} (default: the built-in "
                   "sorted-or-not task, written in the built-in corpus's language).")
@click.option("--out", default=None, help="Run directory (default: runs/<base>-<data name>).")
@click.option("--freeze-base", is_flag=True, help="Train only the head (and BERT's pooler).")
@lora_options
@click.option("--from-scratch", is_flag=True,
              help="The base's model and tokenizer with fresh weights: the baseline fine-tuning should beat.")
@click.option("--max-iters", type=int, default=300, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup", type=int, default=30, show_default=True)
@click.option("--dropout", type=float, default=None, help="Default: the base run's.")
@click.option("--eval-every", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=1337, show_default=True)
@click.option("--dtype", type=click.Choice(NAMES), default=None,
              help="The forward and backward in this dtype over float32 master weights (default float32).")
def command(base_run: str, backend_name: str | None, **flags: object) -> None:
    """Fine-tune the model in BASE_RUN with a classification head (on [CLS] for BERT, the last token
    for decoders). Continue an interrupted fine-tune with `twinlm train --resume DIR`."""
    settings = {k: v for k, v in flags.items() if v is not None}
    run(TrainConfig(task="classify", base=base_run, **settings), backend_name, None)  # type: ignore[arg-type]
