"""A live progress bar for corpus preparation (hash, vocabulary, encode passes): MB done, MB/s and ETA.

Drawn with rich on stderr when it is a terminal, like the training bar, and removed when preparation
ends (the summary line `core.token_cache` logs says what happened); nothing when stderr is not a terminal.
"""

from __future__ import annotations

from typing import Any

from twinlm.core.token_cache import PhaseProgress

_NAMES = {"hash": "hash corpus", "vocab": "learn vocabulary", "encode": "encode"}


class PrepareProgress:
    """Callable as a `PhaseProgress`; one bar row per pass, stopped by the final "done" call."""

    def __init__(self, console: Any = None, min_interval: float = 0.1) -> None:
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console, self._bar, self._task, self._phase = console, None, None, ""
        self.min_interval = min_interval

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase == "done":
            self.close()
            return
        if not self.console.is_terminal:
            return
        if self._bar is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]prepare {task.description}"), BarColumn(),
                                     DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                                     console=self.console, transient=True,
                                     refresh_per_second=1 / self.min_interval)
            self._bar.start()
        if phase != self._phase:
            self._phase = phase
            self._task = self._bar.add_task(_NAMES.get(phase, phase), total=max(total, 1))
        self._bar.update(self._task, completed=done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def prepare_display() -> PhaseProgress | None:
    """A progress bar on stderr if it is a terminal, else None (no display work at all)."""
    from rich.console import Console

    console = Console(stderr=True)
    return PrepareProgress(console) if console.is_terminal else None
