"""Where tangents enter: structured weight tangents and activity perturbation, for any JAX function.

A dense forward gradient perturbs every weight with an i.i.d. tangent. The schemes that
make forward gradients work change *where the tangent enters the network*; this module
does that in true forward mode (``jax.jvp`` rules, no simulation with backprop) for an
arbitrary function ``fun(params, *args)``:

* ``tangents="rank1"``: a parameter leaf W consumed by a ``dot_general`` or a
  ``conv_general_dilated`` (what ``@``, ``jnp.einsum``, ``nnx.Linear``, ``nnx.Conv``
  lower to) gets the tangent a ⊗ b, a Gaussian over the contracted (input) axes and b
  Gaussian over the output axes. E[vvᵀ] = E[aaᵀ] ⊗ E[bbᵀ] = I keeps the estimate
  unbiased, and x·(a ⊗ b) = (x·a) ⊗ b costs O(batch·(in + out)) instead of
  O(batch·in·out): the factored tangent never meets a full matmul.
* ``tangents="input"``: Yao's input-generated tangents, a taken from the layer's input
  batch u (rows × in): a = √m · q_j, q_j a uniformly drawn column of Q in uᵀ = QR
  (m = rank = min(rows, in)). E[aaᵀ] = Q Qᵀ is the projector onto the span of the
  inputs, which holds the minibatch gradient of W (∇W = uᵀ ∂f/∂z), so with b ~ N(0, I)
  the estimate is unbiased for the minibatch gradient; the factor √m is Yao's "multiply
  by the batch size" (m = batch size when the batch is smaller than the fan-in).
* ``tangents="input_approx"``: Yao's cheap approximation, a = √rows · u_j / ‖u_j‖ for a
  uniformly drawn input row j (no QR). It equals the QR scheme — and is unbiased — when
  the rows are orthogonal; for correlated inputs it is biased toward the dominant input
  directions (E[aaᵀ] = Σ_j û_j û_jᵀ instead of a projector). Yao's argument is that
  high-dimensional rows are nearly orthogonal.
* ``perturbation="activity"`` (Ren et al. 2023; Flügel et al.'s network runs): the
  tangents enter at the *outputs* z of every parameter-consuming op (a bias added right
  after is part of that output), weights carry none. The directional derivative
  estimates ∇_z; the parameters' estimate is the local VJP of the op at that estimate
  (for z = x·W: ĝ_W = xᵀ ĝ_z) — no backward pass through the network. With per-example
  losses (``fun`` returns shape (batch,)) every example has its own directional
  derivative, so the dimension perturbed per example is its number of activations.
* :func:`site`: an identity marker on a block's output (Flügel's "layers"). With marked
  sites, activity tangents enter there only, and the parameters inside a block get their
  estimate by a local VJP within the block.

Mechanism: a small interpreter over ``fun``'s jaxpr. ``jax.make_jaxpr`` gives the
program; ``jit``/``remat`` calls are inlined; each parameter leaf is followed through
``convert_element_type``/``transpose``/``copy`` to the op that consumes it; every other
equation is evaluated by ``jax.jvp`` of its own primitive with the k tangents vmapped
and the primal unbatched (so the forward pass runs once, whatever k). Why a jaxpr
interpreter and not markers or a custom Flax module: it works for *any* JAX function —
plain ``@``, ``einsum``, NNX and Linen models alike — without the model's cooperation,
and what it does not understand it handles exactly instead of refusing: where a
rank-1 leaf is consumed by anything else (a weight-decay term, a ``scan``, a ``cond``,
a custom derivative rule) that use gets the dense form a ⊗ b of the *same* tangent —
the identical estimate, only slower. Activity sites need no markers either; markers
only coarsen them into blocks.

References:
  Baydin et al., 2022. Gradients without Backpropagation. arXiv:2202.08587.
  Ren et al., 2023. Scaling Forward Gradient With Local Losses. ICLR 2023.
  Flügel et al., 2024. Multi-Tangent Forward Gradients. arXiv:2410.17764.
  Yao. Studies on Forward Mode Gradient Descent (input-generated tangents).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fwdgrad_jax import tangents as tangents_lib

PyTree = Any

#: Where the tangents enter.
PERTURBATIONS = ("weights", "activity")
#: Weight-tangent schemes handled here (structured by the op that consumes the leaf).
STRUCTURED_TANGENTS = ("rank1", "input", "input_approx")
#: Distributions of the activity tangents.
ACTIVITY_TANGENTS = ("normal", "rademacher")

_SITE_NAME = "fwdgrad_site"
# Up to this many rank-1 tangents, their combination is written as a fusible sum of
# outer products rather than an (in×k)·(k×out) matmul.
_ELEMENTWISE_COMBINE = 1


# --------------------------------------------------------------------------------------
# The site marker
# --------------------------------------------------------------------------------------


@jax.custom_jvp
def fwdgrad_site(x: jax.Array) -> jax.Array:
  return x


@fwdgrad_site.defjvp
def _site_jvp(primals, tangents):
  return primals[0], tangents[0]


def site(x: PyTree) -> PyTree:
  """Marks ``x`` (an array or a pytree of arrays) as a block output for activity perturbation.

  The identity everywhere (under ``jit``, ``grad``, ``vmap``, in any estimator); only
  ``value_and_forward_grad(..., perturbation="activity")`` reads it: when a function
  has marked sites, the activity tangents enter at those sites instead of at every
  parameter-consuming op, and the parameters between two sites get their estimate by a
  local VJP of that block.

  Args:
    x: the block's output (a layer, a residual stage, an encoder layer).

  Returns:
    ``x`` unchanged.
  """
  return jax.tree.map(fwdgrad_site, x)


# --------------------------------------------------------------------------------------
# Rank-1 tangents
# --------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Rank1:
  """A batch of k rank-1 tangents a_i ⊗ b_i of one parameter leaf of ``shape``.

  Attributes:
    a: (k, *[shape[d] for d in a_dims]), over the contracted (input) axes.
    b: (k, *[shape[d] for d in b_dims]), over the other (output) axes.
    a_dims, b_dims: which axes of the leaf each factor spans; together all of them.
  """

  a: jax.Array
  b: jax.Array
  a_dims: tuple[int, ...]
  b_dims: tuple[int, ...]

  def tree_flatten(self):
    return (self.a, self.b), (self.a_dims, self.b_dims)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def num_tangents(self) -> int:
    return self.a.shape[0]

  @property
  def shape(self) -> tuple[int, ...]:
    sizes = dict(zip(self.a_dims, self.a.shape[1:])) | dict(zip(self.b_dims, self.b.shape[1:]))
    return tuple(sizes[d] for d in range(len(sizes)))

  @property
  def dtype(self):
    return self.a.dtype

  def _arrange(self, ab: jax.Array, lead: int) -> jax.Array:
    """(lead axes, *a axes, *b axes) → (lead axes, *leaf axes)."""
    order = self.a_dims + self.b_dims
    perm = list(range(lead)) + [lead + order.index(d) for d in range(len(order))]
    return ab.transpose(perm)

  def dense(self) -> jax.Array:
    """The tangents as one dense (k, *shape) array."""
    k = self.num_tangents
    outer = self.a.reshape(k, -1)[:, :, None] * self.b.reshape(k, 1, -1)
    return self._arrange(outer.reshape(k, *self.a.shape[1:], *self.b.shape[1:]), 1)

  def gram(self) -> jax.Array:
    """The k×k Gram matrix ⟨a_i⊗b_i, a_j⊗b_j⟩ = ⟨a_i, a_j⟩⟨b_i, b_j⟩ (in float32 or wider)."""
    dt = jnp.promote_types(self.a.dtype, jnp.float32)
    a = self.a.reshape(self.num_tangents, -1).astype(dt)
    b = self.b.reshape(self.num_tangents, -1).astype(dt)
    hi = lax.Precision.HIGHEST
    return jnp.matmul(a, a.T, precision=hi) * jnp.matmul(b, b.T, precision=hi)

  def combine(self, c: jax.Array) -> jax.Array:
    """Σ_i c_i a_i ⊗ b_i as a dense array of the leaf's shape: one (in×k)·(k×out) product."""
    k = self.num_tangents
    a = self.a.reshape(k, -1) * c.astype(self.a.dtype)[:, None]
    b = self.b.reshape(k, -1)
    if k <= _ELEMENTWISE_COMBINE:
      # A sum of k outer products is elementwise, so XLA fuses it into the consumer (the
      # optimizer's update) instead of writing a weight-sized matmul result first.
      ab = sum(a[i][:, None] * b[i][None, :] for i in range(k))
    else:
      ab = jnp.matmul(a.T, b, precision=lax.Precision.HIGHEST)
    return self._arrange(ab.reshape(*self.a.shape[1:], *self.b.shape[1:]), 0)

  def scale(self, s: jax.Array) -> Rank1:
    """Tangent i scaled by s_i (the scale goes on a)."""
    s = s.astype(self.a.dtype).reshape((-1,) + (1,) * (self.a.ndim - 1))
    return dataclasses.replace(self, a=self.a * s)


def is_rank1(x: Any) -> bool:
  """Whether a tangent-batch leaf is a factored :class:`Rank1` batch."""
  return isinstance(x, Rank1)


# --------------------------------------------------------------------------------------
# The program: a flat list of ops (jit and remat calls inlined)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Op:
  prim: Any  # a jax Primitive, or "site"
  params: dict[str, Any]
  ins: list[int]
  outs: list[int]  # -1 for a dropped output
  shapes: list[tuple[int, ...]]  # of outs


@dataclasses.dataclass
class _Program:
  ops: list[_Op]
  consts: dict[int, Any]  # id -> value (closed-over constants and literals)
  ins: list[int]
  outs: list[int]
  num_ids: int


def _is_dropvar(v: Any) -> bool:
  return type(v).__name__ == "DropVar"


def _is_literal(v: Any) -> bool:
  return type(v).__name__ == "Literal"


def _is_site(eqn: Any) -> bool:
  """Whether a ``custom_jvp_call`` equation is a :func:`site` marker (by the function's name)."""
  name = eqn.params.get("name")
  if name is None:
    debug = getattr(eqn.params["call_jaxpr"].jaxpr, "debug_info", None)
    name = (getattr(debug, "func_src_info", None) or "").split(" ")[0]
  return name == _SITE_NAME


def _flatten_program(closed: Any) -> _Program:
  """Inlines ``jit``/``remat`` calls and turns site markers into ``"site"`` ops."""
  ops: list[_Op] = []
  consts: dict[int, Any] = {}
  counter = [0]

  def fresh() -> int:
    counter[0] += 1
    return counter[0] - 1

  def walk(jaxpr, const_vals, in_ids) -> list[int]:
    env: dict[Any, int] = {}
    for v, c in zip(jaxpr.constvars, const_vals):
      i = fresh()
      consts[i] = c
      env[v] = i
    for v, i in zip(jaxpr.invars, in_ids):
      env[v] = i

    def read(v) -> int:
      if _is_literal(v):
        i = fresh()
        consts[i] = v.val
        return i
      return env[v]

    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      name = eqn.primitive.name
      if name in ("jit", "pjit"):
        inner = eqn.params["jaxpr"]
        outs = walk(inner.jaxpr, inner.consts, ins)
      elif name in ("remat2", "checkpoint", "remat"):
        outs = walk(eqn.params["jaxpr"], [], ins)
      elif name == "custom_jvp_call" and _is_site(eqn):
        outs = [fresh()]
        ops.append(_Op("site", {}, ins, outs, [tuple(eqn.outvars[0].aval.shape)]))
      else:
        outs = [fresh() for _ in eqn.outvars]
        shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
        ops.append(_Op(eqn.primitive, dict(eqn.params), ins, outs, shapes))
      for v, i in zip(eqn.outvars, outs):
        if not _is_dropvar(v):
          env[v] = i
    return [read(v) for v in jaxpr.outvars]

  in_ids = [fresh() for _ in closed.jaxpr.invars]
  out_ids = walk(closed.jaxpr, closed.consts, in_ids)
  return _Program(ops, consts, in_ids, out_ids, counter[0])


def _bind(op: _Op, args: Sequence[Any]) -> list[Any]:
  """Evaluates one op on values (primal only, or under an outer jvp/vmap trace)."""
  if op.prim == "site":
    return [args[0]]
  out = op.prim.bind(*args, **_bind_params(op))
  return list(out) if op.prim.multiple_results else [out]


def _bind_params(op: _Op) -> dict[str, Any]:
  # jax >= 0.7 returns the params only; older versions (subfuns, params).
  params = op.prim.get_bind_params(op.params)
  if isinstance(params, tuple):
    subfuns, params = params
    if subfuns:
      raise NotImplementedError(f"{op.prim} needs subfuns to be rebound")
  return params


def _jvp_op(op: _Op, primals: Sequence[Any], tangents: Sequence[Any], k: int):
  """(primal outs, tangent outs (k, ...) or None) of one op; the primal once, tangents vmapped."""
  live = [i for i, t in enumerate(tangents) if t is not None]
  if not live:
    return _bind(op, primals), [None] * len(op.outs)

  def f(*live_primals):
    args = list(primals)
    for i, p in zip(live, live_primals):
      args[i] = p
    return _bind(op, args)

  live_p = [primals[i] for i in live]
  live_t = [tangents[i] for i in live]
  if k == 1:
    # vmap over a size-1 axis batches every tangent op, which XLA:CPU runs slower.
    out_p, out_t = jax.jvp(f, live_p, [t[0] for t in live_t])
    out_t = [None if _is_zero(t) else t[None] for t in out_t]
    return out_p, out_t

  def one(ts):
    return jax.jvp(f, live_p, list(ts))

  out_p, out_t = jax.vmap(one, out_axes=(None, 0))(live_t)
  return out_p, list(out_t)


def _is_zero(t: Any) -> bool:
  return t is None or type(t).__name__ == "SymbolicZero"


# --------------------------------------------------------------------------------------
# Random draws (counter hash, as the dense samplers)
# --------------------------------------------------------------------------------------


def _key_words(key: jax.Array) -> jax.Array:
  words = key if key.dtype == jnp.uint32 else jax.random.key_data(key)
  return words.reshape(-1)


def _seed(words: jax.Array, index: int, salt: int) -> jax.Array:
  """Two uint32 hash seeds for draw ``index`` of kind ``salt`` (independent per pair)."""
  mix = tangents_lib._fmix32
  i = jnp.uint32((2 * index + 1) * 0x9E3779B1 % (1 << 32))
  s = jnp.uint32(salt)
  return jnp.stack([mix(words[0] ^ mix(i ^ s)), mix(words[-1] + mix(i + s + 1))])


def _normal(words, index, salt, shape, dtype) -> jax.Array:
  return tangents_lib._normal_leaf(_seed(words, index, salt), shape, dtype)


def _rademacher(words, index, salt, shape, dtype) -> jax.Array:
  return tangents_lib._rademacher_leaf(_seed(words, index, salt), shape, dtype)


def _uniform_index(words, index, salt, k: int, size: int) -> jax.Array:
  """k indices uniform in [0, size)."""
  bits = tangents_lib._hash_bits(_seed(words, index, salt), k)
  # 53-bit-free: a float in [0, 1) from the top 24 bits, floored; bias < size / 2^24.
  u = (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
  return jnp.minimum((u * size).astype(jnp.int32), size - 1)


_SALT_DENSE, _SALT_A, _SALT_B, _SALT_PICK, _SALT_SITE = 1, 2, 3, 4, 5


# --------------------------------------------------------------------------------------
# Weight perturbation with structured tangents
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _View:
  """A value that is parameter leaf ``leaf`` transposed by ``perm`` (view axis j = leaf axis perm[j])."""

  leaf: int
  perm: tuple[int, ...]
  dtype: Any


class _WeightTangents:
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
      v = _normal(self.words, leaf, _SALT_DENSE, shape, jnp.result_type(p))
      self.tangents[leaf] = tangents_lib.materialize(v, self.words)
    t = self.tangents[leaf]
    if leaf not in self._dense:
      self._dense[leaf] = t.dense() if is_rank1(t) else t
    return self._dense[leaf]

  def view(self, v: _View, deps: Sequence[Any] = ()) -> jax.Array:
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
        a = _normal(self.words, leaf, _SALT_A, (self.k, *a_shape), dtype)
      else:
        a = _input_generated(self.words, leaf, self.k, rows(), self.scheme).astype(dtype)
        a = a.reshape(self.k, *a_shape)
      b = _normal(self.words, leaf, _SALT_B, (self.k, *b_shape), dtype)
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


class _RegeneratedTangents(_WeightTangents):
  """Dense hash tangents drawn at each consumer, after its other inputs, never kept.

  A layer's tangents then live only while its jvp runs (see ``tangents.after``); with
  ``gram`` the Gram matrix VᵀV is accumulated leaf by leaf as they pass.
  """

  def __init__(self, key, leaves, k, scheme, gram: bool):
    super().__init__(_key_words(key), leaves, k, scheme, factored=False)
    self.seeds = tangents_lib.leaf_seeds(key, leaves)
    dt = jnp.float32
    for p in leaves:
      dt = jnp.promote_types(dt, jnp.result_type(p))
    self.gram = jnp.zeros((k, k), dt) if gram else None
    self.seen: set[int] = set()

  def dense_leaf(self, leaf: int, deps: Sequence[Any] = ()) -> jax.Array:
    v = tangents_lib.regenerate_leaf(self.seeds[leaf], self.leaves[leaf], self.k, self.scheme, deps)
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
):
  """Dense weight tangents regenerated from the key: (outputs, d (k,), VᵀV or None).

  The tangents are those of ``tangents_lib.sample(key, params, k, tangents)``; each
  leaf's are drawn where it is consumed and dropped after its jvp, so the pass holds
  one layer's tangents at a time. The caller redraws them for the aggregation
  (``tangents_lib.regenerate_leaf`` after the coefficients).
  """
  leaves = jax.tree.leaves(params)
  prog, flat_args, out_tree = _trace(fun, params, args, kwargs)
  store = _RegeneratedTangents(key, leaves, num_tangents, tangents, gram)
  outs_p, outs_t = _weights_pass(prog, leaves + flat_args, len(leaves), store)
  d = outs_t[0]
  if d is None:  # the value does not depend on params
    d = jnp.zeros((num_tangents,), jnp.result_type(outs_p[0]))
  g = store.finish_gram([d]) if gram else None
  return jax.tree.unflatten(out_tree, outs_p), d, g


def _input_generated(words, leaf, k, u, scheme) -> jax.Array:
  """(k, in) rows a_i from the input batch u (rows, in): √m·Q columns (QR) or √rows·u_j/‖u_j‖."""
  u = lax.stop_gradient(u)
  rows = u.shape[0]
  u = u.astype(jnp.promote_types(u.dtype, jnp.float32))
  if scheme == "input":
    q, _ = jnp.linalg.qr(u.T)  # (in, m): an orthonormal basis of the inputs' span
    m = q.shape[1]
    pick = _uniform_index(words, leaf, _SALT_PICK, k, m)
    return np.sqrt(m) * q.T[pick]
  pick = _uniform_index(words, leaf, _SALT_PICK, k, rows)
  picked = u[pick]
  norm = jnp.linalg.norm(picked, axis=1, keepdims=True)
  return np.sqrt(rows) * picked / jnp.where(norm > 0, norm, 1.0)


def _dot_rows(x: jax.Array, x_axes: Sequence[int]) -> jax.Array:
  """x as (rows, in): the contracted axes last (in pairing order), everything else rows."""
  other = [d for d in range(x.ndim) if d not in x_axes]
  return x.transpose(other + list(x_axes)).reshape(-1, math.prod(x.shape[d] for d in x_axes))


def _conv_rows(op: _Op, x: jax.Array, view_shape: Sequence[int]) -> jax.Array:
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


def _dot_factored(op: _Op, x, t: Rank1, w_is_rhs: bool, perm: tuple[int, ...]) -> jax.Array:
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


def _conv_factored(op: _Op, x, t: Rank1, perm: tuple[int, ...]) -> jax.Array:
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


def _weights_pass(prog: _Program, values: list[Any], n_leaves: int, store: _WeightTangents):
  """Evaluates the program with structured weight tangents; returns (out primals, out tangents)."""
  P: dict[int, Any] = dict(prog.consts)
  T: dict[int, Any] = {}
  for i, (pid, v) in enumerate(zip(prog.ins, values)):
    P[pid] = v
    if i < n_leaves:
      T[pid] = _View(i, tuple(range(jnp.ndim(v))), jnp.result_type(v))
  k = store.k
  for op in prog.ops:
    ins_p = [P[i] for i in op.ins]
    ins_t = [T.get(i) for i in op.ins]
    name = op.prim if op.prim == "site" else op.prim.name
    view = [isinstance(t, _View) for t in ins_t]
    out_t: list[Any]
    if not any(t is not None for t in ins_t):
      out_p = _bind(op, ins_p)
      out_t = [None] * len(op.outs)
    elif (
      view[0] and len(op.ins) == 1 and name in ("convert_element_type", "copy", "copy_p", "site")
    ):
      out_p = _bind(op, ins_p)
      v = ins_t[0]
      out_t = [_View(v.leaf, v.perm, jnp.result_type(out_p[0]))]
    elif view[0] and len(op.ins) == 1 and name == "transpose":
      out_p = _bind(op, ins_p)
      v = ins_t[0]
      out_t = [_View(v.leaf, tuple(v.perm[p] for p in op.params["permutation"]), v.dtype)]
    else:
      out_p, out_t = _eval_consumer(op, name, ins_p, ins_t, view, store, k)
    for o, p, t in zip(op.outs, out_p, out_t):
      P[o], T[o] = p, t
  outs_p = [P[i] for i in prog.outs]
  outs_t = [store.view(T[i]) if isinstance(T.get(i), _View) else T.get(i) for i in prog.outs]
  return outs_p, outs_t


def _eval_consumer(op, name, ins_p, ins_t, view, store, k):
  """An op that consumes a parameter view: factored where it can be, densely otherwise."""
  factored_part = None
  if name == "dot_general" and sum(view) == 1:
    w = view.index(True)
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    wc, xc, wb = (rc, lc, rb) if w == 1 else (lc, rc, lb)
    v = ins_t[w]
    if not wb:
      x = ins_p[1 - w]
      t = store.rank1(v.leaf, tuple(v.perm[d] for d in wc), lambda: _dot_rows(x, xc))
      if t is not None:
        factored_part = _dot_factored(op, ins_p[1 - w], t, w == 1, v.perm)
  elif (
    name == "conv_general_dilated"
    and view == [False, True]
    and op.params["feature_group_count"] == 1
    and op.params["batch_group_count"] == 1
  ):
    v = ins_t[1]
    dn = op.params["dimension_numbers"]
    wc = tuple(d for d in range(len(v.perm)) if d != dn.rhs_spec[0])
    x = ins_p[0]
    view_shape = [store.leaves[v.leaf].shape[v.perm[d]] for d in range(len(v.perm))]
    t = store.rank1(v.leaf, tuple(v.perm[d] for d in wc), lambda: _conv_rows(op, x, view_shape))
    if t is not None:
      factored_part = _conv_factored(op, ins_p[0], t, v.perm)
  if factored_part is not None:
    rest_t = [None if isinstance(t, _View) else t for t in ins_t]
    out_p, out_t = _jvp_op(op, ins_p, rest_t, k)
    total = factored_part if out_t[0] is None else out_t[0] + factored_part
    return out_p, [total.astype(jnp.result_type(out_p[0]))]
  live = []
  if isinstance(store, _RegeneratedTangents):
    # A regenerated draw must follow the op's other inputs AND their tangents (tied to the
    # primal only, the draws ran ahead of the lagging tangent chain, all alive at once),
    # and the primal must wait for the tangents too (else the primal chain runs ahead and
    # every layer's activations wait, alive, for the tangent chain: 75 of them at batch 4096).
    tangents_in = [t for t in ins_t if not isinstance(t, _View) and not _is_zero(t)]
    ins_p = [
      p if isinstance(t, _View) or not tangents_in else _tie(p, tangents_in)
      for p, t in zip(ins_p, ins_t)
    ]
    live = [p for p, t in zip(ins_p, ins_t) if not isinstance(t, _View)] + tangents_in
  dense_t = [store.view(t, live) if isinstance(t, _View) else t for t in ins_t]
  return _jvp_op(op, ins_p, dense_t, k)


def _tie(x: Any, deps: Sequence[Any]) -> Any:
  """``x`` (a floating array) made to depend on ``deps``: x + 0, the 0 not provable by XLA.

  The value is unchanged except that −0.0 becomes +0.0 (in a parameter consumer's input,
  e.g. a matmul's activations, that changes nothing but the sign of exact-zero results).
  """
  if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)):
    return x
  zero = tangents_lib.after(jnp.zeros((), jnp.uint32), *deps)
  return x + zero.astype(x.dtype)


# --------------------------------------------------------------------------------------
# Activity perturbation
# --------------------------------------------------------------------------------------

_PARAM, _DATA = 1, 2


@dataclasses.dataclass
class _Block:
  """Ops from the previous sites to one site (or to the outputs, for the tail)."""

  ops: list[_Op]
  recipe: list[_Op]  # parameter-only ops the block's ops need, recomputed inside it
  leaves: list[int]  # parameter leaves it consumes (through its ops or recipe)
  act_ins: list[int]  # ids read from other blocks (they may carry tangents)
  outs: list[int]  # ids it produces that are read elsewhere; the site (if any) first
  site: int | None


def _dependencies(prog: _Program, n_leaves: int) -> dict[int, int]:
  dep = {i: 0 for i in prog.consts}
  for j, pid in enumerate(prog.ins):
    dep[pid] = _PARAM if j < n_leaves else _DATA
  for op in prog.ops:
    d = 0
    for i in op.ins:
      d |= dep[i]
    for o in op.outs:
      dep[o] = d
  return dep


def _consumers(prog: _Program) -> dict[int, list[int]]:
  uses: dict[int, list[int]] = {}
  for j, op in enumerate(prog.ops):
    for i in op.ins:
      uses.setdefault(i, []).append(j)
  for i in prog.outs:
    uses.setdefault(i, []).append(-1)
  return uses


def _is_param_consumer(op: _Op, dep: dict[int, int]) -> bool:
  deps = [dep[i] for i in op.ins]
  return any(d == _PARAM for d in deps) and any(d & _DATA for d in deps)


def _find_sites(prog: _Program, dep, uses) -> list[int]:
  """Op indices whose first output is perturbed: marked sites, else every parameter
  consumer (extended over the sole-consumer chain of further parameter consumers, so that
  a bias added after a matmul is part of that matmul's output)."""
  marked = [j for j, op in enumerate(prog.ops) if op.prim == "site" and dep[op.outs[0]] & _DATA]
  if marked:
    return marked
  linear = ("dot_general", "conv_general_dilated")
  consumers = [
    j for j, op in enumerate(prog.ops) if op.prim != "site" and _is_param_consumer(op, dep)
  ]
  if not any(prog.ops[j].prim.name in linear for j in consumers):
    raise ValueError(
      "perturbation='activity': fun has no parameter-consuming linear op (dot_general / "
      "conv_general_dilated with a parameter on one side and data on the other), so there "
      "is no activity to perturb."
    )
  in_chain, sites = set(), []
  for j in consumers:
    if j in in_chain:
      continue
    end = j
    while len(op_out_uses := uses.get(prog.ops[end].outs[0], [])) == 1:
      nxt = op_out_uses[0]
      if nxt < 0 or not _is_param_consumer(prog.ops[nxt], dep) or len(prog.ops[nxt].outs) != 1:
        break
      end = nxt
      in_chain.add(nxt)
    sites.append(end)
  return sites


def _blocks(prog: _Program, n_leaves: int, dep, uses, sites: list[int]) -> list[_Block]:
  """Partitions the ops that depend on both parameters and data into site blocks and a tail."""
  producer = {o: j for j, op in enumerate(prog.ops) for o in op.outs}
  site_out = {prog.ops[j].outs[0]: j for j in sites}
  assigned: dict[int, int] = {}  # op index -> block index

  def closure(roots: list[int], b: int) -> list[int]:
    """Mixed ops reachable backward from ``roots`` (ids), stopping at other blocks' ops."""
    todo, found = list(roots), []
    while todo:
      i = todo.pop()
      j = producer.get(i)
      if j is None or j in assigned or dep[i] != _PARAM | _DATA:
        continue
      if i in site_out and site_out[i] != found_site[b]:
        continue
      assigned[j] = b
      found.append(j)
      todo.extend(prog.ops[j].ins)
    return sorted(found)

  found_site: dict[int, int] = {}
  groups: list[tuple[list[int], int | None]] = []
  for b, j in enumerate(sites):
    found_site[b] = j
    groups.append((closure([prog.ops[j].outs[0]], b), j))
  tail_b = len(sites)
  found_site[tail_b] = -1
  groups.append((closure(list(prog.outs), tail_b), None))

  def recipe_of(op_ids: list[int]) -> tuple[list[_Op], list[int]]:
    """Parameter-only ops the block reads, back to the leaves."""
    todo = [i for j in op_ids for i in prog.ops[j].ins if dep[i] == _PARAM]
    seen, ops, leaves = set(), set(), set()
    while todo:
      i = todo.pop()
      if i in seen:
        continue
      seen.add(i)
      if i in prog.ins[:n_leaves]:
        leaves.add(prog.ins.index(i))
        continue
      j = producer.get(i)
      if j is not None:
        ops.add(j)
        todo.extend(x for x in prog.ops[j].ins if dep[x] == _PARAM)
    return [prog.ops[j] for j in sorted(ops)], sorted(leaves)

  # Ops the loss (the first output) depends on.
  loss_id = prog.outs[0]
  to_loss: set[int] = set()
  todo = [loss_id]
  while todo:
    j = producer.get(todo.pop())
    if j is not None and j not in to_loss:
      to_loss.add(j)
      todo.extend(prog.ops[j].ins)

  blocks = []
  for b, (op_ids, site_j) in enumerate(groups):
    ops = [prog.ops[j] for j in op_ids]
    made = {o for op in ops for o in op.outs}
    act_ins = sorted({i for op in ops for i in op.ins if dep[i] & _DATA and i not in made})
    recipe, leaves = recipe_of(op_ids)
    site_id = prog.ops[site_j].outs[0] if site_j is not None else None
    outs = [] if site_id is None else [site_id]
    for op in ops:
      for o in op.outs:
        if o == site_id:
          continue
        readers = uses.get(o, [])
        outside = [r for r in readers if r < 0 or assigned.get(r) != b]
        if outside:
          # Reads that do not lead to the loss (BatchNorm's running statistics returned as
          # aux, or left dead by a function that drops them) need the primal only: the
          # block's VJP misses no path of the loss through them.
          on_loss_path = o == loss_id or any(r >= 0 and r in to_loss for r in outside)
          if site_j is not None and on_loss_path:
            raise ValueError(
              "perturbation='activity': a value computed from parameters inside the block "
              f"of site #{b} (shape {op.shapes[op.outs.index(o)]}) is also used outside "
              "that block, so its parameters' local VJP would miss that path; mark it with "
              "fwdgrad_jax.site(...) too."
            )
          outs.append(o)
    blocks.append(_Block(ops, recipe, leaves, act_ins, outs, site_id))
  return blocks


def _run_block(
  block: _Block,
  P: dict[int, Any],
  T: dict[int, Any],
  leaf_ids: list[int],
  cot_index: int | None,
  k: int,
):
  """Evaluates a block once: primal, the tangents from earlier sites, and the VJP closure.

  Returns (out primals, out tangents, vjp_fn) where ``vjp_fn(cotangent of outs[cot_index])``
  gives the block's leaves' gradient; the jvp of the k tangents runs inside the vjp's
  function as auxiliary output, so the block's forward pass is evaluated once.
  """
  live = [i for i in block.act_ins if T.get(i) is not None]
  dead = [i for i in block.act_ins if T.get(i) is None]

  def forward(leaves: tuple, live_vals: tuple) -> list[Any]:
    env = {i: P[i] for i in dead}
    env.update(zip(live, live_vals))
    for li, v in zip(block.leaves, leaves):
      env[leaf_ids[li]] = v
    for op in block.recipe + block.ops:
      for o, val in zip(op.outs, _bind(op, [env[i] if i in env else P[i] for i in op.ins])):
        env[o] = val
    return [env[o] for o in block.outs]

  def with_tangents(leaves):
    fwd = lambda *xs: forward(leaves, xs)
    if not live:
      outs = fwd()
      return outs, [None] * len(outs)
    primals = [P[i] for i in live]
    tans = [T[i] for i in live]
    if k == 1:
      outs, touts = jax.jvp(fwd, primals, [t[0] for t in tans])
      return outs, [t[None] for t in touts]
    outs, touts = jax.vmap(lambda ts: jax.jvp(fwd, primals, list(ts)), out_axes=(None, 0))(tans)
    return outs, touts

  leaves = tuple(P[leaf_ids[li]] for li in block.leaves)
  if cot_index is None or not block.leaves:
    outs, touts = with_tangents(leaves)
    return outs, touts, None

  def main_and_aux(leaves):
    outs, touts = with_tangents(leaves)
    return outs[cot_index], (outs, touts)

  _, vjp_fn, (outs, touts) = jax.vjp(main_and_aux, leaves, has_aux=True)
  return outs, touts, vjp_fn


def _activity_pass(
  prog: _Program,
  values: list[Any],
  n_leaves: int,
  words: jax.Array,
  k: int,
  scheme: str,
):
  """Runs the program with activity tangents; returns what the aggregation needs."""
  dep = _dependencies(prog, n_leaves)
  uses = _consumers(prog)
  sites = _find_sites(prog, dep, uses)
  blocks = _blocks(prog, n_leaves, dep, uses, sites)
  P: dict[int, Any] = dict(prog.consts)
  P.update(zip(prog.ins, values))
  T: dict[int, Any] = {}
  # Ops that depend on parameters only, or on data only, carry no tangent: run them first.
  for op in prog.ops:
    if dep[op.outs[0]] != _PARAM | _DATA:
      for o, v in zip(op.outs, _bind(op, [P[i] for i in op.ins])):
        P[o] = v
  draw = _normal if scheme == "normal" else _rademacher
  loss_id = prog.outs[0]
  site_tangents, vjps = [], []
  for b, block in enumerate(blocks):
    if block.site is None:  # the tail: its cotangent is exact, d loss / d loss
      cot = block.outs.index(loss_id) if loss_id in block.outs else None
    else:
      cot = 0
    outs, touts, vjp_fn = _run_block(block, P, T, prog.ins, cot, k)
    for o, p, t in zip(block.outs, outs, touts):
      P[o], T[o] = p, t
    if block.site is not None:
      z = P[block.site]
      u = draw(words, b, _SALT_SITE, (k, *jnp.shape(z)), jnp.result_type(z))
      u = tangents_lib.materialize(u, words)
      T[block.site] = u if T.get(block.site) is None else T[block.site] + u
      site_tangents.append(u)
    vjps.append(vjp_fn)
  outs_p = [P[i] for i in prog.outs]
  loss_t = T.get(loss_id)
  return outs_p, loss_t, site_tangents, vjps, blocks


def _per_example_check(site_tangents: list[jax.Array], batch: int) -> None:
  for j, u in enumerate(site_tangents):
    if u.ndim < 2 or u.shape[1] != batch:
      raise ValueError(
        "perturbation='activity' with per-example losses: every perturbed activation needs "
        f"the batch axis ({batch}) first, but site #{j} has shape {u.shape[1:]}. Return a "
        "scalar loss instead, or put the batch axis first."
      )


# --------------------------------------------------------------------------------------
# Entry point used by fwdgrad_jax.estimators
# --------------------------------------------------------------------------------------


def check_options(perturbation: Any, tangents: Any, normalize: bool) -> None:
  """Validates the combination of perturbation and tangent scheme; raises ValueError."""
  if perturbation not in PERTURBATIONS:
    raise ValueError(
      f"perturbation={perturbation!r} is not known; use one of {list(PERTURBATIONS)}."
    )
  if perturbation == "activity":
    if tangents not in ACTIVITY_TANGENTS:
      raise ValueError(
        f"tangents={tangents!r} does not apply to perturbation='activity' (the tangents are "
        f"activations, not weights); use one of {list(ACTIVITY_TANGENTS)}."
      )
    if normalize:
      raise ValueError("normalize=True applies to weight tangents, not perturbation='activity'.")


def uses_interpreter(perturbation: str, tangents: Any) -> bool:
  """Whether an estimator needs this module (else the dense vmapped jvp does it)."""
  return perturbation == "activity" or (
    isinstance(tangents, str) and tangents in STRUCTURED_TANGENTS
  )


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
):
  """Structured weight tangents: (outputs, directional derivatives (k, ...), tangent batch).

  The tangent batch has params' structure; rank-1 leaves are :class:`Rank1` objects.
  ``factored=False`` densifies every rank-1 tangent at its use (the fallback path, for
  tests: the estimate must be identical).
  """
  leaves, treedef = jax.tree.flatten(params)
  prog, flat_args, out_tree = _trace(fun, params, args, kwargs)
  store = _WeightTangents(_key_words(key), leaves, num_tangents, tangents, factored)
  outs_p, outs_t = _weights_pass(prog, leaves + flat_args, len(leaves), store)
  batch = jax.tree.unflatten(treedef, store.batch())
  d = outs_t[0]
  if d is None:  # the value does not depend on params
    d = jnp.zeros((num_tangents,), jnp.result_type(outs_p[0]))
  return jax.tree.unflatten(out_tree, outs_p), d, batch


def activity_estimate(
  fun: Callable[..., Any],
  params: PyTree,
  args: tuple,
  kwargs: dict,
  *,
  key: jax.Array,
  num_tangents: int,
  tangents: str,
  aggregate: Callable[[PyTree, jax.Array], PyTree],
  jvp_hook: Callable[[jax.Array], jax.Array] | None,
):
  """Activity perturbation: (outputs, gradient estimate of the (mean) loss, n perturbed).

  ``aggregate(site tangents, d)`` maps the sites' tangent batch (a list, leaves (k, …))
  and the directional derivatives d — (k,) for a scalar loss, (k, batch) for
  per-example losses — to the estimate of each site's gradient.
  """
  leaves, treedef = jax.tree.flatten(params)
  prog, flat_args, out_tree = _trace(fun, params, args, kwargs)
  outs_p, d, site_tangents, vjps, blocks = _activity_pass(
    prog, leaves + flat_args, len(leaves), _key_words(key), num_tangents, tangents
  )
  loss = outs_p[0]
  per_example = jnp.ndim(loss) == 1
  if d is None:  # the loss does not depend on any activity: nothing to estimate
    d = jnp.zeros((num_tangents, *jnp.shape(loss)), jnp.result_type(loss))
  if jvp_hook is not None:
    d = jvp_hook(d)
  if per_example:
    _per_example_check(site_tangents, loss.shape[0])
  cots = aggregate(site_tangents, d) if site_tangents else []
  scale = 1.0 / loss.shape[0] if per_example else 1.0
  grads = [jnp.zeros_like(p) for p in leaves]
  for block, vjp_fn, cot in zip(blocks, vjps, [*cots, None]):
    if vjp_fn is None:
      continue
    if block.site is None:  # the tail: d(mean loss)/d loss, exact
      cot = jnp.full(jnp.shape(loss), scale, jnp.result_type(loss))
    else:
      cot = cot * scale
    (g,) = vjp_fn(cot.astype(jnp.result_type(cot)))
    for li, gi in zip(block.leaves, g):
      grads[li] = grads[li] + gi
  outs_p[0] = jnp.mean(loss) if per_example else loss
  n = sum(math.prod(u.shape[2 if per_example else 1 :]) for u in site_tangents)
  return jax.tree.unflatten(out_tree, outs_p), jax.tree.unflatten(treedef, grads), max(n, 1)


def _trace(fun, params, args, kwargs):
  leaves = jax.tree.leaves(params)
  flat_args, args_tree = jax.tree.flatten((args, kwargs))
  treedef = jax.tree.structure(params)
  out_tree_box = []

  def flat_fun(*flat):
    p = jax.tree.unflatten(treedef, flat[: len(leaves)])
    a, kw = jax.tree.unflatten(args_tree, flat[len(leaves) :])
    out = fun(p, *a, **kw)
    out_flat, out_tree = jax.tree.flatten(out)
    out_tree_box.append(out_tree)
    return out_flat

  closed = jax.make_jaxpr(flat_fun)(*leaves, *flat_args)
  return _flatten_program(closed), list(flat_args), out_tree_box[0]
