"""Flügel et al. 2024, Fig. 5: tangents at a fixed angle α to the first one (a cone).

Tangents from ``fwdgrad_jax.tangents.cone(α)``: v₁ Gaussian, every further tangent a
Gaussian draw rotated in the plane of (v₁, wᵢ) to the angle α from v₁. Two measurements
against α, for k ∈ {4, 16} and the mean vs the orthogonal projection:

* the cosine similarity of the estimate to a fixed gradient in n dimensions (mean over
  many seeds), beside independent Gaussian tangents (no cone) as the reference;
* the best value that gradient descent reaches on Styblinski–Tang in n dimensions, with
  the lr searched per (α, k, aggregation) by the vmapped ``lr_search.search`` (as Fig. 4:
  best value along the run, mean over 5 seeds, x₀ ~ U(−2, 2)ⁿ).

The span of the coned tangents is that of the unrotated draws, so the orthogonal
projection should not depend on α, while the mean collapses onto v₁ as α shrinks.

  python -m experiments.flugel2024.fig5 --out results/flugel2024/fig5      # minutes on 2 cores
  python -m experiments.flugel2024.fig5 --quick                           # a smoke test
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
from experiments._lib import report as rep
from experiments._lib import script
from experiments.flugel2024.lib import best_value_of_gd, lr_grid
from fwdgrad_jax import functions
from fwdgrad_jax.training import lr_search, records

ANGLES_DEG = (5, 15, 30, 45, 60, 90)
KS = (4, 16)
AGGREGATIONS = ("mean", "orthogonal")


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--angles", type=float, nargs="+", default=list(ANGLES_DEG), help="α in degrees")
  p.add_argument("--ks", type=int, nargs="+", default=list(KS))
  p.add_argument("--n", type=int, default=64, help="dimension (cosine and Styblinski–Tang)")
  p.add_argument("--cos-seeds", type=int, default=500)
  p.add_argument("--steps", type=int, default=1000, help="GD iterations on Styblinski–Tang")
  p.add_argument("--seeds", type=int, default=5, help="seeds of the Styblinski–Tang runs")
  p.add_argument("--lr-range", type=float, nargs=2, default=(1e-5, 1.0))
  p.add_argument("--per-decade", type=int, default=3)
  p.add_argument(
    "--quick", action="store_true", help="n=8, k=4, one angle, few seeds and steps (smoke test)"
  )


def _tangents(angle_deg: float | None):
  return "normal" if angle_deg is None else fg.tangents.cone(math.radians(angle_deg))


def _cosine(n: int, seeds: int, k: int, agg: str, angle_deg: float | None) -> tuple[float, float]:
  g = jax.random.normal(jax.random.key(12345), (n,))
  est = fg.value_and_forward_grad(
    lambda x: jnp.dot(g, x), num_tangents=k, aggregation=agg, tangents=_tangents(angle_deg)
  )
  cos = jax.jit(jax.vmap(lambda key: fg.cosine_similarity(est(key, jnp.zeros(n))[1], g)))(
    jax.random.split(jax.random.key(0), seeds)
  )
  cos = np.asarray(cos, np.float64)
  return float(cos.mean()), float(cos.std(ddof=1) / math.sqrt(cos.size))


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.quick:
    args.n, args.cos_seeds, args.steps, args.seeds, args.per_decade = 8, 50, 50, 2, 1
    # Every (k, aggregation, angle) is two compiles through the same code: one cone angle
    # beside the Gaussian tangents.
    args.ks, args.angles = [4], [30.0]
  lrs = lr_grid(args.lr_range, args.per_decade)
  seeds = tuple(range(args.seeds))
  rows = []
  for k in args.ks:
    for agg in AGGREGATIONS:
      for angle in (*args.angles, None):
        cos, cos_se = _cosine(args.n, args.cos_seeds, k, agg, angle)
        est = fg.value_and_forward_grad(
          functions.styblinski_tang, num_tangents=k, aggregation=agg, tangents=_tangents(angle)
        )
        objective = best_value_of_gd(est, args.n, args.steps)
        res = lr_search.search(objective, lrs, seeds, objective_name="best value")
        rows.append(
          dict(
            k=k,
            aggregation=agg,
            angle_deg=angle,
            cos_mean=cos,
            cos_se=cos_se,
            st_best=res.best_loss,
            st_best_lr=res.best_lr,
            st_values=None if res.best_index is None else res.values[res.best_index],
            at_grid_edge=res.at_grid_edge,
          )
        )
        print(f"k={k} {agg} angle={angle}: cos {cos:.3f}, ST {res.best_loss}", flush=True)
  return dict(
    settings=dict(
      n=args.n,
      cos_seeds=args.cos_seeds,
      steps=args.steps,
      seeds=list(seeds),
      lrs=list(lrs),
      angles_deg=list(args.angles),
      ks=list(args.ks),
      st_minimum=float(functions.FUNCTIONS["styblinski_tang"].minimum(args.n)),
    ),
    rows=rows,
  )


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s = result["settings"]
  by = {(r["k"], r["aggregation"], r["angle_deg"]): r for r in result["rows"]}
  angles = s["angles_deg"]
  fig, axes = rep.pyplot().subplots(1, 2, figsize=(11, 4))
  colors = {2: "tab:orange", 4: "tab:blue", 16: "tab:green"}
  for k in s["ks"]:
    for agg in AGGREGATIONS:
      ls = "-" if agg == "orthogonal" else "--"
      cos = [by[(k, agg, a)]["cos_mean"] for a in angles]
      st = [
        np.nan if by[(k, agg, a)]["st_best"] is None else by[(k, agg, a)]["st_best"] / s["n"]
        for a in angles
      ]
      axes[0].plot(angles, cos, ls=ls, marker="o", ms=3, color=colors[k], label=f"{agg} k={k}")
      axes[1].plot(angles, st, ls=ls, marker="o", ms=3, color=colors[k], label=f"{agg} k={k}")
      ref = by[(k, agg, None)]
      axes[0].axhline(ref["cos_mean"], color=colors[k], ls=ls, lw=0.6, alpha=0.6)
  axes[1].axhline(s["st_minimum"] / s["n"], color="k", lw=0.6, ls=":")
  axes[0].set_ylabel("cosine similarity to ∇f")
  axes[1].set_ylabel("best Styblinski–Tang value / n")
  for ax in axes:
    ax.set_xlabel("cone angle α (degrees)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(
    f"Fig. 5: tangents at angle α to v₁, n = {s['n']} (thin lines: independent Gaussian tangents)"
  )
  png = rep.save_figure(fig, out / "fig5_cone.png")

  def cell(r, key):
    return rep.num(None if r[key] is None else r[key] / (s["n"] if key == "st_best" else 1))

  cols = [(k, agg) for k in s["ks"] for agg in AGGREGATIONS]
  lines = [
    "# Fig. 5: tangents at a fixed angle α to the first (cone)",
    "",
    f"n = {s['n']}; cosine: mean over {s['cos_seeds']} seeds; Styblinski–Tang: {s['steps']} GD "
    f"steps, best value reached / n (minimum {s['st_minimum'] / s['n']:.3f}), mean over "
    f"{len(s['seeds'])} seeds at the best lr of a {len(s['lrs'])}-point grid. "
    f"{records.hardware_line(result.get('provenance'))}",
  ]
  for title, key in (
    ("Cosine similarity to ∇f", "cos_mean"),
    ("Best Styblinski–Tang value / n", "st_best"),
  ):
    table = rep.Table(["α", *(f"{agg} k={k}" for k, agg in cols)])
    for a in (*angles, None):
      name = "Gaussian (no cone)" if a is None else f"{a}°"
      table.add_row(name, *(cell(by[(k, agg, a)], key) for k, agg in cols))
    lines += ["", f"## {title}", "", *table.lines()]
  lines += ["", "![cosine and Styblinski–Tang against α](fig5_cone.png)", ""]
  return [rep.write_text(out / "fig5.md", lines), png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="fig5.json",
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
