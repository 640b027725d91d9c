"""Tests for fwdgrad_jax.models.flugel2024: ResNet18 and the small ViT of Flügel et al. 2024.

Small widths and images keep every test fast on a CPU; the full-size models are only
built abstractly (``nnx.eval_shape``) to check their size. What compiles a ResNet's
forward and derivatives uses the short one (one basic block per stage: every kind of
block, the four stages and their sites, half ResNet18's convolutions to compile); the
sites are checked on the two-block ResNet18 itself. Every ResNet here has width 2, and
every ViT TINY_VIT's widths, so that the models' initialisers (one compile per
parameter shape) compile once for the file.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import fwdgrad_jax as fg
from fwdgrad_jax import models
from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import run as run_lib
from fwdgrad_jax.training import steps as steps_lib

ROOT = Path(__file__).resolve().parents[1]
TINY_RESNET = {"width": 2, "blocks": 1}
TINY_VIT = {"hidden": 8, "heads": 2, "mlp": 16, "layers": 2}


def _make(name, shape, **kw):
  return models.create(name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(0), **kw)


def _images(shape, batch=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, *shape), jnp.float32)


def _flat(tree):
  # On the host: ravel_pytree's concatenate would compile for every tree.
  return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)])


@pytest.mark.parametrize(
  "name, shape, count",
  [
    # The CIFAR ResNet18 of the common PyTorch reference (kuangliu/pytorch-cifar, BatchNorm
    # with bias-free convs, Linear head): 11,173,962 parameters on 32×32×3, 10 classes.
    ("resnet18", (32, 32, 3), 11_173_962),
    # One input channel removes 64·9·2 stem weights.
    ("resnet18", (28, 28, 1), 11_173_962 - 64 * 9 * 2),
  ],
)
def test_full_size_resnet18_has_the_reference_parameter_count(name, shape, count):
  abstract = nnx.eval_shape(lambda: _make(name, shape))
  _, params, _ = models.split(abstract)
  assert models.count_params(params) == count
  assert [len(stage) for stage in abstract.stages] == [2, 2, 2, 2]
  # The tests' short ResNet drops each stage's second block (two 3x3 convs and their
  # BatchNorms at width·2^i), nothing else.
  short = nnx.eval_shape(lambda: _make(name, shape, blocks=1))
  second = sum(2 * (9 * c * c + 2 * c) for c in (64, 128, 256, 512))
  assert models.count_params(models.split(short)[1]) == count - second


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_logits_shape_for_mnist_and_cifar_images(name, shape):
  # Abstractly (shapes only): the full-size models, as configured, without compiling them.
  out = jax.eval_shape(lambda x: _make(name, shape)(x), _images(shape))
  assert out.shape == (2, 10)


def test_vit_patch_must_divide_the_image_and_resnet_norm_is_checked():
  with pytest.raises(ValueError, match="patch=5"):
    _make("vit", (28, 28, 1), patch=5, **TINY_VIT)
  with pytest.raises(ValueError, match="norm"):
    _make("resnet18", (28, 28, 1), norm="instance", **TINY_RESNET)
  with pytest.raises(ValueError, match="blocks"):
    _make("resnet18", (28, 28, 1), **dict(TINY_RESNET, blocks=0))


@pytest.mark.slow
def test_jvp_through_the_stateful_apply_matches_the_gradient():
  # The ResNet: BatchNorm's state goes through the jvp. (Forward mode through every op of
  # the stateless ViT is checked against jax.grad by its exact activity estimate below.)
  shape = (8, 8, 1)
  graphdef, params, rest = models.split(_make("resnet18", shape, **TINY_RESNET))
  loss = steps_lib.make_stateful_loss(graphdef)
  x, y = _images(shape, batch=4), jnp.arange(4) % 10

  @jax.jit  # the tangent in one small compiled draw (eagerly every leaf compiles its own)
  def draw(p, key):
    flat, unravel = ravel_pytree(p)
    return unravel(jax.random.normal(key, flat.shape))

  v = draw(params, jax.random.key(3))
  # One compile for both: the model's compiles dominate this test.
  ((_, new_rest), (dval, _)), grad = jax.jit(
    lambda p, v: (
      jax.jvp(lambda p: loss(p, x, y, rest), (p,), (v,)),
      jax.grad(lambda p: loss(p, x, y, rest)[0])(p),
    )
  )(params, v)
  expected = _flat(grad) @ _flat(v)
  np.testing.assert_allclose(dval, expected, rtol=1e-4, atol=1e-6)
  # BatchNorm statistics come back updated.
  changed = [
    not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_rest), jax.tree.leaves(rest))
  ]
  assert any(changed)


def _site_shapes(name, shape, options, batch=2):
  """Shapes of the activity tangents the estimator draws (one per site), via a recording aggregation."""
  model = _make(name, shape, **options)
  graphdef, params, rest = models.split(model)
  loss = steps_lib.make_loss(graphdef, rest, per_example=True)
  seen = []

  def recording_mean(tangents, d):
    seen.extend(t.shape for t in tangents)
    return fg.aggregation.mean(tangents, d)

  est = fg.value_and_forward_grad(
    loss, num_tangents=3, perturbation="activity", aggregation=recording_mean
  )
  # The shapes are recorded while tracing: abstract evaluation, no compile.
  jax.eval_shape(est, jax.random.key(0), params, _images(shape, batch), jnp.arange(batch))
  return seen


@pytest.mark.slow
def test_activity_perturbation_enters_at_the_papers_layers():
  # ResNet18 itself (two blocks per stage, BatchNorm): four stage outputs (8, 4, 2, 1 px;
  # width·1, 2, 4, 8 channels) and the logits.
  assert _site_shapes("resnet18", (8, 8, 1), dict(TINY_RESNET, blocks=2)) == [
    (3, 2, 8, 8, 2),
    (3, 2, 4, 4, 4),
    (3, 2, 2, 2, 8),
    (3, 2, 1, 1, 16),
    (3, 2, 10),
  ]
  # ViT: encoder layers 1..L-1 (4 patches + class token) and the logits.
  vit = dict(TINY_VIT, layers=3)
  assert _site_shapes("vit", (8, 8, 1), vit) == [(3, 2, 5, 8), (3, 2, 5, 8), (3, 2, 10)]


@pytest.mark.slow
@pytest.mark.parametrize(
  "name, options, k",
  [
    # per example: 8·8·2 + 4·4·4 + 2·2·8 + 1·1·16 + 10 = 250 perturbed activations
    ("resnet18", dict(TINY_RESNET, norm="none"), 256),
    # per example: (4 patches + class token)·8 + 10 = 50
    ("vit", dict(TINY_VIT, patch=4), 64),
  ],
)
def test_orthogonal_activity_estimate_is_exact_when_k_spans_the_sites(name, options, k):
  # With k ≥ the number of perturbed activations per example, the per-example orthogonal
  # projection recovers each site's gradient exactly, and every parameter's estimate is
  # then the exact local VJP: the whole estimate equals jax.grad. This fails if a site is
  # missed (its block's parameters would get no or a wrong gradient) or the blocks'
  # VJPs are wired wrongly.
  shape = (8, 8, 1)
  model = _make(name, shape, **options)
  graphdef, params, rest = models.split(model)
  x, y = _images(shape, batch=3), jnp.array([1, 4, 7])
  per_example = steps_lib.make_loss(graphdef, rest, per_example=True)
  est = fg.value_and_forward_grad(
    per_example, num_tangents=k, perturbation="activity", aggregation="orthogonal"
  )
  loss = steps_lib.make_loss(graphdef, rest)

  # One compile for the estimate, the loss and its gradient (eagerly every op, ResNet18's
  # many convolution shapes each, compiles on its own).
  @jax.jit
  def estimate_and_grad(p):
    (value, g), (true_value, true) = (
      est(jax.random.key(0), p, x, y),
      jax.value_and_grad(loss)(p, x, y),
    )
    g, true = ravel_pytree(g)[0], ravel_pytree(true)[0]
    return value, true_value, g, true, fg.metrics.cosine_similarity(g, true)

  value, true_value, g, true, cosine = estimate_and_grad(params)
  np.testing.assert_allclose(value, true_value, rtol=1e-5)
  assert float(cosine) > 0.9999
  np.testing.assert_allclose(g, true, atol=1e-4 * float(np.max(np.abs(true))))


def test_model_configs_compose_and_validate():
  for name in ("resnet18", "vit"):
    cfg = config_lib.compose([f"model={name}"], config_dir=ROOT / "configs")
    assert cfg.model.name == name
    assert set(cfg.model.options) <= set(models.registry._options_of(models.MODELS[name]))


@pytest.mark.slow
@pytest.mark.parametrize(
  "name, options, estimator, lr",
  [
    (
      "resnet18",
      TINY_RESNET,
      {
        "name": "forward",
        "perturbation": "activity",
        "num_tangents": 2,
        "aggregation": "orthogonal",
      },
      0.05,
    ),
    ("vit", TINY_VIT, {"name": "backprop"}, 0.05),
  ],
  ids=["resnet18-forward-activity", "vit-backprop"],
)
def test_trains_through_the_app(tiny_data, tmp_path, name, options, estimator, lr):
  data_dir, ds = tiny_data
  cfg = config_lib.Config()
  cfg.data = config_lib.DataConfig(name="fashion_mnist", data_dir=str(data_dir), val_size=64)
  cfg.model = config_lib.ModelConfig(name=name, options=options)
  cfg.estimator = config_lib.EstimatorConfig(**estimator)
  cfg.optimizer.lr = lr
  cfg.train = config_lib.TrainConfig(
    steps=10,
    batch_size=8,
    log_every=5,
    eval_every=10,
    # The gradient check compares an estimate with jax.grad: backprop's is jax.grad itself,
    # a second compile of the model's gradient that checks nothing.
    grad_check_every=0 if estimator["name"] == "backprop" else 10,
    progress=False,
    eval_batch_size=64,
  )
  summary = run_lib.train(cfg, tmp_path, dataset=ds)
  assert summary["error"] is None and not summary["diverged"]
  assert np.isfinite(summary["test_loss"]) and summary["steps"] == 10
