# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make run   -> .venv + install + the default experiment (configs/tiny.py)
#   make test  -> .venv + install + the whole test suite (8 fake CPU devices)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/tiny
PYTEST_ARGS ?=

.PHONY: install run test test-fast bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,colab]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.main --config=configs/tiny.py --workdir=$(WORKDIR)

# --dist loadfile: a file's tests share one worker and so its in-memory caches (op-by-op programs,
# lru_cached fixtures, shared Programs); the suite is CPU-bound, and this costs ~7 % less CPU.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m experiments.bench_model

clean:
	rm -rf $(VENV) runs *.egg-info
