"""Pytree metrics of a gradient estimate against the true gradient, and accuracy."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def _at_least_f32(tree: PyTree) -> PyTree:
  # Low-precision leaves (bf16) would round a sum over millions of parameters away.
  return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)


def tree_norm(a: PyTree) -> jax.Array:
  """Euclidean norm of a pytree, as one flat vector, in float32 or wider."""
  return optax.tree_utils.tree_norm(_at_least_f32(a))


def cosine_similarity(estimate: PyTree, true: PyTree, eps: float = 1e-30) -> jax.Array:
  """cos∠(estimate, true) with both pytrees flattened into one vector each.

  Args:
    estimate: a gradient estimate.
    true: the reference gradient, same structure.
    eps: guards a zero norm (the result is then 0).

  Returns:
    A float32 (or wider) scalar in [-1, 1].
  """
  estimate, true = _at_least_f32(estimate), _at_least_f32(true)
  dot = optax.tree_utils.tree_vdot(estimate, true)
  return dot / jnp.maximum(tree_norm(estimate) * tree_norm(true), eps)


def norm_ratio(estimate: PyTree, true: PyTree, eps: float = 1e-30) -> jax.Array:
  """‖estimate‖ / ‖true‖ (Flügel et al.'s length measure; √(2n/π) for one Gaussian tangent)."""
  return tree_norm(estimate) / jnp.maximum(tree_norm(true), eps)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose arg-max logit is the integer label."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
