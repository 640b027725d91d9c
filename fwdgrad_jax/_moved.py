"""Deprecation shims for the modules that moved into subpackages (redesign of 0.2).

``fwdgrad_jax.train``, ``.config``, ``.benchmark``, ``.experiment``, ``.lr_search``,
``.rundir`` and ``.plot`` now live in :mod:`fwdgrad_jax.training`; the old names keep
working for one release and warn once on first use. The core never imports this module.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved(old: str, *new: str) -> Callable[[str], Any]:
  """A module ``__getattr__`` that forwards ``old.<name>`` to the first of ``new`` having it."""
  warned = []

  def getattr_(name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
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
