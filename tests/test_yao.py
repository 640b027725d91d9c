"""experiments.yao.lib: the SGD runs the Yao experiments are built on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.yao import lib as yao


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((40, 4, 4, 1), np.float32))
  y = jnp.asarray(rng.integers(0, 10, 40, dtype=np.int32))
  return yao.make_problem("mlp", x, y, options={"hidden": (6,)})


def test_scan_and_host_stepped_runs_agree(problem):
  est = yao.estimator_config("average k=3")
  scanned = jax.jit(
    lambda: yao.sgd_run(problem, est, lr=0.05, seed=3, steps=5, batch_size=8, cosine=True)
  )()
  carry = yao.sgd_init(problem, est, seed=3)
  step = jax.jit(lambda c, t: yao.sgd_step(problem, est, c, t, lr=0.05, batch_size=8, cosine=True))
  host = []
  for t in range(5):
    carry, out = step(carry, jnp.int32(t))
    host.append((float(out["loss"]), float(out["cosine"])))
  expected = np.stack([scanned["loss"], scanned["cosine"]], 1)
  np.testing.assert_allclose(np.asarray(host), expected, rtol=1e-5)
  # The loss is recorded before each step, so a moving run changes it after step 0.
  assert float(scanned["loss"][0]) != float(scanned["loss"][-1])


def test_guided_decay_rate_through_the_state_equals_the_constructor(problem):
  # The guided grid vmaps decay rates by replacing the state's decay_rate; that must be
  # the same run as building the transform with that decay rate.
  kw = dict(lr=1e-3, seed=1, steps=12, batch_size=8, cosine=True)
  d = 0.7
  built = yao.estimator_config("guided", decay_rate=d, shuffle_ratio=0.2)
  one = jax.jit(lambda: yao.sgd_run(problem, built, **kw))()
  swapped = yao.estimator_config("guided", decay_rate=0.5, shuffle_ratio=0.2)
  two = jax.jit(lambda d: yao.sgd_run(problem, swapped, state_changes={"decay_rate": d}, **kw))(
    jnp.float32(d)
  )
  np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-6)
  np.testing.assert_allclose(one["cosine"], two["cosine"], rtol=1e-5, atol=1e-7)
  assert int(one["true_grads"]) == int(two["true_grads"]) == 2  # steps 0 and 10


def test_unknown_scheme_is_named():
  with pytest.raises(ValueError, match="unknown scheme 'nope'"):
    yao.estimator_config("nope")


def test_train_config_is_the_apps():
  cfg = yao.train_config("yao_cnn", yao.estimator_config("guided"), batch_size=256)
  assert (cfg.model.name, cfg.estimator.name, cfg.train.batch_size) == ("yao_cnn", "guided", 256)
  assert cfg.estimator.rescale is False
