# One command on a fresh clone: every target creates (or reuses) .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is the test oracle only, never a runtime dependency (2.13.0 is the CPU build used here).
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# Where tfds looks for prepared datasets: TFDS_DATA_DIR if set, else a prepared copy beside the
# checkout (../shared/tensorflow_datasets), else tfds' own default.
SHARED_TFDS := $(abspath ../shared/tensorflow_datasets)
ifeq ($(origin TFDS_DATA_DIR),undefined)
ifneq ($(wildcard $(SHARED_TFDS)),)
export TFDS_DATA_DIR := $(SHARED_TFDS)
endif
endif

.PHONY: install test lint format docs bench bench-quick render train-mnist train-regression train-sentiment clean

# The install compiles the C++ loop (CMakeLists.txt, once per ISA level): again when its sources
# change, since an editable install refuses a library older than them.
$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard jlstm/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[all]'
	@# What impl="auto" runs on CPU: the C++ loop's ISA level and library, or why not.
	$(PY) -m jlstm.native || echo "jlstm: continuing with the pure-JAX paths"
	touch $@

$(VENV)/.torch: $(VENV)/.installed
	$(PIP) install -q '$(TORCH_SPEC)'
	touch $@

install: $(VENV)/.installed

# Two workers: compilation dominates and parallelises across processes. pyproject.toml's pytest
# settings add the docstring examples of jlstm/ as doctests (testpaths tests jlstm, --doctest-modules).
test: $(VENV)/.installed $(VENV)/.torch
	$(PY) -m pytest -q -n 2

$(VENV)/.docs: $(VENV)/.installed
	$(PIP) install -q -e '.[docs]'
	touch $@

# The docs site (docs/, Sphinx): the guides and the API reference from the docstrings, offline,
# warnings as errors, into docs/_build/html.
docs: $(VENV)/.docs
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check jlstm experiments tests tools
	$(VENV)/bin/ruff format --check jlstm experiments tests tools

format: $(VENV)/.installed
	$(VENV)/bin/ruff format jlstm experiments tests tools
	$(VENV)/bin/ruff check --fix jlstm experiments tests tools

# Round-robin timing against torch (and flax, and cuDNN on GPU); see BENCHMARKS.md. ARGS="--cases mnist".
# A full run (every case and mode) replaces this CPU's file in benchmarks/results/, and the pages
# are rendered again from that folder.
bench: $(VENV)/.installed $(VENV)/.torch
	$(PY) -m experiments.bench --results-dir benchmarks/results $(ARGS)
	$(PY) -m experiments.results

bench-quick: $(VENV)/.installed $(VENV)/.torch
	$(PY) -m experiments.bench --quick $(ARGS)

# BENCHMARKS.md, README's Performance block and experiments/README.md's example outputs, from the
# committed results (benchmarks/results/, experiments/results/); tests/test_results.py checks them.
render:
	$(PYTHON) -m experiments.results

# Row-by-row MNIST LSTM (experiments/mnist.py); writes runs/mnist. ARGS="--epochs 1 ..." passes flags.
train-mnist: $(VENV)/.installed
	$(PY) -m experiments.mnist $(ARGS)

# sin -> cos with a carried state (experiments/regression.py); writes runs/regression. ARGS="--cell rnn".
train-regression: $(VENV)/.installed
	$(PY) -m experiments.regression $(ARGS)

# IMDB reviews -> bidirectional LSTM -> positive/negative (experiments/sentiment.py); writes
# runs/sentiment. Needs imdb_reviews prepared for tfds (--data-dir or TFDS_DATA_DIR).
train-sentiment: $(VENV)/.installed
	$(PY) -m experiments.sentiment $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build
