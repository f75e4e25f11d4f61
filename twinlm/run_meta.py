"""The run's record in every checkpoint (meta.json), typed: the trainer writes one, and every command
that reads a run (resume, sample, eval, predict, finetune) gets its fields checked here, once, instead of
reading a dict by string keys. Checkpoints written before a field existed load with its default."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from twinlm.core.config import ModelConfig
from twinlm.core.errors import ConfigError, TwinlmError
from twinlm.core.tokenizers import pack_record, unpack_record


@dataclass
class RunMeta:
    model: ModelConfig
    tokenizer: dict[str, Any]  # `Tokenizer.to_dict()` ("hf_json" maybe packed): `tokenizer_from_dict`
    iter: int = 0
    train: dict[str, Any] = field(default_factory=dict)  # `TrainConfig.to_dict()`
    task: str | None = None  # "sort" (the built-in task), "lm", "mlm" or "classify"
    task_state: dict[str, Any] | None = None  # where the task's batch sequence is (for resume)
    labels: list[str] = field(default_factory=list)  # a classifier's, in class-index order
    backend: str | None = None
    device: dict[str, Any] | None = None  # `Backend.device_info()`: device, name, memory, float64, TF32
    versions: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    optimizer: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0
    best_val_loss: float | None = None
    data_source: str | None = None
    metrics: dict[str, Any] | None = None  # the last evaluation's
    hf: dict[str, Any] | None = None  # an imported Hugging Face model's architecture and config files
    base: dict[str, Any] | None = None  # {"run", "sha256"}: the pretrained run this one's frozen weights are
    dtype: str = "float32"  # what the run computes in (`--dtype`, an imported model's own); resume keeps it

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        out["tokenizer"] = unpack_record(self.tokenizer)
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "checkpoint") -> RunMeta:
        """Check types field by field; anything wrong is one TwinlmError naming the field."""
        if not isinstance(d, dict):
            raise TwinlmError(f"{where}'s meta is not a JSON object")
        d = dict(d)
        if "task_state" not in d and "batcher" in d:  # checkpoints from before tasks
            d["task_state"] = d["batcher"]
        try:
            model = ModelConfig.from_dict(d.get("model"))  # type: ignore[arg-type]
        except (ConfigError, TypeError, AttributeError) as e:
            raise TwinlmError(f"{where} has no valid model config in its meta ({e})") from None
        kinds: dict[str, tuple[type, ...]] = {
            "tokenizer": (dict,), "iter": (int,), "train": (dict,), "task": (str, type(None)),
            "task_state": (dict, type(None)), "labels": (list,), "backend": (str, type(None)),
            "device": (dict, type(None)), "versions": (dict,), "seed": (int, type(None)),
            "optimizer": (dict,), "skipped": (int,),
            "best_val_loss": (int, float, type(None)), "data_source": (str, type(None)),
            "metrics": (dict, type(None)), "hf": (dict, type(None)),
            "base": (dict, type(None)), "dtype": (str,)}
        values: dict[str, Any] = {}
        for name, types in kinds.items():
            if name not in d or (d[name] is None and name in ("labels", "train", "versions", "optimizer")):
                continue
            if not isinstance(d[name], types) or isinstance(d[name], bool):
                raise TwinlmError(f"{where}'s meta has a bad {name!r}: {str(d[name])[:60]!r}")
            values[name] = d[name]
        if "tokenizer" not in values:
            raise TwinlmError(f"{where} has no tokenizer in its meta")
        if values.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
            raise TwinlmError(f"{where}'s meta has an unknown dtype {values['dtype']!r}")
        if not all(isinstance(lab, str) for lab in values.get("labels", [])):
            raise TwinlmError(f"{where}'s meta has labels that are not strings")
        # Its tokenizer.json text (MBs, a pretrained model's) kept packed, shared with its tokenizer
        values["tokenizer"] = pack_record(values["tokenizer"])
        return cls(model=model, **values)
