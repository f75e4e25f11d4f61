"""A run ready to converse: model, tokenizer, chat template, stop tokens and stop text, and the text
stream that turns token ids into printable pieces (shared by `twinlm chat` and `twinlm serve`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core.chat import ChatTemplate, Message, run_template
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding makes of an incomplete UTF-8 sequence


@dataclass
class ChatModel:
    cfg: ModelConfig
    params: dict[str, np.ndarray]
    tokenizer: Tokenizer
    template: ChatTemplate
    stop_ids: frozenset[int]
    name: str
    hf: dict[str, Any] | None = None
    dtype: str | None = None  # a run's recorded dtype; None: the weights' own (a Hugging Face folder's)

    def chat_ids(self, messages: list[Message]) -> list[int]:
        """The prompt of the assistant's next turn: the conversation with the generation prompt."""
        text = self.template.render(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text).tolist()

    def completion_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.prompt_ids(prompt).tolist()


def stop_ids_of(tok: Tokenizer, hf: dict[str, Any] | None) -> frozenset[int]:
    """The run's stop tokens: its tokenizer's eos and generation_config.json's eos_token_id (int or list)."""
    ids = set()
    roles = getattr(tok, "roles", {})
    if "eos" in roles:
        ids.add(int(roles["eos"]))
    gen = (hf or {}).get("generation_config") or {}
    eos = gen.get("eos_token_id")
    for i in eos if isinstance(eos, list) else [eos]:
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tok.vocab_size:
            ids.add(i)
    return frozenset(ids)


def load_chat_model(path: str | Path) -> ChatModel:
    """A run dir, a checkpoint dir, or a Hugging Face model folder, ready to chat."""
    path = Path(path)
    if (path / "config.json").exists():
        from twinlm.hf import read_hf

        cfg, params, tok, record, _ = read_hf(path)
        hf: dict[str, Any] | None = record
        dtype = None
    else:
        from twinlm.run_dir import load_model

        cfg, params, tok, meta = load_model(path)
        hf, dtype = meta.hf, meta.dtype
    if cfg.kind != "decoder":
        raise TwinlmError(f"{path} is an --arch {cfg.arch} model, an encoder: it does not generate text")
    return ChatModel(cfg, params, tok, run_template(hf), stop_ids_of(tok, hf), path.resolve().name, hf, dtype)


@dataclass
class TextStream:
    """Token ids in, text out as it becomes final. A byte-level token can end inside a UTF-8 character
    (decoding then ends in U+FFFD: held back until completed), and text that could be the start of a
    stop string is held back until it is known not to be one; a stop string ends the stream (`stopped`)
    and neither it nor anything after it is shown."""

    tok: Tokenizer
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    shown: int = 0
    stopped: bool = False

    def _visible(self, text: str) -> str:
        for s in self.stop:
            k = text.find(s)
            if k >= 0:
                self.stopped = True
                text = text[:k]
        return text

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self._visible(self.tok.decode(self.ids).rstrip(REPLACEMENT))
        end = len(text)
        if not self.stopped:  # hold back a tail that may begin a stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        end = min(end, len(text) - n)
                        break
        out = text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return out

    def flush(self) -> str:
        """What is left at the end of the stream (an incomplete character, a partial stop string)."""
        if self.stopped or not self.ids:
            return ""
        text = self._visible(self.tok.decode(self.ids))
        out = text[self.shown:]
        self.shown = len(text)
        return out
