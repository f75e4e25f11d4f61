"""Evaluation: a task's metrics over its validation batches, and the loss of a model on any token stream,
each with one compiled forward graph of fixed shape."""

from __future__ import annotations

from typing import Any

import numpy as np

from twinlm.core import model
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.tasks import Task


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


def evaluate_loss(B: Backend, cfg: ModelConfig, params: dict[str, Array], tokens: np.ndarray,
                  batch_size: int = 32, max_windows: int | None = None,
                  window: int | None = None) -> tuple[float, int]:
    """(mean next-token loss, tokens scored) over consecutive non-overlapping windows of `window` positions
    (default block_size; see `tasks.run_window`) of `tokens`, with one compiled graph of fixed shape (the
    last batch is padded with zero-weight rows)."""
    T = window or cfg.block_size
    if not 0 < T <= cfg.block_size:
        raise TwinlmError(f"a window of {T} tokens: this model reads 1 to {cfg.block_size}")
    n_win = (len(tokens) - 1) // T
    if n_win < 1:
        raise TwinlmError(f"{len(tokens)} tokens are fewer than the window + 1 = {T + 1}; nothing to score")
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    b = min(batch_size, n_win)

    def fn(state: dict, p: dict[str, Array], x: Array, y: Array, w: Array) -> tuple[tuple[Array], dict]:
        return (model.lm_loss(B, cfg, p, x, y, w) * B.sum(w),), state
    step = B.compile_step(fn, {})
    total = 0.0
    for i in range(0, n_win, b):
        x, y = np.zeros((b, T), np.int32), np.zeros((b, T), np.int32)
        w = np.zeros((b, T), np.float32)
        rows = min(b, n_win - i)
        # one batch of windows at a time: a memory-mapped token file is never copied whole
        part = np.asarray(tokens[i * T:(i + rows) * T + 1], dtype=np.int32)
        model.check_token_ids(part, cfg.vocab_size)
        x[:rows], y[:rows], w[:rows] = part[:-1].reshape(rows, T), part[1:].reshape(rows, T), 1.0
        (s,) = step(params, B.from_numpy(x), B.from_numpy(y), B.from_numpy(w))
        total += float(B.to_numpy(s))
    return total / (n_win * T), n_win * T
