# The two commands: `make demo` and `make test`. Each installs what it needs, once.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup model protos lint test demo bench clean

setup:
	@bash scripts/setup.sh

model: setup
	@echo "==> bundled model (converted once, then cached)"
	@$(BIN)/omnistage model prepare smollm2

protos: setup
	$(PY) scripts/gen_protos.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: model lint
	$(BIN)/pytest

demo: model
	$(PY) scripts/demo.py

bench: model
	$(PY) bench/stage_overhead.py
	$(PY) bench/pipeline_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
