"""The README's examples run as printed, and the core stays light.

``import fwdgrad_jax`` must load none of the app's heavy packages, and the README's
examples that do not import Flax must run with those packages made unimportable — the
proof that ``pip install fwdgrad_jax`` without extras (jax, optax, numpy) is enough.

The examples run in one Python process, not one each (the start and the imports of jax
were a third of their time): first those without Flax, under the blocker, then the
blocker is removed and those with Flax run. Each block runs as printed in a fresh
namespace, and what a block imported of fwdgrad_jax beyond the core is unloaded again
(``import fwdgrad_jax.nnx`` sets ``fg.nnx``), so a block that forgets an import fails as
in a new interpreter; a block that changes ``jax.config`` fails (it would leak into the
next).
"""

import json
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


# After _BLOCKER: runs each block of the JSON list on stdin ([code, light]: the blocks
# without Flax first), removing the blocker before the first block with Flax; prints one
# JSON list of results.
_RUNNER = textwrap.dedent(
  """
  import contextlib, io, json, sys, traceback
  import jax, fwdgrad_jax
  results = []
  for code, light in json.loads(sys.stdin.read()):
    if not light:
      sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_Block"]
    modules, config = set(sys.modules), dict(jax.config.values)
    out, err, ok = io.StringIO(), io.StringIO(), True
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        exec(compile(code, "<README block>", "exec"), {"__name__": "__main__"})
      except BaseException:
        ok = False
        traceback.print_exc()
    for name in sorted(set(sys.modules) - modules, reverse=True):
      if name.startswith("fwdgrad_jax."):
        parent, _, child = name.rpartition(".")
        if getattr(sys.modules.get(parent), child, None) is sys.modules[name]:
          delattr(sys.modules[parent], child)
        del sys.modules[name]
    changed = sorted(k for k, v in jax.config.values.items() if config.get(k) != v)
    if changed:
      ok = False
      err.write(f"the block changed jax.config: {changed}")
    results.append({"ok": ok, "stdout": out.getvalue(), "stderr": err.getvalue()})
  print(json.dumps(results))
  """
)


def _run(code: str, timeout: float = 240, stdin: str | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", code],
    input=stdin,
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


@pytest.fixture(scope="module")
def readme_runs():
  """The result of every README python block, by index (one process for all of them)."""
  blocks = _python_blocks()
  order = sorted(range(len(blocks)), key=lambda i: "flax" in blocks[i])  # light ones first
  todo = [[blocks[i], "flax" not in blocks[i]] for i in order]
  out = _run(_BLOCKER + _RUNNER, 600, json.dumps(todo))
  assert out.returncode == 0, out.stderr[-3000:]
  return dict(zip(order, json.loads(out.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs_as_printed(index, readme_runs):
  got = readme_runs[index]
  assert got["ok"], f"README python block {index} failed:\n{got['stderr'][-3000:]}"
  assert got["stdout"].strip(), "every README example prints its result"
