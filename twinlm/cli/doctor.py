"""`twinlm doctor`: what works here, what does not, what to install. Exit 0 when a trainable backend works."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from twinlm.backends import (
    ENV_VAR,
    TRAINABLE,
    BackendUnavailable,
    check_name,
    default_name,
    get_backend,
    names,
)
from twinlm.cli.common import backend_option, chosen_backend_name
from twinlm.core.backend import Backend

MATMUL_N = 1024
MATMUL_REPS = 3


@dataclass
class BackendReport:
    name: str
    ok: bool
    device: str = ""
    notes: list[str] = field(default_factory=list)


def package_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def clang_info() -> str | None:
    path = shutil.which("clang")
    if path is None:
        return None
    try:
        first = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        return f"{path} ({first.splitlines()[0].strip()})" if first else path
    except (OSError, subprocess.SubprocessError):
        return path


def mlx_matmul_gflops(B: Backend, n: int = MATMUL_N, reps: int = MATMUL_REPS) -> float:
    """Best-of-`reps` fp32 n x n matmul throughput through the MLX backend."""
    rng = np.random.default_rng(0)
    a, b = (B.from_numpy(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    B.sync(a @ b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        B.sync(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def check_backend(name: str) -> BackendReport:
    """Import the backend and run one tiny computation on it (a device can import yet fail to run)."""
    try:
        B = get_backend(name)
        x = B.from_numpy(np.arange(4, dtype=np.float32))
        got = B.to_numpy(B.sum(x * 2.0))
        if float(got) != 12.0:
            return BackendReport(name, False, notes=[f"a test sum gave {float(got)} instead of 12.0"])
    except BackendUnavailable as e:
        return BackendReport(name, False, notes=[str(e)])
    except Exception as e:  # a framework that imports but cannot compute on this machine
        return BackendReport(name, False, notes=[f"imports but fails to compute ({type(e).__name__}: {e})"])
    report = BackendReport(name, True)
    if name == "mlx":
        import mlx.core as mx

        report.device = str(mx.default_device())
    elif name == "tinygrad":
        report.device = str(getattr(B, "device", "?"))
    elif name == "numpy":
        report.device = "cpu (float64)"
        report.notes.append("forward only: the parity oracle, cannot train")
    return report


def mlx_blas_rows() -> list[tuple[str, str]]:
    """Which BLAS MLX uses and how fast a matmul runs on it (call only once MLX works)."""
    from twinlm.backends.mlx import BLAS, MALLOC

    blas = BLAS
    if BLAS.startswith("system OpenBLAS"):
        blas += "\nloaded with RTLD_GLOBAL before importing MLX, in place of the wheel's reference BLAS"
    elif "TWINLM_BLAS=bundled" in BLAS:
        blas += "\n[yellow]slow[/]: unset TWINLM_BLAS to load the system OpenBLAS (~30x faster matmul)"
    elif sys.platform != "darwin":
        blas += "\n[yellow]slow[/]: apt-get install libopenblas0-pthread (Debian/Ubuntu), ~30x faster matmul"
    gflops = mlx_matmul_gflops(get_backend("mlx"))
    speed = f"{gflops:.1f} GFLOP/s (best of {MATMUL_REPS})"
    malloc = "glibc malloc: " + MALLOC
    if MALLOC != "default":
        malloc += ("\nlarge activations reuse heap pages instead of being page-faulted and zeroed every step"
                   " (TWINLM_MALLOC=default to turn off)")
    return [("MLX BLAS", blas), (f"MLX matmul {MATMUL_N}^2 fp32", speed), ("MLX memory", malloc),
            ("MLX CPU kernels", mlx_kernels_row())]


def mlx_kernels_row() -> str:
    """Which of twinlm's compiled CPU kernels serve MLX here, at which SIMD level; or why none do."""
    from twinlm.backends import kernels

    B = get_backend("mlx")
    st = kernels.status()
    if getattr(B, "kernels", None) is not None and st.active:
        build = st.build
        built = (f"\nbuilt with nanobind {build.get('nanobind', '?')} for mlx {build.get('mlx', '?')} "
                 f"({build.get('compiler', '?')}, {build.get('seconds', '?')} s)") if build else ""
        return (f"[green]active[/]: {', '.join(st.kernels)}\nSIMD {st.simd}, {st.threads} threads "
                f"(TWINLM_KERNEL_THREADS to change; TWINLM_KERNELS=0 to turn off){built}")
    if kernels.disabled():
        return f"off: {st.reason}; MLX runs on its own ops (unset it to use the kernels)"
    return (f"[yellow]not in use[/]: {st.reason}\nMLX runs on its own (slower, single-threaded) CPU ops; "
            f"fix: python -m twinlm.backends.kernels.build -v (needs cmake and a C++ compiler)")


@click.command("doctor")
@backend_option
def command(backend_name: str | None) -> None:
    """Check the backends, versions, BLAS and compilers; say what to install for anything missing.
    With a chosen backend (--backend, $TWINLM_BACKEND), exit 1 unless that one works."""
    chosen = chosen_backend_name(backend_name)
    if chosen is not None:
        chosen = check_name(chosen)
    console = Console()
    reports = [check_backend(name) for name in names()]

    table = Table(title="backends", title_justify="left")
    for col in ("backend", "status", "device", "version", "notes"):
        table.add_column(col, overflow="fold")
    dists = {"mlx": "mlx", "tinygrad": "tinygrad", "numpy": "numpy"}
    for r in reports:
        status = "[green]ok[/]" if r.ok else "[bold red]unavailable[/]"
        table.add_row(r.name, status, r.device, package_version(dists[r.name]), "\n".join(r.notes))
    console.print(table)

    clang = clang_info()
    env = Table(title="environment", title_justify="left", show_header=False)
    env.add_column("item")
    env.add_column("value", overflow="fold")
    env.add_row("python", f"{platform.python_version()} ({platform.system()} {platform.machine()})")
    env.add_row("numpy", np.__version__)
    env.add_row("clang", clang or "[red]not found[/] (tinygrad's CPU device needs it: apt-get install clang)")
    if any(r.ok and r.name == "mlx" for r in reports):
        for item, value in mlx_blas_rows():
            env.add_row(item, value)
    env.add_row("default backend", f"{default_name()} (when neither --backend nor ${ENV_VAR} is given)")
    env.add_row("chosen backend", chosen or "(none: --backend / $TWINLM_BACKEND not given)")
    env.add_row(f"${ENV_VAR}", os.environ.get(ENV_VAR) or "(unset)")
    env.add_row("$TWINLM_BLAS", os.environ.get("TWINLM_BLAS") or "(unset: load system OpenBLAS for MLX)")
    env.add_row("$TWINLM_KERNELS", os.environ.get("TWINLM_KERNELS") or "(unset: MLX CPU kernels on if built)")
    console.print(env)

    working = [r.name for r in reports if r.ok and r.name in TRAINABLE]
    if chosen and not any(r.ok and r.name == chosen for r in reports):
        console.print(f"[bold red]the chosen backend {chosen} does not work here[/] (see its notes above)")
        click.get_current_context().exit(1)
    if not working:
        console.print("[bold red]no trainable backend works[/]: install mlx[cpu] (Linux) / mlx (macOS), "
                      "or tinygrad==0.14.0 with clang on PATH")
        click.get_current_context().exit(1)
    console.print(f"[green]ready:[/] can train on {', '.join(working)}")
