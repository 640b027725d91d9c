"""Shared fixtures: a tiny tfds-prepared data set for the training tests (no network).

Compiled programs are shared through JAX's persistent compilation cache in ``.jax_cache/``
of the checkout (so a clean clone starts empty): many tests, the xdist workers and the
app's subprocesses compile the same steps of the same small models.

XLA:CPU's compiles are two thirds of the suite's CPU time (programs of a few steps on tiny
models), so the tests compile with cheaper code generation (:data:`_FAST_COMPILE`): the same
HLO programs and passes, XLA's elemental emitters instead of its fusion emitters, LLVM at
-O1. Measured on a clean clone (2 cores): backend compile 671 → 333 CPU s, the full suite
588–650 s → 494–506 s, no test slower by more than 2 s. ``FWDGRAD_TEST_XLA_DEFAULTS=1`` runs the
suite with XLA's defaults; the README's examples (tests/test_readme.py) always do.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

_CACHE = Path(__file__).resolve().parents[1] / ".jax_cache"
# Before jax is imported here, and inherited by the app's subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

_FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1"


def _use_fast_compile() -> None:
  """Appends :data:`_FAST_COMPILE` to ``XLA_FLAGS`` (inherited by xdist's workers and the
  subprocesses) if this jaxlib knows the flags: XLA aborts on an unknown one, so a jaxlib
  that dropped them is asked first, once, in a child process."""
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("FWDGRAD_TEST_XLA_DEFAULTS") == "1" or _FAST_COMPILE in flags:
    return
  merged = f"{flags} {_FAST_COMPILE}".strip()
  probe = subprocess.run(
    [sys.executable, "-c", "import jax; jax.devices('cpu')"],
    env={**os.environ, "XLA_FLAGS": merged, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
  )
  if probe.returncode == 0:
    os.environ["XLA_FLAGS"] = merged


_use_fast_compile()

import _durations  # noqa: E402
import _tiny_tfds  # noqa: E402
import pytest  # noqa: E402

N_TRAIN, N_TEST, VAL_SIZE = 320, 64, 64


def _refuse_network(*args, **kwargs):
  raise OSError("network access is disabled in tests")


@pytest.fixture(scope="session")
def no_network():
  """Make any network use fail at once, for the whole session."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", _refuse_network)
    mp.setattr(socket.socket, "connect_ex", _refuse_network)
    mp.setattr(socket, "create_connection", _refuse_network)
    mp.setattr(socket, "getaddrinfo", _refuse_network)
    yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, no_network):
  """(data_dir, dataset): learnable Fashion-MNIST-format data prepared by tfds's builder."""
  manual = tmp_path_factory.mktemp("tiny_manual")
  data_dir = tmp_path_factory.mktemp("tiny_tfds")
  ds, _ = _tiny_tfds.make(manual, data_dir, N_TRAIN, N_TEST, seed=7, val_size=VAL_SIZE)
  return data_dir, ds


_SECONDS, _THRESHOLD = _durations.load()


def pytest_collection_modifyitems(config, items):
  """Marks ``slow`` the tests measured above the threshold of ``durations.json``; longest first."""
  slow = _durations.slow_ids(_SECONDS, _THRESHOLD)
  for item in items:
    if item.nodeid in slow:
      item.add_marker(pytest.mark.slow)
  items[:] = _durations.longest_first(items, _SECONDS)


_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")


@pytest.fixture(autouse=True)
def _default_stop_signals():
  """Every test starts with the stop signals at their defaults.

  A run respects an ignored signal (a parent that set SIG_IGN, e.g. ``nohup``), and
  something earlier in an xdist worker can leave SIGINT/SIGHUP ignored; the tests that
  send a signal to their own run would then see it ignored.
  """
  import signal
  import threading

  if threading.current_thread() is not threading.main_thread():
    yield
    return
  saved = {}
  for name in _STOP_SIGNALS:
    sig = getattr(signal, name, None)
    if sig is None:
      continue
    default = signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL
    saved[sig] = signal.signal(sig, default)
  yield
  for sig, handler in saved.items():
    signal.signal(sig, handler)
