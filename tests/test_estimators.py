"""Tests of the forward-gradient estimators (fwdgrad_jax.estimators, .aggregation).

Statistical tests use fixed seeds and tolerances derived from the estimator's variance:
a mean of N i.i.d. samples is compared with its expectation at Z standard errors.
"""

import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad_jax as fg

# |z| beyond 5 has probability 5.7e-7 per coordinate under the null; with the ≤ 64
# coordinates tested at once the family-wise false-alarm rate stays below 4e-5.
Z = 5.0


def _linear_problem(seed=0):
  """f(p) = c·p over a multi-leaf pytree, so ∇f = c exactly, everywhere."""
  rng = np.random.default_rng(seed)
  c = {
    "w": rng.normal(size=(3, 4)).astype(np.float32),
    "b": rng.normal(size=(5,)).astype(np.float32),
  }
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros((5,))}

  def f(p):
    return jnp.sum(p["w"] * c["w"]) + jnp.sum(p["b"] * c["b"])

  return f, params, c


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _samples(f, params, num_samples, seed=0, **options):
  """num_samples independent estimates, flattened: (N, n)."""
  vg = fg.value_and_forward_grad(f, **options)
  keys = jax.random.split(jax.random.key(seed), num_samples)
  _, grads = jax.jit(jax.vmap(vg, in_axes=(0, None)))(keys, params)
  return np.concatenate(
    [np.asarray(x, np.float64).reshape(num_samples, -1) for x in jax.tree.leaves(grads)], axis=1
  )


def _max_z(samples, expected, variance):
  se = np.sqrt(variance / samples.shape[0])
  return np.max(np.abs(samples.mean(0) - expected) / se)


@pytest.mark.parametrize("tangents", ["normal", "rademacher"])
def test_single_tangent_estimate_is_unbiased(tangents):
  f, params, c = _linear_problem()
  c = _flat(c)
  n, num = c.size, 200_000
  g = _samples(f, params, num, tangents=tangents)
  # g_i = Σ_j c_j v_j v_i. Gaussian: Var g_i = ‖c‖² + c_i² (E v⁴ = 3);
  # Rademacher: v_i² = 1 so Var g_i = ‖c‖² − c_i².
  sign = 1.0 if tangents == "normal" else -1.0
  var = np.sum(c**2) + sign * c**2
  assert _max_z(g, c, var) < Z
  # The same statistic must flag a 5% bias: the test can fail.
  assert _max_z(1.05 * g, c, var) > Z
  assert g.shape == (num, n)


def test_partition_with_sum_is_unbiased_and_blocks_cover_once():
  f, params, c = _linear_problem(1)
  c = _flat(c)
  k, num = 4, 200_000
  g = _samples(f, params, num, tangents="partition", num_tangents=k, aggregation="sum")
  # Σ_i d_i v_i over disjoint blocks: g_j = v_j Σ_{l in block(j)} c_l v_l, so
  # Var g_j = Σ_{l in block(j)} c_l² + c_j² (from E v⁴ = 3), smaller than a full tangent's.
  n = c.size
  block = (np.arange(n) * k) // n
  var = np.array([np.sum(c[block == block[j]] ** 2) + c[j] ** 2 for j in range(n)])
  assert _max_z(g, c, var) < Z
  batch = jax.jit(lambda key: fg.tangents.sample(key, params, k, "partition"))(jax.random.key(3))
  nonzero = np.concatenate(
    [np.asarray(x).reshape(k, -1) != 0 for x in jax.tree.leaves(batch)], axis=1
  )
  assert (nonzero.sum(0) == 1).all()  # every coordinate in exactly one block


def test_one_gaussian_tangent_cosine_and_length_laws():
  """cos(g, ∇f) = |u₁| for u uniform on the sphere; ‖g‖/‖∇f‖ = |u₁|·‖v‖² (Flügel et al.)."""
  n, num = 1000, 4000
  rng = np.random.default_rng(0)
  c = jnp.asarray(rng.normal(size=n), jnp.float32)
  f = lambda p: jnp.dot(p, c)
  vg = fg.value_and_forward_grad(f)
  keys = jax.random.split(jax.random.key(7), num)

  @jax.jit  # one compiled program, the metrics too (eagerly every op compiles on its own)
  def laws(keys):
    _, g = jax.vmap(vg, in_axes=(0, None))(keys, jnp.zeros(n))
    cos = jax.vmap(fg.cosine_similarity, in_axes=(0, None))(g, c)
    return cos, jax.vmap(fg.norm_ratio, in_axes=(0, None))(g, c)

  cos, ratio = (np.asarray(v, np.float64) for v in laws(keys))
  assert (cos > 0).all()  # always within 90° of the gradient
  # E|u₁| = Γ(n/2) / (√π Γ((n+1)/2)) exactly; Var|u₁| = 1/n − (E|u₁|)².
  mean_cos = math.exp(math.lgamma(n / 2) - math.lgamma((n + 1) / 2)) / math.sqrt(math.pi)
  se = math.sqrt((1 / n - mean_cos**2) / num)
  assert abs(cos.mean() - mean_cos) < Z * se
  assert abs(mean_cos - math.sqrt(2 / (math.pi * n))) < 1e-3 * mean_cos  # the asymptotic law
  # |u₁| and ‖v‖ are independent, so E ratio = n·E|u₁| ≈ √(2n/π).
  assert abs(ratio.mean() - n * mean_cos) < Z * ratio.std() / math.sqrt(num)


def test_more_tangents_give_a_better_direction():
  n, num = 256, 400
  c = jnp.asarray(np.random.default_rng(1).normal(size=n), jnp.float32)
  f = lambda p: jnp.dot(p, c) + 0.5 * jnp.dot(p, p)  # ∇f = c at p = 0
  means, cosines = {}, {}
  for k in (1, 4, 16):
    keys = jax.random.split(jax.random.key(k), num)  # the same tangents for both aggregations
    for agg in ("mean", "orthogonal"):
      vg = fg.value_and_forward_grad(f, num_tangents=k, aggregation=agg)
      cos = jax.jit(jax.vmap(lambda key: fg.cosine_similarity(vg(key, jnp.zeros(n))[1], c)))(keys)
      cos = np.asarray(cos, np.float64)
      cosines[k, agg] = cos
      means[k, agg] = (cos.mean(), cos.std() / math.sqrt(num))
  for agg in ("mean", "orthogonal"):
    for lo, hi in ((1, 4), (4, 16)):
      (m_lo, s_lo), (m_hi, s_hi) = means[lo, agg], means[hi, agg]
      assert m_hi - m_lo > Z * math.hypot(s_lo, s_hi)
  # For the same tangents the projection onto span(V) has the largest cosine of any
  # vector in the span, so it beats the mean sample by sample (k = 1: they coincide).
  np.testing.assert_allclose(cosines[1, "orthogonal"], cosines[1, "mean"], atol=1e-5)
  for k in (4, 16):
    diff = cosines[k, "orthogonal"] - cosines[k, "mean"]
    assert diff.min() > -1e-5
    assert diff.mean() > Z * diff.std() / math.sqrt(num)


def _nonlinear_problem():
  params = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.3, -0.2, 0.5, 0.1])}

  def f(p):
    return jnp.sum(jnp.sin(p["a"]) ** 2) + jnp.sum(p["b"] ** 3) + jnp.sum(p["a"]) * p["b"][0]

  return f, params


@pytest.mark.parametrize("extra", [0, 5])
def test_orthogonal_is_exact_with_k_at_least_n(extra):
  f, params = _nonlinear_problem()
  n = 10
  vg = fg.value_and_forward_grad(f, num_tangents=n + extra, aggregation="orthogonal")
  # One compiled program (eagerly every op compiles on its own).
  (_, g), true = jax.jit(lambda key, p: (vg(key, p), jax.grad(f)(p)))(jax.random.key(0), params)
  # float32 Gram of 10 Gaussian tangents: cond(G) ≲ 1e4, so ~1e-3 relative error at most.
  np.testing.assert_allclose(_flat(g), _flat(true), rtol=0, atol=2e-3 * np.linalg.norm(_flat(true)))


def _fixed_tangents(vectors_kn, params):
  """A callable sampler returning the given (k, n) matrix as a tangent batch."""
  _, unravel = jax.flatten_util.ravel_pytree(params)

  def sampler(key, p, k):
    del key, p
    return jax.vmap(unravel)(jnp.asarray(vectors_kn, jnp.float32))

  return sampler


def test_orthogonal_equals_numpy_projection_for_given_tangents():
  f, params = _nonlinear_problem()
  rng = np.random.default_rng(3)
  base = rng.normal(size=(1, 10))
  v = base + 0.5 * rng.normal(size=(3, 10))  # three correlated, non-orthogonal tangents
  true = _flat(jax.grad(f)(params))
  projection = v.T @ np.linalg.solve(v @ v.T, v @ true)
  # The orthogonal and the mean estimate of the same tangents, in one compiled program.
  g, g_mean = jax.jit(
    lambda key, p: [
      fg.value_and_forward_grad(
        f, num_tangents=3, aggregation=agg, tangents=_fixed_tangents(v, params)
      )(key, p)[1]
      for agg in ("orthogonal", "mean")
    ]
  )(jax.random.key(0), params)
  np.testing.assert_allclose(_flat(g), projection, atol=1e-4 * np.linalg.norm(true))
  # and the mean of the same tangents is what the formula says
  np.testing.assert_allclose(_flat(g_mean), v.T @ (v @ true) / 3, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("delta", [0.0, 1e-6, 1e-3])
def test_orthogonal_is_robust_to_nearly_dependent_tangents(delta):
  f, params = _nonlinear_problem()
  rng = np.random.default_rng(4)
  v = rng.normal(size=(3, 10))
  v[1] = v[0] + delta * rng.normal(size=10)
  true = _flat(jax.grad(f)(params))
  _, g = fg.value_and_forward_grad(
    f, num_tangents=3, aggregation="orthogonal", tangents=_fixed_tangents(v, params)
  )(jax.random.key(0), params)
  g = _flat(g)
  assert np.isfinite(g).all()
  # A projection is never longer than what it projects, and it is at least as good as the
  # projection onto the well-separated pair (v0, v2), whatever float32 does with v1.
  assert np.linalg.norm(g) <= np.linalg.norm(true) * (1 + 1e-3)
  pair = v[[0, 2]]
  p_pair = pair.T @ np.linalg.solve(pair @ pair.T, pair @ true)
  assert np.linalg.norm(true - g) <= np.linalg.norm(true - p_pair) + 1e-3 * np.linalg.norm(true)


def test_sum_is_k_times_mean_for_the_same_key():
  f, params = _nonlinear_problem()
  g_sum, g_mean = jax.jit(
    lambda key, p: [
      fg.value_and_forward_grad(f, num_tangents=4, aggregation=agg)(key, p)[1]
      for agg in ("sum", "mean")
    ]
  )(jax.random.key(5), params)
  np.testing.assert_allclose(_flat(g_sum), 4 * _flat(g_mean), rtol=1e-5, atol=1e-6)


def test_value_equals_fun_and_grad_keeps_structure_shapes_dtypes():
  params = {"w": jnp.ones((3, 2), jnp.bfloat16), "b": [jnp.zeros(2, jnp.float32)]}
  f = lambda p, x, scale=1.0: scale * jnp.sum((x @ p["w"].astype(jnp.float32) + p["b"][0]) ** 2)
  x = jnp.arange(6.0).reshape(2, 3)
  value, g = jax.jit(fg.value_and_forward_grad(f, num_tangents=3))(
    jax.random.key(0), params, x, scale=2.0
  )
  assert jax.tree.structure(g) == jax.tree.structure(params)
  for gl, pl in zip(jax.tree.leaves(g), jax.tree.leaves(params)):
    assert gl.shape == pl.shape and gl.dtype == pl.dtype
  np.testing.assert_allclose(value, f(params, x, scale=2.0), rtol=1e-6)


def test_has_aux_and_forward_grad():
  f, params = _nonlinear_problem()
  f_aux = lambda p: (f(p), {"aux": p["b"] * 2})

  @jax.jit  # one compiled program (eagerly every op compiles on its own)
  def estimates(key, params):
    return (
      fg.value_and_forward_grad(f_aux, has_aux=True, num_tangents=2)(key, params),
      fg.value_and_forward_grad(f, num_tangents=2)(key, params),
      fg.forward_grad(f_aux, has_aux=True, num_tangents=2)(key, params),
      fg.forward_grad(f, num_tangents=2)(key, params),
    )

  ((value, aux), g), (value2, g2), (g3, aux3), g4 = estimates(jax.random.key(1), params)
  np.testing.assert_allclose(value, value2)
  np.testing.assert_allclose(aux["aux"], params["b"] * 2)
  np.testing.assert_allclose(aux3["aux"], params["b"] * 2)
  np.testing.assert_allclose(_flat(g), _flat(g2))
  np.testing.assert_allclose(_flat(g3), _flat(g2))
  np.testing.assert_allclose(_flat(g4), _flat(g2))


def test_raw_and_typed_keys_give_the_same_estimate():
  f, params = _nonlinear_problem()
  vg = fg.value_and_forward_grad(f, num_tangents=3, tangents="rademacher")
  _, g_raw = vg(jax.random.PRNGKey(11), params)
  _, g_typed = jax.jit(vg)(jax.random.key(11), params)
  np.testing.assert_allclose(_flat(g_raw), _flat(g_typed), rtol=1e-6)
  _, g_other = vg(jax.random.key(12), params)
  assert not np.allclose(_flat(g_other), _flat(g_raw))


def test_primal_is_evaluated_once_whatever_k():
  """The traced program has one unbatched primal `sin`; tangents only add `cos`."""
  w = jnp.ones((5, 7))
  f = lambda p: jnp.sum(jnp.sin(p @ w))
  for k in (1, 4, 16):
    jaxpr = jax.make_jaxpr(fg.value_and_forward_grad(f, num_tangents=k))(
      jax.random.key(0), jnp.ones(5)
    )
    sins = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "sin"]
    assert len(sins) == 1
    assert sins[0].outvars[0].aval.shape == (7,)  # not (k, 7): the primal is not batched


def test_exact_estimator_matches_jax_and_switches_by_name():
  f, params = _nonlinear_problem()
  value, g = fg.get_estimator("backprop")(f)(jax.random.key(0), params)
  v2, g2 = jax.value_and_grad(f)(params)
  np.testing.assert_allclose(value, v2)
  np.testing.assert_allclose(_flat(g), _flat(g2))
  assert fg.get_estimator("forward") is fg.value_and_forward_grad
  with pytest.raises(ValueError, match="estimator='sgd'"):
    fg.get_estimator("sgd")


def test_max_jvp_norm_caps_the_directional_derivatives():
  f, params = _nonlinear_problem()

  @jax.jit  # one compiled program (eagerly every op compiles on its own)
  def estimates(key, params):
    capped = fg.value_and_forward_grad(f, aggregation="sum", max_jvp_norm=1e-3)(key, params)
    free = fg.value_and_forward_grad(f, aggregation="sum")(key, params)
    return capped[1], free[1], fg.tangents.sample(key, params, 1)

  g, g_free, v = estimates(jax.random.key(2), params)
  ratio = np.linalg.norm(_flat(g)) / np.linalg.norm(_flat(g_free))
  v = _flat(v)
  d = abs(_flat(g_free) @ v) / (v @ v)
  np.testing.assert_allclose(ratio, min(1.0, 1e-3 / d), rtol=1e-4)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(num_tangents=0), "num_tangents=0"),
    (dict(num_tangents=-2), "num_tangents=-2"),
    (dict(num_tangents=2.5), "num_tangents=2.5"),
    (dict(num_tangents=True), "num_tangents=True"),
    (dict(tangents="uniform"), "tangents='uniform'"),
    (dict(aggregation="median"), "aggregation='median'"),
    (dict(max_jvp_norm=-1.0), "max_jvp_norm=-1.0"),
  ],
)
def test_bad_options_raise_when_built(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fg.value_and_forward_grad(jnp.sum, **kwargs)
  with pytest.raises(ValueError, match=match):
    fg.forward_gradient(key=jax.random.key(0), **kwargs)


def test_bad_params_keys_and_outputs_raise_on_call():
  vg = fg.value_and_forward_grad(lambda p: jnp.sum(p["w"] * 1.0))
  with pytest.raises(ValueError, match=r"params\['w'\] has dtype int32"):
    vg(jax.random.key(0), {"w": jnp.ones(3, jnp.int32)})
  with pytest.raises(ValueError, match="no array leaves"):
    vg(jax.random.key(0), {})
  with pytest.raises(ValueError, match="single PRNG key"):
    vg(jax.random.split(jax.random.key(0), 2), {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="key must be"):
    vg(0, {"w": jnp.ones(3)})
  with pytest.raises(TypeError, match="floating scalar"):
    fg.value_and_forward_grad(lambda p: p * 2)(jax.random.key(0), jnp.ones(3))
  bad_sampler = lambda key, p, k: jnp.zeros((k, 2))
  with pytest.raises(ValueError, match="expected"):
    fg.value_and_forward_grad(jnp.sum, tangents=bad_sampler)(jax.random.key(0), jnp.ones(3))


def test_a_pair_without_has_aux_gets_the_library_message():
  f, params = _nonlinear_problem()
  pair = lambda p: (f(p), {"aux": 1.0})
  for k in (1, 2):
    with pytest.raises(TypeError, match="pass has_aux=True"):
      fg.value_and_forward_grad(pair, num_tangents=k)(jax.random.key(0), params)


def test_a_raw_key_of_the_wrong_shape_is_rejected_like_jax_does():
  vg = fg.value_and_forward_grad(lambda p: jnp.sum(p**2))
  with pytest.raises(ValueError, match=r"shape \(3,\)"):
    vg(jnp.zeros(3, jnp.uint32), jnp.ones(3))
  with pytest.raises(Exception):  # noqa: B017 — jax's own refusal, whatever its type
    jax.random.normal(jnp.zeros(3, jnp.uint32), ())


def test_orthogonal_is_exact_in_float64_when_parameters_are_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(8, 8)), jnp.float64)
    f = lambda p: jnp.sum(jnp.sin(a @ p) ** 2)
    p = jnp.asarray(rng.normal(size=8), jnp.float64)
    vg = fg.value_and_forward_grad(f, num_tangents=8, aggregation="orthogonal")
    # One compiled program (eagerly every op compiles on its own).
    (_, g), true = jax.jit(lambda key, p: (vg(key, p), jax.grad(f)(p)))(jax.random.key(0), p)
    assert g.dtype == jnp.float64
    # float32 anywhere on the way would leave ~1e-7; float64 throughout leaves ~1e-13.
    assert np.max(np.abs(g - true)) / np.max(np.abs(true)) < 1e-10


def test_a_million_tangents_on_three_parameters_need_a_three_by_three_solve():
  f = lambda p: jnp.sum(jnp.cos(p) * jnp.arange(1.0, 4.0))
  p = jnp.array([0.3, -0.2, 1.1])
  vg = jax.jit(fg.value_and_forward_grad(f, num_tangents=10**6, aggregation="orthogonal"))
  compiled = vg.lower(jax.random.key(0), p).compile()
  # k×k would be 4 TB; the tangents themselves are 12 MB.
  assert compiled.memory_analysis().temp_size_in_bytes < 2**30
  _, g = compiled(jax.random.key(0), p)
  np.testing.assert_allclose(g, jax.grad(f)(p), rtol=1e-4)


# (n, tangents, aggregation, normalize): every case the closed forms are exact for.
_RESCALE_CASES = [
  (64, "normal", "mean", False),
  (64, "normal", "sum", False),
  (64, "normal", "orthogonal", False),
  (64, "rademacher", "mean", False),
  (64, "rademacher", "sum", False),
  (64, "partition", "sum", False),
  (64, "partition", "mean", False),
  (64, "normal", "mean", True),
]


@pytest.mark.parametrize("n, tangents, aggregation, normalize", _RESCALE_CASES)
@pytest.mark.parametrize("k", [1, 4, 16])
def test_rescaled_estimates_have_the_length_of_the_true_gradient(
  n, tangents, aggregation, normalize, k
):
  """E‖ĝ‖²/‖∇f‖² = 1 after rescaling, for every k, aggregation and scheme."""
  c = jnp.asarray(np.random.default_rng(1).normal(size=n), jnp.float32)
  f = lambda p: jnp.dot(c, p)  # ∇f = c everywhere
  vg = fg.value_and_forward_grad(
    f,
    num_tangents=k,
    tangents=tangents,
    aggregation=aggregation,
    normalize=normalize,
    rescale=True,
  )
  num = 20_000
  keys = jax.random.split(jax.random.key(3), num)
  g = jax.jit(jax.vmap(lambda key: vg(key, jnp.zeros(n))[1]))(keys)
  r = np.sum(np.square(np.asarray(g, np.float64)), axis=1) / float(jnp.sum(c**2))
  se = r.std(ddof=1) / np.sqrt(num)
  assert abs(r.mean() - 1.0) < Z * se + 1e-6
  # The same statistic would notice a 10 % error in the length (a 21 % one in its square).
  assert abs(r.mean() - 1.21) > Z * se


def test_cone_angle_degrades_the_mean_but_not_the_orthogonal_projection():
  """Flügel et al. Fig. 5's claim: coned tangents span what independent ones span."""
  n, k, num = 64, 16, 400
  c = jnp.asarray(np.random.default_rng(2).normal(size=n), jnp.float32)
  f = lambda p: jnp.dot(c, p)
  keys = jax.random.split(jax.random.key(9), num)

  def cosines(tangents, aggregation):
    vg = fg.value_and_forward_grad(f, num_tangents=k, tangents=tangents, aggregation=aggregation)
    cos = jax.jit(jax.vmap(lambda key: fg.cosine_similarity(vg(key, jnp.zeros(n))[1], c)))(keys)
    return np.asarray(cos, np.float64)

  ortho = {a: cosines(fg.tangents.cone(a), "orthogonal") for a in (np.pi / 2, 0.2)}
  ortho_free = cosines("normal", "orthogonal")
  # The same draws, the same span: identical projections whatever the angle.
  np.testing.assert_allclose(ortho[np.pi / 2], ortho_free, atol=2e-4)
  np.testing.assert_allclose(ortho[0.2], ortho_free, atol=2e-4)
  mean = {a: cosines(fg.tangents.cone(a), "mean") for a in (np.pi / 2, np.pi / 8, 0.05)}
  se = {a: m.std(ddof=1) / np.sqrt(num) for a, m in mean.items()}
  # Narrower cones: worse directions, each step beyond Z standard errors.
  assert mean[np.pi / 2].mean() - mean[np.pi / 8].mean() > Z * np.hypot(
    se[np.pi / 2], se[np.pi / 8]
  )
  assert mean[np.pi / 8].mean() - mean[0.05].mean() > Z * np.hypot(se[np.pi / 8], se[0.05])
