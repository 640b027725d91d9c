"""Reproduction of a hang (issue 24, item 4): run as a script; prints "ok" unless it hangs.

Several blocks, each with its own activity-perturbation estimate (``fwdgrad_jax.site``
markers, per-example losses, k = 16, orthogonal aggregation) of its own local loss, in one
``jax.jit``. The per-example orthogonal projection solves one k×k Gram system per example:
a batched ``eigh``. jaxlib's CPU LAPACK kernel (jax 0.10) splits a batch over XLA:CPU's
intra-op thread pool and blocks the calling pool thread until the pieces are done; the
blocks' estimates are independent, so XLA runs their ``eigh`` calls at the same time, and
once every pool thread is such a caller no thread is left for the pieces: every thread
sits on a futex, forever (gdb: two ``tf_XLAEigen`` threads in ``jax::ParallelBatchMap``
under ``lapack_ssyevd_ffi``, the main thread in ``BlockUntilReady``). Before the fix,
this script hung in 5 of 5 runs on the 2-core development machine, in the first or
second step. ``fwdgrad_jax.aggregation`` now hands LAPACK one matrix per call on the CPU.

The pool is sized from the process's CPU affinity, so the script pins itself to two CPUs:
four concurrent decompositions then always outnumber the pool, on any machine.

  python tests/_lapack_hang.py [steps]
"""

import os
import sys

if hasattr(os, "sched_setaffinity"):  # before jax starts its thread pools
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fwdgrad_jax as fg  # noqa: E402

BLOCKS, BATCH, WIDTH, K = 4, 64, 128, 16


def block_loss(p, x, y):
  """One block: two marked sites and a head; per-example cross-entropies."""
  h = fg.site(jnp.tanh(x @ p["w1"] + p["b1"]))
  h = fg.site(jnp.tanh(h @ p["w2"]))
  logits = h @ p["head"]
  return -jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y]


def main(steps: int) -> None:
  key = jax.random.PRNGKey(0)
  params = []
  for _ in range(BLOCKS):
    key, a, b, c = jax.random.split(key, 4)
    params.append(
      {
        "w1": jax.random.normal(a, (WIDTH, WIDTH)) / np.sqrt(WIDTH),
        "b1": jnp.zeros(WIDTH),
        "w2": jax.random.normal(b, (WIDTH, WIDTH)) / np.sqrt(WIDTH),
        "head": jax.random.normal(c, (WIDTH, 10)) / np.sqrt(WIDTH),
      }
    )
  estimate = fg.value_and_forward_grad(
    block_loss, num_tangents=K, aggregation="orthogonal", perturbation="activity"
  )

  @jax.jit
  def step(key, params, x, y):
    grads = []
    for b, p in enumerate(params):  # each block on its own (stop-gradient) input
      grads.append(estimate(jax.random.fold_in(key, b), p, x, y)[1])
      x = jax.lax.stop_gradient(jnp.tanh(x @ p["w1"] + p["b1"]))
    return grads

  x = jax.random.normal(key, (BATCH, WIDTH))
  y = jnp.arange(BATCH) % 10
  for i in range(steps):
    jax.block_until_ready(step(jax.random.PRNGKey(i), params, x, y))
    print("step", i, flush=True)
  print("ok", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
