"""Crediting of local losses: which marked losses a perturbed value reaches, and its d.

A :func:`~fwdgrad_jax.perturbation.markers.local_loss` marker names a loss ℓ in the
program. A perturbed value s (an activity site, or a weight leaf) reaches ℓ if ℓ depends
on s along a differentiable path (a ``stop_gradient`` cuts it). The directional
derivatives d_ℓ of the marked losses come from the same jvp pass as the total's d; the
value s is credited with

  d⁽ˢ⁾ = d − Σ_{ℓ not reached by s} d_ℓ,

which is Σ_{ℓ reached} d_ℓ when the total is the sum of the marked losses. It is
unbiased for any total: ℓ not reached by s has ∂ℓ/∂s = 0, so E[v_s d_ℓ] = 0 for s's
zero-mean tangent v_s, independent of the other values' tangents.

References:
  Ren et al., 2023. Scaling Forward Gradient With Local Losses. ICLR 2023.
  arXiv:2210.03310.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import primitives as jex_primitives

from fwdgrad_jax.perturbation.markers import local_loss_p
from fwdgrad_jax.perturbation.program import Program

#: A use through this primitive has no derivative: it does not connect a value to a loss.
STOP_GRADIENT = jex_primitives.stop_gradient_p


def loss_ids(prog: Program) -> list[int]:
  """The ids of the marked local losses, in program order."""
  return [op.outs[0] for op in prog.ops if op.prim is local_loss_p]


def unreached(
  prog: Program, sources: Sequence[int], losses: Sequence[int]
) -> list[tuple[int, ...]]:
  """For each source id, the indices (into ``losses``) of the marked losses it does not reach.

  Forward reachability over the program's ops, a stop-gradient cutting the path; an op
  with several outputs (a ``scan``, a ``while``) connects each input to every output.
  """
  seed = {}
  for n, i in enumerate(sources):
    seed[i] = seed.get(i, 0) | (1 << n)
  reach = {i: seed.get(i, 0) for i in prog.ins}
  for op in prog.ops:
    m = 0
    if op.prim is not STOP_GRADIENT:
      for i in op.ins:
        m |= reach.get(i, 0)
    for o in op.outs:
      reach[o] = m | seed.get(o, 0)
  return [
    tuple(j for j, ell in enumerate(losses) if not reach.get(ell, 0) >> n & 1)
    for n in range(len(sources))
  ]


def _as_total(d_loss: jax.Array, d: jax.Array) -> jax.Array:
  """A marked loss's d (k, *its shape) in the layout of the total's d (k, *total shape).

  A loss sliced beyond the batch axis, (k, batch, *L), counts in a per-example total as
  its sum over the slices.
  """
  if d_loss.shape == d.shape:
    return d_loss
  if d_loss.ndim == 1:  # a scalar loss counts for every example of a per-example total
    return jnp.broadcast_to(d_loss.reshape(-1, *([1] * (d.ndim - 1))), d.shape)
  if d.ndim == 2 and d_loss.shape[:2] == d.shape:
    return jnp.sum(d_loss, axis=tuple(range(2, d_loss.ndim)))
  # Per-example losses of a scalar total: whether it sums or averages them is not known
  # here, and the wrong guess would add noise instead of removing it.
  raise ValueError(
    f"fwdgrad_jax.local_loss: a marked loss of shape {d_loss.shape[1:]} does not fit the "
    f"total of shape {d.shape[1:]}: mark scalars (e.g. local_loss(jnp.mean(losses))) for a "
    "scalar total, per-example losses (batch, ...) for a per-example total."
  )


def unmarked(d: jax.Array, loss_jvps: Sequence[Any]) -> jax.Array:
  """The directional derivatives of the total's part that no marked loss holds.

  Zero up to rounding when the total is the sum of its marked losses; otherwise the
  unmarked rest, which may depend on any value and is credited to every one.
  """
  every = tuple(range(len(loss_jvps)))
  return credited(d, loss_jvps, [every])[every]


def credited(
  d: jax.Array, loss_jvps: Sequence[Any], keys: Sequence[tuple[int, ...]]
) -> dict[tuple[int, ...], jax.Array]:
  """The credited d of every distinct key (the losses not reached): d − Σ_{j ∈ key} d_j.

  ``loss_jvps[j]`` is None where loss j carries no tangent (it depends on no perturbed
  value). The empty key is d itself.
  """
  out = {}
  for key in dict.fromkeys(keys):
    dk = d
    for j in key:
      if loss_jvps[j] is not None:
        dk = dk - _as_total(loss_jvps[j].astype(d.dtype), d)
    out[key] = dk
  return out
