"""Build twinlm's MLX CPU kernels for this machine: `python -m twinlm.backends.kernels.build`.

Configures `CMakeLists.txt` against the installed mlx wheel's CMake config (`python -m mlx --cmake-dir`)
and nanobind, and writes `_twinlm_kernels*.so` plus `build_info.json` into `kernels.lib_dir()`.
The nanobind version must be the one MLX itself was built with, or mx.array will not cross the
boundary: it is chosen from the internals key compiled into MLX's own module (NANOBIND_FOR_KEY), a
different installed version is replaced by pip (--no-install: an error instead), and the built module's
key is checked against MLX's before it is installed.

Never fails set-up: without --strict, any failure prints one warning and exits 0 (twinlm then runs on
MLX's own ops and `twinlm doctor` says why).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from twinlm.backends import kernels

# The nanobind release to build with, by the internals key found in MLX's own extension module
# (`mlx/core.*.so`): nanobind shares its type registry (and so mx.array) only between modules whose
# keys match. 2.x writes "v<internals>_<platform>", 3.x "nanobind_<platform>_a<backend ABI>_v<internals>".
# mlx 0.32.2 pinned nanobind 2.15.0 (its CMakeLists.txt); the 0.32.4 Linux wheel carries the 3.x key.
NANOBIND_FOR_KEY = (("_a1_v22", "3.1.0"), ("v21_", "2.15.0"))
KEY_PATTERN = re.compile(rb"nanobind_[a-z0-9_]+_a[0-9]+_v[0-9]+|v[0-9]+_(?:system|gcc|clang|msvc)[a-z0-9_]*")


class BuildError(RuntimeError):
    pass


def nanobind_key(path: Path) -> str | None:
    """The nanobind internals key compiled into an extension module (None if none is found)."""
    found = KEY_PATTERN.search(path.read_bytes())
    return found.group(0).decode() if found else None


def mlx_extension() -> Path:
    import mlx

    found = sorted(Path(mlx.__path__[0]).glob("core.*"))
    if not found:
        raise BuildError("mlx/core.* (MLX's Python extension) not found")
    return found[0]


def wanted_nanobind(mlx_key: str | None) -> str:
    for part, ver in NANOBIND_FOR_KEY:
        if mlx_key and part in mlx_key:
            return ver
    raise BuildError(f"no known nanobind release matches MLX's nanobind key {mlx_key!r}")


def installed_nanobind() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nanobind")
    except PackageNotFoundError:
        return None


def ensure_nanobind(want: str, install: bool, log) -> str:
    have = installed_nanobind()
    if have == want:
        return have
    if not install:
        raise BuildError(f"nanobind {have or 'not installed'}, MLX needs {want}: "
                         f"pip install nanobind=={want}")
    log(f"installing nanobind=={want} (MLX's; found {have or 'none'})")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"nanobind=={want}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"pip install nanobind=={want} failed: {proc.stderr.strip()[-500:]}")
    return want


def run(cmd: list[str], log, verbose: bool) -> None:
    if verbose:
        log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=not verbose, text=True)
    if proc.returncode != 0:
        tail = "" if verbose else (proc.stdout + proc.stderr).strip()[-3000:]
        raise BuildError(f"{cmd[0]} {cmd[1]} failed:\n{tail}")


def build(jobs: int = 2, install: bool = True, verbose: bool = False, log=print,
          cmake_args: tuple[str, ...] = ()) -> Path:
    if sys.platform == "win32":
        raise BuildError("the kernels build on Linux and macOS only")
    for tool in ("cmake",):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found (apt-get install cmake g++, or pip install cmake)")
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        raise BuildError(f"mlx does not import: {e}") from e
    mlx_ver = kernels.mlx_version()
    mlx_key = nanobind_key(mlx_extension())
    nb_ver = ensure_nanobind(wanted_nanobind(mlx_key), install, log)
    out = kernels.lib_dir(mlx_ver)
    t0 = time.perf_counter()
    work = out.parent / f"{out.name}.build"  # kept: a rebuild recompiles only what changed
    work.mkdir(parents=True, exist_ok=True)
    lib_out = work / "out"
    cfg = ["cmake", "-S", str(kernels.HERE), "-B", str(work), "-DCMAKE_BUILD_TYPE=Release",
           f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_out}",
           *cmake_args]
    run(cfg, log, verbose)
    run(["cmake", "--build", str(work), "-j", str(jobs)], log, verbose)
    built = [p for p in lib_out.iterdir() if p.name.startswith(kernels.MODULE)]
    if not built:
        raise BuildError("the build produced no module")
    ours = nanobind_key(built[0])
    if ours != mlx_key:
        raise BuildError(f"nanobind key {ours!r} differs from MLX's {mlx_key!r}: "
                         "mx.array would not cross")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(kernels.MODULE + "*"):
        old.unlink()
    dest = out / built[0].name
    shutil.copy2(built[0], dest.with_suffix(".tmp"))
    os.replace(dest.with_suffix(".tmp"), dest)
    seconds = time.perf_counter() - t0
    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    info = {"mlx": mlx_ver, "nanobind": nb_ver, "nanobind_key": mlx_key, "python": platform.python_version(),
            "machine": platform.machine(), "compiler": compiler, "seconds": round(seconds, 1),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"twinlm kernels built in {seconds:.0f} s: {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twinlm.backends.kernels.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--strict", action="store_true", help="exit 1 when the build fails")
    ap.add_argument("--no-install", action="store_true", help="never pip-install nanobind")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--clean", action="store_true", help="drop the kept CMake build folder first")
    ap.add_argument("--cmake-arg", action="append", default=[],
                    help="extra CMake argument, e.g. -DCMAKE_CXX_FLAGS=-DTWINLM_NO_CLONES (baseline only)")
    args = ap.parse_args(argv)
    try:
        if args.clean:
            shutil.rmtree(kernels.lib_dir().parent / f"{kernels.lib_dir().name}.build", ignore_errors=True)
        build(args.jobs, not args.no_install, args.verbose, cmake_args=tuple(args.cmake_arg))
    except Exception as e:  # set-up must not fail because of the kernels
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"warning: twinlm's MLX CPU kernels were not built ({first}); MLX runs on its own ops. "
              f"Details: python -m twinlm.backends.kernels.build -v", file=sys.stderr)
        if args.verbose:
            print(str(e), file=sys.stderr)
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
