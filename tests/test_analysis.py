"""Tests of experiments._lib.analysis: time/iterations to a loss and Baydin's T_f/T_b."""

import pytest

from experiments._lib import analysis


def _records(points):
  """metrics.jsonl-like records from (step, train_time_s, val_loss or None)."""
  out = []
  for step, t, v in points:
    r = {"step": step, "train_loss": 1.0, "train_time_s": t}
    if v is not None:
      r.update(val_loss=v, val_accuracy=0.5)
    out.append(r)
  return out


def test_time_to_loss_is_the_first_evaluation_at_or_below_the_target():
  # Out of order on purpose, with a train-only record and a NaN evaluation.
  recs = _records([(300, 3.0, 0.2), (100, 1.0, 0.9), (150, 1.5, None), (200, 2.0, float("nan"))])
  recs += _records([(250, 2.5, 0.5)])
  assert analysis.time_to_loss(recs, 0.5) == {"step": 250, "train_time_s": 2.5, "val_loss": 0.5}
  assert analysis.time_to_loss(recs, 0.1) is None
  assert [r["step"] for r in analysis.evaluations(recs)] == [100, 250, 300]


def test_time_to_backprop_loss_reached():
  # Backprop's best (0.40) is at step 300, t = 3.0 s; its later, worse eval must not count.
  bp = _records([(100, 1.0, 0.9), (200, 2.0, 0.5), (300, 3.0, 0.40), (400, 4.0, 0.45)])
  # Forward passes 0.40 first at step 300 (0.39 <= 0.40) at t = 1.5 s; a train-only record
  # (no val_loss) and the later, even lower value are ignored.
  fw = _records([(50, 0.2, None), (100, 0.5, 0.8), (200, 1.0, 0.41), (300, 1.5, 0.39)])
  fw.append({"step": 400, "train_loss": 1.0, "train_time_s": 2.0, "val_loss": 0.2})
  t = analysis.time_to_backprop_loss(bp, fw)
  assert t["reached"] is True
  assert t["target_val_loss"] == 0.40 and t["T_b"] == 3.0 and t["step_b"] == 300
  assert t["T_f"] == 1.5 and t["step_f"] == 300
  assert t["ratio"] == pytest.approx(0.5) and t["step_ratio"] == pytest.approx(1.0)
  assert t["best_forward_val_loss"] == 0.2 and t["best_forward_step"] == 400


def test_time_to_backprop_loss_exactly_equal_counts_as_reached():
  t = analysis.time_to_backprop_loss(_records([(10, 2.0, 0.5)]), _records([(10, 1.0, 0.5)]))
  assert t["reached"] and t["ratio"] == pytest.approx(0.5)


def test_time_to_backprop_loss_not_reached_is_a_result():
  bp = _records([(100, 1.0, 0.6), (200, 2.0, 0.3)])
  # A NaN (diverged) eval is skipped rather than compared.
  fw = _records([(100, 0.5, 0.9), (200, 1.0, 0.7), (300, 1.5, float("nan"))])
  t = analysis.time_to_backprop_loss(bp, fw)
  assert t["reached"] is False
  assert t["T_f"] is None and t["ratio"] is None and t["step_ratio"] is None
  assert t["target_val_loss"] == 0.3 and t["T_b"] == 2.0
  assert t["best_forward_val_loss"] == 0.7 and t["best_forward_step"] == 200


def test_time_to_backprop_loss_without_backprop_evaluations():
  t = analysis.time_to_backprop_loss(_records([(10, 1.0, None)]), _records([(10, 1.0, 0.3)]))
  assert t["reached"] is False and t["target_val_loss"] is None
  assert t["best_forward_val_loss"] == 0.3


def test_aggregate_over_seed_pairs():
  bp = _records([(100, 2.0, 0.5)])
  hit = analysis.time_to_backprop_loss(bp, _records([(100, 1.0, 0.4)]))
  late = analysis.time_to_backprop_loss(bp, _records([(100, 3.0, 0.45)]))
  miss = analysis.time_to_backprop_loss(bp, _records([(100, 1.0, 0.6)]))
  agg = analysis.aggregate_time_to_loss([hit, miss, late])
  assert agg["n_pairs"] == 3 and agg["n_reached"] == 2
  assert agg["ratio"] == pytest.approx(1.0)  # the median of 0.5 and 1.5; the miss is left out
  assert agg["per_seed"] == [hit, miss, late]
  none = analysis.aggregate_time_to_loss([miss])
  assert none["ratio"] is None and none["best_forward_val_loss"] == 0.6


def test_time_to_loss_on_mean_curves():
  def curve(points):
    return [dict(step=s, train_time_s=t, val_loss=v) for s, t, v in points]

  # Backprop's mean curve: 0.6 at t=1.5, 0.4 at t=3.0 (its best); forward's mean curve
  # reaches 0.4 at step 200, mean time 1.0. A step missing from one run is dropped.
  bp = [curve([(100, 1, 0.7), (200, 3, 0.5)]), curve([(100, 2, 0.5), (200, 3, 0.3)])]
  fw = [
    curve([(100, 0.5, 0.9), (200, 1.0, 0.5), (300, 1.5, 0.1)]),
    curve([(100, 0.5, 0.7), (200, 1.0, 0.3)]),
  ]
  t = analysis.time_to_loss_on_mean_curves(bp, fw)
  assert t["target_val_loss"] == pytest.approx(0.4) and t["T_b"] == pytest.approx(3.0)
  assert t["reached"] and t["T_f"] == pytest.approx(1.0) and t["ratio"] == pytest.approx(1 / 3)
  assert t["best_forward_step"] == 200


def test_median_curve_and_stats_skip_what_is_missing():
  c1 = [dict(step=1, train_time_s=1.0, val_loss=3.0), dict(step=2, train_time_s=2.0, val_loss=1.0)]
  c2 = [dict(step=1, train_time_s=3.0, val_loss=5.0)]
  steps, t, v = analysis.median_curve([c1, c2])
  assert steps.tolist() == [1, 2] and t.tolist() == [2.0, 2.0] and v.tolist() == [4.0, 1.0]
  assert analysis.summary_stats([3.0, None, float("inf"), 1.0]) == {
    "median": 2.0,
    "min": 1.0,
    "max": 3.0,
  }
  assert analysis.finite_median([None]) is None
