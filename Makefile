# Every target sets itself up: a fresh clone needs only python3 (3.10+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
EK := $(VENV)/bin/ek
STAMP := $(VENV)/.installed
# Model weights cannot be downloaded in tests/CI; without this a hub lookup hangs ~30 s.
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install test test-all lint format docs demo demo-steel bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

lint: install
	$(PY) -m ruff check ensemble_kit tests benchmarks scripts
	$(PY) -m ruff format --check ensemble_kit tests benchmarks scripts
	$(PY) -m mypy ensemble_kit

format: install
	$(PY) -m ruff format ensemble_kit tests benchmarks scripts
	$(PY) -m ruff check --fix ensemble_kit tests benchmarks scripts

demo: install
	bash scripts/demo.sh $(EK)

demo-steel: install
	bash scripts/demo_steel.sh $(EK)

bench: install
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/blend.py
	$(PY) benchmarks/rle.py
	$(PY) benchmarks/tta.py

clean:
	rm -rf demo demo-steel .pytest_cache

docs: install
	$(PY) scripts/gen_docs.py
