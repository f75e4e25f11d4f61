"""`twinlm train`: train a model; with no arguments, the built-in sorting task to a stated accuracy."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import Any

import click

from twinlm.backends import TRAINABLE, check_name, default_name, get_backend
from twinlm.backends.device import label as device_label
from twinlm.cli.common import backend, backend_option, chosen_backend_name, field_options
from twinlm.core import model, task
from twinlm.core.config import ACTIVATIONS, NORMS, POS_ENCODINGS, preset_training
from twinlm.core.errors import TwinlmError
from twinlm.core.models import attends
from twinlm.core.spec import count
from twinlm.tasks import classify as C
from twinlm.tasks.lm import ACCURACY_EXAMPLES as ACCURACY_N
from twinlm.tasks.lm import TARGET_ACCURACY, SortTask, sort_accuracy
from twinlm.trainer import Progress, TrainConfig, Trainer, load_toml
from twinlm.trainer import distributed as D

INTERRUPTED_EXIT = 130


# Fields whose options are written by hand below (choices); every other plain field's option is generated.
CHOICES = ("task", "tokenizer", "errors", "pos_encoding", "norm", "activation")  # and --data (repeatable)


def _help(name: str) -> str:
    """The help text kept on TrainConfig's field `name`."""
    return next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == name)


LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout")
# --lora-rank and friends, shared by `train --init-from` and `finetune`.
lora_options = field_options(TrainConfig, only=LORA_FIELDS)


@click.command("train")
@backend_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of settings (option names as keys); flags override it.")
@click.option("--data", multiple=True, help=_help("data") + " Repeat for several.")
@click.option("--resume", default=None, metavar="DIR", help="Continue the run saved in DIR.")
@click.option("--init-from", "base", default=None, metavar="RUN_DIR", help=_help("base"))
@click.option("--tokenizer", type=click.Choice(["char", "byte", "bpe"]), default=None,
              help=_help("tokenizer"))
@click.option("--errors", type=click.Choice(["strict", "replace", "skip"]), default=None,
              help=_help("errors"))
@click.option("--task", type=click.Choice(["auto", "lm", "mlm"]), default=None,
              help="Next tokens (lm, decoders) or masked tokens (mlm, encoders); default: by arch.")
@click.option("--pos-encoding", type=click.Choice(POS_ENCODINGS), default=None, help=_help("pos_encoding"))
@click.option("--norm", type=click.Choice(NORMS), default=None, help=_help("norm"))
@click.option("--activation", type=click.Choice(ACTIVATIONS), default=None, help=_help("activation"))
@click.option("--tie-embeddings/--untie-embeddings", default=None, help=_help("tie_embeddings"))
@click.option("--mask-prompt/--no-mask-prompt", default=None, help=_help("mask_prompt"))
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help=_help("grad_checkpoint"))
@field_options(TrainConfig, skip=("base", *CHOICES))
@click.option("--ranks", type=int, default=None,
              help="Data-parallel ranks: MLX starts N local processes (mx.distributed ring), tinygrad uses N "
                   "devices in one process; the batch is split, results equal one rank's.")
@click.option("--beam", type=int, default=None,
              help="tinygrad: BEAM kernel search of this width (time-bounded per kernel, cached per "
                   "machine).")
def command(backend_name: str | None, config_file: str | None, resume: str | None, ranks: int | None,
            beam: int | None, **flags: Any) -> None:
    """Train a model. With no arguments: the built-in digit-sorting task, to a stated accuracy."""
    settings = load_toml(config_file) if config_file else {}
    backend_name = backend_name or settings.pop("backend", None)
    resume = resume or settings.pop("resume", None)
    ranks = ranks if ranks is not None else settings.pop("ranks", None)
    beam = beam if beam is not None else settings.pop("beam", None)
    settings.pop("ranks", None)
    settings.pop("beam", None)
    data = flags.pop("data", ())  # --data given several times: a list
    if data:
        flags["data"] = data[0] if len(data) == 1 else list(data)
    settings.update({k: v for k, v in flags.items() if v is not None})
    if not resume:  # a resumed run keeps its own settings
        settings = {**preset_training(settings.get("preset")), **settings}
    tc = TrainConfig(**settings)
    devices = parallel_setup(tc, backend_name, ranks, beam, resuming=bool(resume))
    run(tc, backend_name, resume, devices=devices)


def parallel_setup(tc: TrainConfig, backend_name: str | None, ranks: int | None, beam: int | None,
                   resuming: bool = False) -> int:
    """Check --ranks/--beam; start the local MLX ranks (this process then waits for them and exits) or
    switch on BEAM. Returns the device count for tinygrad's data-parallel form (else 1)."""
    for flag, value, low in (("ranks", ranks, 1), ("beam", beam, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise TwinlmError(f"--{flag} must be an integer >= {low}, got {value!r}")
    name = chosen_backend_name(backend_name) or default_name()
    check_name(name)
    if ranks not in (None, 1) and name not in TRAINABLE:
        raise TwinlmError(f"--ranks needs a backend that trains (mlx or tinygrad), not {name!r}")
    if beam and name != "tinygrad":
        raise TwinlmError(f"--beam is tinygrad's kernel search; the backend is {name!r}")
    if beam:
        from twinlm.backends import tinygrad_beam

        tinygrad_beam.enable(beam)
    if not ranks or ranks == 1:
        return 1
    tc.check()
    # A resumed run keeps its checkpoint's batch size, which the Trainer checks.
    if not resuming and tc.batch_size % ranks:
        raise TwinlmError(f"batch size {tc.batch_size} does not split evenly over {ranks} ranks; "
                          f"use a multiple of {ranks}")
    if name == "tinygrad":
        return ranks
    if "MLX_RANK" in os.environ:  # already a rank (mlx.launch, or our own launcher)
        return 1
    try:
        code = D.launch(ranks, without_ranks(sys.argv[1:]))
    except D.RankFailed as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    sys.exit(code)


def without_ranks(argv: list[str]) -> list[str]:
    """argv without `--ranks N` / `--ranks=N` (each rank runs the same command alone)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--ranks":
            skip = True
        elif not a.startswith("--ranks="):
            out.append(a)
    return out


def run(tc: TrainConfig, backend_name: str | None, resume: str | None, devices: int = 1) -> None:
    """Build the trainer, say what it will do, train, and report: shared by `train` and `finetune`."""
    B = backend(backend_name) if devices == 1 else get_backend(chosen_backend_name(backend_name), devices)
    out = click.echo
    from rich.console import Console

    console = Console(stderr=False)
    def log(message: str) -> None:
        click.echo(message, err=True)

    if B.world()[0] != 0:  # only rank 0 reports (errors still reach stderr, as exceptions)
        def out(*args: Any, **kwargs: Any) -> None:
            return None
        log = out
    trainer = Trainer(tc, B, resume=resume, log=log)
    for line in trainer.data_lines:  # the corpus preparation's summary
        out(line)
    tc, cfg = trainer.tc, trainer.cfg
    spec = model.param_spec(cfg) if not trainer.tc.freeze_base else trainer.spec
    n_params, n_train = count(spec), count(trainer.spec, trainable_only=True)
    if trainer.ds is not None:
        data = f"data {trainer.ds.source}  |  {len(trainer.ds.train):,} train tokens"
    else:
        n_examples = len(trainer.task.train["y"])  # type: ignore[attr-defined]
        scratch = " (from scratch)" if tc.from_scratch else ""
        data = (f"classify {tc.data or C.BUILTIN}  |  {n_examples:,} train examples, labels "
                f"{', '.join(trainer.labels)}  |  base {tc.base}{scratch}")
    rank, ranks = B.world()
    reduce = f" ({B.all_reduce} all-reduce)" if getattr(B, "all_reduce", "") else ""  # MLX: shm or ring
    parallel = f"  |  {ranks} ranks{reduce}" if ranks > 1 else f"  |  {devices} devices" if devices > 1 \
        else ""
    out(f"backend {B.name} on {device_label(B.device_info())}{parallel}  |  {data}  |  "
        f"tokenizer {trainer.tokenizer.kind} "
        f"({cfg.vocab_size} ids)")
    trained = f" ({n_train:,} trained)" if n_train != n_params else ""
    window = trainer.task.window  # what each example feeds the model: tokens/s count these positions
    block = f"block {cfg.block_size}" if window == cfg.block_size else \
        f"window {window} (context {cfg.block_size})"
    if attends(cfg):
        shape = (f"{cfg.n_head} heads{f' ({cfg.n_kv_head} kv)' if cfg.n_kv_head != cfg.n_head else ''}, "
                 f"d_model {cfg.d_model}, {block}, {cfg.norm}, {cfg.activation}, "
                 f"{cfg.pos_encoding} positions")
    else:  # a recurrence: no heads, feed-forward or positions
        shape = f"hidden size {cfg.d_model}, {block} (unrolled), {cfg.norm}"
    out(f"model {cfg.arch}: {cfg.n_layer} layers, {shape}: "
        f"{n_params:,} parameters{trained}  |  task {trainer.task.name}  |  batch {tc.batch_size} x "
        f"{tc.grad_accum}  |  run dir {trainer.out}")
    if resume:
        out(f"resuming at iter {trainer.iter} of {tc.max_iters}")
    sorting = isinstance(trainer.task, SortTask)
    if sorting:
        out(f"task: sort {task.DIGITS} digits; target: >= {TARGET_ACCURACY:.0%} exact match on {ACCURACY_N} "
            "held-out examples")
    result = trainer.fit(Progress(console if rank == 0 else None, every=tc.log_every * 10,
                                  eval_every=tc.eval_every))
    speed = f"{result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else "n/a"
    out(f"done: iter {result.iter}  loss {_f(result.loss)}  val loss {_f(result.val_loss)}  "
        f"(best {_f(result.best_val_loss)})  skipped steps {result.skipped}")
    out(f"time: {result.wall_s:.1f} s total, first step (compile) {result.compile_s:.1f} s, steady {speed}")
    if result.checkpoint:
        out(f"checkpoint: {result.checkpoint}")
    metrics = trainer.last_metrics
    if "masked_accuracy" in metrics:
        out(f"masked-token accuracy: {metrics['masked_accuracy']:.1%} on the validation split")
    if "confusion" in metrics:
        out(f"accuracy: {metrics['accuracy']:.1%} on {metrics['n']} validation examples")
        out(confusion_table(metrics["confusion"], metrics["labels"]))
    if sorting and not result.interrupted and rank == 0:
        acc, shown = sort_accuracy(B, cfg, trainer.params(), trainer.tokenizer, ACCURACY_N, samples=8)
        verdict = "reached" if acc >= TARGET_ACCURACY else "NOT reached"
        out(f"accuracy: {acc:.1%} exact match on {ACCURACY_N} held-out examples "
            f"(target {TARGET_ACCURACY:.0%}: {verdict})")
        for line in shown:
            out(f"  {line}")
    if result.interrupted:
        # The checkpoint is written; ignore further Ctrl-C so the exit status stays 130 even while
        # Python shuts down (it restores the default, killing handler then).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if rank == 0:
            click.echo(f"interrupted at iter {result.iter}; resume with: twinlm train --resume {trainer.out}",
                       err=True)
        sys.exit(INTERRUPTED_EXIT)


def confusion_table(confusion: list[list[int]], labels: list[str]) -> str:
    """Rows: true label; columns: predicted."""
    width = max(8, *(len(lab) + 2 for lab in labels))
    lines = ["confusion (rows: true, columns: predicted)",
             " " * width + "".join(f"{lab:>{width}}" for lab in labels)]
    lines += [f"{lab:>{width}}" + "".join(f"{n:>{width}}" for n in row)
              for lab, row in zip(labels, confusion, strict=True)]
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"

