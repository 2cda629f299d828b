# Two commands a user needs: `make demo` (set up, run the main job on the embedded world)
# and `make test` (set up, run the test suite). Both create .venv when it is absent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU wheels (they lie on the development machines' disk); GPU users install their own CUDA torch.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: setup demo demo-bn tables test lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m cli.demo --out $(DEMO_DIR)

demo-bn: setup
	$(PY) -m cli.demo --out $(DEMO_DIR)-bn --bengali

# the papers' ablation tables on the embedded world, 3 seeds a row: RESULTS.md and docs/results/
tables: setup
	$(PY) -m cli.tables --config configs/tables.yaml

test: setup
	$(PY) -m shards.cc15m --setup  # img2dataset's own venv, for the end-to-end shard-building test
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache .ruff_cache
