"""Tests for fwdgrad_jax.models: registry, architectures and the pure-function boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from fwdgrad_jax import models
from fwdgrad_jax.models import (
  MODELS,
  apply_fn,
  apply_with_state_fn,
  count_params,
  create,
  split,
)

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)


def _make(name, input_shape=MNIST, seed=0, **kw):
  return create(name, input_shape=input_shape, num_classes=10, rngs=nnx.Rngs(seed), **kw)


def _images(shape, batch=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, *shape), jnp.float32)


def _leaf_names(state):
  # Variable leaves end in a `.value` attribute key in flax 0.12; drop it so names read
  # like module paths ("bn/mean").
  names = []
  for path, _ in jax.tree_util.tree_leaves_with_path(state):
    parts = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if parts and parts[-1] == "value":
      parts.pop()
    names.append("/".join(parts))
  return names


# -- registry -------------------------------------------------------------------------


def test_unknown_model_name_lists_known():
  with pytest.raises(ValueError, match="no_such_net") as e:
    _make("no_such_net")
  assert "mlp" in str(e.value) and "cnn" in str(e.value)


def test_unknown_kwarg_is_named():
  with pytest.raises(TypeError, match="widht") as e:
    _make("deep_mlp", depth=2, widht=8)
  # The message also lists what the model does accept, to make typos obvious.
  assert "width" in str(e.value) and "depth" in str(e.value)


def test_bad_input_shape():
  with pytest.raises(ValueError, match="input_shape"):
    create("mlp", input_shape=(784,), num_classes=10, rngs=nnx.Rngs(0))


def test_unknown_activation():
  with pytest.raises(ValueError, match="swishy"):
    _make("mlp", hidden=(8,), activation="swishy")


def test_register_new_model_and_duplicate_name():
  @models.register("_test_tiny")
  class Tiny(nnx.Module):
    def __init__(self, *, input_shape, num_classes, rngs, k=3):
      self.lin = nnx.Linear(int(np.prod(input_shape)), num_classes, rngs=rngs)

    def __call__(self, x):
      return self.lin(x.reshape(x.shape[0], -1))

  try:
    m = create("_test_tiny", input_shape=(2, 2, 1), num_classes=3, rngs=nnx.Rngs(0), k=1)
    assert m(jnp.ones((5, 2, 2, 1))).shape == (5, 3)
    with pytest.raises(ValueError, match="already registered"):
      models.register("_test_tiny")(type("Other", (Tiny,), {}))
    with pytest.raises(TypeError, match="num_classes"):
      models.register("_test_bad")(
        type("Bad", (nnx.Module,), {"__init__": lambda self, *, rngs: None})
      )
  finally:
    MODELS.pop("_test_tiny", None)
    MODELS.pop("_test_bad", None)


# -- architectures --------------------------------------------------------------------
# Default-size models (up to 10.6M params for vgg) are checked abstractly with
# nnx.eval_shape: that traces the full init and forward pass, so any shape bug surfaces,
# but skips drawing millions of random numbers, which alone takes ~10 s on 2 CPU cores.
# Numerical checks run on shrunken configs of the same classes, with repeated layer
# shapes because each distinct shape costs one more XLA compile of the initialiser: the
# MLPs here are 16 wide (kernels 784x16, 16x16, 16x10 for the whole file).

_SMALL = {
  "logreg": {},
  "mlp": {"hidden": (16, 16)},
  "cnn": {"channels": 8, "hidden": 16},
  "vgg": {"channels": (8, 8, 8), "hidden": 16},
  "deep_mlp": {"depth": 2, "width": 16},
  "yao_cnn": {"channels": (4, 4, 4), "hidden": 16},
  "local_mixer": {"patches": 2, "channels": 8, "hidden": 8, "groups": 2, "blocks": 1},
}


def _abstract(name, input_shape=MNIST, **kw):
  return nnx.eval_shape(lambda: _make(name, input_shape, **kw))


def _abstract_logits(model, input_shape, batch=2):
  graphdef, params, rest = split(model)
  x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  # rest as an argument: stateful models (BatchNorm) write it, which abstract values
  # closed over cannot take.
  return jax.eval_shape(lambda p, r, x: apply_with_state_fn(graphdef)(p, r, x)[0], params, rest, x)


# Every registered model, whoever registered it: a new model without a small config here
# fails below instead of going untested.
_REGISTERED = sorted(name for name in MODELS if not name.startswith("_"))


@pytest.mark.parametrize("name", _REGISTERED)
def test_output_shape_mnist_default_config(name):
  out = _abstract_logits(_abstract(name), MNIST)
  assert out.shape == (2, 10)
  assert out.dtype == jnp.float32


# ResNet18 and the ViT compute concretely throughout test_models_flugel.py (on 28x28
# Fashion-MNIST in its app runs too), in the narrow configs whose compiles it shares.
_CONCRETE_ELSEWHERE = ("resnet18", "vit")


@pytest.mark.parametrize("name", [n for n in _REGISTERED if n not in _CONCRETE_ELSEWHERE])
def test_output_small_config_concrete(name):
  logits = _make(name, **_SMALL[name])(_images(MNIST))
  assert logits.shape == (2, 10)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_vgg_cifar_structure_and_output_shape():
  m = _abstract("vgg", CIFAR)
  assert _abstract_logits(m, CIFAR).shape == (2, 10)
  # 32 -> 16 -> 8 -> 4 after three pools: 4*4*256 features feed a 4096-wide dense layer.
  assert m.fc1.kernel.shape == (4096, 4096)
  assert m.fc2.kernel.shape == (4096, 10)
  assert [c.kernel.shape[-1] for c in m.convs] == [64, 64, 128, 128, 256, 256]
  assert all(c.kernel.shape[:2] == (3, 3) for c in m.convs)
  small = _make("vgg", CIFAR, **_SMALL["vgg"])
  assert small(_images(CIFAR)).shape == (2, 10)


def test_mlp_default_param_count():
  m = _abstract("mlp")
  _, params, _ = split(m)
  expected = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
  assert expected == 1_863_690
  assert count_params(params) == expected
  assert [lin.kernel.shape for lin in m.hidden] == [(784, 1024), (1024, 1024)]


def test_mlp_options():
  m = _make("mlp", hidden=(16, 16, 16), activation="tanh", use_bias=False)
  _, params, _ = split(m)
  assert count_params(params) == 784 * 16 + 2 * 16 * 16 + 16 * 10
  assert not any("bias" in n for n in _leaf_names(params))
  assert m(_images(MNIST)).shape == (2, 10)
  # Same seed, same weights: only the activation differs, so outputs must differ.
  r = _make("mlp", hidden=(16, 16, 16), activation="relu", use_bias=False)
  x = _images(MNIST)
  assert not np.allclose(m(x), r(x))


def test_logreg_param_count():
  _, params, _ = split(_make("logreg"))
  assert count_params(params) == 784 * 10 + 10


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_deep_mlp_depth_and_no_bias(depth):
  m = _make("deep_mlp", depth=depth, width=16)
  _, params, _ = split(m)
  names = _leaf_names(params)
  assert not any("bias" in n for n in names)
  # depth counts hidden layers; the classifier head is one more weight matrix.
  assert len(names) == depth + 1
  assert len(m.hidden) == depth
  hidden = 784 * 16 + (depth - 1) * 16 * 16 if depth else 0
  assert count_params(params) == hidden + (16 if depth else 784) * 10
  assert m(_images(MNIST)).shape == (2, 10)


def test_deep_mlp_default_width_is_1024():
  m = _abstract("deep_mlp", depth=3)
  assert [lin.kernel.shape for lin in m.hidden] == [(784, 1024), (1024, 1024), (1024, 1024)]
  assert m.head.kernel.shape == (1024, 10)
  _, params, _ = split(m)
  assert count_params(params) == 784 * 1024 + 2 * 1024 * 1024 + 1024 * 10


def test_deep_mlp_rejects_negative_depth():
  with pytest.raises(ValueError, match="depth"):
    _make("deep_mlp", depth=-1)


def test_cnn_structure():
  m = _abstract("cnn")
  assert len(m.convs) == 4
  assert [c.kernel.shape for c in m.convs] == [(3, 3, 1, 64)] + [(3, 3, 64, 64)] * 3
  # Two 2x2 pools: 28 -> 14 -> 7, so 7*7*64 features enter the 1024-wide layer.
  assert m.fc1.kernel.shape == (7 * 7 * 64, 1024)
  assert m.fc2.kernel.shape == (1024, 10)
  assert _abstract_logits(m, MNIST).shape == (2, 10)


def test_cnn_same_padding_keeps_spatial_size():
  m = _make("cnn", **_SMALL["cnn"])
  assert m.convs[0](_images(MNIST)).shape == (2, 28, 28, 8)


# -- pure-function boundary -----------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_split_apply_round_trip_and_jit(name):
  m = _make(name, **_SMALL[name])
  x = _images(MNIST)
  expected = m(x)
  graphdef, params, rest = split(m)
  f = apply_fn(graphdef, rest)
  np.testing.assert_allclose(f(params, x), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(f)(params, x), expected, rtol=1e-4, atol=1e-4)


def test_params_only_params_and_floating():
  m = _make("cnn", **_SMALL["cnn"])
  _, params, rest = split(m)
  leaves = jax.tree.leaves(params)
  assert leaves and all(jnp.issubdtype(l.dtype, jnp.floating) for l in leaves)
  assert jax.tree.leaves(rest) == []


def test_grad_has_params_structure():
  m = _make("mlp", hidden=(16,))
  graphdef, params, rest = split(m)
  f = apply_fn(graphdef, rest)
  x, y = _images(MNIST, batch=4), jnp.array([0, 1, 2, 3])

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(f(p, x), y).mean()

  g = jax.jit(jax.grad(loss))(params)
  assert jax.tree.structure(g) == jax.tree.structure(params)
  for gl, pl in zip(jax.tree.leaves(g), jax.tree.leaves(params)):
    assert gl.shape == pl.shape and gl.dtype == pl.dtype
  assert any(float(jnp.abs(l).max()) > 0 for l in jax.tree.leaves(g))


def test_jvp_matches_grad_direction():
  """Forward-mode directional derivative equals <grad, v> (the forward-gradient identity)."""
  graphdef, params, rest = split(_make("mlp", hidden=(16,)))
  f = apply_fn(graphdef, rest)
  x, y = _images(MNIST, batch=3), jnp.array([1, 2, 3])

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(f(p, x), y).mean()

  flat, unravel = ravel_pytree(params)
  v_flat = jax.random.normal(jax.random.key(7), flat.shape)  # one draw: one compile
  v = unravel(v_flat)
  _, dd = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(params, v)
  g = jax.jit(jax.grad(loss))(params)
  inner = jnp.vdot(ravel_pytree(g)[0], v_flat)
  np.testing.assert_allclose(dd, inner, rtol=1e-4)


def test_count_params_is_the_length_of_the_flat_vector():
  _, params, _ = split(_make("cnn", **_SMALL["cnn"]))
  assert count_params(params) == ravel_pytree(params)[0].size
  assert count_params({"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5), jnp.zeros(())]}) == 18


# -- the MLP with BatchNorm and Dropout (the app's stateful reference model) -------------


def _stateful_mlp(seed=0, dropout=0.5):
  return _make("mlp", seed=seed, hidden=(16, 16), batch_norm=True, dropout=dropout)


def test_stateful_mlp_keeps_statistics_and_rng_out_of_params():
  graphdef, params, rest = split(_stateful_mlp())
  plain = split(_make("mlp", hidden=(16, 16)))[1]
  # BatchNorm adds its scale and bias (2 x 16 per layer) to the parameters, nothing else.
  assert count_params(params) == count_params(plain) + 2 * 2 * 16
  names = _leaf_names(rest)
  assert sum(n.endswith("mean") for n in names) == 2 and any("count" in n for n in names)
  assert _leaf_names(split(_make("mlp", hidden=(16,)))[2]) == []  # off by default


def test_train_mode_threads_state_and_draws_fresh_masks():
  graphdef, params, rest = split(_stateful_mlp())
  f = jax.jit(apply_with_state_fn(graphdef))
  x = _images(MNIST, batch=8)
  a, rest1 = f(params, rest, x)
  b, rest2 = f(params, rest1, x)
  again, _ = f(params, rest1, x)
  assert not np.allclose(a, b)  # a new dropout mask with the threaded state...
  np.testing.assert_array_equal(b, again)  # ...and a deterministic one given the state
  means = [l for n, l in zip(_leaf_names(rest2), jax.tree.leaves(rest2)) if n.endswith("mean")]
  assert all(float(jnp.abs(m).max()) > 0 for m in means)


def test_eval_graphdef_uses_running_averages_and_no_dropout():
  graphdef, params, rest = split(_stateful_mlp(dropout=0.5))
  x = _images(MNIST, batch=8)
  _, trained = apply_with_state_fn(graphdef)(params, rest, x)
  evaluate = apply_with_state_fn(models.eval_graphdef(graphdef, params, rest))
  first, unchanged = evaluate(params, trained, x)
  np.testing.assert_array_equal(first, evaluate(params, unchanged, x)[0])
  # Running averages, not batch statistics: one example alone gets the same logits.
  np.testing.assert_allclose(evaluate(params, trained, x[:1])[0], first[:1], rtol=1e-5, atol=1e-6)
  # No dropout: the output does not depend on the dropout RNG state (train mode does).
  bumped = jax.tree_util.tree_map_with_path(
    lambda p, v: v + 5 if "count" in jax.tree_util.keystr(p) else v, trained
  )
  np.testing.assert_array_equal(evaluate(params, bumped, x)[0], first)
  train_apply = apply_with_state_fn(graphdef)
  assert not np.allclose(train_apply(params, bumped, x)[0], train_apply(params, trained, x)[0])


def test_dropout_rate_is_checked():
  with pytest.raises(ValueError, match="dropout"):
    _make("mlp", hidden=(8,), dropout=1.0)


# -- stateful models (BatchNorm / Dropout) ----------------------------------------------


class _BNDropNet(nnx.Module):
  """Test-only model with BatchNorm running stats and a Dropout RNG counter."""

  def __init__(self, rngs):
    self.lin1 = nnx.Linear(12, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.lin2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return self.lin2(self.drop(jax.nn.relu(self.bn(self.lin1(x)))))


def _bn_setup():
  m = _BNDropNet(nnx.Rngs(params=0, dropout=1))
  graphdef, params, rest = split(m)
  x = _images((2, 2, 3), batch=6)
  return m, graphdef, params, rest, x


def _rest_values(rest):
  return {n: l for n, l in zip(_leaf_names(rest), jax.tree.leaves(rest))}


def _is_concrete(tree):
  return all(
    isinstance(l, jax.Array) and not isinstance(l, jax.core.Tracer) for l in jax.tree.leaves(tree)
  )


def test_stateful_split_keeps_rng_and_stats_out_of_params():
  _, _, params, rest, _ = _bn_setup()
  assert all(jnp.issubdtype(l.dtype, jnp.floating) for l in jax.tree.leaves(params))
  names = _leaf_names(rest)
  assert any("mean" in n for n in names) and any("var" in n for n in names)
  assert any("count" in n for n in names)
  assert not any("mean" in n or "count" in n for n in _leaf_names(params))


def test_apply_with_state_inside_jvp():
  _, graphdef, params, rest, x = _bn_setup()
  before = {
    k: np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
    for k, v in _rest_values(rest).items()
  }
  f = apply_with_state_fn(graphdef)
  tangent = jax.tree.map(jnp.ones_like, params)

  logits, dlogits, new_rest = jax.jvp(lambda p: f(p, rest, x), (params,), (tangent,), has_aux=True)
  assert logits.shape == dlogits.shape == (6, 3)
  assert bool(jnp.any(dlogits != 0))
  assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
  assert _is_concrete(new_rest)  # no tracer leaked into the returned state

  new = _rest_values(new_rest)
  mean_key = next(k for k in new if k.endswith("mean"))
  count_key = next(k for k in new if k.endswith("count"))
  assert not np.allclose(new[mean_key], before[mean_key])  # batch stats updated
  assert int(new[count_key]) == int(before[count_key]) + 1  # dropout RNG advanced

  # The caller's state is untouched (no in-place writes, no tracers stored in it).
  assert _is_concrete(rest)
  for k, v in _rest_values(rest).items():
    got = jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
    np.testing.assert_array_equal(np.asarray(got), before[k])

  # Threading the new state through a second step works and gives a fresh dropout mask.
  logits2, _, newer = jax.jvp(lambda p: f(p, new_rest, x), (params,), (tangent,), has_aux=True)
  assert int(_rest_values(newer)[count_key]) == int(before[count_key]) + 2
  assert not np.allclose(logits, logits2)


def test_apply_with_state_jit_and_jvp_under_jit():
  _, graphdef, params, rest, x = _bn_setup()
  f = apply_with_state_fn(graphdef)
  eager_logits, eager_rest = f(params, rest, x)
  jit_logits, jit_rest = jax.jit(f)(params, rest, x)
  np.testing.assert_allclose(jit_logits, eager_logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(
    jax.tree.leaves(_rest_values(jit_rest)), jax.tree.leaves(_rest_values(eager_rest))
  ):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  @jax.jit
  def fwd_grad_step(params, rest, x, v):
    def loss(p):
      logits, new_rest = f(p, rest, x)
      return jnp.mean(logits**2), new_rest

    l, dd, new_rest = jax.jvp(loss, (params,), (v,), has_aux=True)
    return l, dd, new_rest

  v = jax.tree.map(jnp.ones_like, params)
  l, dd, new_rest = fwd_grad_step(params, rest, x, v)
  assert jnp.shape(l) == () and jnp.shape(dd) == ()
  assert _is_concrete(new_rest)
  assert jax.tree.structure(new_rest) == jax.tree.structure(rest)


def test_apply_fn_on_stateful_model_does_not_leak():
  """apply_fn may be used on a BN model (state updates dropped) without tracer leaks."""
  m, graphdef, params, rest, x = _bn_setup()
  f = apply_fn(graphdef, rest)
  tangent = jax.tree.map(jnp.ones_like, params)
  out, dout = jax.jvp(lambda p: f(p, x), (params,), (tangent,))
  assert out.shape == dout.shape == (6, 3)
  jax.jit(f)(params, x)
  assert _is_concrete(rest)
  assert _is_concrete(nnx.state(m))
