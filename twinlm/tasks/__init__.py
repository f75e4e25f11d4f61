"""Tasks: what a run trains on. Each gives batches (numpy dicts, the same on every backend), a loss
on the graph, and evaluation metrics; the trainer does not know which one it runs.

    lm        next-token prediction on a corpus (decoders); the built-in sort task adds exact-match accuracy
    mlm       masked-token prediction on a corpus (encoders): 15% of positions, 80/10/10 mask/random/keep
    classify  a label per text (CSV/JSONL, or the built-in generated task) through a classification head
"""

from __future__ import annotations

from typing import Any

import numpy as np

from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig

Batch = dict[str, np.ndarray]


class Task:
    """The interface every task implements (see the module docstring)."""

    name: str = "task"
    metric: str | None = None  # the headline metric `summarize` reports besides val_loss, if any

    def next_batch(self, it: int) -> Batch:
        """The training batch of iteration `it`, arrays with leading dim batch_size."""
        raise NotImplementedError

    def val_batches(self) -> list[Batch]:
        """Fixed validation batches: the same at every evaluation, so numbers are comparable."""
        raise NotImplementedError

    def loss(self, B: Backend, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
             drop: dict[str, Array]) -> Array:
        raise NotImplementedError

    def eval_outputs(self, B: Backend, cfg: ModelConfig, p: dict[str, Array],
                     batch: dict[str, Array]) -> tuple[Array, ...]:
        """What evaluation needs from the graph for one batch (summed on the host by `summarize`)."""
        return (self.loss(B, cfg, p, batch, {}),)

    def summarize(self, batches: list[Batch], outputs: list[tuple[np.ndarray, ...]]) -> dict[str, Any]:
        """Metrics from every validation batch's outputs; always has "val_loss"."""
        return {"val_loss": float(np.mean([float(o[0]) for o in outputs]))}

    def extra_metrics(self, B: Backend, cfg: ModelConfig, p: dict[str, Array]) -> dict[str, Any]:
        """Metrics measured other than from `eval_outputs` (e.g. by generating text)."""
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        pass
