"""A run's settings: `TrainConfig` (each field's help is the `train` option's help), the model and optimizer
configs made from it, and TOML files of settings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from twinlm.core import optim
from twinlm.core import task as sort_task
from twinlm.core.config import PRESETS, ModelConfig
from twinlm.core.corpus import corpus_name
from twinlm.core.errors import ConfigError, TwinlmError
from twinlm.core.models import FAMILIES

# Model settings a user may set on `train`; a resumed run keeps the checkpoint's.
MODEL_FIELDS = ("n_layer", "n_head", "d_model", "block_size", "dropout", "arch", "n_kv_head", "d_ff",
                "pos_encoding", "norm", "activation", "tie_embeddings", "residual")
TASKS = ("auto", "lm", "mlm", "classify")
# The default model for the built-in task; `twinlm train` with no arguments trains it.
DEFAULT_MODEL = dict(n_layer=2, n_head=4, d_model=64, block_size=32)


def _f(default: Any, help: str = "", cli: bool = True) -> Any:
    """A field with its help text; `cli=False`: set in a TOML file or by `finetune`, not a `train` flag."""
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass
class TrainConfig:
    """Every setting of a run. Model fields left None come from the preset (or the checkpoint). The
    `train` command's options for plain fields are generated from these fields and their help."""

    data: str | list[str] | None = _f(None, "Corpus: a file, a folder or a glob of .txt, .md or .jsonl "
                                            "({\"text\": ...} rows) files, or .gz of them, streamed into the "
                                            "token cache; several as a list. Or chat data: a .jsonl of "
                                            "messages or prompt/completion rows, or a folder with "
                                            "train.jsonl and valid.jsonl (default: the built-in task).")
    task: str = _f("auto", "Next tokens (lm, decoders) or masked tokens (mlm, encoders); default: by arch. "
                           "classify: fine-tune `base` with a head.")
    base: str | None = _f(None, "Start from the model in RUN_DIR (a run, or an imported Hugging Face model) "
                                "and fine-tune it on --data; --block-size may shorten its training window.")
    freeze_base: bool = _f(False, "Train only the head (and BERT's pooler).", cli=False)
    from_scratch: bool = _f(False, "The base's model and tokenizer with fresh weights: the baseline "
                                   "fine-tuning should beat.", cli=False)
    lora_rank: int = _f(0, "Train rank-R adapters on the frozen base (LoRA) instead of every weight.")
    lora_alpha: float | None = _f(None, "Adapter scale alpha / rank (default 2 x rank).")
    lora_targets: str | None = _f(None, "Comma-separated layers to adapt: attn.qkv, attn.proj, mlp.fc, "
                                        "mlp.proj, qkv, fc or all (the default).")
    lora_dropout: float = _f(0.0, "Dropout on the adapters' input (default 0).")
    arch: str | None = _f(None, f"Model family: {', '.join(FAMILIES)} (default gpt).")
    n_kv_head: int | None = _f(None, "Key/value heads (grouped-query attention).")
    d_ff: int | None = _f(None, "Feed-forward width (default 4 x d-model; SwiGLU 8/3).")
    pos_encoding: str | None = _f(None, "Positions (default: the family's: gpt/bert learned, llama rope).")
    norm: str | None = _f(None, "Default: the family's.")
    activation: str | None = _f(None, "Default: the family's.")
    tie_embeddings: bool | None = _f(None, "Output head shares the token embedding.")
    residual: bool | None = _f(None, "False: decoder blocks without skip connections (an ablation).",
                               cli=False)
    tokenizer: str = _f("char", "Default: char.")
    errors: str = _f("strict", "Invalid UTF-8 in the corpus: refuse it (strict, the default), substitute "
                               "U+FFFD (replace) or drop the bytes (skip).")
    bpe_sample_mb: int = _f(64, "BPE learns its merges from the first N MB of the corpus (default 64; 0: all "
                                "of it).")
    vocab_size: int | None = _f(None, "BPE vocabulary size.")
    out: str | None = _f(None, "Run directory (default: runs/<data name>).")
    preset: str = _f("default", "Model size: default, tiny, small, baby, medium (baby and medium also set "
                                "batch size, lr and iterations, unless given).")
    n_layer: int | None = _f(None, "Transformer blocks (default: the preset's).")
    n_head: int | None = _f(None, "Attention heads (default: the preset's).")
    d_model: int | None = _f(None, "Model width (default: the preset's).")
    block_size: int | None = _f(None, "Context length in tokens (default: the preset's).")
    dropout: float | None = _f(None, "Dropout rate (default 0).")
    batch_size: int = _f(32, "Windows per micro-batch (default: 32, or the preset's).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    max_iters: int = _f(2000, "Total iterations of the run (default: 2000, or the preset's); resuming at 10 "
                              "with 20 runs 10 more.")
    lr: float = _f(3e-3, "Peak learning rate (default: 3e-3, or the preset's).")
    min_lr: float | None = _f(None, "Final learning rate of the cosine decay (default: lr / 10).")
    warmup: int = _f(100, "Linear warm-up iterations (default 100).")
    lr_decay_iters: int | None = _f(None, "Cosine decay length (default: max-iters).")
    weight_decay: float = _f(0.1, "AdamW's decoupled weight decay, on tensors with ndim >= 2 (default 0.1).")
    grad_clip: float = _f(1.0, "Global gradient-norm clip (default 1.0).")
    eval_every: int = _f(500, "Iterations between evaluations and checkpoints (default 500).")
    eval_iters: int = _f(20, "Validation batches per evaluation (default 20).")
    log_every: int = _f(10, "Iterations between metrics lines (default 10).")
    seed: int = _f(1337, "Seed of weights, batches and dropout (default 1337).")
    keep: int = _f(3, "Checkpoints to keep (plus the best).")
    grad_checkpoint: bool = _f(False, "Recompute each block's activations in the backward pass instead of "
                                      "keeping them: less memory for about a third more compute (MLX; "
                                      "decoders).")
    dtype: str | None = _f(None, "float32 (default), bfloat16 or float16: the forward and backward in "
                                 "that dtype over float32 master weights and AdamW moments (float16 with "
                                 "dynamic loss scaling); a resumed run keeps its own.")
    mask_prompt: bool | None = _f(None, "Chat data: learn only the assistant's tokens (default: on for "
                                        "messages and prompt/completion rows).")

    def check(self) -> None:
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            raise TwinlmError(f"unknown dtype {self.dtype!r}: choose float32, bfloat16 or float16")
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


def default_out_dir(tc: TrainConfig) -> Path:
    name = sort_task.NAME if tc.data is None else corpus_name(tc.data)
    if tc.task == "classify":
        return Path("runs") / f"{Path(tc.base or 'base').name}-{'classify' if tc.data is None else name}"
    if tc.arch not in (None, "gpt"):
        name = f"{name}-{tc.arch}"
    return Path("runs") / name
