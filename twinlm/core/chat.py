"""Conversations: chat data rows, chat templates, and the tokens (with loss weights) of one example.

Data: a JSONL file (or a folder with train.jsonl and valid.jsonl) whose rows are all of one format:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}        rendered as one user turn and one assistant turn
    {"text": "..."}                               plain text (only with a chat file's other rows absent)

A row of another format, or a malformed one, is an error naming its line.

Templates: a model's own chat template (`chat_template` in tokenizer_config.json, or chat_template.jinja)
is rendered as transformers' `apply_chat_template` does: jinja2 with trim_blocks/lstrip_blocks, the
variables `messages`, `add_generation_prompt`, the tokenizer's special tokens (`bos_token`,
`eos_token`, ...), and `raise_exception`. A template comes from a downloaded folder, so it is untrusted:
it runs in jinja2's ImmutableSandboxedEnvironment, and anything the sandbox refuses (Python internals,
attribute tricks) is a one-line error. Runs with twinlm's own tokenizers use DEFAULT_TEMPLATE:

    <|system|>\\nYou are terse.<|end|>\\n<|user|>\\nHi<|end|>\\n<|assistant|>\\nHello!<|end|>\\n

and stop generating at "<|end|>" (DEFAULT_STOP).

Loss mask: what the assistant writes is the text between rendering the history with the generation
prompt and rendering it with the assistant's message (as mlx-lm's datasets find it). The whole
conversation is tokenized once (so the ids equal `apply_chat_template(..., tokenize=True)`), and a
token carries loss weight 1 when any of its characters lies in an assistant span (a byte-level BPE
writes " sat" as one token when the generation prompt ends in a space).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import Tokenizer

FORMATS = ("messages", "prompt", "text")  # "prompt" means prompt/completion rows
ROLES = ("system", "user", "assistant", "tool")
DEFAULT_STOP = "<|end|>"
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

Message = dict[str, str]


class ChatError(TwinlmError):
    """Bad chat data or a chat template that failed (one line)."""


# ---- data rows -----------------------------------------------------------------------------------


def row_format(row: Any) -> str | None:
    """"messages", "prompt" (prompt/completion) or "text" by a row's keys; None when it has none."""
    if not isinstance(row, dict):
        return None
    for fmt in FORMATS:
        if fmt in row:
            return fmt
    return None


def check_messages(messages: Any, where: str) -> list[Message]:
    """A conversation as a list of {"role", "content"} with known roles and string content."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatError(f"{where}: message {i} must be an object with a 'role'")
        if m["role"] not in ROLES:
            raise ChatError(f"{where}: message {i} has unknown role {m['role']!r} "
                            f"(known: {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise ChatError(f"{where}: message {i} needs a string 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_row(row: Any, fmt: str, where: str) -> dict[str, Any]:
    """The row in its normal form: {"messages": [...]} or {"text": ...}."""
    got = row_format(row)
    if got is None:
        raise ChatError(f"{where}: a row needs 'messages', 'prompt' and 'completion', or 'text'")
    if got != fmt:
        raise ChatError(f"{where}: a {got!r} row in a file of {fmt!r} rows (one format per file)")
    if fmt == "messages":
        msgs = check_messages(row["messages"], where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise ChatError(f"{where}: the conversation has no assistant message to learn from")
        return {"messages": msgs}
    if fmt == "prompt":
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise ChatError(f"{where}: 'prompt' and 'completion' must both be strings")
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["completion"]}]}
    if not isinstance(row.get("text"), str) or not row["text"]:
        raise ChatError(f"{where}: 'text' must be a non-empty string")
    return {"text": row["text"]}


def read_rows(path: Path, fmt: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(format, normal-form rows) of a JSONL file; every row must have the first row's format."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ChatError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatError(f"cannot read {path} as UTF-8 text: {e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        fmt = fmt or row_format(row) or "messages"
        rows.append(check_row(row, fmt, f"{path}:{n}"))
    if not rows:
        raise ChatError(f"{path} has no rows")
    return fmt or "messages", rows


def sniff(path: str | Path | list[str] | None) -> str | None:
    """The chat format of `--data` ("messages" or "prompt") when it is chat data, else None (plain text,
    which the corpus loader reads). Chat data: a .jsonl file, or a folder with train.jsonl, whose first
    non-empty row has 'messages' or 'prompt'."""
    if not isinstance(path, (str, Path)):  # None, or several --data values: plain corpora
        return None
    p = Path(path)
    if p.is_dir():
        p = p / "train.jsonl"
    if p.suffix.lower() != ".jsonl" or not p.is_file():
        return None
    try:
        with p.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        fmt = row_format(json.loads(first))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # the corpus loader reports what is wrong with it
    return fmt if fmt in ("messages", "prompt") else None


def load_splits(path: str | Path, seed: int,
                val_fraction: float = 0.1) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(format, train rows, validation rows): a folder's train.jsonl / valid.jsonl, or one file split by
    a seeded shuffle (the last val_fraction, at least one row)."""
    p = Path(path)
    if p.is_dir():
        fmt, train = read_rows(p / "train.jsonl")
        valid = p / "valid.jsonl"
        if not valid.exists():
            raise ChatError(f"{p} has train.jsonl but no valid.jsonl")
        return fmt, train, read_rows(valid, fmt)[1]
    fmt, rows = read_rows(p)
    if len(rows) < 2:
        raise ChatError(f"{p} has {len(rows)} row: too few to split into training and validation")
    order = np.random.default_rng([seed, 20]).permutation(len(rows))
    n_val = max(1, int(len(rows) * val_fraction))
    shuffled = [rows[i] for i in order]
    return fmt, shuffled[:-n_val], shuffled[-n_val:]


# ---- templates -----------------------------------------------------------------------------------


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # as transformers: jinja's own tojson escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


@dataclass
class ChatTemplate:
    """A compiled chat template and the variables it renders with (special tokens as text)."""

    source: str
    variables: dict[str, str]
    stop: tuple[str, ...] = ()  # text that ends an assistant turn beyond the stop token ids
    is_default: bool = False

    def __post_init__(self) -> None:
        import jinja2

        try:
            self._compiled = _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise ChatError(f"the chat template does not compile: {_one_line(e)}") from None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self.variables)
        except jinja2.exceptions.SecurityError as e:
            raise ChatError(f"the chat template tried what the sandbox forbids: {_one_line(e)}") from None
        except jinja2.TemplateError as e:
            raise ChatError(f"the chat template failed: {_one_line(e)}") from None
        except Exception as e:  # a template is code: any failure in it is the template's, in one line
            raise ChatError(f"the chat template failed ({type(e).__name__}): {_one_line(e)}") from None


def _token_text(value: Any) -> str | None:
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def template_source(tok_cfg: dict[str, Any], folder_template: str | None = None) -> str | None:
    """The template text of a tokenizer_config.json (a string, or a list of named templates: "default"),
    else a chat_template.jinja's text."""
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    if isinstance(t, str) and t:
        return t
    return folder_template


def run_template(hf_record: dict[str, Any] | None) -> ChatTemplate:
    """The chat template of a run: its Hugging Face tokenizer's, or DEFAULT_TEMPLATE."""
    record = hf_record or {}
    tok_cfg = record.get("tokenizer_config") or {}
    source = template_source(tok_cfg, record.get("chat_template"))
    if source is None:
        return ChatTemplate(DEFAULT_TEMPLATE, {"bos_token": "", "eos_token": ""}, (DEFAULT_STOP,), True)
    variables = {k: v for k, v in ((k, _token_text(v)) for k, v in tok_cfg.items() if k.endswith("_token"))
                 if v is not None}
    return ChatTemplate(source, variables)


# ---- tokens and loss weights ---------------------------------------------------------------------


def token_spans(tok: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, first character, end character) of each token of the whole text, encoded once."""
    inner = getattr(tok, "_tok", None)  # the Hugging Face `tokenizers` object of "hf" and "bpe"
    if tok.kind == "hf" and inner is not None:
        enc = inner.encode(text, add_special_tokens=False)
        spans = np.array(enc.offsets, np.int64).reshape(-1, 2)
        return np.asarray(enc.ids, np.int32), spans[:, 0], spans[:, 1]
    ids = tok.encode(text)
    if tok.kind == "char":
        starts = np.arange(len(ids), dtype=np.int64)
        return ids, starts, starts + 1
    if tok.kind == "byte":  # byte offset -> the character it belongs to
        sizes = [len(c.encode("utf-8")) for c in text]
        char_of_byte = np.repeat(np.arange(len(text)), sizes).astype(np.int64)
        return ids, char_of_byte, char_of_byte + 1
    # bpe: decode prefixes to find where each token ends (small texts; used once per example)
    ends = np.array([len(tok.decode(ids[: i + 1]).rstrip("\ufffd")) for i in range(len(ids))], np.int64)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return ids, starts, np.maximum(ends, starts + 1)


def assistant_spans(template: ChatTemplate, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character spans of what each assistant message adds)."""
    full = template.render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True) if i else ""
        after = template.render(messages[: i + 1])
        if not full.startswith(after) or not after.startswith(before):
            raise ChatError("the chat template renders a conversation's history differently from the whole "
                            "conversation, so the assistant's tokens cannot be found (try --no-mask-prompt)")
        spans.append((len(before), len(after)))
    return full, spans


def encode_example(row: dict[str, Any], template: ChatTemplate, tok: Tokenizer,
                   mask_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss weight per token: 1 where the token is learned) of one normal-form row."""
    if "text" in row:
        ids = tok.prompt_ids(row["text"])
        return ids.astype(np.int32), np.ones(len(ids), np.float32)
    text, spans = assistant_spans(template, row["messages"])
    try:
        ids, starts, ends = token_spans(tok, text)
    except TwinlmError as e:
        raise ChatError(f"a conversation does not fit the run's tokenizer: {e}") from None
    if not mask_prompt:
        return ids, np.ones(len(ids), np.float32)
    w = np.zeros(len(ids), np.float32)
    for a, b in spans:  # a token that overlaps the span (" sat" after "assistant: ") is the assistant's
        w[(ends > a) & (starts < b)] = 1.0
    return ids, w
