"""Tests of the training loop (fwdgrad_jax.training.run), the config schema and the Hydra app.

All runs use the tiny tfds-prepared data set of conftest.py and a small MLP. Most of a
run's time is compiling its chunk, base-time, evaluation and gradient-check programs;
JAX's persistent cache (conftest.py) shares them between runs whose programs are the
same. So runs whose point is not the estimator or the optimizer use one of a few configs
(``_cfg``'s default forward estimator, backprop at lr 0.1 or 1e8, forward k = 2 with
Adam), and the gradient check (a program of its own) runs only where a test reads it.

The app's behaviour (exit codes, one-line errors) is tested through its command line: in a
subprocess, as a user runs it, where the process itself is under test (a fast refusal, a
signal, a lock held by another process; the signal test and tests/test_lr_search.py's
sweep are also runs that train in a process of their own), and otherwise in this process
(the ``app_here`` fixture: the same ``sys.argv``, exit code and output, without paying
the Python start, jax import and compiles of a new process for every run).
"""

import contextlib
import dataclasses
import errno
import io
import json
import logging
import logging.config
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from fwdgrad_jax import models, registry
from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import run as run_lib
from fwdgrad_jax.training import rundir
from fwdgrad_jax.training import steps as steps_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
SMALL_MLP = {"hidden": [32]}
STATEFUL_MLP = {"hidden": [32], "batch_norm": True, "dropout": 0.2}


def _cfg(data_dir, **sections):
  cfg = config_lib.Config()
  cfg.data = config_lib.DataConfig(name="fashion_mnist", data_dir=str(data_dir), val_size=64)
  cfg.model = config_lib.ModelConfig(name="mlp", options=dict(SMALL_MLP))
  cfg.train = config_lib.TrainConfig(
    steps=40, batch_size=16, log_every=10, eval_every=20, progress=False
  )
  for section, values in sections.items():
    for key, value in values.items():
      setattr(getattr(cfg, section), key, value)
  return cfg


def _records(run_dir):
  return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _summary(run_dir):
  return json.loads((Path(run_dir) / "summary.json").read_text())


def _ckpt_steps(run_dir):
  return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


def _restore(run_dir):
  mngr = ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints")
  restored = mngr.restore(mngr.latest_step())
  mngr.close()
  return restored


def _snapshot(run_dir):
  """Every file under run_dir with its bytes and mtime: to prove nothing was touched."""
  return {
    p.relative_to(run_dir): (p.read_bytes(), p.stat().st_mtime_ns)
    for p in sorted(Path(run_dir).rglob("*"))
    if p.is_file()
  }


# ---- the loop -----------------------------------------------------------------------


@pytest.mark.parametrize(
  "estimator",
  [
    {"name": "backprop"},
    {"name": "forward"},  # (orthogonal aggregation: test_where_tangents_enter_…[rank1])
  ],
)
def test_a_run_writes_metrics_summary_and_checkpoint(tiny_data, tmp_path, estimator):
  data_dir, ds = tiny_data
  optimizer = {"lr": 0.1} if estimator["name"] == "backprop" else {}  # forward: the default
  train = {"steps": 60, "grad_check_every": 20}
  cfg = _cfg(data_dir, estimator=estimator, optimizer=optimizer, train=train)
  summary = run_lib.train(cfg, tmp_path, dataset=ds)
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
  assert all(np.isfinite(r["train_loss"]) for r in records)
  evals = [r for r in records if "val_loss" in r]
  assert [r["step"] for r in evals] == [20, 40, 60]
  assert all(0 <= r["val_accuracy"] <= 1 for r in evals)
  checks = [r for r in records if "cosine_to_true_grad" in r]
  assert [r["step"] for r in checks] == [20, 40, 60]
  # Every evaluation logs the parameters' norm, every check the estimate's length ratio.
  assert [r["step"] for r in records if "param_norm" in r] == [20, 40, 60]
  assert all(r["param_norm"] > 0 and np.isfinite(r["grad_norm_ratio"]) for r in checks)
  # The lr searches' rule, in the summary: mean of the last 3 evaluations (the end's is 60's).
  assert summary["final_val_loss"] == pytest.approx(np.mean([r["val_loss"] for r in evals]))
  assert summary["final_evals"] == 3 and summary["unstable"] is False
  for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy", "step_time_ms"):
    assert summary[key] is not None and np.isfinite(summary[key]), key
  assert not (summary["diverged"] or summary["interrupted"] or summary["stopped_on_time"])
  assert summary["steps"] == 60 and summary["error"] is None
  assert summary["num_params"] == 784 * 32 + 32 + 32 * 10 + 10
  assert summary["runtime_ratio"] == pytest.approx(
    summary["step_time_ms"] / summary["base_time_ms"]
  )
  assert summary["provenance"]["command"]
  assert _summary(tmp_path)["test_loss"] == summary["test_loss"]
  # The default checkpoint_every=0 still leaves a checkpoint at the end, and no lock.
  assert _ckpt_steps(tmp_path) == [60]
  assert not (tmp_path / rundir.LOCK_NAME).exists()
  assert json.loads((tmp_path / "config.json").read_text()) == config_lib.to_dict(cfg)
  if estimator["name"] == "backprop":
    # jax.grad against itself, and the labels are learnable: the loss falls.
    assert all(r["cosine_to_true_grad"] == pytest.approx(1.0, abs=1e-5) for r in checks)
    assert all(r["grad_norm_ratio"] == pytest.approx(1.0, abs=1e-5) for r in checks)
    assert records[-1]["train_loss"] < records[0]["train_loss"]


@pytest.mark.parametrize(
  "estimator",
  [
    {"name": "forward", "tangents": "rank1", "num_tangents": 4, "aggregation": "orthogonal"},
    {"name": "forward", "perturbation": "activity", "num_tangents": 2, "rescale": True},
    {"name": "guided", "fix_gap": 5, "decrease_gap": 5, "decay_rate": 1.0},
    {"name": "forward", "num_tangents": 2, "regenerate": True},
  ],
  ids=["rank1", "activity", "guided", "regenerate"],
)
def test_where_tangents_enter_and_guided_train_through_the_loop(tiny_data, tmp_path, estimator):
  data_dir, ds = tiny_data
  lr = 1e-5 if estimator["name"] == "guided" else 0.05
  train = {"steps": 40, "grad_check_every": 20}
  cfg = _cfg(data_dir, estimator=estimator, optimizer={"lr": lr}, train=train)
  summary = run_lib.train(cfg, tmp_path, dataset=ds)
  records = _records(tmp_path)
  checks = [r["cosine_to_true_grad"] for r in records if "cosine_to_true_grad" in r]
  assert len(checks) == 2 and all(np.isfinite(checks))
  # Every check logs the true gradient's norm too.
  norms = [r["true_grad_norm"] for r in records if "cosine_to_true_grad" in r]
  assert len(norms) == 2 and all(np.isfinite(norms)) and all(n > 0 for n in norms)
  if estimator.get("perturbation") != "activity":
    # (∇f·v)v, and its projections, never point uphill: cos ≥ 0 by construction.
    assert all(c > 0 for c in checks)
  assert not summary["diverged"] and np.isfinite(summary["test_loss"])
  if estimator["name"] == "guided":
    assert summary["true_grads"] == 8  # steps 0, 5, …, 35
  else:
    assert summary["perturbation"] == estimator.get("perturbation", "weights")
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_the_length_ratio_is_one_where_the_estimate_is_the_gradient(tiny_data, tmp_path):
  # Activity perturbation of an MLP 784-4-10: per example, 4 and 10 activities per layer.
  # k = 16 ≥ both with the orthogonal projection spans every activity direction, so the
  # estimate is the true gradient: ratio 1 and cosine 1 to float precision (the app's
  # default rescale leaves an exact projection as it is).
  data_dir, ds = tiny_data
  est = {"name": "forward", "perturbation": "activity", "num_tangents": 16}
  est["aggregation"] = "orthogonal"
  train = {"steps": 40, "grad_check_every": 20}
  cfg = _cfg(data_dir, model={"options": {"hidden": [4]}}, estimator=est, train=train)
  run_lib.train(cfg, tmp_path, dataset=ds)
  checks = [r for r in _records(tmp_path) if "grad_norm_ratio" in r]
  assert [r["step"] for r in checks] == [20, 40]
  for r in checks:
    assert r["grad_norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert r["cosine_to_true_grad"] == pytest.approx(1.0, abs=1e-5)
    assert r["param_norm"] > 0


def test_the_gradient_check_reports_the_true_gradients_norm():
  # f(w) = mean_i w·x_i: ∇f = mean_i x_i exactly, so ‖∇f‖ is known without jax.grad.
  x = jnp.arange(12.0).reshape(4, 3)
  loss = lambda params, x, y: jnp.mean(x @ params["w"])
  check = steps_lib.make_grad_check_fn(loss, config_lib.EstimatorConfig(name="backprop"))
  cos, ratio, norm, _ = check({"w": jnp.ones(3)}, jax.random.PRNGKey(0), x, jnp.zeros(4))
  assert float(norm) == pytest.approx(float(jnp.linalg.norm(x.mean(0))), rel=1e-6)
  assert float(cos) == pytest.approx(1.0) and float(ratio) == pytest.approx(1.0)


def _scales(tx, state, n):
  out = []
  for _ in range(n):
    updates, state = tx.update({"w": jnp.ones(())}, state)
    out.append(float(updates["w"]))
  return out, state


def test_budget_schedule_is_a_cosine_of_the_clock_or_the_steps_whichever_is_further():
  tx = steps_lib.budget_schedule(total_steps=1000)
  state = steps_lib.set_budget_clock(tx.init({"w": jnp.ones(())}), 25.0, 0.5, 100.0)
  scales, state = _scales(tx, state, 3)
  # Between clock readings the time fraction advances by step time / budget per update.
  expected = [0.5 * (1 + np.cos(np.pi * (0.25 + i * 0.005))) for i in range(3)]
  np.testing.assert_allclose(scales, expected, rtol=1e-5)
  assert float(state.budget_scale) == pytest.approx(expected[-1], rel=1e-5)
  # No clock (rate 0, progress 0): the step count's fraction ends the schedule instead.
  tx = steps_lib.budget_schedule(total_steps=4)
  scales, _ = _scales(tx, tx.init({"w": jnp.ones(())}), 6)
  np.testing.assert_allclose(scales, [1.0, 0.8535534, 0.5, 0.1464466, 0.0, 0.0], atol=1e-6)
  # Warmup: linear from 0 over warmup_steps, times the cosine.
  tx = steps_lib.budget_schedule(total_steps=1000, warmup_steps=4)
  scales, _ = _scales(tx, tx.init({"w": jnp.ones(())}), 5)
  cos = [0.5 * (1 + np.cos(np.pi * i / 1000)) for i in range(5)]
  np.testing.assert_allclose(scales, [0, 0.25 * cos[1], 0.5 * cos[2], 0.75 * cos[3], cos[4]], 1e-5)
  with pytest.raises(ValueError, match="total_steps"):
    steps_lib.budget_schedule(total_steps=0)


def test_budget_schedule_has_one_shape_at_n_and_2n_steps_per_budget():
  # The same 10 s budget run at 0.1 s and at 0.05 s per step (a quiet machine: 2x the
  # steps), the clock read every 10 steps: the lr at each fraction of the budget agrees.
  def run(step_time, steps):
    tx = steps_lib.budget_schedule(total_steps=10**6)
    state, scales = tx.init({"w": jnp.ones(())}), []
    for chunk in range(steps // 10):
      t = chunk * 10 * step_time
      state = steps_lib.set_budget_clock(state, t, step_time if chunk else 0.0, 10.0)
      s, state = _scales(tx, state, 10)
      scales += s
    return np.array(scales)

  slow, fast = run(0.1, 100), run(0.05, 200)
  np.testing.assert_allclose(fast[20::20], slow[10::10], atol=1e-5)
  assert fast[-1] < 0.01 and slow[-1] < 0.01  # both end decayed, at different step counts


def test_a_schedule_with_a_time_budget_decays_over_the_budget(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  train = {"steps": 10**6, "time_budget_s": 1.0, "eval_every": 0}
  cfg = _cfg(data_dir, train=train, estimator={"name": "backprop"})
  cfg.optimizer.lr, cfg.optimizer.schedule = 0.1, "cosine"
  summary = run_lib.train(cfg, tmp_path, dataset=ds)
  lrs = [r["lr"] for r in _records(tmp_path)]
  assert summary["stopped_on_time"] and len(lrs) >= 3
  # Over train.steps (10^6) the lr would stay ~0.1 all run; over the budget it ends near 0.
  assert lrs[0] == pytest.approx(0.1, rel=1e-3)  # the first chunk has no step time yet
  assert lrs[-1] < 0.03 and all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_a_run_shorter_than_one_chunk_is_timed(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  cfg = _cfg(
    data_dir,
    estimator={"name": "backprop"},
    optimizer={"lr": 0.1},
    train={"steps": 7, "eval_every": 0},
  )
  summary = run_lib.train(cfg, tmp_path, dataset=ds)
  assert summary["steps"] == 7
  assert summary["step_time_ms"] > 0 and summary["runtime_ratio"] > 0


def test_divergence_stops_keeps_metrics_and_reports(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  # Backprop at 1e8: tests/test_lr_search.py's diverging lr (one program for both).
  cfg = _cfg(
    data_dir,
    estimator={"name": "backprop"},
    optimizer={"lr": 1e8},
    train={"steps": 200, "checkpoint_every": 10},
  )
  summary = run_lib.train(cfg, tmp_path, dataset=ds)
  assert summary["diverged"] is True
  assert summary["steps"] < 200
  assert summary["val_loss"] is None and summary["test_loss"] is None
  assert _summary(tmp_path)["diverged"] is True
  records = _records(tmp_path)
  assert records[-1]["diverged"] is True
  assert all(r["train_loss"] is None or np.isfinite(r["train_loss"]) for r in records)
  # The last good checkpoint stays; no checkpoint holds the non-finite state.
  assert all(s <= summary["steps"] for s in _ckpt_steps(tmp_path))


@pytest.mark.slow
def test_resume_continues_bit_identically(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  # 30 steps of 16 on 256 examples cross an epoch boundary (16 steps per epoch).
  opts = {"estimator": {"num_tangents": 2}, "optimizer": {"lr": 0.01, "name": "adam"}}
  whole = tmp_path / "whole"
  run_lib.train(_cfg(data_dir, train={"steps": 40}, **opts), whole, dataset=ds)
  parts = tmp_path / "parts"
  first = run_lib.train(_cfg(data_dir, train={"steps": 30}, **opts), parts, dataset=ds)
  assert first["steps"] == 30
  before = _records(parts)
  resumed = run_lib.train(_cfg(data_dir, train={"steps": 40}, **opts), parts, dataset=ds)
  assert resumed["steps"] == 40
  # It resumed rather than restarted: the records up to the checkpoint are kept as written.
  assert _records(parts)[: len(before)] == before
  strip = lambda rs: [{k: v for k, v in r.items() if k != "train_time_s"} for r in rs]
  assert strip(_records(parts)) == strip(_records(whole))
  a, b = _restore(whole), _restore(parts)
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
    np.testing.assert_array_equal(x, y)
  assert resumed["test_loss"] == _summary(whole)["test_loss"]


def test_resume_refuses_a_changed_config_naming_the_key_and_touches_nothing(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  run_lib.train(_cfg(data_dir, train={"steps": 10}), tmp_path, dataset=ds)
  before = _snapshot(tmp_path)
  changed = _cfg(data_dir, optimizer={"lr": 0.5}, train={"steps": 20})
  with pytest.raises(config_lib.ConfigError, match=r"^optimizer\.lr: 0\.5 differs from 0\.2"):
    run_lib.train(changed, tmp_path, dataset=ds)
  assert _snapshot(tmp_path) == before


# ---- models with state (BatchNorm, Dropout) ------------------------------------------


def _stateful_setup(seed=0):
  model = models.create(
    "mlp", input_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(seed), **STATEFUL_MLP
  )
  graphdef, params, rest = models.split(model)
  x = jax.random.normal(jax.random.key(1), (16, 28, 28, 1))
  y = jnp.arange(16) % 10
  return graphdef, params, rest, x, y


@pytest.mark.parametrize("estimator", ["backprop", "forward"])
def test_consecutive_steps_see_different_dropout_masks(estimator):
  graphdef, params, rest, x, y = _stateful_setup()
  loss = steps_lib.make_stateful_loss(graphdef)
  # lr 0: the parameters stay put, so only the threaded model state can change the loss.
  tx = optax.chain(
    registry.gradient_transform(estimator, key=jax.random.PRNGKey(0), has_aux=True),
    optax.sgd(0.0),
  )
  step = jax.jit(steps_lib.make_step_fn(loss, tx))
  s1 = step(steps_lib.init_state(tx, params, rest), x, y)
  s2 = step(s1, x, y)
  value = lambda s: float(optax.tree_utils.tree_get(s.opt_state, "value"))
  assert value(s1) != value(s2)
  assert jax.tree.structure(s2.model_state) == jax.tree.structure(rest)
  counts = [l for p, l in jax.tree_util.tree_leaves_with_path(s2.model_state) if "count" in str(p)]
  assert [int(c) for c in counts] == [2]  # one dropout draw per step, threaded


def test_evaluation_runs_in_eval_mode():
  graphdef, params, rest, x, y = _stateful_setup()
  # (Jitted: run eagerly, every op of the forward pass compiles a program of its own.)
  train_apply = jax.jit(models.apply_with_state_fn(graphdef))
  _, trained_rest = train_apply(params, rest, x)  # running averages move off their init
  eval_apply = jax.jit(models.apply_with_state_fn(models.eval_graphdef(graphdef, params, rest)))
  evaluate = jax.jit(steps_lib.make_eval_fn(eval_apply, batch_size=8))
  first = evaluate(params, x, y, trained_rest)
  assert [float(v) for v in first] == [float(v) for v in evaluate(params, x, y, trained_rest)]
  # Eval mode reads the running averages: other statistics, other loss. Train mode would
  # use the batch statistics and ignore them.
  assert float(evaluate(params, x, y, rest)[0]) != float(first[0])
  logits, new_rest = eval_apply(params, trained_rest, x)
  for a, b in zip(jax.tree.leaves(new_rest), jax.tree.leaves(trained_rest), strict=True):
    if not jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      np.testing.assert_array_equal(a, b)  # evaluation changes no state


def test_a_stateful_model_trains_and_checkpoints_its_state(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  cfg = lambda steps: _cfg(
    data_dir,
    model={"options": dict(STATEFUL_MLP)},
    estimator={"name": "backprop"},
    optimizer={"lr": 0.1},
    train={"steps": steps},
  )

  def saved_state(name):
    leaves = jax.tree_util.tree_leaves_with_path(_restore(tmp_path)["model_state"])
    return next(v for p, v in leaves if name in jax.tree_util.keystr(p))

  summary = run_lib.train(cfg(40), tmp_path, dataset=ds)
  assert summary["val_loss"] is not None and summary["test_accuracy"] is not None
  records = _records(tmp_path)
  assert records[-1]["train_loss"] < records[0]["train_loss"]
  assert int(saved_state("count")) == 40  # the dropout stream advanced once per step
  assert float(jnp.abs(saved_state("mean")).max()) > 0  # BatchNorm's running mean moved
  # A resumed run restores that state and goes on threading it.
  assert run_lib.train(cfg(50), tmp_path, dataset=ds)["steps"] == 50
  assert int(saved_state("count")) == 50


# ---- stopping: interrupts, time budget ----------------------------------------------


def test_sigint_finishes_the_chunk_checkpoints_summarizes_and_resumes(
  tiny_data, tmp_path, monkeypatch
):
  data_dir, ds = tiny_data
  write = rundir.MetricsLog.write

  def write_then_interrupt(self, record):
    write(self, record)
    if record["step"] == 20:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered to this (main) thread

  monkeypatch.setattr(rundir.MetricsLog, "write", write_then_interrupt)
  cfg = _cfg(data_dir, train={"steps": 10_000, "eval_every": 0})
  summary = run_lib.train(cfg, tmp_path, dataset=ds)
  assert summary["interrupted"] is True and summary["interrupted_by"] == "SIGINT"
  assert summary["steps"] == 20 and _summary(tmp_path)["interrupted"] is True
  assert _ckpt_steps(tmp_path) == [20]  # with the default checkpoint_every=0
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
  monkeypatch.setattr(rundir.MetricsLog, "write", write)
  resumed = run_lib.train(
    _cfg(data_dir, train={"steps": 40, "eval_every": 0}), tmp_path, dataset=ds
  )
  assert resumed["steps"] == 40 and resumed["interrupted"] is False
  assert [r["step"] for r in _records(tmp_path)] == [10, 20, 30, 40]


def test_time_budget_stops_the_run_and_says_so(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  cfg = _cfg(data_dir, train={"steps": 1000, "time_budget_s": 1e-6, "eval_every": 0})
  summary = run_lib.train(cfg, tmp_path, dataset=ds)
  # Checked between chunks: the first chunk of 10 steps exceeds any tiny budget.
  assert summary["stopped_on_time"] is True and summary["steps"] == 10
  assert summary["train_time_s"] > 1e-6 and summary["time_budget_s"] == 1e-6
  assert summary["val_loss"] is not None  # a budgeted run is evaluated like a finished one
  assert _ckpt_steps(tmp_path) == [10]
  assert [r["step"] for r in _records(tmp_path)] == [10]


# ---- a run directory nothing can corrupt ---------------------------------------------


def test_a_run_on_a_locked_directory_is_refused_at_once(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  with rundir.lock(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(rundir.RunDirLocked, match=str(tmp_path)):
      run_lib.train(_cfg(data_dir), tmp_path, dataset=ds)
    assert time.perf_counter() - t0 < 5
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.json").exists()


# orbax leaves the coroutines of a failed restore to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_falls_back_past_damaged_checkpoints(tiny_data, tmp_path, caplog):
  data_dir, ds = tiny_data
  cfg = lambda steps: _cfg(
    data_dir, train={"steps": steps, "checkpoint_every": 10, "eval_every": 0}
  )
  run_lib.train(cfg(30), tmp_path, dataset=ds)
  assert _ckpt_steps(tmp_path) == [20, 30]
  files = [p for p in (tmp_path / "checkpoints" / "30").rglob("*") if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  (tmp_path / "checkpoints" / "40").mkdir()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4')  # a run killed while writing
  with caplog.at_level(logging.WARNING):
    summary = run_lib.train(cfg(50), tmp_path, dataset=ds)
  assert summary["steps"] == 50
  notes = [r.message for r in caplog.records if r.levelno >= logging.WARNING]
  assert any("/40: skipped" in m for m in notes) and any("/30: skipped" in m for m in notes)
  assert any("half-written last line" in m for m in notes)
  assert all("\n" not in m for m in notes)
  # Resumed from 20: the metrics are exactly one record per step, in order.
  assert [r["step"] for r in _records(tmp_path)] == [10, 20, 30, 40, 50]


def test_disk_full_surfaces_at_once_keeps_metrics_and_writes_the_summary(
  tiny_data, tmp_path, monkeypatch
):
  data_dir, ds = tiny_data
  save = ocp.CheckpointManager.save

  def save_until_full(self, step, *args, **kwargs):
    if step >= 20:
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_full)
  cfg = _cfg(data_dir, train={"steps": 100, "checkpoint_every": 10, "eval_every": 0})
  with pytest.raises(rundir.RunDirError) as err:
    run_lib.train(cfg, tmp_path, dataset=ds)
  message = str(err.value)
  assert str(tmp_path / "checkpoints") in message and "disk full" in message
  assert "\n" not in message
  summary = _summary(tmp_path)
  assert summary["steps"] == 20 and summary["error"] == message  # stopped at the failing save
  assert [r["step"] for r in _records(tmp_path)] == [10, 20]
  assert _ckpt_steps(tmp_path) == [10]


@pytest.mark.parametrize(
  "bad, message",
  [
    ({"data": {"val_size": 1000}}, r"^data\.val_size=1000: must be smaller than the 320"),
    ({"train": {"batch_size": 100_000}}, r"^train\.batch_size=100000: larger than"),
    ({"data": {"name": "mnist"}}, r"data\.download=false"),
  ],
)
def test_a_run_that_failed_its_checks_does_not_block_its_corrected_rerun(
  tiny_data, tmp_path, bad, message
):
  data_dir, _ = tiny_data
  with pytest.raises((config_lib.ConfigError, run_lib.data_lib.DatasetUnavailableError)) as err:
    run_lib.train(_cfg(data_dir, **bad), tmp_path)
  assert err.match(message)
  assert not (tmp_path / "config.json").exists()
  summary = run_lib.train(_cfg(data_dir, train={"steps": 10}), tmp_path)
  assert summary["steps"] == 10


# ---- config --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "section, key, value",
  [
    ("estimator", "num_tangents", 0),
    ("estimator", "aggregation", "median"),
    ("estimator", "tangents", "sobol"),
    ("estimator", "name", "adjoint"),
    ("optimizer", "lr", -1.0),
    ("optimizer", "name", "lbfgs"),
    ("optimizer", "momentum", 1.5),
    ("train", "steps", 0),
    ("train", "batch_size", -4),
    ("train", "time_budget_s", 0.0),
    ("data", "name", "imagenet"),
    ("model", "name", "resnet1000"),
  ],
)
def test_validate_names_the_bad_key(section, key, value):
  cfg = config_lib.Config()
  setattr(getattr(cfg, section), key, value)
  with pytest.raises(config_lib.ConfigError, match=f"^{section}.{key}={value!r}"):
    config_lib.validate(cfg)


def test_every_registered_estimator_is_a_valid_name():
  for name in registry.ESTIMATORS:
    config_lib.validate(config_lib.Config(estimator=config_lib.EstimatorConfig(name=name)))


def test_bad_model_option_fails_before_data_loading(tmp_path):
  cfg = config_lib.Config()
  cfg.data.data_dir = str(tmp_path / "nothing-here")
  cfg.model.options = {"widht": 3}
  with pytest.raises(config_lib.ConfigError, match="widht"):
    run_lib.train(cfg, tmp_path / "run")


def test_unknown_keys_name_the_closest_known_key():
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.from_dict({"estimator": {"num_tangent": 2}, "train": {"checkpoint_evry": 1}})
  assert str(err.value).startswith(
    "estimator.num_tangent: unknown key; did you mean estimator.num_tangents?"
  )
  assert "train.checkpoint_evry (did you mean train.checkpoint_every?)" in str(err.value)
  assert config_lib.from_dict({"optimizer": {"lr": 0.5}}).optimizer.lr == 0.5


@pytest.mark.parametrize(
  "override, line",
  [
    ("estimator.num_tangents=1.5", "estimator.num_tangents=1.5: Value '1.5' of type 'float'"),
    ("seed=abc", "seed=abc: Value 'abc'"),
    ("model=resnet1000", "model=resnet1000: no such model config; use one of cnn"),
    ("train.checkpoint_evry=100", "train.checkpoint_evry: unknown key; did you mean train.che"),
    ("+optimizer.decay_rate=0.1", "optimizer.decay_rate: unknown key; did you mean optimizer.d"),
  ],
)
def test_compose_reports_hydra_errors_in_one_line_naming_the_key(override, line):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.compose([override], config_dir=CONFIG_DIR)
  assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_every_preset_composes_and_validates():
  presets = sorted(
    p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if p.stem != "lr_search"
  )
  assert len(presets) >= 18
  for preset in presets:
    cfg = config_lib.compose([f"+experiment={preset}"], config_dir=CONFIG_DIR)
    assert cfg.train.batch_size == 64, preset
    if preset.startswith(("baydin_", "repro_", "yao_")) and cfg.estimator.name != "backprop":
      # The papers' lrs are for the raw estimate: rescaled, Baydin's 1e-4 learned nothing.
      assert cfg.estimator.rescale is False, preset
  repro = config_lib.compose(["+experiment=repro_nn_mnist_adam_fwd"], config_dir=CONFIG_DIR)
  assert (repro.optimizer.name, repro.optimizer.lr, repro.optimizer.b1) == ("adam", 5e-4, 0.99)
  assert repro.estimator.max_jvp_norm == 1.0


# ---- the Hydra app, as a user runs it ----------------------------------------------


def _app(*overrides, cwd, **kwargs):
  env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
  return subprocess.run(
    [sys.executable, str(ROOT / "experiments" / "train.py"), *overrides],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=env,
    timeout=600,
    **kwargs,
  )


@dataclasses.dataclass
class _Ran:
  """What a test reads of a finished run of the app (as of ``subprocess.CompletedProcess``)."""

  returncode: int
  stdout: str
  stderr: str


@pytest.fixture
def app_here(monkeypatch):
  """``app_here(*overrides, cwd=...)``: ``python experiments/train.py *overrides`` in this process.

  The script runs as ``__main__`` (``runpy``), as from the command line: fresh module
  state, and Hydra finds ``configs/`` next to the file.
  """
  app = ROOT / "experiments" / "train.py"

  def run(*overrides, cwd):
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(app), *overrides])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # as _app: the app rewords Hydra's errors
    # What the app sets up for its process, put back after each run.
    monkeypatch.setattr(logging, "raiseExceptions", logging.raiseExceptions)
    # Hydra's logging.config.dictConfig closes every handler of the process, and absl's
    # then closes the stream it was made with (pytest's captured stderr): here it only
    # forgets them (the run's own handlers are closed below).
    monkeypatch.setattr(logging.config, "_clearExistingHandlers", logging._handlers.clear)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
      # Hydra's console handler binds sys.stdout when the run configures logging.
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        runpy.run_path(str(app), run_name="__main__")
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
      for h in root.handlers:
        if h not in handlers:
          h.close()  # train.log
      root.handlers[:] = handlers
      root.setLevel(level)
    return _Ran(code, out.getvalue(), err.getvalue())

  return run


def _app_overrides(data_dir):
  return [
    "data=fashion_mnist",
    f"data.data_dir={data_dir}",
    "data.val_size=64",
    "model.options.hidden=[32]",
    "train.steps=20",
    "train.batch_size=16",
    "train.log_every=10",
    "train.eval_every=20",
    "train.progress=false",
  ]


def _one_error_line(out):
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith("error: ")
  return lines[0].removeprefix("error: ")


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["forward", "backprop"])
def test_app_runs_each_estimator_and_logs_to_train_log(tiny_data, tmp_path, app_here, estimator):
  data_dir, _ = tiny_data
  run_dir = tmp_path / "run"
  args = [*_app_overrides(data_dir), f"estimator={estimator}", f"hydra.run.dir={run_dir}"]
  if estimator == "backprop":
    args.append("optimizer.lr=0.1")  # the lr of the other backprop runs (their programs)
  out = app_here(*args, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = _summary(run_dir)
  assert summary["estimator"] == estimator and summary["steps"] == 20
  assert f"{estimator}: steps 20" in out.stdout
  log_text = (run_dir / "train.log").read_text()
  assert "step 10, train_loss" in log_text and f"{estimator}: steps 20" in log_text
  assert (run_dir / ".hydra" / "overrides.yaml").is_file()


@pytest.mark.parametrize(
  "overrides, line",
  [
    (["estimator.num_tangents=0"], "estimator.num_tangents=0: must be an integer >= 1"),
    (["estimator.num_tangents=1.5"], "estimator.num_tangents=1.5: Value '1.5'"),
    (["seed=abc"], "seed=abc: Value 'abc'"),
    (["model=resnet1000"], "model=resnet1000: no such model config"),
    (
      ["+optimizer.decay_rate=0.1", "+train.checkpoint_evry=100", "train.steps=50"],
      "optimizer.decay_rate: unknown key; did you mean optimizer.decay? Also unknown: "
      "train.checkpoint_evry (did you mean train.checkpoint_every?)",
    ),
  ],
)
def test_app_rejects_a_bad_value_fast_with_one_clear_line(tmp_path, app_here, overrides, line):
  t0 = time.perf_counter()
  # The first in a new process: it must fail before jax and the data load.
  app = _app if overrides == ["estimator.num_tangents=0"] else app_here
  out = app(*overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
  assert out.returncode == 2
  assert _one_error_line(out).startswith(line)
  assert not (tmp_path / "run" / "metrics.jsonl").exists()
  assert not (tmp_path / "run" / "config.json").exists()
  assert time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_app_bad_data_values_then_a_plain_rerun(tiny_data, tmp_path, app_here):
  data_dir, _ = tiny_data
  run = f"hydra.run.dir={tmp_path / 'run'}"
  base = _app_overrides(data_dir)
  out = app_here(*base, "data.val_size=1000", run, cwd=tmp_path)
  assert out.returncode == 2
  assert _one_error_line(out).startswith("data.val_size=1000: must be smaller than the 320")
  out = app_here(*base, "data=mnist", f"data.data_dir={tmp_path / 'empty'}", run, cwd=tmp_path)
  assert out.returncode == 2 and "data.download=true" in out.stderr
  assert "Traceback" not in out.stderr
  out = app_here(*base, run, cwd=tmp_path)  # the corrected rerun, same directory
  assert out.returncode == 0, out.stderr[-3000:]


def test_app_unwritable_run_dir_is_one_line_naming_the_path(tmp_path, app_here):
  if os.geteuid() == 0:
    run_dir = Path("/sys")  # root writes anywhere else; sysfs refuses new files
  else:
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    run_dir.chmod(0o555)
  out = app_here(f"hydra.run.dir={run_dir}", "train.steps=10", cwd=tmp_path)
  assert out.returncode == 2
  line = _one_error_line(out)
  assert line.startswith(f"{run_dir}/train.log: Permission denied"), line


@pytest.mark.slow
def test_app_refused_resume_names_the_key_and_touches_nothing(tiny_data, tmp_path, app_here):
  data_dir, _ = tiny_data
  run_dir = tmp_path / "run"
  out = app_here(*_app_overrides(data_dir), f"hydra.run.dir={run_dir}", cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  before = _snapshot(run_dir)
  out = app_here(
    *_app_overrides(data_dir),
    "optimizer.lr=0.5",
    "train.steps=40",
    f"hydra.run.dir={run_dir}",
    cwd=tmp_path,
  )
  assert out.returncode == 2
  assert _one_error_line(out).startswith("optimizer.lr: 0.5 differs from 0.2")
  assert _snapshot(run_dir) == before


def test_app_refuses_a_second_run_on_the_same_directory(tiny_data, tmp_path):
  data_dir, _ = tiny_data
  run_dir = tmp_path / "run"
  with rundir.lock(run_dir):  # a run in progress
    out = _app(*_app_overrides(data_dir), f"hydra.run.dir={run_dir}", cwd=tmp_path)
  assert out.returncode == 2
  assert _one_error_line(out).startswith(f"{run_dir}: in use by another run (pid {os.getpid()}")


@pytest.mark.slow
def test_app_sigterm_checkpoints_summarizes_exits_nonzero_and_resumes(
  tiny_data, tmp_path, app_here
):
  data_dir, _ = tiny_data
  run_dir = tmp_path / "run"
  base = [o for o in _app_overrides(data_dir) if not o.startswith(("train.steps", "train.eval"))]
  args = [*base, "train.eval_every=0", f"hydra.run.dir={run_dir}"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.Popen(
    [sys.executable, str(ROOT / "experiments" / "train.py"), *args, "train.steps=1000000"],
    cwd=tmp_path,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = run_dir / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # what SLURM preemption and `timeout` send
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  summary = _summary(run_dir)
  assert summary["interrupted"] is True and summary["interrupted_by"] == "SIGTERM"
  stopped = summary["steps"]
  assert _ckpt_steps(run_dir) == [stopped] and stopped % 10 == 0
  assert not (run_dir / rundir.LOCK_NAME).exists()
  out = app_here(*args, f"train.steps={stopped + 20}", cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  steps = [r["step"] for r in _records(run_dir)]
  assert steps == list(range(10, stopped + 21, 10))


@pytest.mark.slow
def test_app_multirun_two_jobs(tiny_data, tmp_path, app_here):
  data_dir, _ = tiny_data
  sweep = tmp_path / "sweep"
  out = app_here(
    "-m",
    *_app_overrides(data_dir),
    "estimator=backprop",
    # The lrs of other backprop runs here (their compiled programs); 1e8 diverges, and
    # the sweep goes on.
    "optimizer.lr=0.1,1e8",
    f"hydra.sweep.dir={sweep}",
    cwd=tmp_path,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lrs = sorted(_summary(sweep / str(i))["lr"] for i in range(2))
  assert lrs == [0.1, 1e8]


@pytest.mark.slow
def test_optuna_lr_search_runs_two_trials(tiny_data, tmp_path, app_here):
  pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
  data_dir, _ = tiny_data
  sweep = tmp_path / "optuna"
  out = app_here(
    "-m",
    "+experiment=lr_search",
    *_app_overrides(data_dir),
    "estimator=backprop",
    "hydra.sweeper.n_trials=2",
    f"hydra.sweep.dir={sweep}",
    cwd=tmp_path,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert (sweep / "optimization_results.yaml").exists()


def test_the_host_loop_runs_the_device_loops_steps(tiny_data, tmp_path):
  """Same batches, same updates: the two loops agree to float tolerance."""
  data_dir, ds = tiny_data
  summaries = {}
  for loop in ("device", "host"):
    # The resume test's estimator and optimizer: the device loop's programs are its.
    cfg = _cfg(
      data_dir,
      estimator={"num_tangents": 2},
      optimizer={"lr": 0.01, "name": "adam"},
      train={"steps": 25, "loop": loop},
    )
    summaries[loop] = (run_lib.train(cfg, tmp_path / loop, dataset=ds), _records(tmp_path / loop))
  (s_dev, r_dev), (s_host, r_host) = summaries["device"], summaries["host"]
  assert [r["step"] for r in r_dev] == [r["step"] for r in r_host]
  np.testing.assert_allclose(
    [r["train_loss"] for r in r_host], [r["train_loss"] for r in r_dev], rtol=1e-4
  )
  np.testing.assert_allclose(s_host["test_loss"], s_dev["test_loss"], rtol=1e-4)


def test_auto_loop_is_host_for_convolutions_on_cpu():
  cfg = config_lib.TrainConfig()
  assert steps_lib.host_loop(cfg, has_convolutions=True) == (jax.default_backend() == "cpu")
  assert not steps_lib.host_loop(cfg, has_convolutions=False)
  assert not steps_lib.host_loop(cfg, has_convolutions=True, reverse=False)
  # Shapes only (nnx.eval_shape): the jaxpr needs no initialized weights.
  model = nnx.eval_shape(
    lambda: models.create(
      "cnn", input_shape=(8, 8, 1), num_classes=3, rngs=nnx.Rngs(0), channels=2, hidden=4
    )
  )
  graphdef, params, rest = models.split(model)
  loss = steps_lib.make_loss(graphdef, rest)
  assert steps_lib.uses_convolutions(
    loss, params, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
  )
