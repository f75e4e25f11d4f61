"""The training progress display: a live bar on a terminal, plain lines in a log."""

from __future__ import annotations

from typing import Any


class Progress:
    """A live rich progress bar on a terminal; plain log lines otherwise (or nothing if `console` is None)."""

    def __init__(self, console: Any, every: int = 100, eval_every: int = 0) -> None:
        self.console, self.every, self.eval_every = console, every, eval_every
        self._bar: Any = None
        self.fields: dict[str, Any] = {"loss": None, "val_loss": None, "tokens_per_s": None, "accuracy": None}

    def start(self, done: int, total: int) -> None:
        self.total = total
        if self.console is None or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self._task = self._bar.add_task("train", total=total, completed=done, stats="")
        self._bar.start()

    def update(self, it: int, **values: Any) -> None:
        self.fields.update(values)
        if self.console is None:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=it, stats=self.describe())
            return
        # Plain lines: each evaluation, and every `every` iterations between evaluations.
        at_eval = it == self.total or bool(self.eval_every and it % self.eval_every == 0)
        if "val_loss" in values or (it % self.every == 0 and not at_eval):
            self.console.print(f"iter {it}/{self.total} {self.describe()}", highlight=False)

    def describe(self) -> str:
        f = self.fields
        parts = [f"loss {f['loss']:.4f}" if f["loss"] is not None else "loss -"]
        if f["val_loss"] is not None:
            parts.append(f"val {f['val_loss']:.4f}")
        if f["accuracy"] is not None:
            parts.append(f"acc {f['accuracy']:.1%}")
        if f["tokens_per_s"]:
            parts.append(f"{f['tokens_per_s']:,.0f} tok/s")
        return "  ".join(parts)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
