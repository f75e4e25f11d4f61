"""Next-token language modelling on a corpus: x is a window, y the same window shifted by one."""

from __future__ import annotations

from typing import Any

from twinlm.core import model
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.data import Batcher, Dataset
from twinlm.tasks import Batch, Task


class CausalLM(Task):
    name = "lm"

    def __init__(self, ds: Dataset, batch_size: int, block_size: int, seed: int, eval_iters: int) -> None:
        self.ds = ds
        self.batcher = Batcher(ds.train, batch_size, block_size, seed)
        val = Batcher(ds.val, batch_size, block_size, seed + 1)
        self._val = [self._batch(*val.next()) for _ in range(eval_iters)]

    @staticmethod
    def _batch(x: Any, y: Any) -> Batch:
        return {"x": x, "y": y}

    def next_batch(self, it: int) -> Batch:
        return self._batch(*self.batcher.next())

    def val_batches(self) -> list[Batch]:
        return self._val

    def loss(self, B: Backend, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
             drop: dict[str, Array]) -> Array:
        return model.lm_loss_fn(B, cfg)(p, batch, drop)

    def state(self) -> dict[str, Any]:
        return self.batcher.state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.batcher.set_state(state)
