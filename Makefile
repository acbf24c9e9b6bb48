# The README's commands. `make demo` and `make test` work on a fresh machine: they set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A bare `torch` pulls a CUDA build of several GB; this pin takes the CPU build from local disk where
# the machine has one. Override with TORCH_SPEC= to skip the pin.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast lint bench gpu-validate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job on the CPU default: the seed scenario hangs (vdiag exits 1) and the report is written.
demo: install
	@$(BIN)/vdiag run scenarios/llama70b-pp2-tp2-fusion.yaml; rc=$$?; \
	if [ $$rc -eq 1 ]; then echo "demo: hang reproduced (exit 1), as expected; report above"; \
	else echo "demo: expected exit 1 (hang reproduced), got $$rc"; exit 1; fi

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q tests/unit

lint: install
	$(BIN)/ruff check repro tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/run_bench.py --out bench/results

gpu-validate:
	bash gpu/validate.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
