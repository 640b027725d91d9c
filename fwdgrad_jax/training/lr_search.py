"""One learning-rate search for every paper, two ways to run it, one result format.

The papers disagree mostly about learning rates: Baydin et al. compared forward gradient
and backprop at one shared lr; the reproduction study tuned each method's own and found
backprop far ahead; Flügel et al. searched an lr per variant and found the best lrs
spread widely across k and aggregations. So every comparison here tunes per variant,
and every search reports the same :class:`LrSearch`:

* the best lr and its loss, and whether it lies at the edge of the grid (the optimum may
  be outside it);
* the curve of loss against lr (mean over seeds), the per-seed values, and which lrs
  diverged (a non-finite loss in any seed) or were unstable (see below); :func:`cells`
  and :func:`markdown_table` write it for a report, statuses included.

Two ways to run one:

* :func:`search` — small problems (closed-form functions, tiny nets): ``objective(lr,
  seed) -> loss`` is jitted and vmapped over the whole grid × seeds, so hundreds of runs
  are one XLA call.
* :func:`run_sweep` / :func:`read_sweep` — full training runs: the Hydra app
  (``experiments/train.py -m``, Optuna's GridSampler via ``+experiment=lr_search_grid``)
  in a subprocess, one job per (lr, seed); the reader turns the multirun directory into
  an :class:`LrSearch`. The caller passes the app and the sweep directory; nothing here
  finds files of the repository.

Scoring a run (one rule for every search, :func:`score`): a run's loss is its FINAL
validation loss, the mean of its last :data:`FINAL_EVALS` (3) evaluations, not the best
one it saw: a run that dips once and then blows up must not win. A run whose final loss is
above :data:`UNSTABLE_RATIO` (1.5) × its best is ``unstable``: it went somewhere and came
back worse, so its lr is not usable either. Fewer than 3 evaluations: the mean of those
there are. A non-finite evaluation (or a run the trainer stopped as diverged) is
``diverged``.

Choosing the best lr: an lr where any seed diverged or was unstable is not eligible (a
diverged run has no final model; an unstable one ends far above where it was), so it
only competes when no lr is eligible (then the unstable lrs before the diverged ones);
among the eligible the lowest mean-over-seeds loss wins, the smaller lr on a tie.
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
from typing import Any, NamedTuple

import numpy as np

from fwdgrad_jax.training import rundir

__all__ = [
  "FINAL_EVALS",
  "UNSTABLE_RATIO",
  "LrSearch",
  "RunScore",
  "cells",
  "draw",
  "final_loss",
  "is_unstable",
  "log_grid",
  "markdown_table",
  "read_sweep",
  "rule_line",
  "run_sweep",
  "score",
  "search",
  "summarize",
  "summarize_curves",
  "sweep_command",
  "val_curve",
]

GRID_PRESET = "lr_search_grid"  # configs/experiment/lr_search_grid.yaml

# The selection rule (module docstring). Three evaluations: one is a single noisy point
# (the dip-and-blow-up run ranks by luck of where its last evaluation fell); many would
# reach back into the early, still-falling part of a short run.
FINAL_EVALS = 3
# Final above 1.5 × best: the run ended 50 % above its own best, far more than the
# evaluation noise of a steady run (a few %), so it was going back up, not levelling off.
UNSTABLE_RATIO = 1.5
OBJECTIVE = "final_val_loss"


class RunScore(NamedTuple):
  """One run scored by :func:`score`.

  Attributes:
    final: the mean of the last ``last`` finite evaluations (None: none finite).
    best: the lowest finite evaluation (None: none finite).
    diverged: an evaluation was non-finite (or the trainer said so).
    unstable: not diverged, and final > ratio × best.
  """

  final: float | None
  best: float | None
  diverged: bool
  unstable: bool


def _finite(x: Any) -> bool:
  return x is not None and math.isfinite(x)


def _finite_prefix(curve: Sequence[float | None]) -> list[float]:
  out = []
  for v in curve:
    if not _finite(v):
      break
    out.append(float(v))
  return out


def final_loss(curve: Sequence[float | None], last: int = FINAL_EVALS) -> float | None:
  """The loss a run ends at: the mean of its last ``last`` evaluations.

  Args:
    curve: the run's evaluations in order (e.g. its validation losses); None or
      non-finite where it diverged (evaluations from there on do not count).
    last: how many of the last evaluations to average (fewer if the run has fewer).

  Returns:
    The mean of the last ``last`` finite evaluations before the first non-finite one;
    None when there is none.

  Raises:
    ValueError: ``last < 1``.
  """
  if last < 1:
    raise ValueError(f"last={last}: need at least one evaluation")
  finite = _finite_prefix(curve)
  return float(np.mean(finite[-last:])) if finite else None


def is_unstable(
  curve: Sequence[float | None], last: int = FINAL_EVALS, ratio: float = UNSTABLE_RATIO
) -> bool:
  """Whether a run ended far above its own best: final > ``ratio`` × best.

  For losses ≥ 0 (the rule's domain) this is ``final > ratio * best``; written as
  ``final - best > (ratio - 1) * |best|`` so that it does not flip for a negative best.
  A diverged run (a non-finite evaluation) is not called unstable: it is diverged.

  Args:
    curve: the run's evaluations in order.
    last: as :func:`final_loss`.
    ratio: the allowed final / best.

  Returns:
    True when the finite run's final loss is more than ``ratio`` × its best.
  """
  return score(curve, last, ratio).unstable


def score(
  curve: Sequence[float | None],
  last: int = FINAL_EVALS,
  ratio: float = UNSTABLE_RATIO,
  *,
  diverged: bool = False,
) -> RunScore:
  """The one rule every lr search scores a run by (see the module docstring).

  Args:
    curve: the run's evaluations in order (validation losses); None/non-finite = diverged.
    last: evaluations averaged into the final loss (:data:`FINAL_EVALS`).
    ratio: final / best above which a run is unstable (:data:`UNSTABLE_RATIO`).
    diverged: the run is known to have diverged (the trainer stopped it on a non-finite
      training loss, after its last finite evaluation).

  Returns:
    :class:`RunScore`.
  """
  if ratio < 1:
    raise ValueError(f"ratio={ratio}: the final loss is compared to ratio × best, need >= 1")
  finite = _finite_prefix(curve)
  diverged = bool(diverged) or len(finite) < len(curve)
  final = final_loss(curve, last)
  best = min(finite) if finite else None
  unstable = not diverged and final is not None and final - best > (ratio - 1) * abs(best)
  return RunScore(final, best, diverged, bool(unstable))


def val_curve(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None = None):
  """The validation losses of a run's ``metrics.jsonl`` records, in step order.

  Args:
    records: the run's records (those without ``val_loss`` are skipped).
    summary: its ``summary.json``; its ``val_loss`` (the evaluation after the last step)
      is appended when it is of a later step than the last record's evaluation (a run
      stopped between evaluations, by its time budget).

  Returns:
    The list of validation losses (None where one was not finite).
  """
  evals = [(int(r["step"]), r["val_loss"]) for r in records if "val_loss" in r and "step" in r]
  curve = [v if _finite(v) else None for _, v in evals]
  if summary is not None and _finite(summary.get("val_loss")):
    last_step = evals[-1][0] if evals else -1
    if summary.get("steps") is not None and int(summary["steps"]) > last_step:
      curve.append(float(summary["val_loss"]))
  return curve


@dataclasses.dataclass(frozen=True)
class LrSearch:
  """The result of a learning-rate search, however it ran.

  Attributes:
    lrs: the grid, ascending.
    seeds: the seeds every lr ran with.
    values: ``values[i][j]``: the objective of lr i, seed j (None: none finite / not run).
    diverged: ``diverged[i][j]``: that run diverged.
    unstable: ``unstable[i][j]``: that run's final loss was above ``unstable_ratio`` ×
      its best (:func:`score`); all False where the values are no curves' finals.
    curve: per lr, the mean over seeds of the finite values (None when there are none).
    best_lr, best_loss, best_index: the chosen lr (see the module docstring), its curve
      value and its index in ``lrs``; None when no lr has a finite value.
    at_grid_edge: the best lr is the smallest or the largest of the grid.
    diverged_lrs: the lrs where at least one seed diverged.
    unstable_lrs: the lrs where at least one seed was unstable (and none diverged).
    objective: what the values are (e.g. ``"final_val_loss"``).
    final_evals: evaluations averaged into a run's final loss (None: the values are
      the caller's scalars, not scored curves).
    unstable_ratio: the final / best ratio above which a run is unstable (None: as above).
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
  unstable: tuple[tuple[bool, ...], ...] = ()
  unstable_lrs: tuple[float, ...] = ()
  final_evals: int | None = None
  unstable_ratio: float | None = None

  def status(self, i: int) -> str:
    """``"diverged"``, ``"unstable"`` or ``"ok"``: lr ``i``'s eligibility (module docstring)."""
    if any(self.diverged[i]):
      return "diverged"
    if self.unstable and any(self.unstable[i]):
      return "unstable"
    return "ok"

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
      # Searches written before the unstable rule have none of these.
      unstable=nested(d.get("unstable", ())),
      unstable_lrs=tuple(d.get("unstable_lrs", ())),
      final_evals=d.get("final_evals"),
      unstable_ratio=d.get("unstable_ratio"),
    )


def summarize(
  lrs: Sequence[float],
  seeds: Sequence[int],
  values: Sequence[Sequence[float | None]],
  diverged: Sequence[Sequence[bool]] | None = None,
  *,
  unstable: Sequence[Sequence[bool]] | None = None,
  objective: str = "loss",
  extra: Mapping[str, Any] | None = None,
  final_evals: int | None = None,
  unstable_ratio: float | None = None,
) -> LrSearch:
  """The :class:`LrSearch` of per-(lr, seed) results, in any lr order.

  Training curves go through :func:`summarize_curves`, which scores them by the one rule
  (:func:`score`) and calls this; here the values are taken as given.

  Args:
    lrs: the learning rates (rows of ``values``).
    seeds: the seeds (columns of ``values``).
    values: ``values[i][j]`` objective of lr i and seed j; None or non-finite = no value.
    diverged: ``diverged[i][j]``; default: the value is missing or non-finite.
    unstable: ``unstable[i][j]``: not eligible either (default: none).
    objective: what the values are.
    extra: kept as is; per-run lists in it (``runs``) should be in the order of ``lrs``
      (they are reordered with the rows here when their length matches).
    final_evals, unstable_ratio: recorded (how the values were scored).

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
  uns = (
    [[False] * m for _ in range(n)] if unstable is None else [list(map(bool, r)) for r in unstable]
  )
  if len(uns) != n or any(len(row) != m for row in uns):
    raise ValueError(f"unstable must be {n} lrs x {m} seeds")
  order = sorted(range(n), key=lambda i: float(lrs[i]))
  lrs_sorted = tuple(float(lrs[i]) for i in order)
  vals = [vals[i] for i in order]
  div = [div[i] for i in order]
  uns = [uns[i] for i in order]
  extra = dict(extra or {})
  if isinstance(extra.get("runs"), list | tuple) and len(extra["runs"]) == n:
    extra["runs"] = [extra["runs"][i] for i in order]

  curve = []
  for row in vals:
    finite = [v for v in row if v is not None]
    curve.append(float(np.mean(finite)) if finite else None)
  usable = [i for i in range(n) if curve[i] is not None]
  finished = [i for i in usable if not any(div[i])]
  eligible = [i for i in finished if not any(uns[i])]
  best = min(eligible or finished or usable, key=lambda i: (curve[i], i), default=None)
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
    unstable=tuple(tuple(row) for row in uns),
    unstable_lrs=tuple(lr for lr, d, u in zip(lrs_sorted, div, uns) if any(u) and not any(d)),
    final_evals=final_evals,
    unstable_ratio=unstable_ratio,
  )


def summarize_curves(
  lrs: Sequence[float],
  seeds: Sequence[int],
  curves: Sequence[Sequence[Sequence[float | None] | None]],
  diverged: Sequence[Sequence[bool]] | None = None,
  *,
  last: int = FINAL_EVALS,
  ratio: float = UNSTABLE_RATIO,
  objective: str = OBJECTIVE,
  extra: Mapping[str, Any] | None = None,
) -> LrSearch:
  """The :class:`LrSearch` of per-(lr, seed) evaluation curves, scored by :func:`score`.

  Args:
    lrs, seeds: as :func:`summarize`.
    curves: ``curves[i][j]``: the evaluations of lr i, seed j in order (None: not run).
    diverged: ``diverged[i][j]``: the trainer stopped that run on a non-finite loss
      (default: only what the curves show).
    last, ratio: the rule's :data:`FINAL_EVALS` and :data:`UNSTABLE_RATIO`.
    objective, extra: as :func:`summarize`.

  Returns:
    The search; ``values`` are the runs' final losses.
  """
  values, div, uns = [], [], []
  for i, row in enumerate(curves):
    rv, rd, ru = [], [], []
    for j, c in enumerate(row):
      known = bool(diverged[i][j]) if diverged is not None else False
      if c is None:  # not run (a job that crashed): no value, diverged only if known
        rv.append(None)
        rd.append(known)
        ru.append(False)
        continue
      s = score(c, last, ratio, diverged=known)
      rv.append(s.final)
      rd.append(s.diverged or s.final is None)
      ru.append(s.unstable)
    values.append(rv)
    div.append(rd)
    uns.append(ru)
  return summarize(
    lrs,
    seeds,
    values,
    div,
    unstable=uns,
    objective=objective,
    extra=extra,
    final_evals=last,
    unstable_ratio=ratio,
  )


def cells(result: LrSearch | Mapping[str, Any], fmt: Callable[[float | None], str] | None = None):
  """One Markdown-ready cell per lr: ``"0.03: 0.512*"``, ``"0.3: 0.49 (unstable)"``…

  ``*`` marks the chosen lr; ``(div)`` and ``(unstable)`` the lrs that are not eligible.

  Args:
    result: an :class:`LrSearch` or its dict.
    fmt: formats a loss (default 4 significant digits, ``—`` for None).

  Returns:
    The list of cells, lrs ascending.
  """
  r = LrSearch.from_dict(result) if isinstance(result, Mapping) else result
  fmt = fmt or (lambda v: "—" if v is None else f"{v:.4g}")
  out = []
  for i, (lr, c) in enumerate(zip(r.lrs, r.curve)):
    status = r.status(i)
    mark = {"ok": "", "diverged": " (div)", "unstable": " (unstable)"}[status]
    out.append(f"{lr:g}: {fmt(c)}{'*' if i == r.best_index else ''}{mark}")
  return out


def markdown_table(result: LrSearch | Mapping[str, Any]) -> str:
  """The search as a Markdown table: lr, loss (mean over seeds), per-seed values, status.

  Args:
    result: an :class:`LrSearch` or its dict.

  Returns:
    The table and a line saying how runs were scored, newline-terminated.
  """
  r = LrSearch.from_dict(result) if isinstance(result, Mapping) else result
  fmt = lambda v: "—" if v is None else f"{v:.4g}"
  seeds = " | ".join(f"seed {s}" for s in r.seeds)
  lines = [
    f"| lr | {r.objective} (mean) | {seeds} | status |",
    "|---" * (3 + len(r.seeds)) + "|",
  ]
  for i, lr in enumerate(r.lrs):
    chosen = " (chosen)" if i == r.best_index else ""
    per_seed = " | ".join(fmt(v) for v in r.values[i])
    lines.append(f"| {lr:g} | {fmt(r.curve[i])} | {per_seed} | {r.status(i)}{chosen} |")
  return "\n".join([*lines, "", rule_line(r)]) + "\n"


def rule_line(result: LrSearch | Mapping[str, Any]) -> str:
  """One sentence saying how the search scored and chose (for under a table or a grid).

  Args:
    result: an :class:`LrSearch` or its dict (one written before the unstable rule says
      so: its values are its ``objective``, e.g. the best validation loss).
  """
  r = LrSearch.from_dict(result) if isinstance(result, Mapping) else result
  if r.final_evals is None:
    return f"Loss = {r.objective} (mean over seeds); diverged lrs are not eligible."
  return (
    f"Loss = the final validation loss, mean of a run's last {r.final_evals} evaluations "
    f"(mean over seeds); unstable = final > {r.unstable_ratio:g} × the run's best; unstable "
    "and diverged lrs are not eligible."
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
  last: int = FINAL_EVALS,
  ratio: float = UNSTABLE_RATIO,
) -> LrSearch:
  """Evaluates ``objective`` on every (lr, seed) in one jitted, vmapped call.

  Args:
    objective: ``objective(lr, seed) -> loss``, jittable; ``lr`` is a float32 scalar,
      ``seed`` an int32 scalar (e.g. ``jax.random.key(seed)`` inside). Either a scalar
      (what it measures is the caller's choice; non-finite = diverged) or a curve of
      shape ``(evals,)``: the run's evaluations in order, scored by the shared rule
      (:func:`score`: final = mean of the last ``last``, unstable, diverged).
    lrs: the learning rates.
    seeds: the seeds every lr runs with.
    objective_name: recorded as :attr:`LrSearch.objective`.
    last, ratio: the rule's parameters, for curves.

  Returns:
    The :class:`LrSearch`.
  """
  import jax
  import jax.numpy as jnp

  grid = jax.jit(jax.vmap(jax.vmap(objective, in_axes=(None, 0)), in_axes=(0, None)))
  out = grid(jnp.asarray(lrs, jnp.float32), jnp.asarray(seeds, jnp.int32))
  values = np.asarray(out, np.float64)
  if values.ndim == 3:
    return summarize_curves(
      lrs, seeds, values.tolist(), last=last, ratio=ratio, objective=objective_name
    )
  if values.shape != (len(lrs), len(seeds)):
    raise ValueError(
      f"objective must return a scalar or a curve (evals,); got shape {values.shape[2:]}"
    )
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


def read_sweep(
  sweep_dir: str | os.PathLike[str], *, last: int = FINAL_EVALS, ratio: float = UNSTABLE_RATIO
) -> LrSearch:
  """The :class:`LrSearch` of a Hydra multirun directory of the training app.

  Every job directory's ``summary.json`` gives its ``lr``, ``seed`` and ``diverged``;
  its ``metrics.jsonl`` the validation curve (:func:`val_curve`), scored by the shared
  rule (:func:`score`: the objective is ``final_val_loss``, the mean of the last
  ``last`` evaluations; ``unstable`` above ``ratio`` × the run's best).
  ``optimization_results.yaml`` (Optuna's best trial, on the app's objective: the
  validation loss after the last step) goes into ``extra``.

  Args:
    sweep_dir: the multirun directory.
    last, ratio: the rule's :data:`FINAL_EVALS` and :data:`UNSTABLE_RATIO`.

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
  curves, diverged, runs = [], [], []
  for lr in lrs:
    row_c, row_d, row_r = [], [], []
    for seed in seeds:
      s, job = found.get((lr, seed), (None, None))
      records = [] if job is None else rundir.read_metrics(job / rundir.METRICS_NAME)
      row_c.append(None if s is None else val_curve(records, s))
      row_d.append(bool(s and s.get("diverged")))
      row_r.append(None if job is None else str(job))
    curves.append(row_c)
    diverged.append(row_d)
    runs.append(row_r)
  extra = {
    "runs": runs,
    "sweep_dir": str(sweep_dir),
    "optuna": _optuna_results(sweep_dir),
    "failed_jobs": failed,
  }
  return summarize_curves(lrs, seeds, curves, diverged, last=last, ratio=ratio, extra=extra)


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def draw(ax: Any, result: LrSearch | Mapping[str, Any], *, color: str = "tab:blue", label=None):
  """Draws a search on a matplotlib ``Axes``: loss against lr, diverged ×, unstable ◇, best ★.

  Diverged lrs are left out of the line (their loss before blowing up is no measure of
  the lr) and marked with a red × at the top of the drawn range; unstable lrs stay on
  the line (their final loss is a measure) with an open orange diamond. The axes get log
  scales.

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
  for i, lr in enumerate(r.lrs):
    if r.status(i) == "unstable" and r.curve[i] is not None:
      ax.plot(lr, r.curve[i], "D", mfc="none", mec="tab:orange", ms=11, mew=2)
  if r.best_lr is not None:
    ax.plot(r.best_lr, r.best_loss, "*", color=color, ms=16, mec="k")
  ax.set_xscale("log")
  ax.set_yscale("log")
