"""Guided ("momentum") forward gradients, Yao's Algorithm 1 (fwdgrad_jax.guided).

Biased by design, so no unbiasedness test: these check what it promises instead.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fwdgrad_jax as fg
from fwdgrad_jax import guided

N = 200
_A = jnp.asarray(np.random.default_rng(0).uniform(0.1, 3.0, N), jnp.float32)
_X0 = jnp.asarray(np.random.default_rng(1).normal(size=N), jnp.float32)


def _quadratic(p):
  """A fixed quadratic: ∇f(x) = a ⊙ x, with varied curvatures a."""
  return 0.5 * jnp.sum(_A * p["x"] ** 2)


def test_the_guided_tangent_is_the_sorted_gaussian_in_the_given_order():
  order = jnp.asarray(np.random.default_rng(2).permutation(N), jnp.int32)
  v = guided.guided_tangent(jax.random.key(0), order, jnp.float32(1.0), 0)
  assert np.all(np.diff(np.asarray(v)[np.asarray(order)]) >= 0)  # v[order] ascending


def test_decay_one_and_no_shuffle_match_the_last_true_gradients_ranking():
  tx = fg.guided_forward_gradient(
    fix_gap=5, decay_rate=1.0, shuffle_ratio=0.0, decrease_gap=5, key=jax.random.key(1)
  )
  params = {"x": _X0}
  state = tx.init(params)
  g, state = jax.jit(lambda s: tx.update(params, s, params, value_fn=_quadratic))(state)
  true = jax.grad(_quadratic)(params)["x"]
  v = np.asarray(g["x"]) * np.sign(float(jnp.dot(g["x"], true)))
  np.testing.assert_array_equal(np.argsort(v), np.argsort(np.asarray(true)))
  assert int(state.true_grads) == 1


def _mean_cosine(tx, steps=40):
  params = {"x": _X0}
  state = tx.init(params)

  def body(carry, _):
    state = carry
    g, state = tx.update(params, state, params, value_fn=_quadratic)
    true = jax.grad(_quadratic)(params)
    return state, fg.cosine_similarity(g, true)

  state, cos = jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(state)
  return np.asarray(cos, np.float64), state


def test_guided_direction_beats_the_unguided_one_and_full_shuffle_erases_it():
  guided_cos, _ = _mean_cosine(fg.guided_forward_gradient(10, 1.0, 0.0, 10, key=jax.random.key(3)))
  plain_cos, _ = _mean_cosine(fg.forward_gradient(key=jax.random.key(3)))
  shuffled_cos, _ = _mean_cosine(
    fg.guided_forward_gradient(10, 1.0, 1.0, 10, key=jax.random.key(3))
  )
  # Sorted Gaussians matched to the gradient's ranking: cos ≈ 0.9 vs ≈ √(2/(πn)) = 0.056.
  assert guided_cos.mean() > 0.5 > 10 * plain_cos.mean()
  # A complete shuffle leaves an i.i.d. Gaussian: no better than unguided (5 standard errors).
  se = np.hypot(shuffled_cos.std(ddof=1), plain_cos.std(ddof=1)) / np.sqrt(len(plain_cos))
  assert abs(shuffled_cos.mean() - plain_cos.mean()) < 5 * se


def test_schedule_true_gradients_and_decay_under_jit():
  tx = fg.guided_forward_gradient(
    fix_gap=10, decay_rate=0.9, shuffle_ratio=0.2, decrease_gap=10, key=jax.random.key(4)
  )
  _, state = _mean_cosine(tx, steps=25)
  assert int(state.step) == 25
  assert int(state.true_grads) == 3  # steps 0, 10, 20
  np.testing.assert_allclose(float(state.decay_rate), 0.9**4, rtol=1e-6)  # squared at 10 and 20


def test_trains_in_a_chain_and_by_name():
  tx = optax.chain(
    fg.gradient_transform(
      "guided",
      key=jax.random.key(5),
      fix_gap=10,
      decay_rate=0.9,
      shuffle_ratio=0.0,
      decrease_gap=50,
    ),
    optax.sgd(1e-3),
  )
  params = {"x": _X0}
  state = tx.init(params)
  step = jax.jit(
    lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(p, s, p, value_fn=_quadratic)
    )
  )
  start = float(_quadratic(params))
  for _ in range(200):
    params, state = step(params, state)
  assert float(_quadratic(params)) < 0.05 * start
  with pytest.raises(ValueError, match="stateful"):
    fg.get_estimator("guided")


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(fix_gap=0), "fix_gap"),
    (dict(decay_rate=1.5), "decay_rate"),
    (dict(shuffle_ratio=-0.1), "shuffle_ratio"),
    (dict(decrease_gap=2.5), "decrease_gap"),
  ],
)
def test_bad_arguments_are_named(kwargs, match):
  args = dict(fix_gap=10, decay_rate=0.9, shuffle_ratio=0.0, decrease_gap=10) | kwargs
  with pytest.raises(ValueError, match=match):
    fg.guided_forward_gradient(**args, key=jax.random.key(0))
