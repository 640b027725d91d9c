"""Yao's CNN (fwdgrad_jax/models/yao.py) and the Yao presets."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwdgrad_jax import models
from fwdgrad_jax.training import config as config_lib

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _make(input_shape=(28, 28, 1), **kw):
  return models.create("yao_cnn", input_shape=input_shape, num_classes=10, rngs=nnx.Rngs(0), **kw)


def test_registered_with_three_conv_pool_stages_and_two_dense():
  m = nnx.eval_shape(lambda: _make())
  assert "yao_cnn" in models.MODELS
  assert [c.kernel.shape for c in m.convs] == [(3, 3, 1, 16), (3, 3, 16, 32), (3, 3, 32, 64)]
  # One 2x2 pool after EACH conv: 28 -> 14 -> 7 -> 3 (floor), so 3*3*64 features.
  assert m.fc1.kernel.shape == (576, 128)
  assert m.fc2.kernel.shape == (128, 10)
  _, params, _ = models.split(m)
  convs = 9 * 16 + 16 + 9 * 16 * 32 + 32 + 9 * 32 * 64 + 64
  assert models.count_params(params) == convs + 576 * 128 + 128 + 128 * 10 + 10


def test_pool_after_every_conv_sets_the_dense_fan_in():
  # Two convs on 16x16: 16 -> 8 -> 4; a pool only at the end would give 8*8*c.
  m = nnx.eval_shape(lambda: _make((16, 16, 3), channels=(4, 5), hidden=7))
  assert m.fc1.kernel.shape == (4 * 4 * 5, 7)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="channels"):
    _make(channels=())
  with pytest.raises(ValueError, match="too small"):
    _make((4, 4, 1))


def test_forward_mode_directional_derivative_matches_backprop():
  m = _make((12, 12, 1), channels=(3, 4, 5), hidden=8)
  graphdef, params, rest = models.split(m)
  f = models.apply_fn(graphdef, rest)
  params = jax.tree.map(jnp.asarray, params)
  # numpy draws: eager 4-D threefry draws take seconds to compile on CPU.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 12, 12, 1), np.float32))
  y = jnp.arange(4) % 10

  def loss(p):
    logits = f(p, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

  v = jax.tree.map(lambda l: jnp.asarray(rng.standard_normal(l.shape, np.float32)), params)

  @jax.jit
  def both(p, v):
    _, jvp = jax.jvp(loss, (p,), (v,))
    g = jax.grad(loss)(p)
    return jvp, sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))

  jvp, dot = both(params, v)
  np.testing.assert_allclose(jvp, dot, rtol=1e-4, atol=1e-6)
  assert abs(float(dot)) > 1e-4  # not a trivially zero comparison


@pytest.mark.parametrize(
  "preset, model, estimator, lr",
  [
    ("yao_mlp", "mlp", "forward", 3e-4),
    ("yao_cnn", "yao_cnn", "forward", 3e-4),
    ("yao_guided_mlp", "mlp", "guided", 1e-6),
  ],
)
def test_yao_presets_use_the_raw_estimate_and_no_schedule(preset, model, estimator, lr):
  cfg = config_lib.compose([f"+experiment={preset}"], config_dir=CONFIG_DIR)
  assert (cfg.model.name, cfg.estimator.name, cfg.optimizer.lr) == (model, estimator, lr)
  assert cfg.estimator.rescale is False
  assert (cfg.optimizer.name, cfg.optimizer.decay) == ("sgd", 0.0)
  if estimator == "guided":
    e = cfg.estimator
    assert (e.fix_gap, e.decrease_gap, e.decay_rate, e.shuffle_ratio) == (10, 10, 0.9, 0.5)
