# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the main job (offline)
#   make test   installs everything into .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Debian's package with the real Fashion-MNIST: the offline default data set.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install data demo functions test test-fast test-durations lint clean gpu-check gpu-check-data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,dev,sweep,tensorboard]'
	touch $@

install: $(VENV)/.installed

$(FASHION_MNIST):
	$(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

data: $(FASHION_MNIST)

# The main job: Fashion-MNIST MLP, backprop vs forward gradients (weights k = 1; activity k = 1, k = 16 orthogonal),
# each at its tuned lr (configs/demo.yaml), 20 s of training each; ~2.6 min on 2 cores.
demo: install data
	$(PY) experiments/compare.py

# Beale and Rosenbrock minimised with forward gradients and jax.grad (Baydin et al. Fig. 2,
# fewer iterations); writes the figure and its JSON under outputs/baydin2022_fig2/.
functions: install
	$(PY) -m experiments.baydin2022.fig2 --quick

test: install
	$(PY) -m pytest -q --nbmake tests notebooks

# The inner loop (<= 3 min on 2 cores): every test file's quick tests.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# Re-measure which tests are slow (tests/durations.json) after adding or changing tests.
test-durations: install
	$(PY) -m pytest -q --durations=0 tests > .durations.log || true
	$(PY) tests/_durations.py .durations.log --budget-s 55 --workers 2

# The GPU check (experiments/benchmarks/gpu_check.py; sized for ~8 min on one H100): step
# ratios and peak memory of backprop / forward / rank-1 / activity / regenerated steps on the
# MLP, CNN and ResNet18, and 200 steps of each demo row. On a machine with a GPU and jax,
# flax, optax (no venv, no Hydra needed), from the repository root:
#   make gpu-check GPU_PY=python3     -> $$OUT/<device>.md, else results/benchmarks/gpu/
# Its Fashion-MNIST comes from .gpu_data/ (ignored by git; carry it): `make gpu-check-data`.
GPU_PY ?= $(PY)
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m experiments.benchmarks.gpu_check --out $${OUT:-results/benchmarks/gpu}

gpu-check-data: install data
	$(PY) -c 'from experiments.benchmarks.gpu_check import write_data; write_data()'

lint: install
	$(VENV)/bin/ruff check fwdgrad_jax experiments tests

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
