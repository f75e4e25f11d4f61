# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KSTAMP := $(VENV)/.kernels
KERNEL_SOURCES := $(wildcard twinlm/backends/kernels/csrc/*) twinlm/backends/kernels/CMakeLists.txt
HF_STAMP := $(VENV)/.installed-hf

.PHONY: setup demo test test-no-kernels test-all lint bench kernels clean

$(STAMP): pyproject.toml
	@bash scripts/system-deps.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# twinlm's MLX CPU kernels (C++, built against the installed mlx wheel): a failed build prints one
# warning and MLX runs on its own ops (`twinlm doctor` says why); set-up never fails over it.
$(KSTAMP): $(STAMP) $(KERNEL_SOURCES)
	-$(BIN)/python -m twinlm.backends.kernels.build
	@touch $(KSTAMP)

# The tests also check twinlm against Hugging Face transformers (the [hf] extra) and run `twinlm serve`
# (the [serve] extra).
$(HF_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,hf,serve]"
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

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) $(KSTAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.step --backend all --preset baby

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache twinlm/backends/kernels/lib
