"""Masked-token pretraining (BERT) on a corpus.

Each window starts with [CLS] (position 0, never masked, the position a classifier later reads).
15% of the other positions are selected (at least one per row); of those 80% become [MASK], 10% a
random ordinary token and 10% stay as they are. The loss is the cross-entropy of the original token at
selected positions only. Masks are drawn in numpy from a generator keyed by (seed, iteration), so
both backends see the same masks and a resumed run draws the same ones again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from twinlm.core import model
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.data import Batcher, Dataset
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import SpecialTokens, Tokenizer
from twinlm.tasks import Batch, Task

SPECIALS = ("[PAD]", "[MASK]", "[CLS]")
MASK_RATE, MASK_TOKEN, RANDOM_TOKEN = 0.15, 0.8, 0.1  # selected; then [MASK]; then random; rest kept
_SALT = 0x4D4C4D  # "MLM": keeps these draws apart from dropout's (seed, step) stream


def encoder_tokenizer(tok: Tokenizer) -> Tokenizer:
    """The tokenizer an encoder run uses: the corpus tokenizer plus [PAD], [MASK] and [CLS] (an imported
    BERT's tokenizer has them already)."""
    if tok.specials:
        missing = [s for s in SPECIALS if s not in tok.specials]
        if missing:
            raise TwinlmError(f"this tokenizer lacks the special tokens {missing} an encoder needs")
        return tok
    return SpecialTokens(tok, SPECIALS)


def mask_tokens(x: np.ndarray, tok: Tokenizer, rng: np.random.Generator) -> Batch:
    """{"x": corrupted ids, "y": original ids, "w": 1.0 at selected positions} for windows x (N, T)
    whose position 0 already holds [CLS]."""
    b, t = x.shape
    selected = rng.random((b, t)) < MASK_RATE
    selected[:, 0] = False
    empty = ~selected.any(axis=1)
    if t > 1 and empty.any():  # every row predicts at least one token
        selected[np.flatnonzero(empty), rng.integers(1, t, int(empty.sum()))] = True
    how = rng.random((b, t))
    random_ids = rng.integers(0, tok.n_plain, (b, t))
    corrupted = x.copy()
    corrupted[selected & (how < MASK_TOKEN)] = tok.id_of("[MASK]")
    swap = selected & (how >= MASK_TOKEN) & (how < MASK_TOKEN + RANDOM_TOKEN)
    corrupted[swap] = random_ids[swap]
    return {"x": corrupted.astype(np.int32), "y": x.astype(np.int32), "w": selected.astype(np.float32)}


class MaskedLM(Task):
    name = "mlm"
    metric = "masked_accuracy"

    def __init__(self, ds: Dataset, batch_size: int, window: int, seed: int, eval_iters: int) -> None:
        if not {"[MASK]", "[CLS]"} <= set(ds.tokenizer.specials):
            raise TwinlmError("masked-LM training needs a tokenizer with [MASK] and [CLS] (an encoder run's)")
        self.tok, self.seed, self.window = ds.tokenizer, seed, window
        # Windows of window - 1 corpus tokens after [CLS].
        self.batcher = Batcher(ds.train, batch_size, window - 1, seed)
        val = Batcher(ds.val, batch_size, window - 1, seed + 1)
        rng = np.random.default_rng([seed, _SALT, 1])
        self._val = [mask_tokens(self._with_cls(val.next()[0]), self.tok, rng) for _ in range(eval_iters)]

    def _with_cls(self, x: np.ndarray) -> np.ndarray:
        cls = np.full((x.shape[0], 1), self.tok.id_of("[CLS]"), dtype=np.int32)
        return np.concatenate([cls, x], axis=1)

    def next_batch(self, it: int) -> Batch:
        rng = np.random.default_rng([self.seed, _SALT, 0, it])
        return mask_tokens(self._with_cls(self.batcher.next()[0]), self.tok, rng)

    def val_batches(self) -> list[Batch]:
        return self._val

    def loss(self, B: Backend, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
             drop: dict[str, Array]) -> Array:
        return model.lm_loss(B, cfg, p, batch["x"], batch["y"], batch["w"], dropout=drop)

    def eval_outputs(self, B: Backend, cfg: ModelConfig, p: dict[str, Array],
                     batch: dict[str, Array]) -> tuple[Array, ...]:
        logits, y, w = model.logits(B, cfg, p, batch["x"]), batch["y"], batch["w"]
        n = B.sum(w)
        target = B.reshape(B.take_along_axis(logits, B.reshape(y, (*y.shape, 1)), axis=-1), y.shape)
        hit = B.where(target >= B.max(logits, axis=-1), 1.0, 0.0)  # ties count as hits (measure zero)
        return B.cross_entropy(logits, y, w) * n, B.sum(hit * w), n

    def summarize(self, batches: list[Batch], outputs: list[tuple[np.ndarray, ...]]) -> dict[str, Any]:
        loss, hits, n = (float(sum(float(o[i]) for o in outputs)) for i in range(3))
        return {"val_loss": loss / n, "masked_accuracy": hits / n}

    def state(self) -> dict[str, Any]:
        return self.batcher.state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.batcher.set_state(state)
