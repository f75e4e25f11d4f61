"""The training loop: data, a compiled step, evaluation, checkpoints, resume, metrics and Ctrl-C.

One iteration = one optimizer update over `batch_size * grad_accum` windows. Gradient accumulation
happens inside the compiled step: the batch arrives as (grad_accum, batch_size, T) and the loss is
the mean of the micro-batch losses, whose gradient is exactly the mean of the micro-batch gradients
(what nanoGPT's accumulation loop computes). The update itself stays `core.step.make_train_step`'s,
the same code the parity suite checks, on every backend.

Everything a run depends on is a function of (seed, iteration) or saved in the checkpoint: numpy
parameter init, the batcher's generator state, counter-based dropout masks, and the lr schedule.
So a resumed run on the same backend continues bit-identically.

Data-parallel (`twinlm.distributed`): with N ranks each process takes its slice of the same global
batch and dropout masks, one all-reduce per step sums the loss shares and gradients, and the update
runs identically everywhere. Rank 0 alone evaluates and writes checkpoints and metrics. A checkpoint
holds no rank count, so a run saved with N ranks resumes with any number.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from twinlm import __version__
from twinlm import distributed as D
from twinlm.core import model, optim
from twinlm.core import spec as SP
from twinlm.core import step as S
from twinlm.core import task as sort_task
from twinlm.core.backend import Array, Backend
from twinlm.core.checkpoint import save_checkpoint
from twinlm.core.config import PRESETS, ConfigError, ModelConfig, lora_targets
from twinlm.core.data import Dataset, check_fits, prepare
from twinlm.core.errors import TwinlmError
from twinlm.core.models import FAMILIES
from twinlm.core.tensorfile import content_digest
from twinlm.core.tokenizers import Tokenizer, tokenizer_from_dict
from twinlm.run_dir import load_run
from twinlm.run_meta import RunMeta
from twinlm.tasks import Task
from twinlm.tasks import classify as C
from twinlm.tasks.lm import CausalLM, SortTask
from twinlm.tasks.mlm import MaskedLM, encoder_tokenizer

# Model settings a user may set on `train`; a resumed run keeps the checkpoint's.
MODEL_FIELDS = ("n_layer", "n_head", "d_model", "block_size", "dropout", "arch", "n_kv_head", "d_ff",
                "pos_encoding", "norm", "activation", "tie_embeddings", "residual")
TASKS = ("auto", "lm", "mlm", "classify")
MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run stops


class TrainingDiverged(TwinlmError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainConfig:
    """Every setting of a run. Model fields left None come from the preset (or the checkpoint)."""

    data: str | None = None  # None: the built-in task's corpus (classify: the built-in classification task)
    task: str = "auto"  # auto: lm for decoders, mlm for encoders; classify: fine-tune `base` with a head
    base: str | None = None  # the pretrained run whose weights start the model (--init-from, finetune)
    freeze_base: bool = False  # classify: train only the head (and an encoder's pooler)
    from_scratch: bool = False  # classify: the base's model and tokenizer, but freshly initialised weights
    lora_rank: int = 0  # > 0: train low-rank adapters on the frozen base (see core.lora)
    lora_alpha: float | None = None  # None: 2 * rank
    lora_targets: str | None = None  # comma-separated (config.LORA_TARGETS); None: all of them
    lora_dropout: float = 0.0
    arch: str | None = None  # None: gpt (or the base run's)
    n_kv_head: int | None = None
    d_ff: int | None = None
    pos_encoding: str | None = None
    norm: str | None = None
    activation: str | None = None
    tie_embeddings: bool | None = None
    residual: bool | None = None  # False: decoder blocks without skip connections (an ablation)
    tokenizer: str = "char"
    errors: str = "strict"  # invalid UTF-8 in the corpus: "strict" refuses it, "replace" substitutes U+FFFD
    vocab_size: int | None = None
    out: str | None = None  # run dir; None: runs/<name>
    preset: str = "default"
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 3e-3
    min_lr: float | None = None  # None: lr / 10
    warmup: int = 100
    lr_decay_iters: int | None = None  # cosine decay length; None: max_iters
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_iters: int = 20
    log_every: int = 10
    seed: int = 1337
    keep: int = 3

    def check(self) -> None:
        positive = ("batch_size", "grad_accum", "max_iters", "eval_every", "eval_iters", "log_every", "keep")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TwinlmError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise TwinlmError(f"lr must be a positive number, got {self.lr}")
        if self.warmup < 0:
            raise TwinlmError(f"warmup must be >= 0, got {self.warmup}")
        if self.preset != "default" and self.preset not in PRESETS:
            raise TwinlmError(f"unknown preset {self.preset!r}; choose from default, {', '.join(PRESETS)}")
        if self.arch is not None and self.arch not in FAMILIES:
            raise TwinlmError(f"unknown arch {self.arch!r}; choose from {', '.join(FAMILIES)}")
        if self.task not in TASKS:
            raise TwinlmError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.task == "classify" and self.base is None:
            raise TwinlmError("a classify task fine-tunes a base run: give both (twinlm finetune BASE_RUN)")
        if self.lora_rank and self.base is None:
            raise TwinlmError("LoRA adapts a pretrained model: give the run to adapt (--init-from RUN_DIR)")
        if self.base is not None and self.task != "classify" and self.data is None:
            raise TwinlmError("train --init-from fine-tunes on your text: give --data")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The default model for the built-in task; `twinlm train` with no arguments trains it.
DEFAULT_MODEL = dict(n_layer=2, n_head=4, d_model=64, block_size=32)


def config_keys() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file (keys are option names, `-` or `_`); unknown keys are an error."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise TwinlmError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise TwinlmError(f"config file {path} is not valid TOML: {e}") from None
    out = {k.replace("-", "_"): v for k, v in raw.items()}
    if "init_from" in out:  # the flag's name for the field `base`
        out["base"] = out.pop("init_from")
    unknown = sorted(set(out) - config_keys() - {"backend", "resume", "ranks", "beam"})
    if unknown:
        raise TwinlmError(f"unknown keys in config file {path}: {', '.join(unknown)}; "
                          f"known keys: {', '.join(sorted(config_keys()))}")
    return out


def model_config(tc: TrainConfig, vocab_size: int) -> ModelConfig:
    base = dict(DEFAULT_MODEL) if tc.preset == "default" else dict(PRESETS[tc.preset])
    base.update({k: getattr(tc, k) for k in MODEL_FIELDS if getattr(tc, k) is not None})
    try:
        return ModelConfig(vocab_size=vocab_size, **base)
    except ConfigError as e:
        raise TwinlmError(f"impossible model: {e}") from None


def optimizer_config(tc: TrainConfig) -> optim.AdamWConfig:
    return optim.AdamWConfig(lr=tc.lr, min_lr=tc.lr / 10 if tc.min_lr is None else tc.min_lr,
                             warmup=tc.warmup,
                             max_iters=tc.max_iters if tc.lr_decay_iters is None else tc.lr_decay_iters,
                             weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)


def versions(B: Backend) -> dict[str, str]:
    out = {"twinlm": __version__, "numpy": np.__version__}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        out[B.name] = importlib.metadata.version(B.name)
    return out


def task_loss(B: Backend, cfg: ModelConfig, task: Task, grad_accum: int = 1) -> S.LossFn:
    """The task's loss; with grad_accum > 1, the mean over the leading micro-batch axis (A, b, ...) of
    every batch array and dropout mask. A data-parallel rank's batch carries `share` (per micro-batch):
    its part of the global loss weight, by which its loss is scaled (`twinlm.distributed.sharder`)."""
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
        if not B.supports_grad:
            raise TwinlmError(f"backend {B.name!r} cannot train (no autograd); use mlx or tinygrad")
        self.rank, self.ranks = B.world()
        self.main = self.rank == 0  # rank 0 alone evaluates and writes checkpoints, metrics and progress
        self.heartbeat = D.Heartbeat(self.rank)
        self._stop_all = False
        meta: RunMeta | None = None
        arrays: dict[str, np.ndarray] | None = None
        self.hf_record: dict[str, Any] | None = None
        self.base_record: dict[str, Any] | None = None
        if resume is not None:
            arrays, meta = load_run(resume)
            self.hf_record, self.base_record = meta.hf, meta.base
            run_dir = Path(resume)
            if (run_dir / "manifest.json").exists():  # a checkpoint dir was named: its run dir continues
                run_dir = run_dir.parent
            # Where the run lives now (it may have been moved), unless --out sends it elsewhere.
            self.out = Path(tc.out) if tc.out else run_dir
            tc = self._merge_resumed(tc, meta)
        tc.check()
        split = self.ranks * getattr(B, "n_devices", 1)  # processes x devices each
        if tc.batch_size % split:
            raise TwinlmError(f"batch size {tc.batch_size} does not split evenly over {split} ranks/devices; "
                              f"use a multiple of {split}")
        for name in ("data", "base"):  # absolute, so a resume from another working directory finds them
            if getattr(tc, name) is not None:
                setattr(tc, name, str(Path(getattr(tc, name)).resolve()))
        self.tc = tc
        self.grad_accum = tc.grad_accum
        base_params: dict[str, np.ndarray] | None = None
        cfg: ModelConfig | None = None  # None: from the flags and the corpus's tokenizer
        tok: Tokenizer | None = None
        self.labels: list[str] = []
        if meta is not None:
            cfg, tok, self.labels = meta.model, tokenizer_from_dict(meta.tokenizer), meta.labels
        elif tc.base is not None:
            cfg, tok, base_params, self.labels = self._from_base(tc)
        if resume is None:
            self.out = Path(tc.out or default_out_dir(tc))
        tc.out = str(self.out)
        self.cfg, self.task, self.ds = self._build_task(tc, cfg, tok)
        self.tokenizer: Tokenizer = self.ds.tokenizer if self.ds is not None else tok  # type: ignore[assignment]
        self.opt = optimizer_config(tc)
        self.spec = model.param_spec(self.cfg)
        if tc.freeze_base:  # train only what the pretrained model did not: the head (and BERT's pooler)
            self.spec = SP.frozen_except(self.spec, model.new_parameters(self.cfg, self.spec))

        if arrays is not None:
            state = self._check_state(arrays)
        else:
            params = SP.init_params(self.spec, tc.seed)
            if base_params is not None and not tc.from_scratch:  # the base's weights; the head stays fresh
                params.update({k: v for k, v in base_params.items() if k in params})
            state = S.init_state(params, self.spec)
        self.step = B.compile_step(self._step_fn(), {k: B.from_numpy(v) for k, v in state.items()})
        self.iter = meta.iter if meta else 0
        self.skipped = meta.skipped if meta else 0
        self.best_val: float | None = meta.best_val_loss if meta else None
        if meta:
            self.task.set_state(meta.task_state)  # type: ignore[arg-type]
        self._eval_step: Any = None
        self.last_metrics: dict[str, Any] = {}

    # ---- setup -------------------------------------------------------------------------------
    def _from_base(self, tc: TrainConfig) -> tuple[ModelConfig, Tokenizer, dict[str, np.ndarray], list[str]]:
        """The base run's model (with a classification head for classify, adapters for LoRA), its
        tokenizer, weights and the labels; records the base's digest and Hugging Face origin."""
        from twinlm.generate import load_model

        fixed = [k for k in MODEL_FIELDS if k not in ("dropout", "block_size") and getattr(tc, k) is not None]
        if fixed:
            raise TwinlmError(f"--{fixed[0].replace('_', '-')} shapes a new model; a run from a base keeps "
                              "the base's model")
        base_cfg, params, tok, base_meta = load_model(tc.base)  # type: ignore[arg-type]
        if base_cfg.lora_rank:
            raise TwinlmError(f"{tc.base} is itself a LoRA run: merge it first (twinlm merge-lora)")
        labels: list[str] = []
        if tc.task == "classify":
            train, _ = classify_examples(tc)
            labels = sorted({lab for _, lab in train})
            if len(labels) < 2:
                raise TwinlmError(f"classification needs at least two labels; the data has {labels}")
        if base_cfg.kind == "encoder":
            tok = encoder_tokenizer(tok)
        changes: dict[str, Any] = {k: getattr(tc, k) for k in ("dropout",) if getattr(tc, k) is not None}
        if tc.lora_rank:
            changes |= dict(lora_rank=tc.lora_rank, lora_alpha=tc.lora_alpha or 0.0,
                            lora_targets=lora_targets(tc.lora_targets), lora_dropout=tc.lora_dropout)
        try:
            cfg = base_cfg.replace(n_classes=len(labels), **changes)
        except ConfigError as e:
            raise TwinlmError(str(e)) from None
        self.hf_record = base_meta.hf
        self.base_record = {"run": str(Path(str(tc.base)).resolve()), "sha256": content_digest(params)}
        return cfg, tok, params, labels

    def _build_task(self, tc: TrainConfig, cfg: ModelConfig | None,
                    tok: Tokenizer | None) -> tuple[ModelConfig, Task, Dataset | None]:
        """(model config, task, corpus) of the run; a fresh run's config comes from the flags and the
        tokenizer trained on its corpus (plus [PAD], [MASK], [CLS] for an encoder)."""
        if tc.task == "classify":
            assert cfg is not None and tok is not None
            train, val = classify_examples(tc)
            return cfg, C.Classify(train, val, self.labels, tok, cfg, tc.batch_size, tc.seed), None
        if cfg is None:
            ds = prepare(tc.data, tokenizer=tc.tokenizer, vocab_size=tc.vocab_size, errors=tc.errors)
            if model_kind(tc.arch or "gpt") == "encoder":
                ds.tokenizer = encoder_tokenizer(ds.tokenizer)
            cfg = model_config(tc, ds.tokenizer.vocab_size)
        else:
            ds = prepare(tc.data, tok=tok, errors=tc.errors)
        window = cfg.block_size
        if tc.base is not None and tc.block_size is not None:  # a shorter training window than the base's
            if not 1 < tc.block_size <= cfg.block_size:
                raise TwinlmError(f"--block-size {tc.block_size}: the base model reads 2 to {cfg.block_size} "
                                  "tokens")
            window = tc.block_size
        kind = tc.task if tc.task != "auto" else ("mlm" if cfg.kind == "encoder" else "lm")
        if kind == "lm" and cfg.kind == "encoder":
            raise TwinlmError(f"--arch {cfg.arch} is an encoder: it trains on masked tokens (--task mlm)")
        if kind == "mlm" and cfg.kind == "decoder":
            raise TwinlmError(f"--arch {cfg.arch} is a causal decoder: it trains on next tokens (--task lm)")
        check_fits(ds, window, tc.batch_size)
        cls = MaskedLM if kind == "mlm" else SortTask if tc.data is None else CausalLM
        return cfg, cls(ds, tc.batch_size, window, tc.seed, tc.eval_iters), ds

    @staticmethod
    def _merge_resumed(tc: TrainConfig, meta: RunMeta) -> TrainConfig:
        """The checkpoint's settings, overridden by what the user set now (fields not at their default);
        model shape and data are the checkpoint's: a conflicting size flag is an error."""
        missing = [k for k in ("train", "task_state") if not getattr(meta, k)]
        if missing:
            raise TwinlmError(f"checkpoint meta is missing training state ({missing[0]}); cannot resume it")
        saved = meta.train
        model_dict = meta.model.to_dict()
        for name in MODEL_FIELDS:
            given = getattr(tc, name)
            if given is not None and given != model_dict[name]:
                raise TwinlmError(f"--{name.replace('_', '-')} {given} conflicts with the checkpoint's "
                                  f"{name} = {model_dict[name]}; a resumed run keeps its model")
        defaults = TrainConfig()
        merged = {k: v for k, v in saved.items() if k in config_keys()}
        fixed = {*MODEL_FIELDS, "data", "tokenizer", "vocab_size", "preset", "task", "base", "freeze_base",
                 "from_scratch", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout"}
        for name in config_keys() - fixed:
            if getattr(tc, name) != getattr(defaults, name):
                merged[name] = getattr(tc, name)
        if tc.data is not None and str(Path(tc.data).resolve()) != saved.get("data"):
            raise TwinlmError(f"--data {tc.data} differs from the checkpoint's data {saved.get('data')}; "
                              "a resumed run keeps its corpus")
        return TrainConfig(**merged)

    def _check_state(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = S.state_shapes(self.spec)
        for k, shape in expected.items():
            if k not in arrays or arrays[k].shape != shape:
                raise TwinlmError(f"checkpoint state does not match its model config (at {k})")
            if not np.all(np.isfinite(arrays[k])):
                raise TwinlmError(f"checkpoint state has non-finite values in {k}")
        return {k: arrays[k].astype(np.float32) for k in expected}

    def _step_fn(self) -> S.StepFn:
        loss_fn = task_loss(self.B, self.cfg, self.task, self.grad_accum)
        if self.ranks == 1:
            return S.make_train_step(self.B, self.spec, self.opt, loss_fn)
        all_sum = (lambda x: x) if D.skip_all_reduce() else self.B.all_sum
        return S.make_train_step(self.B, self.spec, self.opt, loss_fn, all_sum=all_sum)

    # ---- one step ----------------------------------------------------------------------------
    def _batch(self, it: int) -> dict[str, np.ndarray]:
        """Iteration `it`'s batch; with gradient accumulation, micro-batches on a leading axis (A, b, ...)."""
        A = self.grad_accum
        parts = [self.task.next_batch(it * A + a) for a in range(A)]
        batch = {k: np.stack([p[k] for p in parts]) if A > 1 else parts[0][k] for k in parts[0]}
        model.check_token_ids(batch["x"], self.cfg.vocab_size)
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
        return S.params_of(self.step.state)

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
                       metrics=self.last_metrics or None, hf=self.hf_record, base=self.base_record)

    def save(self, best: bool = False) -> Path:
        """A checkpoint of the whole state; a run with a base leaves out the weights it keeps frozen
        (they are the base's, found again by `run_dir.load_run`). Rank 0 alone writes; other ranks return
        the path rank 0 writes."""
        if not self.main:
            return self.out / f"ckpt-{self.iter:08d}"
        frozen = {f"param.{k}" for k, s in self.spec.items() if not s.trainable and self.base_record}
        arrays = {k: self.B.to_numpy(v) for k, v in self.step.state.items() if k not in frozen}
        return save_checkpoint(self.out, arrays, self.meta().to_dict(), step=self.iter, keep=self.tc.keep,
                               best=best)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, progress: Progress | None = None) -> TrainResult:
        tc = self.tc
        start_iter, t_start = self.iter, time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = open(self.out / "metrics.jsonl" if self.main else os.devnull, "a", encoding="utf-8")  # noqa: SIM115
        interrupts = _Interrupts(self.log)
        tokens_per_iter = tc.batch_size * tc.grad_accum * self.cfg.block_size
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


def eval_step(B: Backend, cfg: ModelConfig, task: Task) -> Any:
    """One compiled forward graph of the task's evaluation outputs (params are an input)."""
    def fn(state: dict, p: dict[str, Array], batch: dict[str, Array]) -> tuple[tuple[Array, ...], dict]:
        return task.eval_outputs(B, cfg, p, batch), state
    return B.compile_step(fn, {})


def evaluate_task(B: Backend, cfg: ModelConfig, task: Task, params: dict[str, Array],
                  step: Any) -> dict[str, Any]:
    """The task's metrics (`Task.summarize`) over its validation batches, and any it measures otherwise."""
    batches = task.val_batches()
    outputs = [tuple(B.to_numpy(o) for o in step(params, {k: B.from_numpy(v) for k, v in b.items()}))
               for b in batches]
    return task.summarize(batches, outputs) | task.extra_metrics(B, cfg, params)


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def model_kind(arch: str) -> str:
    from twinlm.core.models import family

    return family(arch).KIND


def classify_examples(tc: TrainConfig) -> tuple[list[C.Example], list[C.Example]]:
    if tc.data is None:
        return C.builtin_examples("train"), C.builtin_examples("val")
    return C.split_examples(C.read_examples(tc.data), tc.seed)


def default_out_dir(tc: TrainConfig) -> Path:
    name = sort_task.NAME if tc.data is None else Path(tc.data).stem or "run"
    if tc.task == "classify":
        return Path("runs") / f"{Path(tc.base or 'base').name}-{'classify' if tc.data is None else name}"
    if tc.arch not in (None, "gpt"):
        name = f"{name}-{tc.arch}"
    return Path("runs") / name


class Progress:
    """A live rich progress bar on a terminal; plain log lines otherwise (or nothing if `console` is None)."""

    def __init__(self, console: Any, every: int = 100, eval_every: int = 0) -> None:
        self.console, self.every, self.eval_every = console, every, eval_every
        self._bar: Any = None
        self.fields: dict[str, Any] = {"loss": None, "val_loss": None, "tokens_per_s": None, "accuracy": None}

    def start(self, done: int, total: int) -> None:
        self.total = total
        if self.console is None or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self._task = self._bar.add_task("train", total=total, completed=done, stats="")
        self._bar.start()

    def update(self, it: int, **values: Any) -> None:
        self.fields.update(values)
        if self.console is None:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=it, stats=self.describe())
            return
        # Plain lines: each evaluation, and every `every` iterations between evaluations.
        at_eval = it == self.total or bool(self.eval_every and it % self.eval_every == 0)
        if "val_loss" in values or (it % self.every == 0 and not at_eval):
            self.console.print(f"iter {it}/{self.total} {self.describe()}", highlight=False)

    def describe(self) -> str:
        f = self.fields
        parts = [f"loss {f['loss']:.4f}" if f["loss"] is not None else "loss -"]
        if f["val_loss"] is not None:
            parts.append(f"val {f['val_loss']:.4f}")
        if f["accuracy"] is not None:
            parts.append(f"acc {f['accuracy']:.1%}")
        if f["tokens_per_s"]:
            parts.append(f"{f['tokens_per_s']:,.0f} tok/s")
        return "  ".join(parts)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def evaluate_loss(B: Backend, cfg: ModelConfig, params: dict[str, Array], tokens: np.ndarray,
                  batch_size: int = 32, max_windows: int | None = None) -> tuple[float, int]:
    """(mean next-token loss, tokens scored) over consecutive non-overlapping block_size windows of
    `tokens`, with one compiled graph of fixed shape (the last batch is padded with zero-weight rows)."""
    T = cfg.block_size
    n_win = (len(tokens) - 1) // T
    if n_win < 1:
        raise TwinlmError(f"{len(tokens)} tokens are fewer than block_size + 1 = {T + 1}; nothing to score")
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    tokens = np.asarray(tokens[:n_win * T + 1], dtype=np.int32)
    model.check_token_ids(tokens, cfg.vocab_size)
    x_all, y_all = tokens[:-1].reshape(n_win, T), tokens[1:].reshape(n_win, T)
    b = min(batch_size, n_win)

    def fn(state: dict, p: dict[str, Array], x: Array, y: Array, w: Array) -> tuple[tuple[Array], dict]:
        return (B.cross_entropy(model.logits(B, cfg, p, x), y, w) * B.sum(w),), state
    step = B.compile_step(fn, {})
    total = 0.0
    for i in range(0, n_win, b):
        x, y = np.zeros((b, T), np.int32), np.zeros((b, T), np.int32)
        w = np.zeros((b, T), np.float32)
        rows = min(b, n_win - i)
        x[:rows], y[:rows], w[:rows] = x_all[i:i + rows], y_all[i:i + rows], 1.0
        (s,) = step(params, B.from_numpy(x), B.from_numpy(y), B.from_numpy(w))
        total += float(B.to_numpy(s))
    return total / (n_win * T), n_win * T
