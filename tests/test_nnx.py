"""fwdgrad_jax.nnx: forward gradients for NNX models with state (issue 24.1).

The step must thread Dropout's RNG and BatchNorm's statistics through (a new mask every
step, statistics moving), need no seeded aux, return each step's loss as its own array,
and — with the orthogonal aggregation and k ≥ the dimension perturbed — take exactly the
step backprop takes, for weight and activity perturbation and local losses.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fwdgrad_jax as fg
import fwdgrad_jax.nnx  # noqa: F401  (fg.nnx)


class Net(nnx.Module):
  def __init__(self, rngs):
    self.lin1 = nnx.Linear(8, 32, rngs=rngs)
    self.bn = nnx.BatchNorm(32, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.lin2 = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.lin2(self.drop(jax.nn.relu(self.bn(self.lin1(x)))))


def mse(model, x, y):
  return jnp.mean((model(x)[:, 0] - y) ** 2)


def _data(n=8):
  x = jax.random.normal(jax.random.key(1), (n, 8))
  return x, x @ jnp.linspace(-1.0, 1.0, 8)


@nnx.jit
def _step(model, optimizer, x, y):
  return optimizer.update(model, x, y)


def test_dropout_masks_differ_between_steps_and_batch_statistics_move():
  def loss_and_mask(model, x, y):  # the mask the step's Dropout drew, as aux
    return mse(model, x, y), model.drop(jnp.ones((4, 32))) != 0

  model = Net(nnx.Rngs(0))
  opt = fg.nnx.ForwardOptimizer(
    model, optax.sgd(1e-2), loss_and_mask, key=0, has_aux=True, perturbation="activity"
  )
  x, y = _data()
  masks, losses = [], []
  for _ in range(3):
    loss, mask = _step(model, opt, x, y)
    masks.append(mask)
    losses.append(loss)
  assert not jnp.array_equal(masks[0], masks[1]) and not jnp.array_equal(masks[1], masks[2])
  assert int(model.drop.rngs.count[...]) == 6  # two Dropout calls per step
  assert int(opt.step[...]) == 3
  assert not jnp.allclose(model.bn.mean[...], 0.0)  # running averages moved
  # Each step's loss is its own array: a list of them is not three times the last one.
  assert len({float(v) for v in losses}) == 3


# Jitted as the tutorial's step is: run eagerly, its forward and backward pass would
# compile one small program per primitive (most of this file's time).
@nnx.jit(static_argnums=(1, 4))
def _reference_step(model, loss_fn, x, y, lr):
  """Backprop by hand, as Flax's tutorial writes it: the step to match."""
  grads = nnx.grad(loss_fn)(model, x, y)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p, g: p - lr * g, params, grads))


def _assert_same_models(a, b):
  # Compared on the host (numpy): jnp's comparisons would compile per leaf shape.
  for (path, u), v in zip(jax.tree.leaves_with_path(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
      continue
    u, v = np.asarray(u), np.asarray(v)
    if np.issubdtype(u.dtype, np.floating):
      assert np.allclose(u, v, rtol=1e-3, atol=1e-5), jax.tree_util.keystr(path)
    else:
      assert np.array_equal(u, v), jax.tree_util.keystr(path)


# Dimensions perturbed: 385 parameters; an activity of 32 + 1 per example, 8 examples
# (BatchNorm couples them, so the loss is the batch mean and the whole batch is perturbed).
# k = 2x that keeps the orthogonal projection's Gram matrix well conditioned.
@pytest.mark.parametrize(
  "options",
  [dict(num_tangents=770), dict(num_tangents=528, perturbation="activity")],
  ids=["weights", "activity"],
)
def test_orthogonal_with_k_over_the_dimension_takes_the_backprop_step(options):
  x, y = _data()
  model, ref = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  opt = fg.nnx.ForwardOptimizer(
    model, optax.sgd(0.1), mse, key=0, aggregation="orthogonal", **options
  )
  # Left in eval mode, the update still trains in train mode: it matches the train-mode
  # backprop step (Dropout's draws, BatchNorm's batch statistics and running averages).
  model.eval()
  for _ in range(2):
    _step(model, opt, x, y)
    _reference_step(ref, mse, x, y, 0.1)
  _assert_same_models(model, ref)
  assert int(model.drop.rngs.count[...]) == 2  # Dropout drew a mask at each step
  assert model.drop.deterministic and model.bn.use_running_average  # the mode is the caller's


class LocalNet(nnx.Module):
  """Two blocks, each with its own head and local loss ([Ren]), Dropout between."""

  def __init__(self, rngs):
    self.l1, self.l2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)
    self.h1, self.h2 = nnx.Linear(16, 4, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)

  def __call__(self, x):
    h1 = self.drop(jax.nn.relu(self.norm(self.l1(x))))
    z1 = self.h1(h1)  # the head first, then the stop-gradient (README, local losses)
    h2 = jax.nn.relu(self.l2(jax.lax.stop_gradient(h1)))
    return z1, self.h2(h2)


def local_losses(model, x, y):
  z1, z2 = model(x)
  ce = optax.softmax_cross_entropy_with_integer_labels
  return fg.local_loss(ce(z1, y)) + fg.local_loss(ce(z2, y))


def test_local_losses_with_activity_take_the_local_backprop_step():
  x = jax.random.normal(jax.random.key(1), (8, 8))
  y = jnp.arange(8) % 4
  model, ref = LocalNet(nnx.Rngs(0)), LocalNet(nnx.Rngs(0))
  # Per example 16 + 16 + 4 + 4 activities; per-example losses (LayerNorm does not couple
  # the examples): each example its own directional derivatives.
  opt = fg.nnx.ForwardOptimizer(
    model,
    optax.sgd(0.1),
    local_losses,
    key=0,
    num_tangents=80,
    perturbation="activity",
    aggregation="orthogonal",
  )
  _step(model, opt, x, y)
  _reference_step(ref, lambda m, x, y: jnp.mean(local_losses(m, x, y)), x, y, 0.1)
  _assert_same_models(model, ref)


def test_backprop_by_name_and_bad_options_named():
  model = Net(nnx.Rngs(0))
  opt = fg.nnx.ForwardOptimizer(model, optax.sgd(0.1), mse, key=0, estimator="backprop")
  ref = Net(nnx.Rngs(0))
  x, y = _data()
  _step(model, opt, x, y)
  _reference_step(ref, mse, x, y, 0.1)
  _assert_same_models(model, ref)
  with pytest.raises(ValueError, match="num_tangents"):
    fg.nnx.ForwardOptimizer(model, optax.sgd(0.1), mse, key=0, num_tangents=0)
  with pytest.raises(ValueError, match="estimator='bogus'"):
    fg.nnx.ForwardOptimizer(model, optax.sgd(0.1), mse, key=0, estimator="bogus")


def test_without_flax_the_error_says_which_extra_to_install():
  code = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "flax":
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _Block())
    import fwdgrad_jax  # the core loads without Flax
    import fwdgrad_jax.nnx
    """
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert "pip install 'fwdgrad_jax[train]'" in last, last
