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
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments._lib.config import ROOT
from fwdgrad_jax.training import records


def module_name(file: str | os.PathLike[str]) -> str:
  """``…/experiments/flugel2024/fig4.py`` → ``experiments.flugel2024.fig4``."""
  return ".".join(Path(file).resolve().relative_to(ROOT).with_suffix("").parts)


def command(module: str, argv: Sequence[Any]) -> str:
  """``python -m <module> <argv>``, quoted as a shell takes it."""
  return shlex.join(["python", "-m", module, *map(str, argv)])


def main(
  file: str | os.PathLike[str],
  run: Callable[[argparse.Namespace], Mapping[str, Any]],
  report: Callable[[dict[str, Any], Path], Sequence[Path]],
  *,
  result_file: str | Callable[[argparse.Namespace], str],
  description: str | None = None,
  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
  merge: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
  argv: Sequence[str] | None = None,
  outputs: str | os.PathLike[str] = "outputs",
) -> dict[str, Any]:
  """Parses ``argv``, runs → JSON (with provenance) → report, or only the report.

  Args:
    file: the script's ``__file__`` (a module below ``experiments/``).
    run, report, result_file, description, add_arguments, merge, outputs: as
      :func:`fwdgrad_jax.training.records.script_main`.
    argv: the arguments (default ``sys.argv[1:]``).

  Returns:
    The result as written (with ``provenance``), or the merged result of ``--report-only``.
  """
  module = module_name(file)
  name = "_".join(module.split(".")[1:])
  head, _, rest = (description or "").strip().partition("\n")
  parser = argparse.ArgumentParser(
    prog=f"python -m {module}",
    description=head or None,
    epilog=rest.strip() or None,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  if add_arguments is not None:
    add_arguments(parser)
  parser.add_argument(
    "--out",
    type=Path,
    default=None,
    help=f"output directory (default: a fresh {outputs}/{name}/<date-time>)",
  )
  parser.add_argument(
    "--report-only",
    nargs="+",
    type=Path,
    default=None,
    metavar="JSON",
    help="no run: write the report again from result file(s) of an earlier run",
  )
  argv = list(sys.argv[1:] if argv is None else map(str, argv))
  args = parser.parse_args(argv)
  if args.report_only is not None and len(args.report_only) > 1 and merge is None:
    parser.error("--report-only: this script reports one result file at a time")
  out = args.out if args.out is not None else records.fresh_dir(outputs, name)
  out.mkdir(parents=True, exist_ok=True)
  args.out = out
  result_name = result_file(args) if callable(result_file) else result_file

  if args.report_only is not None:
    results = [records.read_json(p) for p in args.report_only]
    result = merge(results) if merge is not None else results[0]
    if len(results) > 1:  # the merged result is a result file of its own
      path = records.write_json(
        out / result_name, result, provenance_record=result.get("provenance")
      )
      print(f"wrote {path}", flush=True)
  else:
    # Taken before the run: the code may change during a long one.
    record = {**records.provenance(argv), "command": command(module, argv)}
    path = records.write_json(out / result_name, run(args), provenance_record=record)
    result = records.read_json(path)  # exactly what a later --report-only will see
    print(f"wrote {path}", flush=True)
  for path in report(result, out):
    print(f"wrote {path}", flush=True)
  return result
