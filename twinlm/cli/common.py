"""Options and helpers shared by every command."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Collection
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


def _plain_type(hint: Any) -> type | None:
    """int, float or str for a field annotated with one of them (or it | None); else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if len(args) == 1 and args[0] in (int, float, str) else None


def field_options(cls: type, *, only: Collection[str] | None = None,
                  skip: Collection[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options generated from the plain (int, float, str) fields of dataclass `cls`: `--field-name`,
    default None (unset: the file's, preset's or dataclass's value applies), help from the field's metadata.
    Fields marked `cli=False`, in `skip` or outside `only` get none; choices and flags are written by hand."""
    hints = typing.get_type_hints(cls)

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for fld in reversed(dataclasses.fields(cls)):
            kind = _plain_type(hints[fld.name])
            if (kind is None or fld.name in skip or (only is not None and fld.name not in only)
                    or not fld.metadata.get("cli", True)):
                continue
            f = click.option(f"--{fld.name.replace('_', '-')}", fld.name, type=kind, default=None,
                             help=fld.metadata.get("help") or None)(f)
        return f
    return decorate
