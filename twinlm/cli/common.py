"""Options and helpers shared by every command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from twinlm.backends import ENV_VAR, get_backend
from twinlm.core.backend import Backend


def backend_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--backend` on a command; falls back to the group's `--backend`, then $TWINLM_BACKEND."""
    return click.option("--backend", "backend_name", default=None, metavar="mlx|tinygrad",
                        help=f"Backend to run on (default: group option, ${ENV_VAR}, else mlx).")(f)


def resolve_backend_name(name: str | None) -> str | None:
    ctx = click.get_current_context(silent=True)
    while name is None and ctx is not None:
        name = (ctx.obj or {}).get("backend") if isinstance(ctx.obj, dict) else None
        ctx = ctx.parent
    return name


def backend(name: str | None) -> Backend:
    return get_backend(resolve_backend_name(name))
