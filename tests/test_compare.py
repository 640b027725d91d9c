"""Tests of the main job, experiments/compare.py, on the tiny data set and a small MLP."""

import json

import pytest

from experiments import compare as compare_script

SMALL = [
  "data.val_size=64",
  "model.options.hidden=[32]",
  "train.batch_size=16",
]


def _rows(tmp_path, budget=1.0):
  # Two rows, as configs/demo.yaml writes them; a short budget.
  path = tmp_path / "demo.yaml"
  path.write_text(
    f"budget_s: {budget}\nevals: 4\nrows:\n"
    "  backprop: [estimator=backprop, optimizer.lr=0.1]\n"
    "  forward k=2 orthogonal: [estimator=forward, estimator.num_tangents=2, "
    "estimator.aggregation=orthogonal, optimizer.lr=0.01]\n"
  )
  return path


def test_the_demo_rows_are_tuned_and_compose():
  compare = compare_script
  demo = compare.load_rows(compare.ROOT / "configs" / "demo.yaml")
  assert {"backprop", "forward k=1", "activity k=16 orthogonal"} <= set(demo["rows"])
  for label, row in demo["rows"].items():
    cfg = compare._compose(["+experiment=demo", *row])
    model = next((o.split("=", 1)[1] for o in row if o.startswith("model=")), "mlp")
    assert cfg.data.name == "fashion_mnist" and cfg.model.name == model, label
    assert any(o.startswith("optimizer.lr=") for o in row), f"{label}: no tuned lr"
  k16 = compare._compose(["+experiment=demo", *demo["rows"]["activity k=16 orthogonal"]])
  assert (k16.estimator.num_tangents, k16.estimator.aggregation) == (16, "orthogonal")
  assert k16.estimator.perturbation == "activity"
  # Every lr in the file names the command that found it.
  text = (compare.ROOT / "configs" / "demo.yaml").read_text()
  for label in demo["rows"]:
    assert f"--tune '{label}'" in text, label


def test_the_demo_schedule_decays_over_the_time_budget_not_a_step_count():
  from fwdgrad_jax.training import steps as steps_lib

  compare = compare_script
  demo = compare.load_rows(compare.ROOT / "configs" / "demo.yaml")
  for label, row in demo["rows"].items():
    overrides = ["+experiment=demo", "train.time_budget_s=20", "train.steps=10000", *row]
    cfg = compare._compose(overrides)
    assert cfg.optimizer.schedule == "cosine", label
    # compare.plan sets a time budget and a step cap: the decay follows the budget.
    assert steps_lib.uses_budget_schedule(cfg), label


@pytest.mark.slow
def test_compare_gives_every_row_the_same_time_budget(tiny_data, tmp_path, capsys):
  data_dir, _ = tiny_data
  compare = compare_script
  argv = ["--config", str(_rows(tmp_path)), f"data.data_dir={data_dir}", *SMALL]
  assert compare.main([*argv, "--out", str(tmp_path / "out")]) == 0
  result = json.loads((tmp_path / "out" / "comparison.json").read_text())
  rows = result["rows"]
  assert set(rows) == {"backprop", "forward k=2 orthogonal"}
  for label, r in rows.items():
    assert not r["diverged"] and r["steps"] > 0, label
    # Sized to the budget from the measured step time: within a generous factor of 1 s.
    assert 0.2 < r["train_time_s"] < 5.0, (label, r["train_time_s"])
    assert len(r["curve"]) >= 3 and r["cosine_to_true_grad"] is not None
  # The demo's cosine runs over the budget: every row ends at a fraction of its lr.
  for label in rows:
    run_dir = tmp_path / "out" / "runs" / label.replace(" ", "_").replace("=", "")
    lrs = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] < 0.5 * lrs[0], (label, lrs)
  # The slower step runs fewer steps in the same time.
  assert rows["forward k=2 orthogonal"]["steps"] < rows["backprop"]["steps"]
  assert rows["backprop"]["cosine_to_true_grad"] == pytest.approx(1.0, abs=1e-4)
  out = capsys.readouterr().out
  assert (
    "| forward k=2 orthogonal | 0.01 |" in out and "- forward k=2 orthogonal: a step takes" in out
  )
  assert (tmp_path / "out" / "comparison.png").stat().st_size > 10_000
  assert f"plot: {tmp_path / 'out' / 'comparison.png'}" in out


@pytest.mark.slow
def test_the_demo_rows_run_twice_into_the_same_directory_fresh(tiny_data, tmp_path):
  # configs/demo.yaml's own MLP rows (the LocalMixer row has its own model), on a small
  # MLP for 10 steps.
  data_dir, _ = tiny_data
  compare = compare_script
  demo = compare.load_rows(compare.ROOT / "configs" / "demo.yaml")
  mlp_rows = {k: v for k, v in demo["rows"].items() if not any(o.startswith("model=") for o in v)}
  config = tmp_path / "demo_mlp.yaml"
  config.write_text(json.dumps({**demo, "rows": mlp_rows}))  # JSON is YAML
  argv = [f"data.data_dir={data_dir}", *SMALL, "train.steps=10", "train.log_every=5"]
  argv += ["train.eval_every=5", "--out", str(tmp_path)]
  assert compare.main(["--config", str(config), *argv]) == 0
  rows = json.loads((tmp_path / "comparison.json").read_text())["rows"]
  assert {"backprop", "forward k=1", "activity k=16 orthogonal"} <= set(rows)
  assert all(r["steps"] == 10 and r["step_time_ms"] > 0 for r in rows.values())
  # The second run starts fresh instead of resuming the finished run (one row is enough:
  # every row's directory is handled alike).
  label = next(iter(mlp_rows))
  metrics = tmp_path / "runs" / label.replace(" ", "_").replace("=", "") / "metrics.jsonl"
  written = metrics.stat().st_mtime_ns
  first = tmp_path / "demo_first_row.yaml"
  first.write_text(json.dumps({**demo, "rows": {label: mlp_rows[label]}}))
  assert compare.main(["--config", str(first), *argv]) == 0
  (row,) = json.loads((tmp_path / "comparison.json").read_text())["rows"].values()
  assert row["steps"] == 10 and row["step_time_ms"] > 0
  assert metrics.stat().st_mtime_ns != written  # trained again, not resumed as finished


def test_compare_rejects_a_bad_value_with_exit_code_2(tmp_path, capsys):
  compare = compare_script
  argv = ["--config", str(_rows(tmp_path)), "estimator.num_tangents=0", "--out", str(tmp_path)]
  assert compare.main(argv) == 2
  assert "estimator.num_tangents=0" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_runs_the_row_lr_search(tiny_data, tmp_path, capsys):
  pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
  data_dir, _ = tiny_data
  compare = compare_script
  argv = ["--config", str(_rows(tmp_path, budget=0.5)), f"data.data_dir={data_dir}", *SMALL]
  argv += ["--tune", "backprop", "--lrs", "0.01,1e8", "--out", str(tmp_path / "tune")]
  assert compare.main(argv) == 0
  result = json.loads((tmp_path / "tune" / "lr_search.json").read_text())
  s = result["search"]
  assert s["lrs"] == [0.01, 1e8] and s["diverged_lrs"] == [1e8] and s["best_lr"] == 0.01
  command = result["sweep_command"]
  assert "'+experiment=[demo,lr_search_grid]'" in command and "optimizer.lr=0.1" not in command
  assert "backprop: best lr 0.01" in capsys.readouterr().out
  assert (tmp_path / "tune" / "lr_search.png").exists()
