"""One learning-rate search for every paper, two ways to run it, one result format.

The papers disagree mostly about learning rates: Baydin et al. compared forward gradient
and backprop at one shared lr; the reproduction study tuned each method's own and found
backprop far ahead; Flügel et al. searched an lr per variant and found the best lrs
spread widely across k and aggregations. So every comparison here tunes per variant,
and every search reports the same :class:`LrSearch`:

* the best lr and its loss, and whether it lies at the edge of the grid (the optimum may
  be outside it);
* the curve of loss against lr (mean over seeds), the per-seed values, and which lrs
  diverged (a non-finite loss in any seed).

Two ways to run one:

* :func:`search` — small problems (closed-form functions, tiny nets): ``objective(lr,
  seed) -> loss`` is jitted and vmapped over the whole grid × seeds, so hundreds of runs
  are one XLA call.
* :func:`run_sweep` / :func:`read_sweep` — full training runs: the Hydra app
  (``experiments/train.py -m``, Optuna's GridSampler via ``+experiment=lr_search_grid``)
  in a subprocess, one job per (lr, seed); the reader turns the multirun directory into
  an :class:`LrSearch`. The caller passes the app and the sweep directory; nothing here
  finds files of the repository.

Choosing the best lr: an lr where any seed diverged is not a usable lr (it has no final
model), so it only competes when every lr diverged somewhere; among the rest the lowest
mean-over-seeds loss wins, the smaller lr on a tie.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
  "LrSearch",
  "draw",
  "log_grid",
  "read_sweep",
  "run_sweep",
  "search",
  "summarize",
  "sweep_command",
]

GRID_PRESET = "lr_search_grid"  # configs/experiment/lr_search_grid.yaml


@dataclasses.dataclass(frozen=True)
class LrSearch:
  """The result of a learning-rate search, however it ran.

  Attributes:
    lrs: the grid, ascending.
    seeds: the seeds every lr ran with.
    values: ``values[i][j]``: the objective of lr i, seed j (None: none finite / not run).
    diverged: ``diverged[i][j]``: that run diverged.
    curve: per lr, the mean over seeds of the finite values (None when there are none).
    best_lr, best_loss, best_index: the chosen lr (see the module docstring), its curve
      value and its index in ``lrs``; None when no lr has a finite value.
    at_grid_edge: the best lr is the smallest or the largest of the grid.
    diverged_lrs: the lrs where at least one seed diverged.
    objective: what the values are (e.g. ``"best_val_loss"``).
    extra: how it ran: the command, run directories ``runs[i][j]``, Optuna's own result…
  """

  lrs: tuple[float, ...]
  seeds: tuple[int, ...]
  values: tuple[tuple[float | None, ...], ...]
  diverged: tuple[tuple[bool, ...], ...]
  curve: tuple[float | None, ...]
  best_lr: float | None
  best_loss: float | None
  best_index: int | None
  at_grid_edge: bool
  diverged_lrs: tuple[float, ...]
  objective: str = "loss"
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> LrSearch:
    """The inverse of :meth:`as_dict`."""
    nested = lambda rows: tuple(tuple(r) for r in rows)
    return cls(
      lrs=tuple(d["lrs"]),
      seeds=tuple(d["seeds"]),
      values=nested(d["values"]),
      diverged=nested(d["diverged"]),
      curve=tuple(d["curve"]),
      best_lr=d["best_lr"],
      best_loss=d["best_loss"],
      best_index=d["best_index"],
      at_grid_edge=d["at_grid_edge"],
      diverged_lrs=tuple(d["diverged_lrs"]),
      objective=d.get("objective", "loss"),
      extra=dict(d.get("extra", {})),
    )


def _finite(x: Any) -> bool:
  return x is not None and math.isfinite(x)


def summarize(
  lrs: Sequence[float],
  seeds: Sequence[int],
  values: Sequence[Sequence[float | None]],
  diverged: Sequence[Sequence[bool]] | None = None,
  *,
  objective: str = "loss",
  extra: Mapping[str, Any] | None = None,
) -> LrSearch:
  """The :class:`LrSearch` of per-(lr, seed) results, in any lr order.

  Args:
    lrs: the learning rates (rows of ``values``).
    seeds: the seeds (columns of ``values``).
    values: ``values[i][j]`` objective of lr i and seed j; None or non-finite = no value.
    diverged: ``diverged[i][j]``; default: the value is missing or non-finite.
    objective: what the values are.
    extra: kept as is; per-run lists in it (``runs``) should be in the order of ``lrs``
      (they are reordered with the rows here when their length matches).

  Returns:
    The search result, lrs ascending.

  Raises:
    ValueError: shapes that do not match, or a repeated lr.
  """
  n, m = len(lrs), len(seeds)
  if len(values) != n or any(len(row) != m for row in values):
    raise ValueError(f"values must be {n} lrs x {m} seeds")
  if len(set(map(float, lrs))) != n:
    raise ValueError(f"repeated learning rates in {list(lrs)}")
  vals = [[float(v) if _finite(v) else None for v in row] for row in values]
  if diverged is None:
    div = [[v is None for v in row] for row in vals]
  else:
    div = [[bool(d) for d in row] for row in diverged]
    if len(div) != n or any(len(row) != m for row in div):
      raise ValueError(f"diverged must be {n} lrs x {m} seeds")
  order = sorted(range(n), key=lambda i: float(lrs[i]))
  lrs_sorted = tuple(float(lrs[i]) for i in order)
  vals = [vals[i] for i in order]
  div = [div[i] for i in order]
  extra = dict(extra or {})
  if isinstance(extra.get("runs"), list | tuple) and len(extra["runs"]) == n:
    extra["runs"] = [extra["runs"][i] for i in order]

  curve = []
  for row in vals:
    finite = [v for v in row if v is not None]
    curve.append(float(np.mean(finite)) if finite else None)
  usable = [i for i in range(n) if curve[i] is not None]
  stable = [i for i in usable if not any(div[i])]
  best = min(stable or usable, key=lambda i: (curve[i], i), default=None)
  return LrSearch(
    lrs=lrs_sorted,
    seeds=tuple(int(s) for s in seeds),
    values=tuple(tuple(row) for row in vals),
    diverged=tuple(tuple(row) for row in div),
    curve=tuple(curve),
    best_lr=None if best is None else lrs_sorted[best],
    best_loss=None if best is None else curve[best],
    best_index=best,
    at_grid_edge=best is not None and best in (0, n - 1),
    diverged_lrs=tuple(lr for lr, row in zip(lrs_sorted, div) if any(row)),
    objective=objective,
    extra=extra,
  )


def log_grid(lo: float, hi: float, num: int) -> tuple[float, ...]:
  """``num`` log-spaced learning rates from ``lo`` to ``hi``, rounded to 3 significant digits."""
  if not 0 < lo <= hi or num < 1:
    raise ValueError(f"need 0 < lo <= hi and num >= 1, got {lo}, {hi}, {num}")
  grid = np.geomspace(lo, hi, num) if num > 1 else np.array([lo])
  return tuple(sorted({float(f"{v:.3g}") for v in grid}))


# --------------------------------------------------------------------------------------
# Small problems: the whole grid in one jitted call
# --------------------------------------------------------------------------------------


def search(
  objective: Callable[[Any, Any], Any],
  lrs: Sequence[float],
  seeds: Sequence[int] = (0,),
  *,
  objective_name: str = "loss",
) -> LrSearch:
  """Evaluates ``objective`` on every (lr, seed) in one jitted, vmapped call.

  Args:
    objective: ``objective(lr, seed) -> scalar loss``, jittable; ``lr`` is a float32
      scalar, ``seed`` an int32 scalar (e.g. ``jax.random.key(seed)`` inside). A
      non-finite loss counts as diverged. What it measures (final loss, best loss along
      the run…) is the caller's choice.
    lrs: the learning rates.
    seeds: the seeds every lr runs with.
    objective_name: recorded as :attr:`LrSearch.objective`.

  Returns:
    The :class:`LrSearch`.
  """
  import jax
  import jax.numpy as jnp

  grid = jax.jit(jax.vmap(jax.vmap(objective, in_axes=(None, 0)), in_axes=(0, None)))
  out = grid(jnp.asarray(lrs, jnp.float32), jnp.asarray(seeds, jnp.int32))
  values = np.asarray(out, np.float64)
  if values.shape != (len(lrs), len(seeds)):
    raise ValueError(f"objective must return a scalar; got shape {values.shape[2:]}")
  return summarize(lrs, seeds, values.tolist(), objective=objective_name)


# --------------------------------------------------------------------------------------
# Full training runs: the Hydra app and Optuna's GridSampler
# --------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
  return repr(float(x))


def sweep_command(
  app: str | os.PathLike[str],
  sweep_dir: str | os.PathLike[str],
  lrs: Sequence[float],
  *,
  seeds: Sequence[int] | None = None,
  presets: Sequence[str] = (),
  overrides: Sequence[str] = (),
  python: str | None = None,
) -> list[str]:
  """The command line of an lr grid sweep of the Hydra training app.

  Args:
    app: the Hydra app (``experiments/train.py``).
    sweep_dir: Hydra's multirun directory for this sweep (one subdirectory per job).
    lrs: the grid (``optimizer.lr=choice(...)``).
    seeds: seeds to run every lr with (``seed=choice(...)``); None: the config's seed.
    presets: ``configs/experiment`` presets to apply with the grid preset, e.g.
      ``["baydin_logreg"]``.
    overrides: more Hydra overrides (``estimator=backprop``, ``train.steps=500``…).
    python: the interpreter (default: this one).

  Returns:
    The argument list (``shlex.join`` it to print).
  """
  experiments = [*presets, GRID_PRESET]
  choice = experiments[0] if len(experiments) == 1 else f"[{','.join(experiments)}]"
  cmd = [python or sys.executable, str(app), "-m", f"+experiment={choice}", *overrides]
  cmd.append(f"optimizer.lr=choice({','.join(_fmt(lr) for lr in lrs)})")
  if seeds is not None:
    cmd.append(f"seed=choice({','.join(str(int(s)) for s in seeds)})")
  cmd.append(f"hydra.sweep.dir={sweep_dir}")
  return cmd


def run_sweep(
  app: str | os.PathLike[str],
  sweep_dir: str | os.PathLike[str],
  lrs: Sequence[float],
  *,
  seeds: Sequence[int] | None = None,
  presets: Sequence[str] = (),
  overrides: Sequence[str] = (),
  python: str | None = None,
  cwd: str | os.PathLike[str] | None = None,
  env: Mapping[str, str] | None = None,
  timeout: float | None = None,
  quiet: bool = True,
) -> LrSearch:
  """Runs the grid sweep of :func:`sweep_command` and reads it (:func:`read_sweep`).

  Args:
    app, sweep_dir, lrs, seeds, presets, overrides, python: see :func:`sweep_command`.
    cwd: working directory of the subprocess.
    env: its environment (default: this process's).
    timeout: seconds before the sweep is killed.
    quiet: capture the app's output (shown only when it fails) instead of passing it on.

  Returns:
    The :class:`LrSearch`, with ``extra["command"]`` (the argument list).

  Raises:
    RuntimeError: the app exited with an error (its output's tail in the message).
  """
  cmd = sweep_command(
    app, sweep_dir, lrs, seeds=seeds, presets=presets, overrides=overrides, python=python
  )
  out = subprocess.run(
    cmd,
    cwd=cwd,
    env=None if env is None else dict(env),
    capture_output=quiet,
    text=True,
    timeout=timeout,
  )
  if out.returncode != 0:
    tail = ((out.stdout or "") + (out.stderr or ""))[-3000:]
    raise RuntimeError(f"lr sweep failed (exit {out.returncode}): {cmd}\n{tail}")
  result = read_sweep(sweep_dir)
  return dataclasses.replace(result, extra={**result.extra, "command": cmd})


def _job_dirs(sweep_dir: Path) -> list[Path]:
  jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
  return sorted(jobs, key=lambda p: (len(p.name), p.name))


def _optuna_results(sweep_dir: Path) -> dict[str, Any] | None:
  path = sweep_dir / "optimization_results.yaml"
  if not path.exists():
    return None
  from omegaconf import OmegaConf  # the sweep ran Hydra, so OmegaConf is installed

  return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def read_sweep(sweep_dir: str | os.PathLike[str], *, objective: str = "best_val_loss") -> LrSearch:
  """The :class:`LrSearch` of a Hydra multirun directory of the training app.

  Every job directory's ``summary.json`` gives its ``lr``, ``seed``, ``diverged`` and
  the objective (default ``best_val_loss``: the lowest validation loss the run saw,
  what a comparison at a tuned lr picks); ``optimization_results.yaml`` (Optuna's best
  trial, on the app's objective: the final validation loss) goes into ``extra``.

  Args:
    sweep_dir: the multirun directory.
    objective: the ``summary.json`` key to compare.

  Returns:
    The search over the lrs and seeds found; a (lr, seed) that did not run is None.
    ``extra``: ``runs`` (``runs[i][j]``: the job directory or None), ``sweep_dir``,
    ``optuna`` (or None), ``failed_jobs`` (job directories without a summary).

  Raises:
    FileNotFoundError: no job in ``sweep_dir`` wrote a summary.
  """
  sweep_dir = Path(sweep_dir)
  found: dict[tuple[float, int], tuple[dict[str, Any], Path]] = {}
  failed = []
  for job in _job_dirs(sweep_dir):
    path = job / "summary.json"
    if not path.exists():
      failed.append(str(job))
      continue
    s = json.loads(path.read_text())
    found[float(s["lr"]), int(s["seed"])] = (s, job)
  if not found:
    raise FileNotFoundError(f"no job in {sweep_dir} wrote a summary.json")
  lrs = sorted({lr for lr, _ in found})
  seeds = sorted({seed for _, seed in found})
  values, diverged, runs = [], [], []
  for lr in lrs:
    row_v, row_d, row_r = [], [], []
    for seed in seeds:
      s, job = found.get((lr, seed), (None, None))
      row_v.append(None if s is None else s.get(objective))
      row_d.append(bool(s and s.get("diverged")))
      row_r.append(None if job is None else str(job))
    values.append(row_v)
    diverged.append(row_d)
    runs.append(row_r)
  extra = {
    "runs": runs,
    "sweep_dir": str(sweep_dir),
    "optuna": _optuna_results(sweep_dir),
    "failed_jobs": failed,
  }
  return summarize(lrs, seeds, values, diverged, objective=objective, extra=extra)


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def draw(ax: Any, result: LrSearch | Mapping[str, Any], *, color: str = "tab:blue", label=None):
  """Draws a search on a matplotlib ``Axes``: loss against lr, diverged ×, best ★.

  Diverged lrs are left out of the line (their loss before blowing up is no measure of
  the lr) and marked with a red × at the top of the drawn range. The axes get log scales.

  Args:
    ax: the axes to draw on (the caller owns the figure).
    result: an :class:`LrSearch` or its :meth:`~LrSearch.as_dict`.
    color: the line's colour.
    label: the legend label of the line.
  """
  r = LrSearch.from_dict(result) if isinstance(result, Mapping) else result
  ok = [(lr, c) for lr, c, d in zip(r.lrs, r.curve, r.diverged) if c is not None and not any(d)]
  if ok:
    ax.plot(*zip(*ok), "o-", color=color, label=label)
  top = max((c for _, c in ok), default=1.0)
  for lr in r.diverged_lrs:
    ax.plot(lr, top, "x", color="red", ms=10, mew=2)
  if r.best_lr is not None:
    ax.plot(r.best_lr, r.best_loss, "*", color=color, ms=16, mec="k")
  ax.set_xscale("log")
  ax.set_yscale("log")
