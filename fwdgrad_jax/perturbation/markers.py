"""The markers: identity primitives that the interpreter finds by object identity.

:func:`site` (``site_p``) marks a block's output; :func:`local_loss` (``local_loss_p``)
marks a local loss, whose directional derivative is then credited only to the sites (and
weights) that reach it.

A primitive of its own (rather than a ``custom_jvp`` function recognised by its name in
the jaxpr's debug info) makes a site an equation ``site_p`` in any jaxpr, whatever the
jax version prints as names; every transformation sees an identity: its impl and
lowering return the input, its jvp passes the tangent through unmarked (so nothing
linear ever holds a site and no transpose rule is needed), and under ``vmap`` it maps
the batched value.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

PyTree = Any


def _identity_primitive(name: str) -> Primitive:
  """A marker: the identity under every transformation, its jvp and batching included."""
  p = Primitive(name)
  p.def_impl(lambda x: x)
  p.def_abstract_eval(lambda aval: aval)
  mlir.register_lowering(p, lambda ctx, x: [x])
  ad.primitive_jvps[p] = lambda primals, tangents: (p.bind(primals[0]), tangents[0])
  batching.primitive_batchers[p] = lambda args, dims: (p.bind(args[0]), dims[0])
  return p


site_p = _identity_primitive("fwdgrad_site")
local_loss_p = _identity_primitive("fwdgrad_local_loss")


def fwdgrad_site(x: jax.Array) -> jax.Array:
  """One array marked as a site (see :func:`site`)."""
  return site_p.bind(x)


def site(x: PyTree) -> PyTree:
  """Marks ``x`` (an array or a pytree of arrays) as a block output for activity perturbation.

  The identity everywhere (under ``jit``, ``grad``, ``vmap``, in any estimator); only
  ``value_and_forward_grad(..., perturbation="activity")`` reads it: when a function
  has marked sites, the activity tangents enter at those sites instead of at every
  parameter-consuming op, and the parameters between two sites get their estimate by a
  local VJP of that block.

  Args:
    x: the block's output (a layer, a residual stage, an encoder layer).

  Returns:
    ``x`` unchanged.
  """
  return jax.tree.map(fwdgrad_site, x)


def local_loss(x: jax.Array) -> jax.Array:
  """Marks ``x`` as a local loss: per-example losses of shape (batch,), or a scalar.

  The identity everywhere (under ``jit``, ``grad``, ``vmap``, ``jvp``, in any estimator),
  so ``fun`` still returns the total (the sum of its marked losses, per example), and
  ``jax.grad`` of the same function is the backprop baseline (with ``stop_gradient``
  between blocks: Ren et al.'s LG-BP). A forward-gradient estimator reads the markers:
  each perturbed activity (``perturbation="activity"``) or weight leaf is credited only
  with the directional derivatives of the marked losses it reaches in the program, per
  example — from the same single jvp pass, the primal once, whatever the number of
  losses. With ``stop_gradient`` between blocks that is Ren et al.'s LG-FG-A (activity)
  and LG-FG-W (weights).

  The estimate stays unbiased for the gradient of the total: a loss that an activity
  does not reach has zero derivative with respect to it, and its directional derivative
  is independent of that activity's zero-mean tangent. The crediting subtracts the
  unreached losses' directional derivatives from the total's, which removes exactly
  their noise when the total is their sum (per example; a scalar marked loss counts for
  every example of a per-example total). A scalar total takes scalar marked losses (mark
  ``jnp.mean(losses)``, not the per-example ``losses``): weight tangents need one.
  ``jvp_hook`` and ``max_jvp_norm`` apply to each credited d. Unmarked functions are
  estimated exactly as before.

  **Sliced losses** (activity perturbation): a loss of shape (batch, *L) — e.g. Ren et
  al.'s loss per patch and channel group, (batch, patches, groups) — counts in a
  per-example total as its sum over L. A :func:`site` of shape (batch, *L, *F) whose
  reached losses all have that shape is credited *per slice*: its elements [b, l, :]
  with the directional derivative of the losses' elements [b, l] only, and aggregated
  per slice (a d in prod(F) dimensions instead of the whole activity's). That assumes
  what Ren et al.'s heads are built for: element [b, l] of a loss depends on slice
  [b, l] of the site only (a head per patch and group). If a loss mixes slices after
  the site (e.g. token mixing before the head), the estimate is biased: mark the
  per-example sum instead. A site of another shape falls back to the per-example sum.

  Args:
    x: a loss, shape (batch,), (batch, *slices) or ().

  Returns:
    ``x`` unchanged.

  References:
    Ren et al., 2023. Scaling Forward Gradient With Local Losses. ICLR 2023.
    arXiv:2210.03310.
  """
  return local_loss_p.bind(x)
