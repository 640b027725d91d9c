"""Guided ("momentum") forward gradients: Yao's Algorithm 1 as an optax transformation.

Every ``fix_gap`` steps one true gradient (``jax.grad`` of ``value_fn``) fixes the order
of the parameters by gradient value. Each step then draws v₁ ~ N(0, I), shuffles that
order within segments of ``shuffle_ratio``·n positions, sorts v₁ into it (the largest
v₁ value goes to the parameter with the largest gradient, up to the shuffle), draws
v₂ ~ N(0, I) and uses v = γ v₁ + (1 − γ) v₂ with γ = decay_rate^(step mod fix_gap); every
``decrease_gap`` steps ``decay_rate`` ← ``decay_rate``². The estimate is (∇f·v) v from one
jvp.

It is **biased by design**: the sorted v₁ is aligned with the last true gradient's
ranking, trading unbiasedness for direction (Yao: "we do not try to reduce the
variance ... but generate random vectors in other ways"). Its state counts the true
gradients it evaluated (``true_grads``), so a comparison can charge for them.

Everything runs under ``jit``: the occasional true gradient is a ``lax.cond`` branch,
the shuffle is one sort of composite keys, and nothing syncs with the host. Each step
sorts n numbers twice (v₁, and the shuffled order), which is O(n log n): the price Yao
notes for this method.

References:
  Yao. Studies on Forward Mode Gradient Descent, §E and Algorithm 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fwdgrad_jax import estimators
from fwdgrad_jax import tangents as tangents_lib


class GuidedForwardGradientState(NamedTuple):
  """State of :func:`guided_forward_gradient`.

  Attributes:
    key: PRNG key of the next step.
    step: steps taken so far.
    order: (n,) parameter indices sorted by the last true gradient (ascending).
    decay_rate: the current decay rate (squared every ``decrease_gap`` steps).
    true_grads: how many true gradients were evaluated.
    value: the loss of the last step (NaN before the first).
    aux: ``value_fn``'s aux with ``has_aux`` (None before the first update).
  """

  key: jax.Array
  step: jax.Array
  order: jax.Array
  decay_rate: jax.Array
  true_grads: jax.Array
  value: jax.Array
  aux: Any = None


def _check(fix_gap, decay_rate, shuffle_ratio, decrease_gap) -> None:
  for name, v in (("fix_gap", fix_gap), ("decrease_gap", decrease_gap)):
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
      raise ValueError(f"guided_forward_gradient: {name} must be an integer >= 1, got {v!r}.")
  if not 0.0 < float(decay_rate) <= 1.0:
    raise ValueError(f"guided_forward_gradient: decay_rate must be in (0, 1], got {decay_rate!r}.")
  if not 0.0 <= float(shuffle_ratio) <= 1.0:
    raise ValueError(
      f"guided_forward_gradient: shuffle_ratio must be in [0, 1], got {shuffle_ratio!r}."
    )


def guided_tangent(key: jax.Array, order: jax.Array, gamma: jax.Array, segment: int) -> jax.Array:
  """Yao's v = γ·(v₁ sorted into the shuffled order) + (1 − γ)·v₂, flat, shape (n,).

  Args:
    key: PRNG key of this step.
    order: (n,) parameter indices in ascending order of the reference gradient.
    gamma: the weight of the sorted draw.
    segment: the shuffle's segment length in positions (≤ 1: no shuffle).

  Returns:
    The tangent as a flat float32 vector.
  """
  n = order.shape[0]
  k1, k2, k3 = jax.random.split(key, 3)
  v1 = jnp.sort(tangents_lib.normal(k1, jnp.zeros(n), 1)[0])
  v2 = tangents_lib.normal(k2, jnp.zeros(n), 1)[0]
  if segment > 1:
    # A uniform shuffle within each segment of the sorted order: sort by (segment, noise).
    noise = jax.random.uniform(k3, (n,))
    block = (jnp.arange(n) // segment).astype(jnp.float32)
    order = order[jnp.argsort(block * 2.0 + noise)]
  guided = jnp.zeros(n, v1.dtype).at[order].set(v1)
  return gamma * guided + (1.0 - gamma) * v2


def guided_forward_gradient(
  fix_gap: int,
  decay_rate: float,
  shuffle_ratio: float,
  decrease_gap: int,
  *,
  key: jax.Array,
  has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Yao's guided ("momentum") forward gradient as an optax gradient transformation.

  Put it first in an ``optax.chain``, like :func:`fwdgrad_jax.forward_gradient`: it
  ignores the incoming updates and returns (∇f·v) v for Yao's guided tangent v (see the
  module docstring). Biased by design.

  Args:
    fix_gap: every this many steps (the first included) one true gradient is computed
      and fixes the order of the parameters by gradient value.
    decay_rate: the initial γ base in (0, 1]; 1 keeps the sorted draw alone.
    shuffle_ratio: the shuffle's segment length as a fraction of n, in [0, 1]; 0 keeps
      the order exact, 1 shuffles it completely (the sorted draw then carries no
      information).
    decrease_gap: every this many steps ``decay_rate`` is squared.
    key: PRNG key.
    has_aux: ``value_fn`` returns ``(loss, aux)``; aux is kept in ``state.aux``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose
    ``update(updates, state, params, *, value_fn, **kwargs)`` returns the guided estimate;
    ``state.true_grads`` counts the true gradients evaluated.

  References:
    Yao. Studies on Forward Mode Gradient Descent, Algorithm 1.
  """
  _check(fix_gap, decay_rate, shuffle_ratio, decrease_gap)

  def init_fn(params):
    n = sum(int(np.prod(jnp.shape(p))) for p in jax.tree.leaves(params))
    return GuidedForwardGradientState(
      key=key,
      step=jnp.zeros((), jnp.int32),
      order=jnp.arange(n, dtype=jnp.int32),
      decay_rate=jnp.asarray(decay_rate, jnp.float32),
      true_grads=jnp.zeros((), jnp.int32),
      value=jnp.full((), jnp.nan, jnp.float32),
    )

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del updates
    if params is None or value_fn is None:
      raise ValueError(
        "guided_forward_gradient.update needs params and value_fn: "
        "tx.update(updates, state, params, value_fn=loss_fn, **loss_kwargs)."
      )
    flat, unravel = ravel_pytree(params)
    n = flat.shape[0]
    segment = int(round(float(shuffle_ratio) * n))

    def loss_of_flat(x):
      out = value_fn(unravel(x), **extra_args)
      return out[0] if has_aux else out

    def reorder(_):
      return jnp.argsort(ravel_pytree(jax.grad(loss_of_flat)(flat))[0]).astype(jnp.int32)

    refresh = state.step % fix_gap == 0
    order = jax.lax.cond(refresh, reorder, lambda _: state.order, None)
    decay = jnp.where(
      (state.step % decrease_gap == 0) & (state.step > 0), state.decay_rate**2, state.decay_rate
    )
    gamma = decay ** (state.step % fix_gap).astype(jnp.float32)
    next_key, step_key = jax.random.split(state.key)
    v = guided_tangent(step_key, order, gamma, segment)
    out = estimators.directional_derivatives(
      lambda p: value_fn(p, **extra_args),
      params,
      jax.tree.map(lambda t: t[None], unravel(v.astype(flat.dtype))),
      has_aux=has_aux,
    )
    value, d, aux = out
    grad = unravel((d[0] * v).astype(flat.dtype))
    new_state = GuidedForwardGradientState(
      key=next_key,
      step=state.step + 1,
      order=order,
      decay_rate=decay,
      true_grads=state.true_grads + refresh.astype(jnp.int32),
      value=jnp.asarray(value, jnp.float32),
      aux=aux,
    )
    return grad, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
