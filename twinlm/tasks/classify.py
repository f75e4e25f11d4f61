"""Text classification through a classification head (fine-tuning).

Data: a CSV file with `text` and `label` columns, a JSONL file of {"text": ..., "label": ...} objects,
or the built-in task (below). Texts are encoded with the base run's tokenizer; an encoder reads
[CLS] + text and pools position 0, a decoder reads the text and pools its last token. Rows are padded
to the training window ([PAD], masked out of an encoder's attention; a decoder's causal mask already keeps
padding after the pooled token out of it).

The built-in task speaks the language of the built-in sort corpus: "51940>01459" is labelled "yes"
(the right side is the left side's digits sorted) or "no" (half the wrong ones have two neighbouring
digits swapped, so the right side is unsorted; half have one digit changed and then re-sorted, so it is
sorted but holds different digits). Strings held out of the sort corpus are the validation split.
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core import model
from twinlm.core import task as sort_task
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.core.layers import padding_mask
from twinlm.core.tokenizers import Tokenizer
from twinlm.tasks import Batch, ExampleTask

Example = tuple[str, str]
BUILTIN = "builtin:sorted-or-not"
BUILTIN_TRAIN, BUILTIN_VAL = 8000, 500


def _builtin_line(digits: tuple[int, ...], rng: np.random.Generator) -> Example:
    left, right = "".join(map(str, digits)), sorted(digits)
    if rng.random() < 0.5:
        return f"{left}>{''.join(map(str, right))}", "yes"
    if rng.random() < 0.5 and len(set(right)) > 1:  # swap two unequal neighbours: unsorted
        i = int(rng.choice([k for k in range(len(right) - 1) if right[k] != right[k + 1]]))
        right[i], right[i + 1] = right[i + 1], right[i]
    else:  # change one digit, keep it sorted: the wrong digits
        i = int(rng.integers(len(right)))
        right[i] = (right[i] + int(rng.integers(1, 10))) % 10
        right.sort()
    return f"{left}>{''.join(map(str, right))}", "no"


@lru_cache(maxsize=2)  # a fine-tune reads it for its labels and again for its batches
def builtin_examples(split: str) -> list[Example]:
    """The built-in task's examples; "val" draws only from strings held out of the sort corpus."""
    held_out = split == "val"
    n = BUILTIN_VAL if held_out else BUILTIN_TRAIN
    rng = np.random.default_rng([sort_task.CORPUS_SEED, 2 if held_out else 1])
    return [_builtin_line(d, rng) for d in sort_task._strings(n, 7 + held_out, held_out=held_out)]


def read_examples(path: str | Path) -> list[Example]:
    """(text, label) rows of a CSV (with `text` and `label` columns) or JSONL file."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TwinlmError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TwinlmError(f"cannot read {path} as UTF-8 text: {e}") from None
    rows: list[Any]
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TwinlmError(f"{path}:{n} is not a JSON object: {e.msg}") from None
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(raw.splitlines())
        missing = [c for c in ("text", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise TwinlmError(f"{path} has no {' or '.join(missing)} column (its header: "
                              f"{', '.join(reader.fieldnames or []) or 'empty'})")
        rows = list(reader)
    else:
        raise TwinlmError(f"{path}: classification data must be .csv (text,label) or .jsonl")
    out = []
    for n, row in enumerate(rows, 1):
        has_text = isinstance(row, dict) and isinstance(row.get("text"), str)
        if not has_text or row.get("label") in (None, ""):
            raise TwinlmError(f"{path}: example {n} needs a text string and a label")
        out.append((row["text"], str(row["label"])))
    if not out:
        raise TwinlmError(f"{path} has no examples")
    return out


def split_examples(examples: list[Example], seed: int, val_fraction: float = 0.1) -> tuple[list, list]:
    """A seeded shuffle, then the last val_fraction (at least one) for validation."""
    order = np.random.default_rng([seed, 5]).permutation(len(examples))
    n_val = max(1, int(len(examples) * val_fraction))
    if len(examples) - n_val < 1:
        raise TwinlmError(f"{len(examples)} examples are too few to split into training and validation")
    shuffled = [examples[i] for i in order]
    return shuffled[:-n_val], shuffled[-n_val:]


def check_labels(examples: list[Example], labels: list[str]) -> None:
    unknown = sorted({lab for _, lab in examples} - set(labels))
    if unknown:
        raise TwinlmError(f"label {unknown[0]!r} was never seen in training (the model knows: "
                          f"{', '.join(labels)})")


def encode_examples(texts: list[str], tok: Tokenizer, cfg: ModelConfig, window: int | None = None) -> Batch:
    """{"x": (n, T) ids, "pool": (n, T) one-hot of the pooled position, "mask": (n, 1, 1, T) for an
    encoder}, T the window (default the block size). Texts longer than the window are cut at its end."""
    T, encoder = window or cfg.block_size, cfg.kind == "encoder"
    x = np.zeros((len(texts), T), np.int32)
    pool = np.zeros((len(texts), T), np.float32)
    lengths = np.zeros(len(texts), np.int64)
    for i, text in enumerate(texts):
        try:
            ids = tok.encode(text)
        except TwinlmError as e:
            raise TwinlmError(f"text {text[:40]!r} does not fit the base run's tokenizer: {e}") from None
        if encoder:
            x[i, :] = tok.id_of("[PAD]")
            ids = np.concatenate([[tok.id_of("[CLS]")], ids])
        elif len(ids) == 0:
            raise TwinlmError("an empty text has no token for a decoder to classify")
        ids = ids[:T]
        x[i, :len(ids)], lengths[i] = ids, len(ids)
        pool[i, 0 if encoder else len(ids) - 1] = 1.0
    out = {"x": x, "pool": pool}
    if encoder:
        out["mask"] = padding_mask(lengths, T)
    return out


def class_logits(B: Backend, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
                 drop: dict[str, Array] | None = None) -> Array:
    return model.classify(B, cfg, p, batch["x"], batch["pool"], dropout=drop, mask=batch.get("mask"))


class Classify(ExampleTask):
    name = "classify"
    metric = "accuracy"
    ORDER_SALT = 6

    def __init__(self, train: list[Example], val: list[Example], labels: list[str], tok: Tokenizer,
                 cfg: ModelConfig, batch_size: int, seed: int, window: int | None = None) -> None:
        check_labels(val, labels)
        self.labels, self.tok, self.cfg, self.seed, self.b = labels, tok, cfg, seed, batch_size
        self.window = window or cfg.block_size
        self.train = self._encode(train)
        self._val = [self._encode(val[i:i + batch_size], pad_to=batch_size)
                     for i in range(0, len(val), batch_size)]

    def _encode(self, examples: list[Example], pad_to: int = 0) -> Batch:
        """Encoded examples; with pad_to, padded with weight-0 copies of the first row to that many."""
        texts, labs = [t for t, _ in examples], [self.labels.index(lab) for _, lab in examples]
        batch = encode_examples(texts, self.tok, self.cfg, self.window)
        batch["y"], batch["w"] = np.array(labs, np.int32), np.ones(len(texts), np.float32)
        extra = max(0, pad_to - len(texts))
        if extra:
            batch = {k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in batch.items()}
            batch["w"][-extra:] = 0.0
        return batch

    def loss(self, B: Backend, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
             drop: dict[str, Array]) -> Array:
        return B.cross_entropy(class_logits(B, cfg, p, batch, drop), batch["y"], batch["w"])

    def eval_outputs(self, B: Backend, cfg: ModelConfig, p: dict[str, Array],
                     batch: dict[str, Array]) -> tuple[Array, ...]:
        return (class_logits(B, cfg, p, batch),)

    def summarize(self, batches: list[Batch], outputs: list[tuple[np.ndarray, ...]]) -> dict[str, Any]:
        logits = np.concatenate([o[0] for o in outputs]).astype(np.float64)
        y = np.concatenate([b["y"] for b in batches])
        w = np.concatenate([b["w"] for b in batches]) > 0
        return classification_metrics(logits[w], y[w], self.labels)


def classification_metrics(logits: np.ndarray, y: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Loss, accuracy and the confusion matrix (rows: true label, columns: predicted)."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    pred = logits.argmax(axis=1)
    confusion = np.zeros((len(labels), len(labels)), np.int64)
    np.add.at(confusion, (y, pred), 1)
    return {"val_loss": float(-logp[np.arange(len(y)), y].mean()), "accuracy": float((pred == y).mean()),
            "confusion": confusion.tolist(), "labels": list(labels), "n": int(len(y))}
