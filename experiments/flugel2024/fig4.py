"""Flügel et al. 2024, Fig. 4: gradient descent on Sphere, Rosenbrock, Styblinski–Tang against n and k.

For every function, dimension n ∈ {1, 2, 4, …, 1024} (Rosenbrock from n = 2) and gradient
variant — the true gradient, the single-tangent forward gradient (k = 1), and the mean and
orthogonal projection of k ∈ {2, 4, 16} Gaussian tangents — plain gradient descent
x ← x − η ĝ(x) runs for ``--steps`` iterations from x₀ ~ U(−2, 2)ⁿ (one x₀ per seed).
The score of a run is the best value reached (what early stopping on the objective keeps;
a run that diverges keeps its best finite value). Each variant's lr is searched by the
shared vmapped search ``fwdgrad_jax.training.lr_search.search`` (every lr × seed of a variant in one
jitted call) on a log grid, best = lowest mean over the five seeds; reported is that mean.
The raw estimators are used (no ``rescale``): the lr search absorbs their different
lengths, as in the paper.

  python -m experiments.flugel2024.fig4 --out results/flugel2024/fig4      # minutes on 2 cores
  python -m experiments.flugel2024.fig4 --quick                           # a smoke test
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

import fwdgrad_jax as fg
from experiments._lib import report as rep
from experiments._lib import script
from experiments.flugel2024.lib import best_value_of_gd, lr_grid
from fwdgrad_jax import functions
from fwdgrad_jax.training import lr_search, records

FUNCTIONS = ("sphere", "rosenbrock", "styblinski_tang")
KS = (2, 4, 16)


def _variants(ks=KS) -> list[tuple[str, dict[str, Any] | None]]:
  out: list[tuple[str, dict[str, Any] | None]] = [
    ("true gradient", None),
    ("forward k=1", dict(num_tangents=1)),
  ]
  for k in ks:
    out.append((f"mean k={k}", dict(num_tangents=k, aggregation="mean")))
    out.append((f"orthogonal k={k}", dict(num_tangents=k, aggregation="orthogonal")))
  return out


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--dims",
    type=int,
    nargs="+",
    default=[2**i for i in range(11)],
    help="the dimensions n (paper: 1, 2, 4, …, 1024)",
  )
  p.add_argument("--ks", type=int, nargs="+", default=list(KS), help="k > 1 (k = 1 always runs)")
  p.add_argument("--steps", type=int, default=1000, help="gradient-descent iterations")
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--lr-range", type=float, nargs=2, default=(1e-7, 1.0))
  p.add_argument("--per-decade", type=int, default=3)
  p.add_argument("--functions", default=",".join(FUNCTIONS))
  p.add_argument(
    "--quick",
    action="store_true",
    help="Rosenbrock, n = 2, k ≤ 2, 50 steps, 2 seeds (smoke test)",
  )


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.quick:
    args.dims, args.ks, args.steps, args.seeds, args.per_decade = [2], [2], 50, 2, 1
    # Every (function, variant) is a compile through the same code: one function, the
    # one with a smallest dimension.
    args.functions = "rosenbrock"
  lrs = lr_grid(args.lr_range, args.per_decade)
  seeds = tuple(range(args.seeds))
  rows = []
  for name in args.functions.split(","):
    tf = functions.FUNCTIONS[name]
    # Rosenbrock starts at n = 2.
    for n in sorted({max(n, tf.min_dim) for n in args.dims}):
      for label, options in _variants(args.ks):
        est = (
          fg.value_and_exact_grad(tf.fn)
          if options is None
          else fg.value_and_forward_grad(tf.fn, **options)
        )
        objective = best_value_of_gd(est, n, args.steps, fn=tf.fn)
        res = lr_search.search(objective, lrs, seeds, objective_name="best value")
        rows.append(
          dict(
            function=name,
            n=n,
            variant=label,
            best_lr=res.best_lr,
            best_mean=res.best_loss,
            values=None if res.best_index is None else res.values[res.best_index],
            at_grid_edge=res.at_grid_edge,
            minimum=float(tf.minimum(n)),
          )
        )
      print(f"{name} n={n} done", flush=True)
  return dict(
    settings=dict(
      dims=list(args.dims),
      steps=args.steps,
      seeds=list(seeds),
      lrs=list(lrs),
      x0="U(-2, 2)^n per seed",
      tangents="normal",
      estimator="raw (rescale=False)",
      ks=[1, *args.ks],
    ),
    rows=rows,
  )


def _gap(r: dict[str, Any]) -> float:
  """(f_best − f*)/n, NaN for a diverged run."""
  return np.nan if r["best_mean"] is None else (r["best_mean"] - r["minimum"]) / r["n"]


def _cell(r: dict[str, Any]) -> str:
  if r["best_mean"] is None:
    return "diverged"
  return f"{_gap(r):.3g}" + ("*" if r["at_grid_edge"] else "")


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s = result["settings"]
  funcs = list(dict.fromkeys(r["function"] for r in result["rows"]))
  labels = list(dict.fromkeys(r["variant"] for r in result["rows"]))
  fig, axes = rep.pyplot().subplots(1, len(funcs), figsize=(5 * len(funcs), 4), squeeze=False)
  colors = {"true gradient": "k", "forward k=1": "tab:gray"}
  palette = {2: "tab:blue", 4: "tab:orange", 16: "tab:green"}
  lines = [
    "# Fig. 4: best value reached by gradient descent against n",
    "",
    f"{s['steps']} GD steps, x₀ ~ U(−2, 2)ⁿ, Gaussian tangents, raw estimators; lr per "
    f"variant from a log grid of {len(s['lrs'])} values in [{s['lrs'][0]:g}, {s['lrs'][-1]:g}] "
    f"(`lr_search.search`, vmapped); value = mean over {len(s['seeds'])} seeds of the best value "
    f"reached, at the variant's best lr. {records.hardware_line(result.get('provenance'))}",
    "",
    "Values are given as (f_best − f*)/n, the gap to the global minimum per dimension. "
    "`*`: best lr at the edge of the grid.",
  ]
  for ax, name in zip(axes[0], funcs):
    rows = [r for r in result["rows"] if r["function"] == name]
    ns = sorted({r["n"] for r in rows})
    by = {(r["n"], r["variant"]): r for r in rows}
    for label in labels:
      if label in colors:
        kw = dict(color=colors[label], lw=2)
      else:
        k = int(label.split("=")[1])
        kw = dict(color=palette[k], ls="-" if label.startswith("mean") else "--")
      gap = [_gap(by[(n, label)]) for n in ns]
      ax.plot(ns, np.maximum(gap, 1e-12), marker="o", ms=3, label=label, **kw)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("dimension n")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    table = rep.Table(["n", *labels])
    for n in ns:
      table.add_row(n, *(_cell(by[(n, label)]) for label in labels))
    lines += ["", f"## {name}", "", *table.lines()]
  axes[0][0].set_ylabel("(best value − minimum) / n (floored at 1e-12)")
  axes[0][-1].legend(fontsize=7)
  png = rep.save_figure(fig, out / "fig4_functions.png")
  lines += ["", "![best value against n](fig4_functions.png)", ""]
  return [rep.write_text(out / "fig4.md", lines), png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="fig4.json",
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
