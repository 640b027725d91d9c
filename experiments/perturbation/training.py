"""Where tangents enter: 500 steps of Fashion-MNIST training per scheme, each at its own lr.

The Baydin MLP (784-1024-1024-10), batch 64, plain SGD at a constant lr, 500 steps, in the
project's training app: backprop and forward gradients with dense Gaussian and Rademacher
weight tangents, rank-1 weight tangents, Yao's input-generated tangents (cheap
approximation), activity perturbation with per-example losses (k = 1), and activity with
k = 16 and the per-example orthogonal projection. Every forward variant uses
``estimator.rescale=true``, so its estimate has the expected length of the true gradient
and one lr grid serves all of them. Each variant's lr is found by the shared lr search
(``fwdgrad_jax.training.lr_search.run_sweep``: the Hydra app's Optuna grid sweep, lowest
final validation loss = mean of a run's last 3 evaluations, diverged and unstable runs —
final > 1.5 × their best — not eligible); the report compares the variants at their own best lr, against steps and seconds.

  python -m experiments.perturbation.training --out results/perturbation
  python -m experiments.perturbation.training --quick          # a smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import script, sweep
from experiments._lib.config import ROOT
from fwdgrad_jax.training import lr_search
from fwdgrad_jax.training import records as records_lib

#: label -> (Hydra overrides, lr grid)
FORWARD_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
VARIANTS: dict[str, tuple[list[str], tuple[float, ...]]] = {
  "backprop": (["estimator=backprop"], (0.01, 0.03, 0.1, 0.3, 1.0)),
  "weights normal k=1": (["estimator.tangents=normal"], FORWARD_LRS),
  "weights rademacher k=1": (["estimator.tangents=rademacher"], FORWARD_LRS),
  "rank1 k=1": (["estimator.tangents=rank1"], FORWARD_LRS),
  # Yao's approximation is biased towards the dominant input directions and longer than
  # the Gaussian closed form assumes: its best lr sits below the others'.
  "input_approx k=1": (["estimator.tangents=input_approx"], (0.001, 0.003, 0.01, 0.03, 0.1)),
  "activity k=1": (["estimator.perturbation=activity"], FORWARD_LRS),
  "activity k=16 orthogonal": (
    [
      "estimator.perturbation=activity",
      "estimator.num_tangents=16",
      "estimator.aggregation=orthogonal",
    ],
    FORWARD_LRS,
  ),
}


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument(
    "--variants", default=None, help="comma-separated labels (default: all; --quick: two)"
  )
  p.add_argument("--sweeps-dir", type=Path, default=None, help="run dirs (<out>/sweeps)")
  p.add_argument(
    "--quick",
    action="store_true",
    help="20 steps, one lr, two variants, MLP 784-32-10, in this process (smoke test)",
  )


#: The smoke test's model: the run end to end, not the paper's numbers.
QUICK_HIDDEN = 32


def _common(args: argparse.Namespace) -> list[str]:
  return [
    "data=fashion_mnist",
    "model=mlp",
    *([f"model.options.hidden=[{QUICK_HIDDEN}]"] if args.quick else []),
    f"train.steps={args.steps}",
    f"train.log_every={args.eval_every}",
    f"train.eval_every={args.eval_every}",
    "train.grad_check_every=0",
    "train.progress=false",
  ]


def _curve(job: Path) -> list[dict[str, Any]]:
  records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
  return [
    dict(step=r["step"], train_time_s=r["train_time_s"], val_loss=r["val_loss"])
    for r in records
    if r.get("val_loss") is not None
  ]


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.quick:
    args.steps, args.eval_every = 20, 10
  if args.variants is None:
    args.variants = "backprop,activity k=1" if args.quick else ",".join(VARIANTS)
  sweeps = (args.sweeps_dir or args.out / "sweeps").absolute()
  results = []
  for label in args.variants.split(","):
    overrides, lrs = VARIANTS[label]
    if label != "backprop":
      overrides = ["estimator=forward", "estimator.rescale=true", *overrides]
    if args.quick:  # one lr: a grid of one runs the same code as a longer one
      lrs = lrs[1:2]
    sweep_dir = sweeps / label.replace(" ", "_").replace("=", "")
    search = sweep.run_sweep(
      sweep_dir, lrs, overrides=[*_common(args), *overrides], cwd=ROOT, in_process=args.quick
    )
    best = search.best_index
    job = None if best is None else search.extra["runs"][best][0]
    summary = json.loads((Path(job) / "summary.json").read_text()) if job else {}
    print(f"{label}: best lr {search.best_lr}, {search.objective} {search.best_loss}", flush=True)
    results.append(
      dict(
        label=label,
        overrides=overrides,
        search=search.as_dict(),
        best=dict(
          lr=search.best_lr,
          final_val_loss=search.best_loss,
          best_val_loss=summary.get("best_val_loss"),
          test_loss=summary.get("test_loss"),
          test_accuracy=summary.get("test_accuracy"),
          step_time_ms=summary.get("step_time_ms"),
          runtime_ratio=summary.get("runtime_ratio"),
          curve=_curve(Path(job)) if job else [],
        ),
      )
    )
  return dict(
    settings=dict(
      model=f"mlp 784-{QUICK_HIDDEN}-10" if args.quick else "mlp 784-1024-1024-10",
      data="fashion_mnist",
      steps=args.steps,
      batch_size=64,
      optimizer="sgd (constant lr)",
      eval_every=args.eval_every,
    ),
    variants=results,
  )


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s, prov = result["settings"], result["provenance"]
  commands = result.get("merged_from") or [prov["command"]]
  lines = [
    "# Where tangents enter: training at each scheme's own learning rate",
    "",
    *[f"`{c}`" for c in commands],
    "",
    records_lib.hardware_line(prov),
    "",
    f"{s['model']} on Fashion-MNIST, batch {s['batch_size']}, {s['optimizer']}, "
    f"{s['steps']} steps; forward variants with `estimator.rescale=true`; the lr of each "
    "variant is the best of its grid (`lr_search.run_sweep`; the grids below).",
    "",
  ]
  cols = ["variant", "lr grid", "best lr", "final val loss", "best val loss", "test loss"]
  cols += ["test acc", "step ms"]
  table = rep.Table([*cols, "R"])
  for v in result["variants"]:
    b, grid = v["best"], v["search"]["lrs"]
    table.add_row(
      v["label"],
      ", ".join(f"{x:g}" for x in grid),
      rep.num(b["lr"], "g"),
      rep.num(b.get("final_val_loss")),  # not in results written before the rule
      *(rep.num(b[x]) for x in ("best_val_loss", "test_loss", "test_accuracy")),
      *(rep.num(b[x], ".2f") for x in ("step_time_ms", "runtime_ratio")),
    )
  lines += table.lines()
  rule = lr_search.rule_line(result["variants"][0]["search"]) if result["variants"] else ""
  lines += ["", f"Grids (* = kept, (div) = diverged, (unstable) = unstable). {rule}", ""]
  for v in result["variants"]:
    lines.append(f"- {v['label']}: " + ", ".join(lr_search.cells(v["search"], rep.num)))
  lines += ["", "![validation loss](training.png)", ""]
  plt = records_lib.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for v in result["variants"]:
    c = v["best"]["curve"]
    if not c:
      continue
    label = f"{v['label']} (lr {rep.num(v['best']['lr'], 'g')})"
    axes[0].plot([p["step"] for p in c], [p["val_loss"] for p in c], label=label)
    axes[1].plot([p["train_time_s"] for p in c], [p["val_loss"] for p in c], label=label)
  axes[0].set_xlabel("step")
  axes[1].set_xlabel("training seconds (compile and evaluation excluded)")
  axes[0].set_ylabel("validation loss")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  png = rep.save_figure(fig, out / "training.png")
  md = out / "training.md"
  md.write_text("\n".join(lines) + "\n")
  return [md, png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="training.json",
    description=__doc__,
    add_arguments=_add_arguments,
    merge=functools.partial(records_lib.merge_by_label, key="variants"),
    argv=argv,
  )


if __name__ == "__main__":
  main()
