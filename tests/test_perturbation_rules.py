"""The interpreter's structure: rule tables keyed by primitives, the site primitive, public RNG."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive

import fwdgrad_jax as fg
from fwdgrad_jax import perturbation, tangents


def test_rule_tables_are_keyed_by_primitive_objects():
  for table in (perturbation.VIEW_RULES, perturbation.FACTORED_RULES):
    assert table and all(isinstance(p, Primitive) for p in table)
  assert jax.lax.dot_general_p in perturbation.FACTORED_RULES
  assert jax.lax.conv_general_dilated_p in perturbation.LINEAR_PRIMITIVES
  assert perturbation.site_p in perturbation.VIEW_RULES


def test_site_is_one_primitive_equation_and_an_identity_under_transformations():
  f = lambda x: jnp.sum(jnp.sin(fg.site(x * 2.0)) ** 2)
  g = lambda x: jnp.sum(jnp.sin(x * 2.0) ** 2)
  x = jnp.arange(3.0)
  eqns = jax.make_jaxpr(f)(x).jaxpr.eqns
  assert [e.primitive for e in eqns].count(perturbation.site_p) == 1
  np.testing.assert_array_equal(jax.jit(f)(x), g(x))
  np.testing.assert_array_equal(jax.grad(f)(x), jax.grad(g)(x))
  np.testing.assert_array_equal(
    jax.vmap(jax.grad(f))(jnp.stack([x, x])), jax.vmap(jax.grad(g))(jnp.stack([x, x]))
  )
  np.testing.assert_array_equal(jax.jvp(f, (x,), (x,))[1], jax.jvp(g, (x,), (x,))[1])
  np.testing.assert_array_equal(jax.grad(jax.checkpoint(f))(x), jax.grad(g)(x))
  closed = jax.make_jaxpr(jax.jit(f))(x)
  prog = perturbation.flatten(closed)
  assert [op.prim for op in prog.ops].count(perturbation.site_p) == 1


def test_hash_rng_is_public_and_is_what_the_samplers_draw():
  key, params = jax.random.key(3), {"w": jnp.zeros((4, 5)), "b": jnp.zeros(5)}
  seeds = tangents.leaf_seeds(key, params)
  for i, sampler, draw in [
    (0, tangents.normal, tangents.hash_normal),
    (1, tangents.rademacher, tangents.hash_rademacher),
  ]:
    leaf = jax.tree.leaves(params)[i]
    want = jax.tree.leaves(sampler(key, params, 3))[i]
    np.testing.assert_array_equal(draw(seeds[i], (3, *leaf.shape), leaf.dtype), want)
  bits = tangents.hash_bits(seeds[0], 8)
  assert bits.dtype == jnp.uint32 and bits.shape == (8,)
  np.testing.assert_array_equal(tangents.fmix32(jnp.uint32(0)), 0)


def test_the_aggregation_does_not_import_the_interpreter():
  src = pathlib.Path(fg.aggregation.__file__).read_text()
  imported = [n.module or "" for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)] + [
    a.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names
  ]
  assert not any("perturbation" in m for m in imported)
  assert perturbation.Rank1 is tangents.Rank1 and perturbation.is_rank1 is tangents.is_rank1
