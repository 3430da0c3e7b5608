# Humans and CI run the same targets. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint stubs bench release-protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) scripts/gen_protos.py --check
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -n 3 -m "not serial"
	$(PY) -m pytest -m serial

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/buf lint

# After a release: the protos as released become the baseline `buf breaking` checks against.
release-protos: setup
	$(VENV)/bin/buf build -o protos/released.binpb

stubs: setup
	$(PY) scripts/gen_protos.py

bench: setup
	$(PY) benchmarks/step_latency.py
	$(PY) benchmarks/step_latency.py --store sqlite
	$(PY) benchmarks/start_latency.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/backlog.py --explain-out .ratchet/backlog-explain.txt

clean:
	rm -rf $(VENV) .ratchet .pytest_cache .mypy_cache .ruff_cache
