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
DEMO := runs/demo

# The main job end to end, embedded (no server): data -> train -> evaluate -> generate.
# Re-running resumes the finished training instead of starting over.
demo: install
	$(MEMLM) data bios --people 1000 --seed 0 --out $(DEMO)/bios
	$(MEMLM) train --config configs/demo.yaml --resume
	$(MEMLM) eval qa --model $(DEMO)/dense/final --data $(DEMO)/bios --split seen --limit 300
	$(MEMLM) eval qa --model $(DEMO)/dense/final --data $(DEMO)/bios --split unseen --limit 300
	$(MEMLM) generate --model $(DEMO)/dense/final --stop '\n' --prompts-file $(DEMO)/bios/qa/seen.jsonl --limit 4

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
