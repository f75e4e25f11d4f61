"""`twinlm parity`: run the cross-backend parity suite, print a table, exit non-zero on any failure."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import click
from rich.console import Console
from rich.status import Status
from rich.table import Table

from twinlm import parity
from twinlm.backends import ENV_VAR, default_name, get_backend
from twinlm.backends.device import TF32_ENV, tf32_enabled
from twinlm.backends.device import label as device_label
from twinlm.cli.common import backend_option, chosen_backend_name
from twinlm.core.config import PRESETS, preset
from twinlm.core.errors import TwinlmError

ALL_BACKENDS = "mlx,tinygrad,numpy"
MAX_FAILED_ROWS = 5  # failing tensors listed per comparison (all of them with --verbose)


def _fmt(x: float) -> str:
    return f"{x:.2e}" if x == x and x != float("inf") else str(x)


def _row(table: Table, group: str, count: str, check: parity.Check) -> None:
    result = "[green]pass[/]" if check.ok else "[bold red]FAIL[/]"
    name = check.name + (f" ({check.note})" if check.note else "")
    table.add_row(group, count, name, _fmt(check.max_abs), _fmt(check.max_rel), str(check.tol),
                  f"{check.margin:.3g}", result)


def render(console: Console, report: parity.Report, verbose: bool) -> None:
    """One row per comparison (its worst tensor), plus every failing tensor; all rows with verbose."""
    table = Table(title="parity (margin = max |diff| / (atol + rtol |want|); pass <= 1)",
                  title_justify="left")
    for col in ("comparison", "checks", "tensor", "max abs diff", "max rel diff", "tolerance", "margin",
                "result"):
        table.add_column(col, justify="right" if col in ("checks", "margin") else "left",
                         no_wrap=col in ("comparison", "tensor"))
    for group, checks in report.groups().items():
        passed = f"{sum(c.ok for c in checks)}/{len(checks)}"
        if verbose:
            for c in checks:
                _row(table, group, passed, c)
            continue
        _row(table, group, passed, max(checks, key=lambda c: c.margin))
        failed = [c for c in checks if not c.ok]
        for c in failed[:MAX_FAILED_ROWS]:
            _row(table, "", "", c)
        if len(failed) > MAX_FAILED_ROWS:
            table.add_row("", "", f"... {len(failed) - MAX_FAILED_ROWS} more failing", "", "", "", "", "")
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    worst = report.worst
    if worst is not None:
        console.print(f"worst margin: {worst.margin:.3g} ({worst.label})")
    first = report.first_failure
    if first is not None:
        note = f", {first.note}" if first.note else ""
        console.print(f"[bold red]first divergence:[/] {first.label} "
                      f"(max abs diff {_fmt(first.max_abs)}, {first.tol}{note})")
    else:
        console.print(f"[green]all {len(report.checks)} checks pass[/]")


def _self_test(console: Console, suites: list[parity.Suite]) -> bool:
    table = Table(title="negative controls (each must make the suite fail)", title_justify="left")
    for col in ("arch", "control", "injected into", "failed checks", "first divergence", "margin", "caught"):
        table.add_column(col)
    all_caught = True
    for suite, control in ((s, c) for s in suites for c in s.controls()):
        report = suite.run(control)
        first = report.first_failure
        all_caught &= first is not None
        injected = next(B.name for B in suite.backends if B.supports_grad)
        table.add_row(suite.name, f"{control.name}: {control.description}", injected,
                      f"{len(report.failures)}/{len(report.checks)}",
                      first.label if first else "-", f"{first.margin:.3g}" if first else "-",
                      "[green]caught[/]" if first else "[bold red]MISSED[/]")
    console.print(table)
    return all_caught


@click.command("parity")
@click.option("--backends", default=None,
              help="Comma-separated backends to compare (numpy is the float64 forward-only reference). "
                   f"Default: {ALL_BACKENDS}, or the chosen backend (--backend, ${ENV_VAR}) against numpy.")
@backend_option
@click.option("--arch", type=click.Choice([*parity.ARCHS, "all"]), default="all", show_default=True,
              help="Model family or variant to compare; all: every one but "
                   f"{', '.join(a for a in parity.ARCHS if a not in parity.DEFAULT_ARCHS)} (by name only).")
@click.option("--config", "config_name", type=click.Choice(list(PRESETS)), default=None,
              help="Model preset (core.config.PRESETS). Default: small (tiny with --quick).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="AdamW steps in the training comparison. Default: 10 (3 with --quick).")
@click.option("--quick", is_flag=True,
              help="A check in seconds (what `make demo` runs): the tiny config, 3 steps, and by default the "
                   "backend that would train (chosen or default) against numpy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for weights, batches and masks.")
@click.option("--dropout", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1, show_default=True,
              help="Dropout of the second training run (the first always runs without dropout; the modern "
                   "variant runs only the first).")
@click.option("--self-test", is_flag=True,
              help="Inject each negative control on one side in turn; fail if any goes undetected.")
@click.option("-v", "--verbose", is_flag=True, help="One row per tensor instead of per comparison.")
@click.pass_context
def command(ctx: click.Context, backends: str | None, arch: str, config_name: str | None, steps: int | None,
            seed: int, dropout: float, self_test: bool, verbose: bool, backend_name: str | None,
            quick: bool) -> None:
    """Prove the backends compute the same model: every primitive and composite, logits, loss,
    every gradient, N AdamW steps (with and without dropout), causality and float64 finite
    differences. Prints a table, names the first tensor that diverges, exits 1 on any failure."""
    config_name = config_name or ("tiny" if quick else "small")
    steps = steps or (3 if quick else 10)
    if backends is None:
        picked = chosen_backend_name(backend_name) or (default_name() if quick else None)
        backends = ALL_BACKENDS if picked is None else f"{picked},numpy"
    names = list(dict.fromkeys(n.strip().lower() for n in backends.split(",") if n.strip()))
    if len(names) < 2:
        raise TwinlmError(f"parity needs at least two backends (got {backends!r}), e.g. --backends "
                          f"{ALL_BACKENDS}")
    # MLX on CUDA (and Apple GPUs with neural accelerators) runs float32 matmuls in TF32 unless told not to;
    # parity's 1e-4/1e-5 tolerances are for float32. Read once, at MLX's first matmul: set it before that.
    # MLX_ENABLE_TF32=1 given by the user is kept (to see TF32's margin) and said below.
    os.environ.setdefault(TF32_ENV, "0")
    chosen = [get_backend(n) for n in names]  # BackendUnavailable says what to install
    archs = parity.DEFAULT_ARCHS if arch == "all" else (arch,)
    cfg = preset(config_name, vocab_size=65)
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 200
    console.print(f"parity: {', '.join(names)}; {', '.join(archs)}; config {config_name} "
                  f"(n_layer {cfg.n_layer}, n_head {cfg.n_head}, d_model {cfg.d_model}, "
                  f"block {cfg.block_size}, vocab {cfg.vocab_size}); "
                  f"seed {seed}; {steps} AdamW steps at dropout 0" + (f" and {dropout:g}" if dropout else ""))
    devices = [f"{B.name} on {device_label(B.device_info())}" for B in chosen]
    tf32 = "on (MLX_ENABLE_TF32)" if tf32_enabled() else "off"
    console.print(f"devices: {'; '.join(devices)}; MLX TF32 {tf32}")
    start = time.perf_counter()

    def progress(status: Status, prefix: str) -> Callable[[str], None]:
        return lambda msg: status.update(f"[{time.perf_counter() - start:.0f}s] {prefix}{msg}")

    report, suites = parity.Report(), []
    with console.status("parity", spinner="dots") as status:
        for i, name in enumerate(archs):
            suite = parity.Suite.of(chosen, name, config_name, steps=steps, seed=seed, dropout=dropout,
                                    progress=progress(status, ""))
            # The primitives and fused kernels do not depend on the family: check them once.
            phases = [p for p in parity.PHASES if i == 0 or p not in ("primitives", "fused")]
            part = suite.run(phases=phases)
            report.extend(part.checks)
            report.notes += [n for n in part.notes if n not in report.notes]
            suites.append(suite)
    render(console, report, verbose)
    ok = report.ok
    if self_test:
        with console.status("self-test", spinner="dots") as status:
            for suite in suites:
                suite.progress = progress(status, "self-test ")
            caught = _self_test(console, suites)
        if not caught:
            console.print("[bold red]self-test failed: a negative control went undetected[/]")
        ok = ok and caught
    console.print(f"time: {time.perf_counter() - start:.1f} s")
    if not ok:
        ctx.exit(1)
