"""Tests of the training loop (fwdgrad_jax.train), the config schema and the Hydra app.

All runs use the tiny tfds-prepared data set of conftest.py and a small MLP.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from fwdgrad_jax import config as config_lib
from fwdgrad_jax import train as train_lib

ROOT = Path(__file__).resolve().parents[1]
SMALL_MLP = {"hidden": [32]}


def _cfg(data_dir, **sections):
  cfg = config_lib.Config()
  cfg.data = config_lib.DataConfig(name="fashion_mnist", data_dir=str(data_dir), val_size=64)
  cfg.model = config_lib.ModelConfig(name="mlp", options=dict(SMALL_MLP))
  cfg.train = config_lib.TrainConfig(
    steps=40, batch_size=16, log_every=10, eval_every=20, grad_check_every=20, progress=False
  )
  for section, values in sections.items():
    for key, value in values.items():
      setattr(getattr(cfg, section), key, value)
  return cfg


def _records(run_dir):
  return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
  "estimator",
  [
    {"name": "backprop"},
    {"name": "forward", "num_tangents": 2, "aggregation": "orthogonal"},
  ],
)
def test_a_run_writes_metrics_summary_and_checkpoint(tiny_data, tmp_path, estimator):
  data_dir, ds = tiny_data
  lr = 0.1 if estimator["name"] == "backprop" else 0.01
  cfg = _cfg(data_dir, estimator=estimator, optimizer={"lr": lr}, train={"steps": 60})
  summary = train_lib.train(cfg, tmp_path, dataset=ds)
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
  assert all(np.isfinite(r["train_loss"]) for r in records)
  evals = [r for r in records if "val_loss" in r]
  assert [r["step"] for r in evals] == [20, 40, 60]
  assert all(0 <= r["val_accuracy"] <= 1 for r in evals)
  checks = [r for r in records if "cosine_to_true_grad" in r]
  assert [r["step"] for r in checks] == [20, 40, 60]
  for key in (
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "step_time_ms",
    "base_time_ms",
  ):
    assert summary[key] is not None and np.isfinite(summary[key]), key
  assert summary["diverged"] is False and summary["steps"] == 60
  assert summary["num_params"] == 784 * 32 + 32 + 32 * 10 + 10
  assert summary["runtime_ratio"] == pytest.approx(
    summary["step_time_ms"] / summary["base_time_ms"]
  )
  assert json.loads((tmp_path / "summary.json").read_text())["test_loss"] == summary["test_loss"]
  assert (tmp_path / "checkpoints" / "60").is_dir()
  if estimator["name"] == "backprop":
    # jax.grad against itself, and the labels are learnable: the loss falls.
    assert all(r["cosine_to_true_grad"] == pytest.approx(1.0, abs=1e-5) for r in checks)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
  else:
    assert all(-1 <= r["cosine_to_true_grad"] <= 1 for r in checks)


def test_a_run_shorter_than_one_chunk_is_timed(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  cfg = _cfg(
    data_dir,
    estimator={"name": "backprop"},
    train={"steps": 7, "eval_every": 0, "grad_check_every": 0},
  )
  summary = train_lib.train(cfg, tmp_path, dataset=ds)
  assert summary["steps"] == 7
  assert summary["step_time_ms"] > 0 and summary["runtime_ratio"] > 0


def test_divergence_stops_keeps_metrics_and_reports(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  cfg = _cfg(data_dir, optimizer={"lr": 1e8}, train={"steps": 200, "checkpoint_every": 10})
  summary = train_lib.train(cfg, tmp_path, dataset=ds)
  assert summary["diverged"] is True
  assert summary["steps"] < 200
  assert summary["val_loss"] is None and summary["test_loss"] is None
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["diverged"] is True
  records = _records(tmp_path)
  assert records[-1]["diverged"] is True
  assert all(r["train_loss"] is None or np.isfinite(r["train_loss"]) for r in records)
  # The last good checkpoint stays; no checkpoint holds the non-finite state.
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert all(s <= summary["steps"] for s in steps)


def _final_params(run_dir):
  mngr = ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints")
  restored = mngr.restore(mngr.latest_step())
  mngr.close()
  return restored


def test_resume_continues_bit_identically(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  # 30 steps of 16 on 256 examples cross an epoch boundary (16 steps per epoch).
  opts = {"estimator": {"num_tangents": 2}, "optimizer": {"lr": 0.01, "name": "adam"}}
  whole = tmp_path / "whole"
  train_lib.train(_cfg(data_dir, train={"steps": 40}, **opts), whole, dataset=ds)
  parts = tmp_path / "parts"
  first = train_lib.train(_cfg(data_dir, train={"steps": 30}, **opts), parts, dataset=ds)
  assert first["steps"] == 30
  before = _records(parts)
  resumed = train_lib.train(_cfg(data_dir, train={"steps": 40}, **opts), parts, dataset=ds)
  assert resumed["steps"] == 40
  # It resumed rather than restarted: the records up to the checkpoint are kept as written.
  assert _records(parts)[: len(before)] == before
  strip = lambda rs: [{k: v for k, v in r.items() if k != "train_time_s"} for r in rs]
  assert strip(_records(parts)) == strip(_records(whole))
  a, b = _final_params(whole), _final_params(parts)
  for x, y in zip(
    __import__("jax").tree.leaves(a["params"]),
    __import__("jax").tree.leaves(b["params"]),
    strict=True,
  ):
    np.testing.assert_array_equal(x, y)
  assert resumed["test_loss"] == _summary(whole)["test_loss"]


def _summary(run_dir):
  return json.loads((Path(run_dir) / "summary.json").read_text())


def test_resume_refuses_a_changed_config(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  train_lib.train(_cfg(data_dir, train={"steps": 10}), tmp_path, dataset=ds)
  with pytest.raises(config_lib.ConfigError, match="optimizer"):
    train_lib.train(
      _cfg(data_dir, optimizer={"lr": 0.5}, train={"steps": 20}), tmp_path, dataset=ds
    )


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
    ("data", "name", "imagenet"),
    ("model", "name", "resnet1000"),
  ],
)
def test_validate_names_the_bad_key(section, key, value):
  cfg = config_lib.Config()
  setattr(getattr(cfg, section), key, value)
  with pytest.raises(config_lib.ConfigError, match=f"{section}.{key}={value!r}"):
    config_lib.validate(cfg)


def test_bad_model_option_fails_before_data_loading(tmp_path):
  cfg = config_lib.Config()
  cfg.data.data_dir = str(tmp_path / "nothing-here")
  cfg.model.options = {"widht": 3}
  with pytest.raises(config_lib.ConfigError, match="widht"):
    train_lib.train(cfg, tmp_path / "run")


def test_from_dict_rejects_unknown_keys():
  with pytest.raises(config_lib.ConfigError, match="estimator.num_tangent"):
    config_lib.from_dict({"estimator": {"num_tangent": 2}})
  assert config_lib.from_dict({"optimizer": {"lr": 0.5}}).optimizer.lr == 0.5


# ---- the Hydra app, as a user runs it ----------------------------------------------


def _app(*overrides, cwd):
  env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
  return subprocess.run(
    [sys.executable, str(ROOT / "experiments" / "train.py"), *overrides],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=env,
    timeout=600,
  )


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


@pytest.mark.parametrize("estimator", ["forward", "backprop"])
def test_app_runs_each_estimator(tiny_data, tmp_path, estimator):
  data_dir, _ = tiny_data
  run_dir = tmp_path / "run"
  out = _app(
    *_app_overrides(data_dir), f"estimator={estimator}", f"hydra.run.dir={run_dir}", cwd=tmp_path
  )
  assert out.returncode == 0, out.stderr[-3000:]
  summary = _summary(run_dir)
  assert summary["estimator"] == estimator and summary["steps"] == 20
  assert f"{estimator}: steps 20" in out.stdout


def test_app_rejects_a_bad_value_fast_with_one_clear_line(tmp_path):
  t0 = time.perf_counter()
  out = _app("estimator.num_tangents=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
  assert out.returncode == 2
  assert "error: estimator.num_tangents=0: must be an integer >= 1" in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "run" / "metrics.jsonl").exists()
  assert time.perf_counter() - t0 < 60
  out = _app("estimator.num_tangents=abc", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
  assert out.returncode != 0 and "num_tangents" in out.stderr


def test_app_multirun_two_jobs(tiny_data, tmp_path):
  data_dir, _ = tiny_data
  sweep = tmp_path / "sweep"
  out = _app(
    "-m",
    *_app_overrides(data_dir),
    "estimator=backprop",
    "optimizer.lr=0.01,0.1",
    f"hydra.sweep.dir={sweep}",
    cwd=tmp_path,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lrs = sorted(_summary(sweep / str(i))["lr"] for i in range(2))
  assert lrs == [0.01, 0.1]


def test_every_preset_composes_and_validates():
  presets = sorted(
    p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml") if p.stem != "lr_search"
  )
  assert len(presets) >= 18
  for preset in presets:
    cfg = config_lib.compose([f"+experiment={preset}"])
    assert cfg.train.batch_size == 64, preset
  repro = config_lib.compose(["+experiment=repro_nn_mnist_adam_fwd"])
  assert (repro.optimizer.name, repro.optimizer.lr, repro.optimizer.b1) == ("adam", 5e-4, 0.99)
  assert repro.estimator.max_jvp_norm == 1.0
  with pytest.raises(config_lib.ConfigError, match="estimator.num_tangents=0"):
    config_lib.compose(["estimator.num_tangents=0"])


def test_optuna_lr_search_runs_two_trials(tiny_data, tmp_path):
  pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
  data_dir, _ = tiny_data
  sweep = tmp_path / "optuna"
  out = _app(
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
