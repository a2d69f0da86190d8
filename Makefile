# apt_lab — two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.apt-lab-installed

# Tests and notebooks never wait on the model hub: a missing weight fails at once.
TEST_ENV := HF_HUB_OFFLINE=1 APT_LAB_QUICK=1 PYTHONHASHSEED=0

.PHONY: install demo test test-unit test-notebooks docs bench clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes or the venv is missing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[notebooks,test,docs]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: install
	$(BIN)/apt-lab demo $(ARGS)

test: install
	$(TEST_ENV) $(BIN)/python -m pytest tests notebooks apt_lab --doctest-modules --nbval-lax -p no:cacheprovider $(ARGS)

test-unit: install
	$(TEST_ENV) $(BIN)/python -m pytest tests apt_lab --doctest-modules -p no:cacheprovider $(ARGS)

test-notebooks: install
	$(TEST_ENV) $(BIN)/python -m pytest notebooks --nbval-lax -p no:cacheprovider $(ARGS)

docs: install
	$(BIN)/python -m mkdocs build --strict --site-dir site

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) site runs .pytest_cache
