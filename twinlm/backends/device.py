"""Which device each framework runs on: `--device` / $TWINLM_DEVICE, applied before a backend is created.

Left alone, each framework picks for itself: MLX takes the GPU whenever its build has one, tinygrad the
first device that opens (METAL, AMD, NV, CUDA, QCOM, CL, then CPU), so installing an OpenCL runtime
silently moves tinygrad from CPU to CL. A device asked for here is made the framework's default before
any array exists; one that does not exist is one clear error, never a fallback.

The spec is one device for every backend (`cpu`, `gpu`, `CL`, `CUDA`, ...) or per backend,
`mlx=gpu,tinygrad=CUDA`. MLX knows `cpu` and `gpu`; tinygrad takes its own device strings (`CPU`, `CL`,
`CUDA`, `NV`, `METAL`, `AMD`, with an optional `:N` index or renderer, e.g. `CUDA:PTX`); the numpy
reference always runs on the host. Framework imports stay inside the functions (lazy, like the registry).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from twinlm.core.errors import TwinlmError

DEVICE_ENV = "TWINLM_DEVICE"
MLX_DEVICES = ("cpu", "gpu")
TF32_ENV = "MLX_ENABLE_TF32"

_requested: str | None = None  # set by the CLI's --device; else $TWINLM_DEVICE


class DeviceUnavailable(TwinlmError, RuntimeError):
    """The device asked for does not exist for that framework here; the message says what does."""


def request(spec: str | None) -> None:
    """Remember the CLI's `--device` for every backend this process creates (None: back to the env)."""
    global _requested
    if spec is not None:
        parse(spec)  # a malformed spec fails now, before any work
    _requested = spec or None


def requested() -> str | None:
    """The device spec in force: `--device`, else $TWINLM_DEVICE, else None (the framework's choice)."""
    return _requested if _requested is not None else (os.environ.get(DEVICE_ENV) or None)


def parse(spec: str) -> dict[str | None, str]:
    """`gpu` -> {None: "gpu"}; `mlx=gpu,tinygrad=CL` -> {"mlx": "gpu", "tinygrad": "CL"}."""
    out: dict[str | None, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, eq, dev = part.partition("=")
        key: str | None = name.strip().lower() if eq else None
        dev = (dev if eq else name).strip()
        if not dev or (key is not None and key not in ("mlx", "tinygrad", "numpy")):
            raise DeviceUnavailable(f"bad device {spec!r}: give one device (cpu, gpu, CL, CUDA, ...) or "
                                    "backend=device pairs such as mlx=gpu,tinygrad=CUDA")
        if key in out:
            raise DeviceUnavailable(f"bad device {spec!r}: {key or 'a device for every backend'} given twice")
        out[key] = dev
    return out


def for_backend(name: str, spec: str | None = None) -> str | None:
    """The device asked of backend `name` by `spec` (default: `requested()`), or None."""
    spec = spec if spec is not None else requested()
    if not spec:
        return None
    table = parse(spec)
    return table.get(name, table.get(None))


def apply(name: str, device: str | None) -> str:
    """Make `device` the default of backend `name`'s framework (None: leave its own choice); return the
    device now in use, e.g. "cpu", "gpu", "CL", "CUDA:1". Raises DeviceUnavailable for one that is absent."""
    if name == "mlx":
        return _apply_mlx(device)
    if name == "tinygrad":
        return _apply_tinygrad(device)
    return "cpu"  # the numpy reference: the host, whatever was asked of the frameworks


def _mlx() -> Any:
    # mlx_native must run before mlx.core is imported (see its docstring): keep this order.
    # isort: off
    from twinlm.backends import mlx_native  # noqa: F401
    import mlx.core as mx
    # isort: on

    return mx


def _apply_mlx(device: str | None) -> str:
    mx = _mlx()
    if device is not None:
        d = device.lower()
        if d not in MLX_DEVICES:
            raise DeviceUnavailable(f"MLX has no device {device!r}; its devices are cpu and gpu")
        if d == "gpu" and not mx.is_available(mx.gpu):
            raise DeviceUnavailable(f"MLX has no GPU here (installed build: {mlx_build()}); use --device "
                                    "cpu, or install a GPU build (see the README: MLX builds)")
        mx.set_default_device(mx.gpu if d == "gpu" else mx.cpu)
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def _apply_tinygrad(device: str | None) -> str:
    from tinygrad import Device
    from tinygrad.helpers import DEV

    if device is None:
        asked = os.environ.get("DEV")
        # tinygrad's own choice (it writes DEV into the environment for children), except OpenCL on the CPU
        # (pocl), which it prefers to its CPU device once installed: measured ~120x slower here (README,
        # "tinygrad on OpenCL"). --device CL or DEV=CL still take it.
        if asked is None and Device.DEFAULT.split(":")[0] == "CL" and _cl_is_cpu(Device["CL"]) \
                and "CPU" in tinygrad_devices():
            return _apply_tinygrad("CPU")
        return Device.DEFAULT
    base = device.split(":")[0].upper()
    known = sorted(d for d in Device._devices if d not in ("DISK", "TINYFS", "NPY", "PYTHON"))
    if base not in known:
        raise DeviceUnavailable(f"tinygrad has no device {device!r}; its devices are {', '.join(known)}")
    before = DEV.value
    DEV.value = device
    try:
        Device[Device.DEFAULT]  # opens it now: a missing driver or runtime is an error here, not later
    except Exception as e:
        DEV.value = before
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DeviceUnavailable(f"tinygrad device {device!r} does not open here ({first[:160]}); "
                                f"devices that open: {', '.join(tinygrad_devices()) or 'none'}") from None
    os.environ["DEV"] = device  # child processes (ranks, experiments) inherit it, as tinygrad does itself
    return Device.DEFAULT


def tinygrad_devices() -> list[str]:
    """tinygrad's devices that open on this machine, in its preference order."""
    from tinygrad import Device

    return list(dict.fromkeys(Device.get_available_devices()))


def mlx_build() -> str:
    """Which MLX backend wheel is installed: mlx-cpu, mlx-metal, mlx-cuda-12, mlx-cuda-13 (or 'none')."""
    import importlib.metadata as md

    found = []
    for dist in ("mlx-cpu", "mlx-metal", "mlx-cuda-12", "mlx-cuda-13", "mlx-cuda"):
        try:
            found.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            continue
    if not found and platform.system() == "Darwin":
        return "mlx (macOS: Metal)"
    return ", ".join(found) or "none"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tf32_enabled() -> bool:
    """MLX's TF32 switch as the process will read it (once, at its first float32 matmul; default on)."""
    return os.environ.get(TF32_ENV, "1") not in ("0", "false", "False", "")


def describe(name: str, device: str | None = None) -> dict[str, Any]:
    """The device backend `name` runs on (tinygrad: `device`, else its default): {"device", "name",
    "memory_bytes", "float64", "tf32"}, with None where the framework does not tell."""
    if name == "mlx":
        mx = _mlx()
        dev = "gpu" if mx.default_device() == mx.gpu else "cpu"
        info = mx.device_info() if hasattr(mx, "device_info") else {}
        mem = info.get("memory_size") or info.get("total_memory")
        return {"device": dev, "name": info.get("device_name") or (cpu_name() if dev == "cpu" else None),
                "memory_bytes": int(mem) if mem else None, "float64": False,
                # TF32 only exists on a GPU's float32 matmuls (CUDA; Apple GPUs with neural accelerators)
                "tf32": tf32_enabled() if dev == "gpu" else False, "build": mlx_build()}
    if name == "tinygrad":
        from tinygrad import Device

        dev = device or Device.DEFAULT
        d = Device[dev]
        return {"device": dev, "name": _tinygrad_name(d, dev), "memory_bytes": _tinygrad_memory(d),
                "float64": tinygrad_float64(dev), "tf32": False}  # tinygrad keeps TF32 off (ALLOW_TF32=0)
    return {"device": "cpu", "name": cpu_name(), "memory_bytes": None, "float64": True, "tf32": False}


def label(info: dict[str, Any]) -> str:
    """One line for a header: `CL (pthread-skylake-avx512-AMD EPYC, 21.5 GiB)`."""
    extra = [x for x in (info.get("name"),) if x]
    if info.get("memory_bytes"):
        extra.append(f"{info['memory_bytes'] / 2**30:.1f} GiB")
    return f"{info['device']}" + (f" ({', '.join(extra)})" if extra else "")


def tinygrad_float64(device: str | None = None) -> bool:
    """Whether tinygrad's device compiles float64 (its renderer's supported dtypes: none on Metal, on
    OpenCL only with cl_khr_fp64)."""
    from tinygrad import Device, dtypes

    try:
        return dtypes.float64 in Device[device or Device.DEFAULT].renderer.supported_dtypes()
    except Exception:
        return False


def _tinygrad_name(d: Any, dev: str) -> str | None:
    if dev.split(":")[0] == "CPU":
        return cpu_name()
    name = getattr(d, "device_name", None) or getattr(getattr(d, "renderer", None), "arch", None)
    return str(name) if name else None


def _cl_is_cpu(d: Any) -> bool:
    """Whether a tinygrad CL device is an OpenCL implementation on the CPU (pocl), by its device type."""
    try:
        import ctypes

        from tinygrad.runtime.autogen import opencl as cl

        kind = ctypes.c_ulong()
        cl.clGetDeviceInfo(d.cl_dev, cl.CL_DEVICE_TYPE, ctypes.sizeof(kind), ctypes.byref(kind), None)
        return bool(kind.value & cl.CL_DEVICE_TYPE_CPU)
    except Exception:
        return False


def _tinygrad_memory(d: Any) -> int | None:
    """Global memory where the runtime says it cheaply (OpenCL); None elsewhere."""
    try:
        import ctypes

        from tinygrad.runtime.autogen import opencl as cl

        if hasattr(d, "cl_dev"):
            size = ctypes.c_ulong()
            cl.clGetDeviceInfo(d.cl_dev, cl.CL_DEVICE_GLOBAL_MEM_SIZE, ctypes.sizeof(size),
                               ctypes.byref(size), None)
            return int(size.value) or None
    except Exception:
        return None
    return None
