"""Where tangents enter (fwdgrad_jax.perturbation): structured weight tangents and activity.

Exactness: with ``aggregation="orthogonal"`` and k at least the dimension perturbed, the
estimate is the projection of ∇f onto a space that contains it, so it must equal
``jax.grad`` — the strongest check that the factored and analytic paths are right.
Unbiasedness: the mean of N estimates against ∇f at Z standard errors (the sample
standard deviation per coordinate), with the same statistic shown to flag a 5 % bias.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fwdgrad_jax as fg
from fwdgrad_jax import perturbation
from fwdgrad_jax.models.layers import CONV_INIT

# |z| beyond 5 has probability 5.7e-7 per coordinate under the null; with the ≤ 100
# coordinates tested at once the family-wise false-alarm rate stays below 6e-5.
Z = 5.0


def _mlp_params(sizes, seed=0):
  rng = np.random.default_rng(seed)
  p = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    p[f"w{i}"] = jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
    p[f"b{i}"] = jnp.asarray(rng.normal(size=(b,)) * 0.1, jnp.float32)
  return p


def _mlp_losses(p, x, y):
  """Per-example cross-entropy of a tanh MLP (tanh: no kinks, smooth everywhere)."""
  h = x
  n = len(p) // 2
  for i in range(n):
    h = h @ p[f"w{i}"] + p[f"b{i}"]
    if i < n - 1:
      h = jnp.tanh(h)
  return jax.nn.logsumexp(h, -1) - jnp.take_along_axis(h, y[:, None], 1)[:, 0]


def _mlp_loss(p, x, y):
  return jnp.mean(_mlp_losses(p, x, y))


# The references, jitted: eagerly every op of them compiles on its own.
_value_and_grad = jax.jit(jax.value_and_grad(_mlp_loss))


def _data(batch, fan_in, classes, seed=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, fan_in)), jnp.float32)
  y = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)
  return x, y


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)])


def _size(tree):
  return sum(np.size(v) for v in jax.tree.leaves(tree))


def _assert_tree_close(a, b, rtol):
  fa, fb = _flat(a), _flat(b)
  assert np.max(np.abs(fa - fb)) <= rtol * np.max(np.abs(fb)), np.max(np.abs(fa - fb))


# --------------------------------------------------------------------------------------
# Exactness with the orthogonal projection
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tangents", ["rank1", "input"])
def test_weights_orthogonal_with_k_at_least_n_equals_grad(tangents):
  params = _mlp_params([4, 5, 3])
  x, y = _data(6, 4, 3)
  n = _size(params)
  vg = jax.jit(
    fg.value_and_forward_grad(
      _mlp_loss, num_tangents=n + 8, tangents=tangents, aggregation="orthogonal"
    )
  )
  value, g = vg(jax.random.key(0), params, x, y)
  true_value, true = _value_and_grad(params, x, y)
  np.testing.assert_allclose(value, true_value, rtol=1e-6)
  _assert_tree_close(g, true, 1e-4)


@pytest.mark.parametrize("per_example", [True, False])
def test_activity_orthogonal_with_k_at_least_the_activities_equals_grad(per_example):
  params = _mlp_params([4, 5, 3])
  x, y = _data(6, 4, 3)
  # Perturbed per example: 5 + 3 activations; for a scalar loss all 6 examples' at once.
  m = 8 if per_example else 6 * 8
  fun = _mlp_losses if per_example else _mlp_loss
  vg = jax.jit(
    fg.value_and_forward_grad(
      fun, num_tangents=2 * m, perturbation="activity", aggregation="orthogonal"
    )
  )
  value, g = vg(jax.random.key(0), params, x, y)
  true_value, true = _value_and_grad(params, x, y)
  np.testing.assert_allclose(value, true_value, rtol=1e-6)
  _assert_tree_close(g, true, 1e-4)


class _ConvNet(nnx.Module):
  """nnx.Conv and nnx.Linear layers; ``mark`` puts a site on the hidden block's output."""

  def __init__(self, rngs, mark=False):
    # CONV_INIT: flax's initialiser drawn 2-D (a 4-D draw takes seconds to compile).
    self.conv = nnx.Conv(2, 3, kernel_size=(3, 3), kernel_init=CONV_INIT, rngs=rngs)
    self.lin = nnx.Linear(4 * 4 * 3, 4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)
    self.mark = mark

  def __call__(self, x):
    h = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1)
    h = jnp.tanh(self.lin(h))
    if self.mark:
      h = fg.site(h)
    return self.head(h)


def _nnx_problem(mark=False):
  graphdef, params, rest = nnx.split(_ConvNet(nnx.Rngs(0), mark), nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (5, 4, 4, 2))
  y = jnp.array([0, 1, 2, 1, 0])

  def losses(p, x, y):
    logits = nnx.merge(graphdef, p, rest, copy=True)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  return params, x, y, losses


@pytest.mark.parametrize("tangents", ["rank1", "input", "input_approx"])
def test_nnx_linear_and_conv_weights_exact(tangents):
  params, x, y, losses = _nnx_problem()
  loss = lambda p, x, y: jnp.mean(losses(p, x, y))
  n = _size(params)
  vg = fg.value_and_forward_grad(
    loss, num_tangents=2 * n, tangents=tangents, aggregation="orthogonal"
  )
  # One compiled program for the estimate and the reference.
  (_, g), true = jax.jit(lambda key, p: (vg(key, p, x, y), jax.grad(loss)(p, x, y)))(
    jax.random.key(0), params
  )
  _assert_tree_close(g, true, 1e-4)


@pytest.mark.parametrize("mark", [False, True])
def test_nnx_activity_exact_per_op_and_with_marked_sites(mark):
  """Marked: one site after conv–ReLU–Linear–tanh, whose 4 parameters get a local VJP."""
  params, x, y, losses = _nnx_problem(mark)
  per_example_dim = 4 if mark else 4 * 4 * 3 + 4 + 3
  vg = fg.value_and_forward_grad(
    losses, num_tangents=2 * per_example_dim, perturbation="activity", aggregation="orthogonal"
  )
  # One compiled program for the estimate and the reference.
  (_, g), true = jax.jit(
    lambda key, p: (vg(key, p, x, y), jax.grad(lambda q: jnp.mean(losses(q, x, y)))(p))
  )(jax.random.key(0), params)
  _assert_tree_close(g, true, 1e-4)


# --------------------------------------------------------------------------------------
# Unbiasedness
# --------------------------------------------------------------------------------------


def _moments(fun, params, args, num, chunk=50_000, **options):
  """(mean, standard error of the mean) per coordinate of ``num`` independent estimates."""
  vg = fg.value_and_forward_grad(fun, **options)
  run = jax.jit(jax.vmap(lambda k: vg(k, params, *args)[1]))
  total = total_sq = 0.0
  for c in range(num // chunk):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(42), c), chunk)
    g = np.concatenate(
      [np.asarray(v, np.float64).reshape(chunk, -1) for v in jax.tree.leaves(run(keys))], 1
    )
    total = total + g.sum(0)
    total_sq = total_sq + np.square(g).sum(0)
  mean = total / num
  var = (total_sq - num * np.square(mean)) / (num - 1)
  return mean, np.sqrt(var / num)


def _max_z(moments, target):
  mean, se = moments
  keep = se > 0
  return np.max(np.abs(mean[keep] - target[keep]) / se[keep])


# An MLP 8-6-3 at batch 3: the input span (3-dimensional) is smaller than the fan-ins,
# so "input" tangents only cover the span that holds the minibatch gradient.
@pytest.mark.parametrize(
  "options",
  [
    dict(tangents="rank1"),
    dict(tangents="input"),
    dict(perturbation="activity"),
    dict(perturbation="activity", per_example=True),
  ],
  ids=["rank1", "input", "activity", "activity-per-example"],
)
def test_single_tangent_estimates_are_unbiased(options):
  options = dict(options)
  per_example = options.pop("per_example", False)
  params = _mlp_params([8, 6, 3])
  x, y = _data(3, 8, 3)
  fun = _mlp_losses if per_example else _mlp_loss
  moments = _moments(fun, params, (x, y), 300_000, **options)
  true = _flat(_value_and_grad(params, x, y)[1])
  assert _max_z(moments, true) < Z
  # The same statistic flags a 5 % bias: the test can fail.
  assert _max_z(moments, 1.05 * true) > Z


def _logreg_loss(p, x, y):
  logits = x @ p["w"] + p["b"]
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def test_input_approx_is_unbiased_on_orthogonal_inputs_and_biased_on_correlated_ones():
  """Yao's approximation equals the QR scheme exactly when the input rows are orthogonal."""
  p = {"w": jnp.zeros((6, 3)), "b": jnp.zeros(3)}
  y = jnp.array([0, 1, 2])
  q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(6, 3)))
  x_orth = jnp.asarray(q.T * np.array([[1.0], [2.0], [0.5]]), jnp.float32)
  x_corr = jnp.asarray(1.0 + 0.3 * np.random.default_rng(4).normal(size=(3, 6)), jnp.float32)
  for x, unbiased in ((x_orth, True), (x_corr, False)):
    moments = _moments(_logreg_loss, p, (x, y), 100_000, tangents="input_approx")
    true = _flat(jax.grad(_logreg_loss)(p, x, y))
    assert (_max_z(moments, true) < Z) == unbiased


# --------------------------------------------------------------------------------------
# The factored path and its fallback
# --------------------------------------------------------------------------------------


def _with_decay(p, x, y):
  # w0 is consumed by a matmul *and* by the weight-decay term (not understood there).
  return _mlp_loss(p, x, y) + 0.01 * jnp.sum(p["w0"] ** 2)


@pytest.mark.parametrize("fun", [_mlp_loss, _with_decay])
def test_fallback_gives_the_same_estimate_as_the_factored_path(fun):
  params = _mlp_params([4, 5, 3])
  x, y = _data(6, 4, 3)

  rank1 = {}

  def estimate(factored):
    def run(key):
      _, d, batch = perturbation.weight_tangents_and_jvps(
        fun, params, (x, y), {}, key=key, num_tangents=3, tangents="rank1", factored=factored
      )
      if factored:  # which leaves the factored path keeps rank-1 (seen while tracing)
        rank1.update({name: perturbation.is_rank1(v) for name, v in batch.items()})
      return d, fg.aggregation.mean(batch, d)

    return jax.jit(run)(jax.random.key(7))

  (d1, g1), (d0, g0) = estimate(True), estimate(False)
  np.testing.assert_allclose(d1, d0, rtol=1e-5, atol=1e-6)
  _assert_tree_close(g1, g0, 1e-5)
  assert rank1["w0"] and not rank1["b0"]


def test_a_matmul_inside_a_cond_falls_back_densely_and_stays_exact():
  params = _mlp_params([4, 5, 3])
  x, y = _data(6, 4, 3)

  def loss(p, x, y):
    p = dict(p, w0=jax.lax.cond(jnp.sum(x) > -1e9, lambda w: w, lambda w: -w, p["w0"]))
    return _mlp_loss(p, x, y)

  n = _size(params)
  vg = fg.value_and_forward_grad(
    loss, num_tangents=n + 8, tangents="rank1", aggregation="orthogonal"
  )
  # One compiled program for the estimate and the reference.
  (_, g), true = jax.jit(lambda key, p: (vg(key, p, x, y), jax.grad(loss)(p, x, y)))(
    jax.random.key(0), params
  )
  _assert_tree_close(g, true, 1e-4)


def _baydin_mlp():
  params = _mlp_params([784, 1024, 1024, 10])
  x, y = _data(64, 784, 10)
  return params, x, y


@pytest.mark.slow
def test_rank1_step_has_no_weight_sized_tangent_matmul():
  """In the compiled step, rank-1 costs ≈ 0.61× backprop's FLOPs (dense: ≥ 1×), and no
  dot_general in the program takes a weight-shaped operand that is not the weight."""
  params, x, y = _baydin_mlp()

  def step_flops(vg):
    step = lambda p, key: vg(key, p, x, y)[1]
    return jax.jit(step).lower(params, jax.random.key(0)).compile().cost_analysis()["flops"]

  backprop = step_flops(fg.value_and_exact_grad(_mlp_loss))
  rank1 = step_flops(fg.value_and_forward_grad(_mlp_loss, tangents="rank1"))
  dense = step_flops(fg.value_and_forward_grad(_mlp_loss))
  assert rank1 < 0.7 * backprop < 0.7 * dense

  vg = fg.value_and_forward_grad(_mlp_loss, tangents="rank1", num_tangents=4)
  closed = jax.make_jaxpr(lambda key, p: vg(key, p, x, y))(jax.random.key(0), params)
  prog = perturbation._flatten_program(closed)
  leaves = jax.tree.leaves(params)
  param_ids = set(prog.ins[1 : 1 + len(leaves)])
  weight_shapes = {tuple(w.shape) for w in leaves if w.ndim == 2}
  shape = {i: tuple(np.shape(v)) for i, v in prog.consts.items()}
  shape.update({i: tuple(v.aval.shape) for i, v in zip(prog.ins, closed.jaxpr.invars)})
  for op in prog.ops:
    shape.update(zip(op.outs, op.shapes))
  dots = [op for op in prog.ops if op.prim != "site" and op.prim.name == "dot_general"]
  assert dots
  for op in dots:
    for i in op.ins:
      if shape[i][-2:] in weight_shapes:
        assert i in param_ids, f"a weight-sized operand {shape[i]} that is not a parameter"


@pytest.mark.slow
def test_mean_cosine_on_the_baydin_mlp_is_ordered_as_the_papers_predict():
  """activity ≫ rank-1 ≈ dense weights (one tangent each, per-example activity losses)."""
  params, x, y = _baydin_mlp()
  true = _value_and_grad(params, x, y)[1]

  def mean_cos(fun, **options):
    vg = fg.value_and_forward_grad(fun, **options)
    keys = jax.random.split(jax.random.key(5), 24)
    cos = jax.lax.map(lambda k: fg.cosine_similarity(vg(k, params, x, y)[1], true), keys)
    return float(jnp.mean(cos))

  dense = mean_cos(_mlp_loss)
  rank1 = mean_cos(_mlp_loss, tangents="rank1")
  activity = mean_cos(_mlp_losses, perturbation="activity")
  # One Gaussian tangent in n = 1.86 M dims: E cos = √(2/(πn)) ≈ 5.8e-4 (sd of the mean
  # of 24 ≈ 13 %), so the factors of 2 are wide margins, not tuning.
  assert 0.5 * dense < rank1 < 2 * dense
  assert activity > 10 * dense


# --------------------------------------------------------------------------------------
# Through every path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "options",
  [dict(tangents="rank1", num_tangents=4, aggregation="orthogonal"), dict(perturbation="activity")],
)
def test_optax_transform_with_an_nnx_model_trains(options):
  params, x, y, losses = _nnx_problem()
  loss = lambda p, x, y: jnp.mean(losses(p, x, y))
  fun = losses if options.get("perturbation") == "activity" else loss
  tx = optax.chain(fg.forward_gradient(key=jax.random.key(0), **options), optax.adam(0.02))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(params, state, params, value_fn=fun, x=x, y=y)
    return optax.apply_updates(params, updates), state

  start = float(loss(params, x, y))
  for _ in range(300):
    params, state = step(params, state)
  assert float(loss(params, x, y)) < 0.2 * start


@pytest.mark.parametrize("options", [dict(tangents="rank1"), dict(perturbation="activity")])
def test_has_aux_returns_aux_and_the_same_estimate(options):
  params = _mlp_params([4, 5, 3])
  x, y = _data(6, 4, 3)
  with_aux = lambda p, x, y: (_mlp_loss(p, x, y), {"first": x[0]})
  (v, aux), g = jax.jit(fg.value_and_forward_grad(with_aux, has_aux=True, **options))(
    jax.random.key(1), params, x, y
  )
  v0, g0 = jax.jit(fg.value_and_forward_grad(_mlp_loss, **options))(jax.random.key(1), params, x, y)
  np.testing.assert_allclose(aux["first"], x[0])
  np.testing.assert_allclose(v, v0, rtol=1e-6)
  _assert_tree_close(g, g0, 1e-5)


def test_site_is_the_identity_under_jit_grad_vmap():
  f = lambda x: jnp.sum(jnp.sin(fg.site(x * 2.0)) ** 2)
  g = lambda x: jnp.sum(jnp.sin(x * 2.0) ** 2)
  x = jnp.linspace(-1.0, 1.0, 7)
  np.testing.assert_allclose(jax.jit(f)(x), g(x), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(f))(x[:, None]), jax.vmap(jax.grad(g))(x[:, None]))
  assert fg.site({"a": x})["a"] is not None


def test_bad_uses_raise_clear_errors():
  params = _mlp_params([4, 5, 3])
  x, y = _data(6, 4, 3)
  key = jax.random.key(0)
  # Refused while the program is read: abstractly (jax.eval_shape), nothing compiles.
  no_linear = lambda p, x, y: jnp.sum(jnp.tanh(p["w0"]).sum() * x)
  with pytest.raises(ValueError, match="no parameter-consuming linear op"):
    jax.eval_shape(fg.value_and_forward_grad(no_linear, perturbation="activity"), key, params, x, y)

  def leaky(p, x, y):
    h = x @ p["w0"] + p["b0"]
    s = fg.site(jnp.tanh(h))
    return jnp.mean(_mlp_losses({"w0": p["w1"], "b0": p["b1"]}, s, y)) + jnp.mean(h)

  with pytest.raises(ValueError, match="also used outside"):
    jax.eval_shape(fg.value_and_forward_grad(leaky, perturbation="activity"), key, params, x, y)
  # Features-first activations (5, batch): per-example tangents need the batch axis first.
  transposed = lambda p, x, y: jnp.sum(jnp.tanh(p["w0"].T @ x.T), axis=0)
  with pytest.raises(ValueError, match="batch axis"):
    jax.eval_shape(
      fg.value_and_forward_grad(transposed, perturbation="activity"), key, params, x, y
    )
  with pytest.raises(ValueError, match="does not apply to perturbation='activity'"):
    fg.value_and_forward_grad(_mlp_loss, perturbation="activity", tangents="rank1")
  with pytest.raises(ValueError, match="perturbation='sideways'"):
    fg.value_and_forward_grad(_mlp_loss, perturbation="sideways")
  with pytest.raises(TypeError, match="per-example"):
    jax.eval_shape(fg.value_and_forward_grad(_mlp_losses, tangents="rank1"), key, params, x, y)
