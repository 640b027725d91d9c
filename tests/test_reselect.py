"""experiments/stability/reselect.py: the verdicts it gives searches with known answers.

Its --quick run (tests/test_experiment_scripts.py) only checks that files are written;
here each synthetic search (one per kind of stored data) must get the verdict the rule
implies, and a bound re-score must never claim "same" when another lr's best is below the
chosen lr's new final.
"""

from __future__ import annotations

from experiments.stability import reselect
from fwdgrad_jax.training import lr_search


def test_synthetic_searches_get_their_verdicts():
  rows = reselect.synthetic()
  assert {r["expect"] for r in rows} >= {"moved", "same", "undetermined", "moved (proxy)"}
  for r in rows:
    assert r["verdict"] == r["expect"], r["search"]
  full = rows[0]
  assert full["new_lr"] == 0.01 and full["unstable_lrs"] == [0.1]


def test_bound_is_a_bound():
  lrs, seeds = [0.01, 0.1], [0]
  old = lr_search.summarize(lrs, seeds, [[0.50], [0.45]], objective="best_val_loss").as_dict()
  # The chosen lr (0.1) ends at 0.55 > 0.01's best 0.50: 0.01 could win, so not "same".
  r = reselect.rescore_bound(old, [[1.0, 0.45, 0.55, 0.55, 0.55]])
  assert r["verdict"] == "undetermined" and r["contenders"] == [0.01]
  assert abs(r["chosen_final"] - 0.55) < 1e-12
  # It ends at 0.48 < 0.50: no other lr can end below it.
  r = reselect.rescore_bound(old, [[1.0, 0.45, 0.48, 0.48, 0.48]])
  assert r["verdict"] == "same" and r["new_lr"] == 0.1
