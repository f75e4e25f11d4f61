"""`twinlm sample DIR`: stream text from a trained run's latest checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import click
import numpy as np

from twinlm.cli.common import backend, backend_option, dtype_option, sampling_options
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import Tokenizer
from twinlm.generate import check_generates, generate, stop_ids
from twinlm.run_dir import load_model, run_dtype, to_backend

REPLACEMENT = "\ufffd"  # what decoding makes of an incomplete UTF-8 sequence


def text_increments(tok: Tokenizer, columns: Iterable[np.ndarray]) -> Iterator[str]:
    """The text each new token (row 0 of each column) adds, ready to print as it comes.

    A byte-level token can end inside a multi-byte UTF-8 character; decoding then ends in U+FFFD.
    That tail is held back until a later token completes it (or, at the end, printed as it is).
    """
    ids: list[int] = []
    shown = ""
    for col in columns:
        ids.append(int(col[0]))
        stable = tok.decode(ids).rstrip(REPLACEMENT)
        if len(stable) > len(shown):
            yield stable[len(shown):]
            shown = stable
    tail = tok.decode(ids)[len(shown):] if ids else ""
    if tail:
        yield tail


def default_prompt(tok: Tokenizer) -> str:
    """A newline (a corpus's natural start of a line) where the tokenizer knows it, else its first token."""
    try:
        tok.encode("\n")
        return "\n"
    except TwinlmError:  # a char tokenizer whose corpus had no newline
        return tok.decode([0])


@click.command("sample")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--prompt", default=None,
              help="Text to continue (default: a newline, or the vocabulary's first token if the run's "
                   "tokenizer has no newline).")
@click.option("--max-new-tokens", "-n", default=200, show_default=True, type=click.IntRange(min=0),
              help="How many tokens to generate.")
@sampling_options
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed (same on every backend).")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Fast decoding; --no-cache recomputes the whole context each token (the reference).")
@backend_option
@dtype_option
def command(run_dir: str, prompt: str | None, max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, seed: int, cache: bool, backend_name: str | None, dtype: str | None) -> None:
    """Generate text from the latest checkpoint in RUN_DIR, printing tokens as they are produced."""
    cfg, params_np, tok, meta = load_model(run_dir)
    check_generates(cfg)
    prompt = default_prompt(tok) if prompt is None else prompt
    ids = tok.encode(prompt)
    if ids.size == 0:
        raise TwinlmError("the prompt is empty; give some text with --prompt")
    B = backend(backend_name)
    dtype = run_dtype(meta, dtype)
    params = to_backend(B, params_np, dtype)  # each tensor's mapped pages let go once copied
    click.echo(f"[{run_dir}: step {meta.iter}, {tok.kind} tokenizer, "
               f"backend {B.name}, {dtype}]", err=True)
    stop = stop_ids(tok, meta.hf)
    columns = generate(B, cfg, params, ids[None, :], max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, use_cache=cache, stop=stop)
    columns = (c for c in columns if int(c[0]) not in stop)  # the end token ends the text; it is not shown
    click.echo(prompt, nl=False)
    for piece in text_increments(tok, columns):
        click.echo(piece, nl=False)  # click.echo flushes, so each token shows as it comes
    click.echo()
