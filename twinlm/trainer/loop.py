"""The training loop: data, a compiled step, evaluation, checkpoints, resume, metrics and Ctrl-C.

One iteration = one optimizer update over `batch_size * grad_accum` windows of `task.window` positions
(the run's training window, which a fine-tune may set shorter than the model's context): the token counts
and tokens/s it reports are of those positions, the ones the step really processes. Gradient accumulation
happens inside the compiled step: the batch arrives as (grad_accum, batch_size, T) and the loss is
the mean of the micro-batch losses, whose gradient is exactly the mean of the micro-batch gradients
(what nanoGPT's accumulation loop computes). The update itself stays `core.step.make_train_step`'s,
the same code the parity suite checks, on every backend.

Everything a run depends on is a function of (seed, iteration) or saved in the checkpoint: numpy
parameter init, the batcher's generator state, counter-based dropout masks, and the lr schedule.
So a resumed run on the same backend continues bit-identically.

Data-parallel (`twinlm.trainer.distributed`): with N ranks each process takes its slice of the same global
batch and dropout masks, one all-reduce per step sums the loss shares and gradients, and the update
runs identically everywhere. Rank 0 alone evaluates and writes checkpoints and metrics. A checkpoint
holds no rank count, so a run saved with N ranks resumes with any number.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinlm._version import __version__
from twinlm.core import model, optim
from twinlm.core import step as S
from twinlm.core.backend import Array, Backend
from twinlm.core.checkpoint import save_checkpoint
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.core.models import FAMILIES, family
from twinlm.prepare_progress import prepare_display
from twinlm.run_meta import RunMeta
from twinlm.tasks import Task
from twinlm.tasks import classify as C
from twinlm.trainer import distributed as D
from twinlm.trainer.config import TrainConfig, optimizer_config
from twinlm.trainer.evaluate import eval_step, evaluate_task
from twinlm.trainer.progress import Progress
from twinlm.trainer.setup import assemble

MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run stops


class TrainingDiverged(TwinlmError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def versions(B: Backend) -> dict[str, str]:
    out = {"twinlm": __version__, "numpy": np.__version__}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        out[B.name] = importlib.metadata.version(B.name)
    return out


def task_loss(B: Backend, cfg: ModelConfig, task: Task, grad_accum: int = 1) -> S.LossFn:
    """The task's loss; with grad_accum > 1, the mean over the leading micro-batch axis (A, b, ...) of
    every batch array and dropout mask. A data-parallel rank's batch carries `share` (per micro-batch):
    its part of the global loss weight, by which its loss is scaled (`twinlm.trainer.distributed.sharder`)."""
    def loss_fn(p: dict[str, Array], batch: dict[str, Array], drop: dict[str, Array]) -> Array:
        share = batch.get("share")
        batch = {k: v for k, v in batch.items() if k != "share"}
        if grad_accum == 1:
            loss = task.loss(B, cfg, p, batch, drop)
            return loss if share is None else loss * share
        total = None
        for a in range(grad_accum):
            la = task.loss(B, cfg, p, {k: v[a] for k, v in batch.items()}, {k: m[a] for k, m in drop.items()})
            la = la if share is None else la * share[a]
            total = la if total is None else total + la
        return total * (1.0 / grad_accum)
    return loss_fn


class _Interrupts:
    """SIGINT sets a flag the loop checks between steps, so a step or a save is never cut in half.
    Once interrupted, the handler stays installed: the caller is expected to exit (the CLI exits 130)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.count = 0
        self.say = say

    def _handler(self, signum: int, frame: Any) -> None:
        self.count += 1
        self.say("interrupt: finishing the current step, then saving a checkpoint"
                 if self.count == 1 else "interrupt: already stopping; please wait")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        try:
            previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            # After an interrupt the process is on its way out: keep deferring Ctrl-C, so a second one
            # cannot kill it half-way (Python restores SIG_DFL while it shuts down).
            if not self.count:
                signal.signal(signal.SIGINT, previous)


@dataclass
class TrainResult:
    iter: int
    loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    skipped: int
    interrupted: bool
    compile_s: float
    tokens_per_s: float | None
    wall_s: float
    accuracy: float | None = None
    checkpoint: str | None = None


class Trainer:
    """Builds (or restores) a run, then `fit()` trains it to `max_iters`."""

    def __init__(self, tc: TrainConfig, B: Backend, *, resume: str | Path | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.B, self.log = B, log
        self.data_lines: list[str] = []  # what preparing the corpus said (the CLI prints it on stdout)
        if not B.supports_grad:
            raise TwinlmError(f"backend {B.name!r} cannot train (no autograd); use mlx or tinygrad")
        if tc.grad_checkpoint and not B.can_remat:
            raise TwinlmError(f"--grad-checkpoint: backend {B.name} cannot recompute activations in the "
                              "backward pass (tinygrad offers no checkpoint primitive); use --backend mlx")
        self.rank, self.ranks = B.world()
        self.main = self.rank == 0  # rank 0 alone evaluates and writes checkpoints, metrics and progress
        self.heartbeat = D.Heartbeat(self.rank)
        self._stop_all = False
        split = self.ranks * getattr(B, "n_devices", 1)  # processes x devices each
        # Rank 0 shows the corpus preparation: a progress bar on a terminal, a summary line in data_lines.
        report = {"log": self.data_lines.append, "progress": prepare_display()} if self.main else {}
        run = assemble(tc, resume=resume, split=split, report=report)
        self.tc, self.out, self.cfg, self.task, self.ds = run.tc, run.out, run.cfg, run.task, run.ds
        self.tokenizer, self.labels, self.spec = run.tokenizer, run.labels, run.spec
        self.hf_record, self.base_record = run.hf_record, run.base_record
        if tc.grad_checkpoint:
            if not getattr(family(self.cfg.arch), "BLOCK_CHECKPOINTS", False):
                can = ", ".join(a for a in FAMILIES if getattr(family(a), "BLOCK_CHECKPOINTS", False))
                raise TwinlmError(f"--grad-checkpoint: --arch {self.cfg.arch} does not checkpoint its blocks "
                                  f"(the decoders {can} do)")
            self.B = B = copy.copy(B)  # this trainer's steps recompute; the shared backend stays as it was
            B.remat = True
        self.grad_accum = self.tc.grad_accum
        self.dtype = self.tc.dtype or "float32"
        self.opt = optimizer_config(self.tc)
        self.step = B.compile_step(self._step_fn(), {k: B.from_numpy(v) for k, v in run.state.items()})
        meta = run.meta
        self.iter = meta.iter if meta else 0
        self.skipped = meta.skipped if meta else 0
        self.best_val: float | None = meta.best_val_loss if meta else None
        if meta:
            self.task.set_state(meta.task_state)  # type: ignore[arg-type]
        self._eval_step: Any = None
        self.last_metrics: dict[str, Any] = {}
        # Positions one iteration processes (padding included): the training window, not the model's context.
        self.tokens_per_iter = self.tc.batch_size * self.grad_accum * self.task.window

    def _step_fn(self) -> S.StepFn:
        loss_fn = task_loss(self.B, self.cfg, self.task, self.grad_accum)
        if self.ranks == 1:
            return S.make_train_step(self.B, self.spec, self.opt, loss_fn, dtype=self.dtype)
        all_sum = (lambda x: x) if D.skip_all_reduce() else self.B.all_sum
        return S.make_train_step(self.B, self.spec, self.opt, loss_fn, all_sum=all_sum, dtype=self.dtype)

    # ---- one step ----------------------------------------------------------------------------
    def _batch(self, it: int) -> dict[str, np.ndarray]:
        """Iteration `it`'s batch; with gradient accumulation, micro-batches on a leading axis (A, b, ...)."""
        A = self.grad_accum
        parts = [self.task.next_batch(it * A + a) for a in range(A)]
        batch = {k: np.stack([p[k] for p in parts]) if A > 1 else parts[0][k] for k in parts[0]}
        model.check_token_ids(batch["x"], self.cfg.vocab_size)
        assert batch["x"].size == self.tokens_per_iter, "the reported token counts would be wrong"
        return batch

    def train_step(self, stop: bool = False) -> tuple[float, float]:
        """Run iteration `self.iter`; return (loss, grad_norm). A non-finite step leaves the state as is.
        With several ranks, `stop` (this rank wants to stop) is summed with the gradients: `stop_all`
        then says whether any rank does, so all stop after the same step."""
        batch = self._batch(self.iter)
        self.heartbeat.start(self.iter)
        if self.ranks == 1:
            loss, gnorm = S.drive(self.B, self.step, self.cfg, self.opt, batch, self.iter, self.tc.seed)
        else:
            shard = D.sharder(self.rank, self.ranks, accum=self.grad_accum > 1)
            loss, gnorm, flag = S.drive(self.B, self.step, self.cfg, self.opt, batch, self.iter, self.tc.seed,
                                        shard=shard, flag=float(stop))
            self._stop_all = flag > 0
        self.iter += 1
        self.heartbeat.beat(self.iter)
        return loss, gnorm

    # ---- evaluation --------------------------------------------------------------------------
    def params(self) -> dict[str, Array]:
        """The weights as the forward sees them: the master weights cast to the run's dtype."""
        return S.cast_params(self.B, S.params_of(self.step.state), self.dtype)

    def evaluate(self) -> dict[str, Any]:
        """The task's metrics over the fixed validation batches, with one compiled forward graph."""
        if self._eval_step is None:
            self._eval_step = eval_step(self.B, self.cfg, self.task)
        self.last_metrics = evaluate_task(self.B, self.cfg, self.task, self.params(), self._eval_step)
        return self.last_metrics

    def val_loss(self) -> float:
        return float(self.evaluate()["val_loss"])

    # ---- checkpoints -------------------------------------------------------------------------
    def meta(self) -> RunMeta:
        return RunMeta(model=self.cfg, tokenizer=self.tokenizer.to_dict(), iter=self.iter,
                       train=self.tc.to_dict(),
                       task=self.task.name, task_state=self.task.state(),
                       labels=self.labels, backend=self.B.name, device=self.B.device_info(),
                       versions=versions(self.B), seed=self.tc.seed,
                       optimizer=self.opt.to_dict(), skipped=self.skipped, best_val_loss=self.best_val,
                       data_source=self.ds.source if self.ds is not None else (self.tc.data or C.BUILTIN),
                       metrics=self.last_metrics or None, hf=self.hf_record, base=self.base_record,
                       dtype=self.dtype)

    def save(self, best: bool = False) -> Path:
        """A checkpoint of the whole state; a run with a base leaves out the weights it keeps frozen
        (they are the base's, found again by `run_dir.load_run`). Rank 0 alone writes; other ranks return
        the path rank 0 writes."""
        if not self.main:
            return self.out / f"ckpt-{self.iter:08d}"
        frozen = {f"param.{k}" for k, s in self.spec.items() if not s.trainable and self.base_record}
        arrays = {k: self.B.to_host(v) for k, v in self.step.state.items() if k not in frozen}
        return save_checkpoint(self.out, arrays, self.meta().to_dict(), step=self.iter, keep=self.tc.keep,
                               best=best)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, progress: Progress | None = None) -> TrainResult:
        tc = self.tc
        start_iter, t_start = self.iter, time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = open(self.out / "metrics.jsonl" if self.main else os.devnull, "a", encoding="utf-8")  # noqa: SIM115
        interrupts = _Interrupts(self.log)
        tokens_per_iter = self.tokens_per_iter
        compile_s, steady_s, steady_iters = 0.0, 0.0, 0
        loss = val = acc = None
        bad_run = 0
        ckpt: Path | None = None
        progress = progress if progress is not None and self.main else Progress(None)
        progress.start(start_iter, tc.max_iters)

        device = self.B.device_info()["device"]

        def emit(event: str, **values: Any) -> None:
            rec = {"event": event, "iter": self.iter, "tokens": self.iter * tokens_per_iter,
                   "time": round(time.perf_counter() - t_start, 4), "backend": self.B.name, "device": device,
                   **values}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

        try:
            with interrupts.installed():
                # Alone, stop as soon as interrupted; ranks stop after the step whose summed flag says so.
                while self.iter < tc.max_iters and not (self._stop_all or
                                                        self.ranks == 1 and interrupts.count):
                    t0 = time.perf_counter()
                    loss, gnorm = self.train_step(stop=bool(interrupts.count))
                    dt = time.perf_counter() - t0
                    if self.iter == start_iter + 1:
                        compile_s = dt  # the first step traces and compiles the graph
                    else:
                        steady_s, steady_iters = steady_s + dt, steady_iters + 1
                    tps = tokens_per_iter * steady_iters / steady_s if steady_s > 0 else None
                    if not (math.isfinite(loss) and math.isfinite(gnorm)):
                        self.skipped, bad_run = self.skipped + 1, bad_run + 1
                        emit("skip", loss=_num(loss), grad_norm=_num(gnorm))
                        what = "loss" if not math.isfinite(loss) else "gradient"
                        self.log(f"iter {self.iter}: non-finite {what}; update skipped ({bad_run} in a row)")
                        if bad_run >= MAX_BAD_STEPS:
                            ckpt = self.save()
                            raise TrainingDiverged(
                                f"training diverged: {bad_run} consecutive steps had a non-finite loss or "
                                f"gradient (at iter {self.iter}); weights were left unchanged and saved in "
                                f"{ckpt}; lower --lr or check the data")
                        continue
                    bad_run = 0
                    if self.iter % tc.log_every == 0 or self.iter == tc.max_iters:
                        emit("train", loss=loss, grad_norm=gnorm, lr=optim.lr_at(self.iter - 1, self.opt),
                             tokens_per_s=tps)
                    progress.update(self.iter, loss=loss, tokens_per_s=tps)
                    if self.main and (self.iter % tc.eval_every == 0 or self.iter == tc.max_iters):
                        val, acc, ckpt = self._evaluate_and_save(emit)
                        progress.update(self.iter, val_loss=val, accuracy=acc)
                stopped = self._stop_all or bool(interrupts.count)
                if stopped and (ckpt is None or ckpt.name != f"ckpt-{self.iter:08d}"):
                    ckpt = self.save()
                    emit("interrupt")
        finally:
            metrics.close()
            progress.stop()
        return TrainResult(iter=self.iter, loss=loss, val_loss=val, best_val_loss=self.best_val,
                           skipped=self.skipped, interrupted=stopped, compile_s=compile_s,
                           tokens_per_s=tokens_per_iter * steady_iters / steady_s if steady_s else None,
                           wall_s=time.perf_counter() - t_start, accuracy=acc,
                           checkpoint=str(ckpt) if ckpt else None)

    def _evaluate_and_save(self, emit: Callable[..., None]) -> tuple[float, float | None, Path]:
        metrics = self.evaluate()
        val = float(metrics["val_loss"])
        acc = metrics.get(self.task.metric) if self.task.metric else None
        best = math.isfinite(val) and (self.best_val is None or val < self.best_val)
        if best:
            self.best_val = val
        ckpt = self.save(best=best)
        emit("eval", val_loss=val, **({"accuracy": acc} if acc is not None else {}), best=best)
        return val, acc, ckpt


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
