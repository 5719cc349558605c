# Dev entry points. Each target creates the virtualenv on first use.
# torch is pinned to the 2.13.0 CPU wheel here (dev/CI only); the package itself accepts any
# torch >= 2.1, so users keep their own (CUDA) build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/relex demo --output out/demo --overwrite

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_extrapolate.py --baseline

clean:
	rm -rf $(VENV) out bench-data
