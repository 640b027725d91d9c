"""The layers, checked from the imports themselves (every ``import`` statement, also inside functions).

- the core (``fwdgrad_jax/*.py`` and ``fwdgrad_jax/perturbation/``) imports jax, optax and
  numpy only, and none of the app's modules (``models``, ``data``, ``training``, ``nnx``);
- no module of the library imports ``experiments`` (a folder of the repository, not installed);
- no import circle between the library's modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fwdgrad_jax"
# fwdgrad_jax.nnx (ForwardOptimizer) imports Flax: app, loaded only when imported by name.
APP = ("fwdgrad_jax.models", "fwdgrad_jax.data", "fwdgrad_jax.training", "fwdgrad_jax.nnx")
# Deprecated names of modules that moved into the app (fwdgrad_jax/_moved.py): they forward.
SHIMS = {f"fwdgrad_jax.{m}" for m in ("train", "config", "benchmark", "experiment", "lr_search")}
SHIMS |= {"fwdgrad_jax.rundir", "fwdgrad_jax.plot"}
CORE_THIRD_PARTY = {"jax", "jaxlib", "optax", "numpy"}


def _modules() -> dict[str, Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _is_package(name: str) -> bool:
  return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str) -> set[str]:
  """Every module ``name`` imports (absolute names; ``from a import b`` is ``a.b`` if that is
  a module, else ``a``)."""
  tree = ast.parse(MODULES[name].read_text())
  package = name if _is_package(name) else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.add(sub if sub in MODULES else base)
  return out


def _layer(name: str) -> str:
  if name in SHIMS:
    return "shim"
  if any(name == a or name.startswith(a + ".") for a in APP):
    return "app"
  return "core"


def test_the_core_imports_neither_the_app_nor_more_than_jax_optax_numpy():
  bad = []
  for name in MODULES:
    if _layer(name) != "core":
      continue
    for imp in _imports(name):
      top = imp.split(".")[0]
      if imp.startswith("fwdgrad_jax"):
        if _layer(imp) != "core":
          bad.append(f"{name} imports {imp}")
      elif top not in CORE_THIRD_PARTY and top not in sys.stdlib_module_names:
        bad.append(f"{name} imports {imp} (not jax, optax, numpy or the standard library)")
  assert not bad, "\n".join(bad)


def test_the_library_never_imports_experiments():
  bad = [
    f"{n} imports {i}" for n in MODULES for i in _imports(n) if i.split(".")[0] == "experiments"
  ]
  assert not bad, "\n".join(bad)


def _cycles() -> list[list[str]]:
  graph = {n: sorted(i for i in _imports(n) if i in MODULES and i != n) for n in MODULES}
  cycles, state, stack = [], {}, []

  def visit(n: str) -> None:
    state[n] = "open"
    stack.append(n)
    for m in graph[n]:
      if state.get(m) == "open":
        cycles.append([*stack[stack.index(m) :], m])
      elif m not in state:
        visit(m)
    stack.pop()
    state[n] = "done"

  for n in graph:
    if n not in state:
      visit(n)
  return cycles


def test_no_import_circles():
  cycles = _cycles()
  assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail(monkeypatch):
  # A planted circle and a planted core -> app import are found.
  real = _imports

  def planted(name: str) -> set[str]:
    out = set(real(name))
    if name == "fwdgrad_jax.metrics":
      out |= {"fwdgrad_jax.aggregation", "fwdgrad_jax.training.run"}
    if name == "fwdgrad_jax.aggregation":
      out.add("fwdgrad_jax.metrics")
    return out

  monkeypatch.setattr(sys.modules[__name__], "_imports", planted)
  assert any("fwdgrad_jax.metrics" in c and "fwdgrad_jax.aggregation" in c for c in _cycles())
  with pytest.raises(AssertionError, match="metrics imports fwdgrad_jax.training.run"):
    test_the_core_imports_neither_the_app_nor_more_than_jax_optax_numpy()
