"""twinlm's CPU kernels for MLX: the core's composites (the linear layer as one BLAS sgemm onto the bias,
the embedding gather and its scatter-add, GELU, GELU-tanh, SwiGLU, RoPE, LayerNorm, RMSNorm, attention
(fused per head at short key axes, else the masked softmax between BLAS products) and the head split,
cross-entropy, the int8/int4 quantized matmul) as MLX primitives with their own
vectorised, multi-threaded CPU implementation and VJP, in a C++ extension built against the installed mlx
wheel (`csrc/`, CMake).

Built once per machine by `python -m twinlm.backends.kernels.build` (`make setup` runs it); nothing is
built or downloaded at run time. The MLX adapter loads it lazily (`load()`); anything that goes wrong
(not built, built for another MLX, a nanobind mismatch, no CPU device) leaves twinlm on MLX's own ops,
with the reason in `status()` for `twinlm doctor`. `TWINLM_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

ENV_VAR = "TWINLM_KERNELS"
MODULE = "_twinlm_kernels"
HERE = Path(__file__).resolve().parent
# The composites each kernel serves (what `doctor` lists as active).
KERNELS = ("linear (sgemm onto the bias)", "linear over bfloat16/float16 weights",
           "matmul_t: x @ W.T over bfloat16/float16 weights (the tied head)",
           "quantized_matmul (int8/int4 GEMV, dequantized tiles + sgemm)", "embedding (gather, scatter-add)",
           "gelu", "gelu_tanh", "swiglu", "rope", "layer_norm", "rms_norm",
           "attention (fused per head up to 1024 keys, else BLAS around a masked softmax)",
           "split_heads (views of qkv, one-pass gradient gather)", "cross_entropy",
           "adamw (every parameter in one pass)", "sum_squares (the global gradient norm)")
BUILD_HINT = "build them with: python -m twinlm.backends.kernels.build (make setup runs it)"


@dataclass
class Status:
    active: bool = False
    reason: str = "not loaded yet"
    simd: str = ""
    threads: int = 0
    kernels: tuple[str, ...] = ()
    path: str = ""
    build: dict = field(default_factory=dict)


_status = Status()
_module: ModuleType | None = None
_tried = False
_extension: ModuleType | None = None  # an extension module initialises once per process: keep it


def mlx_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx")
    except PackageNotFoundError:
        return "none"


def lib_dir(mlx_ver: str | None = None) -> Path:
    """Where the build for this MLX version, Python and machine architecture goes (a per-machine
    build; the loops inside pick AVX-512 / AVX2 / SSE2 at load time, so a CPU change needs no rebuild).
    $TWINLM_KERNELS_DIR overrides the parent folder (e.g. a per-user cache)."""
    root = Path(os.environ.get("TWINLM_KERNELS_DIR") or HERE / "lib")
    return root / f"mlx-{mlx_ver or mlx_version()}-{sys.implementation.cache_tag}-{platform.machine()}"


def library_path(mlx_ver: str | None = None) -> Path | None:
    d = lib_dir(mlx_ver)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (d / (MODULE + suffix)).exists():
            return d / (MODULE + suffix)
    return None


def disabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("0", "off", "false", "no")


def load() -> ModuleType | None:
    """The extension module, or None (with the reason in `status()`). Call after `import mlx.core`."""
    global _module, _tried, _status
    if _tried:
        return _module
    _tried = True
    _status = Status()
    if disabled():
        _status.reason = f"turned off by ${ENV_VAR}={os.environ.get(ENV_VAR)}"
        return None
    try:
        _module = _load()
    except Exception as e:  # any failure leaves MLX's own ops in place
        _module = None
        _status.reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return None
    _status.active = True
    _status.reason = "loaded"
    _status.simd = _module.simd_level()
    _status.threads = _module.threads()
    _status.kernels = KERNELS
    return _module


def _load() -> ModuleType:
    import mlx.core as mx

    ver = mlx_version()
    path = library_path(ver)
    if path is None:
        root = lib_dir(ver).parent
        built = sorted(p.name for p in root.glob("mlx-*")) if root.exists() else []
        other = f" (found builds for: {', '.join(built)})" if built else ""
        raise FileNotFoundError(f"not built for mlx {ver} on this machine{other}; {BUILD_HINT}")
    _status.path = str(path)
    info = path.parent / "build_info.json"
    if info.exists():
        _status.build = json.loads(info.read_text())
    global _extension
    if _extension is None:
        spec = importlib.util.spec_from_file_location(MODULE, path)
        assert spec is not None and spec.loader is not None
        _extension = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_extension)
    module = _extension
    if module.MLX_VERSION_BUILT != mx.__version__.split(".dev")[0]:
        raise ImportError(f"built for mlx {module.MLX_VERSION_BUILT}, running mlx {mx.__version__}; "
                          + BUILD_HINT)
    if mx.default_device() != mx.cpu:
        raise RuntimeError(f"MLX's default device is {mx.default_device()}; the kernels serve the CPU only")
    _smoke_test(module, mx)
    return module


def _smoke_test(module: ModuleType, mx: ModuleType) -> None:
    """One tiny call through the extension: an MLX array that cannot cross the boundary (a nanobind
    version other than MLX's) fails here with a TypeError, not in the middle of training."""
    x = mx.array([-1.0, 0.0, 2.0])
    y = module.gelu(x)
    mx.eval(y)
    want = [-0.15865525, 0.0, 1.9544997]
    if not all(abs(a - b) < 1e-5 for a, b in zip(y.tolist(), want, strict=True)):
        raise RuntimeError(f"smoke test gave gelu({x.tolist()}) = {y.tolist()}, expected {want}")


def status() -> Status:
    return _status


def reset() -> None:
    """Forget the loaded state (tests: reload after changing $TWINLM_KERNELS)."""
    global _module, _tried, _status
    _module, _tried, _status = None, False, Status()
