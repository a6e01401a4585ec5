# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.memlm-installed

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: a looser requirement would let pip pull a newer CUDA build (several GB).
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

MEMLM := $(VENV)/bin/memlm

# The main job end to end, embedded (no server): bios data and bank, dense and memory models trained on the
# same text, answers about unseen people with their sources, an edit and a deletion, the comparison table.
# Re-running reuses what an earlier run trained (memlm.demo).
demo: install
	$(MEMLM) demo --out runs/demo

test: install
	$(VENV)/bin/ruff check memlm tests benchmarks
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check memlm tests benchmarks
	$(VENV)/bin/ruff format --check memlm tests benchmarks

format: install
	$(VENV)/bin/ruff format memlm tests benchmarks
	$(VENV)/bin/ruff check --fix memlm tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
