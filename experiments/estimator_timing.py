"""Time value_and_forward_grad against jax.value_and_grad (no optimizer), interleaved.

  python experiments/estimator_timing.py --tangents normal --k 1,4,16

The MLP 784-1024-1024-10 at batch 64 on random data; each variant is one jitted call,
compiled first, then called in turn for --reps rounds; medians. For optimizer steps in
the training loop's own code, use experiments/benchmark.py.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fwdgrad_jax as fg
from fwdgrad_jax import models, train


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="mlp")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--k", default="1,4,16", help="numbers of tangents")
  parser.add_argument("--tangents", default="normal")
  parser.add_argument("--reps", type=int, default=20)
  args = parser.parse_args(argv)

  model = models.create(args.model, input_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0))
  graphdef, params, rest = models.split(model)
  loss = train.make_loss(graphdef, rest)
  x = jax.random.normal(jax.random.key(1), (args.batch_size, 28, 28, 1))
  y = jnp.arange(args.batch_size) % 10
  key = jax.random.key(2)
  fns = {
    "base (loss)": (jax.jit(loss), (params, x, y)),
    "jax.value_and_grad": (jax.jit(jax.value_and_grad(loss)), (params, x, y)),
  }
  for k in map(int, args.k.split(",")):
    vg = fg.value_and_forward_grad(loss, num_tangents=k, tangents=args.tangents)
    fns[f"forward k={k}"] = (jax.jit(vg), (key, params, x, y))
  for f, a in fns.values():
    jax.block_until_ready(f(*a))  # compile outside the timing
  times = {name: [] for name in fns}
  for _ in range(args.reps):
    for name, (f, a) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      times[name].append(time.perf_counter() - t0)
  med = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
  bp = med["jax.value_and_grad"]
  print(
    f"{args.model}, batch {args.batch_size}, {args.tangents} tangents; jax {jax.__version__} on {jax.devices()[0]}"
  )
  for name, ms in med.items():
    print(
      f"{name:20s} {ms:8.2f} ms   x base {ms / med['base (loss)']:6.2f}   x backprop {ms / bp:6.2f}"
    )
  return med


if __name__ == "__main__":
  main()
