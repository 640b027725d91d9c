"""Models with local losses (Ren et al. 2023) and the optimizer's schedules in the app."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import fwdgrad_jax as fg
from fwdgrad_jax import models
from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import run as run_lib
from fwdgrad_jax.training import steps as steps_lib

SHAPE = (8, 8, 1)
TINY = {
  "local_mixer": dict(patches=2, channels=8, hidden=8, groups=2, blocks=2),
  "mlp": dict(hidden=[6, 5], local_losses=True),
  "cnn": dict(channels=2, hidden=4, local_losses=True),
}


def _model(name, **extra):
  opts = {**TINY[name], **extra}
  return models.create(name, input_shape=SHAPE, num_classes=3, rngs=nnx.Rngs(0), **opts)


def _batch(n=5):
  kx, _ = jax.random.split(jax.random.key(1))
  return jax.random.normal(kx, (n, *SHAPE)), jnp.arange(n) % 3


@jax.jit  # one compiled draw (eagerly every leaf's shape compiles one)
def _randomize_heads(params, key):
  """Non-zero heads (the all-zero leaves get noise), so that gradients reach the blocks."""
  flat, unravel = ravel_pytree(params)
  noise = unravel(0.3 * jax.random.normal(key, flat.shape))
  return jax.tree.map(lambda p, n: jnp.where(jnp.any(p != 0), p, p + n), params, noise)


@pytest.mark.parametrize("name", list(TINY))
def test_local_models_build_with_zero_heads_and_last_head_logits(name):
  model = _model(name)
  x, _ = _batch()
  assert models.has_local_losses(model)
  # One compiled program (eagerly every op of the forward passes compiles on its own).
  logits, out = nnx.jit(lambda m, x: (m.local_logits(x), m(x)))(model, x)
  assert len(logits) >= 2 and all(z.shape[0] == 5 and z.shape[-1] == 3 for z in logits)
  assert out.shape == (5, 3)
  # zero-initialised heads: every head predicts uniformly at first
  for z in logits:
    np.testing.assert_allclose(z, 0.0, atol=1e-6)
  assert not models.has_local_losses(_model(name, local_losses=False))


def test_local_mixer_rejects_bad_sizes():
  with pytest.raises(ValueError, match="patches"):
    _model("local_mixer", patches=3)
  with pytest.raises(ValueError, match="groups"):
    _model("local_mixer", groups=3)


@pytest.mark.parametrize("name", ["mlp", "local_mixer"])
def test_grad_of_total_is_each_block_from_its_own_loss(name):
  """Stop-gradient works: the total's gradient is the sum of the local losses' gradients,
  and each block's parameters get gradient only from the losses of that block."""
  model = _model(name)
  graphdef, params, rest = models.split(model)
  params = _randomize_heads(params, jax.random.key(2))
  x, y = _batch()
  loss = steps_lib.make_loss(graphdef, rest)
  n = len(model.local_logits(x))

  @jax.jit
  def grads(params):
    def term(i):
      def f(p):
        m = nnx.merge(graphdef, p, rest, copy=True)
        return models.local_losses_total([m.local_logits(x)[i]], y)

      return jax.grad(f)(params)

    return jax.grad(loss)(params, x, y), [term(i) for i in range(n)]

  total, terms = grads(params)
  summed = jax.tree.map(lambda *g: sum(g), *terms)
  for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(summed), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # no parameter leaf gets gradient from two blocks' losses
  if name == "mlp":
    owners = [
      [i for i, t in enumerate(terms) if np.any(jax.tree.leaves(t)[j])]
      for j in range(len(jax.tree.leaves(total)))
    ]
    assert all(len(o) <= 1 for o in owners) and {o[0] for o in owners if o} == set(range(n))
  else:  # the first block's token mixing gets nothing from the second block's losses
    g_last = jax.tree.leaves(terms[-1]["blocks"][0])
    assert all(not np.any(g) for g in g_last)
    assert any(np.any(g) for g in jax.tree.leaves(terms[0]["blocks"][0]))


def test_activity_estimate_through_the_app_loss_is_exact_with_enough_tangents():
  """LG-FG-A with orthogonal tangents spanning every activity is the LG-BP gradient."""
  graphdef, params, rest = models.split(_model("mlp"))
  params = _randomize_heads(params, jax.random.key(3))
  x, y = _batch(4)
  per_example = steps_lib.make_loss(graphdef, rest, per_example=True)
  # Per example: each Linear's output, 6 + 3 (head) + 5 + 3 (last head) = 17 activations.
  vg = fg.value_and_forward_grad(
    per_example, num_tangents=24, perturbation="activity", aggregation="orthogonal"
  )
  # One compile for both (eager, every op of the gradient compiles on its own).
  (_, g), lg_bp = jax.jit(
    lambda p: (
      vg(jax.random.key(5), p, x, y),
      jax.grad(steps_lib.make_loss(graphdef, rest))(p, x, y),
    )
  )(params)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(lg_bp), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


# ---- the app ---------------------------------------------------------------------------


def _cfg(data_dir, **sections):
  cfg = config_lib.Config()
  cfg.data = config_lib.DataConfig(name="fashion_mnist", data_dir=str(data_dir), val_size=64)
  cfg.model = config_lib.ModelConfig(
    name="local_mixer",
    options=dict(TINY["local_mixer"]),  # the tests' shapes: their initialisers compile once
    local_losses=True,
  )
  cfg.train = config_lib.TrainConfig(
    steps=20, batch_size=16, log_every=10, eval_every=20, grad_check_every=20, progress=False
  )
  for section, values in sections.items():
    for key, value in values.items():
      setattr(getattr(cfg, section), key, value)
  return config_lib.validate(cfg)


def _records(run_dir):
  return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


_CHECK_BLOCKS = {"embed", "blocks/0", "blocks/0/heads", "blocks/1", "blocks/1/heads"}


def test_local_mixer_trains_in_the_app_and_logs_the_lr(tiny_data, tmp_path):
  """LG-FG-A in the app, orthogonal with k = channels/groups = 4 tangents: LocalMixer's
  sites are sliced per (patch, group), so that spans every slice and the estimate is the
  local gradient. The run's gradient check (jax.grad of the app's loss of the model: LG-BP,
  as ``estimator=backprop`` does) must then report a cosine of 1 for every block; with
  one tangent it does not (test_the_gradient_check_is_below_one_with_too_few_tangents).
  The app's backprop step itself is tested on other models in test_train.py, and on this
  one's loss in test_grad_of_total_is_each_block_from_its_own_loss."""
  data_dir, ds = tiny_data
  estimator = {
    "name": "forward",
    "perturbation": "activity",
    "num_tangents": 4,
    "aggregation": "orthogonal",
  }
  optimizer = {
    "lr": 0.05,
    "momentum": 0.9,
    "schedule": "warmup_cosine",
    "warmup_steps": 5,
    "weight_decay": 1e-4,
  }
  cfg = _cfg(data_dir, estimator=estimator, optimizer=optimizer)
  summary = run_lib.train(cfg, tmp_path, dataset=ds)
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [10, 20]
  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 5, 20)
  for r in records:
    assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)))
    assert np.isfinite(r["train_loss"])
  check = records[-1]
  blocks = {k.removeprefix("cosine_block/"): v for k, v in check.items() if "cosine_block/" in k}
  assert set(blocks) == _CHECK_BLOCKS
  np.testing.assert_allclose(list(blocks.values()), 1.0, atol=1e-4)
  np.testing.assert_allclose(
    [check["cosine_to_true_grad"], check["grad_norm_ratio"]], 1.0, atol=1e-4
  )
  assert summary["error"] is None and not summary["diverged"]
  assert 0 <= summary["test_accuracy"] <= 1


# ---- schedules ---------------------------------------------------------------------------


def test_schedules_follow_optax():
  opt = config_lib.OptimizerConfig(lr=0.1)
  assert steps_lib.lr_at(opt, 7, 100) == pytest.approx(0.1)
  opt.schedule = "cosine"
  for s in (0, 10, 50, 99):
    assert steps_lib.lr_at(opt, s, 100) == pytest.approx(
      0.1 * 0.5 * (1 + np.cos(np.pi * s / 100)), rel=1e-4
    )
  opt.schedule, opt.warmup_steps = "warmup_cosine", 10
  assert steps_lib.lr_at(opt, 0, 100) == 0.0
  assert steps_lib.lr_at(opt, 5, 100) == pytest.approx(0.05)
  assert steps_lib.lr_at(opt, 10, 100) == pytest.approx(0.1)
  assert steps_lib.lr_at(opt, 55, 100) == pytest.approx(0.05)
  baydin = config_lib.OptimizerConfig(lr=0.1, decay=0.01)
  assert steps_lib.lr_at(baydin, 3) == pytest.approx(0.1 * np.exp(-0.03))


def test_weight_decay_is_in_the_update():
  params = {"w": jnp.ones(3)}
  zero = {"w": jnp.zeros(3)}
  for name in ("sgd", "adam"):
    opt = config_lib.OptimizerConfig(name=name, lr=0.1, weight_decay=0.5)
    tx = steps_lib.make_optimizer(opt, 10)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.05, rtol=1e-6)


@pytest.mark.parametrize(
  "section, values, key",
  [
    ("optimizer", {"schedule": "linear"}, "optimizer.schedule"),
    ("optimizer", {"schedule": "warmup_cosine", "warmup_steps": 20}, "optimizer.warmup_steps"),
    ("optimizer", {"warmup_steps": 5}, "optimizer.warmup_steps"),
    ("optimizer", {"warmup_steps": -1}, "optimizer.warmup_steps"),
    ("optimizer", {"schedule": "cosine", "decay": 1e-4}, "optimizer.decay"),
    ("optimizer", {"weight_decay": -0.1}, "optimizer.weight_decay"),
    ("model", {"name": "logreg", "local_losses": True}, "model.local_losses"),
  ],
)
def test_bad_values_are_rejected_naming_the_key(tmp_path, section, values, key):
  with pytest.raises(config_lib.ConfigError, match=rf"^{key}="):
    _cfg(tmp_path, **{section: values})


def test_hydra_composes_local_mixer_and_local_mlp():
  config_dir = Path(__file__).resolve().parents[1] / "configs"
  cfg = config_lib.compose(
    ["model=local_mixer", "optimizer.schedule=warmup_cosine", "optimizer.warmup_steps=10"],
    config_dir=config_dir,
  )
  assert cfg.model.name == "local_mixer" and cfg.model.local_losses is True
  cfg = config_lib.compose(["model=mlp", "model.local_losses=true"], config_dir=config_dir)
  assert config_lib.model_options(cfg.model)["local_losses"] is True


@pytest.mark.parametrize("name", ["cnn", "local_mixer"])
def test_activity_estimate_of_local_cnn_and_mixer_is_finite_and_aligned(name):
  model = _model(name)
  graphdef, params, rest = models.split(model)
  params = _randomize_heads(params, jax.random.key(6))
  x, y = _batch(4)
  per_example = steps_lib.make_loss(graphdef, rest, per_example=True)
  vg = fg.value_and_forward_grad(per_example, num_tangents=8, perturbation="activity")
  # One compile for both (eager, every op of the gradient compiles on its own).
  (_, g), lg_bp = jax.jit(
    lambda p: (
      vg(jax.random.key(7), p, x, y),
      jax.grad(steps_lib.make_loss(graphdef, rest))(p, x, y),
    )
  )(params)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))
  # positive, at least where the activities are few (the CNN has 2 × 128 per example)
  assert fg.cosine_similarity(g, lg_bp) > (0.3 if name == "local_mixer" else 0.0)


def test_the_gradient_check_is_below_one_with_too_few_tangents():
  """The check gives a cosine per block: with one tangent (fewer than a slice's 4
  features) it is below 1 in the blocks, and 1 in the last heads (exact, after the sites).
  With k = 4 it is 1 everywhere: test_local_mixer_trains_in_the_app_and_logs_the_lr."""
  model = _model("local_mixer")  # a slice has channels/groups = 4 features
  graphdef, params, rest = models.split(model)
  params = _randomize_heads(params, jax.random.key(3))
  x, y = _batch()
  loss = steps_lib.make_loss(graphdef, rest)
  per_example = steps_lib.make_loss(graphdef, rest, per_example=True)
  cfg = config_lib.EstimatorConfig(
    name="forward", num_tangents=1, perturbation="activity", aggregation="orthogonal"
  )
  check = jax.jit(steps_lib.make_grad_check_fn(loss, cfg, per_example))
  _, _, _, per_block = check(params, jax.random.key(0), x, y)
  assert set(per_block) == _CHECK_BLOCKS
  np.testing.assert_allclose(per_block["blocks/1/heads"], 1.0, atol=1e-5)
  assert float(per_block["blocks/0"]) < 0.99 and float(per_block["blocks/1"]) < 0.99
