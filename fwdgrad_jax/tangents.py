"""Tangent samplers: ``(key, params, num_tangents) -> tangent batch``.

A tangent batch is a pytree shaped like ``params`` whose every leaf has an extra
leading axis of size ``num_tangents``; tangent ``i`` is ``tree_map(lambda v: v[i], V)``.
All sampling of the project goes through :func:`sample`, so that a faster random
number scheme changes one place.

Every built-in scheme draws tangents with E[v vᵀ] = I (per tangent, or summed over
the batch for ``"partition"``), which is what keeps the forward gradient unbiased.

References:
  Baydin et al., 2022. Gradients without Backpropagation (Gaussian tangents).
  Flügel et al., 2024. Multi-Tangent Forward Gradients (normalized tangents).
  Yao, Studies on Forward Mode Gradient Descent (direction partition).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Sampler = Callable[[jax.Array, PyTree, int], PyTree]


def _per_leaf(
  draw: Callable[[jax.Array, tuple, Any], jax.Array], *, hashed: bool = True
) -> Sampler:
  """Builds a sampler that draws each leaf independently.

  ``draw(seed, shape, dtype)`` gets, per leaf, two uint32 hash seeds (``hashed``) or a
  PRNG key. All leaves' seeds come from one threefry call: on small problems each
  extra key split is a kernel launch that costs more than the step itself.
  """

  def sampler(key, params, num_tangents):
    leaves, treedef = jax.tree.flatten(params)
    if hashed:
      seeds = _leaf_seeds(key, len(leaves))
    else:
      seeds = jax.random.split(key, len(leaves))
    out = [
      draw(seeds[i], (num_tangents, *jnp.shape(p)), jnp.result_type(p))
      for i, p in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, out)

  return sampler


# --- Fast random bits ---------------------------------------------------------------
# Drawing tangents is on the hot path: a 1.86 M-parameter Gaussian tangent from
# jax.random.normal (threefry, 20 rounds per 64 bits) costs more than the jvp itself on
# a CPU. Tangents need independent, zero-mean, unit-variance components, not a
# cryptographic stream, so the default samplers hash a counter with the murmur3
# finalizer (applied twice, keyed by 64 bits drawn from the threefry key of each leaf):
# ~10x cheaper bits that XLA fuses into the consumers. The tests check moments,
# per-bit balance and independence; "normal_threefry"/"rademacher_threefry" keep JAX's
# own PRNG for anyone who needs its guarantees.


def fmix32(h: jax.Array) -> jax.Array:
  """The murmur3 32-bit finalizer: a bijective avalanche mix of uint32 words, elementwise.

  Args:
    h: uint32 array.

  Returns:
    The mixed words, same shape (every output bit depends on every input bit).
  """
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_bits(seed: jax.Array, size: int) -> jax.Array:
  """``size`` pseudo-random uint32 words: a hash of the counter 0 … size-1 keyed by ``seed`` (2,).

  Word c is ``fmix32(fmix32(c ^ seed[0]) + seed[1])``: a pure function of (seed, c), so any
  part of the stream can be recomputed without the rest (see :func:`regenerate_leaf`).

  Args:
    seed: (2,) uint32, e.g. a row of :func:`leaf_seeds`.
    size: how many words.

  Returns:
    (size,) uint32.
  """
  counter = jax.lax.iota(jnp.uint32, size)
  return fmix32(fmix32(counter ^ seed[0]) + seed[1])


def key_words(key: jax.Array) -> jax.Array:
  """The key's random bits as a flat uint32 vector (a raw ``PRNGKey`` or a typed key)."""
  words = key if key.dtype == jnp.uint32 else jax.random.key_data(key)
  return words.reshape(-1)


def _leaf_seeds(key: jax.Array, num_leaves: int) -> jax.Array:
  """(num_leaves, 2) uint32 hash seeds derived from the key's own bits.

  A key is already well-mixed random bits (the output of a split), so hashing its words
  with the leaf index gives independent per-leaf seeds without a threefry call: on small
  problems that call is most of a step's cost.
  """
  words = key_words(key)
  leaf = jax.lax.iota(jnp.uint32, num_leaves)
  s0 = fmix32(words[0] ^ fmix32(2 * leaf + 1))
  s1 = fmix32(words[-1] + fmix32(2 * leaf + 2))
  return jnp.stack([s0, s1], axis=1)


# Φ⁻¹ in float32 without XLA's erf_inv, whose log1p and branches cost ~3 ns per number on
# a CPU (more than the jvp of a whole MLP step at k = 1). Giles' form, z = x·q(w) with
# x = 2u − 1 and w = −log(1 − x²), q a polynomial in w − 2.5 (w < 5) or in √w − 3 (the
# tails), refitted here (Chebyshev least squares against scipy's erfinv, degree 9:
# relative error < 1e-7, below float32's resolution) and multiplied by √2; the log is a
# degree-7 polynomial of the mantissa (error 6e-8). Every operation is elementwise and
# vectorises: ~1 ns per number instead of ~3.5.
_LOG1P = (
  0.9999999425207027,
  -0.5000036317001855,
  0.33335114673511657,
  -0.24970067418355302,
  0.19898544934842852,
  -0.17247050708978248,
  0.1623438140577322,
  -0.10134178864180456,
)
_PROBIT_CENTRAL = (
  2.1233134745194615,
  0.3488020166822454,
  -0.005907692024339294,
  -0.0017715919963096644,
  0.0003087624230835263,
  -7.053545139445853e-06,
  -4.8902652918159765e-06,
  6.67380491815331e-07,
  3.22564054286589e-08,
  -1.3062452772675047e-08,
)
_PROBIT_TAIL = (
  4.006434262859683,
  1.4165823785778384,
  0.013354962864699605,
  -0.010801095911606077,
  0.008065575443456872,
  -0.005092951150092916,
  0.0020371770656226495,
  -4.972845363124933e-05,
  -0.00038327793686394575,
  0.00012708286008886963,
)


def _horner(coefficients, x):
  acc = jnp.full_like(x, coefficients[-1])
  for c in coefficients[-2::-1]:
    acc = acc * x + c
  return acc


def _log(y: jax.Array) -> jax.Array:
  """log(y) for positive normal float32 y: exponent + a polynomial of the mantissa."""
  bits = jax.lax.bitcast_convert_type(y, jnp.uint32)
  mantissa = jax.lax.bitcast_convert_type((bits & 0x7FFFFF) | 0x3F800000, jnp.float32)
  exponent = (bits >> 23).astype(jnp.int32) - 127
  big = mantissa > np.float32(np.sqrt(2.0))  # fold [√2, 2) onto [√½, 1): |t| ≤ 0.41
  mantissa = jnp.where(big, mantissa * 0.5, mantissa)
  exponent = exponent + big.astype(jnp.int32)
  t = mantissa - 1.0
  return exponent.astype(jnp.float32) * np.float32(np.log(2.0)) + t * _horner(_LOG1P, t)


def _standard_normal(bits: jax.Array, dtype) -> jax.Array:
  # The top 23 bits give u in the open interval (-1, 1), so w stays finite (|z| <= 5.4).
  x = ((bits >> 9).astype(jnp.float32) + 0.5) * (2.0 / (1 << 23)) - 1.0
  w = -_log((1.0 - x) * (1.0 + x))
  central = _horner(_PROBIT_CENTRAL, w - 2.5)
  tail = _horner(_PROBIT_TAIL, jnp.sqrt(w) - 3.0)
  return (x * jnp.where(w < 5.0, central, tail)).astype(dtype)


def hash_normal(seed: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """Standard Gaussian numbers of ``shape`` from the hash stream of ``seed`` (see :func:`hash_bits`).

  Element c (in row-major order) is the probit of word c: what the ``"normal"`` sampler
  draws for a leaf whose seed is ``seed``.

  Args:
    seed: (2,) uint32 hash seed.
    shape: the result's shape.
    dtype: the result's floating dtype (computed in float32).
  """
  return _standard_normal(hash_bits(seed, int(np.prod(shape))), dtype).reshape(shape)


def hash_rademacher(seed: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """Rademacher (±1) numbers of ``shape`` from the hash stream of ``seed``: bit c % 32 of word c // 32.

  Args:
    seed: (2,) uint32 hash seed.
    shape: the result's shape.
    dtype: the result's dtype.
  """
  # One 32-bit word gives 32 signs.
  size = int(np.prod(shape))
  words = hash_bits(seed, -(-size // 32))
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  bits = bits.reshape(-1)[:size].reshape(shape)
  return (1 - 2 * bits.astype(jnp.int8)).astype(dtype)


# The private names of one release ago.
_fmix32 = fmix32
_hash_bits = hash_bits
_normal_leaf = hash_normal
_rademacher_leaf = hash_rademacher


def _normal_threefry_leaf(key, shape, dtype):
  # Drawn flat and reshaped: with partitionable threefry, XLA:CPU takes seconds to
  # compile a draw of rank >= 4 (conv kernels with a tangent axis), for the same values.
  return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def _rademacher_threefry_leaf(key, shape, dtype):
  size = int(np.prod(shape))
  return jax.random.rademacher(key, (size,), jnp.int8).astype(dtype).reshape(shape)


normal: Sampler = _per_leaf(hash_normal)
normal.__doc__ = """Independent standard Gaussian tangents, v ~ N(0, I) (Baydin et al. 2022)."""

rademacher: Sampler = _per_leaf(hash_rademacher)
rademacher.__doc__ = (
  """Independent Rademacher (±1) tangents: E[v vᵀ] = I with the least variance."""
)

normal_threefry: Sampler = _per_leaf(_normal_threefry_leaf, hashed=False)
normal_threefry.__doc__ = (
  """Gaussian tangents from ``jax.random.normal`` (threefry): slower, JAX's PRNG."""
)

rademacher_threefry: Sampler = _per_leaf(_rademacher_threefry_leaf, hashed=False)
rademacher_threefry.__doc__ = """Rademacher tangents from ``jax.random.rademacher`` (threefry)."""


def partition(key: jax.Array, params: PyTree, num_tangents: int) -> PyTree:
  """Direction partition (Yao): one Gaussian vector cut into ``num_tangents`` blocks.

  The parameters, flattened across the whole pytree, are cut into ``num_tangents``
  contiguous blocks of (nearly) equal size; tangent ``i`` is the Gaussian vector on
  block ``i`` and zero elsewhere. The blocks cover every coordinate exactly once, so
  Σ_i v_i v_iᵀ = diag(v²) and E[Σ_i v_i v_iᵀ] = I: the estimate is unbiased with
  ``aggregation="sum"`` (with ``"mean"`` it is scaled by 1/k). With k = n it is the
  exact gradient up to the per-coordinate factor v_j².
  """
  leaves, treedef = jax.tree.flatten(params)
  sizes = [int(np.prod(jnp.shape(p))) for p in leaves]
  n = sum(sizes)
  # Block i is the global flat range [bounds[i], bounds[i+1]); per leaf it becomes a
  # small (k,) table of local ranges, so no (k, n) mask is ever a constant.
  bounds = (np.arange(num_tangents + 1) * n) // num_tangents
  seeds = _leaf_seeds(key, len(leaves))
  out, offset = [], 0
  for seed, p, size in zip(seeds, leaves, sizes):
    dtype = jnp.result_type(p)
    v = hash_normal(seed, (size,), dtype)
    lo = np.clip(bounds[:-1] - offset, 0, size)[:, None]
    hi = np.clip(bounds[1:] - offset, 0, size)[:, None]
    idx = jnp.arange(size)[None]
    blocks = jnp.where((idx >= lo) & (idx < hi), v[None], jnp.zeros((), dtype))
    out.append(blocks.reshape((num_tangents, *jnp.shape(p))))
    offset += size
  return jax.tree.unflatten(treedef, out)


def cone(angle: float, base: str | Sampler = "normal") -> Sampler:
  """Tangents at a fixed angle to the first one (Flügel et al. §4.3, Fig. 5).

  The first tangent v₁ is drawn from ``base`` (Gaussian); every further tangent is a
  draw wᵢ of ``base`` rotated in the plane of (v₁, wᵢ) to the angle ``angle`` from v₁,
  keeping its length: vᵢ = ‖wᵢ‖ (cos α · v̂₁ + sin α · ûᵢ) with ûᵢ the unit component of wᵢ
  orthogonal to v₁ — all over the whole pytree. The span is that of the unrotated draws
  (for 0 < α), so the orthogonal projection is unaffected by α, while the mean of
  narrowly coned tangents degenerates towards v₁.

  Args:
    angle: α in radians, 0 < α ≤ π/2 (π/2: every tangent orthogonal to v₁).
    base: the sampler of v₁ and the wᵢ.

  Returns:
    A sampler ``(key, params, k) -> tangent batch``.

  Raises:
    ValueError: α outside (0, π/2].

  References:
    Flügel et al., 2024. Multi-Tangent Forward Gradients, §4.3.
  """
  if not (0.0 < float(angle) <= np.pi / 2 + 1e-12):
    raise ValueError(f"cone: angle must be in (0, π/2] radians, got angle={angle!r}.")
  draw = get_sampler(base)
  cos, sin = float(np.cos(angle)), float(np.sin(angle))

  def sampler(key, params, num_tangents):
    batch = draw(key, params, num_tangents)
    leaves, treedef = jax.tree.flatten(batch)
    k = num_tangents
    flat = [v.reshape(k, -1).astype(jnp.promote_types(v.dtype, jnp.float32)) for v in leaves]
    hi = jax.lax.Precision.HIGHEST
    dots = sum(jnp.matmul(f, f[0], precision=hi) for f in flat)  # (k,): wᵢ·v₁
    sq = sum(jnp.sum(f * f, axis=1) for f in flat)  # (k,): ‖wᵢ‖²
    v1_norm = jnp.sqrt(sq[0])
    along = dots / v1_norm  # the component of wᵢ along v̂₁
    ortho_norm = jnp.sqrt(jnp.maximum(sq - along**2, 0.0))
    w_norm = jnp.sqrt(sq)
    # vᵢ = a_i·v₁ + b_i·wᵢ with a_i, b_i set so the result is ‖wᵢ‖(cos α v̂₁ + sin α ûᵢ).
    b = w_norm * sin / jnp.maximum(ortho_norm, 1e-30)
    a = (w_norm * cos - b * along) / v1_norm
    a = a.at[0].set(1.0)
    b = b.at[0].set(0.0)
    out = []
    for v, f in zip(leaves, flat):
      rotated = a[:, None] * f[0][None] + b[:, None] * f
      out.append(rotated.reshape(v.shape).astype(v.dtype))
    return jax.tree.unflatten(treedef, out)

  return sampler


SAMPLERS: dict[str, Sampler] = {
  "normal": normal,
  "gaussian": normal,
  "rademacher": rademacher,
  "partition": partition,
  "normal_threefry": normal_threefry,
  "rademacher_threefry": rademacher_threefry,
}


def get_sampler(tangents: str | Sampler) -> Sampler:
  """Returns the sampler for a name in :data:`SAMPLERS` or a user callable.

  Raises:
    ValueError: ``tangents`` is neither a known name nor callable.
  """
  if callable(tangents):
    return tangents
  if isinstance(tangents, str) and tangents in SAMPLERS:
    return SAMPLERS[tangents]
  raise ValueError(
    f"tangents={tangents!r} is not a known tangent scheme; use one of "
    f"{sorted(SAMPLERS)} or a callable (key, params, num_tangents) -> tangent batch."
  )


def normalize(tangents: PyTree) -> PyTree:
  """Scales every tangent of a batch to unit norm over the whole pytree (Flügel et al.)."""
  leaves = jax.tree.leaves(tangents)
  k = leaves[0].shape[0]
  sq = sum(jnp.sum(jnp.square(v.reshape(k, -1).astype(jnp.float32)), axis=1) for v in leaves)
  inv = jax.lax.rsqrt(jnp.maximum(sq, jnp.finfo(jnp.float32).tiny))
  return jax.tree.map(
    lambda v: v * inv.astype(v.dtype).reshape((k,) + (1,) * (v.ndim - 1)), tangents
  )


def materialize(tree: PyTree, key: jax.Array) -> PyTree:
  """Returns ``tree`` unchanged, but computed once into buffers that consumers read.

  XLA fuses a cheap elementwise producer into every consumer, so tangents (a counter
  hash and erf_inv's polynomial) would be drawn again in each: once into the jvp's
  operands and again in the aggregation — about a third of a k = 4 step on CPU, and for
  the factors of a rank-1 tangent once per element of the weight-sized outer product.
  XLA does not fuse across a conditional (``optimization_barrier`` is expanded before
  fusion on CPU, so it does not help), hence the ``cond``: its predicate ``(w | 1) != 0``
  is true for every uint32 ``w`` but not provably so to XLA; the other branch never runs.

  Args:
    tree: freshly drawn arrays.
    key: the key they were drawn from (a raw key or its uint32 words, or a typed key).
  """
  return jax.lax.cond(_always(key), lambda t: t, lambda t: jax.tree.map(jnp.zeros_like, t), tree)


def _always(key: jax.Array) -> jax.Array:
  """``(w | 1) != 0`` for the key's first word: true always, but not provably to XLA."""
  data = key if key.dtype == jnp.uint32 else jax.random.key_data(key)
  return (data.reshape(-1)[0] | jnp.uint32(1)) != 0


# --- Drawing for the estimator: once, in the layout the jvp's matmuls read -----------
# A vmapped jvp reads the tangents of a dense layer, V of logical shape (k, in, out), in
# the product x·V: XLA:CPU runs it as ONE matmul (batch, in) × (in, k·out), so it first
# copies V into the order (in, k, out). And a buffer that leaves a ``cond`` (see
# :func:`materialize`) is copied out of the branch. Two extra passes over V — at k = 16
# on Baydin's MLP, 120 MB each — cost as much as the draw itself. :func:`draw` therefore
# computes the tangents INSIDE the branch (no copy out), 2-D leaves directly in the order
# (in, k, out) (a transpose outside the branch makes them (k, in, out) again, which XLA
# folds into the matmul and the aggregation's reduction instead of copying). The values
# are those of :func:`sample`: each element still hashes its own flat counter.


def _counters(shape: tuple[int, ...], num_tangents: int, k_axis: int) -> jax.Array:
  """The flat counter (tangent, *index) of every element, laid out with the tangent
  axis at ``k_axis`` of the result (the element (t, i, j) of a 2-D leaf has counter
  t·size + i·cols + j whatever the layout)."""
  full = list(shape)
  full.insert(k_axis, num_tangents)
  strides = [int(np.prod(shape[d + 1 :])) for d in range(len(shape))]
  counter = jax.lax.broadcasted_iota(jnp.uint32, full, k_axis) * jnp.uint32(np.prod(shape))
  for d, stride in enumerate(strides):
    axis = d if d < k_axis else d + 1
    counter = counter + jax.lax.broadcasted_iota(jnp.uint32, full, axis) * jnp.uint32(stride)
  return counter


def _hash_counter(seed: jax.Array, counter: jax.Array) -> jax.Array:
  return fmix32(fmix32(counter ^ seed[0]) + seed[1])  # as hash_bits


def _normal_at(seed, counter, dtype):
  return _standard_normal(_hash_counter(seed, counter), dtype)


def _rademacher_at(seed, counter, dtype):
  # Word c // 32, bit c % 32: the bits hash_rademacher unpacks.
  word = _hash_counter(seed, counter >> 5)
  bit = (word >> (counter & 31)) & 1
  return (1 - 2 * bit.astype(jnp.int8)).astype(dtype)


_DRAW_AT = {"normal": _normal_at, "gaussian": _normal_at, "rademacher": _rademacher_at}


def _materialized(make: Callable[[], list[jax.Array]], key: jax.Array) -> list[jax.Array]:
  """``make()`` computed inside a conditional (see :func:`materialize`), no copy out."""
  shapes = jax.eval_shape(make)
  return jax.lax.cond(_always(key), make, lambda: [jnp.zeros(a.shape, a.dtype) for a in shapes])


def draw(
  key: jax.Array,
  params: PyTree,
  num_tangents: int,
  tangents: str | Sampler = "normal",
  *,
  normalized: bool = False,
  constrain: Callable[[jax.Array, int], jax.Array] | None = None,
  jvp_layout: bool = True,
) -> PyTree:
  """:func:`sample`, computed once into buffers laid out for the jvp's matmuls.

  The estimators' draw: the values of ``sample(key, params, num_tangents, tangents,
  normalized=normalized)``, made a buffer that every consumer reads (as
  :func:`materialize`, without its copy), with the hash samplers' 2-D leaves stored
  tangent-axis-second, so that the vmapped jvp's matmul and the aggregation read them
  without a transposing copy (see the comment above).

  Args:
    key, params, num_tangents, tangents, normalized: as for :func:`sample`.
    constrain: applied inside the draw to every leaf with the position of its tangent
      axis (e.g. a sharding constraint, :func:`fwdgrad_jax.parallel.tangent_constraint`).
    jvp_layout: store 2-D leaves tangent-axis-second (the built-in aggregations,
      :func:`fwdgrad_jax.aggregation.combine` and ``gram``, read that layout as it lies).
      Off for consumers that flatten each tangent: they would copy V back.

  Returns:
    The tangent batch, leaves ``(k, *leaf.shape)``.
  """
  leaves, treedef = jax.tree.flatten(params)
  at = _DRAW_AT.get(tangents) if isinstance(tangents, str) and not normalized else None
  second = at is not None and jvp_layout and num_tangents > 1
  k_axes = [1 if second and jnp.ndim(p) == 2 else 0 for p in leaves]
  fix = constrain or (lambda v, axis: v)

  def make():
    if at is None:
      batch = jax.tree.leaves(sample(key, params, num_tangents, tangents, normalized=normalized))
      return [fix(v, 0) for v in batch]
    seeds = _leaf_seeds(key, len(leaves))
    return [
      fix(at(seeds[i], _counters(jnp.shape(p), num_tangents, ax), jnp.result_type(p)), ax)
      for i, (p, ax) in enumerate(zip(leaves, k_axes))
    ]

  out = _materialized(make, key)
  out = [jnp.moveaxis(v, ax, 0) if ax else v for v, ax in zip(out, k_axes)]
  return jax.tree.unflatten(treedef, out)


# --- Seed-regenerated tangents (MeZO-style memory) -----------------------------------
# A step that keeps V holds k weight-sized buffers. A hash tangent is a pure function of
# (seed, counter), so each leaf's tangents can instead be drawn where they are used —
# once in the forward pass, once more in the aggregation — and never stored. XLA would
# undo that: the draws depend on the key only, so it hoists them all to the start of the
# step (every leaf alive at once) and merges the two draws of a leaf into one buffer.
# :func:`after` ties a draw's seed to the values it must follow by a data dependency
# that XLA cannot prove void (an ``optimization_barrier`` is not enough: XLA:CPU expands
# it before scheduling, and the draws moved to the start again).

#: Schemes that can be regenerated (a pure function of seed and counter).
REGENERABLE = tuple(_DRAW_AT)


def after(seed: jax.Array, *deps: Any) -> jax.Array:
  """``seed`` (uint32), made (for XLA) to depend on ``deps``: what uses it runs after them.

  Adds ``(w | 1) == 0`` — always 0, as in :func:`_always` — for the first word w of
  every dependency: the value is unchanged, but no compiler pass can prove it, so the
  draw cannot be hoisted above ``deps`` and draws tied to different values are never
  merged into one buffer.
  """
  zero = jnp.zeros((), jnp.uint32)
  for d in jax.tree.leaves(deps):
    first = jnp.ravel(d)[:1].astype(jnp.float32) if jnp.size(d) else jnp.zeros((1,), jnp.float32)
    word = jax.lax.bitcast_convert_type(first, jnp.uint32)[0]
    zero = zero | ((word | jnp.uint32(1)) == 0).astype(jnp.uint32)
  return seed + zero


def leaf_seeds(key: jax.Array, params: PyTree) -> jax.Array:
  """(leaves, 2) hash seeds, one per leaf of ``params``: those of :func:`sample`."""
  return _leaf_seeds(key, len(jax.tree.leaves(params)))


def regenerate_leaf(
  seed: jax.Array,
  leaf: jax.Array,
  num_tangents: int,
  tangents: str,
  deps: Any = (),
  *,
  index: int | None = None,
  start: int | jax.Array = 0,
) -> jax.Array:
  """The (k, *leaf.shape) tangents of one leaf, drawn after ``deps`` (see :func:`after`).

  Args:
    seed: the leaf's row of :func:`leaf_seeds`.
    leaf: the parameter (its shape and dtype).
    num_tangents: k.
    tangents: a name in :data:`REGENERABLE`.
    deps: values the draw must follow (e.g. the layer's input, or the coefficients of
      the aggregation).
    index: only tangent ``index`` (shape ``leaf.shape``), a computation of its own.
    start: the tangents ``start, …, start + k − 1`` of a larger batch (an integer or a
      traced one, e.g. a device's share along a mesh's ``"tangents"`` axis).

  Returns:
    The values ``sample(key, params, k, tangents)`` has for that leaf, bit for bit
    (with ``start``: rows ``start:start + k`` of ``sample``'s draw of more tangents).
  """
  if tangents not in REGENERABLE:
    raise ValueError(
      f"tangents={tangents!r} cannot be regenerated from a seed; use one of {list(REGENERABLE)}."
    )
  seed = after(seed, *jax.tree.leaves(deps))
  shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
  size = int(np.prod(shape))
  if index is None:
    counters = _counters(shape, num_tangents, 0)
    if not (isinstance(start, int) and start == 0):
      # Counter t·size + i wraps modulo 2³² as the full draw's does: the same rows.
      counters = counters + jnp.asarray(start).astype(jnp.uint32) * jnp.uint32(size)
    return _DRAW_AT[tangents](seed, counters, dtype)
  offset = jnp.asarray(start).astype(jnp.uint32) * jnp.uint32(size) + jnp.uint32(
    (index * size) % 2**32
  )
  return _DRAW_AT[tangents](seed, _counters(shape, 1, 0)[0] + offset, dtype)


def sample(
  key: jax.Array,
  params: PyTree,
  num_tangents: int,
  tangents: str | Sampler = "normal",
  *,
  normalized: bool = False,
) -> PyTree:
  """Draws a batch of ``num_tangents`` tangents shaped like ``params``.

  Args:
    key: a PRNG key (raw ``PRNGKey`` or typed ``jax.random.key``).
    params: pytree of floating arrays the tangents are for.
    num_tangents: the size k of the leading axis.
    tangents: a name in :data:`SAMPLERS` or a callable ``(key, params, k)``.
    normalized: scale each tangent to unit norm across the pytree.

  Returns:
    A pytree like ``params`` with leaves of shape ``(k, *leaf.shape)`` and the
    leaves' dtypes.
  """
  batch = get_sampler(tangents)(key, params, num_tangents)
  _check_batch(batch, params, num_tangents)
  return normalize(batch) if normalized else batch


def _check_batch(batch: PyTree, params: PyTree, num_tangents: int) -> None:
  want = jax.tree.structure(params)
  if jax.tree.structure(batch) != want:
    raise ValueError(
      f"tangents: the sampler returned a pytree of structure {jax.tree.structure(batch)}, "
      f"expected the structure of params {want}."
    )
  for v, p in zip(jax.tree.leaves(batch), jax.tree.leaves(params)):
    if jnp.shape(v) != (num_tangents, *jnp.shape(p)):
      raise ValueError(
        f"tangents: the sampler returned a leaf of shape {jnp.shape(v)}, expected "
        f"{(num_tangents, *jnp.shape(p))} (num_tangents leading axis + the param's shape)."
      )


# --- Structured tangents --------------------------------------------------------------
# A tangent batch leaf may be a factored :class:`Rank1` batch instead of a (k, ...)
# array (``tangents="rank1"``/``"input"``, drawn by :mod:`fwdgrad_jax.perturbation`): the
# aggregations and the normalization recognise it by :func:`is_rank1`.

# Up to this many rank-1 tangents, their combination is written as a fusible sum of
# outer products rather than an (in×k)·(k×out) matmul.
_ELEMENTWISE_COMBINE = 1


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
    hi = jax.lax.Precision.HIGHEST
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
      ab = jnp.matmul(a.T, b, precision=jax.lax.Precision.HIGHEST)
    return self._arrange(ab.reshape(*self.a.shape[1:], *self.b.shape[1:]), 0)

  def scale(self, s: jax.Array) -> Rank1:
    """Tangent i scaled by s_i (the scale goes on a)."""
    s = s.astype(self.a.dtype).reshape((-1,) + (1,) * (self.a.ndim - 1))
    return dataclasses.replace(self, a=self.a * s)


def is_rank1(x: Any) -> bool:
  """Whether a tangent-batch leaf is a factored :class:`Rank1` batch."""
  return isinstance(x, Rank1)
