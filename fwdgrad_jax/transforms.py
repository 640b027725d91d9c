"""Gradient estimators as optax gradient transformations.

``forward_gradient(...)`` ignores the incoming updates and returns the forward-gradient
estimate of ``value_fn(params, **extra_args)``; put it first in an ``optax.chain``::

  tx = optax.chain(
      fwdgrad_jax.forward_gradient(num_tangents=4, key=jax.random.key(0)),
      optax.clip_by_global_norm(1.0),
      optax.sgd(1e-3),
  )
  updates, state = tx.update(params, state, params, value_fn=loss, batch=batch)

The state keeps the PRNG key (fresh tangents every step) and the loss of the last step
in ``value``, as optax's line-search states do, so a loop can log it for free.

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

from fwdgrad_jax import estimators
from fwdgrad_jax import tangents as tangents_lib


class ForwardGradientState(NamedTuple):
  """State of :func:`forward_gradient` and :func:`exact_gradient`.

  Attributes:
    key: PRNG key for the next step's tangents.
    value: the loss evaluated by the last update (NaN before the first).
  """

  key: jax.Array
  value: jax.Array


def _estimator_transform(
  make_value_and_grad: Callable[[Callable[..., Any]], estimators.ValueAndGradFn],
  key: jax.Array,
  who: str,
) -> optax.GradientTransformationExtraArgs:
  def init_fn(params):
    del params
    return ForwardGradientState(key=key, value=jnp.full((), jnp.nan, jnp.float32))

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del updates  # The estimate replaces whatever came in.
    if params is None or value_fn is None:
      raise ValueError(
        f"{who}.update needs params and value_fn: "
        "tx.update(updates, state, params, value_fn=loss_fn, **loss_kwargs)."
      )
    key, step_key = jax.random.split(state.key)
    value, grad = make_value_and_grad(value_fn)(step_key, params, **extra_args)
    return grad, ForwardGradientState(key=key, value=jnp.asarray(value, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def forward_gradient(
  num_tangents: int = 1,
  tangents: str | tangents_lib.Sampler = "normal",
  aggregation: str = "mean",
  *,
  key: jax.Array,
  normalize: bool = False,
  max_jvp_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Replaces the updates by a forward-gradient estimate of ``value_fn``.

  Args:
    num_tangents: k, tangents per step (one primal pass whatever k).
    tangents: tangent scheme name or sampler, see :mod:`fwdgrad_jax.tangents`.
    aggregation: ``"sum"``, ``"mean"`` or ``"orthogonal"``.
    key: PRNG key; split every step so each step draws fresh tangents.
    normalize: unit-norm tangents (Flügel's normalized sum/mean).
    max_jvp_norm: cap on the norm of the directional derivatives.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose
    ``update(updates, state, params, *, value_fn, **kwargs)`` returns the estimate of
    ∇ ``value_fn(params, **kwargs)``; ``state.value`` holds that step's loss.

  References:
    Baydin et al., 2022. Gradients without Backpropagation.
    Flügel et al., 2024. Multi-Tangent Forward Gradients.
  """
  options = dict(
    num_tangents=num_tangents,
    tangents=tangents,
    aggregation=aggregation,
    normalize=normalize,
    max_jvp_norm=max_jvp_norm,
  )
  estimators.check_options(num_tangents, tangents, aggregation, max_jvp_norm)
  return _estimator_transform(
    lambda fn: estimators.value_and_forward_grad(fn, **options), key, "forward_gradient"
  )


def exact_gradient(*, key: jax.Array | None = None) -> optax.GradientTransformationExtraArgs:
  """Backprop (``jax.value_and_grad``) with the call shape and state of :func:`forward_gradient`.

  Args:
    key: unused by the estimate; kept so both transforms have the same state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` computing the true gradient of
    ``value_fn``.
  """
  key = jax.random.PRNGKey(0) if key is None else key
  return _estimator_transform(estimators.value_and_exact_grad, key, "exact_gradient")


TRANSFORMS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
  "forward": forward_gradient,
  "backprop": exact_gradient,
}


def gradient_transform(
  name: str, *, key: jax.Array, **options: Any
) -> optax.GradientTransformationExtraArgs:
  """Builds the gradient transform called ``name`` (``"forward"`` or ``"backprop"``).

  Args:
    name: ``"forward"`` or ``"backprop"``.
    key: PRNG key for the tangents.
    **options: options of :func:`forward_gradient` (none for ``"backprop"``).

  Returns:
    The transform; switching the name switches backprop and forward gradients.
  """
  if name not in TRANSFORMS:
    raise ValueError(f"estimator={name!r} is not known; use one of {sorted(TRANSFORMS)}.")
  if name == "backprop":
    if options:
      raise ValueError(f"the backprop estimator takes no options, got {sorted(options)}.")
    return exact_gradient(key=key)
  return forward_gradient(key=key, **options)
