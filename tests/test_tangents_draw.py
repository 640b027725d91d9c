"""Tests of tangents.draw: the estimators' draw, once and in the jvp's layout.

``draw`` must give exactly ``sample``'s tangents (it only changes where they are stored),
and a k-tangent step must hold the tangent batch once: no copy out of the conditional
and no transposing copy for the jvp's matmul (issue #12).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad_jax as fg
from fwdgrad_jax import tangents

PARAMS = {"w": jnp.zeros((37, 23)), "b": jnp.zeros(23), "conv": jnp.zeros((3, 3, 2, 5))}


@pytest.mark.parametrize(
  "name,k,jvp_layout",
  [
    ("normal", 3, True),
    ("normal", 3, False),
    ("normal", 1, True),
    ("rademacher", 3, True),
    ("partition", 3, True),  # not a hash sampler: sample() inside the conditional
  ],
)
def test_draw_gives_exactly_the_sampled_tangents(name, k, jvp_layout):
  key = jax.random.PRNGKey(11)
  want = jax.jit(lambda key: tangents.sample(key, PARAMS, k, name))(key)
  got = jax.jit(lambda key: tangents.draw(key, PARAMS, k, name, jvp_layout=jvp_layout))(key)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_constrain_sees_each_leafs_tangent_axis():
  seen = []

  def constrain(v, axis):
    seen.append((v.shape, axis))
    return v

  tangents.draw(jax.random.PRNGKey(0), PARAMS, 4, "normal", constrain=constrain)
  assert set(seen) == {((37, 4, 23), 1), ((4, 23), 0), ((4, 3, 3, 2, 5), 0)}


def _mlp_loss(p, x, y):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  logits = h @ p["w2"]
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y])


def test_a_k_tangent_step_holds_the_tangent_batch_once():
  # 512·512 + 512·10 parameters, k = 8: V is 8.6 MB. Drawn into a conditional and
  # then copied out of it and again into the matmul's order, a step held it 2–3×.
  k0, k1 = jax.random.split(jax.random.PRNGKey(0))
  params = {
    "w1": 0.05 * jax.random.normal(k0, (512, 512)),
    "b1": jnp.zeros(512),
    "w2": 0.05 * jax.random.normal(k1, (512, 10)),
  }
  x, y = jnp.ones((16, 512)), jnp.arange(16) % 10
  k = 8
  v_bytes = k * sum(p.size for p in jax.tree.leaves(params)) * 4
  fn = jax.jit(fg.value_and_forward_grad(_mlp_loss, num_tangents=k))
  temp = fn.lower(k0, params, x, y).compile().memory_analysis().temp_size_in_bytes
  assert temp < 1.3 * v_bytes, (temp, v_bytes)
