"""Does one learning rate transfer across k and aggregations? With and without ``rescale``.

For every k ∈ {1, 4, 16} and aggregation (mean, sum, orthogonal), the shared vmapped lr
search (``fwdgrad_jax.training.lr_search.search``: the whole lr × seed grid in one jitted call)
trains a small MLP on Fashion-MNIST with SGD and forward gradients, once with the raw
estimate and once with ``rescale=True`` (the estimate divided by its expected length
ratio to ∇f, ``fwdgrad_jax.expected_norm_ratio``). The objective is the validation loss at
the end of the run (a diverged run counts as diverged). The result: the best lr of every
variant, and how far the best lrs spread across variants with and without the rescaling
(Flügel et al. name an lr that transfers across k as open work).

  python -m experiments.flugel2024.lr_transfer                       # the recorded run (minutes on 2 cores)
  python -m experiments.flugel2024.lr_transfer --quick               # a smoke test
  python -m experiments.flugel2024.lr_transfer --report-only results/lr_transfer/lr_transfer.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fwdgrad_jax as fg
from experiments._lib import report as rep
from experiments._lib import script
from experiments._lib.sgd import minibatch, sgd
from fwdgrad_jax import data, models
from fwdgrad_jax.training import lr_search, records
from fwdgrad_jax.training import steps as steps_lib

KS = (1, 4, 16)
AGGREGATIONS = ("mean", "sum", "orthogonal")


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--hidden", type=int, default=32, help="MLP width (784-H-10)")
  p.add_argument("--steps", type=int, default=300, help="SGD steps per run")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--train-examples", type=int, default=8192)
  p.add_argument("--val-examples", type=int, default=2000)
  p.add_argument("--lr-range", type=float, nargs=2, default=(1e-6, 1e4))
  p.add_argument("--per-decade", type=int, default=3, help="grid points per decade")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument(
    "--quick",
    action="store_true",
    help="tiny grid, MLP 784-8-10, k = 4 orthogonal (smoke test)",
  )


def _problem(args: argparse.Namespace):
  ds = data.load("fashion_mnist", val_size=args.val_examples, seed=0)
  model = models.create(
    "mlp", input_shape=ds.input_shape, num_classes=10, rngs=nnx.Rngs(0), hidden=[args.hidden]
  )
  graphdef, params, rest = models.split(model)
  params = jax.tree.map(jnp.asarray, params)
  loss = steps_lib.make_loss(graphdef, rest)
  x, y = ds.x_train[: args.train_examples], ds.y_train[: args.train_examples]
  return loss, params, (x, y), (ds.x_val, ds.y_val)


def _objective(loss, params, train, val, *, steps, batch_size, estimator):
  on_batches = minibatch(estimator, *train, batch_size)

  def run(lr, seed):
    final, _ = sgd(on_batches, params, jax.random.key(seed), lr, steps)
    return loss(final, *val)

  return run


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.quick:
    # The objective closes over its data (a constant of each compile): few examples.
    args.steps, args.seeds, args.per_decade, args.train_examples = 20, 1, 1, 128
    args.hidden, args.val_examples = 8, 64
    args.lr_range = (1e-3, 1e1)
  # Every variant is its own compile, through the same code: the smoke test runs one k and
  # aggregation (k > 1, the projected one), raw and rescaled (the report pairs them).
  ks, aggregations = ((4,), ("orthogonal",)) if args.quick else (KS, AGGREGATIONS)
  lo, hi = args.lr_range
  lrs = lr_search.log_grid(lo, hi, round(np.log10(hi / lo) * args.per_decade) + 1)
  seeds = tuple(range(args.seeds))
  loss, params, train, val = _problem(args)
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  searches = []
  for rescale in (False, True):
    for k in ks:
      for agg in aggregations:
        est = fg.value_and_forward_grad(loss, num_tangents=k, aggregation=agg, rescale=rescale)
        objective = _objective(
          loss, params, train, val, steps=args.steps, batch_size=args.batch_size, estimator=est
        )
        result = lr_search.search(objective, lrs, seeds, objective_name="final val loss")
        print(f"rescale={rescale} k={k:2d} {agg:10s} best lr {result.best_lr}", flush=True)
        searches.append(dict(rescale=rescale, k=k, aggregation=agg, search=result.as_dict()))
  bp = lr_search.search(
    _objective(
      loss,
      params,
      train,
      val,
      steps=args.steps,
      batch_size=args.batch_size,
      estimator=fg.value_and_exact_grad(loss),
    ),
    lrs,
    seeds,
    objective_name="final val loss",
  )
  return dict(
    settings=dict(
      model=f"mlp 784-{args.hidden}-10",
      num_params=n,
      steps=args.steps,
      batch_size=args.batch_size,
      train_examples=args.train_examples,
      val_examples=args.val_examples,
      lrs=list(lrs),
      seeds=list(seeds),
      ks=list(ks),
      aggregations=list(aggregations),
      data="fashion_mnist",
      optimizer="sgd (constant lr)",
      tangents="normal",
    ),
    searches=searches,
    backprop=bp.as_dict(),
  )


def _spread(rows: list[dict[str, Any]]) -> float | None:
  best = [r["search"]["best_lr"] for r in rows if r["search"]["best_lr"] is not None]
  return max(best) / min(best) if best else None


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s = result["settings"]
  rows = {(r["rescale"], r["k"], r["aggregation"]): r["search"] for r in result["searches"]}
  lines = [
    "# One learning rate across k and aggregations",
    "",
    f"{s['model']} ({s['num_params']:,} params) on Fashion-MNIST ({s['train_examples']} "
    f"training examples, {s['val_examples']} validation), SGD at a constant lr for "
    f"{s['steps']} steps of batch {s['batch_size']}, Gaussian tangents; best lr = the lowest "
    f"final validation loss, mean of {len(s['seeds'])} seeds, on a log grid of "
    f"{len(s['lrs'])} lrs from {s['lrs'][0]:g} to {s['lrs'][-1]:g} "
    "(`fwdgrad_jax.training.lr_search.search`: the whole grid in one jitted call).",
    "",
  ]
  table = rep.Table(
    [
      "k",
      "aggregation",
      "best lr, raw",
      "best lr, rescale=True",
      "val loss, raw",
      "val loss, rescaled",
    ]
  )
  ks, aggregations = s.get("ks", KS), s.get("aggregations", AGGREGATIONS)
  for k in ks:
    for agg in aggregations:
      raw, res = rows[(False, k, agg)], rows[(True, k, agg)]
      lrs = (rep.num(r["best_lr"], ".3g") for r in (raw, res))
      table.add_row(k, agg, *lrs, rep.num(raw["best_loss"]), rep.num(res["best_loss"]))
  lines += table.lines()
  bp = result["backprop"]
  raw_spread = _spread([r for r in result["searches"] if not r["rescale"]])
  res_spread = _spread([r for r in result["searches"] if r["rescale"]])
  lines += [
    "",
    f"Backprop on the same runs: best lr {rep.num(bp['best_lr'], '.3g')}, val loss {rep.num(bp['best_loss'])}.",
    "",
    f"**Spread of the best lr across the {len(ks) * len(aggregations)} variants** "
    "(largest / smallest): raw "
    f"**{rep.num(raw_spread, '.3g')}×**, with `rescale=True` **{rep.num(res_spread, '.3g')}×**.",
    "",
    "![best loss against lr](lr_transfer.png)",
  ]
  plt = records.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, rescale in zip(axes, (False, True)):
    for r in result["searches"]:
      if r["rescale"] != rescale:
        continue
      search = lr_search.LrSearch.from_dict(r["search"])
      style = {"mean": "-", "sum": "--", "orthogonal": ":"}[r["aggregation"]]
      curve = np.array([np.nan if v is None else v for v in search.curve])
      ax.plot(search.lrs, curve, style, label=f"k={r['k']} {r['aggregation']}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_title("rescale=True" if rescale else "raw estimate")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("final validation loss (mean over seeds)")
  axes[1].legend(fontsize=7, ncol=3)
  png = rep.save_figure(fig, out / "lr_transfer.png")
  md = out / "lr_transfer.md"
  md.write_text("\n".join(lines) + "\n")
  return [md, png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="lr_transfer.json",
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
