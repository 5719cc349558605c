# Dev entry points. Each target creates the virtualenv on first use.
# Development and CI install the exact versions in requirements-dev.lock (resolved from the
# `dev` extra with the 2.13.0 CPU torch by `make lock`), so a fresh machine gets what the last
# green run had. The package itself keeps loose requirements: users bring their own (CUDA) torch.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements-dev.lock
TORCH ?= torch==2.13.0
PIP_TOOLS := pip-tools==7.6.2

VERL_VENV := .venv-verl
VERL_LOCK := requirements-verl.lock

.PHONY: setup demo test test-verl test-latest lock bench clean

$(VENV)/.installed: pyproject.toml $(LOCK) Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/relex demo --output out/demo --overwrite

# The modules whose tests compare computed floats with a float64 reference run a second time
# under MKL_CBWR=COMPATIBLE: a matrix-product code path other than the CPU's own (AVX-512, AVX2),
# so a bound that only one CPU's rounding meets fails here first (docs/how-it-works.md).
NUMERIC := tests/test_fit.py tests/test_kernels.py tests/test_extrapolate.py \
	tests/test_format_lora.py tests/test_format_nemo.py tests/test_format_megatron.py \
	tests/test_analyze.py tests/test_accelerate.py

test: setup
	$(PY) -m pytest
	MKL_CBWR=COMPATIBLE $(PY) -m pytest $(NUMERIC)

# verl pins its own transformers: its plugin tests run in a second environment (.venv-verl).
$(VERL_VENV)/.installed: pyproject.toml $(VERL_LOCK) Makefile
	test -x $(VERL_VENV)/bin/python || python3 -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q -r $(VERL_LOCK)
	$(VERL_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test-verl: $(VERL_VENV)/.installed
	$(VERL_VENV)/bin/python -m pytest -q tests/test_verl.py

# Re-resolve the dev extra to the newest releases (torch stays pinned) and rewrite the lock.
# The +cpu local tag is dropped so the lock also installs where torch comes from PyPI.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q $(PIP_TOOLS)
	echo "$(TORCH)" > .venv-lock/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile -q --upgrade --extra dev --strip-extras --allow-unsafe \
	    --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
	    -c .venv-lock/torch.txt -o $(LOCK) pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile -q --upgrade --strip-extras --allow-unsafe \
	    --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
	    -c .venv-lock/torch.txt -o $(VERL_LOCK) pyproject.toml requirements-verl.in
	sed -i -e 's/^\(torch==[^+ ]*\)+[a-z0-9.]*/\1/' -e 's|--constraint=[^ ]*torch.txt|--constraint=torch.txt|' $(LOCK) $(VERL_LOCK)
	rm -rf .venv-lock

# Early warning, not CI: the suite against the newest releases of every dev dependency.
test-latest:
	test -x .venv-latest/bin/python || python3 -m venv .venv-latest
	.venv-latest/bin/pip install -q "$(TORCH)"
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	.venv-latest/bin/python -m pytest -q

bench: setup
	$(PY) benchmarks/bench_extrapolate.py --baseline

clean:
	rm -rf $(VENV) $(VERL_VENV) .venv-latest .venv-lock out bench-data
