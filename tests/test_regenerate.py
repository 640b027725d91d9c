"""Seed-regenerated tangents (``regenerate=True``, issue #12 item 2).

The option must give the estimate of the stored tangents (same draws, only where they
are computed changes) and must actually save the memory: a compiled step holds one
layer's tangents at a time instead of all of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fwdgrad_jax as fg
from fwdgrad_jax import tangents


def _loss(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  h = jnp.tanh(h @ p["w2"])
  # "unused" is consumed by nothing: its tangents still enter the estimate (and Gram).
  return jnp.mean(h**2) + 0.1 * jnp.sum(p["scale"] ** 2), jnp.max(h)


def _params(key):
  k = jax.random.split(key, 4)
  return {
    "w1": jax.random.normal(k[0], (12, 9)) / 3,
    "b1": jax.random.normal(k[1], (9,)),
    "w2": jax.random.normal(k[2], (9, 5)) / 3,
    "scale": jax.random.normal(k[3], (3,)),
    "unused": jnp.ones((2, 2)),
  }


# Every aggregation for k = 3 normal tangents. The aggregations share the regenerated draws
# and differ only in their coefficients (aggregation.coefficients, the stored path's own);
# orthogonal also redraws the tangents for the Gram matrix, so it covers every draw of a
# sampler: Rademacher needs no other. At k = 1 (jvp without vmap) sum and mean are one
# estimate.
@pytest.mark.parametrize(
  "scheme,k,aggregation",
  [
    ("normal", 3, "sum"),
    ("normal", 3, "mean"),
    ("normal", 3, "orthogonal"),
    ("normal", 1, "mean"),
    ("normal", 1, "orthogonal"),
    ("rademacher", 3, "orthogonal"),
  ],
)
def test_regenerated_tangents_give_the_stored_tangents_estimate(scheme, k, aggregation):
  params = _params(jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (7, 12))
  key = jax.random.PRNGKey(2)
  opts = dict(num_tangents=k, tangents=scheme, aggregation=aggregation, has_aux=True)
  stored = fg.value_and_forward_grad(_loss, **opts)
  est = fg.value_and_forward_grad(_loss, regenerate=True, **opts)
  # One compiled program for both.
  ((v0, aux0), g0), ((v1, aux1), g1) = jax.jit(
    lambda key, params, x: (stored(key, params, x), est(key, params, x))
  )(key, params, x)
  assert v1 == pytest.approx(float(v0), rel=1e-6) and aux1 == pytest.approx(float(aux0), rel=1e-6)
  for name in params:
    # Same draws; only float rounding (the order of the sums) differs.
    np.testing.assert_allclose(
      g1[name], g0[name], rtol=2e-5, atol=2e-6 * float(jnp.abs(g0[name]).max())
    )
  assert float(jnp.abs(g1["unused"]).max()) > 0  # its tangents are part of the estimate


def test_regenerated_estimate_under_vmap_over_keys():
  # lr_search vmaps whole training runs: the tied draws must batch.
  params = _params(jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (7, 12))
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  f = lambda p, x: _loss(p, x)[0]  # noqa: E731
  stored = fg.forward_grad(f, num_tangents=2)
  regenerated = fg.forward_grad(f, num_tangents=2, regenerate=True)
  g0, g1 = jax.jit(jax.vmap(lambda k: (stored(k, params, x), regenerated(k, params, x))))(keys)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)


def test_after_keeps_the_seed():
  seed = jnp.array([3, 0xFFFFFFFF], jnp.uint32)
  deps = (jnp.zeros((2, 3)), jnp.array([-0.0]), jnp.array([jnp.nan]), jnp.zeros((0,)))
  np.testing.assert_array_equal(jax.jit(tangents.after)(seed, *deps), seed)


@pytest.mark.parametrize(
  "options,problem",
  [
    ({"tangents": "partition"}, "tangents='partition'"),
    ({"tangents": "rank1"}, "tangents='rank1'"),
    ({"normalize": True}, "normalize=True"),
    ({"perturbation": "activity"}, "perturbation='activity'"),
    ({"aggregation": lambda v, d: v}, "aggregation="),
  ],
)
def test_regenerate_rejects_what_it_cannot_regenerate(options, problem):
  with pytest.raises(ValueError, match="regenerate=True") as err:
    fg.value_and_forward_grad(lambda p: jnp.sum(p), regenerate=True, **options)
  assert problem in str(err.value)


def _deep(depth, width, key):
  return [jax.random.normal(k, (width, width)) / width**0.5 for k in jax.random.split(key, depth)]


def _deep_loss(p, x):
  for w in p:
    x = jax.nn.relu(x @ w)
  return jnp.mean(x**2)


def _step_temp_bytes(k: int, regenerate: bool, depth=8, width=256) -> int:
  params = _deep(depth, width, jax.random.PRNGKey(0))
  x = jnp.ones((16, width))
  tx = optax.chain(
    fg.forward_gradient(k, key=jax.random.PRNGKey(1), regenerate=regenerate), optax.sgd(1e-3)
  )

  def step(params, opt_state, x):
    updates, opt_state = tx.update(params, opt_state, params, value_fn=_deep_loss, x=x)
    return optax.apply_updates(params, updates), opt_state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), x).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip("no compiled memory analysis on this backend")
  return stats.temp_size_in_bytes


@pytest.mark.parametrize("k", [1, 4])
def test_a_regenerated_step_holds_a_few_layers_of_tangents_not_all(k):
  # 8 layers of 256×256: one layer's k tangents are k·256 KiB, all of them 8× that.
  layer = k * 256 * 256 * 4
  stored = _step_temp_bytes(k, regenerate=False)
  regen = _step_temp_bytes(k, regenerate=True)
  assert stored >= 8 * layer  # the stored path holds every layer's tangents (V)
  assert regen <= 3 * layer, f"{regen / layer:.1f} layers of tangents alive at once"


@pytest.mark.parametrize("scheme", ["normal", "rademacher"])
def test_a_share_of_the_tangents_is_those_rows_of_the_whole_draw(scheme):
  # Tangent parallelism: a device draws tangents start … start + k − 1 of the k in all.
  leaf = jnp.zeros((3, 5))

  @jax.jit  # one compiled program (eagerly every op of the draws compiles on its own)
  def draws(start):
    seed = tangents.leaf_seeds(jax.random.PRNGKey(4), [leaf])[0]
    whole = tangents.regenerate_leaf(seed, leaf, 6, scheme)
    # The share's start is traced: it must not be baked into the draw.
    share = tangents.regenerate_leaf(seed, leaf, 2, scheme, start=start)
    one = tangents.regenerate_leaf(seed, leaf, 2, scheme, index=1, start=3)
    return whole, share, one

  whole, share, one = draws(3)
  # The same hash bits; the normal's float polynomial may round differently in another fusion.
  np.testing.assert_allclose(share, whole[3:5], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(one, whole[4], rtol=1e-6, atol=1e-6)
  assert not np.allclose(share, whole[1:3])  # another start, other tangents
