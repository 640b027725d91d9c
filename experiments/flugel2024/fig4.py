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
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fwdgrad_jax as fg
from experiments._lib import script
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
  p.add_argument("--quick", action="store_true", help="n ≤ 8, 50 steps, 2 seeds (smoke test)")


def _objective(fn, n: int, steps: int, options: dict[str, Any] | None):
  vg = fg.value_and_exact_grad(fn) if options is None else fg.value_and_forward_grad(fn, **options)

  def run(lr, seed):
    key = jax.random.key(seed)
    k0, k1 = jax.random.split(key)
    x0 = jax.random.uniform(k0, (n,), minval=-2.0, maxval=2.0)

    def step(carry, k):
      x, best = carry
      value, g = vg(k, x)
      best = jnp.minimum(best, jnp.where(jnp.isfinite(value), value, jnp.inf))
      return (x - lr * g, best), None

    (x, best), _ = jax.lax.scan(step, (x0, jnp.float32(jnp.inf)), jax.random.split(k1, steps))
    last = fn(x)
    best = jnp.minimum(best, jnp.where(jnp.isfinite(last), last, jnp.inf))
    return jnp.where(jnp.isinf(best), jnp.nan, best)  # never finite: diverged at once

  return run


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.quick:
    args.dims, args.steps, args.seeds, args.per_decade = [1, 2, 4, 8], 50, 2, 1
  lo, hi = args.lr_range
  lrs = lr_search.log_grid(lo, hi, round(math.log10(hi / lo) * args.per_decade) + 1)
  seeds = tuple(range(args.seeds))
  rows = []
  for name in args.functions.split(","):
    tf = functions.FUNCTIONS[name]
    # Rosenbrock starts at n = 2.
    for n in sorted({max(n, tf.min_dim) for n in args.dims}):
      for label, options in _variants(args.ks):
        res = lr_search.search(
          _objective(tf.fn, n, args.steps, options), lrs, seeds, objective_name="best value"
        )
        vals = None
        if res.best_index is not None:
          vals = res.values[res.best_index]
        rows.append(
          dict(
            function=name,
            n=n,
            variant=label,
            best_lr=res.best_lr,
            best_mean=res.best_loss,
            values=vals,
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


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s = result["settings"]
  funcs = list(dict.fromkeys(r["function"] for r in result["rows"]))
  labels = list(dict.fromkeys(r["variant"] for r in result["rows"]))
  plt = records.pyplot()
  fig, axes = plt.subplots(1, len(funcs), figsize=(5 * len(funcs), 4), squeeze=False)
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
      gap = [
        np.nan
        if by[(n, label)]["best_mean"] is None
        else (by[(n, label)]["best_mean"] - by[(n, label)]["minimum"]) / n
        for n in ns
      ]
      if label in colors:
        kw = dict(color=colors[label], lw=2)
      else:
        k = int(label.split("=")[1])
        kw = dict(color=palette[k], ls="-" if label.startswith("mean") else "--")
      ax.plot(ns, np.maximum(gap, 1e-12), marker="o", ms=3, label=label, **kw)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("dimension n")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    lines += [
      "",
      f"## {name}",
      "",
      "| n | " + " | ".join(labels) + " |",
      "|---" * (len(labels) + 1) + "|",
    ]
    for n in ns:
      cells = []
      for label in labels:
        r = by[(n, label)]
        if r["best_mean"] is None:
          cells.append("diverged")
        else:
          cells.append(
            f"{(r['best_mean'] - r['minimum']) / n:.3g}" + ("*" if r["at_grid_edge"] else "")
          )
      lines.append(f"| {n} | " + " | ".join(cells) + " |")
  axes[0][0].set_ylabel("(best value − minimum) / n (floored at 1e-12)")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  png = out / "fig4_functions.png"
  fig.savefig(png, dpi=100)
  plt.close(fig)
  lines += ["", "![best value against n](fig4_functions.png)", ""]
  md = out / "fig4.md"
  md.write_text("\n".join(lines))
  return [md, png]


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
