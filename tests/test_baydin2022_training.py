"""End-to-end tests of the Baydin §5.3-5.5 scripts on the tiny data set (--quick).

The T_f/T_b logic itself is tested in test_analysis.py; here the scripts must run,
write their JSON with provenance, and rebuild their report from it alone.
"""

import json
from pathlib import Path

import pytest

from experiments.baydin2022 import fair as baydin2022_fair
from experiments.baydin2022 import training as baydin2022_training


@pytest.mark.slow
def test_training_quick_run_writes_results_and_reports_again(tiny_data, tmp_path):
  data_dir, _ = tiny_data
  script = baydin2022_training
  out = tmp_path / "results"
  argv = ["--quick", "--models", "logreg", "--data", "auto", "--data-dir", str(data_dir)]
  script.main([*argv, "--val-size", "64", "--out", str(out)])

  doc = json.loads((out / "training.json").read_text())
  e = doc["models"]["logreg"]
  # MNIST is not in the tiny data dir: the fallback to Fashion-MNIST is taken and recorded.
  assert e["data"] == "fashion_mnist"
  assert any("mnist unavailable" in n for n in doc["data_notes"])
  assert e["steps"] == 50 and e["seeds"] == [0]
  assert "--quick" in doc["provenance"]["command"]
  assert doc["provenance"]["hardware"]["jax_version"]
  for method in ("forward", "backprop"):
    (run,) = e["methods"][method]["runs"]
    assert run["steps"] == 50 and not run["diverged"]
    assert len(run["curve"]) == 5  # eval every 10 of 50 iterations
    assert Path(run["run_dir"]).is_relative_to(out / "runs")
    assert (Path(run["run_dir"]) / "metrics.jsonl").exists()
  assert e["R_f"] > 0 and e["R_b"] > 0
  (pair,) = e["T"]["per_seed"]
  md = (out / "training.md").read_text()
  if pair["reached"]:
    assert pair["T_f"] <= e["methods"]["forward"]["runs"][0]["train_time_s"]
  else:
    # Either outcome is legitimate on 50 iterations; "not reached" must be reported as such.
    assert pair["T_f"] is None and pair["best_forward_val_loss"] > pair["target_val_loss"]
    assert "not reached" in md
  assert "| paper | MNIST |" in md and doc["provenance"]["command"] in md
  assert (out / "training_logreg.png").stat().st_size > 10_000

  # The report alone, from two result files (as for models run by separate commands).
  again = tmp_path / "again"
  other = json.loads((out / "training.json").read_text())
  other["models"] = {"mlp": {**e, "model": "mlp", "title": "MLP 784-1024-1024-10, lr 2e-5"}}
  other["provenance"]["command"] = "python -m experiments.baydin2022.training --models mlp"
  (tmp_path / "other.json").write_text(json.dumps(other))
  script.main(
    ["--report-only", str(out / "training.json"), str(tmp_path / "other.json"), "--out", str(again)]
  )
  md2 = (again / "training.md").read_text()
  assert doc["provenance"]["command"] in md2 and "--models mlp`" in md2
  assert (again / "training_mlp.png").exists() and (again / "training_logreg.png").exists()


@pytest.mark.slow
def test_fair_quick_run_tunes_each_method_with_the_lr_search(tiny_data, tmp_path):
  pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
  data_dir, _ = tiny_data
  script = baydin2022_fair
  out = tmp_path / "fair"
  argv = ["--quick", "--presets", "baydin_logreg", "--data-dir", str(data_dir)]
  argv += ["--steps", "20", "--eval-every", "10", "--val-size", "64", "--out", str(out)]
  script.main(argv)
  doc = json.loads((out / "fair.json").read_text())
  e = doc["presets"]["baydin_logreg"]
  assert e["data"] == "fashion_mnist" and e["preset_lr"] == 1e-4
  # --quick: the grid's top lr and the paper's lr per method, in lr_search's format.
  assert e["searches"]["forward"]["lrs"] == [1e-4, 1e-3]
  assert e["searches"]["backprop"]["lrs"] == [1e-4, 0.3]
  for method in ("forward", "backprop"):
    s = e["searches"][method]
    assert s["objective"] == "final_val_loss" and s["at_grid_edge"] and s["final_evals"] == 3
    assert e["tuned"][method]["lr"] == s["best_lr"]
    assert e["tuned"][method]["loss"] == s["curve"][s["best_index"]]
    assert e["same_lr"][method]["lr"] == 1e-4
    assert "+experiment=[baydin_logreg,lr_search_grid]" in s["extra"]["command"]
  assert e["T_same_lr"]["n_pairs"] == 1 and e["T_tuned"]["n_pairs"] == 1
  md = (out / "fair.md").read_text()
  assert "tuned lr per method" in md and "lr_search_grid" in md
  assert (out / "fair_lr.png").stat().st_size > 10_000
