"""Instruction / chat fine-tuning: next tokens of conversations, with loss only where the assistant writes.

Each example is one row of the data (`core.chat`), rendered with the run's chat template and tokenized
once. A batch row holds exactly one example, padded at its end to the window: the causal mask already
keeps every real token from seeing the padding after it, and padding carries loss weight 0, so no token
attends across examples. An example longer than the window + 1 is cut at its end.

    x = ids[:-1], y = ids[1:], w = weight[1:]    (target j is learned when token j+1 is the assistant's)

The loss is the mean cross-entropy over the batch's weighted targets (`model.lm_loss` with weights), the
same graph on every backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from twinlm.core import chat, model
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.data import Dataset
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import Tokenizer, train_tokenizer
from twinlm.tasks import Batch, ExampleTask, training_window


def encode_rows(rows: list[dict[str, Any]], template: chat.ChatTemplate, tok: Tokenizer, window: int,
                mask_prompt: bool) -> Batch:
    """{"x", "y" (n, window) int32, "w" (n, window) float32} of the rows, each padded or cut to the window."""
    n = len(rows)
    x, y = np.zeros((n, window), np.int32), np.zeros((n, window), np.int32)
    w = np.zeros((n, window), np.float32)
    for i, row in enumerate(rows):
        ids, weight = chat.encode_example(row, template, tok, mask_prompt)
        ids, weight = ids[: window + 1], weight[: window + 1]
        t = len(ids) - 1
        if t < 1:
            continue
        x[i, :t], y[i, :t], w[i, :t] = ids[:-1], ids[1:], weight[1:]
    return {"x": x, "y": y, "w": w}


def chat_loss(B: Backend, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
              drop: dict[str, Array] | None = None) -> Array:
    """Mean next-token cross-entropy over the targets whose weight is 1 (the assistant's tokens)."""
    return model.lm_loss(B, cfg, p, batch["x"], batch["y"], batch["w"], dropout=drop)


class ChatLM(ExampleTask):
    name = "chat"
    ORDER_SALT = 21

    def __init__(self, train: list[dict[str, Any]], val: list[dict[str, Any]], template: chat.ChatTemplate,
                 tok: Tokenizer, window: int, batch_size: int, seed: int, mask_prompt: bool) -> None:
        self.seed, self.b, self.window = seed, batch_size, window
        self.train = encode_rows(train, template, tok, window, mask_prompt)
        if not self.train["w"].any():
            raise TwinlmError("no example has a token to learn within the window (--block-size too short, "
                              "or nothing the assistant writes?)")
        val_rows = encode_rows(val, template, tok, window, mask_prompt)
        self._val = [{k: _pad_rows(v[i:i + batch_size], batch_size) for k, v in val_rows.items()}
                     for i in range(0, len(val), batch_size)]

    def loss(self, B: Backend, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
             drop: dict[str, Array]) -> Array:
        return chat_loss(B, cfg, p, batch, drop)

    def summarize(self, batches: list[Batch], outputs: list[tuple[np.ndarray, ...]]) -> dict[str, Any]:
        # each batch's loss is a mean over its own weighted targets: weigh batches by their target counts
        counts = np.array([float(b["w"].sum()) for b in batches])
        losses = np.array([float(o[0]) for o in outputs])
        total = counts.sum()
        return {"val_loss": float((losses * counts).sum() / total) if total else float(losses.mean())}


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    """`a` with rows of zeros (weight 0) added up to n, so every validation batch has one shape."""
    if len(a) >= n:
        return a
    return np.concatenate([a, np.zeros((n - len(a), *a.shape[1:]), a.dtype)])


def build(tc: Any, cfg: ModelConfig | None, tok: Tokenizer | None, hf_record: dict[str, Any] | None,
          make_config: Any) -> tuple[ModelConfig, ChatLM, Dataset]:
    """(model config, chat task, a Dataset describing the data) of a run on chat data (`tc` the
    TrainConfig). A fresh run's tokenizer (--tokenizer) learns the conversations as rendered by the
    default template, its markers included; a run from a base keeps the base's tokenizer and template."""
    fmt, train, val = chat.load_splits(tc.data, tc.seed)
    template = chat.run_template(hf_record)
    if cfg is None:
        if (tc.arch or "gpt") == "bert":
            raise TwinlmError("chat data trains a decoder (next tokens); --arch bert is an encoder")
        text = "".join(template.render(r["messages"]) if "messages" in r else r["text"] for r in train + val)
        tok = train_tokenizer(tc.tokenizer, text, tc.vocab_size)
        cfg = make_config(tok.vocab_size)
    assert tok is not None
    if cfg.kind != "decoder":
        raise TwinlmError(f"chat data trains a decoder (next tokens); --arch {cfg.arch} is an encoder")
    window = training_window(cfg.block_size, tc.block_size, tc.base is not None)
    mask_prompt = tc.mask_prompt if tc.mask_prompt is not None else fmt != "text"
    task = ChatLM(train, val, template, tok, window, tc.batch_size, tc.seed, mask_prompt)
    real = task.train["x"][task.train["w"] > 0]
    ds = Dataset(train=real, val=np.zeros(0, np.int32), tokenizer=tok,
                 source=f"{tc.data} ({len(train)} {fmt} rows for training, {len(val)} for validation)")
    return cfg, task, ds
