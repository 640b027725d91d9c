"""Aggregations: (tangent batch V, directional derivatives d) -> gradient estimate.

With V = [v_1 … v_k] (a pytree whose leaves carry a leading axis k) and d = Vᵀ∇f:

  sum         g = V d
  mean        g = V d / k
  orthogonal  g = V (VᵀV)⁺ d  — the projection of ∇f onto span(V)

The Gram matrix VᵀV is taken over the whole parameter pytree (all layers at once),
as the projection must be; per-layer Gram matrices would project onto a different,
larger space and lose the meaning of d.

Any callable ``(tangents, jvps) -> estimate`` is an aggregation too; :func:`combine`
and :func:`gram` are the building blocks the built-in ones use, and they understand
every tangent form the estimators produce: dense leaves, factored rank-1 leaves
(:class:`fwdgrad_jax.tangents.Rank1`, combined without ever forming a k×n
matrix) and, for activity perturbation with per-example losses, directional
derivatives of shape (k, batch) — one per example, with the tangents' axis 1 the batch
axis — where every example is aggregated over its own tangents.

Precision: the Gram matrix and the solve run in float32, or in float64 when the
tangents are float64 (with ``jax_enable_x64``), so k ≥ n projections are exact to the
parameters' own precision.

References:
  Flügel et al., 2024. Multi-Tangent Forward Gradients. arXiv:2410.17764.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fwdgrad_jax.tangents import is_rank1

PyTree = Any
Aggregation = Callable[[PyTree, jax.Array], PyTree]

_HIGHEST = jax.lax.Precision.HIGHEST


def _leaves(tangents: PyTree) -> list[Any]:
  return jax.tree.leaves(tangents, is_leaf=is_rank1)


def accumulation_dtype(tangents: PyTree) -> Any:
  """float32, or float64 if any tangent leaf is float64: the precision of Gram and solve."""
  dt = jnp.float32
  for v in _leaves(tangents):
    dt = jnp.promote_types(dt, v.dtype)
  return dt


def combine(tangents: PyTree, coefficients: jax.Array) -> PyTree:
  """Σ_i c_i v_i for a tangent batch V and coefficients c of shape (k,).

  With c of shape (k, batch), example b of every leaf (axis 1) is combined with its own
  coefficients c[:, b] (per-example aggregation of activity tangents).
  """

  def one(v):
    if is_rank1(v):
      return v.combine(coefficients)
    c = coefficients.astype(v.dtype)
    if c.shape[0] == 1:
      # Elementwise, so XLA fuses it into the consumer (the optimizer's update) and,
      # with regenerated tangents, into the tangent's draw: no weight-sized buffer.
      return c[0].reshape(c.shape[1:] + (1,) * (v.ndim - c.ndim)) * v[0]
    if c.ndim == 1:
      # A reduction, not a dot: it reads V once in whatever layout the draw left it
      # (tangents.draw stores dense layers tangent-axis-second; a dot would first copy
      # V back), and it stays in float32 on GPUs, where float32 dots may run as TF32.
      return jnp.sum(c.reshape((-1,) + (1,) * (v.ndim - 1)) * v, axis=0)
    return jnp.einsum("kb,kb...->b...", c, v, precision=_HIGHEST)

  return jax.tree.map(one, tangents, is_leaf=is_rank1)


def gram(tangents: PyTree, *, per_example: bool = False) -> jax.Array:
  """The Gram matrix VᵀV of a tangent batch, accumulated over all leaves.

  Args:
    tangents: a tangent batch (leaves (k, …) or :class:`~fwdgrad_jax.tangents.Rank1`).
    per_example: one k×k matrix per example, the leaves' axis 1 being the batch axis.

  Returns:
    (k, k), or (batch, k, k) with ``per_example``, in :func:`accumulation_dtype`.
  """
  dt = accumulation_dtype(tangents)

  def leaf_gram(v):
    if is_rank1(v):
      if per_example:
        raise ValueError("gram(per_example=True) needs dense (activity) tangents.")
      return v.gram().astype(dt)
    if per_example:
      m = v.reshape(v.shape[0], v.shape[1], -1).astype(dt)
      return jnp.einsum("kbn,lbn->bkl", m, m, precision=_HIGHEST)
    m = v.reshape(v.shape[0], -1).astype(dt)
    return jnp.matmul(m, m.T, precision=_HIGHEST)

  return sum(leaf_gram(v) for v in _leaves(tangents))


def _pinv_solve(g: jax.Array, d: jax.Array, rcond: float | None) -> jax.Array:
  """Minimum-norm solution of G c = d for a symmetric PSD G via its eigendecomposition.

  Eigenvalues below ``rcond * λ_max`` are dropped. Nearly dependent tangents then lose
  only the directions that the working precision cannot resolve, instead of blowing up:
  the error stays ~sqrt(eps)·‖∇f‖ rather than eps·cond(G)·‖d‖. With more tangents than
  parameters G is singular and the same pseudo-inverse gives the exact gradient.
  """
  k = g.shape[-1]
  if rcond is None:
    rcond = 10 * k * float(jnp.finfo(g.dtype).eps)
  w, q = jnp.linalg.eigh(g)
  keep = w > rcond * jnp.max(w, axis=-1, keepdims=True)
  w_inv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
  qtd = jnp.einsum("...ji,...j->...i", q, d.astype(g.dtype), precision=_HIGHEST)
  return jnp.einsum("...ij,...j->...i", q, w_inv * qtd, precision=_HIGHEST)


def sum_(tangents: PyTree, jvps: jax.Array) -> PyTree:
  """g_Σ = Σ_i d_i v_i."""
  return combine(tangents, jvps)


def mean(tangents: PyTree, jvps: jax.Array) -> PyTree:
  """g_μ = (1/k) Σ_i d_i v_i: the same direction as the sum, 1/k of its length."""
  return combine(tangents, jvps / jvps.shape[0])


def _size(tangents: PyTree, per_example: bool) -> int:
  """The dimension n the tangents live in (per example for per-example jvps)."""
  n = 0
  for v in _leaves(tangents):
    shape = v.shape if is_rank1(v) else v.shape[1:]
    n += math.prod(shape[1:] if per_example else shape)
  return n


def _orthogonal_in_parameter_space(tangents: PyTree, jvps: jax.Array, rcond) -> PyTree:
  """V (VᵀV)⁺ d as the minimum-norm least-squares solution of Vᵀ g = d, for k ≥ n tangents.

  The same projection (V(VᵀV)⁺ = (Vᵀ)⁺), solved by an SVD of the k×n matrix of
  tangents instead of a k×k Gram matrix: a million tangents of a 3-parameter function
  cost a 10⁶×3 factorisation, not 12 TB, and the SVD is backward stable where the normal
  equations would square the rounding of a million-term sum.
  """
  per_example = jvps.ndim == 2
  leaves, treedef = jax.tree.flatten(tangents, is_leaf=is_rank1)
  dense = [v.dense() if is_rank1(v) else v for v in leaves]
  k = jvps.shape[0]
  dt = accumulation_dtype(tangents)
  lead = (k, jvps.shape[1]) if per_example else (k,)
  flat = jnp.concatenate([v.reshape(*lead, -1).astype(dt) for v in dense], axis=-1)
  if rcond is None:
    # The SVD's relative rounding grows like √k·eps for k-long columns, not k·eps.
    rcond = 10 * flat.shape[-1] * math.sqrt(k) * float(jnp.finfo(dt).eps)

  def solve(a, b):
    return jnp.linalg.lstsq(a, b, rcond=rcond)[0]

  if per_example:
    g = jax.vmap(solve, in_axes=(1, 1))(flat, jvps.astype(dt))  # (batch, n)
  else:
    g = solve(flat, jvps.astype(dt))
  sizes = [math.prod(v.shape[len(lead) :]) for v in dense]
  parts = jnp.split(g, list(itertools.accumulate(sizes))[:-1], axis=-1)
  out = [p.reshape(*lead[1:], *v.shape[len(lead) :]).astype(v.dtype) for p, v in zip(parts, dense)]
  return jax.tree.unflatten(treedef, out)


def orthogonal(tangents: PyTree, jvps: jax.Array, *, rcond: float | None = None) -> PyTree:
  """g_P = V (VᵀV)⁺ d, the orthogonal projection of ∇f onto span(V).

  Exact when the tangents span the parameter space (k ≥ n); otherwise the best
  approximation of ∇f within span(V). Extra cost: O(k² n) for the Gram matrix and a
  k×k eigendecomposition; with k ≥ n the same projection is solved by an SVD of the k×n
  tangent matrix (exact where the Gram matrix would square its condition number).
  With per-example jvps (k, batch) every example is projected onto its own tangents.
  """
  per_example = jvps.ndim == 2
  # At k = n the Gram matrix squares cond(V) (~n for square Gaussian V, heavy-tailed), and
  # the float32 cut-off would drop real directions in about half the draws; the SVD of V
  # keeps them.
  if jvps.shape[0] >= _size(tangents, per_example):
    return _orthogonal_in_parameter_space(tangents, jvps, rcond)
  g = gram(tangents, per_example=per_example)
  if per_example:
    coef = _pinv_solve(g, jvps.T, rcond).T  # (k, batch)
  else:
    coef = _pinv_solve(g, jvps, rcond)
  return combine(tangents, coef)


def coefficients(aggregation: str, jvps: jax.Array, gram_matrix: jax.Array | None = None):
  """c with estimate = Σ_i c_i v_i, for tangents that are not kept (regenerated).

  Args:
    aggregation: ``"sum"``, ``"mean"`` or ``"orthogonal"`` (which needs the Gram matrix).
    jvps: the directional derivatives d, shape (k,).
    gram_matrix: VᵀV, (k, k), for ``"orthogonal"``.

  Returns:
    (k,) coefficients: d, d / k, or (VᵀV)⁺ d.
  """
  if aggregation == "sum":
    return jvps
  if aggregation == "mean":
    return jvps / jvps.shape[0]
  if aggregation == "orthogonal" and gram_matrix is not None:
    return _pinv_solve(gram_matrix, jvps, None).astype(jvps.dtype)
  raise ValueError(f"coefficients: no coefficient form for aggregation={aggregation!r}.")


#: Aggregations that are Σ_i c_i v_i with c from d (and VᵀV): they work on regenerated tangents.
LINEAR = ("sum", "mean", "orthogonal")


AGGREGATIONS: dict[str, Aggregation] = {
  "sum": sum_,
  "mean": mean,
  "orthogonal": orthogonal,
}


def get_aggregation(aggregation: str | Aggregation) -> Aggregation:
  """Returns the aggregation called ``aggregation``, or ``aggregation`` itself if callable.

  Raises:
    ValueError: unknown name.
  """
  if callable(aggregation):
    return aggregation
  if isinstance(aggregation, str) and aggregation in AGGREGATIONS:
    return AGGREGATIONS[aggregation]
  raise ValueError(
    f"aggregation={aggregation!r} is not a known aggregation; use one of {sorted(AGGREGATIONS)} "
    "or a callable (tangents, jvps) -> estimate."
  )
