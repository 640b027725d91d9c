"""See a run: training curves of run directories (or whole sweeps) in one PNG.

Command line::

    python -m fwdgrad_jax.training.plot RUN_DIR [RUN_DIR | SWEEP_DIR ...] [--out curves.png]

A directory holding ``metrics.jsonl`` is a run; any other directory stands for every run
below it (a Hydra sweep directory, ``outputs/``). The figure has one column against
steps and one against training seconds (compilation, evaluation and checkpoints
excluded, so methods compare by the time they really spent training), and rows for the
loss (train solid, validation dashed), the validation accuracy and, where the runs
logged them, the global norm of the parameters (``param_norm``, at every evaluation), and
from the gradient checks the cosine of the estimate to the true gradient and its length
ratio ‖ĝ‖/‖∇f‖ (``grad_norm_ratio``) and ‖∇f‖ itself (``true_grad_norm``), and the
learning rate (``lr``) where it changed during a run. ``train_loss`` is the mean over each log interval,
as in ``metrics.jsonl``. A run's label names its estimator with the options that tell it
apart (perturbation, k, aggregation, and any option off its default) and its lr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import records as records_lib
from fwdgrad_jax.training import rundir

__all__ = ["Run", "estimator_label", "find_runs", "load_run", "main", "plot_runs"]


@dataclasses.dataclass(frozen=True)
class Run:
  """One run directory's records and the label its curves get."""

  path: Path
  label: str
  records: list[dict[str, Any]]
  diverged: bool = False


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
  """The run directories named by ``paths``, each a run or a directory of runs.

  Raises:
    FileNotFoundError: a path holds no run at all (the message names it).
  """
  runs: list[Path] = []
  for path in map(Path, paths):
    if (path / rundir.METRICS_NAME).is_file():
      found = [path]
    else:
      found = sorted(p.parent for p in path.rglob(rundir.METRICS_NAME))
    if not found:
      raise FileNotFoundError(f"{path}: no {rundir.METRICS_NAME} in it or below it")
    runs += [p for p in found if p not in runs]
  return runs


def _estimator_options(name: Any) -> tuple[str, ...]:
  """The config keys that shape ``name``'s estimate (its registry ``config_options``)."""
  from fwdgrad_jax import registry

  try:
    return tuple(registry.get(str(name)).config_options)
  except ValueError:  # a run of an estimator this checkout does not know
    return ()


def estimator_label(est: dict[str, Any]) -> str:
  """``"forward activity k=1 mean"``, ``"forward weights k=4 orthogonal rescale=False"``…

  A forward run names its perturbation, k and aggregation (two runs differing only in
  one of them are different methods); every other option of the estimator is named
  only where it differs from the config's default.

  Args:
    est: the ``estimator`` section of a run's ``config.json``.
  """
  defaults = dataclasses.asdict(config_lib.EstimatorConfig())
  name = est.get("name", "?")
  label, shown = str(name), {"name"}
  if name == "forward":
    perturbation = est.get("perturbation", defaults["perturbation"])
    label += f" {perturbation} k={est.get('num_tangents')} {est.get('aggregation')}"
    shown |= {"perturbation", "num_tangents", "aggregation"}
  for key in _estimator_options(name):
    if key not in shown and key in est and est[key] != defaults.get(key):
      label += f" {key}={est[key]}"
  return label


def _label(path: Path) -> str:
  config = rundir.read_json(path / "config.json") or {}
  est, opt = config.get("estimator", {}), config.get("optimizer", {})
  if not est:
    return path.name
  label = estimator_label(est)
  if "lr" in opt:
    label += f" lr={opt['lr']:g}"
  if opt.get("schedule", "constant") != "constant":  # runs that differ only in it
    label += f" {opt['schedule']}"
  return label


def load_run(path: str | Path) -> Run:
  """The records of one run directory (a torn last line is dropped) and its label."""
  path = Path(path)
  records = rundir.read_metrics(path / rundir.METRICS_NAME)
  diverged = any(r.get("diverged") for r in records)
  return Run(path, _label(path) + (" (diverged)" if diverged else ""), records, diverged)


def _unique_labels(runs: list[Run]) -> list[Run]:
  # Two runs of one method (seeds, sweeps over other keys) would share a legend entry.
  labels = [r.label for r in runs]
  return [
    dataclasses.replace(r, label=f"{r.label} ({r.path.name})") if labels.count(r.label) > 1 else r
    for r in runs
  ]


def _series(records: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list, list]:
  points = [(r[x_key], r[y_key]) for r in records if r.get(y_key) is not None and x_key in r]
  return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: Sequence[Run], out: str | Path) -> Path:
  """Draws the curves of ``runs`` into the PNG ``out``.

  Args:
    runs: from :func:`load_run`.
    out: the PNG to write (its directory is created).

  Returns:
    The path written.
  """
  plt = records_lib.pyplot()
  runs = _unique_labels(list(runs))
  rows = [("loss", "train_loss"), ("val accuracy", "val_accuracy")]
  optional = [
    ("parameter norm ‖θ‖", "param_norm"),
    ("cosine to true gradient", "cosine_to_true_grad"),
    ("‖ĝ‖ / ‖∇f‖ (same batch)", "grad_norm_ratio"),
    ("true gradient norm ‖∇f‖", "true_grad_norm"),
    ("learning rate", "lr"),
  ]
  for name, key in optional:
    if key == "lr":  # a constant lr is in the legend already: a panel only for schedules
      if any(len({r["lr"] for r in run.records if r.get("lr") is not None}) > 1 for run in runs):
        rows.append((name, key))
    elif any(r.get(key) is not None for run in runs for r in run.records):
      rows.append((name, key))
  columns = [("step", "step"), ("training time (s)", "train_time_s")]
  fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.2 * len(rows)), squeeze=False, sharex="col")
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, run in enumerate(runs):
    color = colors[i % len(colors)]
    for col, (_, x_key) in enumerate(columns):
      for row, (_, y_key) in enumerate(rows):
        ax = axes[row][col]
        x, y = _series(run.records, x_key, y_key)
        label = run.label if y_key == "train_loss" else None
        ax.plot(x, y, color=color, marker=".", markersize=3, label=label)
        if y_key == "train_loss":
          vx, vy = _series(run.records, x_key, "val_loss")
          ax.plot(vx, vy, color=color, linestyle="--", marker=".")
  # Losses span decades; a diverging run spans many more and would flatten the others:
  # cut at twice the highest starting loss of the others (the legend says who diverged).
  starts = [_series(r.records, "step", "train_loss")[1][:1] for r in runs if not r.diverged]
  top = max((s[0] for s in starts if s), default=None)
  for ax in axes[0]:
    ax.set_yscale("log")
    if top is not None:
      ax.set_ylim(top=2 * top)
  for row, (_, key) in enumerate(rows):
    if key in ("grad_norm_ratio", "true_grad_norm"):  # both span decades over a run
      for ax in axes[row]:
        ax.set_yscale("log")
        if key == "grad_norm_ratio":  # √n for raw one-tangent estimates, ~1 rescaled
          ax.axhline(1.0, color="gray", lw=0.8, ls=":")
  for row, (name, _) in enumerate(rows):
    axes[row][0].set_ylabel(name + (" (train —, val --)" if row == 0 else ""))
  for col, (name, _) in enumerate(columns):
    axes[-1][col].set_xlabel(name)
  for ax in axes.flat:
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize="small")
  fig.tight_layout()
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m fwdgrad_jax.training.plot``; returns the exit status."""
  parser = argparse.ArgumentParser(
    prog="python -m fwdgrad_jax.training.plot", description=__doc__.splitlines()[0]
  )
  parser.add_argument("paths", nargs="+", help="run directories or directories of runs")
  parser.add_argument("--out", default=None, help="PNG to write (default: FIRST_PATH/curves.png)")
  args = parser.parse_args(argv)
  try:
    runs = [load_run(p) for p in find_runs(args.paths)]
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = plot_runs(runs, args.out or Path(args.paths[0]) / "curves.png")
  print(f"{len(runs)} run(s) drawn into {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
