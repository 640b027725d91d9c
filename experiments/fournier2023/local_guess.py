"""Fournier et al. 2023's local guesses on the LocalMixer: cosine to the global and local gradients.

The LocalMixer (``model=local_mixer``: 4×4 patches, 2 blocks of 64 channels in 4 groups,
a loss per block and group) trained end to end on the sum of all its heads' losses
(``stop_gradient=False``: the second block's losses reach the first block), by backprop
(SGD, momentum 0.9, lr 0.05, batch 64) on Fashion-MNIST. At a few points of training, on
small batches, each estimator's parameter estimate is compared by cosine with

* the **global** gradient: ``jax.grad`` of the model's total (what training follows), and
* the **local** gradient: ``jax.grad`` of the same parameters with a stop-gradient between
  the blocks (Ren et al.'s LG-BP: each block from its own losses only),

over the blocks' parameters (the heads' estimates are exact local gradients in every
activity scheme, and left out). Estimators, all activity perturbation with per-example
losses: (i) k = 1 random tangent, mean; (ii) the guess alone (``tangents=local_guess``,
num_tangents = 1: one guess per block, orthogonal); (iii) the guess + 4 random tangents,
orthogonal; (iv) 6 random tangents, orthogonal (as many tangents in the jvp as (iii)).
At step 0 the heads are zero (the LocalMixer's init), so every block's gradient is zero:
the first point is after a few steps. Mean ± s.e. over seeds (a batch and a key each).

  python -m experiments.fournier2023.local_guess --out results/fournier2023
  python -m experiments.fournier2023.local_guess --quick      # a smoke test

References:
  Fournier, Rivaud, Belilovsky, Eickenberg, Oyallon, 2023. Can Forward Gradient Match
  Backpropagation? ICML 2023.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fwdgrad_jax as fg
from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax import data, models
from fwdgrad_jax.training import steps as steps_lib

#: label -> value_and_forward_grad options
ESTIMATORS: dict[str, dict[str, Any]] = {
  "activity k=1 random (mean)": dict(num_tangents=1, aggregation="mean"),
  "guess alone (orthogonal)": dict(
    num_tangents=1, tangents="local_guess", aggregation="orthogonal"
  ),
  "guess + 4 random (orthogonal)": dict(
    num_tangents=5, tangents="local_guess", aggregation="orthogonal"
  ),
  "6 random (orthogonal)": dict(num_tangents=6, aggregation="orthogonal"),
}
OPTIONS = dict(patches=4, channels=64, hidden=128, groups=4, blocks=2)
#: The smoke test's one estimator (each is a compile; the loop over them is the same code):
#: the guess with random tangents under the projection, the scheme this script is about.
QUICK_ESTIMATORS = ("guess + 4 random (orthogonal)",)


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--steps", type=rep.ints, default=[5, 300], help="training steps to measure at")
  p.add_argument("--seeds", type=int, default=8, help="batches/keys per point")
  p.add_argument("--batch", type=int, default=16, help="examples per measured batch")
  p.add_argument(
    "--quick", action="store_true", help="steps 1,2; 2 seeds; a tiny mixer; one estimator"
  )


def _cos(a, b) -> float:
  return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _blocks_flat(tree) -> jax.Array:
  """The blocks' parameters (every leaf outside the heads), flat."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  keep = [v for path, v in leaves if "heads" not in jax.tree_util.keystr(path)]
  return jnp.concatenate([jnp.ravel(v) for v in keep])


def run(args: argparse.Namespace) -> dict[str, Any]:
  steps, seeds, batch = sorted(args.steps), args.seeds, args.batch
  options, estimator_options = OPTIONS, ESTIMATORS
  if args.quick:
    steps, seeds, options = [1, 2], 2, dict(patches=4, channels=8, hidden=16, groups=2, blocks=2)
    estimator_options = {label: ESTIMATORS[label] for label in QUICK_ESTIMATORS}
  ds = data.load("fashion_mnist", val_size=1000)
  shape = ds.input_shape
  x_train, y_train = ds.x_train, ds.y_train

  def make(stop_gradient):
    m = models.create(
      "local_mixer", input_shape=shape, num_classes=10, rngs=nnx.Rngs(0),
      local_losses=True, stop_gradient=stop_gradient, **options,
    )  # fmt: skip
    return models.split(m)

  graphdef, params, rest = make(False)
  graphdef_lg, _, rest_lg = make(True)
  total = steps_lib.make_loss(graphdef, rest)
  per_example = steps_lib.make_loss(graphdef, rest, per_example=True)
  local_total = steps_lib.make_loss(graphdef_lg, rest_lg)
  global_grad = jax.jit(jax.grad(total))
  local_grad = jax.jit(jax.grad(local_total))
  estimators = {
    label: jax.jit(fg.value_and_forward_grad(per_example, perturbation="activity", **opts))
    for label, opts in estimator_options.items()
  }
  tx = optax.sgd(0.05, momentum=0.9)
  opt_state = tx.init(params)

  # The training split is an argument: closed over, it would compile in as a 172 MB
  # constant (about a minute per compile on 2 cores).
  @jax.jit
  def train_step(params, opt_state, key, x_train, y_train):
    i = jax.random.randint(key, (64,), 0, x_train.shape[0])
    g = jax.grad(total)(params, x_train[i], y_train[i])
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rows, done, key = [], 0, jax.random.key(123)
  for step in steps:
    for _ in range(step - done):
      key, sub = jax.random.split(key)
      params, opt_state = train_step(params, opt_state, sub, x_train, y_train)
    done = step
    cos: dict[str, dict[str, list[float]]] = {
      label: {"global": [], "local": []} for label in estimators
    }
    glob_local = []
    for seed in range(seeds):
      i = jax.random.randint(jax.random.key(1000 + seed), (batch,), 0, x_train.shape[0])
      x, y = x_train[i], y_train[i]
      g_glob = _blocks_flat(global_grad(params, x, y))
      g_loc = _blocks_flat(local_grad(params, x, y))
      glob_local.append(_cos(g_glob, g_loc))
      for label, vg in estimators.items():
        est = _blocks_flat(vg(jax.random.key(seed), params, x, y)[1])
        cos[label]["global"].append(_cos(est, g_glob))
        cos[label]["local"].append(_cos(est, g_loc))
    for label, c in cos.items():
      rows.append(
        dict(
          step=step,
          estimator=label,
          **{
            f"{t}_{s}": f(np.asarray(c[t]))
            for t in ("global", "local")
            for s, f in (("mean", np.mean), ("se", lambda a: np.std(a, ddof=1) / np.sqrt(len(a))))
          },
        )
      )
    rows.append(
      dict(step=step, estimator="(global vs local gradient)", global_mean=1.0, global_se=0.0,
           local_mean=float(np.mean(glob_local)),
           local_se=float(np.std(glob_local, ddof=1) / np.sqrt(seeds)))
    )  # fmt: skip
  settings = dict(steps=steps, seeds=seeds, batch=batch, options=options)
  return dict(settings=settings, rows=rows)


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s = result["settings"]
  table = rep.Table(
    ["step", "estimator", "cos to global ± s.e.", "cos to local ± s.e."],
    ["--:", "---", "--:", "--:"],
  )
  for r in result["rows"]:
    table.add_row(
      r["step"],
      r["estimator"],
      f"{r['global_mean']:.3f} ± {r['global_se']:.3f}",
      f"{r['local_mean']:.3f} ± {r['local_se']:.3f}",
    )
  lines = [
    "# Local guesses (Fournier et al. 2023) on the LocalMixer",
    "",
    *rep.provenance_lines(result.get("provenance")),
    "",
    f"Fashion-MNIST (Debian's dataset-fashion-mnist), LocalMixer {s['options']} with "
    "`stop_gradient=False` (trained end to end on all heads' losses by backprop, SGD "
    f"momentum 0.9, lr 0.05, batch 64); measured on batches of {s['batch']}, {s['seeds']} "
    "seeds (batch and key) per step. Cosines over the blocks' parameters (heads left out). "
    "Global: the gradient of the total; local: with a stop-gradient between blocks "
    "(LG-BP). The last row of each step is the cosine between those two gradients.",
    "",
    *table.lines(),
    "",
  ]
  return [rep.write_text(out / "local_guess.md", lines)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="local_guess.json",
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
