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


#: Up to this many tangents, Σ_i c_i v_i is written as k elementwise terms (one fused
#: loop); beyond it, a loop over blocks of this many.
_UNROLLED = 64


def _unrolled(c: jax.Array, v: jax.Array) -> jax.Array:
  out = c[0] * v[0]
  for i in range(1, c.shape[0]):
    out = out + c[i] * v[i]
  return out


def _weighted_sum(c: jax.Array, v: jax.Array) -> jax.Array:
  """Σ_i c_i v[i] over the leading axis of v, reading v once in whatever layout it has.

  Not ``jnp.sum(c[:, None] * v, axis=0)``: XLA:CPU (jax 0.10, its YNNPACK reduce fusion)
  runs a reduction over the MAJOR axis of a large array 100–1000× slower than the memory
  bandwidth allows (0.3 s at k = 4, 2.7 s at k = 16 for a (k, 784, 1024) leaf, vs 1.5 and
  4 ms for this form), and every tangent not stored tangent-axis-second (the orthogonal
  aggregation's, conv kernels', a custom sampler's) is laid out that way. Not a dot either:
  on the tangent-axis-second layout of :func:`fwdgrad_jax.tangents.draw` XLA first copies
  V back (10× slower), and on GPUs a float32 dot may run as TF32. A sum of k elementwise
  terms is one fused loop in any layout.
  """
  k = c.shape[0]
  if k <= _UNROLLED:
    return _unrolled(c, v)
  # Beyond _UNROLLED terms, blocks of them in a loop: a constant-size program for any k.
  blocks, rest = divmod(k, _UNROLLED)
  acc = (
    _unrolled(c[blocks * _UNROLLED :], v[blocks * _UNROLLED :]) if rest else jnp.zeros_like(v[0])
  )

  def block(j, acc):
    start = j * _UNROLLED
    cj = jax.lax.dynamic_slice_in_dim(c, start, _UNROLLED)
    vj = jax.lax.dynamic_slice_in_dim(v, start, _UNROLLED)
    return acc + _unrolled(cj, vj)

  return jax.lax.fori_loop(0, blocks, block, acc)


def combine(tangents: PyTree, coefficients: jax.Array, *, reduce: bool = False) -> PyTree:
  """Σ_i c_i v_i for a tangent batch V and coefficients c of shape (k,).

  With c of shape (k, batch), example b of every leaf (axis 1) is combined with its own
  coefficients c[:, b] (per-example aggregation of activity tangents).

  Args:
    tangents: a tangent batch (leaves (k, …) or :class:`~fwdgrad_jax.tangents.Rank1`).
    coefficients: c, (k,) or (k, batch).
    reduce: one reduction over the tangent axis instead of k elementwise terms — for
      tangents split over a mesh's ``"tangents"`` axis, where indexing tangent i would
      gather V onto every device but a reduction is a partial sum and an all-reduce.

  Returns:
    A pytree like one tangent (per example with c of shape (k, batch)).
  """

  def one(v):
    if is_rank1(v):
      return v.combine(coefficients)
    c = coefficients.astype(v.dtype)
    if c.shape[0] == 1:
      # Elementwise, so XLA fuses it into the consumer (the optimizer's update) and,
      # with regenerated tangents, into the tangent's draw: no weight-sized buffer.
      return c[0].reshape(c.shape[1:] + (1,) * (v.ndim - c.ndim)) * v[0]
    if c.ndim == 1 and reduce:
      return jnp.sum(c.reshape((-1,) + (1,) * (v.ndim - 1)) * v, axis=0)
    if c.ndim == 1:
      return _weighted_sum(c, v)
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
    if v.shape[0] <= _PAIRWISE_MAX_K:
      return _pairwise_gram(v, dt)
    if v.ndim == 3:
      # A 2-D leaf: tangents.draw stores the hash samplers' (normal, rademacher)
      # tangent-axis-second, (rows, k, cols) in memory, so a batch over rows of
      # (k×cols)·(cols×k) products reads V as it lies; flattening each tangent would
      # first copy V into (k, rows·cols) (2-6× slower at k = 4-16 on a 784×1024 leaf). A
      # leaf stored (k, rows, cols) pays a copy here instead.
      m = v.astype(dt)
      return jnp.einsum("kab,lab->akl", m, m, precision=_HIGHEST).sum(0)
    m = v.reshape(v.shape[0], -1).astype(dt)
    return jnp.matmul(m, m.T, precision=_HIGHEST)

  return sum(leaf_gram(v) for v in _leaves(tangents))


#: Up to this many tangents the Gram matrix is one fused pass of k(k+1)/2 products; beyond,
#: the products outnumber what one pass keeps in registers and the dot is as fast (k = 8:
#: equal; k = 16: the dot 1.2× mean's step, the pass 1.6×, in the MLP's step).
_PAIRWISE_MAX_K = 8


def _pairwise_gram(v: jax.Array, dt: Any) -> jax.Array:
  """VᵀV of one dense leaf (k, …) as one variadic reduction of its k(k+1)/2 products.

  XLA:CPU runs the tall-skinny dot (k×n)·(n×k) at a few GFLOP/s: 4 ms for k = 4 on a
  784×1024 leaf, a third of the orthogonal step's cost over mean's, where reading V takes
  0.5 ms. One reduction with a result per pair reads V once in whatever layout it lies
  (1 ms). Each pair is first summed along
  the leaf's last axis and the partial sums then added, which keeps float32 round-off
  at the dot's level (a single running sum over 10⁶ terms lost 4 digits).
  """
  k = v.shape[0]
  if v.ndim == 1:
    v = v[:, None]
  rows = math.prod(v.shape[1:-1])
  if rows == 1 and v.shape[-1] > 1:
    # A vector leaf: split it in about √n rows so the two-level sum applies.
    n = v.shape[-1]
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
  m = v.reshape(k, rows, -1)
  pairs = [(i, j) for i in range(k) for j in range(i, k)]
  products = tuple(m[i].astype(dt) * m[j].astype(dt) for i, j in pairs)
  zero = jnp.zeros((), dt)
  partial = jax.lax.reduce(
    products,
    (zero,) * len(pairs),
    lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)),
    (1,),
  )
  upper = jnp.stack([p.sum() for p in partial])
  g = jnp.zeros((k, k), dt).at[tuple(zip(*pairs, strict=True))].set(upper)
  return g + jnp.triu(g, 1).T


def _map_lapack(fn: Callable[..., Any], *xs: jax.Array) -> Any:
  """``jax.vmap(fn)(*xs)`` for a ``fn`` that calls LAPACK (eigh, SVD): on the CPU one call per item.

  jaxlib's CPU LAPACK kernels (jax 0.10) split a batch over XLA:CPU's intra-op thread pool
  and block the pool thread that called them until the pieces are done. When a program
  runs as many independent batched decompositions at once as the pool has threads
  (per-example Gram matrices of several activity estimates in one ``jit``, on a 2-core
  machine two suffice), every pool thread waits for pieces that no free thread is left to
  run: the process hangs on futexes (``tests/test_lapack_hang.py`` runs such a program
  in a subprocess). ``lax.map`` hands LAPACK one matrix at a time, which it never splits,
  at the same cost here (64 eigh of 16×16: 1.4 ms either way). Elsewhere, ``vmap``.

  Args:
    fn: a function of one item of each of ``xs``.
    *xs: arrays with a common leading (batch) axis.

  Returns:
    ``fn``'s outputs stacked along a leading axis.
  """
  if jax.default_backend() != "cpu":
    return jax.vmap(fn)(*xs)
  return jax.lax.map(lambda args: fn(*args), xs)


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
  w, q = jnp.linalg.eigh(g) if g.ndim == 2 else _map_lapack(jnp.linalg.eigh, g)
  keep = w > rcond * jnp.max(w, axis=-1, keepdims=True)
  w_inv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
  qtd = jnp.einsum("...ji,...j->...i", q, d.astype(g.dtype), precision=_HIGHEST)
  return jnp.einsum("...ij,...j->...i", q, w_inv * qtd, precision=_HIGHEST)


def sum_(tangents: PyTree, jvps: jax.Array, *, reduce: bool = False) -> PyTree:
  """g_Σ = Σ_i d_i v_i."""
  return combine(tangents, jvps, reduce=reduce)


def mean(tangents: PyTree, jvps: jax.Array, *, reduce: bool = False) -> PyTree:
  """g_μ = (1/k) Σ_i d_i v_i: the same direction as the sum, 1/k of its length."""
  return combine(tangents, jvps / jvps.shape[0], reduce=reduce)


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
    g = _map_lapack(solve, jnp.moveaxis(flat, 1, 0), jvps.T.astype(dt))  # (batch, n)
  else:
    g = solve(flat, jvps.astype(dt))
  sizes = [math.prod(v.shape[len(lead) :]) for v in dense]
  parts = jnp.split(g, list(itertools.accumulate(sizes))[:-1], axis=-1)
  out = [p.reshape(*lead[1:], *v.shape[len(lead) :]).astype(v.dtype) for p, v in zip(parts, dense)]
  return jax.tree.unflatten(treedef, out)


def orthogonal(
  tangents: PyTree, jvps: jax.Array, *, rcond: float | None = None, reduce: bool = False
) -> PyTree:
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
  return combine(tangents, coef, reduce=reduce)


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
