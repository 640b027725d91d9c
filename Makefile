# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the main job (offline)
#   make test   installs everything into .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) experiments/demo.py

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check fwdgrad_jax experiments tests

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
