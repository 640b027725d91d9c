"""Tests of the closed-form test functions and the pytree metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad_jax as fg
from fwdgrad_jax.functions import FUNCTIONS


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("n", [2, 5])
def test_known_minimum_is_a_stationary_point_with_the_stated_value(name, n):
  tf = FUNCTIONS[name]
  if tf.dims is not None and n not in tf.dims:
    pytest.skip(f"{name} is defined for n in {tf.dims}")
  x = jnp.asarray(tf.minimizer(n), jnp.float32)
  np.testing.assert_allclose(tf.fn(x), tf.minimum(n), atol=1e-4)
  np.testing.assert_allclose(jax.grad(tf.fn)(x), 0.0, atol=2e-3)
  # and nearby points are worse (a minimum, not a saddle)
  for d in np.eye(n)[:2]:
    assert tf.fn(x + 0.05 * d) > tf.minimum(n) and tf.fn(x - 0.05 * d) > tf.minimum(n)


def test_baydin_formulas():
  x = jnp.array([1.5, -0.1])
  a, b = 1.5, -0.1
  want = (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2
  np.testing.assert_allclose(fg.functions.beale(x), want, rtol=1e-6)
  np.testing.assert_allclose(
    fg.functions.rosenbrock(jnp.array([0.5, 2.0])), 0.25 + 100 * 1.75**2, rtol=1e-6
  )


def test_cosine_and_norm_ratio_over_pytrees():
  a = {"x": jnp.array([1.0, 0.0]), "y": [jnp.array([[0.0]])]}
  b = {"x": jnp.array([1.0, 1.0]), "y": [jnp.array([[0.0]])]}
  np.testing.assert_allclose(fg.cosine_similarity(a, b), 1 / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(fg.norm_ratio(b, a), np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(
    fg.cosine_similarity(a, jax.tree.map(lambda t: -3 * t, a)), -1, rtol=1e-6
  )
  np.testing.assert_allclose(
    fg.metrics.accuracy(jnp.array([[0.1, 2.0], [3.0, 0.0]]), jnp.array([1, 1])), 0.5
  )
