"""Gradient estimators as optax gradient transformations.

``forward_gradient(...)`` ignores the incoming updates and returns the forward-gradient
estimate of ``value_fn(params, **extra_args)``; put it first in an ``optax.chain``::

  tx = optax.chain(
      fwdgrad_jax.forward_gradient(num_tangents=4, key=jax.random.key(0)),
      optax.clip_by_global_norm(1.0),
      optax.sgd(1e-3),
  )
  updates, state = tx.update(params, state, params, value_fn=loss, batch=batch)

The state keeps the PRNG key (fresh tangents every step), the loss of the last step in
``value`` (as optax's line-search states do, so a loop reads it for free with
``optax.tree_utils.tree_get(state, "value")``) and, with ``has_aux``, the auxiliary
output of ``value_fn`` in ``aux`` (a model's new BatchNorm statistics and RNG state).
The registry of estimator names, :data:`fwdgrad_jax.registry.ESTIMATORS`, lives in
:mod:`fwdgrad_jax.registry` (it imports this module); ``transforms.ESTIMATORS``,
``transforms.get`` and ``transforms.gradient_transform`` still reach it.

References:
  Baydin et al., 2022. Gradients without Backpropagation.
  Flügel et al., 2024. Multi-Tangent Forward Gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fwdgrad_jax import estimators, schemes
from fwdgrad_jax import tangents as tangents_lib
from fwdgrad_jax._moved import moved


class ForwardGradientState(NamedTuple):
  """State of :func:`forward_gradient`.

  Attributes:
    key: PRNG key for the next step's tangents.
    value: the loss evaluated by the last update (NaN before the first).
    aux: with ``has_aux``, the auxiliary output of the last ``value_fn`` call (e.g. a
      model's new BatchNorm statistics and RNG state); None before the first update
      and without ``has_aux``.
  """

  key: jax.Array
  value: jax.Array
  aux: Any = None


class ExactGradientState(NamedTuple):
  """State of :func:`exact_gradient`: the same ``value`` and ``aux`` as a forward state."""

  value: jax.Array
  aux: Any = None


def _nan() -> jax.Array:
  return jnp.full((), jnp.nan, jnp.float32)


def _needs(who: str, params: Any, value_fn: Any) -> None:
  if params is None or value_fn is None:
    raise ValueError(
      f"{who}.update needs params and value_fn: "
      "tx.update(updates, state, params, value_fn=loss_fn, **loss_kwargs)."
    )


def _split_value(value: Any, has_aux: bool) -> tuple[jax.Array, Any]:
  if has_aux:
    value, aux = value
    return jnp.asarray(value, jnp.float32), aux
  return jnp.asarray(value, jnp.float32), None


def forward_gradient(
  num_tangents: int = 1,
  tangents: str | tangents_lib.Sampler | schemes.Scheme = "normal",
  aggregation: str | Callable[..., Any] = "mean",
  *,
  key: jax.Array,
  has_aux: bool = False,
  normalize: bool = False,
  max_jvp_norm: float | None = None,
  jvp_hook: Callable[[jax.Array], jax.Array] | None = None,
  perturbation: str = "weights",
  rescale: bool = False,
  mesh: jax.sharding.Mesh | None = None,
  regenerate: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Replaces the updates by a forward-gradient estimate of ``value_fn``.

  Put it first in an ``optax.chain``: it ignores the incoming updates. Wrappers that
  accumulate or skip updates go *after* it, around the optimizer, e.g.
  ``optax.chain(forward_gradient(...), optax.MultiSteps(optax.sgd(lr), k).gradient_transformation())``
  averages k fresh estimates per applied step; wrapping the chain that contains it
  (``optax.MultiSteps(optax.chain(forward_gradient(...), ...), k)``) would not
  accumulate anything, because the estimate does not depend on the updates it is given.
  Under ``optax.inject_hyperparams``, pass ``static_args=("num_tangents",)`` and any
  other non-numeric option: injected hyperparameters become arrays.

  Args:
    num_tangents: k, tangents per step (one primal pass whatever k).
    tangents: tangent scheme name, sampler or object, see :mod:`fwdgrad_jax.schemes`.
    aggregation: ``"sum"``, ``"mean"``, ``"orthogonal"`` or a callable, see
      :mod:`fwdgrad_jax.aggregation`.
    key: PRNG key; split every step so each step draws fresh tangents.
    has_aux: ``value_fn`` returns ``(loss, aux)``; ``aux`` (e.g. a model's updated
      BatchNorm statistics) is stored in ``state.aux`` for the caller to thread back in.
      It is None until the first update: to carry the state through ``lax.scan`` or
      ``fori_loop``, set it first, ``optax.tree_utils.tree_set(state, aux=initial)``.
    normalize, max_jvp_norm, jvp_hook, perturbation, rescale, mesh, regenerate: as for
      :func:`fwdgrad_jax.value_and_forward_grad`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose
    ``update(updates, state, params, *, value_fn, **kwargs)`` returns the estimate of
    ∇ ``value_fn(params, **kwargs)``; ``state.value`` holds that step's loss.

  Raises:
    ValueError: a bad option, named (here, not at the first update).

  References:
    Baydin et al., 2022. Gradients without Backpropagation.
    Flügel et al., 2024. Multi-Tangent Forward Gradients.
  """
  # The arguments named in the one option list (the signature above is held to it by a test).
  options = {k: v for k, v in locals().items() if k in estimators.FORWARD_OPTIONS}
  # Builds once to check every option now, with a name, rather than inside a jit trace.
  estimators.value_and_forward_grad(lambda p: p, **options)

  def init_fn(params):
    del params
    return ForwardGradientState(key=key, value=_nan())

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del updates  # The estimate replaces whatever came in.
    _needs("forward_gradient", params, value_fn)
    next_key, step_key = jax.random.split(state.key)
    value, grad = estimators.value_and_forward_grad(value_fn, **options)(
      step_key, params, **extra_args
    )
    value, aux = _split_value(value, has_aux)
    return grad, ForwardGradientState(key=next_key, value=value, aux=aux)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def exact_gradient(*, has_aux: bool = False) -> optax.GradientTransformationExtraArgs:
  """Backprop (``jax.value_and_grad``) with the call shape of :func:`forward_gradient`.

  Args:
    has_aux: as for :func:`forward_gradient`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` computing the true gradient of
    ``value_fn``; its :class:`ExactGradientState` records ``value`` (and ``aux``).
  """

  def init_fn(params):
    del params
    return ExactGradientState(value=_nan())

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del updates, state
    _needs("exact_gradient", params, value_fn)
    value, grad = jax.value_and_grad(value_fn, has_aux=has_aux)(params, **extra_args)
    value, aux = _split_value(value, has_aux)
    return grad, ExactGradientState(value=value, aux=aux)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_REGISTRY_NAMES = ("ESTIMATORS", "Estimator", "get", "gradient_transform")


# The registry moved to fwdgrad_jax.registry, which imports this module: forwarded by name.
__getattr__ = moved(__name__, "fwdgrad_jax.registry", names=_REGISTRY_NAMES)
