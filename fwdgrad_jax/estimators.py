"""Gradient estimators as function transforms, shaped like ``jax.value_and_grad``.

``value_and_forward_grad(fun, ...)`` returns ``f(key, params, *args, **kwargs)`` →
``(value, grad)``: the PRNG key comes first, as in
``optax.perturbations.make_perturbed_fun``. The estimate is built from the exact
directional derivatives d = Vᵀ∇f along a batch of k random tangents V, all computed by
one ``vmap`` of ``jax.jvp`` whose primal inputs are unbatched, so the primal (the
forward pass) is evaluated once whatever k is. ``value_and_exact_grad`` has the same
call shape around ``jax.value_and_grad`` so loops can switch estimators by name.

References:
  Baydin et al., 2022. Gradients without Backpropagation. arXiv:2202.08587.
  Flügel et al., 2024. Multi-Tangent Forward Gradients. arXiv:2410.17764.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad_jax import aggregation as aggregation_lib
from fwdgrad_jax import parallel
from fwdgrad_jax import perturbation as perturbation_lib
from fwdgrad_jax import tangents as tangents_lib

PyTree = Any
ValueAndGradFn = Callable[..., tuple[Any, PyTree]]
JvpHook = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def check_options(
  num_tangents: Any,
  tangents: Any,
  aggregation: Any,
  max_jvp_norm: Any = None,
  *,
  perturbation: Any = "weights",
  normalize: Any = False,
  jvp_hook: Any = None,
) -> None:
  """Validates forward-gradient options; raises ValueError naming the bad one."""
  if isinstance(num_tangents, jax.Array | np.ndarray):
    raise ValueError(
      f"num_tangents must be a Python integer >= 1, got an array ({num_tangents!r}). Under "
      "optax.inject_hyperparams every numeric argument becomes an array: pass "
      "static_args=('num_tangents',) to keep it a static integer."
    )
  if (
    isinstance(num_tangents, bool)
    or not isinstance(num_tangents, numbers.Integral)
    or num_tangents < 1
  ):
    raise ValueError(f"num_tangents must be an integer >= 1, got num_tangents={num_tangents!r}.")
  perturbation_lib.check_options(perturbation, tangents, normalize)
  if not perturbation_lib.uses_interpreter(perturbation, tangents):
    tangents_lib.get_sampler(tangents)
  aggregation_lib.get_aggregation(aggregation)
  if max_jvp_norm is not None and not (isinstance(max_jvp_norm, numbers.Real) and max_jvp_norm > 0):
    raise ValueError(f"max_jvp_norm must be None or > 0, got max_jvp_norm={max_jvp_norm!r}.")
  if jvp_hook is not None and not callable(jvp_hook):
    raise ValueError(f"jvp_hook must be None or a callable d -> d, got {jvp_hook!r}.")


def _check_params(params: PyTree, who: str) -> None:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  if not leaves:
    raise ValueError(f"{who}: params has no array leaves to differentiate.")
  for path, leaf in leaves:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f"{who}: params must be a pytree of floating arrays, but "
        f"params{jax.tree_util.keystr(path)} has dtype {dtype}. Split non-trainable "
        "state (e.g. integer counters, nnx RNG state) off before differentiating."
      )


def _raw_key_shape() -> tuple[int, ...]:
  return jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape


def _check_key(key: Any, who: str) -> None:
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(
        f"{who}: key must be a single PRNG key, got a key array of shape {key.shape}."
      )
    return
  want = _raw_key_shape()
  if dtype != jnp.uint32 or jnp.shape(key) != want:
    raise ValueError(
      f"{who}: key must be a jax.random.key(...) or a raw jax.random.PRNGKey(...) (uint32 of "
      f"shape {want} for the default PRNG), got {type(key).__name__} with dtype {dtype} "
      f"and shape {jnp.shape(key)}."
    )


def _check_output(
  fun: Callable[..., Any],
  params: PyTree,
  args: tuple,
  kwargs: dict,
  has_aux: bool,
  who: str,
  per_example: bool = False,
) -> None:
  """Checks what ``fun`` returns (shapes only: abstract evaluation, no computation)."""
  out = jax.eval_shape(lambda p: fun(p, *args, **kwargs), params)
  want = "a floating scalar" + (" or a vector of per-example losses" if per_example else "")
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError(f"{who}: with has_aux=True, fun must return a pair (value, aux), got {out}.")
    out = out[0]
  elif isinstance(out, tuple | list | dict):
    raise TypeError(
      f"{who}: fun returned a {type(out).__name__} ({out}); it must return {want}. If it "
      "returns (value, aux), pass has_aux=True."
    )
  shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
  ok_shape = shape == () or (per_example and shape is not None and len(shape) == 1)
  if not ok_shape or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    hint = ""
    if not per_example and shape is not None and len(shape) == 1:
      hint = " (per-example losses of shape (batch,) need perturbation='activity')"
    raise TypeError(f"{who}: fun must return {want}, got shape {shape} and dtype {dtype}{hint}.")


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


def cap_jvp_norm(max_norm: float) -> JvpHook:
  """A ``jvp_hook`` rescaling d to norm at most ``max_norm`` (the reproduction study's capping).

  For k = 1 it clips |d|; with per-example d (k, batch) the norm is over all of d.
  """

  def hook(d):
    norm = jnp.sqrt(jnp.sum(jnp.square(d)))
    return d * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))

  return hook


def _hooks(jvp_hook: JvpHook | None, max_jvp_norm: float | None) -> JvpHook | None:
  hooks = [h for h in (jvp_hook, None if max_jvp_norm is None else cap_jvp_norm(max_jvp_norm)) if h]
  if not hooks:
    return None

  def hook(d):
    for h in hooks:
      d = h(d)
    return d

  return hook


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


# --------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------


def value_and_forward_grad(
  fun: Callable[..., Any],
  *,
  num_tangents: int = 1,
  tangents: str | tangents_lib.Sampler = "normal",
  aggregation: str | aggregation_lib.Aggregation = "mean",
  has_aux: bool = False,
  normalize: bool = False,
  max_jvp_norm: float | None = None,
  jvp_hook: JvpHook | None = None,
  perturbation: str = "weights",
  rescale: bool = False,
  mesh: jax.sharding.Mesh | None = None,
  regenerate: bool = False,
) -> ValueAndGradFn:
  """Forward-gradient twin of ``jax.value_and_grad(fun)``, with a PRNG key first.

  Args:
    fun: ``fun(params, *args, **kwargs)`` returning a floating scalar (or
      ``(scalar, aux)`` with ``has_aux``); differentiated w.r.t. ``params``, any
      pytree of floating arrays. With ``perturbation="activity"`` it may return a
      vector of per-example losses of shape (batch,) instead: every example then gets
      its own directional derivative and the value returned is their mean.
    num_tangents: k, the number of random tangents per call.
    tangents: a name in ``fwdgrad_jax.tangents.SAMPLERS`` (``"normal"``,
      ``"rademacher"``, ``"partition"``, …), a structured scheme of
      :mod:`fwdgrad_jax.perturbation` (``"rank1"``, ``"input"``, ``"input_approx"``),
      or a callable ``(key, params, num_tangents) -> pytree like params with a leading
      axis k``. With ``perturbation="activity"``: the distribution of the activity
      tangents (``"normal"`` or ``"rademacher"``).
    aggregation: ``"sum"`` (V d), ``"mean"`` (V d / k), ``"orthogonal"``
      (V (VᵀV)⁺ d, the projection of ∇f onto the span of the tangents) or a callable
      ``(tangents, d) -> estimate`` (see :mod:`fwdgrad_jax.aggregation`).
    has_aux: ``fun`` returns ``(value, aux)``; aux is returned, not differentiated.
    normalize: scale each tangent to unit norm over the whole pytree (Flügel's
      normalized sum/mean; the estimate is then ≈ ∇f/n in expectation, not ∇f).
    max_jvp_norm: if set, rescale the vector of directional derivatives d to norm at
      most this (the reproduction study's capping; for k = 1 it clips |d|).
    jvp_hook: a function applied to d before the aggregation (after capping); d has
      shape (k,), or (k, batch) for per-example activity losses.
    perturbation: ``"weights"`` (tangents on the parameters) or ``"activity"``
      (tangents on the outputs of the parameter-consuming ops or on
      :func:`fwdgrad_jax.site` markers; see :mod:`fwdgrad_jax.perturbation`).
    rescale: divide the estimate by :func:`expected_norm_ratio` for its (n, k,
      aggregation, scheme), so that its expected length is that of ∇f and one learning
      rate transfers across k and aggregations.
    mesh: a :func:`fwdgrad_jax.parallel.make_mesh` mesh: the k dense tangents are split
      along its ``"tangents"`` axis (each device draws and runs its share of the vmapped
      jvp; the aggregation is combined across devices). Shard the batch along
      ``"data"`` yourself (:func:`fwdgrad_jax.parallel.data_parallel`). The estimate is
      the one computed without a mesh, up to the order of floating-point sums.
    regenerate: keep only the key, not the k weight-sized tangents (MeZO-style memory):
      each leaf's tangents are drawn where the forward pass consumes the leaf and again
      where the aggregation combines them, one layer at a time, so a step holds params,
      the estimate and one layer's tangents. The same estimate as without (same draws,
      up to float rounding). Dense ``"normal"``/``"rademacher"`` weight tangents,
      aggregations sum, mean, orthogonal (its Gram matrix accumulated in the pass).

  Returns:
    ``f(key, params, *args, **kwargs)`` → ``(value, grad)``, or
    ``((value, aux), grad)`` with ``has_aux``. ``grad`` has params' structure, shapes
    and dtypes. ``key`` is a raw ``jax.random.PRNGKey`` or a typed ``jax.random.key``.

  Raises:
    ValueError: a bad option (here), or integer params / a bad key (on call).
    TypeError: ``fun`` returns something other than described (on call).

  References:
    Baydin et al., 2022. Gradients without Backpropagation.
    Flügel et al., 2024. Multi-Tangent Forward Gradients.
  """
  check_options(
    num_tangents,
    tangents,
    aggregation,
    max_jvp_norm,
    perturbation=perturbation,
    normalize=normalize,
    jvp_hook=jvp_hook,
  )
  aggregate = aggregation_lib.get_aggregation(aggregation)
  hook = _hooks(jvp_hook, max_jvp_norm)
  structured = perturbation_lib.uses_interpreter(perturbation, tangents)
  who = "value_and_forward_grad"
  if parallel.axis_size(mesh, parallel.TANGENTS) > 1:
    if structured or perturbation != "weights":
      raise ValueError(
        f"mesh: tangent parallelism (mesh.tangents > 1) needs dense weight tangents, got "
        f"tangents={tangents!r} with perturbation={perturbation!r}; use mesh.tangents=1."
      )
    parallel.check_divisible(mesh, num_tangents=num_tangents)
  if regenerate:
    _check_regenerate(tangents, aggregation, normalize, perturbation, mesh)

  def finish(grad, params, n):
    if rescale:
      ratio = expected_norm_ratio(n, num_tangents, aggregation, tangents, normalize=normalize)
      grad = jax.tree.map(lambda g: g / ratio, grad)
    return jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grad, params)

  def value_and_grad_fn(key, params, *args, **kwargs):
    _check_key(key, who)
    _check_params(params, who)
    _check_output(fun, params, args, kwargs, has_aux, who, per_example=perturbation == "activity")
    if perturbation == "activity":
      out, grad, n = perturbation_lib.activity_estimate(
        fun,
        params,
        args,
        kwargs,
        key=key,
        num_tangents=num_tangents,
        tangents=tangents,
        aggregate=aggregate,
        jvp_hook=hook,
      )
      return out, finish(grad, params, n)
    if regenerate and not (
      aggregation == "orthogonal" and num_tangents >= _size(params)
    ):  # (k ≥ n: the projection is the SVD of V, and nothing is saved anyway)
      return _regenerated(
        fun, key, params, args, kwargs, num_tangents, tangents, aggregation, hook, finish
      )
    if structured:
      out, d, batch = perturbation_lib.weight_tangents_and_jvps(
        fun, params, args, kwargs, key=key, num_tangents=num_tangents, tangents=tangents
      )
      if normalize:
        batch, d = _normalize(batch, d)
    else:
      # Drawn once, laid out for the jvp's matmuls, split over the mesh's tangent axis.
      batch = tangents_lib.draw(
        key,
        params,
        num_tangents,
        tangents,
        normalized=normalize,
        constrain=parallel.tangent_constraint(mesh),
        jvp_layout=aggregation in ("mean", "sum"),  # the Gram matrix flattens tangents
      )
      value, d, aux = directional_derivatives(
        lambda p: fun(p, *args, **kwargs), params, batch, has_aux=has_aux
      )
      out = (value, aux) if has_aux else value
    # The directional derivatives in the parameters' precision, at least float32.
    d = d.astype(jnp.promote_types(d.dtype, jnp.float32))
    if hook is not None:
      d = hook(d)
    return out, finish(aggregate(batch, d), params, _size(params))

  return value_and_grad_fn


# Up to this many regenerated tangents, Σ c_i v_i is one elementwise fusion (see _regenerated).
_UNROLLED_COMBINE = 64


def _check_regenerate(tangents, aggregation, normalize, perturbation, mesh) -> None:
  problem = None
  if perturbation != "weights":
    problem = f"perturbation={perturbation!r} (regenerate applies to weight tangents)"
  elif not (isinstance(tangents, str) and tangents in tangents_lib.REGENERABLE):
    problem = f"tangents={tangents!r} (use one of {list(tangents_lib.REGENERABLE)})"
  elif not (isinstance(aggregation, str) and aggregation in aggregation_lib.LINEAR):
    problem = f"aggregation={aggregation!r} (use one of {list(aggregation_lib.LINEAR)})"
  elif normalize:
    problem = "normalize=True (the tangents' norms would need them all at once)"
  elif parallel.axis_size(mesh, parallel.TANGENTS) > 1:
    problem = "a mesh with mesh.tangents > 1"
  if problem:
    raise ValueError(f"regenerate=True does not work with {problem}.")


def _regenerated(fun, key, params, args, kwargs, k, tangents, aggregation, hook, finish):
  """The estimate with tangents redrawn from the key, never stored (``regenerate=True``)."""
  out, d, gram = perturbation_lib.regenerated_jvps(
    fun, params, args, kwargs, key=key, num_tangents=k, tangents=tangents,
    gram=aggregation == "orthogonal",
  )  # fmt: skip
  d = d.astype(jnp.promote_types(d.dtype, jnp.float32))
  if hook is not None:
    d = hook(d)
  c = aggregation_lib.coefficients(aggregation, d, gram)
  leaves, treedef = jax.tree.flatten(params)
  seeds = tangents_lib.leaf_seeds(key, params)

  def combine(i, p):
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
  return out, finish(jax.tree.unflatten(treedef, grad), params, _size(params))


def forward_grad(fun: Callable[..., Any], **options: Any) -> Callable[..., Any]:
  """Like :func:`value_and_forward_grad` but returns only ``grad`` (``(grad, aux)`` with has_aux).

  Args:
    fun: the function to differentiate, as for :func:`value_and_forward_grad`.
    **options: the keyword options of :func:`value_and_forward_grad`.

  Returns:
    ``f(key, params, *args, **kwargs)`` → ``grad``.
  """
  value_and_grad_fn = value_and_forward_grad(fun, **options)
  has_aux = options.get("has_aux", False)

  def grad_fn(key, params, *args, **kwargs):
    value, grad = value_and_grad_fn(key, params, *args, **kwargs)
    return (grad, value[1]) if has_aux else grad

  return grad_fn


def value_and_exact_grad(fun: Callable[..., Any], *, has_aux: bool = False) -> ValueAndGradFn:
  """``jax.value_and_grad(fun)`` behind the forward estimators' call shape.

  Args:
    fun: as for ``jax.value_and_grad``.
    has_aux: as for ``jax.value_and_grad``.

  Returns:
    ``f(key, params, *args, **kwargs)`` → ``(value, grad)``; ``key`` is ignored, so a
    loop can switch between backprop and forward gradients by name.
  """
  value_and_grad_fn = jax.value_and_grad(fun, has_aux=has_aux)

  def exact_fn(key, params, *args, **kwargs):
    del key
    _check_params(params, "value_and_exact_grad")
    return value_and_grad_fn(params, *args, **kwargs)

  return exact_fn


def get_estimator(name: str) -> Callable[..., ValueAndGradFn]:
  """The function transform registered as ``name`` in :data:`fwdgrad_jax.transforms.ESTIMATORS`.

  ``"forward"`` gives :func:`value_and_forward_grad`, ``"backprop"``
  :func:`value_and_exact_grad`.

  Raises:
    ValueError: unknown name.
  """
  from fwdgrad_jax import transforms  # the registry lives beside the optax forms

  fn = transforms.get(name).value_and_grad
  if fn is None:
    raise ValueError(
      f"estimator={name!r} is stateful and has no function-transform form; use its optax "
      f"transform, fwdgrad_jax.gradient_transform({name!r}, ...)."
    )
  return fn
