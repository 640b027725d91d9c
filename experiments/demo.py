"""Demo: Beale and Rosenbrock minimised with forward gradients and with jax.grad.

Baydin et al. 2022, Fig. 2 settings: plain gradient descent, ten runs each, Beale at
lr 0.01 and Rosenbrock at lr 5e-4. Run: ``python experiments/demo.py``.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad_jax.functions import FUNCTIONS, descend

# (function, start, learning rate, iterations); the paper gives no starting points.
SETUPS = [
  ("beale", (1.0, 1.0), 0.01, 2000),
  ("rosenbrock", (-1.0, 1.0), 5e-4, 20000),
]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.runs} runs each\n")
  print(
    f"{'function':11s} {'method':9s} {'lr':>7s} {'iters':>6s}  {'final f (median [min, max])':32s} {'‖x−x*‖ median':>14s} {'ms/run':>7s}"
  )
  for name, start, lr, steps in SETUPS:
    tf = FUNCTIONS[name]
    x_star = tf.minimizer(len(start))
    for method in ("forward", "backprop"):
      run = jax.jit(
        jax.vmap(
          lambda k: descend(
            tf.fn, jnp.array(start), learning_rate=lr, steps=steps, key=k, estimator=method
          )
        )
      )
      keys = jax.random.split(jax.random.key(args.seed), args.runs)
      jax.block_until_ready(run(keys))  # compile outside the timing
      t0 = time.perf_counter()
      losses, xs = jax.block_until_ready(run(keys))
      ms = (time.perf_counter() - t0) * 1e3 / args.runs
      final = np.asarray(jax.vmap(tf.fn)(xs[:, -1]))
      dist = np.linalg.norm(np.asarray(xs[:, -1]) - x_star, axis=1)
      summary = f"{np.median(final):.3e} [{final.min():.1e}, {final.max():.1e}]"
      print(
        f"{name:11s} {method:9s} {lr:7.0e} {steps:6d}  {summary:32s} {np.median(dist):14.4f} {ms:7.2f}"
      )
  print(
    "\nstart f: "
    + ", ".join(f"{n} {float(FUNCTIONS[n].fn(jnp.array(s))):.3f}" for n, s, _, _ in SETUPS)
  )


if __name__ == "__main__":
  main()
