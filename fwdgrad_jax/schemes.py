"""Where the tangents enter: the forward estimator's tangent schemes as objects.

A forward gradient combines random tangents V with their directional derivatives
d = Vᵀ∇f. Where the tangents enter decides how both are computed, and each place is one
small frozen dataclass here, which checks its own options when built and computes its
own d and estimate:

- :class:`Dense`: tangents on the parameters drawn from a distribution, all k pushed
  through one ``vmap`` of ``jax.jvp`` (or regenerated from the key, never stored).
- :class:`Rank1` and :class:`Input`: structured weight tangents shaped by the op that
  consumes each leaf, computed by the jaxpr interpreter of :mod:`fwdgrad_jax.perturbation`.
- :class:`Activity`: tangents on the outputs of the parameter-consuming ops (activity
  perturbation), with per-example directional derivatives.
- :class:`LocalGuess`: activity tangents that start with each site's local-loss gradient
  through its head (Fournier et al.'s guess; biased), then random ones.

:func:`fwdgrad_jax.value_and_forward_grad` composes a scheme with an aggregation and the
hooks on d. Its string options (``tangents="rank1"``, ``perturbation="activity"``,
``normalize=True``, ``regenerate=True``, …) and Hydra configs reach these objects through
:func:`parse`, the one place that reads them; ``tangents=schemes.Rank1()`` passes an
object directly.

References:
  Baydin et al., 2022. Gradients without Backpropagation. arXiv:2202.08587.
  Ren et al., 2023. Scaling Forward Gradient With Local Losses. arXiv:2210.03310.
  Flügel et al., 2024. Multi-Tangent Forward Gradients. arXiv:2410.17764.
  Fournier et al., 2023. Can Forward Gradient Match Backpropagation? ICML 2023.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fwdgrad_jax import aggregation as aggregation_lib
from fwdgrad_jax import parallel
from fwdgrad_jax import perturbation as perturbation_lib
from fwdgrad_jax import tangents as tangents_lib

PyTree = Any
JvpHook = Callable[[jax.Array], jax.Array]
Aggregation = str | aggregation_lib.Aggregation


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def directional_derivatives(
  fun: Callable[[PyTree], Any], params: PyTree, tangents: PyTree, *, has_aux: bool = False
) -> tuple[Any, jax.Array, Any]:
  """d = Vᵀ∇f for a batch of tangents, with the primal evaluated once.

  One ``jax.vmap`` of ``jax.jvp`` over the tangent batch whose primal inputs are not
  mapped, so the forward pass runs once whatever k is (``out_axes=None`` asserts it).

  Args:
    fun: ``fun(params)`` → scalar (or ``(scalar, aux)`` with ``has_aux``).
    params: the point.
    tangents: a tangent batch: params' structure, leaves with a leading axis k.
    has_aux: see above; aux is evaluated once, not differentiated.

  Returns:
    ``(value, d, aux)``: the primal value, d of shape (k,) and aux (None without has_aux).
  """
  k = jax.tree.leaves(tangents)[0].shape[0]
  if k == 1:
    # vmap over a size-1 axis still batches every tangent op (e.g. a batched matmul
    # for x·dW), which XLA:CPU runs noticeably slower than the plain op.
    v = jax.tree.map(lambda t: t[0], tangents)
    out = jax.jvp(fun, (params,), (v,), has_aux=has_aux)
    return out[0], out[1][None], (out[2] if has_aux else None)

  def jvp(v):
    return jax.jvp(fun, (params,), (v,), has_aux=has_aux)

  out_axes = (None, 0, None) if has_aux else (None, 0)
  out = jax.vmap(jvp, out_axes=out_axes)(tangents)
  return out[0], out[1], (out[2] if has_aux else None)


def expected_norm_ratio(
  n: int,
  num_tangents: int,
  aggregation: str,
  tangents: str = "normal",
  *,
  normalize: bool = False,
) -> float:
  """√(E‖g‖²)/‖∇f‖ of a forward-gradient estimate g in n dimensions, from the closed forms.

  Gaussian tangents (and, as an approximation, the structured and activity schemes,
  with n the dimension perturbed): E‖g‖² = (n + k + 1)/k · ‖∇f‖² for the mean of k
  (one tangent: E[z²‖v‖²] = n + 2 with z = v·∇f/‖∇f‖), k² times that for the sum.
  Rademacher: (n + k − 1)/k (‖v‖² = n exactly). Unit-norm tangents: (n + k − 1)/(k n²).
  Partition (k blocks of n/k): (n/k + 2) for the sum. Orthogonal projection onto k
  random directions: min(k, n)/n, whatever the scheme. The ratio does not depend on ∇f,
  so dividing the estimate by it makes its expected length that of the true gradient
  for every (n, k, aggregation, scheme): one learning rate then transfers across them.

  Args:
    n: the dimension perturbed (parameters, or activations for activity perturbation).
    num_tangents: k.
    aggregation: ``"mean"``, ``"sum"`` or ``"orthogonal"`` (anything else gives 1.0).
    tangents: the tangent scheme's name (``"normal"``, ``"rademacher"``, ``"partition"``,
      ``"rank1"``, …).
    normalize: unit-norm tangents.

  Returns:
    The ratio (> 0). A callable aggregation or tangent scheme gives 1.0 (no closed form).
  """
  k = num_tangents
  if aggregation == "orthogonal":
    return math.sqrt(min(k, n) / n)
  if aggregation not in ("mean", "sum"):
    return 1.0
  if tangents == "partition":
    per_sum = n / k + 2.0
    mean_sq = per_sum / k**2
  elif normalize:
    mean_sq = (n + k - 1) / (k * n**2)
  elif tangents in ("rademacher", "rademacher_threefry"):
    mean_sq = (n + k - 1) / k
  elif isinstance(tangents, str):
    mean_sq = (n + k + 1) / k
  else:
    return 1.0
  return math.sqrt(mean_sq * (k**2 if aggregation == "sum" else 1))


def _size(tree: PyTree) -> int:
  return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree))


def _normalize(batch: PyTree, d: jax.Array) -> tuple[PyTree, jax.Array]:
  """Unit-norm tangents (over the whole pytree): v_i/‖v_i‖ with d_i/‖v_i‖, which is the same."""
  leaves = jax.tree.leaves(batch, is_leaf=perturbation_lib.is_rank1)
  sq = 0.0
  for v in leaves:
    if perturbation_lib.is_rank1(v):
      k = v.num_tangents
      sq = sq + jnp.sum(jnp.square(v.a.reshape(k, -1)), 1) * jnp.sum(
        jnp.square(v.b.reshape(k, -1)), 1
      )
    else:
      sq = sq + jnp.sum(jnp.square(v.reshape(v.shape[0], -1).astype(jnp.float32)), 1)
  inv = jax.lax.rsqrt(jnp.maximum(sq, jnp.finfo(jnp.float32).tiny))

  def scale(v):
    if perturbation_lib.is_rank1(v):
      return v.scale(inv)
    return v * inv.astype(v.dtype).reshape((-1,) + (1,) * (v.ndim - 1))

  return jax.tree.map(scale, batch, is_leaf=perturbation_lib.is_rank1), d * inv.astype(d.dtype)


def _hooked(d: jax.Array, hook: JvpHook | None) -> jax.Array:
  """d in the parameters' precision, at least float32, then the hook (capping etc.)."""
  d = d.astype(jnp.promote_types(d.dtype, jnp.float32))
  return d if hook is None else hook(d)


def _credited_estimate(
  treedef: Any,
  batch: PyTree,
  d: jax.Array,
  losses: tuple[list[tuple[int, ...]], list[Any]],
  aggregate: aggregation_lib.Aggregation,
  hook: JvpHook | None,
  normalize: bool = False,
  *,
  ratio_of: Callable[[int], float] | None = None,
) -> PyTree:
  """The estimate with every leaf credited with the marked local losses it reaches (LG-FG-W).

  ``losses`` is :func:`fwdgrad_jax.perturbation.local_losses_of` a pass: for each leaf the
  marked losses it does not reach, and the losses' directional derivatives. The leaves
  that share a credited d share one aggregation of the whole batch (the orthogonal
  projection couples the leaves), of which they take their own part. With ``ratio_of``
  (``rescale=True``) each group is divided by the ratio of its own dimension.
  """
  unreached, loss_jvps = losses
  by_key = perturbation_lib.credited(d, loss_jvps, unreached)
  out = [None] * len(unreached)
  for key, dk in by_key.items():
    b = batch
    if normalize:
      b, dk = _normalize(batch, dk)
    agg = jax.tree.leaves(aggregate(b, _hooked(dk, hook)))
    group = [i for i, ki in enumerate(unreached) if ki == key]
    ratio = ratio_of(sum(math.prod(agg[i].shape) for i in group)) if ratio_of is not None else 1.0
    for i in group:
      out[i] = agg[i] / ratio
  return jax.tree.unflatten(treedef, out)


def _marked_jvps(fun, params, args, kwargs, batch, has_aux):
  """Dense tangents with marked local losses: (out, d, losses) or None without markers.

  One vmapped ``jax.jvp`` with several outputs, the total and each marked loss, of the
  traced program re-bound op by op (``perturbation.evaluate``): the primal once, whatever
  the number of losses. Why not the interpreter's weights pass: the dense tangents are the
  sampler's (any distribution, a mesh's sharding), which only a plain jvp takes as they are.
  """
  prog, flat_args, out_tree = perturbation_lib.trace(fun, params, args, kwargs)
  losses = perturbation_lib.loss_ids(prog)
  if not losses:
    return None
  n_leaves, n_out = len(jax.tree.leaves(params)), len(prog.outs)

  def f(p):
    vals = perturbation_lib.evaluate(prog, jax.tree.leaves(p) + flat_args, [*prog.outs, *losses])
    return (vals[0], *vals[n_out:]), vals[:n_out]

  jvp = lambda v: jax.jvp(f, (params,), (v,), has_aux=True)
  if jax.tree.leaves(batch)[0].shape[0] == 1:  # no size-1 vmap, as directional_derivatives
    _, ds, outs = jvp(jax.tree.map(lambda t: t[0], batch))
    ds = [t[None] for t in ds]
  else:
    _, ds, outs = jax.vmap(jvp, out_axes=(None, 0, None))(batch)
  out = jax.tree.unflatten(out_tree, outs)
  return out, ds[0], perturbation_lib.local_losses_of(prog, n_leaves, losses, ds[1:])


def _regenerate_error(problem: str) -> ValueError:
  return ValueError(f"regenerate=True does not work with {problem}.")


# --------------------------------------------------------------------------------------
# The schemes
# --------------------------------------------------------------------------------------


class Scheme:
  """Where the tangents enter; the base of :class:`Dense`, :class:`Rank1`, :class:`Input`
  and :class:`Activity`.

  A scheme validates its own options when it is built (``ValueError`` naming the bad
  one), and :meth:`check` its combination with the estimator's other options.

  Attributes:
    per_example: ``fun`` may return per-example losses of shape (batch,).
    tangent_parallel: a mesh's ``"tangents"`` axis can split its k tangents.
  """

  per_example: ClassVar[bool] = False
  tangent_parallel: ClassVar[bool] = False

  def check(self, *, num_tangents: int, aggregation: Aggregation, mesh: Any = None) -> None:
    """Checks the scheme against the estimator's other options; raises ValueError."""
    del aggregation
    if parallel.axis_size(mesh, parallel.TANGENTS) > 1:
      if not self.tangent_parallel:
        raise ValueError(
          f"mesh: tangent parallelism (mesh.tangents > 1) needs dense weight tangents, got "
          f"tangents={self!r}; use mesh.tangents=1."
        )
      parallel.check_divisible(mesh, num_tangents=num_tangents)

  def estimate(
    self,
    fun: Callable[..., Any],
    key: jax.Array,
    params: PyTree,
    args: tuple,
    kwargs: dict,
    *,
    num_tangents: int,
    aggregation: Aggregation,
    hook: JvpHook | None = None,
    has_aux: bool = False,
    mesh: Any = None,
    ratio_of: Callable[[int], float] | None = None,
  ) -> tuple[Any, PyTree, int | None]:
    """The forward-gradient estimate of ``fun(params, *args, **kwargs)`` at ``params``.

    Args:
      fun: the function differentiated (checked by the caller).
      key: the PRNG key of the tangents.
      params: the point, a pytree of floating arrays.
      args: ``fun``'s positional arguments after ``params``.
      kwargs: ``fun``'s keyword arguments.
      num_tangents: k.
      aggregation: a name in :data:`fwdgrad_jax.aggregation.AGGREGATIONS` or a callable
        ``(tangents, d) -> estimate``.
      hook: applied to the directional derivatives d before the aggregation.
      has_aux: ``fun`` returns ``(value, aux)``.
      mesh: a :func:`fwdgrad_jax.parallel.make_mesh` mesh, or None.
      ratio_of: ``rescale=True``: n ↦ the expected length ratio of an estimate in n
        dimensions. A scheme whose estimate mixes parts of different dimensions (local
        losses credit each part with its own d; activity sites) divides each part by its
        own ratio and returns n = None; otherwise the caller divides by ``ratio_of(n)``.

    Returns:
      ``(out, grad, n)``: ``fun``'s output (value, or ``(value, aux)``), the estimate
      (params' structure, not yet cast to params' dtypes) and the dimension perturbed
      (None: already rescaled).
    """
    raise NotImplementedError

  def norm_ratio(self, n: int, num_tangents: int, aggregation: Aggregation) -> float:
    """:func:`expected_norm_ratio` of this scheme's estimate (``rescale=True`` divides by it)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Dense(Scheme):
  """Dense tangents on the parameters: every leaf gets a full tangent of its shape.

  Attributes:
    distribution: a name in :data:`fwdgrad_jax.tangents.SAMPLERS` (``"normal"``,
      ``"rademacher"``, ``"partition"``, ``"normal_threefry"``,
      ``"rademacher_threefry"``) or a callable ``(key, params, num_tangents) -> pytree
      like params with a leading axis k``.
    normalize: scale each tangent to unit norm over the whole pytree (Flügel's
      normalized sum/mean; the estimate is then ≈ ∇f/n in expectation, not ∇f).
    regenerate: keep only the key, not the k weight-sized tangents (MeZO-style memory):
      each leaf's tangents are drawn where the forward pass consumes the leaf and again
      where the aggregation combines them, one layer at a time. The same estimate (same
      draws, up to float rounding). Needs ``"normal"``/``"rademacher"``, aggregations
      sum, mean, orthogonal and no ``normalize``. On a mesh only the directional
      derivatives cross devices (see :func:`_regenerated_on_mesh`).
  """

  distribution: str | tangents_lib.Sampler = "normal"
  normalize: bool = False
  regenerate: bool = False

  tangent_parallel: ClassVar[bool] = True

  def __post_init__(self):
    d = self.distribution
    if not (callable(d) or (isinstance(d, str) and d in tangents_lib.SAMPLERS)):
      raise ValueError(
        f"tangents={d!r} is not a known tangent scheme (Dense distribution); use one of "
        f"{sorted(tangents_lib.SAMPLERS)}, a structured scheme "
        f"{list(perturbation_lib.STRUCTURED_TANGENTS)} or a callable "
        "(key, params, num_tangents) -> tangent batch."
      )
    if self.regenerate:
      if not (isinstance(d, str) and d in tangents_lib.REGENERABLE):
        raise _regenerate_error(f"tangents={d!r} (use one of {list(tangents_lib.REGENERABLE)})")
      if self.normalize:
        raise _regenerate_error("normalize=True (the tangents' norms would need them all at once)")

  def check(self, *, num_tangents: int, aggregation: Aggregation, mesh: Any = None) -> None:
    super().check(num_tangents=num_tangents, aggregation=aggregation, mesh=mesh)
    if not self.regenerate:
      return
    if not (isinstance(aggregation, str) and aggregation in aggregation_lib.LINEAR):
      raise _regenerate_error(
        f"aggregation={aggregation!r} (use one of {list(aggregation_lib.LINEAR)})"
      )

  def estimate(
    self, fun, key, params, args, kwargs, *, num_tangents, aggregation, hook=None,
    has_aux=False, mesh=None, ratio_of=None,
  ):  # fmt: skip
    if self.regenerate and not (
      aggregation == "orthogonal" and num_tangents >= _size(params)
    ):  # (k ≥ n: the projection is the SVD of V, and nothing is saved anyway)
      out, grad = _regenerated(fun, key, params, args, kwargs, num_tangents, aggregation, hook,
                               self.distribution, mesh)  # fmt: skip
      return out, grad, _size(params)
    # Drawn once, laid out for the jvp's matmuls, split over the mesh's tangent axis.
    batch = tangents_lib.draw(
      key,
      params,
      num_tangents,
      self.distribution,
      normalized=self.normalize,
      constrain=parallel.tangent_constraint(mesh),
      # The built-in aggregations read V in any layout (combine, gram); a callable may not.
      jvp_layout=isinstance(aggregation, str) and aggregation in aggregation_lib.LINEAR,
    )
    aggregate = aggregation_lib.get_aggregation(aggregation)
    if parallel.axis_size(mesh, parallel.TANGENTS) > 1 and aggregation in aggregation_lib.LINEAR:
      aggregate = functools.partial(aggregate, reduce=True)  # V stays split over devices
    marked = _marked_jvps(fun, params, args, kwargs, batch, has_aux)
    if marked is not None:  # local losses: each leaf credited with those it reaches
      out, d, losses = marked
      treedef = jax.tree.structure(params)
      grad = _credited_estimate(treedef, batch, d, losses, aggregate, hook, ratio_of=ratio_of)
      return out, grad, None if ratio_of is not None else _size(params)
    value, d, aux = directional_derivatives(
      lambda p: fun(p, *args, **kwargs), params, batch, has_aux=has_aux
    )
    out = (value, aux) if has_aux else value
    return out, aggregate(batch, _hooked(d, hook)), _size(params)

  def norm_ratio(self, n, num_tangents, aggregation):
    return expected_norm_ratio(
      n, num_tangents, aggregation, self.distribution, normalize=self.normalize
    )


class _Structured(Scheme):
  """Weight tangents shaped by the op that consumes each leaf (the jaxpr interpreter)."""

  normalize: bool

  @property
  def name(self) -> str:
    """The interpreter's name of the scheme (one of ``perturbation.STRUCTURED_TANGENTS``)."""
    raise NotImplementedError

  def estimate(
    self, fun, key, params, args, kwargs, *, num_tangents, aggregation, hook=None,
    has_aux=False, mesh=None, ratio_of=None,
  ):  # fmt: skip
    del has_aux, mesh  # the interpreter returns fun's whole output; no tangent mesh
    out, d, batch, losses = perturbation_lib.weight_tangents_and_jvps(
      fun, params, args, kwargs, key=key, num_tangents=num_tangents, tangents=self.name,
      with_losses=True,
    )  # fmt: skip
    aggregate = aggregation_lib.get_aggregation(aggregation)
    if any(losses[0]):  # local losses: each leaf credited with those it reaches
      treedef = jax.tree.structure(params)
      grad = _credited_estimate(
        treedef, batch, d, losses, aggregate, hook, self.normalize, ratio_of=ratio_of
      )
      return out, grad, None if ratio_of is not None else _size(params)
    if self.normalize:
      batch, d = _normalize(batch, d)
    return out, aggregate(batch, _hooked(d, hook)), _size(params)

  def norm_ratio(self, n, num_tangents, aggregation):
    return expected_norm_ratio(n, num_tangents, aggregation, self.name, normalize=self.normalize)


@dataclasses.dataclass(frozen=True)
class Rank1(_Structured):
  """Rank-1 weight tangents a ⊗ b (``tangents="rank1"``).

  Every parameter consumed by a ``dot_general``/``conv_general_dilated`` gets a ⊗ b
  (Gaussian factors over its input and output axes; E[vvᵀ] = I, unbiased), and x·(a⊗b)
  is computed as (x·a)⊗b. Other leaves get dense Gaussian tangents.

  Attributes:
    normalize: scale each tangent to unit norm over the whole pytree.
  """

  normalize: bool = False

  @property
  def name(self) -> str:
    return "rank1"


@dataclasses.dataclass(frozen=True)
class Input(_Structured):
  """Yao's input-generated weight tangents (``tangents="input"`` / ``"input_approx"``).

  A layer's tangent takes its input-side factor from the layer's input batch.

  Attributes:
    approx: the cheap approximation (``"input_approx"``: √rows·u_j/‖u_j‖ for a random
      input row u_j) instead of a random column of Q in the QR of the inputs.
    normalize: scale each tangent to unit norm over the whole pytree.

  References:
    Yao. Studies on Forward Mode Gradient Descent.
  """

  approx: bool = False
  normalize: bool = False

  @property
  def name(self) -> str:
    return "input_approx" if self.approx else "input"


@dataclasses.dataclass(frozen=True)
class Activity(Scheme):
  """Activity perturbation (``perturbation="activity"``).

  Tangents on the outputs of the parameter-consuming ops or on :func:`fwdgrad_jax.site`
  markers (see :mod:`fwdgrad_jax.perturbation`). ``fun`` may return a vector of
  per-example losses of shape (batch,): every example then gets its own directional
  derivative (d of shape (k, batch)) and the value returned is their mean. With
  :func:`fwdgrad_jax.local_loss` markers, each site is credited only with the directional
  derivatives of the marked losses it reaches (Ren et al.'s LG-FG-A; the weight schemes
  do the same per leaf, LG-FG-W).

  Attributes:
    distribution: of the activity tangents, ``"normal"`` or ``"rademacher"``.

  References:
    Ren et al., 2023. Scaling Forward Gradient With Local Losses.
  """

  distribution: str = "normal"

  per_example: ClassVar[bool] = True
  #: The sites' local guesses lead the tangent batch (:class:`LocalGuess`).
  guess: ClassVar[bool] = False

  def __post_init__(self):
    if self.distribution not in perturbation_lib.ACTIVITY_TANGENTS:
      raise ValueError(
        f"tangents={self.distribution!r} does not apply to perturbation='activity' (the "
        "tangents are activations, not weights; Activity distribution); use one of "
        f"{list(perturbation_lib.ACTIVITY_TANGENTS)}."
      )

  def estimate(
    self, fun, key, params, args, kwargs, *, num_tangents, aggregation, hook=None,
    has_aux=False, mesh=None, ratio_of=None,
  ):  # fmt: skip
    del has_aux, mesh  # the interpreter returns fun's whole output; no tangent mesh
    if self.guess:
      ratio_of = None  # no closed form to rescale by (norm_ratio is 1)
    out, grad, n = perturbation_lib.activity_estimate(
      fun,
      params,
      args,
      kwargs,
      key=key,
      num_tangents=num_tangents,
      tangents=self.distribution,
      aggregate=aggregation_lib.get_aggregation(aggregation),
      jvp_hook=hook,
      ratio_of=ratio_of,
      guess=self.guess,
    )
    return out, grad, None if ratio_of is not None else n  # rescaled per site

  def norm_ratio(self, n, num_tangents, aggregation):
    return expected_norm_ratio(n, num_tangents, aggregation, self.distribution)


@dataclasses.dataclass(frozen=True)
class LocalGuess(Activity):
  """Local-loss guesses as activity tangents (``tangents="local_guess"``, activity).

  Each activity site s (a :func:`fwdgrad_jax.site` marker, as for :class:`Activity`) gets
  a *guess* direction: the gradient of its own marked local losses
  (:func:`fwdgrad_jax.local_loss`) with respect to its activity, through its head only —
  the ops from s to the losses it reaches without crossing another site or a
  stop-gradient — by a reverse pass of that head alone when the forward pass reaches s
  (the head's backward, never the network's). The guess is normalised to unit length per
  example (per site), and enters as its own tangent, zero at the other sites: S sites
  give S guess tangents, followed by ``num_tangents − 1`` random activity tangents of
  ``distribution``. The jvp carries ``S + num_tangents − 1`` tangents; ``num_tangents=1``
  is the guess alone (Fournier et al.'s "local guess").

  **Biased** for the gradient of the total. With the guess alone the estimate is not
  random: per example and site, the projection (ĝ·∇f) ĝ of the site's gradient ∇f onto
  its unit guess ĝ (``sum`` and ``orthogonal`` agree, the guesses being orthogonal across
  sites; ``mean`` divides by the S + num_tangents − 1 tangents). It equals ∇f only where the guess is ∇f up to scale: where
  the site's losses are all its own (a stop-gradient after the block, Ren et al.'s local
  greedy losses: LG-BP exactly); where later losses reach s through later blocks, the
  guess misses their paths. With ``aggregation="orthogonal"`` and r = ``num_tangents −
  1`` random Gaussian tangents the estimate is the projection of ∇f onto span{guesses,
  random}, of expectation P_G ∇f + r/(n − S)·(I − P_G) ∇f per example (n activations
  per example, G the span of the S guesses; the random directions are isotropic in the
  complement of G): the full component along the guesses plus the random tangents'
  unbiased-up-to-r/(n − S) share of the rest, and exact (∇f) when S + r ≥ n. Without
  guesses the orthogonal projection is r/n ∇f in expectation. ``rescale`` leaves the
  estimate unchanged (its length depends on the guess's alignment, no closed form).

  Needs local-loss markers and activity sites; the heads must read only their own site's
  output (and parameters, data), not a later site's.

  Attributes:
    distribution: of the random activity tangents, ``"normal"`` or ``"rademacher"``.

  References:
    Fournier, Rivaud, Belilovsky, Eickenberg, Oyallon, 2023. Can Forward Gradient Match
    Backpropagation? ICML 2023.
    Ren et al., 2023. Scaling Forward Gradient With Local Losses.
    Flügel et al., 2024. Multi-Tangent Forward Gradients (outlook: guesses + orthogonal
    projection).
  """

  guess: ClassVar[bool] = True

  def __post_init__(self):
    if self.distribution not in perturbation_lib.ACTIVITY_TANGENTS:
      raise ValueError(
        f"LocalGuess(distribution={self.distribution!r}): the random tangents after the "
        f"guess are activity tangents; use one of {list(perturbation_lib.ACTIVITY_TANGENTS)}."
      )

  def norm_ratio(self, n, num_tangents, aggregation):
    return 1.0


def parse(
  tangents: str | tangents_lib.Sampler | Scheme = "normal",
  *,
  perturbation: str = "weights",
  normalize: bool = False,
  regenerate: bool = False,
) -> Scheme:
  """The scheme named by the estimator's string options: the one reader of them.

  ================================  =====================================================
  options                           scheme
  ================================  =====================================================
  ``tangents="normal"`` (default),  ``Dense("normal")``, ``Dense("rademacher")``, …
  ``"gaussian"``, ``"rademacher"``,
  ``"partition"``,
  ``"normal_threefry"``,
  ``"rademacher_threefry"``, or a
  callable sampler
  ``tangents="rank1"``              ``Rank1()``
  ``tangents="input"``              ``Input()``
  ``tangents="input_approx"``       ``Input(approx=True)``
  ``perturbation="activity"``       ``Activity(tangents)`` (``"normal"``/``"rademacher"``)
  ``tangents="local_guess"``,       ``LocalGuess()`` (guesses, then normal tangents)
  ``perturbation="activity"``
  ``normalize=True``                ``normalize=True`` of Dense, Rank1 and Input
  ``regenerate=True``               ``Dense(..., regenerate=True)``
  ================================  =====================================================

  Args:
    tangents: a name, a callable sampler, or a :class:`Scheme` (returned as is; then the
      other options must keep their defaults: the object carries its own).
    perturbation: ``"weights"`` or ``"activity"``.
    normalize: unit-norm weight tangents.
    regenerate: regenerated dense weight tangents.

  Returns:
    The scheme.

  Raises:
    ValueError: an unknown name or a combination that does not exist, naming the option.
  """
  if isinstance(tangents, Scheme):
    given = dict(perturbation=perturbation, normalize=normalize, regenerate=regenerate)
    extra = {k: v for k, v in given.items() if v != ("weights" if k == "perturbation" else False)}
    if extra:
      raise ValueError(
        f"tangents={tangents!r} is a scheme object, which carries its own options; got "
        f"{', '.join(f'{k}={v!r}' for k, v in extra.items())} as well. Set them on the object "
        "(e.g. schemes.Dense(normalize=True), schemes.Activity())."
      )
    return tangents
  if perturbation not in perturbation_lib.PERTURBATIONS:
    raise ValueError(
      f"perturbation={perturbation!r} is not known; use one of "
      f"{list(perturbation_lib.PERTURBATIONS)}."
    )
  if isinstance(tangents, str) and tangents in perturbation_lib.GUESS_TANGENTS:
    if perturbation != "activity":
      raise ValueError(
        f"tangents={tangents!r} needs perturbation='activity' (the guess is the gradient of "
        f"a local loss at an activity site), got perturbation={perturbation!r}."
      )
    if normalize:
      raise ValueError("normalize=True applies to weight tangents, not tangents='local_guess'.")
    if regenerate:
      raise _regenerate_error(f"tangents={tangents!r} (regenerate applies to weight tangents)")
    return LocalGuess()
  if perturbation == "activity":
    scheme = Activity(tangents)
    if normalize:
      raise ValueError("normalize=True applies to weight tangents, not perturbation='activity'.")
    if regenerate:
      raise _regenerate_error(
        f"perturbation={perturbation!r} (regenerate applies to weight tangents)"
      )
    return scheme
  if isinstance(tangents, str) and tangents in perturbation_lib.STRUCTURED_TANGENTS:
    if regenerate:
      raise _regenerate_error(
        f"tangents={tangents!r} (use one of {list(tangents_lib.REGENERABLE)})"
      )
    if tangents == "rank1":
      return Rank1(normalize=normalize)
    return Input(approx=tangents == "input_approx", normalize=normalize)
  return Dense(tangents, normalize=normalize, regenerate=regenerate)


# --------------------------------------------------------------------------------------
# Regenerated dense tangents
# --------------------------------------------------------------------------------------

# Up to this many regenerated tangents, Σ c_i v_i is one elementwise fusion (see _regenerated).
_UNROLLED_COMBINE = 64


def _regenerated(fun, key, params, args, kwargs, k, aggregation, hook, tangents, mesh=None):
  """The estimate with tangents redrawn from the key, never stored (``regenerate=True``)."""
  marked = parallel.batch_args_of(fun)
  if mesh is None and marked is not None:
    mesh = marked.mesh
  split_data = marked is not None and parallel.axis_size(mesh, parallel.DATA) > 1
  if split_data or parallel.axis_size(mesh, parallel.TANGENTS) > 1:
    return _regenerated_on_mesh(fun, key, params, args, kwargs, k, aggregation, hook, tangents,
                                mesh)  # fmt: skip
  out, d, gram, (unreached, loss_jvps) = perturbation_lib.regenerated_jvps(
    fun, params, args, kwargs, key=key, num_tangents=k, tangents=tangents,
    gram=aggregation == "orthogonal", with_losses=True,
  )  # fmt: skip
  grad = _regenerated_combine(key, params, d, gram, unreached, loss_jvps, k, aggregation, hook,
                              tangents)  # fmt: skip
  return out, grad


def _regenerated_combine(
  key, params, d, gram, unreached, loss_jvps, k, aggregation, hook, tangents
):
  """Σ c_i v_i with the tangents redrawn from the key after the coefficients c exist."""
  # Local losses: leaf i is combined with the coefficients of its credited d (without
  # markers every leaf has the empty key, d itself).
  by_key = perturbation_lib.credited(d, loss_jvps, unreached)
  coefs = {
    key: aggregation_lib.coefficients(aggregation, _hooked(dk, hook), gram)
    for key, dk in by_key.items()
  }
  leaves, treedef = jax.tree.flatten(params)
  seeds = tangents_lib.leaf_seeds(key, params)

  def combine(i, p):
    c = coefs[unreached[i]]
    # Redrawn after c exists. Written as a sum of k elementwise terms (unrolled at trace
    # time, one fused kernel at run time), XLA fuses the draw into Σ c_i v_i and that into
    # the optimizer's update: no leaf's tangents are ever a buffer. As a reduction over
    # the k axis, XLA:CPU's reduce kernel takes no fused producer and every leaf's
    # (k, …) draw became a buffer, all scheduled before the first reduction.
    if k > _UNROLLED_COMBINE:
      v = tangents_lib.regenerate_leaf(seeds[i], p, k, tangents, (c,))
      return aggregation_lib.combine([v], c)[0]
    cv = c.astype(jnp.result_type(p))
    # Each term its own draw: XLA would materialise one (k, …) draw read by k slices.
    return sum(
      cv[j] * tangents_lib.regenerate_leaf(seeds[i], p, k, tangents, (c,), index=j)
      for j in range(k)
    )

  grad = [combine(i, p) for i, p in enumerate(leaves)]
  return jax.tree.unflatten(treedef, grad)


def _regenerated_on_mesh(fun, key, params, args, kwargs, k, aggregation, hook, tangents, mesh):
  """The regenerated estimate on a mesh, communicating only the directional derivatives.

  Under ``jax.shard_map`` every device runs the loss on its shard of the batch (the
  arguments :func:`fwdgrad_jax.parallel.data_parallel` marked; replicated otherwise) with
  its k / T share of the tangents, drawn from the shared key at their place in the k. The
  k numbers d are then combined — ``all_gather`` over ``"tangents"``, ``pmean`` (or
  ``psum``) over ``"data"`` — and every device forms the same estimate Σ c_i v_i from the
  key: each redraws all k tangents (a device that ran only its share also forms the
  orthogonal aggregation's k × k Gram matrix from them). Bytes sent per step: O(k), not
  O(parameters). Replication of the result is by construction (the same program on the
  same key, parameters and d on every device), hence ``check_vma=False``: JAX's check
  cannot see that tangents tied to a device's activations are equal everywhere.
  """
  marked = parallel.batch_args_of(fun)
  local_fun = fun if marked is None else marked.fun
  reduce = jax.lax.psum if marked is not None and marked.reduction == "sum" else jax.lax.pmean
  split_data = marked is not None and parallel.axis_size(mesh, parallel.DATA) > 1
  t = parallel.axis_size(mesh, parallel.TANGENTS)
  share = k // t
  orthogonal = aggregation == "orthogonal"
  arg_specs, kwarg_specs = parallel.shard_map_specs(args, kwargs, marked, mesh)

  def combined(x):
    """A device's d (share, …) → everyone's (k, …): k numbers over each axis."""
    if split_data:
      x = reduce(x, parallel.DATA)
    if t > 1:
      x = jax.lax.all_gather(x, parallel.TANGENTS, axis=0, tiled=True)
    return x

  def body(key, params, args, kwargs):
    start = jax.lax.axis_index(parallel.TANGENTS) * share if t > 1 else 0
    out, d, gram, (unreached, loss_jvps) = perturbation_lib.regenerated_jvps(
      local_fun, params, args, kwargs, key=key, num_tangents=share, tangents=tangents,
      gram=orthogonal and t == 1, with_losses=True, start=start,
    )  # fmt: skip
    d = combined(d)
    loss_jvps = [None if x is None else combined(x) for x in loss_jvps]
    if split_data:
      # The value as the loss's reduction; aux (BatchNorm's new running statistics) is
      # averaged, integer state (RNG counters) is the same on every device.
      value, aux = out if isinstance(out, tuple) else (out, None)
      value = reduce(value, parallel.DATA)
      aux = jax.tree.map(
        lambda a: jax.lax.pmean(a, parallel.DATA)
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact) else a,
        aux,
      )  # fmt: skip
      out = (value, aux) if isinstance(out, tuple) else value
    if orthogonal and t > 1:
      gram = perturbation_lib.regenerated_gram(key, params, k, tangents, [d])
    grad = _regenerated_combine(key, params, d, gram, unreached, loss_jvps, k, aggregation, hook,
                                tangents)  # fmt: skip
    return out, grad

  P = jax.sharding.PartitionSpec
  return jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(P(), P(), arg_specs, kwarg_specs),
    out_specs=P(),
    check_vma=False,
  )(key, params, args, kwargs)
