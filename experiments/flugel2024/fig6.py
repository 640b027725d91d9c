"""Flügel et al. 2024, Fig. 6: fully connected ReLU nets on Fashion-MNIST, k tangents, mean vs orthogonal.

Networks 784-w-w-10 (two hidden ReLU layers, the project's ``mlp`` model) trained with
plain SGD at a constant lr, batch 64, from the same initialisation. Gradient variants:
backprop; forward gradients with **activity perturbation** (the paper's setting: tangents
on the outputs of every Linear, per-example directional derivatives, the weights' estimate
by the local VJP; ``perturbation="activity"``) for k ∈ {1, 2, 4, 16}, mean and orthogonal
(per-example projection); and beside them weight perturbation (dense Gaussian tangents on
the parameters) for the same k. The raw estimators (no ``rescale``), as the paper: every
variant's lr is chosen from a log grid (validation on 5,000 examples held out of the
training set), all lrs of a variant trained in one jitted, vmapped call and scored by the
project's one rule, ``fwdgrad_jax.training.lr_search.summarize_curves``: the lowest final
validation loss (mean of the last 3 evaluations), lrs whose run diverged or was unstable
(final > 1.5 × its best) not eligible — not the paper's best validation loss, which
rewards a run that dips once and blows up. Early stopping is read off the evaluations of
the chosen lr: the reported test error is the one at the evaluation with the best
validation loss (the paper's protocol; ``test_error_final`` is the last evaluation's).

REDUCED budget (2 shared CPU cores): ``--steps`` SGD steps (default 600, ≈0.7 epoch of
batch 64) instead of 100 epochs with early stopping after 10, one seed, widths 256 and 1024
(4096 is out of reach here), a 5-point lr grid; see the recorded command in the JSON.

  python -m experiments.flugel2024.fig6 --out results/flugel2024/fig6      # the recorded run
  python -m experiments.flugel2024.fig6 --quick                           # a smoke test
"""

from __future__ import annotations

import argparse
import time
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

#: Log grids per family and aggregation. The raw estimates' lengths differ by orders of
#: magnitude (mean: about √(n/k) × ‖∇f‖; orthogonal projection: about √(k/n) × ‖∇f‖, with n
#: the perturbed dimension — activations per example for activity perturbation, weights for
#: weight perturbation), so each grid is placed around backprop's lr divided by that ratio.
LRS = {
  "backprop": (0.03, 0.1, 0.3, 1.0),
  "activity mean": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
  "activity orthogonal": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
  "weights mean": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
  "weights orthogonal": (1.0, 10.0, 100.0, 1000.0, 1e4),
}


def _grid(fam: str, options: dict[str, Any] | None) -> tuple[float, ...]:
  if options is None:
    return LRS["backprop"]
  return LRS[f"{fam} {options['aggregation']}"]


def _variants(ks, weights: bool) -> list[tuple[str, str, dict[str, Any] | None]]:
  out: list[tuple[str, str, dict[str, Any] | None]] = [("backprop", "backprop", None)]
  families = ["activity", "weights"] if weights else ["activity"]
  for fam in families:
    for k in ks:
      for agg in ("mean", "orthogonal") if k > 1 else ("mean",):
        opts = dict(num_tangents=k, aggregation=agg)
        if fam == "activity":
          opts["perturbation"] = "activity"
        out.append((f"{fam} {agg} k={k}" if k > 1 else f"{fam} k=1", fam, opts))
  return out


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
  p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 16])
  p.add_argument(
    "--weights-widths",
    type=int,
    nargs="*",
    default=[256],
    help="widths that also run weight perturbation",
  )
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--val-examples", type=int, default=5000)
  p.add_argument(
    "--eval-examples",
    type=int,
    default=2000,
    help="validation examples evaluated at each eval (of the held-out split)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="width 32, k = 1, 20 steps")


def _train_all_lrs(per_example_loss, loss, apply, params, ds, lrs, args, options):
  """Trains one variant at every lr (vmapped); returns per lr: val losses, test losses/errors."""
  if options is None:
    est = fg.value_and_exact_grad(loss)
    target = loss
  else:
    target = per_example_loss if options.get("perturbation") == "activity" else loss
    est = fg.value_and_forward_grad(target, **options)
  n_evals = args.steps // args.eval_every

  def evaluate(p, xv, yv, xt, yt):
    def chunk(xs, ys):
      logits = apply(p, xs)
      return steps_lib.cross_entropy(logits, ys), jnp.mean(jnp.argmax(logits, -1) != ys)

    vl, _ = chunk(xv, yv)
    tl, te = chunk(xt, yt)
    return vl, tl, te

  # The data and the initial parameters are arguments, not closed-over constants: XLA
  # would constant-fold computations on them at compile time (minutes on CPU).
  def run(lr, seed, params, x, y, xv, yv, xt, yt):
    key = jax.random.key(seed)
    on_batches = minibatch(est, x, y, args.batch_size)

    def block(p, k):
      p, _ = sgd(on_batches, p, k, lr, args.eval_every)
      return p, evaluate(p, xv, yv, xt, yt)

    _, (vl, tl, te) = jax.lax.scan(block, params, jax.random.split(key, n_evals))
    return vl, tl, te

  fn = jax.jit(jax.vmap(run, in_axes=(0, *[None] * 8)))
  t0 = time.perf_counter()
  out = fn(
    jnp.asarray(lrs, jnp.float32),
    args.seed,
    params,
    ds.x_train,
    ds.y_train,
    ds.x_val[: args.eval_examples],
    ds.y_val[: args.eval_examples],
    ds.x_test,
    ds.y_test,
  )
  vl, tl, te = (np.asarray(a, np.float64) for a in out)
  return vl, tl, te, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.quick:
    # Every variant is a compile: backprop and k = 1 of both families (activity perturbation
    # estimates the per-example loss, weight perturbation the mean), not more ks.
    args.widths, args.ks, args.weights_widths, args.steps, args.eval_every = (
      [32],
      [1],
      [32],
      20,
      10,
    )
  ds = data.load("fashion_mnist", val_size=args.val_examples, seed=args.seed)
  rows = []
  for width in args.widths:
    model = models.create(
      "mlp",
      input_shape=ds.input_shape,
      num_classes=10,
      rngs=nnx.Rngs(args.seed),
      hidden=[width, width],
    )
    graphdef, params, rest = models.split(model)
    params = jax.tree.map(jnp.asarray, params)
    num_params = models.count_params(params)
    loss = steps_lib.make_loss(graphdef, rest)
    per_example = steps_lib.make_loss(graphdef, rest, per_example=True)
    apply = models.apply_fn(graphdef, rest)
    for label, fam, options in _variants(args.ks, width in args.weights_widths):
      lrs = _grid(fam, options)
      vl, tl, te, secs = _train_all_lrs(per_example, loss, apply, params, ds, lrs, args, options)
      search = lr_search.summarize_curves(lrs, [args.seed], [[row.tolist()] for row in vl])
      i = None if search.best_lr is None else list(lrs).index(search.best_lr)
      if i is not None:
        finite = np.isfinite(vl[i])
        j = int(np.argmin(np.where(finite, vl[i], np.inf)))  # early stopping on val loss
        last = int(finite.sum()) - 1  # the last evaluation before any blow-up
        test_error, test_loss_curve = float(te[i, j]), tl[i].tolist()
        test_error_final = float(te[i, last]) if last >= 0 else None
        best_val_loss = float(vl[i, j])
      else:
        test_error = test_loss_curve = test_error_final = best_val_loss = None
      rows.append(
        dict(
          width=width,
          num_params=num_params,
          variant=label,
          family=fam,
          k=0 if options is None else options["num_tangents"],
          aggregation=None if options is None else options["aggregation"],
          best_lr=search.best_lr,
          at_grid_edge=search.at_grid_edge,
          final_val_loss=search.best_loss,
          best_val_loss=best_val_loss,
          test_error=test_error,
          test_error_final=test_error_final,
          test_loss_curve=test_loss_curve,
          seconds_all_lrs=secs,
          search=search.as_dict(),
        )
      )
      print(
        f"w={width} {label}: lr {search.best_lr} test err {test_error} ({secs:.0f}s)", flush=True
      )
  return dict(
    settings=dict(
      data="fashion_mnist",
      widths=args.widths,
      ks=args.ks,
      weights_widths=args.weights_widths,
      steps=args.steps,
      eval_every=args.eval_every,
      batch_size=args.batch_size,
      val_examples=args.val_examples,
      eval_examples=args.eval_examples,
      seed=args.seed,
      lrs=LRS,
      optimizer="sgd, constant lr",
      estimator="raw (rescale=False), Gaussian tangents",
    ),
    rows=rows,
  )


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s = result["settings"]
  widths = s["widths"]
  plt = records.pyplot()
  fig, axes = plt.subplots(1, 1 + len(widths), figsize=(5 * (1 + len(widths)), 4))
  palette = {1: "tab:gray", 2: "tab:blue", 4: "tab:orange", 16: "tab:green"}
  lines = [
    "# Fig. 6: fully connected ReLU nets on Fashion-MNIST",
    "",
    f"784-w-w-10, SGD at a constant lr, batch {s['batch_size']}, **{s['steps']} steps** "
    f"(REDUCED: the paper trains up to 100 epochs with early stopping after 10), one seed; "
    f"lr per variant = lowest final validation loss, mean of the last 3 evaluations, unstable "
    f"(final > 1.5 × best) and diverged lrs out ({s['eval_examples']} of {s['val_examples']} held-out "
    f"examples, evaluated every {s['eval_every']} steps); test error (10,000 test images) at "
    f"the evaluation with the best validation loss. Raw estimators, Gaussian tangents. "
    f"{records.hardware_line(result.get('provenance'))}",
    "",
  ]
  table = rep.Table(
    ["width", "params", "variant", "best lr", "final val loss", "best val loss", "test error"]
  )
  for r in result["rows"]:
    lr = rep.num(r["best_lr"], "g") + (
      "*" if r["best_lr"] is not None and r["at_grid_edge"] else ""
    )
    err = rep.num(None if r["test_error"] is None else 100 * r["test_error"], ".1f")
    err += "" if r["test_error"] is None else "%"
    table.add_row(
      r["width"],
      f"{r['num_params']:,}",
      r["variant"],
      lr,
      rep.num(r.get("final_val_loss")),  # not in results written before the rule
      rep.num(r["best_val_loss"]),
      err,
    )
  lines += [*table.lines(), ""]
  lines.append("`*`: best lr at the edge of its grid.")
  lines += ["", "Grids (* = kept, (div) = diverged, (unstable) = unstable):", ""]
  for r in result["rows"]:
    cells = lr_search.cells(r["search"], rep.num)
    lines.append(f"- width {r['width']}, {r['variant']}: " + ", ".join(cells))
  lines.append("")
  # Left: best test error against k per width and aggregation (activity perturbation).
  ax = axes[0]
  for width, marker in zip(widths, "os^"):
    rows = [r for r in result["rows"] if r["width"] == width]
    bp = [r for r in rows if r["family"] == "backprop"][0]
    for agg, ls in (("mean", "--"), ("orthogonal", "-")):
      pts = sorted(
        (r["k"], r["test_error"])
        for r in rows
        if r["family"] == "activity"
        and (r["aggregation"] == agg or r["k"] == 1)
        and r["test_error"] is not None
      )
      if pts:
        ax.plot(*zip(*pts), ls=ls, marker=marker, label=f"w={width} activity {agg}")
    if bp["test_error"] is not None:
      ax.axhline(bp["test_error"], ls=":", color="k", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k")
  ax.set_ylabel("test error at best val loss (dotted: backprop)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  # Right: test-loss curves per width.
  for ax, width in zip(axes[1:], widths):
    for r in result["rows"]:
      if r["width"] != width or r["test_loss_curve"] is None or r["family"] == "weights":
        continue
      steps = [s["eval_every"] * (i + 1) for i in range(len(r["test_loss_curve"]))]
      if r["family"] == "backprop":
        kw = dict(color="k", lw=2)
      else:
        kw = dict(
          color=palette.get(r["k"], "tab:red"),
          ls="-" if r["aggregation"] == "orthogonal" and r["k"] > 1 else "--",
        )
      ax.plot(steps, r["test_loss_curve"], label=r["variant"], **kw)
    ax.set_title(f"width {width}: test loss at the best lr")
    ax.set_xlabel("SGD step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  png = rep.save_figure(fig, out / "fig6_fc.png")
  lines += ["", "![test error against k and test-loss curves](fig6_fc.png)", ""]
  md = out / "fig6.md"
  md.write_text("\n".join(lines))
  return [md, png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="fig6.json",
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
