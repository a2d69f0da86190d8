# apt_lab — two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.apt-lab-installed

# Tests and notebooks never wait on the model hub: a missing weight fails at once.
TEST_ENV := HF_HUB_OFFLINE=1 APT_LAB_QUICK=1 PYTHONHASHSEED=0

.PHONY: install demo test test-unit test-notebooks docs bench gpu-check clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes or the venv is missing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77"   # the build floor of pyproject.toml (tests build the wheel in .venv)
	$(BIN)/python -m pip install -q -e ".[notebooks,test,docs,cluster]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: install
	$(BIN)/apt-lab demo $(ARGS)

test: install
	$(TEST_ENV) $(BIN)/python scripts/check_ipywidgets7.py -q   # widgets again on Colab's ipywidgets 7 + plotly 5
	$(TEST_ENV) $(BIN)/python -m pytest tests notebooks apt_lab --doctest-modules --nbval-lax -p no:cacheprovider $(ARGS)

test-unit: install
	$(TEST_ENV) $(BIN)/python -m pytest tests apt_lab --doctest-modules -p no:cacheprovider $(ARGS)

test-notebooks: install
	$(TEST_ENV) $(BIN)/python -m pytest notebooks --nbval-lax -p no:cacheprovider $(ARGS)

docs: install
	$(BIN)/python -m mkdocs build --strict --site-dir site

bench: install
	for b in benchmarks/bench_*.py; do [ $$b = benchmarks/bench_sweep.py ] && continue; echo "== $$b"; $(BIN)/python $$b || exit 1; done
	echo "== benchmarks/bench_sweep.py --small"; $(BIN)/python benchmarks/bench_sweep.py --small

# On a CUDA machine: every notebook in full mode (nbval), the device tests, the MVTec-shaped sweep; one table.
# Installs nothing (a GPU box may have no package index): uses .venv when present, else $(PYTHON).
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) site runs .pytest_cache
