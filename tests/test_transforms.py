"""Tests of the optax transforms (fwdgrad_jax.transforms)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fwdgrad_jax as fg

_TARGET = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.25, -1.0])}


def _quadratic(params, scale=1.0):
  return scale * sum(
    jnp.sum((p - t) ** 2) for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(_TARGET))
  )


def _zeros():
  return jax.tree.map(jnp.zeros_like, _TARGET)


def _run(tx, steps, params=None, **extra):
  params = _zeros() if params is None else params
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(params, state, params, value_fn=_quadratic, **extra)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize(
  "name, tail",
  [
    ("sgd", lambda: optax.sgd(0.05)),
    ("nesterov", lambda: optax.sgd(0.02, momentum=0.9, nesterov=True)),
    ("adam", lambda: optax.adam(optax.cosine_decay_schedule(0.1, 600))),
  ],
)
@pytest.mark.parametrize("k, aggregation", [(1, "mean"), (4, "orthogonal")])
def test_converges_on_a_quadratic_in_a_chain_under_jit(name, tail, k, aggregation):
  tx = optax.chain(
    fg.forward_gradient(k, "normal", aggregation, key=jax.random.key(0)),
    optax.clip_by_global_norm(1.0),
    tail(),
  )
  start = float(_quadratic(_zeros()))
  params, state = _run(tx, 600)
  final = float(_quadratic(params))
  assert final < 1e-3 * start, (name, final)
  # state[0] is the forward-gradient state: the loss of the last step, for free.
  assert abs(float(state[0].value) - final) < 0.05 * start


def test_draws_fresh_tangents_every_step_and_records_the_value():
  tx = fg.forward_gradient(2, key=jax.random.PRNGKey(3))
  params = _zeros()
  state = tx.init(params)
  assert np.isnan(state.value)
  u1, s1 = jax.jit(lambda s: tx.update(params, s, params, value_fn=_quadratic, scale=2.0))(state)
  u2, s2 = tx.update(params, s1, params, value_fn=_quadratic, scale=2.0)
  assert not np.array_equal(s1.key, state.key) and not np.array_equal(s2.key, s1.key)
  assert not np.allclose(u1["w"], u2["w"])
  np.testing.assert_allclose(s1.value, _quadratic(params, scale=2.0), rtol=1e-6)
  # Same state in, same estimate out: all randomness is in the state.
  u1b, _ = tx.update(params, state, params, value_fn=_quadratic, scale=2.0)
  np.testing.assert_allclose(u1["w"], u1b["w"], rtol=1e-6)


def test_incoming_updates_are_ignored():
  tx = fg.forward_gradient(key=jax.random.key(0))
  params = _zeros()
  state = tx.init(params)
  u_a, _ = tx.update(params, state, params, value_fn=_quadratic)
  u_b, _ = tx.update(jax.tree.map(lambda x: x + 100, params), state, params, value_fn=_quadratic)
  np.testing.assert_allclose(u_a["w"], u_b["w"])


def test_update_without_value_fn_is_a_clear_error():
  tx = fg.forward_gradient(key=jax.random.key(0))
  params = _zeros()
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(params, tx.init(params), params)


def test_exact_gradient_and_switch_by_name():
  params = _zeros()
  tx = fg.gradient_transform("backprop", key=jax.random.key(0))
  u, s = tx.update(params, tx.init(params), params, value_fn=_quadratic)
  np.testing.assert_allclose(u["w"], jax.grad(_quadratic)(params)["w"])
  assert float(s.value) == pytest.approx(float(_quadratic(params)))
  fwd = fg.gradient_transform("forward", key=jax.random.key(0), num_tangents=2, aggregation="sum")
  assert isinstance(fwd.init(params), fg.ForwardGradientState)
  assert isinstance(tx.init(params), fg.ExactGradientState)
  with pytest.raises(ValueError, match="no options"):
    fg.gradient_transform("backprop", key=jax.random.key(0), num_tangents=2)
  with pytest.raises(ValueError, match="estimator='foo'"):
    fg.gradient_transform("foo", key=jax.random.key(0))


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 1, rngs=rngs)
    self.dropout = nnx.Dropout(0.0, rngs=rngs)  # brings uint32 RNG state into the module

  def __call__(self, x):
    return self.dropout(self.linear(x))


def test_with_flax_nnx_optimizer_on_a_linear_regression():
  model = _Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (64, 3))
  y = x @ jnp.array([[1.0], [-1.0], [2.0]]) + 0.5
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    m = nnx.merge(graphdef, p, rest, copy=True)
    return jnp.mean((m(x) - y) ** 2)

  tx = optax.chain(fg.forward_gradient(2, key=jax.random.key(2)), optax.adam(0.05))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    params = nnx.state(model, nnx.Param)
    optimizer.update(model, params, value_fn=loss)

  start = float(jax.jit(loss)(params))  # jitted: eagerly every op compiles on its own
  for _ in range(400):
    step(model, optimizer)
  final = float(jax.jit(loss)(nnx.state(model, nnx.Param)))
  assert final < 1e-3 * start


@pytest.mark.parametrize("name", sorted(fg.ESTIMATORS))
def test_has_aux_threads_state_through_a_jitted_loop(name):
  """A counter in aux (like a BatchNorm step count) comes back updated every step."""

  def loss(params, count):
    return _quadratic(params), count + 1

  tx = optax.chain(fg.gradient_transform(name, key=jax.random.key(0), has_aux=True), optax.sgd(0.1))
  params = _zeros()
  state = tx.init(params)
  assert optax.tree_utils.tree_get(state, "aux") is None
  state = optax.tree_utils.tree_set(state, aux=jnp.int32(0))

  def body(_, carry):
    params, state = carry
    count = optax.tree_utils.tree_get(state, "aux")
    updates, state = tx.update(params, state, params, value_fn=loss, count=count)
    return optax.apply_updates(params, updates), state

  params, state = jax.jit(lambda c: jax.lax.fori_loop(0, 5, body, c))((params, state))
  assert int(optax.tree_utils.tree_get(state, "aux")) == 5
  value = optax.tree_utils.tree_get(state, "value")
  assert np.isfinite(value) and value < float(_quadratic(_zeros()))


def test_forward_gradient_rejects_a_bad_option_when_built():
  with pytest.raises(ValueError, match="aggregation='median'"):
    fg.forward_gradient(2, aggregation="median", key=jax.random.key(0))


def test_multisteps_around_the_optimizer_averages_fresh_estimates():
  """The documented composition: chain(forward_gradient, MultiSteps(sgd)) applies the
  mean of k fresh estimates every k steps (wrapping the whole chain would average k
  copies of one estimate per k steps: the estimator ignores incoming updates)."""
  k = 4
  tx = optax.chain(
    fg.forward_gradient(1, key=jax.random.key(5)),
    optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k).gradient_transformation(),
  )
  params = _zeros()
  state = tx.init(params)
  estimates = []
  for _ in range(k):
    fwd_state = state[0]
    g, _ = fg.forward_gradient(1, key=fwd_state.key).update(
      params, fg.ForwardGradientState(fwd_state.key, fwd_state.value), params, value_fn=_quadratic
    )
    estimates.append(g)
    updates, state = tx.update(params, state, params, value_fn=_quadratic)
  mean = jax.tree.map(lambda *g: sum(g) / k, *estimates)
  np.testing.assert_allclose(updates["w"], -0.1 * mean["w"], rtol=1e-5)
  assert len({float(e["w"][0, 0]) for e in estimates}) == k  # fresh every step


def test_inject_hyperparams_points_to_static_args():
  factory = optax.inject_hyperparams(fg.forward_gradient)
  with pytest.raises(ValueError, match="static_args"):
    factory(num_tangents=2, key=jax.random.key(0)).init(_zeros())
  tx = optax.inject_hyperparams(fg.forward_gradient, static_args=("num_tangents", "key"))(
    num_tangents=2, key=jax.random.key(0)
  )
  assert tx.init(_zeros()) is not None


class _BNDropNet(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(jax.nn.relu(self.bn(self.lin(x)))))


@pytest.mark.parametrize("name", sorted(fg.ESTIMATORS))
def test_batchnorm_and_dropout_state_is_returned_and_threaded(name):
  graphdef, params, state = nnx.split(_BNDropNet(nnx.Rngs(0)), nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (16, 3))

  def loss(params, model_state):
    m = nnx.merge(graphdef, params, model_state, copy=True)
    return jnp.mean(m(x) ** 2), nnx.state(m, nnx.Not(nnx.Param))

  tx = fg.gradient_transform(name, key=jax.random.key(0), has_aux=True)
  opt = tx.init(params)
  update = jax.jit(lambda opt, s: tx.update(params, opt, params, value_fn=loss, model_state=s))
  g1, opt1 = update(opt, state)
  new_state = optax.tree_utils.tree_get(opt1, "aux")
  # BatchNorm's running mean moved towards the batch statistics; the RNG counter advanced.
  assert not np.allclose(new_state["bn"]["mean"][...], state["bn"]["mean"][...])
  g_same, _ = update(opt, state)
  g2, _ = update(opt, new_state)  # the same tangents (same opt state), a fresh dropout mask
  np.testing.assert_allclose(g_same["head"]["kernel"][...], g1["head"]["kernel"][...])
  assert not np.allclose(g2["head"]["kernel"][...], g1["head"]["kernel"][...])
