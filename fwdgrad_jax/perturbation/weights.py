"""Weight perturbation with structured tangents: rank-1, input-generated and regenerated.

Each parameter leaf is followed through the ops of :data:`~.rules.VIEW_RULES` to the op
that consumes it. A consumer in :data:`~.rules.FACTORED_RULES` takes the leaf's tangent
as rank-1 factors a ⊗ b; any other use gets the dense form of the *same* tangent, the
identical estimate, only slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fwdgrad_jax import tangents as tangents_lib
from fwdgrad_jax.perturbation import credit, draws
from fwdgrad_jax.perturbation.program import Program, bind, is_zero, jvp_op, trace
from fwdgrad_jax.perturbation.rules import FACTORED_RULES, VIEW_RULES, View
from fwdgrad_jax.tangents import Rank1, is_rank1

PyTree = Any


class WeightTangents:
  """Draws each leaf's tangent when its first consumer is seen, and keeps it."""

  def __init__(self, words, leaves, k, scheme, factored):
    self.words, self.leaves, self.k = words, leaves, k
    self.scheme, self.factored = scheme, factored
    self.tangents: dict[int, Any] = {}
    self._dense: dict[int, jax.Array] = {}

  def dense_leaf(self, leaf: int, deps: Sequence[Any] = ()) -> jax.Array:
    del deps  # drawn once, kept for every consumer
    if leaf not in self.tangents:
      p = self.leaves[leaf]
      shape = (self.k, *jnp.shape(p))
      v = draws.normal(self.words, leaf, draws.SALT_DENSE, shape, jnp.result_type(p))
      self.tangents[leaf] = tangents_lib.materialize(v, self.words)
    t = self.tangents[leaf]
    if leaf not in self._dense:
      self._dense[leaf] = t.dense() if is_rank1(t) else t
    return self._dense[leaf]

  def view(self, v: View, deps: Sequence[Any] = ()) -> jax.Array:
    """The dense (k, *view shape) tangent of a view (the fallback), for a consumer of ``deps``."""
    t = self.dense_leaf(v.leaf, deps)
    return t.transpose((0, *(1 + p for p in v.perm))).astype(v.dtype)

  def rank1(self, leaf: int, a_dims: tuple[int, ...], rows: Callable[[], jax.Array]):
    """The leaf's tangent if it is (or is now drawn as) rank-1 over ``a_dims``, else None.

    ``rows()`` gives the layer's input batch as (rows, in) in the layout of ``a``:
    input-generated tangents take ``a`` from it.
    """
    if leaf not in self.tangents:
      p = self.leaves[leaf]
      shape, dtype = jnp.shape(p), jnp.result_type(p)
      a_shape = tuple(shape[d] for d in a_dims)
      b_dims = tuple(d for d in range(len(shape)) if d not in a_dims)
      b_shape = tuple(shape[d] for d in b_dims)
      if self.scheme == "rank1":
        a = draws.normal(self.words, leaf, draws.SALT_A, (self.k, *a_shape), dtype)
      else:
        a = _input_generated(self.words, leaf, self.k, rows(), self.scheme).astype(dtype)
        a = a.reshape(self.k, *a_shape)
      b = draws.normal(self.words, leaf, draws.SALT_B, (self.k, *b_shape), dtype)
      a, b = tangents_lib.materialize((a, b), self.words)
      self.tangents[leaf] = Rank1(a, b, tuple(a_dims), b_dims)
    t = self.tangents[leaf]
    if self.factored and is_rank1(t) and t.a_dims == tuple(a_dims):
      return t
    return None

  def batch(self) -> list[Any]:
    """Every leaf's tangent (dense Gaussian for leaves never consumed)."""
    return [
      self.tangents[i] if i in self.tangents else self.dense_leaf(i)
      for i in range(len(self.leaves))
    ]


class RegeneratedTangents(WeightTangents):
  """Dense hash tangents drawn at each consumer, after its other inputs, never kept.

  A layer's tangents then live only while its jvp runs (see ``tangents.after``); with
  ``gram`` the Gram matrix VᵀV is accumulated leaf by leaf as they pass.
  """

  def __init__(self, key, leaves, k, scheme, gram: bool, start: Any = 0):
    super().__init__(tangents_lib.key_words(key), leaves, k, scheme, factored=False)
    self.seeds = tangents_lib.leaf_seeds(key, leaves)
    self.start = start
    dt = jnp.float32
    for p in leaves:
      dt = jnp.promote_types(dt, jnp.result_type(p))
    self.gram = jnp.zeros((k, k), dt) if gram else None
    self.seen: set[int] = set()

  def dense_leaf(self, leaf: int, deps: Sequence[Any] = ()) -> jax.Array:
    v = tangents_lib.regenerate_leaf(
      self.seeds[leaf], self.leaves[leaf], self.k, self.scheme, deps, start=self.start
    )
    if self.gram is not None and leaf not in self.seen:
      m = v.reshape(self.k, -1).astype(self.gram.dtype)
      self.gram = self.gram + jnp.matmul(m, m.T, precision=lax.Precision.HIGHEST)
    self.seen.add(leaf)
    return v

  def rank1(self, leaf, a_dims, rows):
    del leaf, a_dims, rows  # dense tangents only: never factored, nothing to draw here
    return None

  def finish_gram(self, deps: Sequence[Any]) -> jax.Array | None:
    """The Gram matrix, with the leaves no op consumed (drawn after ``deps``) added."""
    for leaf in range(len(self.leaves)):
      if leaf not in self.seen:
        self.dense_leaf(leaf, deps)
    return self.gram


def _input_generated(words, leaf, k, u, scheme) -> jax.Array:
  """(k, in) rows a_i from the input batch u (rows, in): √m·Q columns (QR) or √rows·u_j/‖u_j‖."""
  u = lax.stop_gradient(u)
  rows = u.shape[0]
  u = u.astype(jnp.promote_types(u.dtype, jnp.float32))
  if scheme == "input":
    q, _ = jnp.linalg.qr(u.T)  # (in, m): an orthonormal basis of the inputs' span
    m = q.shape[1]
    pick = draws.uniform_index(words, leaf, draws.SALT_PICK, k, m)
    return np.sqrt(m) * q.T[pick]
  pick = draws.uniform_index(words, leaf, draws.SALT_PICK, k, rows)
  picked = u[pick]
  norm = jnp.linalg.norm(picked, axis=1, keepdims=True)
  return np.sqrt(rows) * picked / jnp.where(norm > 0, norm, 1.0)


def weights_pass(
  prog: Program,
  values: list[Any],
  n_leaves: int,
  store: WeightTangents,
  extra: Sequence[int] = (),
):
  """Evaluates the program with structured weight tangents; returns (out primals, out tangents).

  The tangents of the ids in ``extra`` (the marked local losses) follow the outputs'.
  """
  P: dict[int, Any] = dict(prog.consts)
  T: dict[int, Any] = {}
  for i, (pid, v) in enumerate(zip(prog.ins, values)):
    P[pid] = v
    if i < n_leaves:
      T[pid] = View(i, tuple(range(jnp.ndim(v))), jnp.result_type(v))
  k = store.k
  for op in prog.ops:
    ins_p = [P[i] for i in op.ins]
    ins_t = [T.get(i) for i in op.ins]
    view = [isinstance(t, View) for t in ins_t]
    view_rule = VIEW_RULES.get(op.prim)
    out_t: list[Any]
    if not any(t is not None for t in ins_t):
      out_p = bind(op, ins_p)
      out_t = [None] * len(op.outs)
    elif view_rule is not None and view[0] and len(op.ins) == 1:
      out_p = bind(op, ins_p)
      out_t = [view_rule(op, ins_t[0], out_p[0])]
    else:
      out_p, out_t = _eval_consumer(op, ins_p, ins_t, view, store, k)
    for o, p, t in zip(op.outs, out_p, out_t):
      P[o], T[o] = p, t
  outs_p = [P[i] for i in prog.outs]
  ids = [*prog.outs, *extra]
  outs_t = [store.view(T[i]) if isinstance(T.get(i), View) else T.get(i) for i in ids]
  return outs_p, outs_t


def _eval_consumer(op, ins_p, ins_t, view, store, k):
  """An op that consumes a parameter view: factored where it can be, densely otherwise."""
  rule = FACTORED_RULES.get(op.prim)
  factored_part = rule(op, ins_p, ins_t, view, store) if rule is not None else None
  if factored_part is not None:
    rest_t = [None if isinstance(t, View) else t for t in ins_t]
    out_p, out_t = jvp_op(op, ins_p, rest_t, k)
    total = factored_part if out_t[0] is None else out_t[0] + factored_part
    return out_p, [total.astype(jnp.result_type(out_p[0]))]
  live = []
  if isinstance(store, RegeneratedTangents):
    # A regenerated draw must follow the op's other inputs AND their tangents (tied to the
    # primal only, the draws ran ahead of the lagging tangent chain, all alive at once),
    # and the primal must wait for the tangents too (else the primal chain runs ahead and
    # every layer's activations wait, alive, for the tangent chain: 75 of them at batch 4096).
    tangents_in = [t for t in ins_t if not isinstance(t, View) and not is_zero(t)]
    ins_p = [
      p if isinstance(t, View) or not tangents_in else _tie(p, tangents_in)
      for p, t in zip(ins_p, ins_t)
    ]
    live = [p for p, t in zip(ins_p, ins_t) if not isinstance(t, View)] + tangents_in
  dense_t = [store.view(t, live) if isinstance(t, View) else t for t in ins_t]
  return jvp_op(op, ins_p, dense_t, k)


def _tie(x: Any, deps: Sequence[Any]) -> Any:
  """``x`` (a floating array) made to depend on ``deps``: x + 0, the 0 not provable by XLA.

  The value is unchanged except that −0.0 becomes +0.0 (in a parameter consumer's input,
  e.g. a matmul's activations, that changes nothing but the sign of exact-zero results).
  """
  if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)):
    return x
  zero = tangents_lib.after(jnp.zeros((), jnp.uint32), *deps)
  return x + zero.astype(x.dtype)


def weight_tangents_and_jvps(
  fun: Callable[..., Any],
  params: PyTree,
  args: tuple,
  kwargs: dict,
  *,
  key: jax.Array,
  num_tangents: int,
  tangents: str,
  factored: bool = True,
  with_losses: bool = False,
):
  """Structured weight tangents: (outputs, directional derivatives (k, ...), tangent batch).

  The tangent batch has params' structure; rank-1 leaves are :class:`~fwdgrad_jax.tangents.Rank1`
  objects. ``factored=False`` densifies every rank-1 tangent at its use (the fallback path,
  for tests: the estimate must be identical). ``with_losses=True`` appends
  :func:`local_losses_of` the pass (the marked losses' d, read from the same pass).
  """
  leaves, treedef = jax.tree.flatten(params)
  prog, flat_args, out_tree = trace(fun, params, args, kwargs)
  store = WeightTangents(tangents_lib.key_words(key), leaves, num_tangents, tangents, factored)
  losses = credit.loss_ids(prog) if with_losses else []
  outs_p, outs_t = weights_pass(prog, leaves + flat_args, len(leaves), store, losses)
  batch = jax.tree.unflatten(treedef, store.batch())
  d = outs_t[0]
  if d is None:  # the value does not depend on params
    d = jnp.zeros((num_tangents,), jnp.result_type(outs_p[0]))
  out = jax.tree.unflatten(out_tree, outs_p)
  if with_losses:
    return out, d, batch, local_losses_of(prog, len(leaves), losses, outs_t[len(prog.outs) :])
  return out, d, batch


def local_losses_of(prog: Program, n_leaves: int, losses: Sequence[int], loss_jvps: Sequence[Any]):
  """(for each parameter leaf the marked losses it does not reach, the losses' d or None).

  Without markers: every leaf reaches all (none) of them, ``([(), …], [])``.
  """
  return credit.unreached(prog, prog.ins[:n_leaves], losses), list(loss_jvps)


def regenerated_jvps(
  fun: Callable[..., Any],
  params: PyTree,
  args: tuple,
  kwargs: dict,
  *,
  key: jax.Array,
  num_tangents: int,
  tangents: str,
  gram: bool = False,
  with_losses: bool = False,
  start: Any = 0,
):
  """Dense weight tangents regenerated from the key: (outputs, d (k,), VᵀV or None).

  The tangents are those of ``tangents_lib.sample(key, params, k, tangents)``; each
  leaf's are drawn where it is consumed and dropped after its jvp, so the pass holds
  one layer's tangents at a time. The caller redraws them for the aggregation
  (``tangents_lib.regenerate_leaf`` after the coefficients). ``with_losses=True`` appends
  :func:`local_losses_of` the pass. ``start``: the tangents start … start + k − 1 of a
  larger batch (a device's share on a mesh's tangent axis; the Gram matrix is then that
  share's, see :func:`regenerated_gram` for all of them).
  """
  leaves = jax.tree.leaves(params)
  prog, flat_args, out_tree = trace(fun, params, args, kwargs)
  store = RegeneratedTangents(key, leaves, num_tangents, tangents, gram, start)
  losses = credit.loss_ids(prog) if with_losses else []
  outs_p, outs_t = weights_pass(prog, leaves + flat_args, len(leaves), store, losses)
  d = outs_t[0]
  if d is None:  # the value does not depend on params
    d = jnp.zeros((num_tangents,), jnp.result_type(outs_p[0]))
  loss_jvps = outs_t[len(prog.outs) :]
  g = store.finish_gram([d, *(t for t in loss_jvps if t is not None)]) if gram else None
  out = jax.tree.unflatten(out_tree, outs_p)
  if with_losses:
    return out, d, g, local_losses_of(prog, len(leaves), losses, loss_jvps)
  return out, d, g


def regenerated_gram(
  key: jax.Array, params: PyTree, num_tangents: int, tangents: str, deps: Sequence[Any] = ()
) -> jax.Array:
  """VᵀV of the k regenerated tangents, drawn leaf by leaf after ``deps`` (no jvp).

  For a device that ran only its share of the tangents (tangent parallelism): with the
  shared key it redraws all k and forms the k × k matrix itself, one leaf's tangents at a
  time, instead of receiving the other devices' tangents.
  """
  store = RegeneratedTangents(key, jax.tree.leaves(params), num_tangents, tangents, gram=True)
  return store.finish_gram(deps)
