# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make run   -> .venv + install + the default experiment (configs/tiny.py)
#   make test  -> .venv + install + the whole test suite (8 fake CPU devices)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/tiny
PYTEST_ARGS ?=
# glibc's malloc on transparent huge pages: XLA:CPU's large per-call buffers fault in 2 MiB at a
# time, CPU train steps back to back ~25 % faster. Entry points (make run too) re-execute
# themselves with jemalloc instead where it is installed, else with this (experiments/allocator.py).
# A GLIBC_TUNABLES of your own is kept as it is.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: install run test test-fast bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,colab]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.main --config=configs/tiny.py --workdir=$(WORKDIR)

# A worker process that crashes is replaced and its test run once more: pytest-rerunfailures
# retries a crashed worker's test whatever --only-rerun says, and --only-rerun keeps it from
# retrying an ordinary failure. A test that crashes twice fails; one that crashed once shows as
# "1 rerun" in the summary. The crash this was added for (a segfault in jaxlib once in most
# suites until 2026-12-05) came from workers running out of memory mappings; tests/conftest.py
# now keeps them below the limit, and the rule stays as a net. --dist load, not loadfile: after
# a worker crash xdist 3.8's loadfile scheduler can hang for good (pytest-xdist issue 1378).
PYTEST_XDIST := -n 2 --dist load --reruns 1 --only-rerun "crashed while running"

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_XDIST) --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest $(PYTEST_XDIST) -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m experiments.bench_model

clean:
	rm -rf $(VENV) runs *.egg-info
