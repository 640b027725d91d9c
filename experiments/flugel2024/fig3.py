"""Flügel et al. 2024, Fig. 3: how well k tangents approximate a fixed gradient in n dimensions.

A fixed gradient g ∈ Rⁿ (f(x) = g·x, so ∇f = g everywhere; by rotational invariance of
Gaussian tangents its direction does not matter) is estimated with
``fwdgrad_jax.value_and_forward_grad`` for k = 1 … 2n tangents and every aggregation of
the paper: sum, mean, normalized sum and mean (``normalize=True``) and the orthogonal
projection. Over many seeds: the cosine similarity to g and the norm ratio ‖ĝ‖/‖g‖.
Closed forms checked against the measurement:

* one Gaussian tangent: E|cos| = Γ(n/2) / (√π Γ((n+1)/2)) (→ √(2/(πn))), and
  E[(‖ĝ‖/‖g‖)²] = n + 2 (so the RMS norm ratio is √(n+2) ≈ √n);
* orthogonal projection onto k < n Gaussian tangents: E[cos²] = k/n (‖Pg‖²/‖g‖² is
  Beta(k/2, (n−k)/2)), and its norm ratio equals its cosine; for k ≥ n it is exact.

  python -m experiments.flugel2024.fig3 --out results/flugel2024/fig3     # ~1-2 min on 2 cores
  python -m experiments.flugel2024.fig3 --quick                         # a smoke test
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
from experiments.flugel2024.lib import expected_abs_cos_one_tangent
from fwdgrad_jax.training import records

#: label -> (aggregation, normalize)
VARIANTS = {
  "sum": ("sum", False),
  "mean": ("mean", False),
  "normalized sum": ("sum", True),
  "normalized mean": ("mean", True),
  "orthogonal": ("orthogonal", False),
}


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--n", type=int, default=64, help="dimension of the gradient")
  p.add_argument("--seeds", type=int, default=1000)
  p.add_argument("--quick", action="store_true", help="n=4, k ∈ {1, 4}, 50 seeds (smoke test)")


def _ks(n: int, quick: bool = False) -> list[int]:
  if quick:  # every (k, variant) is a compile: k = 1 (k < n) and k = n, each check's case
    return [1, n]
  ks = {1, n, 2 * n, n + n // 2, n - n // 4}
  k = 2
  while k <= 2 * n:
    ks.add(k)
    k *= 2
  return sorted(ks)


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.quick:
    args.n, args.seeds = 4, 50
  n = args.n
  g = jax.random.normal(jax.random.key(12345), (n,))
  f = lambda x: jnp.dot(g, x)
  x0 = jnp.zeros(n)
  keys = jax.random.split(jax.random.key(0), args.seeds)
  rows = []
  for k in _ks(n, args.quick):
    for label, (agg, normalize) in VARIANTS.items():
      est = fg.value_and_forward_grad(f, num_tangents=k, aggregation=agg, normalize=normalize)

      @jax.jit
      def measure(keys):
        def one(key):
          _, ghat = est(key, x0)
          return fg.cosine_similarity(ghat, g), fg.norm_ratio(ghat, g)

        return jax.vmap(one)(keys)

      cos, ratio = (np.asarray(a, np.float64) for a in measure(keys))
      se = lambda a: float(a.std(ddof=1) / math.sqrt(a.size))
      rows.append(
        dict(
          k=k,
          variant=label,
          cos_mean=float(cos.mean()),
          cos_se=se(cos),
          cos_min=float(cos.min()),
          exact_fraction=float(np.mean(cos > 0.9999)),
          cos2_mean=float((cos**2).mean()),
          cos2_se=se(cos**2),
          ratio_mean=float(ratio.mean()),
          ratio_se=se(ratio),
          ratio2_mean=float((ratio**2).mean()),
          ratio2_se=se(ratio**2),
        )
      )
    print(f"k={k} done", flush=True)
  return dict(
    settings=dict(
      n=n, seeds=args.seeds, ks=_ks(n, args.quick), tangents="normal", function="f(x) = g·x"
    ),
    closed_forms=dict(
      abs_cos_one_tangent=expected_abs_cos_one_tangent(n),
      abs_cos_asymptotic=math.sqrt(2 / (math.pi * n)),
      ratio2_one_tangent=n + 2,
    ),
    rows=rows,
  )


def _checks(result: dict[str, Any]) -> list[dict[str, Any]]:
  """Closed form vs measured, with the measurement's standard error."""
  n = result["settings"]["n"]
  cf = result["closed_forms"]
  rows = {(r["k"], r["variant"]): r for r in result["rows"]}
  out = []
  one = rows[(1, "mean")]
  out.append(
    dict(
      what="E|cos|, one tangent",
      closed=cf["abs_cos_one_tangent"],
      measured=one["cos_mean"],
      se=one["cos_se"],
    )
  )
  out.append(
    dict(
      what="E[(‖ĝ‖/‖g‖)²] = n+2, one tangent",
      closed=cf["ratio2_one_tangent"],
      measured=one["ratio2_mean"],
      se=one["ratio2_se"],
    )
  )
  for k in result["settings"]["ks"]:
    r = rows[(k, "orthogonal")]
    if k < n:
      out.append(
        dict(
          what=f"orthogonal E[cos²] = k/n, k={k}",
          closed=k / n,
          measured=r["cos2_mean"],
          se=r["cos2_se"],
        )
      )
    else:
      out.append(
        dict(
          what=f"orthogonal exact: fraction of seeds with cos > 0.9999, k={k}",
          closed=1.0,
          measured=r["exact_fraction"],
          se=0.0,
        )
      )
  for c in out:
    c["z"] = (c["measured"] - c["closed"]) / c["se"] if c["se"] > 0 else None
    c["ok"] = abs(c["z"]) < 4 if c["z"] is not None else c["measured"] >= 0.99
  return out


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s = result["settings"]
  n, ks = s["n"], s["ks"]
  rows = {(r["k"], r["variant"]): r for r in result["rows"]}
  fig, axes = rep.pyplot().subplots(1, 2, figsize=(11, 4))
  styles = {
    "sum": "-",
    "mean": "--",
    "normalized sum": "-.",
    "normalized mean": ":",
    "orthogonal": "-",
  }
  for label in VARIANTS:
    cos = [rows[(k, label)]["cos_mean"] for k in ks]
    ratio = [rows[(k, label)]["ratio_mean"] for k in ks]
    kw = dict(ls=styles[label], marker="o", ms=3, label=label, lw=2 if label == "orthogonal" else 1)
    axes[0].plot(ks, cos, **kw)
    axes[1].plot(ks, ratio, **kw)
  for ax in axes:
    ax.axvline(n, color="gray", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of tangents k")
    ax.grid(alpha=0.3)
  axes[0].axhline(result["closed_forms"]["abs_cos_one_tangent"], color="k", lw=0.6, ls=":")
  axes[0].set_ylabel("cosine similarity to ∇f")
  axes[1].set_yscale("log")
  axes[1].set_ylabel("‖ĝ‖ / ‖∇f‖")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"Fig. 3: fixed gradient, n = {n}, mean over {s['seeds']} seeds (dashed: k = n)")
  png = rep.save_figure(fig, out / "fig3_approximation.png")

  checks = rep.Table(["quantity", "closed form", "measured ± s.e.", "z", "ok"])
  for c in _checks(result):
    checks.add_row(
      c["what"],
      f"{c['closed']:.4f}",
      f"{c['measured']:.4f} ± {c['se']:.4f}",
      rep.num(c["z"], "+.2f"),
      "yes" if c["ok"] else "**no**",
    )
  lines = [
    "# Fig. 3: approximation quality of a fixed gradient against k",
    "",
    f"n = {n}, Gaussian tangents, {s['seeds']} seeds per point, f(x) = g·x. "
    f"{records.hardware_line(result.get('provenance'))}",
    "",
    "## Closed forms",
    "",
    *checks.lines(),
  ]
  for title, key, spec in (
    ("Cosine similarity (mean over seeds)", "cos_mean", ".3f"),
    ("Norm ratio ‖ĝ‖/‖∇f‖ (mean over seeds)", "ratio_mean", ".3g"),
  ):
    table = rep.Table(["k", *VARIANTS])
    for k in ks:
      table.add_row(k, *(format(rows[(k, v)][key], spec) for v in VARIANTS))
    lines += ["", f"## {title}", "", *table.lines()]
  lines += ["", "![cosine and norm ratio against k](fig3_approximation.png)", ""]
  return [rep.write_text(out / "fig3.md", lines), png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="fig3.json",
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
