"""Tests of the reproduction-study scripts (repro_table1, repro_fair, repro_explosions).

The Table I script runs in-process on the tiny data set; the fair comparison's and the
explosion statistics' arithmetic is checked on hand-made records; their sweeps run on the
tiny data set in the slow tests, in process (``--quick``; the Hydra sweep itself, a
diverging job included, is tests/test_lr_search.py's).
"""

import json

import pytest

from experiments.repro import explosions as repro_explosions
from experiments.repro import fair as repro_fair
from experiments.repro import table1 as repro_table1

SMALL = ["data.val_size=64", "model.options.hidden=[32]", "train.batch_size=16"]


def test_table1_runs_the_rows_reuses_them_and_lists_cifar_as_not_run(tiny_data, tmp_path):
  data_dir, _ = tiny_data
  table1 = repro_table1
  rows = "repro_nn_mnist_sgd_bp,repro_nn_mnist_sgd_fwd,repro_vgg_cifar10_sgd_fwd"
  argv = ["--rows", rows, "--nn-epochs", "0.02", "--evals", "2", "--out", str(tmp_path)]
  argv += ["--fwd-variants", "preset,clip 1"]
  doc = table1.main([*argv, f"data.data_dir={data_dir}", *SMALL])
  by_row = {e["row"]: e for e in doc["rows"]}
  # MNIST cannot be prepared in the tiny data dir: the MNIST rows ran on Fashion-MNIST.
  assert doc["data_note"] and by_row["repro_nn_mnist_sgd_bp"]["data_run"] == "fashion_mnist"
  bp, fwd = by_row["repro_nn_mnist_sgd_bp"], by_row["repro_nn_mnist_sgd_fwd"]
  assert set(bp["runs"]) == {"preset"} and set(fwd["runs"]) == {"preset", "clip 1"}
  # The paper's settings come from the presets: the forward row caps at 1, no clipping.
  assert (fwd["lr"], fwd["decay"], fwd["clip_norm"], fwd["max_jvp_norm"]) == (
    4.64e-4, 1e-5, None, 1.0,
  )  # fmt: skip
  assert bp["clip_norm"] is None and bp["paper_test_loss"] == 0.0
  for entry in (bp, fwd):
    for r in entry["runs"].values():
      s = r["summary"]
      assert s["steps"] == round(0.02 * 859) and not s["diverged"]
      assert s["test_loss"] > 0 and any(p["val_loss"] is not None for p in r["curve"])
      assert r["command"].startswith("python experiments/train.py +experiment=repro_nn_mnist_sgd")
  clipped = json.loads(
    (tmp_path / "runs" / "repro_nn_mnist_sgd_fwd-clip_1" / "config.json").read_text()
  )
  assert clipped["optimizer"]["clip_norm"] == 1.0 and clipped["estimator"]["max_jvp_norm"] == 1.0
  assert "not prepared" in by_row["repro_vgg_cifar10_sgd_fwd"]["not_run"]
  md = (tmp_path / "table1.md").read_text()
  assert (
    "| repro_nn_mnist_sgd_fwd | fwd | nn | sgd | 0.000464 | 1e-05 | – | 50 | 0.332 | clip 1 |" in md
  )
  assert "not run: CIFAR-10" in md and (tmp_path / "table1_curves.png").stat().st_size > 10_000
  # A second call reuses the finished runs (same numbers, nothing retrained).
  mtime = (tmp_path / "runs" / "repro_nn_mnist_sgd_bp" / "summary.json").stat().st_mtime_ns
  again = table1.main([*argv, f"data.data_dir={data_dir}", *SMALL])
  assert (tmp_path / "runs" / "repro_nn_mnist_sgd_bp" / "summary.json").stat().st_mtime_ns == mtime
  assert again["rows"][0]["runs"]["preset"]["summary"] == bp["runs"]["preset"]["summary"]


def test_table1_merge_orders_rows_as_the_paper_and_keeps_every_command():
  table1 = repro_table1
  row = lambda name: {"row": name, "runs": {}}  # noqa: E731
  a = {"data_note": "n", "rows": [row("repro_nn_mnist_sgd_bp")], "provenance": {"command": "A"}}
  b = {"data_note": None, "rows": [row("repro_nn_mnist_sgd_fwd")], "provenance": {"command": "B"}}
  merged = table1.merge([a, b])
  assert [e["row"] for e in merged["rows"]] == ["repro_nn_mnist_sgd_fwd", "repro_nn_mnist_sgd_bp"]
  assert merged["data_note"] == "n" and [p["command"] for p in merged["parts"]] == ["A", "B"]
  # A later file's run of a variant replaces the earlier one; the other variants stay.
  old = {"rows": [{"row": "repro_nn_mnist_sgd_fwd", "runs": {"preset": 5, "clip 1": 5}}]}
  new = {"rows": [{"row": "repro_nn_mnist_sgd_fwd", "runs": {"preset": 50}}]}
  assert table1.merge([old, new])["rows"][0]["runs"] == {"preset": 50, "clip 1": 5}


def _run(curve, step_ms=1.0):
  """Records of a run: (step, val_loss) pairs, time = step × step_ms."""
  return {
    "records": [
      {"step": s, "val_loss": v, "train_time_s": s * step_ms / 1e3, "train_loss": v}
      for s, v in curve
    ]
  }


def test_fair_compare_measures_both_directions():
  fair = repro_fair
  bp = {"best": {"runs": [_run([(100, 1.0), (200, 0.5), (300, 0.4), (400, 0.45)])]}}
  # Forward never reaches bp's best (0.4); its best, 0.5 at step 400, bp had at step 200.
  fw = {"best": {"runs": [_run([(100, 1.2), (200, 0.8), (300, 0.6), (400, 0.5)], step_ms=2.0)]}}
  c = fair.compare(bp, fw)
  assert c["to_backprop_loss"]["n_reached"] == 0
  assert c["to_backprop_loss"]["target_val_loss"] == 0.4
  rev = c["backprop_to_forward_loss"]
  assert rev["iteration_factor"] == pytest.approx(2.0)  # 400 / 200
  assert rev["time_factor"] == pytest.approx(4.0)  # 0.8 s / 0.2 s
  # A forward run that does reach it: iterations ratio to bp's best step.
  fw2 = {"best": {"runs": [_run([(100, 0.9), (200, 0.6), (300, 0.45), (400, 0.39)])]}}
  c2 = fair.compare(bp, fw2)
  assert c2["to_backprop_loss"]["n_reached"] == 1
  assert c2["to_backprop_loss"]["step_ratio"] == pytest.approx(400 / 300)


def test_explosion_spikes_and_conditions():
  exp = repro_explosions
  # Index 3 (5.0 > 2 × 2.0) and index 5 (4.5 > 2 × 2.0) are spikes; None (diverged) is skipped.
  assert exp.spikes([3.0, 2.5, 2.0, 5.0, 3.9, 4.5, None], 2.0) == [3, 5]
  assert exp.spikes([2.0, 1.0, 0.5], 2.0) == []
  conds = exp.conditions(1.0, 1.0)
  assert list(conds) == ["none", "cap 1", "clip 1", "clip 1 + cap 1"]
  assert conds["none"] == ["optimizer.clip_norm=null", "estimator.max_jvp_norm=null"]
  assert exp.conditions(1.0, 0.5, "cap") == {
    "cap 0.5": ["optimizer.clip_norm=null", "estimator.max_jvp_norm=0.5"]
  }
  with pytest.raises(SystemExit, match="unknown"):
    exp.conditions(1.0, 1.0, "cap,clipp")
  runs = [
    {"diverged": True, "steps": 40, "val_loss": None, "spike_steps": [30], "summary_written": True},
    {"diverged": False, "steps": 100, "val_loss": 1.5, "spike_steps": [], "summary_written": True},
  ]
  s = exp.stats({"runs": runs})
  assert (s["n"], s["n_diverged"], s["diverged_at"], s["n_spiked"]) == (2, 1, [40], 1)
  assert s["val_loss_median"] == 1.5


@pytest.mark.slow
def test_explosions_sweep_goes_on_after_a_divergence(tiny_data, tmp_path):
  # An lr far too large without safeguards: every seed diverges, each job still writes
  # its summary and the sweep runs the next one.
  data_dir, _ = tiny_data
  exp = repro_explosions
  # --quick: lr 1e3, 2 seeds, 20 steps, no safeguard (condition "none"), SMALL, in process.
  doc = exp.main(["--quick", "--out", str(tmp_path), f"data.data_dir={data_dir}"])
  runs = doc["conditions"]["none"]["runs"]
  assert len(runs) == 2 and all(r["summary_written"] and r["diverged"] for r in runs)
  assert all(r["steps"] < 20 for r in runs) and not doc["conditions"]["none"]["failed_jobs"]
  assert "| none | 2 | 2 | 2 |" in (tmp_path / "explosions.md").read_text()


@pytest.mark.slow
def test_fair_tunes_each_method_and_compares(tiny_data, tmp_path):
  data_dir, _ = tiny_data
  fair = repro_fair
  # --quick: SGD, 20 steps, 4 evals, lr factors 1 and 3, SMALL, in process.
  doc = fair.main(["--quick", "--out", str(tmp_path), f"data.data_dir={data_dir}"])
  methods = doc["optimizers"]["sgd"]["methods"]
  assert set(methods) == {"bp", "fwd"}
  assert methods["bp"]["grid"] == [0.1, 0.3] and methods["fwd"]["grid"] == [0.000464, 0.00139]
  for t in methods.values():
    assert t["best"]["lr"] in t["grid"] and t["best"]["runs"][0]["steps"] == 20
  assert "optimizer.clip_norm=null" in methods["fwd"]["command"]
  assert "| sgd | backprop |" in (tmp_path / "fair.md").read_text()
