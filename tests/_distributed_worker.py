"""One process of a training run for tests/test_distributed.py; prints one JSON line.

  python tests/_distributed_worker.py RUN_DIR --devices 2 --processes 2 --process-id 0 \
      --port 12355 [--kill-at STEP]

Each process has ``--devices`` CPU devices (set before JAX starts); with ``--processes``
> 1 they join through ``jax.distributed`` on 127.0.0.1 (the run's ``mesh.*`` keys), and
the mesh ``mesh.data=4`` spans them all. ``--kill-at STEP``: the process sends itself
SIGKILL right after the checkpoint of STEP is saved (a run killed mid-way, at a known
point).

LLVM's optimizations are off (``--xla_backend_optimization_level=0``, as in
tests/_parallel_worker.py): a process's time is its imports and compiles, and the runs
compared are compiled alike.
"""

import argparse
import json
import logging
import os
import signal
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402


def dataset(n=128, seed=3):
  import numpy as np

  from fwdgrad_jax import data as data_lib

  rng = np.random.default_rng(seed)

  def split(m):
    x = rng.normal(size=(m, 28, 28, 1)).astype(np.float32)
    y = np.argmax(x[:, :20, :, 0].reshape(m, 10, -1).mean(-1), axis=1).astype(np.int32)
    return x, y

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


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument("run_dir")
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--kill-at", type=int, default=0)
  p.add_argument("--regenerate", action="store_true")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
  jax.config.update("jax_num_cpu_devices", args.devices)

  from fwdgrad_jax.training import config as config_lib
  from fwdgrad_jax.training import run as run_lib
  from fwdgrad_jax.training import rundir

  cfg = config_lib.Config()
  cfg.model = config_lib.ModelConfig(name="mlp", options={"hidden": [16]})
  cfg.estimator = config_lib.EstimatorConfig(
    name="forward", num_tangents=4, aggregation="mean", regenerate=args.regenerate
  )
  cfg.optimizer = config_lib.OptimizerConfig(name="sgd", lr=0.05)
  cfg.train = config_lib.TrainConfig(
    steps=8,
    batch_size=16,
    log_every=2,
    eval_every=0,
    checkpoint_every=2,
    progress=False,
    loop="device",
  )
  cfg.mesh = config_lib.MeshConfig(data=4)
  if args.processes > 1:
    cfg.mesh.distributed = True
    cfg.mesh.coordinator_address = f"127.0.0.1:{args.port}"
    cfg.mesh.num_processes = args.processes
    cfg.mesh.process_id = args.process_id

  if args.kill_at:
    save = rundir.Checkpoints.save

    def save_then_die(self, step, state):
      save(self, step, state)
      if step == args.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

    rundir.Checkpoints.save = save_then_die

  summary = run_lib.train(cfg, args.run_dir, dataset=dataset())
  print(
    json.dumps(
      {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": len(jax.devices()),
        "val_loss": summary["val_loss"],
        "test_loss": summary["test_loss"],
        "steps": summary["steps"],
      }
    )
  )


if __name__ == "__main__":
  main(sys.argv[1:])
