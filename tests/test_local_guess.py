"""Local-loss guesses as activity tangents (``tangents="local_guess"``; Fournier et al. 2023).

The model: two blocks, each with a site (its output) and a head with a marked per-example
loss; the total is their sum. Without a stop-gradient between the blocks (the "global"
model) the second loss reaches the first site through the second block, which the first
site's guess (its own head's gradient) misses: the guess is biased there. With a
stop-gradient the guess is each site's whole gradient.

The closed forms are per example at the activity sites (n activations, S = 2 guesses ĝ,
r random Gaussian tangents, P_G the projection onto the guesses): the guess alone gives
P_G ∇ (deterministic); the orthogonal projection onto span{guesses, random} has
expectation P_G ∇ + r/(n − S)·(I − P_G) ∇ and is exact when S + r ≥ n. The parameters'
estimate is the blocks' local VJP of the activity estimate (the heads' gradients are exact),
so the closed forms map to the parameters by the same VJP. Statistical checks: the mean of
N draws against the closed form at Z standard errors (per coordinate, the sample standard
deviation), and the same statistic shown to flag the bias against the true gradient.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import app_here  # noqa: F401  (the fixture: the Hydra app in this process)

import fwdgrad_jax as fg
from fwdgrad_jax import schemes
from fwdgrad_jax.training import config as config_lib

Z = 5.0
BLOCKS = ("w1", "b1", "w2", "b2")  # the heads' gradients are exact in every scheme
GUESS = dict(tangents="local_guess", perturbation="activity")


def _ce(logits, y):
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]


def _blocks(p, x, z1=None):
  """The two sites' values (the second from a given z1, for its local VJP)."""
  if z1 is None:
    return jnp.tanh(x @ p["w1"] + p["b1"])
  return jnp.tanh(z1 @ p["w2"] + p["b2"])


def _losses(p, x, y, stop=False, e1=0.0, e2=0.0):
  """Per-example total of the two marked local losses; e1, e2 perturb the sites."""
  z1 = fg.site(_blocks(p, x) + e1)
  l1 = fg.local_loss(_ce(z1 @ p["h1"], y))
  z2 = fg.site(_blocks(p, x, jax.lax.stop_gradient(z1) if stop else z1) + e2)
  l2 = fg.local_loss(_ce(z2 @ p["h2"], y))
  return l1 + l2


def _stopped(p, x, y):
  return _losses(p, x, y, stop=True)


def _setup(widths=(5, 4), batch=7, seed=0):
  rng = np.random.default_rng(seed)
  a, b = widths
  shapes = dict(w1=(6, a), b1=(a,), w2=(a, b), b2=(b,), h1=(a, 3), h2=(b, 3))
  p = {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32) for k, s in shapes.items()}
  x = jnp.asarray(rng.normal(size=(batch, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, batch), jnp.int32)
  return p, x, y


# The references are jitted (static ``stop``): eagerly every op of them compiles on its own.
@functools.partial(jax.jit, static_argnums=3)
def _true(p, x, y, stop=False):
  return jax.grad(lambda q: jnp.mean(_losses(q, x, y, stop)))(p)


@functools.partial(jax.jit, static_argnums=3)
def _site_gradients_and_guesses(p, x, y, stop):
  z1 = _blocks(p, x)
  z2 = _blocks(p, x, z1)
  e = (jnp.zeros_like(z1), jnp.zeros_like(z2))
  grads = jax.grad(lambda e1, e2: jnp.sum(_losses(p, x, y, stop, e1, e2)), argnums=(0, 1))(*e)
  g1 = jax.grad(lambda z: jnp.sum(_ce(z @ p["h1"], y)))(z1)
  g2 = jax.grad(lambda z: jnp.sum(_ce(z @ p["h2"], y)))(z2)
  unit = [g / jnp.linalg.norm(g, axis=1, keepdims=True) for g in (g1, g2)]
  return grads, unit


def _activity_parts(p, x, y, stop=False):
  """Per example: the sites' gradients (∇1, ∇2) and the unit guesses (ĝ1, ĝ2)."""
  grads, unit = _site_gradients_and_guesses(p, x, y, stop)
  return [np.asarray(g, np.float64) for g in grads], [np.asarray(u, np.float64) for u in unit]


@jax.jit
def _blocks_vjp(p, x, e1, e2):
  """The blocks' parameters' VJP of the sites' cotangents e1, e2 (the second block at z1)."""
  z1 = _blocks(p, x)
  _, vjp1 = jax.vjp(lambda w1, b1: _blocks({**p, "w1": w1, "b1": b1}, x), p["w1"], p["b1"])
  _, vjp2 = jax.vjp(lambda w2, b2: _blocks({**p, "w2": w2, "b2": b2}, x, z1), p["w2"], p["b2"])
  return vjp1(e1) + vjp2(e2)


def _expected(p, x, y, c, stop=False):
  """The parameters' estimate of P_G ∇ + c·(I − P_G) ∇ at the sites (c = 1: the true gradient)."""
  grads, unit = _activity_parts(p, x, y, stop)
  est = []
  for g, u in zip(grads, unit):
    proj = np.sum(g * u, axis=1, keepdims=True) * u
    est.append(proj + c * (g - proj))
  batch = x.shape[0]
  w1, b1, w2, b2 = _blocks_vjp(p, x, *(jnp.asarray(e / batch, jnp.float32) for e in est))
  heads = _true(p, x, y, stop)
  return dict(w1=w1, b1=b1, w2=w2, b2=b2, h1=heads["h1"], h2=heads["h2"])


def _flat(tree, names=None):
  names = sorted(tree) if names is None else names
  return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in names])


def _draws(vg, p, x, y, n, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  grads = jax.jit(jax.vmap(lambda k: vg(k, p, x, y)[1]))(keys)
  return _flat_batch(grads)


def _flat_batch(grads, names=None):
  """(N, n) rows of a batch of gradients (leading axis N), in :func:`_flat`'s order."""
  names = sorted(grads) if names is None else names
  return np.concatenate(
    [np.asarray(grads[k], np.float64).reshape(len(grads[k]), -1) for k in names], 1
  )


def _z(samples, target):
  """Per coordinate |mean − target| / standard error (coordinates with spread only)."""
  mean = samples.mean(0)
  se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
  ok = se > 1e-7 * (np.abs(target).max() + 1e-12)
  return np.abs(mean - target)[ok] / se[ok]


# --------------------------------------------------------------------------------------
# Names: parse, config, errors
# --------------------------------------------------------------------------------------


def test_parse_and_config_name_local_guess():
  assert schemes.parse("local_guess", perturbation="activity") == schemes.LocalGuess()
  assert schemes.parse(schemes.LocalGuess("rademacher")) == schemes.LocalGuess("rademacher")
  with pytest.raises(ValueError, match="tangents='local_guess' needs perturbation='activity'"):
    schemes.parse("local_guess")
  with pytest.raises(ValueError, match="distribution='rank1'"):
    schemes.LocalGuess("rank1")
  with pytest.raises(ValueError, match="regenerate=True"):
    schemes.parse("local_guess", perturbation="activity", regenerate=True)
  cfg = config_lib.Config()
  cfg.estimator = config_lib.EstimatorConfig(
    tangents="local_guess", perturbation="activity", aggregation="orthogonal", num_tangents=5
  )
  assert config_lib.validate(cfg) is cfg
  cfg.estimator.perturbation = "weights"
  with pytest.raises(config_lib.ConfigError, match=r"^estimator.tangents='local_guess'"):
    config_lib.validate(cfg)


def test_without_local_loss_markers_the_guess_is_refused():
  p, x, y = _setup()

  def unmarked(q, x, y):
    z1 = fg.site(_blocks(q, x))
    return _ce(z1 @ q["h1"], y)

  vg = fg.value_and_forward_grad(unmarked, **GUESS)
  with pytest.raises(ValueError, match="no activity site reaches a fwdgrad_jax.local_loss"):
    vg(jax.random.key(0), p, x, y)


# --------------------------------------------------------------------------------------
# (a) The guess alone: deterministic, biased for the global loss, the local gradient
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["orthogonal", "sum"])
def test_guess_alone_is_the_projection_on_the_local_gradient_and_biased(aggregation):
  p, x, y = _setup()
  vg = jax.jit(fg.value_and_forward_grad(_losses, aggregation=aggregation, **GUESS))
  value, g = vg(jax.random.key(0), p, x, y)
  _, g_other_key = vg(jax.random.key(1), p, x, y)
  np.testing.assert_allclose(value, jnp.mean(_losses(p, x, y)), rtol=1e-6)
  np.testing.assert_array_equal(_flat(g), _flat(g_other_key))  # no randomness
  want = _expected(p, x, y, c=0.0)  # per example and site (ĝ·∇) ĝ
  np.testing.assert_allclose(_flat(g), _flat(want), rtol=1e-4, atol=1e-6)
  true = _true(p, x, y)
  # The first site's guess misses the second loss's path: off by far more than rounding.
  first = _flat(g, ["w1", "b1"]) - _flat(true, ["w1", "b1"])
  assert np.linalg.norm(first) > 0.05 * np.linalg.norm(_flat(true, ["w1", "b1"]))
  # The second site's own head is all that reaches it: its guess is its gradient.
  np.testing.assert_allclose(_flat(g, ["w2", "b2"]), _flat(true, ["w2", "b2"]), atol=1e-5)


def test_guess_alone_under_a_stop_gradient_is_the_local_gradient_exactly():
  """Ren et al.'s local greedy losses: each site's own losses are all it reaches (LG-BP)."""
  p, x, y = _setup()
  vg = jax.jit(fg.value_and_forward_grad(_stopped, aggregation="orthogonal", **GUESS))
  _, g = vg(jax.random.key(0), p, x, y)
  np.testing.assert_allclose(_flat(g), _flat(_true(p, x, y, stop=True)), atol=1e-5)


# --------------------------------------------------------------------------------------
# (b) The guess and r random tangents under the orthogonal projection
# --------------------------------------------------------------------------------------


def test_guess_and_random_tangents_spanning_the_activities_are_exact():
  """S + r ≥ n per example (2 + 7 ≥ 5 + 4): the projection is the gradient."""
  p, x, y = _setup()
  vg = jax.jit(
    fg.value_and_forward_grad(_losses, num_tangents=8, aggregation="orthogonal", **GUESS)
  )
  _, g = vg(jax.random.key(3), p, x, y)
  np.testing.assert_allclose(_flat(g), _flat(_true(p, x, y)), atol=1e-5)


def test_guess_and_random_tangents_have_the_closed_form_expectation_and_are_biased():
  """E = P_G ∇ + r/(n − S)·(I − P_G) ∇, and that is not a multiple of ∇."""
  p, x, y = _setup()
  r, n, s = 2, 9, 2
  vg = fg.value_and_forward_grad(_losses, num_tangents=r + 1, aggregation="orthogonal", **GUESS)
  samples = _draws(vg, p, x, y, 4000)
  want = _flat(_expected(p, x, y, c=r / (n - s)))
  assert np.max(_z(samples, want)) < Z
  # The bias is detectable: the mean is no multiple of the true gradient (the best one
  # by least squares), at Z standard errors.
  true = _flat(_true(p, x, y))
  alpha = samples.mean(0) @ true / (true @ true)
  assert np.max(_z(samples, alpha * true)) > Z
  # The same statistic accepts the unbiased case: random tangents alone project to k/n ∇
  # in expectation (the heads exact).
  k = 3
  plain = fg.value_and_forward_grad(
    _losses, num_tangents=k, aggregation="orthogonal", perturbation="activity"
  )
  true_tree = _true(p, x, y)
  scaled = {b: (k / n if b in BLOCKS else 1.0) * v for b, v in true_tree.items()}
  assert np.max(_z(_draws(plain, p, x, y, 4000, seed=1), _flat(scaled))) < Z


def test_the_guess_raises_the_cosine_over_as_many_random_tangents():
  """Guess + 4 random (6 tangents in the jvp) against 6 random, orthogonal, same model."""
  p, x, y = _setup(widths=(16, 12), batch=8, seed=2)
  true = _flat(_true(p, x, y), BLOCKS)
  n_draws = 64

  def cosines(vg, seed):
    keys = jax.random.split(jax.random.key(seed), n_draws)
    grads = jax.jit(jax.vmap(lambda k: vg(k, p, x, y)[1]))(keys)
    flat = _flat_batch(grads, BLOCKS)
    return flat @ true / (np.linalg.norm(flat, axis=1) * np.linalg.norm(true))

  guess = cosines(
    fg.value_and_forward_grad(_losses, num_tangents=5, aggregation="orthogonal", **GUESS), 0
  )
  plain = cosines(
    fg.value_and_forward_grad(
      _losses, num_tangents=6, aggregation="orthogonal", perturbation="activity"
    ),
    1,
  )
  diff = guess.mean() - plain.mean()
  se = np.sqrt(guess.var(ddof=1) / n_draws + plain.var(ddof=1) / n_draws)
  assert diff > Z * se, (guess.mean(), plain.mean(), se)


# --------------------------------------------------------------------------------------
# The optax transform and the app
# --------------------------------------------------------------------------------------


def test_local_guess_in_the_optax_transform():
  # Jitted. The transform's eager path (the activity interpreter on concrete values, local
  # losses marked, data closed over) is test_local_loss.py's jit=False cases: the guesses
  # are ops of the same interpreter, with no branch on concrete values.
  p, x, y = _setup()
  tx = optax.chain(
    fg.forward_gradient(key=jax.random.key(0), num_tangents=8, aggregation="orthogonal", **GUESS),
    optax.sgd(1.0),
  )
  state = tx.init(p)

  def update(p, state):
    return tx.update(p, state, p, value_fn=lambda q: _losses(q, x, y))

  updates, state = jax.jit(update)(p, state)
  np.testing.assert_allclose(_flat(updates), -_flat(_true(p, x, y)), atol=1e-5)
  assert np.isfinite(float(state[0].value))


@pytest.mark.slow
def test_the_hydra_app_trains_the_local_mixer_with_local_guesses(tiny_data, tmp_path, request):
  """``python experiments/train.py -m model=local_mixer estimator=forward
  estimator.perturbation=activity estimator.tangents=local_guess train.steps=20
  model.options.stop_gradient=true,false``, tiny: both jobs in one run of the app (in
  this process, as test_train.py's app tests: no second start of jax and the app)."""
  data_dir, _ = tiny_data
  sweep = tmp_path / "sweep"
  overrides = [
    "-m",
    "model=local_mixer",
    "estimator=forward",
    "estimator.perturbation=activity",
    "estimator.tangents=local_guess",
    "train.steps=20",
    "model.options.stop_gradient=true,false",
    "model.options.channels=8",
    "model.options.hidden=16",
    "model.options.groups=2",
    "data=fashion_mnist",
    f"data.data_dir={data_dir}",
    "data.val_size=64",
    "train.batch_size=16",
    "train.log_every=10",
    "train.eval_every=20",
    "train.progress=false",
    f"hydra.sweep.dir={sweep}",
  ]
  out = request.getfixturevalue("app_here")(*overrides, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  for job, stop_gradient in enumerate((True, False)):
    run_dir = sweep / str(job)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["options"]["stop_gradient"] is stop_gradient
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["error"] is None and not summary["diverged"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [10, 20]
    assert all(np.isfinite(r["train_loss"]) for r in records if "train_loss" in r)
