"""`twinlm` entry point: a click group; each command lives in its own module."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import click

from twinlm._version import __version__
from twinlm.backends import ENV_VAR
from twinlm.backends import device as dev
from twinlm.cli.common import BACKEND_METAVAR, device_option
from twinlm.core.errors import TwinlmError, TwinlmWarning


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--backend", default=None, metavar=BACKEND_METAVAR,
              help=f"Backend for every command (also ${ENV_VAR}); numpy runs sample and eval only.")
@device_option
@click.version_option(__version__, prog_name="twinlm")
@click.pass_context
def cli(ctx: click.Context, backend: str | None) -> None:
    """Train and run small transformer LMs on MLX or tinygrad, proven numerically equal."""
    ctx.obj = {"backend": backend}


def _register() -> None:
    # Each command module exposes `command`; importing them is cheap (frameworks load lazily).
    from twinlm.cli import (
        attention,
        bench,
        cache,
        chat,
        doctor,
        evaluate,
        experiment,
        finetune,
        hf,
        lora,
        parity,
        plot,
        predict,
        quantize,
        sample,
        serve,
        train,
    )

    for module in (train, finetune, lora, sample, predict, evaluate, parity, plot, doctor, bench, cache,
                   experiment, attention, chat, serve, quantize):
        cli.add_command(module.command)
    cli.add_command(hf.import_command)
    cli.add_command(hf.export_command)


_register()


def _one_line_warnings() -> None:
    """twinlm's own warnings print as one `warning: ...` line on stderr; others as Python prints them."""
    python_way = warnings.showwarning
    if getattr(python_way, "twinlm", False):  # already installed (main() called again in one process)
        return

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, TwinlmWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            python_way(message, category, *args, **kwargs)
    show.twinlm = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def main() -> None:
    """Run the CLI; every error becomes one `error: ...` line on stderr, never a traceback: exit status 2
    for bad input (click's usage errors included), 1 for an internal error, 130 when interrupted."""
    _one_line_warnings()
    dev.request(None)  # this invocation's --device only (main() may run again in one process)
    try:
        code = cli.main(standalone_mode=False)
        if isinstance(code, int):  # click returns ctx.exit(code) here in non-standalone mode
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # bad usage too: one line like every other error, with where to look
        hint = f" (see '{e.ctx.command_path} --help')" if isinstance(e, click.UsageError) and e.ctx else ""
        click.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
        sys.exit(e.exit_code)
    except (TwinlmError, ValueError, OSError) as e:
        if os.environ.get("TWINLM_DEBUG"):
            raise
        click.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # an unexpected failure still gets one line, not a traceback
        if os.environ.get("TWINLM_DEBUG"):
            raise
        click.echo(f"error: internal error ({type(e).__name__}: {_one_line(str(e))}); rerun with "
                   "TWINLM_DEBUG=1 for details", err=True)
        sys.exit(1)
    finally:
        dev.request(None)


if __name__ == "__main__":
    main()
