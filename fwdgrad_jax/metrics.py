"""Pytree metrics of a gradient estimate against the true gradient, and accuracy."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(
    jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def tree_norm(a: PyTree) -> jax.Array:
  """Euclidean norm of a pytree, as one flat vector, in float32."""
  return jnp.sqrt(_tree_vdot(a, a))


def cosine_similarity(estimate: PyTree, true: PyTree, eps: float = 1e-30) -> jax.Array:
  """cos∠(estimate, true) with both pytrees flattened into one vector each.

  Args:
    estimate: a gradient estimate.
    true: the reference gradient, same structure.
    eps: guards a zero norm (the result is then 0).

  Returns:
    A float32 scalar in [-1, 1].
  """
  dot = _tree_vdot(estimate, true)
  return dot / jnp.maximum(tree_norm(estimate) * tree_norm(true), eps)


def norm_ratio(estimate: PyTree, true: PyTree, eps: float = 1e-30) -> jax.Array:
  """‖estimate‖ / ‖true‖ (Flügel et al.'s length measure; √(2n/π) for one Gaussian tangent)."""
  return tree_norm(estimate) / jnp.maximum(tree_norm(true), eps)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose arg-max logit is the integer label."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
