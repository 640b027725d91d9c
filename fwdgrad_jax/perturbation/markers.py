"""The site marker: an identity primitive that the activity pass finds by object identity.

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

site_p = Primitive("fwdgrad_site")
site_p.def_impl(lambda x: x)
site_p.def_abstract_eval(lambda aval: aval)
mlir.register_lowering(site_p, lambda ctx, x: [x])


def _site_jvp(primals, tangents):
  return site_p.bind(primals[0]), tangents[0]


def _site_batch(args, dims):
  return site_p.bind(args[0]), dims[0]


ad.primitive_jvps[site_p] = _site_jvp
batching.primitive_batchers[site_p] = _site_batch


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
