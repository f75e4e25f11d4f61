# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KSTAMP := $(VENV)/.kernels
KERNEL_SOURCES := $(wildcard twinlm/backends/kernels/csrc/*) twinlm/backends/kernels/CMakeLists.txt
HF_STAMP := $(VENV)/.installed-hf
# Which MLX build on Linux (pyproject extras cpu, cuda12, cuda13): CUDA 12 where an NVIDIA driver is, else
# the CPU build; TWINLM_MLX=cpu|cuda12|cuda13 overrides. Ignored on macOS (Metal).
TWINLM_MLX ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda12 || echo cpu)
MLX_WHEELS := mlx-cpu mlx-cuda-12 mlx-cuda-13
MLX_WHEEL := $(if $(filter cuda12,$(TWINLM_MLX)),mlx-cuda-12,$(if $(filter cuda13,$(TWINLM_MLX)),mlx-cuda-13,mlx-cpu))

.PHONY: setup demo test test-no-kernels test-all test-cl test-cl-train devcheck-dry lint bench kernels clean mlx-build

$(STAMP): pyproject.toml
	@case "$(TWINLM_MLX)" in cpu|cuda12|cuda13) ;; \
	  *) echo "TWINLM_MLX must be cpu, cuda12 or cuda13 (got '$(TWINLM_MLX)')" >&2; exit 2;; esac
	@bash scripts/system-deps.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# The MLX builds share files: remove any other build before installing this one.
	@$(BIN)/python -m pip uninstall -q -y $(filter-out $(MLX_WHEEL),$(MLX_WHEELS)) 2>/dev/null || true
	$(BIN)/python -m pip install -q -e ".[dev,$(TWINLM_MLX)]"
	@touch $(STAMP)

# Switch the MLX build of an existing venv: make mlx-build TWINLM_MLX=cuda12
mlx-build:
	rm -f $(STAMP) $(KSTAMP)
	$(MAKE) setup TWINLM_MLX=$(TWINLM_MLX)

# twinlm's MLX CPU kernels (C++, built against the installed mlx wheel): a failed build prints one
# warning and MLX runs on its own ops (`twinlm doctor` says why); set-up never fails over it.
$(KSTAMP): $(STAMP) $(KERNEL_SOURCES)
	-$(BIN)/python -m twinlm.backends.kernels.build
	@touch $(KSTAMP)

# The tests also check twinlm against Hugging Face transformers (the [hf] extra) and run `twinlm serve`
# (the [serve] extra).
$(HF_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,hf,serve,$(TWINLM_MLX)]"
	@touch $(HF_STAMP)

setup: $(STAMP) $(KSTAMP)

kernels: $(STAMP)
	$(BIN)/python -m twinlm.backends.kernels.build -v

demo: $(STAMP) $(KSTAMP)
	$(BIN)/twinlm parity --quick
	$(BIN)/twinlm train

test: $(HF_STAMP) $(KSTAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

# The parity suite with the MLX kernels off: MLX's own ops must keep passing too.
test-no-kernels: $(HF_STAMP)
	TWINLM_KERNELS=0 $(BIN)/python -m pytest -n 2 -q tests/test_primitives.py tests/test_parity.py tests/test_kernels.py

test-all: $(HF_STAMP) $(KSTAMP)
	$(BIN)/python -m pytest -n 2 -q -m "slow or not slow"

# tinygrad's OpenCL device through pocl, on this CPU (CI): installs pocl when missing, then runs the tinygrad
# primitive and parity tests with DEV=CL (the float64 phases where the device reports cl_khr_fp64).
# The rest of the suite pins DEV=CPU (tests/conftest.py).
test-cl: $(STAMP)
	@bash scripts/system-deps.sh --opencl
	@# Not the AdamW-step and leakage tests: pocl compiles each new training graph for minutes (make
	@# test-cl-train covers a training step on CL).
	DEV=CL $(BIN)/python -m pytest -p no:xdist -q tests/test_primitives.py tests/test_parity.py tests/test_device.py \
	  -k "(tinygrad and not adamw and not leakage) or device"

# A short `twinlm train --device CL` (not in CI: ~3 minutes, nearly all of it pocl compiling the graphs).
test-cl-train: $(STAMP)
	@bash scripts/system-deps.sh --opencl
	cd $$(mktemp -d) && seq 1 2000 | sed 's/$$/ the quick brown fox/' > text.txt && \
	  $(CURDIR)/$(BIN)/twinlm train --backend tinygrad --device CL --data text.txt --preset tiny \
	  --block-size 16 --batch-size 4 --max-iters 3 --eval-iters 1 --eval-every 100 --out cl-run | tee train.log && \
	  grep -q "backend tinygrad on CL" train.log && grep -q '"device": "CL"' cl-run/metrics.jsonl

# The device check (python -m twinlm.devcheck) at tiny sizes on the CPU: every step, in minutes (CI).
devcheck-dry: $(STAMP)
	$(BIN)/python -m twinlm.devcheck --dry-run --out $${TMPDIR:-/tmp}/devcheck-dry-run.json

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) $(KSTAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.step --backend all --preset baby

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache twinlm/backends/kernels/lib
