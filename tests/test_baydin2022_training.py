"""Tests of experiments/baydin2022_training.py: the T_f/T_b logic and a --quick run."""

import json
from pathlib import Path

import _scripts
import pytest


@pytest.fixture(scope="module")
def script():
  return _scripts.load("baydin2022_training")


def _records(points):
  """metrics.jsonl-like records from (step, train_time_s, val_loss or None)."""
  out = []
  for step, t, v in points:
    r = {"step": step, "train_loss": 1.0, "train_time_s": t}
    if v is not None:
      r.update(val_loss=v, val_accuracy=0.5)
    out.append(r)
  return out


def test_time_to_loss_reached(script):
  # Backprop's best (0.40) is at step 300, t = 3.0 s; its later, worse eval must not count.
  bp = _records([(100, 1.0, 0.9), (200, 2.0, 0.5), (300, 3.0, 0.40), (400, 4.0, 0.45)])
  # Forward passes 0.40 first at step 300 (0.39 <= 0.40) at t = 1.5 s; a train-only record
  # (no val_loss) and the later, even lower value are ignored.
  fw = _records([(50, 0.2, None), (100, 0.5, 0.8), (200, 1.0, 0.41), (300, 1.5, 0.39)])
  fw.append({"step": 400, "train_loss": 1.0, "train_time_s": 2.0, "val_loss": 0.2})
  t = script.time_to_backprop_loss(bp, fw)
  assert t["reached"] is True
  assert t["target_val_loss"] == 0.40 and t["T_b"] == 3.0 and t["step_b"] == 300
  assert t["T_f"] == 1.5 and t["step_f"] == 300
  assert t["ratio"] == pytest.approx(0.5)
  assert t["step_ratio"] == pytest.approx(1.0)
  assert t["best_forward_val_loss"] == 0.2 and t["best_forward_step"] == 400


def test_time_to_loss_exactly_equal_counts_as_reached(script):
  bp = _records([(10, 2.0, 0.5)])
  fw = _records([(10, 1.0, 0.5)])
  t = script.time_to_backprop_loss(bp, fw)
  assert t["reached"] and t["ratio"] == pytest.approx(0.5)


def test_time_to_loss_not_reached(script):
  bp = _records([(100, 1.0, 0.6), (200, 2.0, 0.3)])
  # A NaN (diverged) eval is skipped rather than compared.
  fw = _records([(100, 0.5, 0.9), (200, 1.0, 0.7), (300, 1.5, float("nan"))])
  t = script.time_to_backprop_loss(bp, fw)
  assert t["reached"] is False
  assert t["T_f"] is None and t["ratio"] is None and t["step_ratio"] is None
  assert t["target_val_loss"] == 0.3 and t["T_b"] == 2.0
  assert t["best_forward_val_loss"] == 0.7 and t["best_forward_step"] == 200
  assert script._t_cell(t).startswith("not reached (best fwd val 0.700 vs bp 0.300")


def test_aggregate_over_seeds(script):
  bp = _records([(100, 2.0, 0.5)])
  hit = script.time_to_backprop_loss(bp, _records([(100, 1.0, 0.4)]))
  miss = script.time_to_backprop_loss(bp, _records([(100, 1.0, 0.6)]))
  agg = script.aggregate_time_to_loss([hit, miss, hit])
  assert agg["n_pairs"] == 3 and agg["n_reached"] == 2
  assert agg["ratio"] == pytest.approx(0.5)
  assert script._t_cell(agg) == "0.500 (2/3 seeds)"
  none = script.aggregate_time_to_loss([miss])
  assert none["ratio"] is None
  assert script._t_cell(none).startswith("not reached (best fwd val 0.600 vs bp 0.500")


def test_quick_run_writes_results(script, tiny_data, tmp_path):
  data_dir, _ = tiny_data
  out, runs = tmp_path / "results", tmp_path / "runs"
  argv = ["--quick", "--models", "logreg", "--data", "auto", "--data-dir", str(data_dir)]
  argv += ["--val-size", "64", "--out", str(out), "--runs-dir", str(runs)]
  assert script.main(argv) == 0

  doc = json.loads((out / "training.json").read_text())
  e = doc["models"]["logreg"]
  # MNIST is not in the tiny data dir: the fallback to Fashion-MNIST is taken and recorded.
  assert e["data"] == "fashion_mnist"
  assert any("mnist unavailable" in n for n in e["data_notes"])
  assert e["steps"] == 50 and e["seeds"] == [0] and "--quick" in e["command"]
  assert e["hardware"] and e["jax_version"]
  for method in ("forward", "backprop"):
    (run,) = e["methods"][method]["runs"]
    assert run["steps"] == 50 and not run["diverged"]
    assert len(run["curve"]) == 5  # eval every 10 of 50 iterations
    assert (Path(run["run_dir"]) / "metrics.jsonl").exists()
  assert e["R_f"] > 0 and e["R_b"] > 0
  assert e["R_ratio"] == pytest.approx(e["R_f"] / e["R_b"])
  (pair,) = e["T"]["per_seed"]
  md = (out / "training.md").read_text()
  if pair["reached"]:
    assert pair["ratio"] == pytest.approx(pair["T_f"] / pair["T_b"])
  else:
    # Either outcome is legitimate on 50 iterations; "not reached" must be reported as such.
    assert pair["T_f"] is None and pair["best_forward_val_loss"] > pair["target_val_loss"]
    assert "not reached" in md

  f = doc["fair"]["logreg"]
  assert f["preset_lr"] == 1e-4
  # --quick: the grid's top lr and the paper's lr per method.
  assert f["grid"]["forward"] == [1e-4, 1e-3]
  assert f["grid"]["backprop"] == [1e-4, 0.3]
  for method in ("forward", "backprop"):
    best = f["best"][method]
    assert best["best_val_loss"] == min(
      r["best_val_loss"] for r in f["runs"][method] if r["best_val_loss"] is not None
    )
  assert f["same_lr"]["forward"]["lr"] == f["same_lr"]["backprop"]["lr"] == 1e-4
  # Same steps, evals and seed as the main runs: the paper-lr grid points are reused.
  for method in ("forward", "backprop"):
    assert f["same_lr"][method]["run_dir"] == e["methods"][method]["runs"][0]["run_dir"]
  assert "Fair comparison" in md and "| paper | MNIST |" in md

  for png in ("training_logreg.png", "training_fair_lr.png"):
    assert (out / png).stat().st_size > 10_000


def test_fair_grid_adds_the_paper_lr(script):
  grid = script.fair_grid(2e-4, quick=False)
  assert grid["forward"] == [1e-5, 3.16e-5, 1e-4, 2e-4, 3.16e-4, 1e-3]
  assert grid["backprop"] == [2e-4, 1e-3, 4.16e-3, 0.0173, 0.0721, 0.3]
  # Already on the grid: not repeated.
  assert len(script.fair_grid(1e-4, quick=False)["forward"]) == 5
  assert [script._lr(x) for x in (1e-4, 2e-5, 3.16e-5, 0.0173, 0.3)] == [
    "1e-4",
    "2e-5",
    "3.16e-5",
    "0.0173",
    "0.3",
  ]


def test_time_to_loss_on_mean_curves(script):
  def run(points):
    return {"curve": [dict(step=s, train_time_s=t, val_loss=v) for s, t, v in points]}

  # Backprop's mean curve: 0.6 at t=1.5, 0.4 at t=3.0 (its best); forward's mean curve
  # reaches 0.4 at step 200, mean time 1.0. A step missing from one run is dropped.
  methods = {
    "backprop": {
      "runs": [run([(100, 1, 0.7), (200, 3, 0.5)]), run([(100, 2, 0.5), (200, 3, 0.3)])]
    },
    "forward": {
      "runs": [
        run([(100, 0.5, 0.9), (200, 1.0, 0.5), (300, 1.5, 0.1)]),
        run([(100, 0.5, 0.7), (200, 1.0, 0.3)]),
      ]
    },
  }
  t = script.time_to_loss_on_mean_curves(methods)
  assert t["target_val_loss"] == pytest.approx(0.4) and t["T_b"] == pytest.approx(3.0)
  assert t["reached"] and t["T_f"] == pytest.approx(1.0) and t["ratio"] == pytest.approx(1 / 3)
  assert t["best_forward_step"] == 200
