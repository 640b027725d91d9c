"""Tests of fwdgrad_jax.training.lr_search: the vmapped grid, the selection rule, the Hydra sweep.

The grid search is checked against gradient descent on f(x) = ½ a x², where everything is
known: after T steps x_T = (1 − lr·a)^T x_0, so lr = 1/a lands on the minimum in one
step (the best lr), lr > 2/a makes |x| grow geometrically (diverges), and a grid below
1/a has its best lr at the top edge.
"""

import json
import math
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fwdgrad_jax.training import lr_search

ROOT = Path(__file__).resolve().parents[1]
A = 4.0  # curvature: best lr 1/A = 0.25, divergence above 2/A = 0.5


def _quadratic(steps):
  def objective(lr, seed):
    x0 = 1.0 + jax.random.uniform(jax.random.key(seed))  # x0 in [1, 2): a per-seed start

    def step(x, _):
      return x - lr * A * x, None

    x, _ = jax.lax.scan(step, x0, None, length=steps)
    return 0.5 * A * x**2

  return objective


LRS = lr_search.log_grid(1e-3, 10.0, 41)  # ratio 10^0.1 between neighbours


def test_vmapped_search_finds_the_known_best_lr_within_one_grid_step():
  # Ten steps: the loss ½A x0² (1 − lr·A)^20 has one clear minimum at lr = 1/A (many
  # more steps would underflow every lr near it to exactly 0, a tie).
  res = lr_search.search(_quadratic(10), LRS, seeds=(0, 1, 2))
  ratio = LRS[1] / LRS[0]
  assert res.best_lr == pytest.approx(1 / A, rel=ratio - 1)
  assert not res.at_grid_edge
  assert res.seeds == (0, 1, 2) and len(res.values) == len(LRS) == len(res.curve)
  assert all(len(row) == 3 for row in res.values)
  assert res.best_loss == pytest.approx(res.curve[res.best_index])
  assert res.best_loss < min(c for i, c in enumerate(res.curve) if i != res.best_index)


def test_vmapped_search_flags_the_lrs_that_diverge():
  res = lr_search.search(_quadratic(1000), LRS, seeds=(0, 1, 2))
  # |1 − lr·A| > 1 ⇔ lr > 2/A: 1000 steps overflow float32 once lr·A ≥ 2.2 (1.2^1000);
  # below 2/A every run converges.
  for lr, row in zip(res.lrs, res.diverged):
    if lr * A >= 2.2:
      assert all(row), lr
      assert lr in res.diverged_lrs
    if lr * A <= 1.9:
      assert not any(row), lr
  assert all(lr > 2 / A for lr in res.diverged_lrs)
  assert all(v is None for row in res.values[-5:] for v in row)  # non-finite: no value


def test_search_reports_a_best_lr_at_the_grid_edge():
  lrs = lr_search.log_grid(1e-4, 1e-2, 5)  # all far below 1/A
  res = lr_search.search(_quadratic(50), lrs)
  assert res.best_lr == max(lrs) and res.at_grid_edge and res.diverged_lrs == ()


def test_summarize_prefers_lrs_that_never_diverged():
  # lr 0.3: lowest loss but one seed diverged → not usable while a stable lr exists.
  res = lr_search.summarize(
    [0.3, 0.1, 0.01],
    [0, 1],
    [[0.1, None], [0.5, 0.7], [0.9, 0.8]],
    [[False, True], [False, False], [False, False]],
    objective="best_val_loss",
    extra={"runs": [["a", "b"], ["c", "d"], ["e", "f"]]},
  )
  assert res.lrs == (0.01, 0.1, 0.3)  # ascending, rows and runs reordered with them
  assert res.values[2] == (0.1, None) and res.extra["runs"][0] == ["e", "f"]
  assert res.curve == (pytest.approx(0.85), pytest.approx(0.6), pytest.approx(0.1))
  assert res.best_lr == 0.1 and res.best_index == 1 and not res.at_grid_edge
  assert res.diverged_lrs == (0.3,)
  # When every lr diverged somewhere, the lowest loss still names the best.
  all_div = lr_search.summarize([0.1, 0.3], [0], [[0.5], [0.2]], [[True], [True]])
  assert all_div.best_lr == 0.3 and all_div.at_grid_edge
  nothing = lr_search.summarize([0.1], [0], [[math.inf]])
  assert nothing.best_lr is None and nothing.diverged == ((True,),)


def test_result_round_trips_through_json():
  res = lr_search.search(_quadratic(20), lr_search.log_grid(0.01, 1.0, 5), seeds=(0, 1))
  back = lr_search.LrSearch.from_dict(json.loads(json.dumps(res.as_dict())))
  assert back == res


def test_log_grid():
  assert lr_search.log_grid(1e-4, 1e-2, 3) == (1e-4, 1e-3, 1e-2)
  assert lr_search.log_grid(1e-5, 1e-3, 5) == (1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3)
  with pytest.raises(ValueError):
    lr_search.log_grid(0.0, 1.0, 3)


def test_sweep_command_composes_presets_and_the_grid(tmp_path):
  cmd = lr_search.sweep_command(
    "experiments/train.py",
    tmp_path,
    [1e-4, 0.01],
    seeds=[0, 1],
    presets=["baydin_logreg"],
    overrides=["estimator=backprop"],
    python="python",
  )
  assert cmd == [
    "python",
    "experiments/train.py",
    "-m",
    "+experiment=[baydin_logreg,lr_search_grid]",
    "estimator=backprop",
    "optimizer.lr=choice(0.0001,0.01)",
    "seed=choice(0,1)",
    f"hydra.sweep.dir={tmp_path}",
  ]


def _fake_job(sweep, num, lr, seed, curve, diverged=False, end=None):
  """A job directory as the app leaves it: summary.json and metrics.jsonl.

  ``curve``: validation losses at steps 10, 20, …; ``end``: the summary's val_loss after
  a last step beyond them (a run stopped between evaluations), else the last value.
  """
  job = sweep / str(num)
  (job / ".hydra").mkdir(parents=True)
  records = [{"step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(curve)]
  finite = [v for v in curve if math.isfinite(v)]
  summary = {
    "lr": lr,
    "seed": seed,
    "diverged": diverged,
    # What the search ranked by before the final/unstable rule: a test that passes on
    # that rule must fail here.
    "best_val_loss": min(finite) if finite else None,
    "val_loss": None if diverged else (end if end is not None else curve[-1]),
    "steps": 10 * len(curve) + (5 if end is not None else 0),
  }
  (job / "summary.json").write_text(json.dumps(summary))
  (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_read_sweep_of_a_multirun_directory(tmp_path):
  sweep = tmp_path / "sweep"
  _fake_job(sweep, 0, 0.1, 0, [1.0, 0.6, 0.5, 0.5, 0.5])
  _fake_job(sweep, 1, 0.01, 0, [1.0, 0.9, 0.8])
  _fake_job(sweep, 2, 1.0, 0, [1.0, 2.0], diverged=True)
  _fake_job(sweep, 10, 0.1, 1, [1.0, 0.8, 0.7], end=0.6)  # stopped after its last eval
  (sweep / "3" / ".hydra").mkdir(parents=True)  # a job that crashed before its summary
  (sweep / "optimization_results.yaml").write_text("best_params:\n  optimizer.lr: 0.1\n")
  res = lr_search.read_sweep(sweep)
  assert res.lrs == (0.01, 0.1, 1.0) and res.seeds == (0, 1)
  # Final = mean of the last 3 evaluations (the summary's end evaluation counts as one).
  assert res.values == (
    (pytest.approx(0.9), None),
    (pytest.approx(0.5), pytest.approx(0.7)),
    (pytest.approx(1.5), None),
  )
  assert res.best_lr == 0.1 and res.best_loss == pytest.approx(0.6)
  assert res.diverged_lrs == (1.0,) and res.objective == "final_val_loss"
  assert res.final_evals == 3 and res.unstable_ratio == 1.5 and res.unstable_lrs == ()
  assert res.extra["runs"][1] == [str(sweep / "0"), str(sweep / "10")]
  assert res.extra["failed_jobs"] == [str(sweep / "3")]
  assert res.extra["optuna"] == {"best_params": {"optimizer.lr": 0.1}}
  with pytest.raises(FileNotFoundError):
    lr_search.read_sweep(tmp_path / "sweep" / "3")


def test_read_sweep_passes_over_a_run_that_dips_and_blows_up(tmp_path):
  # lr 0.3 reaches the lowest validation loss of the grid (0.2) and then climbs to 0.5:
  # best-val ranking picks it; the final loss is 0.4 > 1.5 × 0.2, unstable, not eligible.
  sweep = tmp_path / "sweep"
  _fake_job(sweep, 0, 0.1, 0, [1.0, 0.6, 0.5, 0.45, 0.45])
  _fake_job(sweep, 1, 0.3, 0, [1.0, 0.2, 0.3, 0.4, 0.5])
  res = lr_search.read_sweep(sweep)
  assert res.best_lr == 0.1 and res.best_loss == pytest.approx(0.4667, abs=1e-4)
  assert res.unstable == ((False,), (True,)) and res.unstable_lrs == (0.3,)
  assert res.diverged_lrs == () and res.status(1) == "unstable"
  table = lr_search.markdown_table(res)
  assert "| 0.3 | 0.4 | 0.4 | unstable |" in table and "| 0.1 | 0.4667 |" in table
  assert "ok (chosen)" in table and "last 3 evaluations" in table
  assert lr_search.cells(res) == ["0.1: 0.4667*", "0.3: 0.4 (unstable)"]
  back = lr_search.LrSearch.from_dict(json.loads(json.dumps(res.as_dict())))
  assert back == res and res.as_dict()["unstable_lrs"] == [0.3]


def test_final_loss_and_is_unstable_on_synthetic_curves():
  nan = math.nan
  dip_and_blow_up = [2.0, 0.3, 0.9, 1.2, 1.5]
  steady = [2.0, 1.0, 0.8, 0.75, 0.7]
  assert lr_search.final_loss(dip_and_blow_up) == pytest.approx(1.2)
  assert lr_search.is_unstable(dip_and_blow_up) and not lr_search.is_unstable(steady)
  assert lr_search.score(dip_and_blow_up) == (pytest.approx(1.2), 0.3, False, True)
  # Fewer evaluations than `last`: the mean of those there are.
  assert lr_search.final_loss([0.9, 0.7]) == pytest.approx(0.8)
  assert lr_search.final_loss([0.5]) == 0.5 and not lr_search.is_unstable([0.5])
  assert lr_search.final_loss([]) is None and lr_search.final_loss([None]) is None
  # Exactly 1.5 × best is still stable (strictly above is not); `last` and `ratio` apply.
  assert not lr_search.is_unstable([2.0, 3.0, 3.0, 3.0])
  assert lr_search.is_unstable([2.0, 3.0, 3.0, 3.0], ratio=1.4)
  assert lr_search.final_loss(steady, last=1) == 0.7
  assert lr_search.is_unstable([1.0, 0.2, 0.2, 0.2, 0.31], last=1)
  assert not lr_search.is_unstable([1.0, 0.2, 0.2, 0.2, 0.31])  # mean of 3: 0.237
  # A non-finite evaluation: diverged (not "unstable"); the evaluations after it don't count.
  s = lr_search.score([1.0, 0.5, nan, 0.1])
  assert s.diverged and not s.unstable and s.final == pytest.approx(0.75) and s.best == 0.5
  assert lr_search.score([1.0, 0.5], diverged=True).diverged
  with pytest.raises(ValueError, match="last=0"):
    lr_search.final_loss(steady, last=0)


def test_the_rule_chooses_the_steady_run_over_dips_blow_ups_and_nans():
  nan = math.nan
  curves = {
    0.01: [[3.0, 2.0, 1.5, 1.2, 1.0], [3.0, 2.1, 1.6, 1.3, 1.1]],  # slow, steady
    0.1: [[3.0, 0.9, 0.7, 0.6, 0.55], [3.0, 1.0, 0.7, 0.65, 0.6]],  # steady
    # Dips lowest, blows up: loses on the final loss (and is unstable).
    0.3: [[3.0, 0.2, 0.5, 0.9, 1.5], [3.0, 0.25, 0.4, 0.8, 1.3]],
    # Lowest final loss of all, but ends far above its best in one seed: never chosen.
    1.0: [[3.0, 0.1, 0.1, 0.1, 0.1], [3.0, 0.1, 0.2, 0.2, 0.25]],
    3.0: [[3.0, 0.5, nan, nan, nan], [3.0, 0.4, 0.3, 0.3, 0.3]],  # one seed diverged
  }
  lrs = list(curves)
  res = lr_search.summarize_curves(lrs, [0, 1], [curves[lr] for lr in lrs])
  assert res.best_lr == 0.1 and res.best_loss == pytest.approx(0.6333, abs=1e-4)
  assert res.unstable_lrs == (0.3, 1.0) and res.diverged_lrs == (3.0,)
  assert res.curve[3] < res.curve[1]  # the unstable lr has the lowest final loss
  assert res.unstable[3] == (False, True) and res.diverged[4] == (True, False)
  assert [res.status(i) for i in range(5)] == ["ok", "ok", "unstable", "unstable", "diverged"]
  # No eligible lr: the unstable ones compete before the diverged ones.
  res = lr_search.summarize_curves(lrs[2:], [0, 1], [curves[lr] for lr in lrs[2:]])
  assert res.best_lr == 1.0
  # A run that did not run (None) has no value; nothing finite at all: no best lr.
  none = lr_search.summarize_curves([0.1, 0.3], [0], [[None], [[math.nan]]])
  assert none.best_lr is None and none.diverged == ((False,), (True,))


def test_search_scores_curves_by_the_same_rule():
  import jax.numpy as jnp

  steady = jnp.array([2.0, 1.0, 0.8, 0.75, 0.7])
  dip = jnp.array([2.0, 0.1, 0.4, 0.6, 0.8])  # the lowest best, unstable, worse final

  def objective(lr, seed):
    del seed
    return jnp.where(lr > 0.5, dip, jnp.where(lr > 2.0, jnp.nan, steady * (1 + lr)))

  res = lr_search.search(objective, [0.1, 0.3, 1.0], seeds=(0, 1), objective_name="val")
  assert res.best_lr == 0.1 and res.unstable_lrs == (1.0,) and res.final_evals == 3
  assert res.best_loss == pytest.approx(0.75 * 1.1, rel=1e-6)


@pytest.mark.slow
def test_optuna_grid_sweep_end_to_end(tiny_data, tmp_path):
  pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
  data_dir, _ = tiny_data
  overrides = [
    "data=fashion_mnist",
    f"data.data_dir={data_dir}",
    "data.val_size=64",
    "model.options.hidden=[32]",
    "estimator=backprop",
    "train.steps=20",
    "train.batch_size=16",
    "train.log_every=10",
    "train.eval_every=10",
    "train.progress=false",
  ]
  env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="1")
  res = lr_search.run_sweep(
    ROOT / "experiments" / "train.py",
    tmp_path / "sweep",
    # 1e8 diverges. Backprop at 0.1 and 1e8 are also runs of tests/test_train.py (the same
    # data, model and intervals): seed 0's jobs load their programs from JAX's cache.
    [0.1, 1e8],
    seeds=[0, 1],
    overrides=overrides,
    python=sys.executable,
    cwd=tmp_path,
    env=env,
    timeout=600,
  )
  assert res.lrs == (0.1, 1e8) and res.seeds == (0, 1)
  assert res.diverged == ((False, False), (True, True)) and res.diverged_lrs == (1e8,)
  assert res.best_lr == 0.1 and res.at_grid_edge
  assert all(np.isfinite(v) for v in res.values[0])
  assert res.extra["optuna"]["best_params"]["optimizer.lr"] == 0.1
  assert res.extra["command"][2:4] == ["-m", "+experiment=lr_search_grid"]
  for job in res.extra["runs"][0]:
    assert (Path(job) / "metrics.jsonl").exists()
  # Four jobs: the GridSampler ran the whole grid once, no more.
  assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == list("0123")


def test_draw_leaves_diverged_lrs_out_of_the_line():
  from fwdgrad_jax.training import records

  plt = records.pyplot()
  fig, ax = plt.subplots()
  res = lr_search.summarize(
    [0.1, 1.0, 10.0], [0], [[0.5], [0.2], [1e30]], [[False], [False], [True]]
  )
  lr_search.draw(ax, res.as_dict(), label="search")
  line, cross, star = ax.lines
  assert list(line.get_xdata()) == [0.1, 1.0] and list(line.get_ydata()) == [0.5, 0.2]
  assert list(cross.get_xdata()) == [10.0] and list(cross.get_ydata()) == [0.5]
  assert list(star.get_xdata()) == [1.0] and ax.get_xscale() == "log"
  plt.close(fig)
