"""Assembling a run: the resumed checkpoint or the base model, the task and its data, the tokenizer and the
state to start from. Each function returns what it builds; nothing here mutates the caller's TrainConfig
(settings that change, such as resolved paths, come back in a new one)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core import chat as chat_data
from twinlm.core import dtypes as DT
from twinlm.core import model, quant
from twinlm.core import spec as SP
from twinlm.core import step as S
from twinlm.core.config import ModelConfig, lora_targets
from twinlm.core.corpus import resolve_data
from twinlm.core.data import Dataset, check_fits, prepare
from twinlm.core.errors import ConfigError, TwinlmError
from twinlm.core.models import family
from twinlm.core.tensorfile import content_digest
from twinlm.core.tokenizers import Tokenizer, tokenizer_from_dict
from twinlm.run_dir import load_model, load_run
from twinlm.run_meta import RunMeta
from twinlm.tasks import Task, run_window, training_window
from twinlm.tasks import chat as chat_task
from twinlm.tasks import classify as C
from twinlm.tasks.lm import CausalLM, SortTask
from twinlm.tasks.mlm import MaskedLM, encoder_tokenizer
from twinlm.trainer.config import MODEL_FIELDS, TrainConfig, config_keys, default_out_dir, model_config


@dataclass
class Base:
    """The pretrained run a fine-tune starts from."""

    cfg: ModelConfig  # with the classification head and adapters of this run
    tokenizer: Tokenizer
    params: dict[str, np.ndarray]
    labels: list[str]
    hf: dict[str, Any] | None  # its Hugging Face origin, if imported
    record: dict[str, Any]  # {"run", "sha256"}: written into this run's checkpoints


@dataclass
class RunSetup:
    """Everything a Trainer needs to start or continue a run."""

    tc: TrainConfig  # the effective settings (the checkpoint's merged with the new ones; paths absolute)
    out: Path
    cfg: ModelConfig
    task: Task
    ds: Dataset | None  # None for classification (its examples live in the task)
    tokenizer: Tokenizer
    labels: list[str]
    spec: SP.Spec
    state: dict[str, np.ndarray]  # parameters and AdamW moments to start from
    meta: RunMeta | None  # the resumed checkpoint's record
    hf_record: dict[str, Any] | None
    base_record: dict[str, Any] | None


def assemble(tc: TrainConfig, *, resume: str | Path | None = None, split: int = 1,
             report: dict[str, Any] | None = None) -> RunSetup:
    """The run `tc` describes, or the one saved in `resume` continued with `tc`'s changed settings. `split`
    (ranks x devices) must divide the batch; `report` ({"log", "progress"}) shows the corpus preparation."""
    meta: RunMeta | None = None
    arrays: dict[str, np.ndarray] | None = None
    out: Path | None = None
    if resume is not None:
        arrays, meta = load_run(resume)
        run_dir = Path(resume)
        if (run_dir / "manifest.json").exists():  # a checkpoint dir was named: its run dir continues
            run_dir = run_dir.parent
        # Where the run lives now (it may have been moved), unless --out sends it elsewhere.
        out = Path(tc.out) if tc.out else run_dir
        if tc.dtype is not None and tc.dtype != meta.dtype:
            raise TwinlmError(f"--dtype {tc.dtype}: {resume} was trained in {meta.dtype}; a resumed run "
                              "keeps its dtype")
        tc = merge_resumed(tc, meta)
        tc = replace(tc, dtype=meta.dtype)
    tc.check()
    if tc.batch_size % split:
        raise TwinlmError(f"batch size {tc.batch_size} does not split evenly over {split} ranks/devices; "
                          f"use a multiple of {split}")
    # Absolute, so a resume from another working directory finds them.
    tc = replace(tc, **{k: resolve_data(getattr(tc, k)) for k in ("data", "base")
                        if getattr(tc, k) is not None})
    base: Base | None = None
    cfg: ModelConfig | None = None  # None: from the flags and the corpus's tokenizer
    tok: Tokenizer | None = None
    labels: list[str] = []
    hf_record = base_record = None
    if meta is not None:
        cfg, tok, labels = meta.model, tokenizer_from_dict(meta.tokenizer), meta.labels
        hf_record, base_record = meta.hf, meta.base
    elif tc.base is not None:
        base = from_base(tc)
        cfg, tok, labels, hf_record, base_record = base.cfg, base.tokenizer, base.labels, base.hf, base.record
    out = out or Path(tc.out or default_out_dir(tc))
    tc = replace(tc, out=str(out))
    cfg, task, ds = build_task(tc, cfg, tok, labels, hf_record, report or {})
    tokenizer = ds.tokenizer if ds is not None else tok
    assert tokenizer is not None
    spec = model.param_spec(cfg)
    if tc.freeze_base:  # train only what the pretrained model did not: the head (and BERT's pooler)
        spec = SP.frozen_except(spec, model.new_parameters(cfg, spec))
    if arrays is not None:
        state = check_state(spec, arrays)
    else:
        params = SP.init_params(spec, tc.seed)
        if base is not None and not tc.from_scratch:  # the base's weights; the head stays fresh
            params.update({k: _float32(v) for k, v in base.params.items() if k in params})
        state = S.init_state(params, spec)
    state = in_dtype(state, spec, tc.dtype or "float32")
    return RunSetup(tc=tc, out=out, cfg=cfg, task=task, ds=ds, tokenizer=tokenizer, labels=labels, spec=spec,
                    state=state, meta=meta, hf_record=hf_record, base_record=base_record)


def from_base(tc: TrainConfig) -> Base:
    """The base run's model (with a classification head for classify, adapters for LoRA), its tokenizer,
    weights and the labels; with the base's digest and Hugging Face origin."""
    fixed = [k for k in MODEL_FIELDS if k not in ("dropout", "block_size") and getattr(tc, k) is not None]
    if fixed:
        raise TwinlmError(f"--{fixed[0].replace('_', '-')} shapes a new model; a run from a base keeps "
                          "the base's model")
    base_cfg, params, tok, base_meta = load_model(tc.base)  # type: ignore[arg-type]
    if base_cfg.lora_rank:
        raise TwinlmError(f"{tc.base} is itself a LoRA run: merge it first (twinlm merge-lora)")
    if base_cfg.quant_bits and not tc.lora_rank and not tc.freeze_base:  # (only its float parts would train)
        raise TwinlmError(f"{tc.base} is quantized ({base_cfg.quant_bits}-bit): its weights train only "
                          "through adapters (--lora-rank R: QLoRA), or stay frozen under a task head "
                          "(finetune --freeze-base)")
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
    record = {"run": str(Path(str(tc.base)).resolve()), "sha256": content_digest(params)}
    return Base(cfg, tok, params, labels, base_meta.hf, record)


def build_task(tc: TrainConfig, cfg: ModelConfig | None, tok: Tokenizer | None, labels: list[str],
               hf_record: dict[str, Any] | None,
               report: dict[str, Any]) -> tuple[ModelConfig, Task, Dataset | None]:
    """(model config, task, corpus) of the run; a fresh run's config comes from the flags and the
    tokenizer trained on its corpus (plus [PAD], [MASK], [CLS] for an encoder)."""
    if tc.task == "classify":
        assert cfg is not None and tok is not None
        train, val = classify_examples(tc)
        window = training_window(cfg.block_size, tc.block_size, tc.base is not None)
        return cfg, C.Classify(train, val, labels, tok, cfg, tc.batch_size, tc.seed, window), None
    # Chat data: a .jsonl (or a folder's train.jsonl) whose rows have `messages` or `prompt`/`completion`
    # trains the chat task (with the base's chat template, from hf_record); any other --data is a corpus.
    if tc.task in ("auto", "lm") and chat_data.sniff(tc.data):
        return chat_task.build(tc, cfg, tok, hf_record, lambda v: model_config(tc, v))
    if cfg is None:
        ds = prepare(tc.data, tokenizer=tc.tokenizer, vocab_size=tc.vocab_size, errors=tc.errors,
                     bpe_sample_mb=tc.bpe_sample_mb, **report)
        if family(tc.arch or "gpt").KIND == "encoder":
            ds.tokenizer = encoder_tokenizer(ds.tokenizer)
        cfg = model_config(tc, ds.tokenizer.vocab_size)
    else:
        ds = prepare(tc.data, tok=tok, errors=tc.errors, **report)
    window = training_window(cfg.block_size, tc.block_size, tc.base is not None)
    kind = tc.task if tc.task != "auto" else ("mlm" if cfg.kind == "encoder" else "lm")
    if kind == "lm" and cfg.kind == "encoder":
        raise TwinlmError(f"--arch {cfg.arch} is an encoder: it trains on masked tokens (--task mlm)")
    if kind == "mlm" and cfg.kind == "decoder":
        raise TwinlmError(f"--arch {cfg.arch} is a causal decoder: it trains on next tokens (--task lm)")
    check_fits(ds, window, tc.batch_size)
    cls = MaskedLM if kind == "mlm" else SortTask if tc.data is None else CausalLM
    return cfg, cls(ds, tc.batch_size, window, tc.seed, tc.eval_iters), ds


def merge_resumed(tc: TrainConfig, meta: RunMeta) -> TrainConfig:
    """The checkpoint's settings, overridden by what the user set now (fields not at their default);
    model shape and data are the checkpoint's: a conflicting size flag is an error."""
    missing = [k for k in ("train", "task_state") if not getattr(meta, k)]
    if missing:
        raise TwinlmError(f"checkpoint meta is missing training state ({missing[0]}); cannot resume it")
    saved = meta.train
    model_dict = meta.model.to_dict()
    if saved.get("base") is not None:  # a run from a base: its --block-size is its window, which it keeps
        model_dict["block_size"] = run_window(meta.model, saved)
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
    if tc.data is not None and resolve_data(tc.data) != saved.get("data"):
        raise TwinlmError(f"--data {tc.data} differs from the checkpoint's data {saved.get('data')}; "
                          "a resumed run keeps its corpus")
    return TrainConfig(**merged)


def check_state(spec: SP.Spec, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The checkpoint's state arrays, checked against the model's (shapes, finite values)."""
    expected = S.state_shapes(spec)
    for k, shape in expected.items():
        if k not in arrays or arrays[k].shape != shape:
            raise TwinlmError(f"checkpoint state does not match its model config (at {k})")
    out = {}
    for k in expected:
        a = _float32(arrays[k])  # (a bfloat16 base's frozen weights are bits to numpy)
        if not np.all(np.isfinite(a)):
            raise TwinlmError(f"checkpoint state has non-finite values in {k}")
        out[k] = a
    for k in ("amp.scale", "amp.good"):  # float16's loss scale (core.step), where the run has one
        if k in arrays:
            out[k] = np.asarray(arrays[k], dtype=np.float32)
    return out


def in_dtype(state: dict[str, np.ndarray], spec: SP.Spec, dtype: str) -> dict[str, np.ndarray]:
    """The state of a run computing in `dtype`: float32 master weights and moments for what it trains, the
    frozen weights (a LoRA base) stored in `dtype` itself, but a quantized base as its format has it (words,
    float32 scales and biases); float16 adds its loss scale (`core.step`)."""
    out = {k: _float32(v) for k, v in state.items()}
    for k, s in spec.items():
        if not s.trainable and not k.endswith(quant.SUFFIXES):
            out[f"param.{k}"] = DT.to_host(out[f"param.{k}"], dtype)
    if dtype == "float16":
        out["amp.scale"] = np.asarray(state.get("amp.scale", S.AMP_INIT_SCALE), np.float32)
        out["amp.good"] = np.asarray(state.get("amp.good", 0.0), np.float32)
    return out


def _float32(a: np.ndarray) -> np.ndarray:
    """A state array in float32, but a quantized layer's packed words keep their integer dtype."""
    return a if a.dtype.kind in "ui" and not DT.is_bf16(a) else DT.as_float32(a)


def classify_examples(tc: TrainConfig) -> tuple[list[C.Example], list[C.Example]]:
    if tc.data is None:
        return C.builtin_examples("train"), C.builtin_examples("val")
    return C.split_examples(C.read_examples(tc.data), tc.seed)
