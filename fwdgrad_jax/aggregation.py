"""Aggregations: (tangent batch V, directional derivatives d) -> gradient estimate.

With V = [v_1 … v_k] (a pytree whose leaves carry a leading axis k) and d = Vᵀ∇f:

  sum         g = V d
  mean        g = V d / k
  orthogonal  g = V (VᵀV)⁺ d  — the projection of ∇f onto span(V)

The Gram matrix VᵀV is taken over the whole parameter pytree (all layers at once),
as the projection must be; per-layer Gram matrices would project onto a different,
larger space and lose the meaning of d.

References:
  Flügel et al., 2024. Multi-Tangent Forward Gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

_HIGHEST = jax.lax.Precision.HIGHEST


def combine(tangents: PyTree, coefficients: jax.Array) -> PyTree:
  """Returns Σ_i c_i v_i for a tangent batch V and coefficients c of shape (k,)."""
  # HIGHEST: on GPUs float32 dots may default to TF32, which would round the
  # estimate to ~3 digits; these contractions are tiny and memory-bound anyway.
  return jax.tree.map(
    lambda v: jnp.tensordot(coefficients.astype(v.dtype), v, axes=1, precision=_HIGHEST),
    tangents,
  )


def gram(tangents: PyTree) -> jax.Array:
  """The k×k Gram matrix VᵀV of a tangent batch, accumulated over all leaves in float32."""

  def leaf_gram(v):
    m = v.reshape(v.shape[0], -1).astype(jnp.float32)
    return jnp.matmul(m, m.T, precision=_HIGHEST)

  return sum(leaf_gram(v) for v in jax.tree.leaves(tangents))


def _pinv_solve(g: jax.Array, d: jax.Array, rcond: float | None) -> jax.Array:
  """Minimum-norm solution of G c = d for a symmetric PSD G via its eigendecomposition.

  Eigenvalues below ``rcond * λ_max`` are dropped. Nearly dependent tangents then lose
  only the directions that float32 cannot resolve, instead of blowing up: the error
  stays ~sqrt(eps)·‖∇f‖ rather than eps·cond(G)·‖d‖. With more tangents than
  parameters G is singular and the same pseudo-inverse gives the exact gradient.
  """
  k = g.shape[0]
  if rcond is None:
    rcond = 10 * k * float(jnp.finfo(jnp.float32).eps)
  w, q = jnp.linalg.eigh(g)
  keep = w > rcond * jnp.max(w)
  w_inv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
  return q @ (w_inv * (q.T @ d.astype(jnp.float32)))


def sum_(tangents: PyTree, jvps: jax.Array) -> PyTree:
  """g_Σ = Σ_i d_i v_i."""
  return combine(tangents, jvps)


def mean(tangents: PyTree, jvps: jax.Array) -> PyTree:
  """g_μ = (1/k) Σ_i d_i v_i: the same direction as the sum, 1/k of its length."""
  return combine(tangents, jvps / jvps.shape[0])


def orthogonal(tangents: PyTree, jvps: jax.Array, *, rcond: float | None = None) -> PyTree:
  """g_P = V (VᵀV)⁺ d, the orthogonal projection of ∇f onto span(V).

  Exact when the tangents span the parameter space (k ≥ n); otherwise the best
  approximation of ∇f within span(V). Extra cost: O(k² n) for the Gram matrix and a
  k×k eigendecomposition.
  """
  return combine(tangents, _pinv_solve(gram(tangents), jvps, rcond))


AGGREGATIONS: dict[str, Callable[[PyTree, jax.Array], PyTree]] = {
  "sum": sum_,
  "mean": mean,
  "orthogonal": orthogonal,
}


def get_aggregation(aggregation: str) -> Callable[[PyTree, jax.Array], PyTree]:
  """Returns the aggregation called ``aggregation``.

  Raises:
    ValueError: unknown name.
  """
  if isinstance(aggregation, str) and aggregation in AGGREGATIONS:
    return AGGREGATIONS[aggregation]
  raise ValueError(
    f"aggregation={aggregation!r} is not a known aggregation; use one of {sorted(AGGREGATIONS)}."
  )
