"""Smoke tests of the Baydin et al. 2022 Fig. 1 and Fig. 2 scripts (run in-process, --quick)."""

import json

import numpy as np
import pytest

from experiments.baydin2022 import fig1 as baydin2022_fig1
from experiments.baydin2022 import fig2 as baydin2022_fig2


def test_fig1_writes_the_png_and_consistent_numbers(tmp_path):
  baydin2022_fig1.main(["--out", str(tmp_path), "--seed", "1"])
  assert (tmp_path / "fig1_beale_samples.png").stat().st_size > 10_000
  rec = json.loads((tmp_path / "fig1_beale_samples.json").read_text())
  true = np.array(rec["true_gradient"])
  np.testing.assert_allclose(true, [-3.4339, -0.8079], atol=1e-3)  # ∇Beale at (1.5, −0.1)
  assert len(rec["samples"]) == 5
  for s in rec["samples"]:
    v, g = np.array(s["tangent"]), np.array(s["forward_gradient"])
    # Each sample is exactly (∇f·v) v, and a single-tangent forward gradient never points
    # away from ∇f: cos = |∇f·v| / (‖∇f‖ ‖v‖) ≥ 0.
    np.testing.assert_allclose(g, (true @ v) * v, rtol=1e-4, atol=1e-5)
    assert 0.0 <= s["cosine_to_true"] <= 1.0 + 1e-6
  mean = np.mean([s["forward_gradient"] for s in rec["samples"]], axis=0)
  np.testing.assert_allclose(rec["mean"], mean, rtol=1e-5)
  assert rec["provenance"]["command"].endswith("--seed 1")


def test_fig2_quick_writes_the_png_and_sane_numbers(tmp_path):
  argv = ["--quick", "--runs", "3", "--timing-reps", "3", "--out", str(tmp_path)]
  baydin2022_fig2.main(argv)
  assert (tmp_path / "fig2_test_functions.png").stat().st_size > 10_000
  rec = json.loads((tmp_path / "fig2_test_functions.json").read_text())
  assert set(rec["functions"]) == {"beale", "rosenbrock"}
  prov = rec["provenance"]
  assert prov["hardware"]["jax_version"] and "--quick" in prov["command"]
  for name, entry in rec["functions"].items():
    start = entry["start_loss"]
    assert start > 1.0, name
    fwd, bp = entry["methods"]["forward"], entry["methods"]["backprop"]
    for m in (fwd, bp):
      assert m["all_finite"], name
      assert m["final_loss"]["min"] <= m["final_loss"]["median"] <= m["final_loss"]["max"]
      assert m["seconds_per_iteration"] > 0
    # Even a few hundred steps take both methods well below the start.
    assert fwd["final_loss"]["max"] < 0.5 * start, name
    assert bp["final_loss"]["max"] < 0.5 * start, name
    # Backprop is deterministic: all its runs end at the same point.
    assert bp["final_loss"]["max"] == pytest.approx(bp["final_loss"]["min"], rel=1e-6)
    # The curves for the report: every run, at the sampled iterations, first and last kept.
    its = entry["curve_iterations"]
    assert its[0] == 0 and its[-1] == entry["iterations"] and its == sorted(set(its))
    for m in (fwd, bp):
      assert len(m["losses"]) == 3 and all(len(run) == len(its) for run in m["losses"])
      # The sampled curves end at the final losses (kept to 5 significant digits).
      last = [run[-1] for run in m["losses"]]
      assert min(last) == pytest.approx(m["final_loss"]["min"], rel=1e-4)
      assert len(m["trajectories"][0]) == len(its) and len(m["trajectories"][0][0]) == 2
  # The report alone redraws the figure from the JSON.
  again = tmp_path / "again"
  baydin2022_fig2.main(
    ["--report-only", str(tmp_path / "fig2_test_functions.json"), "--out", str(again)]
  )
  assert (again / "fig2_test_functions.png").stat().st_size > 10_000
