"""The model registry and the pure-function boundary used by the gradient estimators.

See :mod:`fwdgrad_jax.models` for the picture (graphdef / params / rest).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

Shape = tuple[int, int, int]  # (H, W, C), no batch axis
_M = TypeVar("_M", bound=type)

# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------

#: Name -> model class. Every class is built as ``cls(input_shape=..., num_classes=...,
#: rngs=..., **options)``.
MODELS: dict[str, type[nnx.Module]] = {}

# The constructor arguments every model receives from ``create``; anything else is a
# model-specific option and is validated against the class signature.
_COMMON_ARGS = ("input_shape", "num_classes", "rngs")


def register(name: str) -> Callable[[_M], _M]:
  """Class decorator adding a model class to :data:`MODELS` under ``name``."""

  def deco(cls: _M) -> _M:
    if name in MODELS and MODELS[name] is not cls:
      raise ValueError(f"model name {name!r} is already registered to {MODELS[name].__qualname__}")
    sig = inspect.signature(cls.__init__)
    missing = [a for a in _COMMON_ARGS if a not in sig.parameters]
    if missing:
      raise TypeError(
        f"{cls.__qualname__}.__init__ must accept {', '.join(_COMMON_ARGS)}; "
        f"missing: {', '.join(missing)}"
      )
    MODELS[name] = cls
    return cls

  return deco


def _options_of(cls: type) -> dict[str, inspect.Parameter]:
  params = inspect.signature(cls.__init__).parameters
  return {
    k: p
    for k, p in params.items()
    if k != "self"
    and k not in _COMMON_ARGS
    and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
  }


def create(
  name: str,
  *,
  input_shape: Sequence[int],
  num_classes: int,
  rngs: nnx.Rngs,
  **kwargs: Any,
) -> nnx.Module:
  """Build the model registered as ``name``.

  Args:
    name: key of :data:`MODELS`.
    input_shape: ``(H, W, C)`` of one image, without the batch axis.
    num_classes: number of logits.
    rngs: ``nnx.Rngs`` used for initialisation (and, for Dropout models, a ``dropout``
      stream).
    **kwargs: model-specific options (see each class's constructor).

  Raises:
    ValueError: unknown ``name`` (the message lists the known names) or a malformed
      ``input_shape``.
    TypeError: an option the model does not accept (the message names it and lists the
      accepted ones).
  """
  try:
    cls = MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
  shape = tuple(int(d) for d in input_shape)
  if len(shape) != 3 or min(shape) <= 0:
    raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got {input_shape!r}")
  accepted = _options_of(cls)
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise TypeError(
      f"model {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
      f"accepted options: {', '.join(accepted) or '(none)'}"
    )
  return cls(input_shape=shape, num_classes=int(num_classes), rngs=rngs, **kwargs)


# ---------------------------------------------------------------------------------------
# Pure-function boundary
# ---------------------------------------------------------------------------------------


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """``(graphdef, params, rest)``: only ``nnx.Param`` goes into ``params``.

  Note that flax 0.12 ``nnx.split`` hands out the model's own ``Variable`` objects, so
  ``params``/``rest`` alias the module until a JAX transform or ``jax.tree.map`` rebuilds
  them; treat them as immutable.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def apply_fn(
  graphdef: nnx.GraphDef, rest: nnx.State
) -> Callable[[nnx.State, jax.Array], jax.Array]:
  """Pure ``f(params, x) -> logits`` for models without state updates.

  ``rest`` is closed over. Any state the forward pass would write (BatchNorm running
  statistics, Dropout RNG counter) is computed on a private copy and dropped -- use
  :func:`apply_with_state_fn` for models that need those updates.
  """

  def f(params: nnx.State, x: jax.Array) -> jax.Array:
    # copy=True: a closed-over `rest` lives at the outer trace level, and a model
    # merged from it in place would either raise TraceContextError on write or leak
    # the jvp/jit tracer into the caller's state.
    model = nnx.merge(graphdef, params, rest, copy=True)
    return model(x)

  return f


def apply_with_state_fn(
  graphdef: nnx.GraphDef,
) -> Callable[[nnx.State, nnx.State, jax.Array], tuple[jax.Array, nnx.State]]:
  """Pure ``f(params, rest, x) -> (logits, new_rest)`` for models with mutable state.

  Fit for ``jax.jvp(lambda p: f(p, rest, x), (params,), (tangent,), has_aux=True)``:
  the tangent touches ``params`` only and the updated BatchNorm statistics / RNG counters
  come back as (primal-only) aux, so nothing is mutated behind JAX's back and no tracer
  escapes. ``new_rest`` has the same tree structure as ``rest``.
  """

  def f(params: nnx.State, rest: nnx.State, x: jax.Array) -> tuple[jax.Array, nnx.State]:
    # copy=True so the caller's Variables are never written to; the writes happen on
    # fresh Variables that are read back out below.
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(x)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return logits, new_rest

  return f


def eval_graphdef(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State) -> nnx.GraphDef:
  """The graphdef of the same model in eval mode (``Module.eval()``).

  BatchNorm then normalises with its running averages and Dropout is off. The mode is
  a static attribute, so it lives in the graphdef; ``params`` and ``rest`` keep their
  structure and are shared by both modes.
  """
  model = nnx.merge(graphdef, params, rest, copy=True)
  model.eval()
  return nnx.split(model, nnx.Param, ...)[0]


def count_params(params: Any) -> int:
  """Total number of scalars in a pytree (e.g. the ``params`` from :func:`split`)."""
  # Shapes only: abstract models (nnx.eval_shape) are counted without allocating.
  return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(params)))
