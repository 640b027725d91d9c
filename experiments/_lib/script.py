"""The command line every experiment script shares, run as a module of ``experiments``.

:func:`main` is :func:`fwdgrad_jax.training.records.script_main` for the scripts of this
package: the same options (``--out``, ``--report-only``) and files (one JSON with
provenance, then the report), but the command it records and prints in ``--help`` is the
module form a user types from the repository root, ``python -m experiments.flugel2024.fig4
--quick``, and the default output folder is named after the script's place
(``outputs/flugel2024_fig4/<date-time>``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments._lib.config import ROOT
from fwdgrad_jax.training import records


def module_name(file: str | os.PathLike[str]) -> str:
  """``…/experiments/flugel2024/fig4.py`` → ``experiments.flugel2024.fig4``."""
  return ".".join(Path(file).resolve().relative_to(ROOT).with_suffix("").parts)


def main(
  file: str | os.PathLike[str],
  run: Callable[[argparse.Namespace], Mapping[str, Any]],
  report: Callable[[dict[str, Any], Path], Sequence[Path]],
  **options: Any,
) -> dict[str, Any]:
  """:func:`fwdgrad_jax.training.records.script_main` for a module below ``experiments/``.

  Args:
    file: the script's ``__file__``.
    run, report, **options: as :func:`~fwdgrad_jax.training.records.script_main`.

  Returns:
    The result as written (with ``provenance``), or the merged result of ``--report-only``.
  """
  return records.script_main(file, run, report, module=module_name(file), **options)
