"""Runs in a subprocess with 4 CPU devices (XLA_FLAGS set before JAX starts): the checks
of tests/test_parallel.py that need more than one device. Prints one JSON line.

Its time is compiling (about 20 programs, a few steps each): LLVM's optimizations are
off here (``--xla_backend_optimization_level=0``, a third less CPU time). They act
below XLA's HLO passes, so the sharded programs, their collectives and their buffers are
the same; every comparison is between programs compiled alike.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
).strip()

import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fwdgrad_jax as fg  # noqa: E402
from fwdgrad_jax import data as data_lib  # noqa: E402
from fwdgrad_jax import parallel  # noqa: E402
from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import run as run_lib


def _loss(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  logits = h @ p["w2"]
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y])


def _problem():
  """The MLP, batch and key of the estimate checks."""
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {
    "w1": 0.05 * jax.random.normal(k0, (64, 32)),
    "b1": jnp.zeros(32),
    "w2": 0.05 * jax.random.normal(k1, (32, 10)),
  }
  x = jax.random.normal(k2, (16, 64))
  y = jnp.arange(16) % 10
  return k0, params, x, y


def _rel(ref, got):
  """Max relative difference over the leaves (numpy: no small programs to compile)."""
  return max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(a))))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got))
  )


def estimates():
  """Max relative difference of the 2×2-mesh estimate from the one-device one.

  The orthogonal projection (its Gram matrix spans the tangent shards); the mean of
  stored tangents on a 2×2 mesh is training()'s BatchNorm run. (One compile of each
  estimate is most of this worker's time: no case is checked twice.)
  """
  k0, params, x, y = _problem()
  mesh = parallel.make_mesh(2, 2)
  agg = "orthogonal"
  ref_v, ref_g = jax.jit(fg.value_and_forward_grad(_loss, num_tangents=4, aggregation=agg))(
    k0, params, x, y
  )
  fn = fg.value_and_forward_grad(
    parallel.data_parallel(_loss, mesh), num_tangents=4, aggregation=agg, mesh=mesh
  )
  v, g = jax.jit(fn)(k0, *parallel.replicate((params, x, y), mesh))
  return {agg: {"value": abs(float(v) - float(ref_v)), "grad": _rel(ref_g, g)}}


def regenerated():
  """Regenerated tangents on meshes: the one-device estimate, and what crosses devices.

  No 2×2 mean: training()'s regenerated run is that estimate on that mesh, and its
  collectives are the 2×2 orthogonal one's (both send d and the loss only).
  """
  k0, params, x, y = _problem()
  out = {"params": sum(p.size for p in jax.tree.leaves(params))}
  cases = [((2, 2), "orthogonal"), ((4, 1), "sum"), ((1, 4), "orthogonal")]
  refs = {}  # one device's estimate per aggregation (the same for every mesh)
  for shape, agg in cases:
    if agg not in refs:
      refs[agg] = jax.jit(
        fg.value_and_forward_grad(_loss, num_tangents=4, aggregation=agg, regenerate=True)
      )(k0, params, x, y)
    ref_v, ref_g = refs[agg]
    mesh = parallel.make_mesh(*shape)
    fn = fg.value_and_forward_grad(
      parallel.data_parallel(_loss, mesh),
      num_tangents=4,
      aggregation=agg,
      regenerate=True,
      mesh=mesh,
    )
    placed = parallel.replicate((params, x, y), mesh)
    exe = jax.jit(fn).lower(k0, *placed).compile()
    v, g = exe(k0, *placed)
    out[f"{shape[0]}x{shape[1]} {agg}"] = {
      "value": abs(float(v) - float(ref_v)),
      "grad": _rel(ref_g, g),
      "replicated": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(g)),
      "collectives": parallel.collective_bytes(exe.as_text()),
    }
  mesh = parallel.make_mesh(4, 1)
  exact = jax.jit(fg.value_and_exact_grad(parallel.data_parallel(_loss, mesh)))
  text = exact.lower(k0, *parallel.replicate((params, x, y), mesh)).compile().as_text()
  out["backprop 4x1"] = {"collectives": parallel.collective_bytes(text)}
  return out


def memory():
  """Compiled per-device temp bytes of a k = 8 estimate on 1 device and on a 1×4 mesh."""
  k0, k1 = jax.random.split(jax.random.PRNGKey(0))
  params = {"w1": jnp.zeros((256, 256)), "b1": jnp.zeros(256), "w2": jnp.zeros((256, 10))}
  x, y = jnp.zeros((16, 256)), jnp.arange(16) % 10
  out = {}
  for name, mesh in (("one", None), ("1x4", parallel.make_mesh(1, 4))):
    fn = fg.value_and_forward_grad(_loss, num_tangents=8, mesh=mesh)
    args = (k0, params, x, y) if mesh is None else (k0, *parallel.replicate((params, x, y), mesh))
    out[name] = jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
  return out


def dataset(n=256, seed=3):
  rng = np.random.default_rng(seed)

  def split(m):
    x = rng.normal(size=(m, 28, 28, 1)).astype(np.float32)
    y = np.argmax(x[:, :20, :, 0].reshape(m, 10, -1).mean(-1), axis=1).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)

  (xt, yt), (xv, yv), (xs, ys) = split(n), split(32), split(32)
  return data_lib.Dataset(
    name="fashion_mnist",
    num_classes=10,
    x_train=xt,
    y_train=yt,
    x_val=xv,
    y_val=yv,
    x_test=xs,
    y_test=ys,
    mean=(0.0,),
    std=(1.0,),
  )


def run(mesh, estimator, model):
  cfg = config_lib.Config()
  cfg.model = config_lib.ModelConfig(**model)
  cfg.estimator = config_lib.EstimatorConfig(**estimator)
  cfg.optimizer = config_lib.OptimizerConfig(name="sgd", lr=0.05)
  cfg.train = config_lib.TrainConfig(
    steps=8, batch_size=16, log_every=2, eval_every=0, progress=False, loop="device"
  )
  cfg.mesh = config_lib.MeshConfig(*mesh)
  with tempfile.TemporaryDirectory() as d:
    summary = run_lib.train(cfg, d, dataset=dataset())
    lines = open(os.path.join(d, "metrics.jsonl")).read().splitlines()
  records = [json.loads(line) for line in lines]
  train_losses = [r["train_loss"] for r in records if r.get("train_loss") is not None]
  return train_losses, [summary["val_loss"], summary["test_loss"]]


def training():
  """Train, validation and test losses of the same run on 1 device and on a 2×2 mesh."""
  # BatchNorm: its batch statistics are reduced across the data shards too.
  bn = {"name": "mlp", "options": {"hidden": [32], "batch_norm": True}}
  # Stored tangents, mean (estimates() checks the orthogonal projection on this mesh).
  forward = {"name": "forward", "num_tangents": 4, "aggregation": "mean"}
  regen = {"name": "forward", "num_tangents": 4, "aggregation": "mean", "regenerate": True}
  mlp = {"name": "mlp", "options": {"hidden": [32]}}
  cases = {
    "forward+batchnorm 2x2": ((2, 2), forward, bn),
    "forward regenerated 2x2": ((2, 2), regen, mlp),
  }
  out = {}
  for name, (mesh, est, model) in cases.items():
    one = run((1, 1), est, model)
    many = run(mesh, est, model)
    out[name] = {"one": one, "many": many}
  return out


def main(what):
  result = {"devices": len(jax.devices())}
  if what in ("all", "estimates"):
    result["estimates"] = estimates()
    result["memory"] = memory()
    result["regenerated"] = regenerated()
  if what in ("all", "training"):
    result["training"] = training()
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "all")
