"""`twinlm doctor`: what works here, what does not, what to install. Exit 0 when a trainable backend works."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

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
from twinlm.backends import device as dev
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
    info: dict[str, Any] = field(default_factory=dict)  # Backend.device_info()
    compiled: str = ""  # the compiled-function smoke test: "ok" or what went wrong


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
    report = BackendReport(name, True, info=B.device_info())
    report.device = dev.label(report.info)
    if name == "numpy":
        report.device = "cpu (float64)"
        report.notes.append("forward only: the parity oracle, cannot train")
        return report
    report.compiled = compiled_smoke(B)
    if report.compiled != "ok":
        report.ok = False
        report.notes.append(f"computes, but its compiled step fails: {report.compiled}")
    report.notes.append(f"float64 {'yes' if report.info.get('float64') else 'no'}")
    if name == "mlx":
        report.notes.append(f"build {report.info.get('build')}")
        if report.info.get("device") == "gpu":
            report.notes.append(f"TF32 {'on' if report.info.get('tf32') else 'off'} (${dev.TF32_ENV})")
    return report


def compiled_smoke(B: Backend) -> str:
    """Three calls of a tiny stateful step through the backend's compiler (mx.compile, TinyJit): the path
    training takes, which can fail where plain ops work (MLX-CUDA without the CUDA headers for its JIT)."""
    try:
        def fn(state: dict, x: Any) -> tuple[tuple[Any, ...], dict]:
            return (B.sum(state["w"] * x),), {"w": state["w"] + 1.0}

        step = B.compile_step(fn, {"w": B.from_numpy(np.arange(4, dtype=np.float32))})
        x = B.from_numpy(np.full(4, 2.0, dtype=np.float32))
        got = [float(B.to_numpy(step(x)[0])) for _ in range(3)]
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return "ok" if got == [12.0, 20.0, 28.0] else f"wrong values {got} (want [12.0, 20.0, 28.0])"


# Measured on this project's 2-core x86 machine (tinygrad 0.14, pocl 3.1; see README "tinygrad on OpenCL").
POCL_NOTE = ("CL here is pocl, OpenCL on this CPU, which tinygrad alone would take when DEV is unset; twinlm "
             "uses the CPU device unless asked for CL (--device CL), since CL is not faster: the tiny "
             "preset's training step took 4.5 s on CL against 37 ms on the CPU device, its first compile "
             "several minutes, and a 1024^2 fp32 matmul ran at 9 GFLOP/s on both")


def tinygrad_devices_row(current: str) -> str:
    """The devices tinygrad opens here, and what to know about CL when it is pocl on the CPU."""
    try:
        found = dev.tinygrad_devices()
    except Exception as e:
        return f"(could not list: {type(e).__name__})"
    row = f"{', '.join(found)} (in use: {current}; choose with --device)"
    if "CL" in found:
        from tinygrad import Device

        if str(getattr(Device["CL"], "device_name", "")).startswith("pthread"):
            row += "\n" + POCL_NOTE
    return row


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
    if getattr(B, "device", "cpu") == "gpu":  # CPU kernels: nothing to fix on a GPU
        return "not used on the GPU (MLX's own GPU kernels; they serve MLX on the CPU: --device cpu)"
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


def as_json(reports: list[BackendReport], chosen: str | None) -> dict[str, Any]:
    """`doctor --json`: one row per backend with its device, and the environment facts."""
    rows = [{"backend": r.name, "ok": r.ok, "version": package_version(r.name), "device": r.info or None,
             "compiled": r.compiled or None, "notes": r.notes} for r in reports]
    return {"backends": rows, "chosen": chosen, "default": default_name(),
            "device_requested": dev.requested(), "mlx_build": dev.mlx_build(),
            "tinygrad_devices": _tinygrad_devices(), "clang": clang_info(),
            "python": platform.python_version(), "system": f"{platform.system()} {platform.machine()}",
            "env": {k: os.environ.get(k) for k in (ENV_VAR, dev.DEVICE_ENV, "DEV", dev.TF32_ENV,
                                                    "TWINLM_BLAS", "TWINLM_KERNELS")},
            "ready": [r.name for r in reports if r.ok and r.name in TRAINABLE]}


def _tinygrad_devices() -> list[str] | None:
    try:
        return dev.tinygrad_devices()
    except Exception:  # tinygrad absent or broken: its row says why
        return None


@click.command("doctor")
@backend_option
@click.option("--json", "as_json_flag", is_flag=True, help="Print one JSON object instead of the tables.")
def command(backend_name: str | None, as_json_flag: bool) -> None:
    """Check the backends, their devices, versions, BLAS and compilers; say what to install for anything
    missing. With a chosen backend (--backend, $TWINLM_BACKEND), exit 1 unless that one works."""
    chosen = chosen_backend_name(backend_name)
    if chosen is not None:
        chosen = check_name(chosen)
    console = Console()
    reports = [check_backend(name) for name in names()]
    if as_json_flag:
        record = as_json(reports, chosen)
        click.echo(json.dumps(record, indent=2))
        if (chosen and not any(r.ok and r.name == chosen for r in reports)) or not record["ready"]:
            click.get_current_context().exit(1)
        return

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
    tiny = next((r for r in reports if r.name == "tinygrad"), None)
    on_cpu = tiny is None or not tiny.ok or str(tiny.info.get("device", "CPU")).startswith("CPU")
    env.add_row("clang", clang or ("[red]not found[/] (tinygrad's CPU device needs it: apt-get install clang)"
                                   if on_cpu else "not found (not needed by tinygrad's device here)"))
    env.add_row("device", f"{dev.requested() or '(not set: each framework chooses)'} "
                f"(--device / ${dev.DEVICE_ENV})")
    if tiny is not None and tiny.ok:
        env.add_row("tinygrad devices", tinygrad_devices_row(str(tiny.info.get("device", ""))))
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
