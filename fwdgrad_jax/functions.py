"""Closed-form test functions with known minima (Baydin et al. Fig. 1–2, Flügel et al. Fig. 4).

Each takes a 1-D array ``x`` and returns a scalar; :data:`FUNCTIONS` maps a name to the
function together with its minimiser and minimum value for a given dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad_jax import registry

# Styblinski–Tang: the 1-D minimiser solves 4x³ − 32x + 5 = 0 (the negative root).
_ST_X = -2.903534027771177
_ST_F = 0.5 * (_ST_X**4 - 16 * _ST_X**2 + 5 * _ST_X)  # ≈ −39.16616570377142 per dimension


def beale(x: jax.Array) -> jax.Array:
  """Beale: (1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)²; min 0 at (3, 0.5)."""
  a, b = x[0], x[1]
  return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def rosenbrock(x: jax.Array) -> jax.Array:
  """Rosenbrock in n ≥ 2 dimensions: Σ 100 (x_{i+1} − x_i²)² + (1 − x_i)²; min 0 at (1, …, 1).

  For n = 2 this is Baydin et al.'s (1 − x)² + 100 (y − x²)².
  """
  return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def sphere(x: jax.Array) -> jax.Array:
  """Sphere: Σ x_i²; min 0 at the origin."""
  return jnp.sum(x**2)


def styblinski_tang(x: jax.Array) -> jax.Array:
  """Styblinski–Tang: ½ Σ (x_i⁴ − 16 x_i² + 5 x_i); min ≈ −39.166 n at x_i ≈ −2.9035."""
  return 0.5 * jnp.sum(x**4 - 16.0 * x**2 + 5.0 * x)


class TestFunction(NamedTuple):
  """A test function with its known global minimum.

  Attributes:
    fn: ``fn(x) -> scalar`` for a 1-D ``x``.
    minimizer: ``minimizer(n) -> x*`` of shape (n,).
    minimum: ``minimum(n) -> f(x*)``.
    dims: the dimensions it is defined for, or None for any n ≥ ``min_dim``.
    min_dim: the smallest n.
  """

  __test__ = False  # not a pytest class

  fn: Callable[[jax.Array], jax.Array]
  minimizer: Callable[[int], np.ndarray]
  minimum: Callable[[int], float]
  dims: tuple[int, ...] | None = None
  min_dim: int = 1


FUNCTIONS: dict[str, TestFunction] = {
  "beale": TestFunction(beale, lambda n: np.array([3.0, 0.5]), lambda n: 0.0, dims=(2,)),
  "rosenbrock": TestFunction(rosenbrock, lambda n: np.ones(n), lambda n: 0.0, min_dim=2),
  "sphere": TestFunction(sphere, lambda n: np.zeros(n), lambda n: 0.0),
  "styblinski_tang": TestFunction(
    styblinski_tang, lambda n: np.full(n, _ST_X), lambda n: _ST_F * n
  ),
}


def descend(
  fn: Callable[[jax.Array], jax.Array],
  x0: jax.Array,
  *,
  learning_rate: float,
  steps: int,
  key: jax.Array,
  estimator: str = "forward",
  **options,
) -> tuple[jax.Array, jax.Array]:
  """Plain gradient descent x ← x − η ĝ(x) (Baydin et al. Algorithm 1 with a forward ĝ).

  The whole run is one ``lax.scan``, so it stays on device.

  Args:
    fn: scalar function of a 1-D array.
    x0: starting point.
    learning_rate: η, constant.
    steps: number of iterations.
    key: PRNG key; split once per iteration.
    estimator: ``"forward"`` or ``"backprop"`` (see ``fwdgrad_jax.get_estimator``).
    **options: options of the estimator (e.g. ``num_tangents``, ``aggregation``).

  Returns:
    ``(losses, xs)``: f before each step, shape (steps,), and the iterates, shape
    (steps + 1, n), starting with ``x0``.
  """
  value_and_grad = registry.get_estimator(estimator)(fn, **options)

  def step(x, k):
    value, g = value_and_grad(k, x)
    x_next = x - learning_rate * g
    return x_next, (value, x_next)

  x0 = jnp.asarray(x0, jnp.float32)
  _, (losses, xs) = jax.lax.scan(step, x0, jax.random.split(key, steps))
  return losses, jnp.concatenate([x0[None], xs])
