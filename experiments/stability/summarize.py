"""Issue 21's measurements, one Markdown row per run directory.

  python -m experiments.stability.summarize outputs/stability/constant/* outputs/stability/cosine/*

Per run: the best and final validation loss (final = mean of the last 3 evaluations, the
lr searches' rule), test accuracy and loss from summary.json, and what the gradient checks
say about the two hypotheses:

- weight drift: ‖θ‖ at the first and last evaluation, and whether its growth is the random
  walk of the steps: Δ‖θ‖² against Σ lr² ‖ĝ‖² (‖ĝ‖ = grad_norm_ratio · true_grad_norm at
  each check, times the steps between checks). A step nearly orthogonal to θ (cosine to ∇f
  ≈ 0: mostly noise) adds its squared length to ‖θ‖², so the two agree when noise drives
  the growth.
- noise floor: ‖∇f‖ (true_grad_norm) and ‖ĝ‖/‖∇f‖ in the first and last quarter of the
  checks (medians): the hypothesis needs ‖∇f‖ to shrink while the ratio grows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _records(run: Path) -> list[dict]:
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summarize(run: Path) -> dict:
  """The row of one run directory (see the module docstring)."""
  recs = _records(run)
  summary = (
    json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
  )
  evals = [r for r in recs if r.get("val_loss") is not None]
  checks = [r for r in recs if r.get("true_grad_norm") is not None]
  steps = [0] + [r["step"] for r in checks]
  walk = sum(
    (r["lr"] * r["grad_norm_ratio"] * r["true_grad_norm"]) ** 2 * (s1 - s0)
    for r, s0, s1 in zip(checks, steps, steps[1:])
  )
  q = max(1, len(checks) // 4)
  med = lambda rs, k: float(np.median([r[k] for r in rs]))
  best = min(evals, key=lambda r: r["val_loss"])
  return {
    "run": f"{run.parent.name}/{run.name}",
    "steps": recs[-1]["step"],
    "best": f"{best['val_loss']:.3f} @{best['step']}",
    "final": float(np.mean([r["val_loss"] for r in evals[-3:]])),
    "test_acc": summary.get("test_accuracy"),
    "test_loss": summary.get("test_loss"),
    "theta": f"{evals[0]['param_norm']:.1f}→{evals[-1]['param_norm']:.1f}",
    "dtheta2": evals[-1]["param_norm"] ** 2 - evals[0]["param_norm"] ** 2,
    "walk": walk,
    "gf": f"{med(checks[:q], 'true_grad_norm'):.2f}→{med(checks[-q:], 'true_grad_norm'):.2f}",
    "ratio": f"{med(checks[:q], 'grad_norm_ratio'):.2f}→{med(checks[-q:], 'grad_norm_ratio'):.2f}",
    "cos": med(checks, "cosine_to_true_grad"),
  }


def table(rows: list[dict]) -> str:
  """The rows as a Markdown table."""
  head = (
    "| run | steps | best val (step) | final val | test acc | test loss | ‖θ‖ first→last "
    "| Δ‖θ‖² | Σ lr²‖ĝ‖² | ‖∇f‖ first→last ¼ | ‖ĝ‖/‖∇f‖ first→last ¼ | median cos |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
  )
  fmt = lambda v, f: "–" if v is None else format(v, f)
  return head + "".join(
    f"| {r['run']} | {r['steps']} | {r['best']} | {r['final']:.3f} | {fmt(r['test_acc'], '.3f')} "
    f"| {fmt(r['test_loss'], '.3f')} | {r['theta']} | {r['dtheta2']:.0f} | {r['walk']:.0f} "
    f"| {r['gf']} | {r['ratio']} | {r['cos']:.3f} |\n"
    for r in rows
  )


if __name__ == "__main__":
  print(table([summarize(Path(p)) for p in sys.argv[1:]]), end="")
