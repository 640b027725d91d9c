"""Report pieces: the one Markdown table, number formatters, argparse list types, figures."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: What a missing number prints as (None in a result file: not run, diverged, not reached).
DASH = "–"
#: The default resolution of the saved figures.
DPI = 100


def num(x: Any, spec: str = ".3f", dash: str = DASH) -> str:
  """``x`` formatted by ``spec`` (``".3f"``, or a ``"{:.3f}"`` template), or a dash.

  None and non-finite floats (JSON writes them as null) print as ``dash``.
  """
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return dash
  return spec.format(x) if "{" in spec else format(x, spec)


def lr(x: float | None) -> str:
  """A learning rate as the papers write it: 0.3, 0.01, 1e-4, 2.5e-5 (or a dash)."""
  if x is None:
    return DASH
  if x >= 1e-2:
    return f"{x:.3g}"
  mantissa, exponent = f"{x:.2e}".split("e")
  return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def ints(text: str) -> list[int]:
  """An argparse ``type``: ``"1,4,16"`` → ``[1, 4, 16]``."""
  return [int(t) for t in text.split(",") if t.strip()]


def floats(text: str) -> list[float]:
  """An argparse ``type``: ``"1e-3,0.01"`` → ``[0.001, 0.01]``."""
  return [float(t) for t in text.split(",") if t.strip()]


def names(text: str) -> list[str]:
  """An argparse ``type``: ``"normal, rademacher"`` → ``["normal", "rademacher"]``."""
  return [t.strip() for t in text.split(",") if t.strip()]


def positive_int(text: str) -> int:
  """An argparse ``type``: an integer ≥ 1."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
  return value


class Table:
  """A Markdown table: ``Table(columns).add_row(...)``, then :meth:`lines` / :meth:`to_markdown`.

  Cells are written with ``str``; format numbers first (:func:`num`, :func:`lr`).
  ``align`` gives each column's separator (``"---"``, ``"--:"``, …; default ``"---"``).
  """

  def __init__(self, columns: Sequence[str], align: Sequence[str] | None = None):
    self.columns = list(columns)
    self.align = list(align) if align is not None else ["---"] * len(self.columns)
    if len(self.align) != len(self.columns):
      raise ValueError(f"{len(self.columns)} columns, {len(self.align)} alignments")
    self.rows: list[list[str]] = []

  def add_row(self, *cells: Any) -> Table:
    """Appends one row (as many cells as columns); returns the table."""
    if len(cells) != len(self.columns):
      raise ValueError(f"{len(self.columns)} columns, got {len(cells)} cells: {cells}")
    self.rows.append([str(c) for c in cells])
    return self

  def add_rows(self, rows: Iterable[Sequence[Any]]) -> Table:
    for row in rows:
      self.add_row(*row)
    return self

  def lines(self) -> list[str]:
    """The table's lines: header, separator, rows."""
    out = ["| " + " | ".join(self.columns) + " |", "|" + "|".join(self.align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in self.rows]
    return out

  def to_markdown(self) -> str:
    return "\n".join(self.lines())


def provenance_lines(provenance: dict[str, Any] | None) -> list[str]:
  """A report's header: the command (as code) and the hardware line, a blank line between."""
  from fwdgrad_jax.training import records

  return [f"`{(provenance or {}).get('command')}`", "", records.hardware_line(provenance)]


def pyplot() -> Any:
  """``matplotlib.pyplot``, headless."""
  from fwdgrad_jax.training import records

  return records.pyplot()


def save_figure(fig: Any, path: str | Path, *, dpi: int = DPI, tight: bool = True) -> Path:
  """Saves a matplotlib figure as PNG (tight layout, ``dpi``), closes it, returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if tight:
    fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path


def write_text(path: str | Path, lines: str | Iterable[str]) -> Path:
  """Writes a report (a string, or lines joined by newlines); returns the path."""
  path = Path(path)
  path.write_text(lines if isinstance(lines, str) else "\n".join(lines))
  return path
