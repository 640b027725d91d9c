"""Deprecation shims for the modules that moved into subpackages (redesign of 0.2).

``fwdgrad_jax.train``, ``.config``, ``.benchmark``, ``.experiment``, ``.lr_search``,
``.rundir`` and ``.plot`` now live in :mod:`fwdgrad_jax.training`, and the estimator registry
(``transforms.ESTIMATORS``, ``estimators.get_estimator``) in :mod:`fwdgrad_jax.registry`; the
old names keep working for one release and warn once on first use.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Collection
from typing import Any


def moved(old: str, *new: str, names: Collection[str] | None = None) -> Callable[[str], Any]:
  """A module ``__getattr__`` that forwards ``old.<name>`` to the first of ``new`` having it.

  Args:
    old: the module's name (``__name__``).
    *new: where its names went, searched in order; imported on first use (by name, so a
      core module may forward to a module that imports it without an import circle).
    names: forward only these names (None: every name).

  Returns:
    The ``__getattr__`` to assign in ``old`` (PEP 562).
  """
  warned = []

  def getattr_(name: str) -> Any:
    if name.startswith("__") or (names is not None and name not in names):
      raise AttributeError(f"module {old!r} has no attribute {name!r}")
    if not warned:
      warned.append(True)
      warnings.warn(
        f"{old} moved to {' / '.join(new)}; the old name will be removed",
        DeprecationWarning,
        stacklevel=2,
      )
    for target in new:
      module = importlib.import_module(target)
      if hasattr(module, name):
        return getattr(module, name)
    raise AttributeError(f"module {old!r} (moved to {', '.join(new)}) has no attribute {name!r}")

  return getattr_
