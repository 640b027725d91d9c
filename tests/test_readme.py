"""The README's examples run as printed, and the core stays light.

``import fwdgrad_jax`` must load none of the app's heavy packages, and the README's
examples that do not import Flax must run with those packages made unimportable — the
proof that ``pip install fwdgrad_jax`` without extras (jax, optax, numpy) is enough.
"""

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("flax", "tensorflow", "tensorflow_datasets", "hydra", "omegaconf", "orbax", "matplotlib")

# A meta-path finder that refuses the heavy packages, as if they were not installed.
_BLOCKER = textwrap.dedent(
  f"""
  import importlib.abc, sys
  class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name.split(".")[0] in {HEAVY!r}:
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not a core dependency)")
      return None
  sys.meta_path.insert(0, _Block())
  """
)


def _run(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
    env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
  )


def _python_blocks() -> list[str]:
  text = (ROOT / "README.md").read_text()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_import_loads_no_heavy_package():
  out = _run(
    "import sys, fwdgrad_jax\n"
    f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


def test_core_dependencies_are_only_jax_optax_numpy():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  names = {re.split(r"[<>=\[ ;]", d)[0].lower() for d in project["dependencies"]}
  assert names == {"jax", "optax", "numpy"}
  assert "train" in project["optional-dependencies"]


def test_the_blocker_blocks():
  out = _run(_BLOCKER + "import flax\n")
  assert out.returncode != 0 and "blocked" in out.stderr


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs_as_printed(index):
  code = _python_blocks()[index]
  light = "flax" not in code
  out = _run((_BLOCKER if light else "") + code)
  assert out.returncode == 0, f"README python block {index} failed:\n{out.stderr[-3000:]}"
  assert out.stdout.strip(), "every README example prints its result"
