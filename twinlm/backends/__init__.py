"""Backend registry with lazy imports: a framework that is absent or broken never breaks another.

Choose with `get_backend("mlx" | "tinygrad" | "numpy")`, the `TWINLM_BACKEND` environment
variable, or the default (MLX when it imports, else tinygrad). The device comes from `--device` /
`TWINLM_DEVICE` (`twinlm.backends.device`), made the framework's default before the backend is created.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from twinlm.core.backend import Backend
from twinlm.core.errors import TwinlmError

ENV_VAR = "TWINLM_BACKEND"
JIT_CACHE_ENV = "TWINLM_JIT_CACHE"
TRAINABLE = ("mlx", "tinygrad")
_MODULES = {"mlx": "twinlm.backends.mlx", "tinygrad": "twinlm.backends.tinygrad",
            "numpy": "twinlm.backends.numpy_ref"}
_HINTS = {
    "mlx": "install it with: pip install 'mlx[cpu]' (Linux) or pip install mlx (macOS)",
    "tinygrad": "install it with: pip install tinygrad==0.14.0 (Python >= 3.11; its CPU device also needs "
                "clang on PATH)",
    "numpy": "install numpy",
}
_cache: dict[str, Backend] = {}


class BackendUnavailable(TwinlmError, RuntimeError):
    """The named backend cannot be used here; the message says what to install."""


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


def get_backend(name: str | None = None, devices: int = 1, device: str | None = None) -> Backend:
    """The backend object for `name` (or $TWINLM_BACKEND, or the default), created once per device;
    `devices` > 1: tinygrad's data-parallel form over that many devices (see the adapter); `device`: the
    device to run on (default: `--device` / $TWINLM_DEVICE for this backend, else the framework's own)."""
    from twinlm.backends import device as dev

    name = check_name(name or os.environ.get(ENV_VAR) or default_name())
    device = device if device is not None else dev.for_backend(name)
    key = name if devices == 1 else f"{name}:{devices}"
    key += f"@{device}" if device is not None else ""
    if key not in _cache or device is not None:
        try:
            # Before the backend exists (and again for a cached one: the default device is process-wide).
            dev.apply(name, device)
        except dev.DeviceUnavailable:
            raise
        except Exception as e:  # the framework itself does not import: the install hint below
            raise BackendUnavailable(f"backend {name!r} is unavailable ({type(e).__name__}: {e}); "
                                     f"{_HINTS[name]}") from e
    if key not in _cache:
        try:
            module = importlib.import_module(_MODULES[name])
            _cache[key] = module.create(devices) if devices > 1 else module.create()
        except BackendUnavailable:
            raise
        except Exception as e:  # ImportError, or a framework that fails on this machine
            raise BackendUnavailable(f"backend {name!r} is unavailable ({type(e).__name__}: {e}); "
                                     f"{_HINTS[name]}") from e
    return _cache[key]


def check_name(name: str) -> str:
    """`name` in lower case, or BackendUnavailable if no such backend exists."""
    if name.lower() not in _MODULES:
        raise BackendUnavailable(f"unknown backend {name.lower()!r}; choose from {', '.join(_MODULES)}")
    return name.lower()


def default_name() -> str:
    for name in TRAINABLE:
        if importlib.util.find_spec(name) is not None:
            return name
    return "numpy"


def jit_cache_dir() -> Path | None:
    """Where the tinygrad adapter keeps captured TinyJits (tinygrad_jitcache), or None when
    TWINLM_JIT_CACHE=0; here, apart from that module, because computing it needs no tinygrad."""
    setting = os.environ.get(JIT_CACHE_ENV, "")
    if setting == "0":
        return None
    if setting:
        return Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "twinlm" / "tinygrad-jit"
