"""Gradient estimators as function transforms, shaped like ``jax.value_and_grad``.

``value_and_forward_grad(fun, ...)`` returns ``f(key, params, *args, **kwargs)`` →
``(value, grad)``: the PRNG key comes first, as in
``optax.perturbations.make_perturbed_fun``. The estimate is built from the exact
directional derivatives d = Vᵀ∇f along a batch of k random tangents V, all computed by
one ``vmap`` of ``jax.jvp`` whose primal inputs are unbatched, so the primal (the
forward pass) is evaluated once whatever k is. ``value_and_exact_grad`` has the same
call shape around ``jax.value_and_grad`` so loops can switch estimators by name (the
registry of names is :mod:`fwdgrad_jax.registry`). Where the tangents enter, and how d
and the estimate are computed there, is a :mod:`fwdgrad_jax.schemes` object; the
estimator composes it with an aggregation and hooks on d.

References:
  Baydin et al., 2022. Gradients without Backpropagation. arXiv:2202.08587.
  Flügel et al., 2024. Multi-Tangent Forward Gradients. arXiv:2410.17764.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad_jax import aggregation as aggregation_lib
from fwdgrad_jax import schemes
from fwdgrad_jax import tangents as tangents_lib
from fwdgrad_jax._moved import moved

# Re-exported: they moved to fwdgrad_jax.schemes with the tangent schemes that use them.
from fwdgrad_jax.schemes import directional_derivatives, expected_norm_ratio  # noqa: F401

PyTree = Any
ValueAndGradFn = Callable[..., tuple[Any, PyTree]]
JvpHook = Callable[[jax.Array], jax.Array]

#: The forward estimator's options and their defaults, stated once. The keyword options
#: of :func:`value_and_forward_grad` and :func:`fwdgrad_jax.forward_gradient` are these
#: (a test holds both signatures to it); the registry's ``config_options`` of
#: ``"forward"``, the fields the app's config sets, are these less :data:`RUNTIME_OPTIONS`.
FORWARD_OPTIONS: dict[str, Any] = dict(
  num_tangents=1,
  tangents="normal",
  aggregation="mean",
  has_aux=False,
  normalize=False,
  max_jvp_norm=None,
  jvp_hook=None,
  perturbation="weights",
  rescale=False,
  mesh=None,
  regenerate=False,
)
#: Options given in code rather than by a config: a function, a mesh, and ``has_aux``
#: (which follows from the loss).
RUNTIME_OPTIONS = ("has_aux", "jvp_hook", "mesh")


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
  regenerate: Any = False,
) -> schemes.Scheme:
  """Validates forward-gradient options; raises ValueError naming the bad one.

  Returns:
    The tangent scheme they name (:func:`fwdgrad_jax.schemes.parse`), not yet checked
    against the mesh and the aggregation (:meth:`fwdgrad_jax.schemes.Scheme.check`).
  """
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
  scheme = schemes.parse(
    tangents, perturbation=perturbation, normalize=normalize, regenerate=regenerate
  )
  aggregation_lib.get_aggregation(aggregation)
  if max_jvp_norm is not None and not (isinstance(max_jvp_norm, numbers.Real) and max_jvp_norm > 0):
    raise ValueError(f"max_jvp_norm must be None or > 0, got max_jvp_norm={max_jvp_norm!r}.")
  if jvp_hook is not None and not callable(jvp_hook):
    raise ValueError(f"jvp_hook must be None or a callable d -> d, got {jvp_hook!r}.")
  return scheme


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
# Hooks on the directional derivatives
# --------------------------------------------------------------------------------------


def cap_jvp_norm(max_norm: float) -> JvpHook:
  """A ``jvp_hook`` rescaling d to norm at most ``max_norm`` (the reproduction study's capping).

  For k = 1 it clips |d|; with per-example d (k, batch) the norm is over all of d.

  Args:
    max_norm: the cap (> 0).

  Returns:
    The hook, ``d -> d · min(1, max_norm/‖d‖)``.
  """

  def hook(d):
    norm = jnp.sqrt(jnp.sum(jnp.square(d)))
    return d * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))

  return hook


def _hooks(jvp_hook: JvpHook | None, max_jvp_norm: float | None) -> JvpHook | None:
  """``max_jvp_norm`` is the hook :func:`cap_jvp_norm`, applied after ``jvp_hook``."""
  hooks = [h for h in (jvp_hook, None if max_jvp_norm is None else cap_jvp_norm(max_jvp_norm)) if h]
  if not hooks:
    return None

  def hook(d):
    for h in hooks:
      d = h(d)
    return d

  return hook


# --------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------


def value_and_forward_grad(
  fun: Callable[..., Any],
  *,
  num_tangents: int = 1,
  tangents: str | tangents_lib.Sampler | schemes.Scheme = "normal",
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

  The estimate composes a tangent scheme (where the tangents enter, a
  :mod:`fwdgrad_jax.schemes` object), hooks on the directional derivatives d
  (``jvp_hook``, then ``max_jvp_norm``) and an aggregation of the tangents by d; then
  ``rescale``. The options are those of :data:`FORWARD_OPTIONS`.

  Args:
    fun: ``fun(params, *args, **kwargs)`` returning a floating scalar (or
      ``(scalar, aux)`` with ``has_aux``); differentiated w.r.t. ``params``, any
      pytree of floating arrays. With ``perturbation="activity"`` it may return a
      vector of per-example losses of shape (batch,) instead: every example then gets
      its own directional derivative and the value returned is their mean.
    num_tangents: k, the number of random tangents per call.
    tangents: a :class:`fwdgrad_jax.schemes.Scheme` (``schemes.Dense(...)``,
      ``schemes.Rank1()``, ``schemes.Input()``, ``schemes.Activity()``), or, read by
      :func:`fwdgrad_jax.schemes.parse` with ``perturbation``, ``normalize`` and
      ``regenerate``: a name in ``fwdgrad_jax.tangents.SAMPLERS`` (``"normal"``,
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
      most this (the reproduction study's capping, the hook :func:`cap_jvp_norm`; for
      k = 1 it clips |d|).
    jvp_hook: a function applied to d before the aggregation (before capping); d has
      shape (k,), or (k, batch) for per-example activity losses.
    perturbation: ``"weights"`` (tangents on the parameters) or ``"activity"``
      (tangents on the outputs of the parameter-consuming ops or on
      :func:`fwdgrad_jax.site` markers; see :mod:`fwdgrad_jax.perturbation`).
    rescale: divide the estimate by :func:`expected_norm_ratio` for its (n, k,
      aggregation, scheme), so that its expected length is that of ∇f and one learning
      rate transfers across k and aggregations. With local losses each part credited
      with its own d is divided by the ratio of its own dimension (a leaf group; an
      activity site, or one slice of it); exact parts (activity's tail after the last
      site) are not divided.
    mesh: a :func:`fwdgrad_jax.parallel.make_mesh` mesh: the k dense tangents are split
      along its ``"tangents"`` axis (each device draws and runs its share of the vmapped
      jvp; the aggregation is combined across devices). Shard the batch along
      ``"data"`` yourself (:func:`fwdgrad_jax.parallel.data_parallel`). The estimate is
      the one computed without a mesh, up to the order of floating-point sums. With
      ``regenerate=True`` only the k directional derivatives cross devices (each device
      redraws the tangents from the key and forms the estimate itself).
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
  scheme = check_options(
    num_tangents,
    tangents,
    aggregation,
    max_jvp_norm,
    perturbation=perturbation,
    normalize=normalize,
    jvp_hook=jvp_hook,
    regenerate=regenerate,
  )
  scheme.check(num_tangents=num_tangents, aggregation=aggregation, mesh=mesh)
  hook = _hooks(jvp_hook, max_jvp_norm)
  who = "value_and_forward_grad"

  def value_and_grad_fn(key, params, *args, **kwargs):
    _check_key(key, who)
    _check_params(params, who)
    _check_output(fun, params, args, kwargs, has_aux, who, per_example=scheme.per_example)
    ratio_of = (lambda n: scheme.norm_ratio(n, num_tangents, aggregation)) if rescale else None
    out, grad, n = scheme.estimate(
      fun, key, params, args, kwargs, num_tangents=num_tangents, aggregation=aggregation,
      hook=hook, has_aux=has_aux, mesh=mesh, ratio_of=ratio_of,
    )  # fmt: skip
    if ratio_of is not None and n is not None:  # None: the scheme rescaled its parts
      ratio = ratio_of(n)
      grad = jax.tree.map(lambda g: g / ratio, grad)
    return out, jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grad, params)

  return value_and_grad_fn


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


# The registry moved to fwdgrad_jax.registry, which imports this module: forwarded by name.
__getattr__ = moved(__name__, "fwdgrad_jax.registry", names=("get_estimator",))
