"""The orthogonal aggregation costs what its FLOPs say (issue 24, item 2), without timing.

Flügel's projection ĝ = V (VᵀV)⁺ Vᵀ∇f adds to the mean of k tangents a k×k Gram matrix, a
k×k solve and nothing else: the same one combination Σ_i c_i v_i. It used to cost 20–60×
the mean on XLA:CPU (Baydin's MLP, batch 64: 1.8 s vs 89 ms at k = 4), for two reasons
these tests pin down in the program rather than with a clock:

* the combination was a reduction over the tangent axis, which XLA:CPU (jax 0.10) runs
  100–1000× below memory speed when that axis is the major one in memory, as it was for
  the orthogonal aggregation's tangents (``aggregation._weighted_sum``);
* the tangents were drawn in the plain layout, so the vmapped jvp first copied them into
  the order its one GEMM per layer reads (``tangents.draw``'s ``jvp_layout``).

And the values are the same: the projection of the drawn tangents, computed in numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad_jax as fg
from fwdgrad_jax import aggregation, tangents

SIZES = (784, 256, 256, 10)  # Baydin's MLP, narrower: the 784×256 layer dominates V
BATCH = 64


def _mlp(sizes=SIZES):
  key = jax.random.PRNGKey(0)
  params = []
  for a, b in zip(sizes[:-1], sizes[1:]):
    key, s = jax.random.split(key)
    params.append({"w": jax.random.normal(s, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)})
  x = jax.random.normal(key, (BATCH, sizes[0]))
  y = jnp.arange(BATCH) % sizes[-1]

  def loss(p, x, y):
    h = x
    for i, layer in enumerate(p):
      h = h @ layer["w"] + layer["b"]
      if i < len(p) - 1:
        h = jax.nn.relu(h)
    return -jnp.mean(jax.nn.log_softmax(h)[jnp.arange(BATCH), y])

  return loss, params, x, y


def _estimator(k, agg):
  loss, params, x, y = _mlp()
  f = jax.jit(fg.value_and_forward_grad(loss, num_tangents=k, aggregation=agg))
  return f, (jax.random.PRNGKey(1), params, x, y)


def _reductions(jaxpr, min_size):
  """(primitive, operand shape) of every reduce_* of an operand of ≥ min_size elements."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name.startswith("reduce_") and eqn.invars[0].aval.size >= min_size:
      found.append((eqn.primitive.name, eqn.invars[0].aval.shape))
    for value in eqn.params.values():
      for sub in value if isinstance(value, list | tuple) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _reductions(inner, min_size)
  return found


@pytest.mark.parametrize("k", [4, 16])
@pytest.mark.parametrize("agg", ["mean", "orthogonal"])
def test_no_reduction_over_a_layers_tangent_batch(agg, k):
  # The (k, 784, 256) tangents of the first layer are combined elementwise, never by a
  # reduction over the tangent axis (the XLA:CPU slow path, see the module docstring).
  f, args = _estimator(k, agg)
  jaxpr = jax.make_jaxpr(f)(*args).jaxpr
  largest = max(p.size for p in jax.tree.leaves(args[1]))
  assert _reductions(jaxpr, k * largest) == []


@pytest.mark.parametrize("k", [4, 16])
def test_orthogonal_costs_at_most_one_more_read_of_the_tangents_than_mean(k):
  # XLA's cost analysis of the compiled steps. FLOPs: the Gram matrix adds 2k²n to the
  # jvp's ~4·batch·k·n (≤ 1.13× at k = 16). Memory: the mean's step writes V once (the
  # draw) and reads it twice (the jvp, the combination); the Gram matrix reads it once
  # more, ≤ 4/3 of V's traffic. A transposing copy of V for the jvp (the former plain
  # layout) took the ratio to 1.67 (k = 4) and 1.78 (k = 16).
  cost = {}
  for agg in ("mean", "orthogonal"):
    f, args = _estimator(k, agg)
    analysis = f.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
      analysis = analysis[0]
    cost[agg] = analysis
  assert cost["orthogonal"]["flops"] <= 1.3 * cost["mean"]["flops"]
  assert cost["orthogonal"]["bytes accessed"] <= 1.4 * cost["mean"]["bytes accessed"]


def test_orthogonal_of_drawn_tangents_is_the_numpy_projection():
  # The estimator's tangents are tangents.sample's values (tangents.draw only lays them out
  # differently); the projection of ∇f onto them, in float64.
  loss, params, x, y = _mlp((30, 40, 20, 10))
  k, key = 6, jax.random.PRNGKey(2)
  _, g = jax.jit(fg.value_and_forward_grad(loss, num_tangents=k, aggregation="orthogonal"))(
    key, params, x, y
  )
  v = jax.jit(lambda key: tangents.sample(key, params, k, "normal"))(key)
  vf = np.concatenate([np.asarray(t, np.float64).reshape(k, -1) for t in jax.tree.leaves(v)], 1)
  true = np.concatenate(
    [np.ravel(t) for t in jax.tree.leaves(jax.jit(jax.grad(loss))(params, x, y))]
  )
  want = vf.T @ np.linalg.solve(vf @ vf.T, vf @ true)
  got = np.concatenate([np.ravel(t) for t in jax.tree.leaves(g)])
  np.testing.assert_allclose(got, want, atol=1e-4 * np.linalg.norm(want))


@pytest.mark.parametrize("k", [3, 64, 130])
def test_combine_and_gram_match_numpy_in_both_layouts(k):
  # k = 130: two blocks of 64 in a loop plus 2 unrolled; a (rows, k, cols) array moved to
  # (k, rows, cols) is the tangent-axis-second layout of tangents.draw.
  rng = np.random.default_rng(k)
  v = rng.normal(size=(k, 5, 7)).astype(np.float32)
  c = rng.normal(size=k).astype(np.float32)
  want_sum = np.einsum("k,kab->ab", c.astype(np.float64), v)
  want_gram = np.einsum("kab,lab->kl", v.astype(np.float64), v)
  plain = jnp.asarray(v)
  second = jnp.moveaxis(jnp.asarray(np.moveaxis(v, 0, 1)), 1, 0)
  for batch in (plain, second):
    combined = jax.jit(aggregation.combine)([batch], jnp.asarray(c))[0]
    np.testing.assert_allclose(combined, want_sum, rtol=1e-5, atol=1e-4)
    gram = jax.jit(aggregation.gram)([batch])
    np.testing.assert_allclose(gram, want_gram, atol=1e-5 * np.abs(want_gram).max())


@pytest.mark.parametrize("shape", [(1000, 1000), (1000,), (3, 3, 16, 32), (1,), ()])
def test_gram_keeps_float32_round_off_on_large_leaves(shape):
  # Up to k = 8 the Gram matrix is one pass of products summed per row and then over rows;
  # a single running float32 sum over 10⁶ products is off by ~4e-4 relative (measured),
  # the dot's round-off is ~1e-6.
  k = 8
  v = np.random.default_rng(0).normal(size=(k, *shape)).astype(np.float32)
  want = np.einsum("kn,ln->kl", v.reshape(k, -1).astype(np.float64), v.reshape(k, -1))
  got = np.asarray(jax.jit(aggregation.gram)({"w": jnp.asarray(v)}))
  np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max())
  np.testing.assert_array_equal(got, got.T)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_a_few_tangents_gram_reads_them_in_one_pass_not_a_dot(k):
  # XLA:CPU runs the tall-skinny (k×n)·(n×k) dot at a few GFLOP/s: at k = 4 it was 4 ms of
  # the MLP step's 12 ms extra over mean (orthogonal 1.29-1.44× mean on a quiet 2-core
  # CPU); one reduction over the k(k+1)/2 products made it ≤ 1.2×.
  f, args = _estimator(k, "orthogonal")
  jaxpr = jax.make_jaxpr(f)(*args).jaxpr
  largest = max(p.size for p in jax.tree.leaves(args[1]))

  def dots(jaxpr):
    found = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general" and all(
        v.aval.size >= k * largest for v in eqn.invars
      ):
        found.append(tuple(v.aval.shape for v in eqn.invars))
      for value in eqn.params.values():
        for sub in value if isinstance(value, list | tuple) else [value]:
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            found += dots(inner)
    return found

  assert dots(jaxpr) == []
