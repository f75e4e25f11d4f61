"""Options and helpers shared by every command."""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Collection
from typing import Any, NoReturn

import click

from twinlm.backends import ENV_VAR, get_backend
from twinlm.backends import device as dev
from twinlm.core.backend import Backend

BACKEND_METAVAR = "mlx|tinygrad|numpy"
BACKEND_HELP = f"Backend (default: the group's --backend, ${ENV_VAR}, else mlx); numpy: sample/eval only."
DEVICE_METAVAR = "DEVICE"
DEVICE_HELP = (f"Device (default: the group's --device, ${dev.DEVICE_ENV}, else the framework's choice): MLX "
               "cpu|gpu; tinygrad CPU, CL, CUDA, NV, METAL, AMD (optionally :N); or per backend, "
               "mlx=gpu,tinygrad=CUDA.")


def _take_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Process-wide, like the frameworks' own default device, and exported so that child processes (MLX
    # ranks, bench's runs) use the same one. A malformed spec is a usage error before any work.
    if value is not None:
        try:
            dev.request(value)
        except dev.DeviceUnavailable as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from None
        os.environ[dev.DEVICE_ENV] = value
    return value


def device_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--device` on a command (or the group): applied by `get_backend` before a backend is created."""
    return click.option("--device", default=None, metavar=DEVICE_METAVAR, help=DEVICE_HELP,
                        expose_value=False, callback=_take_device)(f)


def backend_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--backend` on a command; falls back to the group's `--backend`, then $TWINLM_BACKEND. Brings
    `--device` along: every command that creates a backend can be told where it runs."""
    f = device_option(f)
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


DTYPE_HELP = ("Weights and activations in this dtype (softmax, norm statistics and the loss stay float32); "
              "default: the run's own (float32 unless trained or imported in another).")


def dtype_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--dtype float32|bfloat16|float16` on a command that runs a model (`core.dtypes`)."""
    from twinlm.core.dtypes import NAMES

    return click.option("--dtype", "dtype", default=None, type=click.Choice(NAMES), help=DTYPE_HELP)(f)


def sampling_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--temperature, --top-k and --top-p, shared by every command that samples (sample, chat)."""
    for option in reversed([
        click.option("--temperature", "-t", default=0.8, show_default=True, type=click.FloatRange(min=0.0),
                     help="Softmax temperature; 0 = greedy."),
        click.option("--top-k", default=None, type=click.IntRange(min=1),
                     help="Sample only from the k most likely."),
        click.option("--top-p", default=None, type=click.FloatRange(min=0.0, max=1.0, min_open=True),
                     help="Nucleus sampling: the most likely tokens holding this much probability."),
    ]):
        f = option(f)
    return f


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


def leave_after_engine() -> NoReturn:
    """Exit 0 without the interpreter's teardown, once an engine (chat, serve) has closed and the output is
    written. MLX evaluated on the engine's thread, and MLX used from a thread other than the main one can
    abort in native code at interpreter exit ("terminate called without an active exception", exit 134;
    seen here now and then, under a terminal and with piped input alike; ml-explore/mlx#3126)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
