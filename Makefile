# medaug: the two commands a newcomer runs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-quick bench-smoke verify-inception lint bench clean

setup: $(STAMP)

# torch is pinned to the CPU build that sits on this machine's disk; installing it
# first keeps pip from resolving an unpinned torch to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/medaug demo --out demo-output

lint: setup
	$(BIN)/ruff check pipeline models flows medaug tests bench
	$(BIN)/mypy

# The suite runs in two pytest-xdist workers, one torch thread each: alone it keeps about one of
# the two cores busy, and two workers cut its wall time to 0.73x (bench/RESULTS.md, Test suite wall time).
# --dist loadscope keeps each module (and its module-scoped fixtures) on one worker.
# The benchmark scripts' end-to-end smoke runs (marker `bench`) are `make bench-smoke`, which CI runs too.
PYTEST_WORKERS ?= 2
test: setup lint
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadscope -m "not bench" tests

# while editing: leaves out the real-server and longer training tests (marker `slow`) too
test-quick: setup
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadscope -m "not bench and not slow" tests

# bench/cyclegan.py, gate.py and downstream.py --smoke (and their SIGTERM handling) end to end: a few minutes on CPU
bench-smoke: setup
	OMP_NUM_THREADS=2 $(BIN)/pytest -q -m bench tests

# FIDInceptionV3 (pipeline/gate/inception.py) against torchvision's Inception3, block by block, to 1e-5
# (tests/inception_reference.py). torchvision is test-only and has no build for the CPU torch of
# .venv, so this builds its own venv (torch + torchvision, a ~5 GB download the first time).
TV_VENV ?= .venv-torchvision
verify-inception:
	test -x $(TV_VENV)/bin/python || $(PYTHON) -m venv $(TV_VENV)
	$(TV_VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 numpy pytest
	PYTHONPATH=. OMP_NUM_THREADS=2 $(TV_VENV)/bin/python tests/inception_reference.py
	PYTHONPATH=. OMP_NUM_THREADS=2 $(TV_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_inception_reference.py

# bench/gate.py defaults to N=10000, 256x256 on a GPU; here it runs on CPU at N=1000, 64x64 (a few minutes)
bench: setup
	$(BIN)/python bench/gate.py --device cpu --n 1000 --size 64 --inception-n 64
	$(BIN)/python bench/ingest.py

clean:
	rm -rf demo-output .pytest_cache .mypy_cache .ruff_cache
