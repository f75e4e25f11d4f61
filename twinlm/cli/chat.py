"""`twinlm chat RUN`: a conversation in the terminal, streamed token by token."""

from __future__ import annotations

import click

from twinlm.cli.common import backend, backend_option, dtype_option, leave_after_engine, sampling_options
from twinlm.core.chat import Message
from twinlm.core.errors import TwinlmError

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer."


@click.command("chat")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--system", default=None,
              help="A system message that starts (and survives /reset of) the chat.")
@click.option("--max-new-tokens", "-n", default=256, show_default=True, type=click.IntRange(min=1),
              help="Most tokens per answer.")
@sampling_options
@click.option("--seed", default=0, show_default=True, type=int,
              help="Sampling seed of the first answer (each answer after it uses the next).")
@backend_option
@dtype_option
def command(run_dir: str, system: str | None, max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, seed: int, backend_name: str | None, dtype: str | None) -> None:
    """Chat with RUN_DIR (a run, or a Hugging Face folder) using its chat template."""
    from twinlm.chat_model import TextStream, load_chat_model
    from twinlm.engine import Engine, Finish, Request

    cm = load_chat_model(run_dir)
    B = backend(backend_name)
    engine = Engine(B, cm.cfg, cm.params, slots=1, dtype=dtype or cm.dtype)
    start: list[Message] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    click.echo(f"[{run_dir}: backend {B.name}, context {engine.context} tokens; {HELP}]", err=True)
    turn = 0
    try:
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                click.echo()
                break
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                click.echo()
                continue
            cmd = line.strip()
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                history = list(start)
                click.echo("[conversation reset]", err=True)
                continue
            if not cmd:
                continue
            history.append({"role": "user", "content": line})
            try:
                ids = fit(cm, history, engine.context)
            except TwinlmError as e:  # e.g. a character a char tokenizer never saw: say so, go on
                history.pop()
                click.echo(f"[{e}]", err=True)
                continue
            if ids is None:
                history.pop()
                click.echo("[that message alone is longer than the context; /reset or write less]", err=True)
                continue
            req = Request(ids, min(max_new_tokens, engine.context - len(ids)), temperature=temperature,
                          top_p=top_p, top_k=top_k, seed=seed + turn, stop_ids=cm.stop_ids)
            turn += 1
            engine.submit(req)
            text, answer = TextStream(cm.tokenizer, cm.template.stop), []
            try:
                while True:
                    item = req.tokens.get()
                    if isinstance(item, Finish):
                        if item.reason.startswith("error"):
                            raise TwinlmError(f"generation failed: {item.reason}")
                        answer.append(text.flush())
                        break
                    piece = text.push(item)
                    answer.append(piece)
                    click.echo(piece, nl=False)
                    if text.stopped:
                        req.cancel()
                        break
                click.echo(answer[-1] if answer and not text.stopped else "", nl=False)
                click.echo()
            except KeyboardInterrupt:
                req.cancel()
                click.echo("\n[stopped]", err=True)
            history.append({"role": "assistant", "content": "".join(answer)})
    finally:
        engine.close()
    leave_after_engine()


def fit(cm: object, history: list[Message], context: int) -> list[int] | None:
    """The prompt ids of the conversation, dropping its oldest turns (never the system message) until it
    leaves room for an answer; None if even the newest message alone does not fit."""
    while True:
        ids = cm.chat_ids(history)  # type: ignore[attr-defined]
        if len(ids) < context:
            return ids
        first = 1 if history and history[0]["role"] == "system" else 0
        if len(history) - first <= 1:
            return None
        del history[first:first + 2 if len(history) - first > 2 else first + 1]
