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
from twinlm.core.errors import TwinlmError

Batch = dict[str, np.ndarray]

# The window a pretrained model trains and is evaluated on unless --block-size says otherwise: its context,
# at most this (mlx-lm's default max_seq_length). Imported models declare contexts of 32K-131K positions,
# which no laptop trains on and which a short validation split cannot even fill.
DEFAULT_WINDOW = 2048


def training_window(block_size: int, asked: int | None, from_base: bool) -> int:
    """The window (positions per example) a run trains on: a fresh model's block size; for a run from a
    base, --block-size (2 to the base's block size), else the base's context up to DEFAULT_WINDOW. The one
    notion of the window: batches, evaluation, token counts, throughput and FLOPs all use it."""
    if not from_base:
        return block_size
    if asked is None:
        return min(block_size, DEFAULT_WINDOW)
    if not 1 < asked <= block_size:
        raise TwinlmError(f"--block-size {asked}: the base model reads 2 to {block_size} tokens")
    return asked


def run_window(cfg: ModelConfig, train: dict[str, Any]) -> int:
    """The window of a saved run (its `RunMeta.train` settings): what it trained on, or for a model that
    never trained as it is (imported, or merged from adapters: no settings) its context up to
    DEFAULT_WINDOW."""
    from_base = not train or train.get("base") is not None
    return training_window(cfg.block_size, train.get("block_size") if train else None, from_base)


class Task:
    """The interface every task implements (see the module docstring)."""

    name: str = "task"
    metric: str | None = None  # the headline metric `summarize` reports besides val_loss, if any
    window: int = 0  # positions per example: every batch's "x" is (batch_size, window)

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


class ExampleTask(Task):
    """A task over a fixed set of examples (the rows of `self.train`), visited epoch by epoch: epoch e in
    permutation (seed, ORDER_SALT, e), so the whole batch sequence is a function of the count drawn, which
    is all a checkpoint keeps. Subclasses set `self.train`, `self._val`, `self.seed` and `self.b`."""

    ORDER_SALT = 0  # keeps each task's order its own for the same seed
    train: Batch
    _val: list[Batch]
    seed: int
    b: int
    drawn: int = 0
    _epoch: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, self.ORDER_SALT, epoch])
            self._epoch = (epoch, rng.permutation(len(next(iter(self.train.values())))))
        return self._epoch[1]

    def next_batch(self, it: int) -> Batch:
        n = len(next(iter(self.train.values())))
        picks = [self._order(k // n)[k % n] for k in range(self.drawn, self.drawn + self.b)]
        self.drawn += self.b
        return {k: v[picks] for k, v in self.train.items()}

    def val_batches(self) -> list[Batch]:
        return self._val

    def state(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def set_state(self, state: dict[str, Any]) -> None:
        try:
            self.drawn = int(state["drawn"])
        except (KeyError, TypeError, ValueError) as e:
            raise TwinlmError(f"invalid {self.name} task state in the checkpoint: {e}") from None
