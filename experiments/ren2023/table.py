"""Ren et al. 2023's supervised table on Fashion-MNIST: BP, LG-BP, FG-W, FG-A, LG-FG-W, LG-FG-A.

A LocalMixer sized for 2 CPU cores (configs/model/local_mixer.yaml: 4x4 patches, 2 blocks
of 64 channels in 4 groups) and the MLP 784-1024-1024-10 with a head per layer, trained
through the Hydra app at the same number of epochs with Ren et al.'s recipe at a
reduced budget: SGD with momentum 0.9, a linear warmup then cosine decay, weight decay
1e-4, batch 128. Every row gets its own lr from the shared lr search
(``fwdgrad_jax.training.lr_search.run_sweep``, seed 0: lowest final validation loss,
unstable and diverged runs not eligible), then two more seeds at that lr. ``LG`` rows
train on the local losses (``model.local_losses=true``: stop-gradient between blocks, a
loss per block — per patch and channel group in the LocalMixer); ``FG-A`` perturbs the
blocks' outputs (their ``fwdgrad_jax.site`` markers; per example, and with local losses
per patch and group), ``FG-W`` the weights (dense Gaussian, k = 1). Forward rows use
``estimator.rescale=true``. Every run checks its gradient at each evaluation: the cosine
of the estimate to ``jax.grad`` of the same loss (for LG rows the local gradient), per
block.

  python -m experiments.ren2023.table --out results/ren2023
  python -m experiments.ren2023.table --quick           # a smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import script, sweep
from experiments._lib.config import ROOT
from fwdgrad_jax.training import lr_search
from fwdgrad_jax.training import records as records_lib

_FWD = ["estimator=forward", "estimator.rescale=true"]
_ACT = [*_FWD, "estimator.perturbation=activity"]
_MIXER, _MLP = ["model=local_mixer"], ["model=mlp"]
_LOCAL, _GLOBAL = ["model.local_losses=true"], ["model.local_losses=false"]
_BP_LRS, _FG_LRS, _FGW_LRS = (0.1, 0.3), (0.1, 0.3), (0.01, 0.03)
_NO_STOP = "model.options.stop_gradient=false"
_GUESS = [*_ACT, "estimator.tangents=local_guess"]

#: label -> (Hydra overrides, lr grid). Ren et al.'s Table 3 names.
ROWS: dict[str, tuple[list[str], tuple[float, ...]]] = {
  "BP": ([*_MIXER, *_GLOBAL, "estimator=backprop"], _BP_LRS),
  "LG-BP": ([*_MIXER, *_LOCAL, "estimator=backprop"], _BP_LRS),
  "FG-W": ([*_MIXER, *_GLOBAL, *_FWD], _FGW_LRS),
  "FG-A": ([*_MIXER, *_GLOBAL, *_ACT], _FG_LRS),
  "LG-FG-W": ([*_MIXER, *_LOCAL, *_FWD], _FGW_LRS),
  "LG-FG-A": ([*_MIXER, *_LOCAL, *_ACT], _FG_LRS),
  # Fournier et al. 2023's guess (the local loss's gradient through its head) on the
  # LocalMixer trained end to end on the sum of its heads' losses (no stop-gradient, so
  # the guess is biased), alone and with 4 random tangents under the projection.
  "Guess": ([*_MIXER, *_LOCAL, _NO_STOP, *_GUESS, "estimator.num_tangents=1"], _FG_LRS),
  "Guess + 4 orthogonal": (
    [
      *_MIXER,
      *_LOCAL,
      _NO_STOP,
      *_GUESS,
      "estimator.num_tangents=5",
      "estimator.aggregation=orthogonal",
    ],
    _FG_LRS,
  ),  # fmt: skip
  "MLP BP": ([*_MLP, *_GLOBAL, "estimator=backprop"], _BP_LRS),
  "MLP LG-BP": ([*_MLP, *_LOCAL, "estimator=backprop"], _BP_LRS),
  "MLP LG-FG-A": ([*_MLP, *_LOCAL, *_ACT], _FG_LRS),
}

#: Ren et al. 2023, Table 3 (supervised test error %, LocalMixer); "–" where not given here.
PAPER = {
  "MNIST": {"BP": 2.41, "FG-W": 9.25, "LG-FG-A": 2.55},
  "CIFAR-10": {"BP": 33.62, "FG-W": 55.95, "LG-FG-A": 30.68},
}


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--epochs", type=float, default=1.0)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--evals", type=int, default=10, help="evaluations (and gradient checks) per run")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--rows", type=rep.names, default=None, help="labels (default: all)")
  p.add_argument("--lrs", type=rep.floats, default=None, help="lr grid of every row run")
  p.add_argument("--sweeps-dir", type=Path, default=None, help="run dirs (<out>/sweeps)")
  p.add_argument(
    "--quick", action="store_true", help="4 steps, one lr, one seed, one row, in this process"
  )


def _common(args: argparse.Namespace, steps: int) -> list[str]:
  every = max(steps // args.evals, 1)
  return [
    "data=fashion_mnist",
    "optimizer=sgd",
    "optimizer.momentum=0.9",
    "optimizer.schedule=warmup_cosine",
    f"optimizer.warmup_steps={max(steps // 10, 1)}",
    "optimizer.weight_decay=1e-4",
    f"train.batch_size={args.batch_size}",
    f"train.steps={steps}",
    f"train.log_every={every}",
    f"train.eval_every={every}",
    f"train.grad_check_every={every}",
    "train.progress=false",
  ]


def _summary(job: str | Path) -> dict[str, Any]:
  job = Path(job)
  summary = json.loads((job / "summary.json").read_text())
  records = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
  checks = [r for r in records if r.get("cosine_to_true_grad") is not None]
  last = checks[-1] if checks else {}
  return dict(
    test_error=None
    if summary.get("test_accuracy") is None
    else 100 * (1 - summary["test_accuracy"]),
    test_loss=summary.get("test_loss"),
    final_val_loss=summary.get("final_val_loss"),
    step_time_ms=summary.get("step_time_ms"),
    runtime_ratio=summary.get("runtime_ratio"),
    job=str(job),
    cosine=last.get("cosine_to_true_grad"),
    cosine_blocks={k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("cosine_block/")},
    curve=[
      dict(step=r["step"], val_loss=r.get("val_loss"), cosine=r.get("cosine_to_true_grad"))
      for r in records
      if r.get("val_loss") is not None
    ],
  )


def run(args: argparse.Namespace) -> dict[str, Any]:
  steps = max(int(args.epochs * 55_000 / args.batch_size), 1)
  if args.quick:
    steps, args.evals, args.seeds = 4, 2, 1
  # A row is a run of the app, four large compiles: the smoke test's one row has every
  # part (local losses, activity perturbation, the per-block gradient check) on the MLP,
  # which compiles in half the LocalMixer's time (the mixer trains in the app in
  # tests/test_local_models.py).
  labels = args.rows or (["MLP LG-FG-A"] if args.quick else list(ROWS))
  sweeps = (args.sweeps_dir or args.out / "sweeps").absolute()
  rows = []
  for label in labels:
    overrides, lrs = ROWS[label]
    lrs = args.lrs or lrs
    if args.quick:
      lrs = lrs[1:2]
      overrides = [*overrides, "model.options.channels=16", "model.options.hidden=16"] if (
        "model=local_mixer" in overrides) else overrides  # fmt: skip
    name = label.replace(" ", "_")
    common = [*_common(args, steps), *overrides]
    search = sweep.run_sweep(
      sweeps / name / "search", lrs, overrides=common, cwd=ROOT, in_process=args.quick
    )
    runs = [] if search.best_index is None else list(search.extra["runs"][search.best_index][:1])
    if search.best_lr is not None and args.seeds > 1:
      more = sweep.run_sweep(
        sweeps / name / "seeds", [search.best_lr], seeds=range(1, args.seeds),
        overrides=common, cwd=ROOT, in_process=args.quick,
      )  # fmt: skip
      runs += list(more.extra["runs"][0])
    seeds = [_summary(job) for job in runs]
    print(
      f"{label}: lr {search.best_lr}, test error {[s['test_error'] for s in seeds]}", flush=True
    )
    rows.append(dict(label=label, overrides=overrides, search=search.as_dict(), seeds=seeds))
  return dict(
    settings=dict(
      data="fashion_mnist",
      epochs=args.epochs,
      steps=steps,
      batch_size=args.batch_size,
      optimizer="sgd momentum 0.9, warmup (10 %) + cosine, weight decay 1e-4",
      seeds=args.seeds,
    ),
    rows=rows,
  )


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
  vals = [v for v in values if v is not None]
  if not vals:
    return None, None
  return statistics.mean(vals), (max(vals) - min(vals)) / 2 if len(vals) > 1 else None


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s, prov = result["settings"], result["provenance"]
  rows = result["rows"]
  bp_r = {
    r["label"].split()[0]: _stats([x.get("runtime_ratio") for x in r["seeds"]])[0]
    for r in rows
    if r["label"] in ("BP", "MLP BP")
  }
  lines = [
    "# Ren et al. 2023 on Fashion-MNIST: local losses in true forward mode",
    "",
    *[f"`{c}`" for c in result.get("merged_from") or [prov["command"]]],
    "",
    records_lib.hardware_line(prov),
    "",
    f"Fashion-MNIST (offline), {s['epochs']:g} epochs ({s['steps']} steps of batch "
    f"{s['batch_size']}), {s['optimizer']}; each row at its own lr (search on seed 0), "
    f"{s['seeds']} seeds. Test error: mean ± half the range over seeds. R: the run's step "
    "time over its own forward + loss time (both measured in the run, so the machine's load "
    "cancels; mean over seeds), R / R_BP: over the same model's BP row's (Baydin's "
    "R_f/R_b). Cosine: of the estimate to `jax.grad` of the row's own loss "
    "(LG rows: the local gradient) on one training batch at the last check, mean over seeds.",
    "",
  ]
  table = rep.Table(
    ["row", "lr", "test error %", "test loss", "R", "R / R_BP", "cosine", "cosine per block"]
  )
  for r in rows:
    err, spread = _stats([x["test_error"] for x in r["seeds"]])
    ratio = _stats([x.get("runtime_ratio") for x in r["seeds"]])[0]
    base = bp_r.get("MLP" if r["label"].startswith("MLP") else "BP")
    blocks: dict[str, list[float]] = {}
    for x in r["seeds"]:
      for k, v in x["cosine_blocks"].items():
        blocks.setdefault(k, []).append(v)
    table.add_row(
      r["label"],
      rep.lr(r["search"].get("best_lr")),
      f"{rep.num(err, '.2f')} ± {rep.num(spread, '.2f')}",
      rep.num(_stats([x["test_loss"] for x in r["seeds"]])[0]),
      rep.num(ratio, ".2f"),
      rep.num(None if ratio is None or not base else ratio / base, ".2f"),
      rep.num(_stats([x["cosine"] for x in r["seeds"]])[0], ".2f"),
      ", ".join(f"{k} {statistics.mean(v):.2f}" for k, v in sorted(blocks.items())),
    )
  lines += table.lines()
  lines += ["", "Ren et al. 2023, Table 3 (LocalMixer, test error %; their scale, not ours):", ""]
  paper = rep.Table(["data", "BP", "FG-W", "LG-FG-A"])
  for data, v in PAPER.items():
    paper.add_row(data, *(rep.num(v.get(k), ".2f") for k in ("BP", "FG-W", "LG-FG-A")))
  lines += paper.lines()
  rule = lr_search.rule_line(rows[0]["search"]) if rows else ""
  lines += ["", f"Grids (* = kept). {rule}", ""]
  for r in rows:
    lines.append(f"- {r['label']}: " + ", ".join(lr_search.cells(r["search"], rep.num)))
  lines += ["", "![validation loss and cosine](table.png)", ""]
  plt = records_lib.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for r in rows:
    if not r["seeds"]:
      continue
    c = r["seeds"][0]["curve"]
    axes[0].plot([p["step"] for p in c], [p["val_loss"] for p in c], label=r["label"])
    axes[1].plot([p["step"] for p in c], [p["cosine"] for p in c], label=r["label"])
  axes[0].set_ylabel("validation loss (seed 0)")
  axes[1].set_ylabel("cosine to the (local) gradient")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  png = rep.save_figure(fig, out / "table.png")
  md = out / "table.md"
  md.write_text("\n".join(lines) + "\n")
  return [md, png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="table.json",
    description=__doc__,
    add_arguments=_add_arguments,
    merge=functools.partial(records_lib.merge_by_label, key="rows"),
    argv=argv,
  )


if __name__ == "__main__":
  main()
