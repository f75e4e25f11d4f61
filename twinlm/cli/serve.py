"""`twinlm serve RUN`: an OpenAI-compatible HTTP API (twinlm.server) on 127.0.0.1 by default."""

from __future__ import annotations

import click

from twinlm.cli.common import backend, backend_option, dtype_option, leave_after_engine
from twinlm.core.errors import TwinlmError


@click.command("serve")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--slots", default=8, show_default=True, type=click.IntRange(min=1),
              help="Requests decoded together (continuous batching); more wait in a queue.")
@click.option("--context", default=None, type=click.IntRange(min=2),
              help="Tokens per request, prompt included (default: the model's block size); a smaller one "
                   "makes each decoding step cheaper.")
@click.option("--model-id", default=None, help="The model's name in the API (default: the run dir's name).")
@backend_option
@dtype_option
def command(run_dir: str, host: str, port: int, slots: int, context: int | None, model_id: str | None,
            backend_name: str | None, dtype: str | None) -> None:
    """Serve RUN_DIR (a run, or a Hugging Face folder) over an OpenAI-compatible API until Ctrl-C or
    SIGTERM: GET /v1/models, POST /v1/completions and /v1/chat/completions (stream: true as SSE), /health."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise TwinlmError("twinlm serve needs the serve extra: pip install 'twinlm[serve]'") from None
    from twinlm.chat_model import load_chat_model
    from twinlm.engine import Engine
    from twinlm.server import serve

    cm = load_chat_model(run_dir)
    B = backend(backend_name)
    engine = Engine(B, cm.cfg, cm.params, slots=slots, context=context, dtype=dtype or cm.dtype)
    name = model_id or cm.name

    def ready() -> None:
        click.echo(f"serving {run_dir} as {name!r} on http://{host}:{port} (backend {B.name}, {slots} slots, "
                   f"context {engine.context})", err=True)

    serve(cm, engine, host, port, model_id=name, on_ready=ready)
    click.echo("server stopped", err=True)
    leave_after_engine()
