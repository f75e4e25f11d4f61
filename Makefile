# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HF_STAMP := $(VENV)/.installed-hf

.PHONY: setup demo test test-all lint bench clean

$(STAMP): pyproject.toml
	@bash scripts/system-deps.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# The tests also check twinlm against Hugging Face transformers: the [hf] extra.
$(HF_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,hf]"
	@touch $(HF_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/twinlm parity --quick
	$(BIN)/twinlm train

test: $(HF_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

test-all: $(HF_STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.step --backend all --preset baby

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
