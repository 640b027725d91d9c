"""The three-run table of results/demo/README.md from compare.py's comparison.json files.

  python -m experiments.stability.demo_runs outputs/demo_run1 outputs/demo_run2 outputs/demo_run3

Per row: the steps each run got (the budget is training seconds, so a loaded machine runs
fewer), test accuracy per run and its spread (max − min, in points), and the worst ratio of
test loss to the run's best validation loss (the issue's target: spread ≤ 3 points and
ratio ≤ 1.3 in every run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(dirs: list[Path]) -> str:
  """The Markdown table over the runs in ``dirs`` (each holding comparison.json)."""
  results = [json.loads((d / "comparison.json").read_text()) for d in dirs]
  lines = [
    "| method | lr | steps per run | test acc per run | spread (points) | test loss per run "
    "| max test loss / best val loss |",
    "|---|---|---|---|---|---|---|",
  ]
  for label in results[0]["rows"]:
    rs = [res["rows"][label] for res in results]
    accs = [r["test_accuracy"] for r in rs]
    ok = all(a is not None for a in accs)
    spread = 100 * (max(accs) - min(accs)) if ok else float("nan")
    ratio = max(
      (r["test_loss"] / r["best_val_loss"] for r in rs if r["test_loss"] and r["best_val_loss"]),
      default=float("nan"),
    )
    fmt = lambda xs, f: " / ".join("div." if x is None else format(x, f) for x in xs)
    lines.append(
      f"| {label} | {rs[0]['lr']:g} | {' / '.join(str(r['steps']) for r in rs)} "
      f"| {fmt(accs, '.3f')} | {spread:.1f} | {fmt([r['test_loss'] for r in rs], '.3f')} "
      f"| {ratio:.2f} |"
    )
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(table([Path(p) for p in sys.argv[1:]]), end="")
