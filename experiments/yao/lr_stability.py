"""Yao Figs. 5–6: the largest learning rate at which each scheme trains without a NaN.

Plain SGD at a constant lr (no schedule) on Fashion-MNIST with the RAW estimates of
backprop, the naive forward gradient (one Gaussian tangent), averaging of 3 directions,
the direction partition (3 blocks, summed), and Yao's input-generated tangents (QR and
the approximation). For each scheme the lr grid is run in ascending order, all seeds of
one lr in one vmapped, jitted call (``experiments.yao.lib.sgd_run``); once two consecutive
lrs diverged on every seed, the larger lrs are not run (recorded as diverged-by-trend,
``ran: false``). A run diverged when its loss became NaN/inf; it "trains" when the mean
loss of its last tenth of steps is below the initial loss by more than 0.05.

Paper (MNIST, its own budget): naive forward gradient stable up to lr 3e-4; averaging of
3 directions, the partition and input-generated tangents train at 1e-3 (100 directions
and 10 partitions at 1e-2). Ours is a REDUCED budget: a few hundred steps, two seeds.

  python -m experiments.yao.lr_stability --model mlp --out results/yao
  python -m experiments.yao.lr_stability --model yao_cnn --steps 200 --out results/yao
  python -m experiments.yao.lr_stability --quick     # a smoke test
"""

from __future__ import annotations

import os

# LAPACK (the QR of the input-generated tangents) on a shared 2-core machine: OpenBLAS's
# own threads oversubscribe it (a 1024x64 QR took 0.2-1.4 s instead of 1 ms).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax.training import records

DEFAULT_SCHEMES = "naive,average k=3,partition k=3,input (QR),input approx,backprop"
PAPER = {
  "naive": "3e-4 (largest without NaN)",
  "average k=3": "trains at 1e-3",
  "partition k=3": "trains at 1e-3",
  "input (QR)": "trains at 1e-3",
  "input approx": "trains at 1e-3",
  "backprop": "trains at 1e-3 and 1e-2",
}


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="mlp", choices=("mlp", "yao_cnn"))
  p.add_argument("--schemes", default=DEFAULT_SCHEMES, help="comma-separated labels")
  p.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument(
    "--stop-after", type=int, default=2, help="diverged lrs in a row that end a scheme"
  )
  p.add_argument("--quick", action="store_true", help="10 steps, 3 lrs, 1 scheme, MLP 784-64-64-10")


def _result_file(args: argparse.Namespace) -> str:
  return f"lr_stability_{args.model}.json"


def run(args: argparse.Namespace) -> dict[str, Any]:
  import jax.numpy as jnp

  from experiments.yao import lib as yao
  from fwdgrad_jax import data

  lrs = sorted(float(x) for x in args.lrs.split(","))
  seeds = [int(s) for s in args.seeds.split(",")]
  schemes = args.schemes.split(",")
  if args.quick:
    # One compile per scheme (the lrs share it): one scheme through the same code.
    args.steps, lrs, schemes = 10, lrs[2:5], schemes[:1]
  ds = data.load("fashion_mnist")
  # The smoke test checks the run end to end, not the numbers: a narrow MLP.
  options = {"hidden": (64, 64)} if args.quick and args.model == "mlp" else None
  problem = yao.make_problem(args.model, ds.x_train, ds.y_train, options=options)
  out = []
  for label in schemes:
    est = yao.estimator_config(label)
    fn = _runner(problem, est, args)
    runs, streak = [], 0
    for lr in lrs:
      if streak >= args.stop_after:
        runs.append(dict(lr=lr, ran=False, curves=None))
        continue
      t0 = time.perf_counter()
      curves = np.asarray(fn(jnp.float32(lr), jnp.asarray(seeds, jnp.int32))["loss"], np.float64)
      secs = time.perf_counter() - t0
      diverged = [bool(not np.all(np.isfinite(c))) for c in curves]
      streak = streak + 1 if all(diverged) else 0
      runs.append(dict(lr=lr, ran=True, curves=curves.tolist(), seconds=secs))
      print(f"{label} lr {lr:g}: diverged {diverged} ({secs:.0f} s)", flush=True)
    out.append(dict(label=label, estimator=vars(est), **_assess(runs, seeds, args.steps)))
  return dict(
    settings=dict(
      model=args.model,
      num_params=problem.num_params,
      data=f"fashion_mnist (train split, {problem.x.shape[0]} examples)",
      steps=args.steps,
      batch_size=args.batch_size,
      seeds=seeds,
      lrs=lrs,
      optimizer="plain SGD, constant lr, raw estimates (rescale=false)",
    ),
    schemes=out,
  )


def _runner(problem, est, args):
  """``fn(lr, seeds) -> {"loss": (seeds, steps)}`` for one scheme.

  The MLP runs as one jitted ``lax.scan`` vmapped over the seeds; the CNN is stepped
  from the host (convolutions inside an XLA:CPU loop run ~20x slower, jax-ml/jax#12868).
  The QR scheme vmapped over seeds hung here (every thread waiting on a futex, in the
  batched LAPACK QR call): its seeds run one after the other.
  """
  import jax
  import jax.numpy as jnp

  from experiments.yao import lib as yao

  kw = dict(batch_size=args.batch_size)
  seq = est.tangents == "input"
  # The problem (its data) is an argument of every program, not a constant compiled in.
  if args.model == "mlp":
    one = jax.jit(lambda prob, lr, s: yao.sgd_run(prob, est, lr=lr, seed=s, steps=args.steps, **kw))
    if seq:
      return lambda lr, seeds: {"loss": jnp.stack([one(problem, lr, s)["loss"] for s in seeds])}
    batched = jax.jit(jax.vmap(one, in_axes=(None, None, 0)))
    return lambda lr, seeds: batched(problem, lr, seeds)

  def init(prob, s):
    return yao.sgd_init(prob, est, seed=s)

  def step(prob, c, lr, t):
    return yao.sgd_step(prob, est, c, t, lr=lr, **kw)

  if not seq:
    init = jax.vmap(init, in_axes=(None, 0))
    step = jax.vmap(step, in_axes=(None, 0, None, None))
  init, step = jax.jit(init), jax.jit(step, donate_argnums=1)

  def hosted(seeds_, lr):
    carry, losses = init(problem, seeds_), []
    for t in range(args.steps):
      carry, out = step(problem, carry, lr, jnp.int32(t))
      losses.append(out["loss"])
    return jnp.stack(losses, axis=-1)

  if seq:
    return lambda lr, seeds: {"loss": jnp.stack([hosted(s, lr) for s in seeds])}
  return lambda lr, seeds: {"loss": hosted(seeds, lr)}


def _assess(runs: list[dict[str, Any]], seeds: list[int], steps: int) -> dict[str, Any]:
  from fwdgrad_jax.training import lr_search

  tail = max(1, steps // 10)
  values, diverged, trains, first_nan = [], [], [], []
  for r in runs:
    if not r["ran"]:
      values.append([None] * len(seeds))
      diverged.append([True] * len(seeds))
      trains.append(False)
      first_nan.append(None)
      continue
    c = np.asarray(r["curves"])
    fin = np.all(np.isfinite(c), axis=1)
    final = [float(np.mean(row[-tail:])) if ok else None for row, ok in zip(c, fin)]
    values.append(final)
    diverged.append([not ok for ok in fin])
    trains.append(bool(all(f is not None and f < row[0] - 0.05 for f, row in zip(final, c))))
    bad = [int(np.argmax(~np.isfinite(row))) for row, ok in zip(c, fin) if not ok]
    first_nan.append(min(bad) if bad else None)
  search = lr_search.summarize(
    [r["lr"] for r in runs],
    seeds,
    values,
    diverged,
    objective=f"mean loss of the last {tail} steps",
  )
  no_nan = [r["lr"] for r, d in zip(runs, diverged) if not any(d)]
  # The largest lr below which no lr diverged (a stable prefix of the grid).
  stable = None
  for r, d in zip(runs, diverged):
    if any(d):
      break
    stable = r["lr"]
  return dict(
    runs=runs,
    search=search.as_dict(),
    trains=trains,
    first_nan_step=first_nan,
    largest_lr_no_nan=max(no_nan) if no_nan else None,
    largest_stable_prefix_lr=stable,
    largest_lr_training=max([r["lr"] for r, t in zip(runs, trains) if t], default=None),
  )


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s, prov = result["settings"], result["provenance"]
  model = s["model"]
  lines = [
    f"# Yao Figs. 5–6: learning-rate stability ({model})",
    "",
    *[f"`{c}`" for c in result.get("merged_from") or [prov["command"]]],
    "",
    records.hardware_line(prov),
    "",
    f"{model} ({s['num_params']:,} parameters) on {s['data']}, {s['optimizer']}, batch "
    f"{s['batch_size']}, **{s['steps']} steps** (REDUCED: the paper trains to convergence), "
    f"seeds {s['seeds']}. No NaN = every seed finite for all steps; trains = every seed's "
    "mean loss over the last tenth of the steps is below its first loss − 0.05.",
    "",
  ]
  cols = ["scheme", "largest lr without NaN", "largest lr that trains"]
  table = rep.Table([*cols, "lrs with a NaN (first NaN step)", "paper"])
  for sc in result["schemes"]:
    bad = [
      f"{r['lr']:g} ({'–' if n is None else n})" if r["ran"] else f"{r['lr']:g} (not run)"
      for r, n, d in zip(sc["runs"], sc["first_nan_step"], sc["search"]["diverged"])
      if any(d)
    ]
    largest = (rep.num(sc[x], "g") for x in ("largest_stable_prefix_lr", "largest_lr_training"))
    table.add_row(sc["label"], *largest, ", ".join(bad) or "none", PAPER.get(sc["label"], rep.DASH))
  lines += table.lines()
  lines += ["", "Final loss (mean of the last tenth of steps, mean over seeds; – diverged):", ""]
  table = rep.Table(["scheme", *(f"{lr:g}" for lr in s["lrs"])])
  for sc in result["schemes"]:
    cells = [rep.num(c) for c in sc["search"]["curve"]]
    cells = [c if not any(d) else rep.DASH for c, d in zip(cells, sc["search"]["diverged"])]
    table.add_row(sc["label"], *cells)
  lines += table.lines()
  png = out / f"lr_stability_{model}.png"
  lines += ["", f"![loss curves per lr]({png.name})", ""]
  _plot(result, png)
  md = out / f"lr_stability_{model}.md"
  md.write_text("\n".join(lines) + "\n")
  return [md, png]


def _plot(result: dict[str, Any], png: Path) -> None:
  plt = records.pyplot()
  schemes = result["schemes"]
  lrs = result["settings"]["lrs"]
  cols = min(3, len(schemes))
  rows = math.ceil(len(schemes) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  cmap = plt.get_cmap("viridis")
  for ax, sc in zip(axes.flat, schemes):
    for i, r in enumerate(sc["runs"]):
      if not r["ran"]:
        continue
      c = np.asarray(r["curves"][0], np.float64)
      ok = np.isfinite(c)
      label = f"{r['lr']:g}" + ("" if ok.all() else f" NaN@{int(np.argmax(~ok))}")
      ax.plot(np.arange(len(c))[ok], c[ok], color=cmap(i / max(1, len(lrs) - 1)), label=label, lw=1)
    ax.set_title(sc["label"], fontsize=10)
    ax.set_ylim(0, 4)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, title="lr (seed 0)", title_fontsize=6)
  for ax in list(axes.flat)[len(schemes) :]:
    ax.axis("off")
  axes[0, 0].set_ylabel("minibatch loss")
  fig.suptitle(f"{result['settings']['model']}: SGD at a constant lr, raw estimates", fontsize=10)
  rep.save_figure(fig, png, dpi=90)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file=_result_file,
    description=__doc__,
    add_arguments=_add_arguments,
    merge=functools.partial(records.merge_by_label, key="schemes"),
    argv=argv,
  )


if __name__ == "__main__":
  main()
