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

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fwdgrad_jax import aggregation as aggregation_lib
from fwdgrad_jax import tangents as tangents_lib

PyTree = Any
ValueAndGradFn = Callable[..., tuple[Any, PyTree]]


def check_options(
  num_tangents: Any,
  tangents: Any,
  aggregation: Any,
  max_jvp_norm: Any = None,
) -> None:
  """Validates forward-gradient options; raises ValueError naming the bad one."""
  if (
    isinstance(num_tangents, bool)
    or not isinstance(num_tangents, numbers.Integral)
    or num_tangents < 1
  ):
    raise ValueError(f"num_tangents must be an integer >= 1, got num_tangents={num_tangents!r}.")
  tangents_lib.get_sampler(tangents)
  aggregation_lib.get_aggregation(aggregation)
  if max_jvp_norm is not None and not (isinstance(max_jvp_norm, numbers.Real) and max_jvp_norm > 0):
    raise ValueError(f"max_jvp_norm must be None or > 0, got max_jvp_norm={max_jvp_norm!r}.")


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


def _check_key(key: Any, who: str) -> None:
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(
        f"{who}: key must be a single PRNG key, got a key array of shape {key.shape}."
      )
    return
  if dtype != jnp.uint32 or jnp.ndim(key) != 1:
    raise ValueError(
      f"{who}: key must be a jax.random.key(...) or jax.random.PRNGKey(...), got "
      f"{type(key).__name__} with dtype {dtype} and shape {jnp.shape(key)}."
    )


def _check_value(value: Any, who: str) -> None:
  if jnp.shape(value) != () or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
    raise TypeError(
      f"{who}: fun must return a floating scalar (with has_aux=True: a pair (scalar, aux)), "
      f"got shape {jnp.shape(value)} and dtype {jnp.result_type(value)}."
    )


def _materialize(tree: PyTree, key: jax.Array) -> PyTree:
  """Returns ``tree`` unchanged, but computed once into buffers that consumers read.

  XLA fuses a cheap elementwise producer into every consumer, so the tangents (a
  counter hash and erf_inv's polynomial) would be drawn twice: once into the jvp's
  matmul operands and again in the aggregation — about a third of a k = 4 step on CPU.
  XLA does not fuse across a conditional (``optimization_barrier`` is expanded before
  fusion on CPU, so it does not help), hence the ``cond``: its predicate ``(w | 1) != 0``
  is true for every uint32 ``w`` but not provably so to XLA; the other branch never runs.
  """
  data = key if key.dtype == jnp.uint32 else jax.random.key_data(key)
  word = data.reshape(-1)[0]
  return jax.lax.cond(
    (word | jnp.uint32(1)) != 0, lambda t: t, lambda t: jax.tree.map(jnp.zeros_like, t), tree
  )


def _value_and_jvps(fun, params, tangent_batch, num_tangents, has_aux):
  """Returns (value, d of shape (k,), aux) with the primal evaluated once."""
  if num_tangents == 1:
    # vmap over a size-1 axis still batches every tangent op (e.g. a batched matmul
    # for x·dW), which XLA:CPU runs noticeably slower than the plain op.
    v = jax.tree.map(lambda t: t[0], tangent_batch)
    out = jax.jvp(fun, (params,), (v,), has_aux=has_aux)
    return out[0], out[1][None], (out[2] if has_aux else None)

  def jvp(v):
    return jax.jvp(fun, (params,), (v,), has_aux=has_aux)

  # params are closed over, not mapped: the primal stays unbatched and is computed once;
  # out_axes=None for value and aux asserts exactly that.
  out_axes = (None, 0, None) if has_aux else (None, 0)
  out = jax.vmap(jvp, out_axes=out_axes)(tangent_batch)
  return out[0], out[1], (out[2] if has_aux else None)


def value_and_forward_grad(
  fun: Callable[..., Any],
  *,
  num_tangents: int = 1,
  tangents: str | tangents_lib.Sampler = "normal",
  aggregation: str = "mean",
  has_aux: bool = False,
  normalize: bool = False,
  max_jvp_norm: float | None = None,
) -> ValueAndGradFn:
  """Forward-gradient twin of ``jax.value_and_grad(fun)``, with a PRNG key first.

  Args:
    fun: ``fun(params, *args, **kwargs)`` returning a floating scalar (or
      ``(scalar, aux)`` with ``has_aux``); differentiated w.r.t. ``params``, any
      pytree of floating arrays.
    num_tangents: k, the number of random tangents per call.
    tangents: a name in ``fwdgrad_jax.tangents.SAMPLERS`` (``"normal"``,
      ``"rademacher"``, ``"partition"``) or a callable
      ``(key, params, num_tangents) -> pytree like params with a leading axis k``.
    aggregation: ``"sum"`` (V d), ``"mean"`` (V d / k) or ``"orthogonal"``
      (V (VᵀV)⁺ d, the projection of ∇f onto the span of the tangents).
    has_aux: ``fun`` returns ``(value, aux)``; aux is returned, not differentiated.
    normalize: scale each tangent to unit norm over the whole pytree (Flügel's
      normalized sum/mean; the estimate is then ≈ ∇f/n in expectation, not ∇f).
    max_jvp_norm: if set, rescale the vector of directional derivatives d to norm at
      most this (the reproduction study's capping; for k = 1 it clips |d|).

  Returns:
    ``f(key, params, *args, **kwargs)`` → ``(value, grad)``, or
    ``((value, aux), grad)`` with ``has_aux``. ``grad`` has params' structure, shapes
    and dtypes. ``key`` is a raw ``jax.random.PRNGKey`` or a typed ``jax.random.key``.

  Raises:
    ValueError: a bad option (here), or integer params / a bad key (on call).

  References:
    Baydin et al., 2022. Gradients without Backpropagation.
    Flügel et al., 2024. Multi-Tangent Forward Gradients.
  """
  check_options(num_tangents, tangents, aggregation, max_jvp_norm)
  aggregate = aggregation_lib.get_aggregation(aggregation)

  def value_and_grad_fn(key, params, *args, **kwargs):
    _check_key(key, "value_and_forward_grad")
    _check_params(params, "value_and_forward_grad")
    tangent_batch = tangents_lib.sample(key, params, num_tangents, tangents, normalized=normalize)
    tangent_batch = _materialize(tangent_batch, key)
    value, jvps, aux = _value_and_jvps(
      lambda p: fun(p, *args, **kwargs), params, tangent_batch, num_tangents, has_aux
    )
    _check_value(value, "value_and_forward_grad")
    jvps = jvps.astype(jnp.float32)
    if max_jvp_norm is not None:
      norm = jnp.linalg.norm(jvps)
      jvps = jvps * jnp.minimum(1.0, max_jvp_norm / jnp.maximum(norm, 1e-30))
    grad = aggregate(tangent_batch, jvps)
    grad = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grad, params)
    return ((value, aux) if has_aux else value), grad

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


def get_estimator(name: str) -> Callable[..., ValueAndGradFn]:
  """The function transform registered as ``name`` in :data:`fwdgrad_jax.transforms.ESTIMATORS`.

  ``"forward"`` gives :func:`value_and_forward_grad`, ``"backprop"``
  :func:`value_and_exact_grad`.

  Raises:
    ValueError: unknown name.
  """
  from fwdgrad_jax import transforms  # the registry lives beside the optax forms

  return transforms.get(name).value_and_grad
