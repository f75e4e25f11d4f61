#!/usr/bin/env bash
# System packages twinlm needs on Linux: clang (tinygrad's CPU device compiles kernels with it)
# and OpenBLAS (MLX's bundled reference BLAS is ~30x slower). Installs them with apt when it can.
# Optional: cmake and g++ build twinlm's MLX CPU kernels; installed along when apt can, never required.
# With --opencl (make test-cl): pocl, a CPU OpenCL implementation, and clinfo, so tinygrad's CL device runs here.
set -euo pipefail
[ "$(uname -s)" = "Linux" ] || exit 0
if [ "${1:-}" = "--opencl" ]; then
  ls /etc/OpenCL/vendors/*.icd >/dev/null 2>&1 && exit 0  # an OpenCL runtime is installed (pocl or another)
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "tinygrad's CL device needs an OpenCL runtime (e.g. pocl); install it with your package manager" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      echo "tinygrad's CL device needs pocl; run: sudo apt-get install -y pocl-opencl-icd clinfo" >&2
      exit 1
    fi
  fi
  echo "installing pocl-opencl-icd clinfo with apt-get (tinygrad's OpenCL device on this CPU)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq pocl-opencl-icd clinfo >/dev/null
  exit 0
fi
missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1 || missing+=(libopenblas0-pthread)
optional=()
command -v cmake >/dev/null 2>&1 || optional+=(cmake)
command -v c++ >/dev/null 2>&1 || optional+=(g++)
if [ ${#missing[@]} -eq 0 ]; then
  [ ${#optional[@]} -eq 0 ] && exit 0
  # Only the kernels' build tools are missing: try quietly, never fail set-up over them.
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    echo "installing ${optional[*]} with apt-get (to build twinlm's MLX CPU kernels)"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${optional[@]}"; } \
      >/dev/null 2>&1 || echo "could not install ${optional[*]}: MLX will run without twinlm's kernels" >&2
  fi
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "twinlm needs: ${missing[*]} (clang for tinygrad, OpenBLAS for fast MLX); install them with your package manager" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "twinlm needs: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
echo "installing ${missing[*]} with apt-get"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
if [ ${#optional[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${optional[@]}" >/dev/null 2>&1 \
    || echo "could not install ${optional[*]}: MLX will run without twinlm's kernels" >&2
fi
