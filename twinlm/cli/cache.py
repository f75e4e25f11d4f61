"""`twinlm cache`: what twinlm keeps on disk (runs, the token cache, tinygrad's JIT cache), and clearing it.

Clearing removes only files twinlm itself names (token files keyed by a SHA-256, `*.jit` entries), so a
cache variable pointed at a folder of other things deletes none of them. Runs are removed only when
`runs` is named explicitly; `all` means both caches.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from twinlm.backends import JIT_CACHE_ENV, jit_cache_dir
from twinlm.core.data import CACHE_ENV, default_cache_dir
from twinlm.core.errors import TwinlmError

# core.token_cache's entries (named by a key), resume checkpoints, remembered corpus hashes (named by the
# files' stat), their write temps and their lock files
_TOKEN_FILE = re.compile(r"^((\.tmp-)*[0-9a-f]{32}\.(bin|json|resume\.json|stat\.json)(-.+)?"
                         r"|\.[0-9a-f]{32}\.lock)$")
_JIT_FILE = re.compile(r"^.+\.jit(.+\.tmp)?$")
_RUN_MARKERS = ("latest.json", "metrics.jsonl")
DEFAULT_RUNS = Path("runs")
CACHE_NAMES = {"tokens": "token cache", "jit": "tinygrad JIT cache", "all": "token and tinygrad JIT caches"}


@dataclass
class Place:
    name: str
    folder: Path | None  # None: turned off
    files: list[Path] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.exists())


def _owned(folder: Path | None, pattern: re.Pattern[str]) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and pattern.match(p.name))


def is_run(folder: Path) -> bool:
    return folder.is_dir() and (any((folder / m).exists() for m in _RUN_MARKERS)
                                or any(folder.glob("ckpt-*")))


def run_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_run(p))


def places(runs_root: Path) -> dict[str, Place]:
    jit = jit_cache_dir()
    runs = [f for r in run_dirs(runs_root) for f in r.rglob("*") if f.is_file()]
    return {"runs": Place("runs", runs_root, runs),
            "tokens": Place("tokens", default_cache_dir(), _owned(default_cache_dir(), _TOKEN_FILE)),
            "jit": Place("jit", jit, _owned(jit, _JIT_FILE))}


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


runs_option = click.option("--runs", "runs_root", type=click.Path(file_okay=False, path_type=Path),
                           default=DEFAULT_RUNS, show_default=True, help="Folder holding run directories.")


@click.group("cache", invoke_without_command=True)
@runs_option
@click.pass_context
def command(ctx: click.Context, runs_root: Path) -> None:
    """Show what twinlm keeps on disk: run directories, the token cache ($TWINLM_CACHE_DIR) and
    tinygrad's JIT cache ($TWINLM_JIT_CACHE). `twinlm cache clear tokens|jit|all|runs` removes them."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_command, runs_root=runs_root)


@command.command("list")
@runs_option
def list_command(runs_root: Path) -> None:
    """Sizes of the runs and of both caches."""
    found = places(runs_root)
    notes = {"runs": f"{len(run_dirs(runs_root))} runs", "tokens": f"${CACHE_ENV}",
             "jit": f"${JIT_CACHE_ENV}"}
    for p in found.values():
        where = "(off: $TWINLM_JIT_CACHE=0)" if p.folder is None else str(p.folder)
        click.echo(f"{p.name:<7} {human(p.size):>9}  {len(p.files):>5} files  {where}  ({notes[p.name]})")
    for run in run_dirs(runs_root):
        files = [f for f in run.rglob("*") if f.is_file()]
        ckpts = len(list(run.glob("ckpt-*")))
        click.echo(f"  {run.name:<20} {human(sum(f.stat().st_size for f in files)):>9}  {ckpts} checkpoints")


def can_ask() -> bool:
    return sys.stdin.isatty()


@command.command("clear")
@click.argument("what", type=click.Choice(["tokens", "jit", "all", "runs"]))
@runs_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def clear_command(what: str, runs_root: Path, yes: bool) -> None:
    """Delete the token cache, the JIT cache, both (all), or every run directory under --runs (runs:
    only when named; `all` never deletes runs). Caches are rebuilt on demand."""
    found = places(runs_root)
    chosen = [found["tokens"], found["jit"]] if what == "all" else [found[what]]
    files = [f for p in chosen for f in p.files]
    size = sum(p.size for p in chosen)
    if not files:
        click.echo(f"nothing to clear ({what})")
        return
    targets = run_dirs(runs_root) if what == "runs" else files
    summary = (f"{len(targets)} run directories ({human(size)}) under {runs_root}" if what == "runs"
               else f"{len(files)} files ({human(size)}) from the {CACHE_NAMES[what]}")
    if not yes:
        if not can_ask():
            raise TwinlmError(f"would delete {summary}; pass --yes to confirm (no terminal to ask on)")
        click.confirm(f"delete {summary}?", abort=True)
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    click.echo(f"deleted {summary}")
