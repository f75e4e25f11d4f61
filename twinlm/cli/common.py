"""Options and helpers shared by every command."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from twinlm.backends import ENV_VAR, get_backend
from twinlm.core.backend import Backend

BACKEND_METAVAR = "mlx|tinygrad|numpy"
BACKEND_HELP = f"Backend (default: the group's --backend, ${ENV_VAR}, else mlx); numpy: sample/eval only."


def backend_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--backend` on a command; falls back to the group's `--backend`, then $TWINLM_BACKEND."""
    return click.option("--backend", "backend_name", default=None, metavar=BACKEND_METAVAR,
                        help=BACKEND_HELP)(f)


def resolve_backend_name(name: str | None) -> str | None:
    ctx = click.get_current_context(silent=True)
    while name is None and ctx is not None:
        name = (ctx.obj or {}).get("backend") if isinstance(ctx.obj, dict) else None
        ctx = ctx.parent
    return name


def chosen_backend_name(name: str | None) -> str | None:
    """The backend the user asked for: the command's option, the group's, then $TWINLM_BACKEND (or None)."""
    return resolve_backend_name(name) or os.environ.get(ENV_VAR) or None


def backend(name: str | None) -> Backend:
    return get_backend(resolve_backend_name(name))
