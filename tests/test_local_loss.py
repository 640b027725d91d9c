"""Local losses in true forward mode (fwdgrad_jax.local_loss), and closed-over data.

Exactness: with ``aggregation="orthogonal"`` and k at least the dimension perturbed the
estimate must equal ``jax.grad``. Unbiasedness: the mean of N estimates against ∇f at Z
standard errors (the sample standard deviation per coordinate), with the same statistic
shown to flag a 5 % bias. Lower error: the mean squared error with and without markers,
each with its standard error, compared at Z standard errors of their difference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fwdgrad_jax as fg

Z = 5.0


def _mlp_params(sizes, seed=0):
  rng = np.random.default_rng(seed)
  p = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    p[f"w{i}"] = jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
    p[f"b{i}"] = jnp.asarray(rng.normal(size=(b,)) * 0.1, jnp.float32)
  return p


def _mlp_losses(p, x, y):
  h = x
  n = len(p) // 2
  for i in range(n):
    h = h @ p[f"w{i}"] + p[f"b{i}"]
    if i < n - 1:
      h = jnp.tanh(h)
  return jax.nn.logsumexp(h, -1) - jnp.take_along_axis(h, y[:, None], 1)[:, 0]


def _mlp_loss(p, x, y):
  return jnp.mean(_mlp_losses(p, x, y))


def _data(batch, fan_in, classes, seed=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, fan_in)), jnp.float32)
  y = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)
  return x, y


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)])


def _assert_tree_close(a, b, rtol):
  fa, fb = _flat(a), _flat(b)
  assert np.max(np.abs(fa - fb)) <= rtol * np.max(np.abs(fb)), np.max(np.abs(fa - fb))


# --------------------------------------------------------------------------------------
# Closed-over data and stop-gradient (activity perturbation)
# --------------------------------------------------------------------------------------

# Per example: 5 + 3 activations of the 4-5-3 MLP; k = 16 ≥ 8 makes the estimate exact.
_EXACT = dict(num_tangents=16, perturbation="activity", aggregation="orthogonal")


@pytest.mark.parametrize("jit", [False, True])
def test_activity_with_closed_over_data_in_the_function_transform(jit):
  params = _mlp_params([4, 5, 3])
  x, y = _data(6, 4, 3)
  vg = fg.value_and_forward_grad(lambda q: _mlp_losses(q, x, y), **_EXACT)
  vg = jax.jit(vg) if jit else vg
  value, g = vg(jax.random.key(0), params)
  np.testing.assert_allclose(value, _mlp_loss(params, x, y), rtol=1e-6)
  _assert_tree_close(g, jax.grad(_mlp_loss)(params, x, y), 1e-4)


def test_activity_with_data_closed_over_inside_an_outer_jit_and_numpy_constants():
  """Closed-over tracers (an outer jit's arguments) and numpy constants are data too."""
  params = _mlp_params([4, 5, 3])
  x, y = _data(6, 4, 3)
  x_np = np.asarray(x)

  @jax.jit
  def step(params, y):
    vg = fg.value_and_forward_grad(lambda q: _mlp_losses(q, x_np, y), **_EXACT)
    return vg(jax.random.key(0), params)[1]

  _assert_tree_close(step(params, y), jax.grad(_mlp_loss)(params, x, y), 1e-4)


@pytest.mark.parametrize("jit", [False, True])
def test_activity_with_closed_over_data_in_the_optax_transform(jit):
  params = _mlp_params([4, 5, 3])
  x, y = _data(6, 4, 3)
  tx = optax.chain(fg.forward_gradient(key=jax.random.key(0), **_EXACT), optax.sgd(1.0))
  state = tx.init(params)

  def update(params, state):
    return tx.update(params, state, params, value_fn=lambda q: _mlp_losses(q, x, y))

  updates, _ = (jax.jit(update) if jit else update)(params, state)
  true = jax.grad(_mlp_loss)(params, x, y)
  _assert_tree_close(updates, jax.tree.map(jnp.negative, true), 1e-4)


class _Mlp(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 5, rngs=rngs)
    self.l2 = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.parametrize("jit", [False, True])
def test_activity_with_closed_over_data_in_an_nnx_optimizer(jit):
  model = _Mlp(nnx.Rngs(0))
  x, y = _data(6, 4, 3)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def losses(p):  # x, y closed over
    logits = nnx.merge(graphdef, p, rest, copy=True)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  true = jax.grad(lambda p: jnp.mean(losses(p)))(params)
  before = jax.tree.map(np.array, params)  # a copy: the optimizer updates the model in place
  tx = optax.chain(fg.forward_gradient(key=jax.random.key(0), **_EXACT), optax.sgd(1.0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def step(model, optimizer):
    optimizer.update(model, nnx.state(model, nnx.Param), value_fn=losses)

  (nnx.jit(step) if jit else step)(model, optimizer)
  moved = jax.tree.map(lambda a, b: a - b, nnx.state(model, nnx.Param), before)
  _assert_tree_close(moved, jax.tree.map(jnp.negative, true), 1e-4)


@pytest.mark.parametrize("jit", [False, True])
def test_a_stop_gradient_use_outside_a_block_does_not_count(jit):
  params = _mlp_params([4, 5, 3])
  x, y = _data(6, 4, 3)

  def fun(p, x, y):
    h = x @ p["w0"] + p["b0"]
    s = fg.site(jnp.tanh(h))
    # h is used outside its block, but only through stop_gradient: no derivative there.
    extra = jnp.sum(jax.lax.stop_gradient(h) ** 2, -1)
    return _mlp_losses({"w0": p["w1"], "b0": p["b1"]}, s, y) + extra

  vg = fg.value_and_forward_grad(
    fun, num_tangents=16, perturbation="activity", aggregation="orthogonal"
  )
  vg = jax.jit(vg) if jit else vg
  value, g = vg(jax.random.key(0), params, x, y)
  np.testing.assert_allclose(value, jnp.mean(fun(params, x, y)), rtol=1e-6)
  _assert_tree_close(g, jax.grad(lambda p: jnp.mean(fun(p, x, y)))(params), 1e-4)


# --------------------------------------------------------------------------------------
# Local losses (Ren et al. 2023): two blocks, each with its own classifier head and loss
# --------------------------------------------------------------------------------------

_B, _D, _H, _C = 6, 4, 5, 3


def _ren_params(seed=0):
  rng = np.random.default_rng(seed)

  def mk(*s):
    return jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)

  return {"w1": mk(_D, _H), "a1": mk(_H, _C), "w2": mk(_H, _H), "a2": mk(_H, _C)}


def _ce(logits, y):
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]


def _ren(p, x, y, mark=True, stop=True, scalar=False, sites=False):
  """Block b: h_b = tanh(h_{b-1} W_b), local loss ℓ_b = CE(h_b A_b); the total Σ_b ℓ_b.

  ``stop``: stop_gradient between the blocks (LG-BP under jax.grad, LG-FG-A/W forward).
  ``scalar``: the marked losses and the total are batch means. ``sites``: h_b marked as
  sites (without, every matmul's output is one; h1 then feeds two blocks, which needs
  the stop-gradient).
  """
  m = fg.local_loss if mark else (lambda v: v)
  r = jnp.mean if scalar else (lambda v: v)
  s = fg.site if sites else (lambda v: v)
  h1 = s(jnp.tanh(x @ p["w1"]))
  l1 = m(r(_ce(h1 @ p["a1"], y)))
  h = jax.lax.stop_gradient(h1) if stop else h1
  h2 = s(jnp.tanh(h @ p["w2"]))
  l2 = m(r(_ce(h2 @ p["a2"], y)))
  return l1 + l2


def _ren_problem(**kw):
  x, y = _data(_B, _D, _C)
  fun = lambda p, x, y: _ren(p, x, y, **kw)
  total = lambda p: jnp.mean(fun(p, x, y))
  return _ren_params(), x, y, fun, total


def test_local_loss_is_the_identity_under_jit_grad_vmap_jvp():
  f = lambda x: jnp.sum(jnp.sin(fg.local_loss(x * 2.0)) ** 2)
  g = lambda x: jnp.sum(jnp.sin(x * 2.0) ** 2)
  x = jnp.linspace(-1.0, 1.0, 7)
  np.testing.assert_allclose(jax.jit(f)(x), g(x), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(f))(x[:, None]), jax.vmap(jax.grad(g))(x[:, None]))
  np.testing.assert_allclose(jax.jvp(f, (x,), (x,))[1], jax.jvp(g, (x,), (x,))[1], rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(g)(x), rtol=1e-6)


@pytest.mark.parametrize(
  "kw",
  [dict(), dict(stop=False, sites=True), dict(sites=True), dict(scalar=True)],
  ids=["lg-fg-a", "no-stop-sites", "sites", "scalar"],
)
def test_activity_local_losses_orthogonal_with_k_at_least_the_activities_is_exact(kw):
  params, x, y, fun, total = _ren_problem(**kw)
  # Sites per example: x W1 (5), h1 A1 (3), h W2 (5), h2 A2 (3), or h1, h2 (5 each) when
  # marked; all examples' for a scalar.
  m = (10 if kw.get("sites") else 16) * (_B if kw.get("scalar") else 1)
  vg = jax.jit(
    fg.value_and_forward_grad(
      fun, num_tangents=m + 4, perturbation="activity", aggregation="orthogonal"
    )
  )
  value, g = vg(jax.random.key(0), params, x, y)
  np.testing.assert_allclose(value, total(params), rtol=1e-6)
  _assert_tree_close(g, jax.grad(total)(params), 1e-4)


def test_a_marker_every_site_reaches_changes_nothing():
  """Only the total marked: every site reaches it, so the estimate is bit-for-bit unmarked."""
  params, x, y, fun, _ = _ren_problem(mark=False, stop=False, sites=True)
  marked = lambda p, x, y: fg.local_loss(fun(p, x, y))
  out = [
    jax.jit(fg.value_and_forward_grad(f, num_tangents=3, perturbation="activity"))(
      jax.random.key(3), params, x, y
    )
    for f in (fun, marked)
  ]
  np.testing.assert_array_equal(out[0][0], out[1][0])
  np.testing.assert_array_equal(_flat(out[0][1]), _flat(out[1][1]))


def _errors(funs, params, args, target, num, seed=0, **options):
  """Per function: (mean of num estimates, their standard errors, per-key squared errors
  ‖ĝ − ∇f‖²). The functions' estimates with the same keys (the same tangents), in one
  compiled program: the draws are shared, and so is the compile."""
  vgs = [fg.value_and_forward_grad(f, **options) for f in funs]
  keys = jax.random.split(jax.random.key(seed), num)
  flat = lambda vg, k: jax.flatten_util.ravel_pytree(vg(k, params, *args)[1])[0]
  gs = jax.jit(jax.vmap(lambda k: [flat(vg, k) for vg in vgs]))(keys)
  out = []
  for g in gs:
    g = np.asarray(g, np.float64)
    out.append((g.mean(0), g.std(0, ddof=1) / np.sqrt(num), np.sum(np.square(g - target), 1)))
  return out


@pytest.mark.parametrize(
  "options, num",
  [(dict(perturbation="activity"), 40_000), (dict(), 100_000), (dict(tangents="rank1"), 200_000)],
  ids=["lg-fg-a", "lg-fg-w-dense", "lg-fg-w-rank1"],
)
def test_local_losses_are_unbiased_and_lower_error_than_unmarked(options, num):
  """One tangent per call; weight tangents need a scalar total (the marked batch means).

  ``num`` is sized so that a 5 % bias is flagged (rank-1 tangents have the largest variance
  per coordinate here). Regenerated tangents are the dense ones (the same draws).
  """
  kw = {} if options.get("perturbation") == "activity" else dict(scalar=True)
  params, x, y, fun, total = _ren_problem(**kw)
  plain = _ren_problem(mark=False, **kw)[3]
  true = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(total)(params))[0], np.float64)
  opts = options
  (mean, se, err), (_, _, err_plain) = _errors([fun, plain], params, (x, y), true, num, **opts)
  z = np.max(np.abs(mean - true) / se)
  z_bias = np.max(np.abs(mean - 1.05 * true) / se)
  diff = err_plain - err  # paired: the same keys, hence the same tangents
  z_better = diff.mean() / (diff.std(ddof=1) / np.sqrt(num))
  print(
    f"\n{options}: z={z:.2f} z(5% bias)={z_bias:.2f} "
    f"mse ratio={err.mean() / err_plain.mean():.3f} z(better)={z_better:.1f}"
  )
  assert z < Z
  assert z_bias > Z  # the same statistic flags a 5 % bias: the test can fail
  assert z_better > Z


def test_local_losses_with_k_tangents_sum_mean_and_rademacher():
  params, x, y, fun, total = _ren_problem()
  run = lambda **o: jax.jit(fg.value_and_forward_grad(fun, perturbation="activity", **o))(
    jax.random.key(5), params, x, y
  )[1]
  mean, summed = run(num_tangents=4), run(num_tangents=4, aggregation="sum")
  _assert_tree_close(summed, jax.tree.map(lambda g: 4 * g, mean), 1e-5)
  # Rademacher tangents with k = 8 per call: unbiased too (mean of 20 000 calls).
  true = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(total)(params))[0], np.float64)
  [(m, se, _)] = _errors([fun], params, (x, y), true, 20_000, num_tangents=8, tangents="rademacher",
                     perturbation="activity")  # fmt: skip
  assert np.max(np.abs(m - true) / se) < Z


def test_local_losses_with_has_aux_give_the_same_estimate():
  params, x, y, fun, _ = _ren_problem()
  with_aux = lambda p, x, y: (fun(p, x, y), {"first": x[0]})
  opts = dict(num_tangents=3, perturbation="activity")
  (v, aux), g = jax.jit(fg.value_and_forward_grad(with_aux, has_aux=True, **opts))(
    jax.random.key(1), params, x, y
  )
  v0, g0 = jax.jit(fg.value_and_forward_grad(fun, **opts))(jax.random.key(1), params, x, y)
  np.testing.assert_allclose(aux["first"], x[0])
  np.testing.assert_allclose(v, v0, rtol=1e-6)
  _assert_tree_close(g, g0, 1e-5)


def test_local_losses_in_the_optax_transform_with_closed_over_data():
  params, x, y, fun, total = _ren_problem()
  opts = dict(num_tangents=24, perturbation="activity", aggregation="orthogonal")
  tx = optax.chain(fg.forward_gradient(key=jax.random.key(0), **opts), optax.sgd(1.0))
  state = tx.init(params)
  update = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=lambda q: fun(q, x, y)))
  updates, state = update(params, state)
  _assert_tree_close(updates, jax.tree.map(jnp.negative, jax.grad(total)(params)), 1e-4)
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, "value"), total(params), rtol=1e-6)


class _RenNet(nnx.Module):
  """Two blocks with local classifier heads (Ren et al.'s local greedy losses)."""

  def __init__(self, rngs):
    self.l1, self.h1 = nnx.Linear(_D, _H, rngs=rngs), nnx.Linear(_H, _C, rngs=rngs)
    self.l2, self.h2 = nnx.Linear(_H, _H, rngs=rngs), nnx.Linear(_H, _C, rngs=rngs)

  def __call__(self, x, y):
    h1 = jnp.tanh(self.l1(x))
    loss1 = fg.local_loss(optax.softmax_cross_entropy_with_integer_labels(self.h1(h1), y))
    h2 = jnp.tanh(self.l2(jax.lax.stop_gradient(h1)))
    loss2 = fg.local_loss(optax.softmax_cross_entropy_with_integer_labels(self.h2(h2), y))
    return loss1 + loss2


def test_local_losses_in_an_nnx_optimizer():
  model = _RenNet(nnx.Rngs(0))
  x, y = _data(_B, _D, _C)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def losses(p):
    return nnx.merge(graphdef, p, rest, copy=True)(x, y)

  true = jax.grad(lambda p: jnp.mean(losses(p)))(params)
  before = jax.tree.map(np.array, params)
  # Per example: 5 + 3 + 5 + 3 activations (each Linear's output, bias included).
  opts = dict(num_tangents=20, perturbation="activity", aggregation="orthogonal")
  tx = optax.chain(fg.forward_gradient(key=jax.random.key(0), **opts), optax.sgd(1.0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.state(model, nnx.Param), value_fn=losses)

  step(model, optimizer)
  moved = jax.tree.map(lambda a, b: a - b, nnx.state(model, nnx.Param), before)
  _assert_tree_close(moved, jax.tree.map(jnp.negative, true), 1e-4)


def test_a_marked_loss_of_the_wrong_shape_is_refused():
  params, x, y, _, _ = _ren_problem()
  # (5, batch): its first axis is not the batch (a (batch, 5) loss is sliced, see below).
  bad = lambda p, x, y: _ren(p, x, y) + jnp.sum(fg.local_loss(jnp.tanh(x @ p["w1"]).T))
  # Refused while the program is read: abstractly, nothing needs compiling.
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="does not fit the total"):
    jax.eval_shape(fg.value_and_forward_grad(bad, perturbation="activity"), key, params, x, y)
  # Per-example marked losses of a scalar total (sum or mean? not known): refused.
  mean_of_marked = lambda p, x, y: jnp.mean(_ren(p, x, y))
  with pytest.raises(ValueError, match="mark scalars"):
    jax.eval_shape(fg.value_and_forward_grad(mean_of_marked), key, params, x, y)


@pytest.mark.parametrize(
  "options",
  [dict(), dict(tangents="rank1"), dict(tangents="input"), dict(regenerate=True)],
  ids=["dense", "rank1", "input", "regenerated"],
)
def test_weight_local_losses_orthogonal_with_k_at_least_n_is_exact(options):
  params, x, y, fun, total = _ren_problem(scalar=True)
  n = sum(np.size(v) for v in jax.tree.leaves(params))
  # (regenerate with k ≥ n takes the stored-tangent path: k = n - 1 keeps it regenerated,
  # the projection then exact up to the one missing direction, so compare loosely.)
  k = n - 1 if options.get("regenerate") else n + 8
  vg = jax.jit(fg.value_and_forward_grad(fun, num_tangents=k, aggregation="orthogonal", **options))
  value, g = vg(jax.random.key(0), params, x, y)
  np.testing.assert_allclose(value, total(params), rtol=1e-6)
  _assert_tree_close(g, jax.grad(total)(params), 0.3 if options.get("regenerate") else 1e-4)


def test_weight_local_losses_with_has_aux_and_the_optax_transform():
  params, x, y, fun, total = _ren_problem(scalar=True)
  n = sum(np.size(v) for v in jax.tree.leaves(params))
  with_aux = lambda q: (fun(q, x, y), {"first": x[0]})
  opts = dict(num_tangents=n + 8, aggregation="orthogonal", has_aux=True)
  tx = optax.chain(fg.forward_gradient(key=jax.random.key(0), **opts), optax.sgd(1.0))
  state = tx.init(params)
  updates, state = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=with_aux))(params, state)
  _assert_tree_close(updates, jax.tree.map(jnp.negative, jax.grad(total)(params)), 1e-4)
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, "aux")["first"], x[0])


# --------------------------------------------------------------------------------------
# Sliced local losses: a loss per (example, patch, group), credited per slice of its site
# --------------------------------------------------------------------------------------

_P, _G, _F = 3, 2, 4  # slices per example: patches x groups, each with F features


def _sliced_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.normal(size=(_D, _P * _G * _F)) / np.sqrt(_D), jnp.float32),
    "a": jnp.asarray(rng.normal(size=(_G, _F, _C)), jnp.float32),
  }


def _sliced(p, x, y, sliced=True):
  """A block z = tanh(x W) shaped (batch, patch, group, F), marked as a site; every
  (patch, group) slice has its own head and CE. ``sliced``: the losses are marked per
  slice (batch, P, G); else their per-example sum is marked (batch,)."""
  z = fg.site(jnp.tanh(x @ p["w"]).reshape(-1, _P, _G, _F))
  logits = jnp.einsum("bpgf,gfc->bpgc", z, p["a"])
  ce = optax.softmax_cross_entropy_with_integer_labels(
    logits, jnp.broadcast_to(y[:, None, None], logits.shape[:-1])
  )
  if sliced:
    return jnp.sum(fg.local_loss(ce), axis=(1, 2))
  return fg.local_loss(jnp.sum(ce, axis=(1, 2)))


def test_sliced_local_losses_are_unbiased_and_lower_error_than_per_example():
  """Each slice's tangent meets only its own loss's d: F dimensions instead of P·G·F."""
  params = _sliced_params()
  x, y = _data(_B, _D, _C)
  total = lambda p: jnp.mean(_sliced(p, x, y))
  true = jax.jit(lambda p: jax.flatten_util.ravel_pytree(jax.grad(total)(p))[0])(params)
  true = np.asarray(true, np.float64)
  num = 40_000
  opts = dict(perturbation="activity")
  per_example = lambda p, x, y: _sliced(p, x, y, sliced=False)
  (mean, se, err), (_, _, err_plain) = _errors(
    [_sliced, per_example], params, (x, y), true, num, **opts
  )
  live = se > 0  # the heads, after the site, have an exact gradient
  z = np.max(np.abs(mean - true)[live] / se[live])
  z_bias = np.max(np.abs(mean - 1.05 * true)[live] / se[live])
  diff = err_plain - err
  z_better = diff.mean() / (diff.std(ddof=1) / np.sqrt(num))
  print(
    f"\nsliced: z={z:.2f} z(5% bias)={z_bias:.2f} mse ratio={err.mean() / err_plain.mean():.3f}"
  )
  assert z < Z
  assert z_bias > Z
  assert z_better > Z


def test_sliced_local_losses_orthogonal_with_k_at_least_a_slice_is_exact():
  """Every slice is projected onto its own k tangents: k ≥ F (not P·G·F) is exact."""
  params = _sliced_params()
  x, y = _data(_B, _D, _C)
  total = lambda p: jnp.mean(_sliced(p, x, y))
  vg = fg.value_and_forward_grad(
    _sliced, num_tangents=_F + 2, perturbation="activity", aggregation="orthogonal"
  )
  # One compiled program for the estimate and the reference.
  (value, g), (true_value, true) = jax.jit(
    lambda key, p: (vg(key, p, x, y), jax.value_and_grad(total)(p))
  )(jax.random.key(0), params)
  np.testing.assert_allclose(value, true_value, rtol=1e-6)
  _assert_tree_close(g, true, 1e-4)


def test_rescale_leaves_the_exact_tail_after_the_last_site_alone():
  """The heads after the site get jax.grad's gradient whether or not rescale is on."""
  params = _sliced_params()
  x, y = _data(_B, _D, _C)
  total = lambda p: jnp.mean(_sliced(p, x, y))

  @jax.jit  # one compiled program (eagerly every op compiles on its own)
  def heads(key, p):
    estimates = [
      fg.value_and_forward_grad(_sliced, perturbation="activity", rescale=rescale)(key, p, x, y)
      for rescale in (False, True)
    ]
    return [g["a"] for _, g in estimates], jax.grad(total)(p)["a"]

  estimates, true = heads(jax.random.key(1), params)
  for g in estimates:
    np.testing.assert_allclose(g, true, rtol=1e-5, atol=1e-7)
