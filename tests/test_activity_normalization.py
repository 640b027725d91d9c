"""Activity perturbation through normalization layers, with no ``fg.site`` marker (issue 24.3).

A normalization's statistics branch off the activation it normalizes and meet it again at
the scale multiply; a site extends over the whole normalization (its scale and bias
included), so its parameters get their estimate from the same block. With per-example
losses and the orthogonal aggregation, k ≥ the activity dimension per example spans every
direction: the estimate is the true gradient to float32 rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fwdgrad_jax as fg
from fwdgrad_jax.models.layers import CONV_INIT

NORMS = {
  "layer_norm": lambda n, rngs: nnx.LayerNorm(n, rngs=rngs),
  "batch_norm": lambda n, rngs: nnx.BatchNorm(n, rngs=rngs),
  "rms_norm": lambda n, rngs: nnx.RMSNorm(n, rngs=rngs),
  "group_norm": lambda n, rngs: nnx.GroupNorm(n, num_groups=4, rngs=rngs),
}


class MLP(nnx.Module):
  def __init__(self, norm, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.norm = NORMS[norm](16, rngs)
    self.l2 = nnx.Linear(16, 16, rngs=rngs)
    self.norm2 = NORMS[norm](16, rngs)
    self.l3 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.norm(self.l1(x)))
    return self.l3(jax.nn.relu(self.norm2(self.l2(h))))


class CNN(nnx.Module):
  def __init__(self, rngs):
    # CONV_INIT: flax's initialiser drawn 2-D (a 4-D draw takes seconds to compile).
    self.conv = nnx.Conv(1, 8, (3, 3), kernel_init=CONV_INIT, rngs=rngs)
    self.norm = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.norm(self.conv(x)))
    return self.head(jnp.mean(h, axis=(1, 2)))


def _losses(graphdef, rest, x, y, per_example=True):
  def losses(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    out = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
    # The forward pass's new state (BatchNorm's running averages) as aux, as a train step
    # returns it: read off the loss path, it must not break the blocks.
    return out if per_example else jnp.mean(out), nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))

  return losses


def _exact(model, x, y, k, per_example=True):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  losses = _losses(graphdef, rest, x, y, per_example)
  vg = fg.value_and_forward_grad(
    losses, num_tangents=k, perturbation="activity", aggregation="orthogonal", has_aux=True
  )
  # One compiled program for the estimate and the reference (eagerly every op compiles).
  ((loss, new_rest), g), true = jax.jit(
    lambda key, p: (vg(key, p), jax.grad(lambda q: jnp.mean(losses(q)[0]))(p))
  )(jax.random.key(1), params)
  return g, true, loss, new_rest, rest


def _assert_equal(g, true, what):
  for (path, a), b in zip(jax.tree.leaves_with_path(g), jax.tree.leaves(true)):
    assert np.allclose(a, b, rtol=1e-3, atol=1e-5), (what, jax.tree_util.keystr(path))


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_mlp_with_normalization_needs_no_site_and_orthogonal_is_exact(norm):
  x = jax.random.normal(jax.random.key(0), (8, 8))
  y = jnp.arange(8) % 4
  # Activity dimension: 16 + 16 + 4 per example (each normalization inside its layer's
  # site); k = 2× that keeps the Gram matrix well conditioned in float32. BatchNorm in
  # train mode couples the examples of a batch (per-example directional derivatives would
  # miss the cross terms): a scalar loss, and k = 2× the whole batch's dimension.
  per_example = norm != "batch_norm"
  k = 2 * 36 * (1 if per_example else 8)
  g, true, loss, new_rest, rest = _exact(MLP(norm, nnx.Rngs(0)), x, y, k, per_example)
  _assert_equal(g, true, norm)
  assert jnp.isfinite(loss)
  if norm == "batch_norm":  # train mode: batch statistics, running averages moved
    assert not np.allclose(new_rest["norm"]["mean"], rest["norm"]["mean"])


def test_cnn_with_group_norm_needs_no_site_and_orthogonal_is_exact():
  x = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
  y = jnp.arange(4) % 4
  # Activity dimension per example: 4·4·8 (conv + GroupNorm) + 4 (head) = 132.
  g, true, *_ = _exact(CNN(nnx.Rngs(0)), x, y, k=264)
  _assert_equal(g, true, "cnn")


def _skip_losses(p, x, *, around_linear, activation=False, mark=False):
  h = x @ p["w"]
  h = jnp.tanh(h) if activation else h
  h = fg.site(h) if mark else h
  # As flax's LayerNorm computes it: the scale multiplies rsqrt(var) first.
  mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  z = (h - mean) * (jax.lax.rsqrt(var + 1e-6) * p["s"]) + p["b"]
  if around_linear:  # a pre-norm residual block: normalization, linear, skip
    z = fg.site(z) if mark else z
    r = z @ p["u"] + h
  else:  # a skip around the normalization alone
    r = z + h
  return jnp.sum((r @ p["v"]) ** 2, -1)


def _skip_params():
  k = jax.random.split(jax.random.key(0), 4)
  p = {
    "w": jax.random.normal(k[0], (8, 16)) / 3,
    "s": jnp.ones(16),
    "b": jnp.zeros(16),
    "u": jax.random.normal(k[1], (16, 16)) / 4,
    "v": jax.random.normal(k[2], (16, 4)) / 4,
  }
  return p, jax.random.normal(k[3], (8, 8))


@pytest.mark.parametrize("around_linear", [False, True], ids=["norm", "norm_and_linear"])
def test_a_skip_around_a_normalization_needs_no_site(around_linear):
  # The skip reads the linear op's output (a site): around the normalization alone the
  # site extends to the residual sum; around a linear layer too, the normalization's end
  # is a site of its own.
  p, x = _skip_params()
  fun = lambda q: _skip_losses(q, x, around_linear=around_linear)
  # Per example: 16 (+ 16 + 16 around a linear layer) + 4.
  vg = fg.value_and_forward_grad(
    fun, num_tangents=104, perturbation="activity", aggregation="orthogonal"
  )
  # One compiled program for the estimate and the reference.
  (_, g), true = jax.jit(lambda key, q: (vg(key, q), jax.grad(lambda q: jnp.mean(fun(q)))(q)))(
    jax.random.key(1), p
  )
  _assert_equal(g, true, around_linear)


def test_a_skip_from_an_activation_needs_sites_and_the_error_says_which():
  # The skip reads tanh(x @ w), inside the normalization's region and not a site: no block
  # can hold both paths. The error names the cause and the fix in one line.
  p, x = _skip_params()
  vg = lambda mark: fg.value_and_forward_grad(
    lambda q: _skip_losses(q, x, around_linear=True, activation=True, mark=mark),
    num_tangents=104,
    perturbation="activity",
    aggregation="orthogonal",
  )
  with pytest.raises(ValueError, match=r"skip .*fwdgrad_jax\.site\(\.\.\.\)") as err:
    jax.eval_shape(vg(False), jax.random.key(1), p)  # refused while reading the program
  assert "\n" not in str(err.value)
  fun = lambda q: jnp.mean(_skip_losses(q, x, around_linear=True, activation=True))
  # Marked: exact (16 + 16 + 4 per example); one compiled program with the reference.
  (_, g), true = jax.jit(lambda key, q: (vg(True)(key, q), jax.grad(fun)(q)))(jax.random.key(1), p)
  _assert_equal(g, true, "marked")
