"""The process-wide set-up MLX needs, done once, before `mlx.core` is first imported.

- BLAS: MLX resolves its BLAS symbols when `mlx.core` loads, and the `mlx[cpu]` Linux wheel bundles a
  reference BLAS that runs a 2048^2 matmul ~30x slower than OpenBLAS. Loading the system OpenBLAS first,
  with RTLD_GLOBAL, makes MLX bind to it; once `mlx.core` is loaded it is too late. TWINLM_BLAS=bundled
  keeps the bundled one.
- malloc: glibc's mmap threshold and trimming are process-wide settings that shape every large
  allocation MLX's CPU allocator makes (see `keep_freed_memory`); TWINLM_MALLOC=default skips them.

Importing this module applies both; `BLAS` and `MALLOC` say what took effect (`twinlm doctor` shows them).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

OPENBLAS_GLOBS = ("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3", "/usr/lib64/libopenblas*.so*",
                  "/usr/lib/*-linux-gnu/libopenblas.so.0")


def load_system_blas() -> str:
    """Load OpenBLAS with RTLD_GLOBAL so MLX binds to it; return a description of the BLAS in use."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if os.environ.get("TWINLM_BLAS", "").lower() == "bundled":
        return "bundled reference BLAS (TWINLM_BLAS=bundled)"
    if "mlx.core" in sys.modules and "_twinlm_blas" not in globals():
        return "unknown (mlx was imported before twinlm could load OpenBLAS)"
    for pattern in OPENBLAS_GLOBS:
        for path in sorted(glob.glob(pattern)):
            try:
                globals()["_twinlm_blas"] = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return f"system OpenBLAS ({path})"
            except OSError:
                continue
    return "bundled reference BLAS (install libopenblas0-pthread for ~30x faster matmul)"


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> str:
    """MLX's CPU allocator is plain malloc, and glibc serves every block over 32 MB with mmap and
    returns it with munmap, so each step page-faults and zeroes its large activations anew: 40% of
    a medium-preset step was kernel page-fault time (perf). Serve them from the heap and never trim
    it: that step ran 2x faster, with 6% more peak RSS; freed memory stays with the process."""
    if not sys.platform.startswith("linux") or os.environ.get("TWINLM_MALLOC", "").lower() == "default":
        return "default"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc
        return "default"
    return "heap only, untrimmed" if ok else "default"


BLAS = load_system_blas()
MALLOC = keep_freed_memory()
