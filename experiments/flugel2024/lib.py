"""What the Flügel et al. 2024 scripts share: closed forms, the lr grid, the GD objective.

References:
  Flügel, Fischer, Kaeser, Bhatt, Kruse, Ciaramella. Beyond Backpropagation: Optimization
  with Multi-Tangent Forward Gradients. 2024.
"""

from __future__ import annotations

import math

import jax

from experiments._lib.sgd import best_value, sgd
from fwdgrad_jax.training import lr_search


def expected_abs_cos_one_tangent(n: int) -> float:
  """E|cos(v, g)| for v ~ N(0, Iₙ): Γ(n/2) / (√π Γ((n+1)/2))."""
  return math.exp(math.lgamma(n / 2) - math.lgamma((n + 1) / 2)) / math.sqrt(math.pi)


def lr_grid(lr_range: tuple[float, float], per_decade: int) -> tuple[float, ...]:
  """The log grid of learning rates over ``lr_range``, ``per_decade`` points a decade."""
  lo, hi = lr_range
  return lr_search.log_grid(lo, hi, round(math.log10(hi / lo) * per_decade) + 1)


def best_value_of_gd(estimate, n: int, steps: int, fn=None):
  """The objective ``(lr, seed) -> best value`` of gradient descent on an n-dimensional function.

  x₀ ~ U(−2, 2)ⁿ from the seed, then ``steps`` steps x ← x − lr·ĝ(x) of ``estimate(key, x)
  -> (value, ĝ)`` (:func:`experiments._lib.sgd.sgd`). The score is the best finite value
  reached along the run (what early stopping on the objective keeps), also of the final
  point if ``fn`` is given; NaN if the run was never finite. Jittable and vmappable over
  lr and seed, for :func:`fwdgrad_jax.training.lr_search.search`.
  """

  def run(lr, seed):
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.uniform(k0, (n,), minval=-2.0, maxval=2.0)
    x, values = sgd(estimate, x0, k1, lr, steps)
    return best_value(values) if fn is None else best_value(values, fn(x))

  return run
