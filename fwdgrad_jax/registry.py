"""The one registry of gradient-estimator names, over both forms of each estimator.

``ESTIMATORS[name]`` holds an estimator's function transform (``value_and_grad(fun,
**options)``, as :func:`fwdgrad_jax.value_and_forward_grad`) and its optax transform (as
:func:`fwdgrad_jax.forward_gradient`), and the names of the options an app's config sets
(``config_options``; the forward estimator's come from the one option list,
:data:`fwdgrad_jax.estimators.FORWARD_OPTIONS`). It sits above the modules it names:
:mod:`fwdgrad_jax.estimators`, :mod:`fwdgrad_jax.transforms` and
:mod:`fwdgrad_jax.guided` do not import it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from fwdgrad_jax import estimators, guided, transforms


class Estimator(NamedTuple):
  """One gradient estimator under one name, in both of its forms.

  Attributes:
    value_and_grad: the function transform, ``value_and_grad(fun, **options)`` →
      ``f(key, params, *args) -> (value, grad)``; None for a stateful estimator.
    transform: the optax factory, ``transform(*, key, has_aux, **options)``.
    uses_key: whether the estimate is random (the transform takes a ``key``).
    config_options: the options a config sets, by name (the fields of the app's
      ``EstimatorConfig`` that ``train.estimator_options`` passes on).
  """

  value_and_grad: Callable[..., estimators.ValueAndGradFn] | None
  transform: Callable[..., optax.GradientTransformationExtraArgs]
  uses_key: bool = True
  config_options: tuple[str, ...] = ()


def _transform_options(transform: Callable[..., Any]) -> tuple[str, ...]:
  """The options of an optax factory: its arguments but the key and ``has_aux``."""
  names = inspect.signature(transform).parameters
  return tuple(n for n in names if n not in ("key", "has_aux"))


#: The one registry of estimator names (the app's ``estimator.name`` chooses from it).
ESTIMATORS: dict[str, Estimator] = {
  "forward": Estimator(
    estimators.value_and_forward_grad,
    transforms.forward_gradient,
    config_options=tuple(
      n for n in estimators.FORWARD_OPTIONS if n not in estimators.RUNTIME_OPTIONS
    ),
  ),
  "backprop": Estimator(estimators.value_and_exact_grad, transforms.exact_gradient, uses_key=False),
  "guided": Estimator(
    None,
    guided.guided_forward_gradient,
    config_options=_transform_options(guided.guided_forward_gradient),
  ),
}


def get(name: str) -> Estimator:
  """The :class:`Estimator` registered as ``name``.

  Args:
    name: a key of :data:`ESTIMATORS`.

  Returns:
    Its entry.

  Raises:
    ValueError: unknown name, listing the known ones.
  """
  if name not in ESTIMATORS:
    raise ValueError(f"estimator={name!r} is not known; use one of {sorted(ESTIMATORS)}.")
  return ESTIMATORS[name]


def get_estimator(name: str) -> Callable[..., estimators.ValueAndGradFn]:
  """The function transform registered as ``name`` in :data:`ESTIMATORS`.

  ``"forward"`` gives :func:`fwdgrad_jax.value_and_forward_grad`, ``"backprop"``
  :func:`fwdgrad_jax.value_and_exact_grad`.

  Args:
    name: a key of :data:`ESTIMATORS`.

  Returns:
    ``value_and_grad(fun, **options)`` → ``f(key, params, *args, **kwargs)``.

  Raises:
    ValueError: unknown name, or a stateful estimator (no function-transform form).
  """
  fn = get(name).value_and_grad
  if fn is None:
    raise ValueError(
      f"estimator={name!r} is stateful and has no function-transform form; use its optax "
      f"transform, fwdgrad_jax.gradient_transform({name!r}, ...)."
    )
  return fn


def gradient_transform(
  name: str, *, key: jax.Array, has_aux: bool = False, **options: Any
) -> optax.GradientTransformationExtraArgs:
  """Builds the gradient transform registered as ``name`` (``"forward"``, ``"backprop"``…).

  Args:
    name: a key of :data:`ESTIMATORS`.
    key: PRNG key for the tangents (unused by deterministic estimators).
    has_aux: ``value_fn`` returns ``(loss, aux)``, see
      :func:`fwdgrad_jax.forward_gradient`.
    **options: the estimator's options (none for ``"backprop"``).

  Returns:
    The transform; switching the name switches backprop and forward gradients.

  Raises:
    ValueError: unknown name, or options given to an estimator that takes none.
  """
  est = get(name)
  if not est.uses_key:
    if options:
      raise ValueError(f"the {name} estimator takes no options, got {sorted(options)}.")
    return est.transform(has_aux=has_aux)
  return est.transform(key=key, has_aux=has_aux, **options)
