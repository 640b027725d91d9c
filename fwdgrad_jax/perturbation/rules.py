"""Per-primitive rules of the two passes, in tables keyed by the primitive objects.

As ``jax.experimental.jet``'s ``jet_rules[prim] = rule``: a primitive with no entry is
evaluated by ``jax.jvp`` of its own rule with dense tangents, so a table entry is only
ever a faster (never a different) way to the same tangent.

* :data:`VIEW_RULES`: ops that leave a parameter leaf a *view* of itself (a cast, a copy,
  a transpose, a site marker), so that its consumer still sees which leaf it reads.
* :data:`FACTORED_RULES`: linear ops that apply a rank-1 tangent a ⊗ b of their parameter
  operand without forming it, (x·a) ⊗ b.
* :data:`LINEAR_PRIMITIVES`: the ops whose outputs are activities (activity pass).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fwdgrad_jax.perturbation.markers import local_loss_p, site_p
from fwdgrad_jax.perturbation.program import Op
from fwdgrad_jax.tangents import Rank1

# --------------------------------------------------------------------------------------
# Views of a parameter leaf
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class View:
  """A value that is parameter leaf ``leaf`` transposed by ``perm`` (view axis j = leaf axis perm[j])."""

  leaf: int
  perm: tuple[int, ...]
  dtype: Any


def _same_view(op: Op, v: View, out: Any) -> View:
  del op
  return View(v.leaf, v.perm, jnp.result_type(out))


def _transposed_view(op: Op, v: View, out: Any) -> View:
  del out
  return View(v.leaf, tuple(v.perm[p] for p in op.params["permutation"]), v.dtype)


#: rule(op, view of its only operand, its primal output) -> the output's view.
VIEW_RULES: dict[Any, Callable[[Op, View, Any], View]] = {
  lax.convert_element_type_p: _same_view,
  lax.copy_p: _same_view,
  site_p: _same_view,
  local_loss_p: _same_view,
  lax.transpose_p: _transposed_view,
}


# --------------------------------------------------------------------------------------
# Factored rank-1 tangents through linear ops
# --------------------------------------------------------------------------------------


def _dot_rows(x: jax.Array, x_axes: Sequence[int]) -> jax.Array:
  """x as (rows, in): the contracted axes last (in pairing order), everything else rows."""
  other = [d for d in range(x.ndim) if d not in x_axes]
  return x.transpose(other + list(x_axes)).reshape(-1, math.prod(x.shape[d] for d in x_axes))


def _conv_rows(op: Op, x: jax.Array, view_shape: Sequence[int]) -> jax.Array:
  """The conv's input patches as (rows, in), ``in`` in the kernel's view-axis order."""
  dn = op.params["dimension_numbers"]
  in_w, spatial_w = dn.rhs_spec[1], dn.rhs_spec[2:]
  ksize = tuple(view_shape[d] for d in spatial_w)
  patches = lax.conv_general_dilated_patches(
    x,
    ksize,
    op.params["window_strides"],
    op.params["padding"],
    lhs_dilation=op.params["lhs_dilation"],
    rhs_dilation=op.params["rhs_dilation"],
    dimension_numbers=dn,
  )
  # Patch features are ordered (in-channel, *window in rhs_spec order).
  feat = dn.out_spec[1]
  rows = jnp.moveaxis(patches, feat, -1).reshape(-1, patches.shape[feat])
  rows = rows.reshape(-1, view_shape[in_w], *ksize)
  src = [in_w, *spatial_w]
  order = sorted(src)  # the kernel's contracted axes in view order
  rows = rows.transpose(0, *(1 + src.index(d) for d in order))
  return rows.reshape(rows.shape[0], -1)


def _dot_factored(op: Op, x, t: Rank1, w_is_rhs: bool, perm: tuple[int, ...]) -> jax.Array:
  """dot_general(x, a_i ⊗ b_i) for every i as (x·a_i) ⊗ b_i, in the op's output layout."""
  (lc, rc), _ = op.params["dimension_numbers"]
  wc, xc = (rc, lc) if w_is_rhs else (lc, rc)
  k = t.num_tangents
  # a's axes follow t.a_dims = perm[wc] in pairing order, so a contracts with xc in order.
  out_dtype = op.params.get("preferred_element_type") or jnp.result_type(x, t.a)
  xa = lax.dot_general(
    t.a,
    x,
    ((tuple(range(1, 1 + len(xc))), tuple(xc)), ((), ())),
    precision=op.params.get("precision"),
    preferred_element_type=out_dtype,
  )  # (k, *x free axes)
  view_free = [d for d in range(len(perm)) if d not in wc]
  b = t.b.transpose((0, *(1 + t.b_dims.index(perm[d]) for d in view_free)))
  nx, nb = xa.ndim - 1, b.ndim - 1
  xa = xa.reshape(k, *xa.shape[1:], *([1] * nb))
  if w_is_rhs:
    return xa * b.reshape(k, *([1] * nx), *b.shape[1:]).astype(out_dtype)
  # W on the left: its free axes come first in dot_general's output.
  xa = xa.reshape(k, *([1] * nb), *xa.shape[1 : 1 + nx])
  return b.reshape(k, *b.shape[1:], *([1] * nx)).astype(out_dtype) * xa


def _conv_factored(op: Op, x, t: Rank1, perm: tuple[int, ...]) -> jax.Array:
  """conv(x, a_i ⊗ b_i) = conv(x, a_i) ⊗ b_i: a one-output-channel conv per tangent."""
  dn = op.params["dimension_numbers"]
  out_dim_w, out_dim_o = dn.rhs_spec[0], dn.out_spec[1]
  k = t.num_tangents
  # a as a kernel in the op's (view) layout with a size-1 output-feature axis.
  view_shape = [t.shape[perm[d]] for d in range(len(perm))]
  view_shape[out_dim_w] = 1
  order = [perm[d] for d in range(len(perm)) if d != out_dim_w]  # leaf axes, view order
  a = t.a.transpose((0, *(1 + t.a_dims.index(d) for d in order)))
  kernel = a.reshape(k, *view_shape)
  params = {n: v for n, v in op.params.items() if n != "dimension_numbers"}

  def conv_one(kern):
    return lax.conv_general_dilated_p.bind(x, kern, dimension_numbers=dn, **params)

  xa = jax.vmap(conv_one)(kernel)  # (k, *out shape with 1 output channel)
  bshape = [1] * (xa.ndim - 1)
  bshape[out_dim_o] = t.b.shape[1]
  return xa * t.b.reshape(k, *bshape).astype(xa.dtype)


def _dot_rule(op: Op, ins_p, ins_t, view: list[bool], store) -> jax.Array | None:
  if sum(view) != 1:
    return None
  w = view.index(True)
  (lc, rc), (lb, rb) = op.params["dimension_numbers"]
  wc, xc, wb = (rc, lc, rb) if w == 1 else (lc, rc, lb)
  v = ins_t[w]
  if wb:
    return None
  x = ins_p[1 - w]
  t = store.rank1(v.leaf, tuple(v.perm[d] for d in wc), lambda: _dot_rows(x, xc))
  if t is None:
    return None
  return _dot_factored(op, ins_p[1 - w], t, w == 1, v.perm)


def _conv_rule(op: Op, ins_p, ins_t, view: list[bool], store) -> jax.Array | None:
  if (
    view != [False, True]
    or op.params["feature_group_count"] != 1
    or op.params["batch_group_count"] != 1
  ):
    return None
  v = ins_t[1]
  dn = op.params["dimension_numbers"]
  wc = tuple(d for d in range(len(v.perm)) if d != dn.rhs_spec[0])
  x = ins_p[0]
  view_shape = [store.leaves[v.leaf].shape[v.perm[d]] for d in range(len(v.perm))]
  t = store.rank1(v.leaf, tuple(v.perm[d] for d in wc), lambda: _conv_rows(op, x, view_shape))
  if t is None:
    return None
  return _conv_factored(op, ins_p[0], t, v.perm)


#: rule(op, primal ins, tangent ins (views where a parameter), which ins are views, the
#: weight-tangent store) -> the output tangent of the viewed operand, (k, *out), or None
#: where the op's parameter operand cannot take a factored tangent (then it is densified).
FACTORED_RULES: dict[Any, Callable[..., jax.Array | None]] = {
  lax.dot_general_p: _dot_rule,
  lax.conv_general_dilated_p: _conv_rule,
}

#: Parameter consumers whose outputs are activities; a program must have one for the
#: activity pass.
LINEAR_PRIMITIVES = frozenset({lax.dot_general_p, lax.conv_general_dilated_p})
