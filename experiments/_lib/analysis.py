"""Reading training curves: time and iterations to a loss, T_f/T_b, curves over seeds.

Everything here works on the records a training run writes to ``metrics.jsonl``
(:func:`fwdgrad_jax.training.run.train`): dicts with ``step`` and ``train_time_s`` (training
time so far, evaluation and compilation excluded) and, at evaluation steps,
``val_loss``. Losses are only known at evaluation steps, so every time or iteration
count below is as fine as the evaluation interval.

* :func:`time_to_loss`: the first evaluation at or below a target loss.
* :func:`time_to_backprop_loss`: Baydin et al.'s T_f/T_b for one pair of runs — T_b is
  the time of backprop's lowest validation loss, T_f the time at which forward gradient
  first reaches that loss (with the iteration ratio beside it).
* :func:`aggregate_time_to_loss`: medians of T_f/T_b over seed pairs.
* :func:`time_to_loss_on_mean_curves`: T_f/T_b on curves averaged over seeds (the paper's way).
* :func:`curve`, :func:`mean_curve`, :func:`median_curve`, :func:`finite_median`,
  :func:`summary_stats`: the small pieces the above and the reports share.

Pure functions over plain Python data; no jax, no files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
  "aggregate_time_to_loss",
  "curve",
  "evaluations",
  "finite_median",
  "mean_curve",
  "median_curve",
  "summary_stats",
  "time_to_backprop_loss",
  "time_to_loss",
  "time_to_loss_on_mean_curves",
]

Record = dict[str, Any]


def _finite(x: Any) -> bool:
  return x is not None and math.isfinite(x)


def evaluations(records: Iterable[Record]) -> list[Record]:
  """The records with a finite ``val_loss`` and a ``train_time_s``, in step order."""
  out = [r for r in records if _finite(r.get("val_loss")) and "train_time_s" in r]
  return sorted(out, key=lambda r: r["step"])


def curve(records: Iterable[Record]) -> list[Record]:
  """The validation curve of a run: ``{step, train_time_s, val_loss}`` per evaluation."""
  return [
    {"step": r["step"], "train_time_s": r["train_time_s"], "val_loss": r["val_loss"]}
    for r in evaluations(records)
  ]


def time_to_loss(records: Iterable[Record], target: float) -> Record | None:
  """The first evaluation whose validation loss is at or below ``target``.

  Returns:
    ``{"step", "train_time_s", "val_loss"}`` of that evaluation (iterations and training
    time to the loss), or None when the run never gets there.
  """
  for r in evaluations(records):
    if r["val_loss"] <= target:
      return {"step": r["step"], "train_time_s": r["train_time_s"], "val_loss": r["val_loss"]}
  return None


def time_to_backprop_loss(
  backprop_records: Sequence[Record], forward_records: Sequence[Record]
) -> Record:
  """Baydin et al.'s T_f/T_b from two runs' ``metrics.jsonl`` records.

  T_b is the training time at backprop's lowest validation loss (its first occurrence);
  T_f is the training time at which forward gradient's validation loss first is at or
  below that loss.

  Returns:
    ``target_val_loss``, ``T_b``, ``step_b``; ``reached``; when reached ``T_f``,
    ``step_f``, ``ratio`` (T_f/T_b) and ``step_ratio`` (iterations_f / iterations_b),
    else those are None; always ``best_forward_val_loss`` and ``best_forward_step``.
    Everything is None (and ``reached`` False) when backprop has no finite evaluation:
    "not reached" is a finding to report, not an error.
  """
  bp, fw = evaluations(backprop_records), evaluations(forward_records)
  result: Record = dict.fromkeys(
    ("target_val_loss", "T_b", "step_b", "T_f", "step_f", "ratio", "step_ratio")
  )
  result.update(reached=False, best_forward_val_loss=None, best_forward_step=None)
  if fw:
    best_fw = min(fw, key=lambda r: r["val_loss"])
    result.update(best_forward_val_loss=best_fw["val_loss"], best_forward_step=best_fw["step"])
  if not bp:
    return result
  best = min(bp, key=lambda r: r["val_loss"])  # min() keeps the earliest of equal losses
  result.update(target_val_loss=best["val_loss"], T_b=best["train_time_s"], step_b=best["step"])
  hit = time_to_loss(fw, best["val_loss"])
  if hit is not None:
    result.update(
      reached=True,
      T_f=hit["train_time_s"],
      step_f=hit["step"],
      ratio=hit["train_time_s"] / best["train_time_s"],
      step_ratio=hit["step"] / best["step"],
    )
  return result


def finite_median(values: Iterable[float | None]) -> float | None:
  """The median of the finite values, None when there are none."""
  finite = [v for v in values if _finite(v)]
  return float(np.median(finite)) if finite else None


def summary_stats(values: Iterable[float | None]) -> dict[str, float | None]:
  """``median``, ``min`` and ``max`` of the finite values (None when there are none)."""
  finite = [v for v in values if _finite(v)]
  return {
    "median": finite_median(finite),
    "min": min(finite, default=None),
    "max": max(finite, default=None),
  }


def aggregate_time_to_loss(pairs: Sequence[Record]) -> Record:
  """Seed-pair results of :func:`time_to_backprop_loss` → medians over the pairs that reached.

  Returns:
    ``n_pairs``, ``n_reached``, ``ratio`` and ``step_ratio`` (medians over the reached
    pairs), ``target_val_loss`` and ``best_forward_val_loss`` (medians over all pairs)
    and the pairs themselves as ``per_seed``.
  """
  reached = [p for p in pairs if p["reached"]]
  return {
    "n_pairs": len(pairs),
    "n_reached": len(reached),
    "ratio": finite_median(p["ratio"] for p in reached),
    "step_ratio": finite_median(p["step_ratio"] for p in reached),
    "target_val_loss": finite_median(p["target_val_loss"] for p in pairs),
    "best_forward_val_loss": finite_median(p["best_forward_val_loss"] for p in pairs),
    "per_seed": list(pairs),
  }


def mean_curve(curves: Sequence[Sequence[Record]]) -> list[Record]:
  """Curves averaged over runs: time and loss at each step that every run evaluated."""
  if not curves:
    return []
  common = set.intersection(*({p["step"] for p in c} for c in curves))
  out = []
  for step in sorted(common):
    points = [p for c in curves for p in c if p["step"] == step]
    out.append(
      {
        "step": step,
        "train_time_s": float(np.mean([p["train_time_s"] for p in points])),
        "val_loss": float(np.mean([p["val_loss"] for p in points])),
      }
    )
  return out


def time_to_loss_on_mean_curves(
  backprop_curves: Sequence[Sequence[Record]], forward_curves: Sequence[Sequence[Record]]
) -> Record:
  """T_f/T_b as the paper computes it: on each method's curve averaged over its runs.

  Args:
    backprop_curves, forward_curves: one :func:`curve` per run (seed) of each method.

  Returns:
    :func:`time_to_backprop_loss` of the two mean curves (:func:`mean_curve`).
  """
  return time_to_backprop_loss(mean_curve(backprop_curves), mean_curve(forward_curves))


def median_curve(curves: Sequence[Sequence[Record]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(steps, median time, median val loss)`` over runs on the union of their steps.

  A run without an evaluation at some step is left out of that step's medians (for
  plots, where a missing point should not drop the whole step).
  """
  steps = sorted({p["step"] for c in curves for p in c})
  if not steps:
    return np.array([]), np.array([]), np.array([])
  index = {s: i for i, s in enumerate(steps)}
  t = np.full((len(curves), len(steps)), np.nan)
  v = np.full_like(t, np.nan)
  for i, c in enumerate(curves):
    for p in c:
      t[i, index[p["step"]]] = p["train_time_s"]
      v[i, index[p["step"]]] = p["val_loss"]
  return np.array(steps), np.nanmedian(t, 0), np.nanmedian(v, 0)
