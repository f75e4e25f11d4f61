"""Next-token language modelling on a corpus: x is a window, y the same window shifted by one. On the
built-in sort corpus, also the exact-match accuracy of greedy completions of held-out strings."""

from __future__ import annotations

from typing import Any

import numpy as np

from twinlm.core import model
from twinlm.core import task as sort
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.data import Batcher, Dataset
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import Tokenizer
from twinlm.tasks import Batch, Task


class CausalLM(Task):
    name = "lm"

    def __init__(self, ds: Dataset, batch_size: int, window: int, seed: int, eval_iters: int) -> None:
        self.ds, self.window = ds, window
        self.batcher = Batcher(ds.train, batch_size, window, seed)
        val = Batcher(ds.val, batch_size, window, seed + 1)
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


ACCURACY_EXAMPLES = 200  # held-out examples scored at each evaluation of the built-in task
TARGET_ACCURACY = 0.9  # the default `twinlm train` reaches it by ~1000 of its 2000 iterations


class SortTask(CausalLM):
    """The built-in task (`core.task`): next tokens on its corpus, scored by exact-match accuracy."""

    name = sort.NAME
    metric = "accuracy"

    def extra_metrics(self, B: Backend, cfg: ModelConfig, p: dict[str, Array]) -> dict[str, Any]:
        return {"accuracy": sort_accuracy(B, cfg, p, self.ds.tokenizer, ACCURACY_EXAMPLES)[0]}


def sort_accuracy(B: Backend, cfg: ModelConfig, params: dict[str, Array], tok: Tokenizer, n: int,
                  samples: int = 0) -> tuple[float, list[str]]:
    """Greedy exact-match accuracy of the built-in task on n held-out examples (one batch), and the first
    `samples` as display lines."""
    from twinlm.generate import generate

    examples = sort.eval_examples(n, seed=0)
    try:
        prompt = np.stack([tok.encode(p) for p, _ in examples]).astype(np.int32)
    except TwinlmError as e:
        raise TwinlmError(f"this model's tokenizer cannot encode the built-in task: {e}") from None
    cols = list(generate(B, cfg, params, prompt, sort.COMPLETION_LEN, temperature=0.0))
    completions = [tok.decode(row) for row in np.stack(cols, axis=1)]
    shown = [f"{p.strip()}{c.rstrip(chr(10)).replace(chr(10), '⏎')}  "
             f"{'ok' if sort.is_correct(c, e) else 'want ' + e.strip()}"
             for (p, e), c in zip(examples[:samples], completions[:samples], strict=True)]
    return sort.accuracy(completions, examples), shown
