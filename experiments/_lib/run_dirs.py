"""Reading the run directories the training app writes (``metrics.jsonl``, ``summary.json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def metrics(run_dir: str | os.PathLike[str] | None) -> list[dict[str, Any]]:
  """The records of a run's ``metrics.jsonl`` ([] if none; a torn last line is skipped)."""
  if not run_dir or not (Path(run_dir) / "metrics.jsonl").exists():
    return []
  out = []
  for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return out


def summary(run_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
  """A run's ``summary.json`` ({} if none)."""
  path = Path(run_dir) / "summary.json" if run_dir else None
  return json.loads(path.read_text()) if path and path.exists() else {}


def mnist_or_fashion(choice: str, data_dir: str | None) -> tuple[str, str | None]:
  """``choice`` unless it is ``auto``: then MNIST if prepared, else Fashion-MNIST with a note."""
  from fwdgrad_jax import data

  if choice != "auto":
    return choice, None
  if data.is_prepared("mnist", data_dir=data_dir):
    return "mnist", None
  return "fashion_mnist", "MNIST is not prepared here (offline, no network): ran on Fashion-MNIST"
