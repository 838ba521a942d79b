# `make demo` and `make test` each create or reuse .venv and install what they need,
# system packages included (Debian: dataset-fashion-mnist; we run as root).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM ?= /usr/bin/chromium

.PHONY: venv data browser demo ui lint format test screenshots reproduce reproduce-benchmark reliability clean
export DAGSTER_HOME := $(CURDIR)/dagster_home

# The stamp is remade when the dependencies change.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# pip takes torch 2.14.1 / torchvision 0.29.1 as pinned in pyproject (docs/design.md §7).
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST comes from Debian's package; on other systems set FCT_DATA_DIR to a folder
# holding the four IDX files.
data:
	@if [ -z "$$FCT_DATA_DIR" ] && [ ! -f $(FASHION_MNIST) ]; then \
		if command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
		else echo "Fashion-MNIST missing: install dataset-fashion-mnist or set FCT_DATA_DIR" >&2; exit 1; fi; \
	fi

# Chromium for the browser test (tests/ui), from Debian's package; on other systems install
# Chromium and run `make test CHROMIUM=/path/to/chromium`.
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		if command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else echo "Chromium missing: install it and pass CHROMIUM=/path/to/chromium" >&2; exit 1; fi; \
	fi

# The main job: base assets + model version v2 on Fashion-MNIST from an empty instance and
# LanceDB folder (deletes dagster_home's run storage and data/), promotion, eval table, lineage.
demo: venv data
	$(PY) -m fct_assets.demo --fresh

# The Dagster UI on 127.0.0.1:3000 (the code location is workspace.yaml).
ui: venv data
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# The paper's experiment alone (fct_ml, no orchestration): one seed, 16-23 min on 2 cores.
reproduce: venv data
	$(VENV)/bin/fct reproduce --dataset fashion-mnist --preset cpu --seed 0 --out runs/reproduce_seed0.json

# ruff: the formatter's layout and the linter's rules (pyproject [tool.ruff]); `make format` fixes.
lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint venv data browser
	FCT_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q

# The README's UI screenshots, as the browser test takes them (test-artifacts/ui -> docs/ui).
screenshots: venv data browser
	FCT_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q tests/ui
	mkdir -p docs/ui && cp test-artifacts/ui/asset_graph.png test-artifacts/ui/launchpad.png test-artifacts/ui/eval_report.png docs/ui/

# The committed reproduction results: three seeds x two settings (cpu, cpu-hard), their mean
# and spread; the settings share the new and side-info models through runs/stage-cache.
reproduce-benchmark: venv data
	$(PY) benchmarks/reproduce.py --dataset fashion-mnist --presets cpu cpu-hard --seeds 0 1 2

# Bad inputs and injected faults, and the report of what happened (~1 min).
reliability: venv data
	$(PY) benchmarks/reliability.py

clean:
	rm -rf runs .pytest_cache data test-artifacts
