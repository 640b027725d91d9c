"""The one "SGD on an estimator" loop of the figure scripts: jittable, vmappable, one ``lax.scan``.

An estimator here is ``estimate(key, params) -> (value, grad)``: what
``fwdgrad_jax.value_and_forward_grad(f)`` / ``value_and_exact_grad(f)`` return for a
function of the parameters alone (the closed-form test functions), or :func:`minibatch`
of one taking a batch. :func:`sgd` runs θ ← θ − lr·ĝ(θ) for ``steps`` steps with one key
per step (``jax.random.split(key, steps)``) and returns the final parameters and the value
before every step; ``lr``, ``key`` and ``params0`` may be traced, so an lr grid × seeds is
one ``jax.vmap`` (``fwdgrad_jax.training.lr_search.search``).

(Yao's experiments step an optax transform with state instead:
:func:`experiments.yao.lib.sgd_run`.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Estimate = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


class SgdRun(NamedTuple):
  """What :func:`sgd` returns.

  Attributes:
    params: the parameters after the last step.
    values: (steps,) the estimator's value (the loss) at each step, before its update.
  """

  params: Any
  values: jax.Array


def sgd(estimate: Estimate, params0: Any, key: jax.Array, lr: Any, steps: int) -> SgdRun:
  """``steps`` plain SGD steps θ ← θ − lr·ĝ(θ) of ``estimate`` from ``params0``, in one scan.

  Args:
    estimate: ``(key, params) -> (value, grad)``; ``grad`` has the structure of ``params``.
    params0: the start (an array or a pytree).
    key: split into one key per step.
    lr: the learning rate (a Python float or a traced scalar).
    steps: the number of steps (static).

  Returns:
    :class:`SgdRun`: the final parameters and the value at every step.
  """

  def step(params, k):
    value, grad = estimate(k, params)
    return jax.tree.map(lambda p, g: p - lr * g, params, grad), value

  params, values = jax.lax.scan(step, params0, jax.random.split(key, steps))
  return SgdRun(params, values)


def minibatch(estimate: Callable[..., tuple[jax.Array, Any]], x: Any, y: Any, batch_size: int):
  """``estimate(key, params, xb, yb)`` as ``(key, params) -> (value, grad)`` on random batches.

  Each call splits its key into a batch key (``batch_size`` indices drawn uniformly with
  replacement from the ``x.shape[0]`` examples) and the estimator's key.
  """
  n = x.shape[0]

  def on_a_batch(key, params):
    k_batch, k_est = jax.random.split(key)
    idx = jax.random.randint(k_batch, (batch_size,), 0, n)
    return estimate(k_est, params, x[idx], y[idx])

  return on_a_batch


def best_value(values: jax.Array, *more: jax.Array) -> jax.Array:
  """The lowest finite value of ``values`` (and of ``more``), NaN if none is finite.

  What early stopping on the objective keeps: a run that diverges keeps its best finite
  value; one that is never finite (diverged at once) scores NaN.
  """
  allv = jnp.concatenate([jnp.ravel(values), *(jnp.ravel(m) for m in more)])
  best = jnp.min(jnp.where(jnp.isfinite(allv), allv, jnp.inf))
  return jnp.where(jnp.isinf(best), jnp.nan, best)
