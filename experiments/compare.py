"""The main job: forward gradients vs backprop, each at its own tuned lr, same time budget.

Trains every row of configs/demo.yaml — backprop and the best forward-gradient variants
the library has (weight tangents, k = 1; activity perturbation, k = 1 and k = 16 with the
per-example orthogonal projection), each at the learning rate
an lr search found for it — on offline Fashion-MNIST (MLP 784-1024-1024-10, batch 64,
SGD) for the same training time (compile and evaluation excluded), then prints a table
(test accuracy and loss, steps run, step time, R = step time / forward+loss time, cosine
of the estimate to the true gradient) and draws validation loss against steps and
against seconds. Fair in both ways the papers argue about: tuned per method, equal time.

The budget is the loop's ``train.time_budget_s`` (checked between chunks); the demo's lr
schedule (configs/experiment/demo.yaml: cosine) decays over that budget, not over a step
count (fwdgrad_jax.training.steps.budget_schedule), so a loaded machine that runs fewer
steps in the budget still ends its run at a small lr, and an lr tuned at N steps per
budget sees the same schedule at 2N. Every row is
timed first (fwdgrad_jax.training.benchmark.time_configs) to size its evaluation interval, so each
curve gets about ``evals`` points whatever its step time.

  python experiments/compare.py                          # the demo (~2.5 min on 2 cores)
  python experiments/compare.py --budget 60              # a longer budget per row
  python experiments/compare.py model=cnn                # Hydra overrides for every row
  python experiments/compare.py --tune 'forward k=1' --lrs 1e-4,3e-4,1e-3,3e-3
  python experiments/compare.py --report-only outputs/compare/<date-time>/comparison.json

``--tune ROW`` runs that row's lr grid search at the same budget and settings (the Hydra
app in a subprocess, one job per lr) and writes ``lr_search.json``, ``lr_search.md`` (the
grid with each lr's status) and ``lr_search.png``; put the lr it prints into
configs/demo.yaml. Runs are scored by lr_search's one rule: the final validation loss
(mean of the last 3 evaluations); a run that ends above 1.5 × its best is unstable and,
like a diverged one, not eligible.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a path (python experiments/compare.py): put the root on sys.path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._lib import analysis
from experiments._lib import report as rep
from experiments._lib.config import APP, ROOT, compose
from fwdgrad_jax.training import records as records_lib

COLORS = ("tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The main job's options."""
  parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every row")
  parser.add_argument(
    "--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="the rows and budget"
  )
  parser.add_argument("--budget", type=float, default=None, help="training seconds per row")
  parser.add_argument("--tune", metavar="ROW", default=None, help="lr search for this row")
  parser.add_argument("--lrs", default=None, help="--tune: the lr grid, comma-separated")
  parser.add_argument("--seeds", default="0", help="--tune: seeds per lr, comma-separated")


def load_rows(path: Path) -> dict[str, Any]:
  """``{"budget_s", "evals", "rows": {label: [overrides]}}`` from configs/demo.yaml."""
  from omegaconf import OmegaConf

  raw = OmegaConf.to_container(OmegaConf.load(path))
  rows = {str(k): [str(o) for o in v] for k, v in raw["rows"].items()}
  return {"budget_s": float(raw["budget_s"]), "evals": int(raw.get("evals", 20)), "rows": rows}


def _compose(overrides: list[str]):

  return compose(overrides)


def plan(
  rows: dict[str, list[str]], budget_s: float, evals: int, extra: list[str]
) -> tuple[dict[str, list[str]], dict[str, float]]:
  """Every row's full overrides for the budget, and its measured seconds per step.

  Args:
    rows: label → the row's overrides (estimator, lr…).
    budget_s: training seconds per row.
    evals: validation points wanted per row.
    extra: overrides for every row, applied last (they win).

  Returns:
    ``(label → overrides, label → seconds per step)``.
  """
  from fwdgrad_jax import data
  from fwdgrad_jax.training import benchmark

  base = {label: ["+experiment=demo", *row, *extra] for label, row in rows.items()}
  cfgs = {label: _compose(o) for label, o in base.items()}
  name = next(iter(cfgs.values())).data.name
  # Rows of one model (and batch size) are timed together, interleaved; a row with its own
  # model (the LocalMixer row) in its own group.
  groups: dict[Any, dict[str, Any]] = {}
  for label, cfg in cfgs.items():
    groups.setdefault((repr(cfg.model), cfg.train.batch_size), {})[label] = cfg
  timings = {}
  for group in groups.values():
    timings.update(
      benchmark.time_configs(
        group,
        input_shape=data.input_shape(name),
        num_classes=data.num_classes(name),
        rounds=3,
        steps=5,
      )  # fmt: skip
    )
  out, seconds = {}, {}
  for label in base:
    seconds[label] = timings[label].median
    steps = max(1, int(budget_s / seconds[label]))
    every = max(1, steps // evals)
    # The loop stops at the budget; the step count is only a cap (the timing is a guess).
    schedule = [f"train.time_budget_s={budget_s}", f"train.steps={10 * steps}"]
    schedule += [f"train.log_every={every}", f"train.eval_every={every}"]
    schedule.append(f"train.grad_check_every={every * max(1, evals // 2)}")
    # The row's and the user's overrides after the schedule: theirs win.
    out[label] = ["+experiment=demo", *schedule, *rows[label], *extra]
  return out, seconds


def _row_result(summary: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
  keys = (
    "lr",
    "steps",
    "diverged",
    "train_time_s",
    "test_accuracy",
    "test_loss",
    "val_loss",
    "final_val_loss",
    "unstable",
    "best_val_loss",
    "step_time_ms",
    "base_time_ms",
    "runtime_ratio",
    "estimator",
    "num_tangents",
    "aggregation",
  )
  cosines = [r["cosine_to_true_grad"] for r in records if "cosine_to_true_grad" in r]
  return {
    **{k: summary.get(k) for k in keys},
    "cosine_to_true_grad": analysis.finite_median(cosines),
    "curve": analysis.curve(records),
  }


def run_rows(args: argparse.Namespace, demo: dict[str, Any]) -> dict[str, Any]:
  """Trains every row for the budget; returns the comparison."""
  import json

  from fwdgrad_jax import data
  from fwdgrad_jax.training import run as run_lib

  t0 = time.perf_counter()
  budget = args.budget or demo["budget_s"]
  overrides, seconds = plan(demo["rows"], budget, demo["evals"], args.overrides)
  print(f"timed the rows' steps ({time.perf_counter() - t0:.0f} s)", flush=True)
  cfgs = {label: _compose(o) for label, o in overrides.items()}
  cfg0 = next(iter(cfgs.values()))
  dataset = data.load(
    cfg0.data.name, data_dir=cfg0.data.data_dir, val_size=cfg0.data.val_size, seed=cfg0.seed
  )
  rows = {}
  for label, cfg in cfgs.items():
    run_dir = args.out / "runs" / label.replace(" ", "_").replace("=", "")
    shutil.rmtree(run_dir, ignore_errors=True)  # fresh: a checkpoint would be resumed
    print(
      f"== {label}: {budget:g} s at lr {cfg.optimizer.lr:g} -> {run_dir} "
      f"(at {time.perf_counter() - t0:.0f} s)",
      flush=True,
    )
    summary = run_lib.train(cfg, run_dir, dataset=dataset)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows[label] = {
      **_row_result(summary, records),
      "overrides": overrides[label],
      "calibrated_step_ms": seconds[label] * 1e3,
    }
  return {
    "kind": "comparison",
    "budget_s": budget,
    "model": cfg0.model.name,
    "data": dataset.name,
    "batch_size": cfg0.train.batch_size,
    "schedule": cfg0.optimizer.schedule,
    "rows": rows,
  }


def tune(args: argparse.Namespace, demo: dict[str, Any]) -> dict[str, Any]:
  """The lr grid search of one row at the demo's budget and settings."""
  from fwdgrad_jax.training import lr_search

  if args.tune not in demo["rows"]:
    raise SystemExit(
      f"error: --tune: no row {args.tune!r} in {args.config}; rows: {list(demo['rows'])}"
    )
  if not args.lrs:
    raise SystemExit("error: --tune needs --lrs, e.g. --lrs 1e-4,3e-4,1e-3")
  budget = args.budget or demo["budget_s"]
  row = [o for o in demo["rows"][args.tune] if not o.startswith("optimizer.lr=")]
  overrides, _ = plan({args.tune: row}, budget, demo["evals"], args.overrides)
  lrs = [float(x) for x in args.lrs.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  res = lr_search.run_sweep(
    APP,
    (args.out / "sweep").absolute(),
    lrs,
    seeds=seeds,
    presets=["demo"],
    overrides=[o for o in overrides[args.tune] if o != "+experiment=demo"],
    quiet=False,
  )
  cmd = res.extra["command"]
  return {
    "kind": "lr_search",
    "row": args.tune,
    "budget_s": budget,
    "search": res.as_dict(),
    "sweep_command": records_lib.command_line(cmd[1], cmd[2:]),
  }


def run(args: argparse.Namespace) -> dict[str, Any]:
  """The comparison, or with ``--tune`` one row's lr search."""
  logging.getLogger("absl").setLevel(logging.WARNING)
  demo = load_rows(args.config)
  return tune(args, demo) if args.tune else run_rows(args, demo)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
  """The comparison as a Markdown table, with R_f/R_b and what it says."""
  rows = result["rows"]
  lines = [
    f"{result['model']} on {result['data']}, batch {result['batch_size']}, SGD, "
    f"{result['budget_s']:g} s of training per row; each row at its own tuned lr "
    f"(configs/demo.yaml), lr schedule {result.get('schedule', 'constant')}"
    + (" over the time budget." if result.get("schedule", "constant") != "constant" else "."),
    "",
    "| method | lr | steps | train s | test acc | test loss | final val loss | step ms | R "
    "| cos to ∇f |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for label, r in rows.items():
    if r["diverged"]:
      lines.append(f"| {label} | {r['lr']:g} | diverged at step {r['steps']} | | | | | | | |")
      continue
    lines.append(
      f"| {label} | {r['lr']:g} | {r['steps']} | {rep.num(r['train_time_s'], '.1f')} | "
      f"{rep.num(r['test_accuracy'], '.4f')} | {rep.num(r['test_loss'], '.4f')} | "
      f"{rep.num(r.get('final_val_loss'), '.4f')}{' (unstable)' if r.get('unstable') else ''} | "
      f"{rep.num(r['step_time_ms'], '.2f')} | "
      f"{rep.num(r['runtime_ratio'], '.2f')} | {rep.num(r['cosine_to_true_grad'], '.4f')} |"
    )
  lines += [
    "",
    "R = step time / (forward pass + loss) time: R_b for backprop, R_f for forward "
    "gradients. cos to ∇f: median cosine of the step's estimate to jax.grad on the same batch. "
    "final val loss: mean of the last 3 evaluations (unstable: above 1.5 × the run's best).",
  ]
  bp = rows.get("backprop")
  for label, r in rows.items():
    if label == "backprop" or not bp or not (r["runtime_ratio"] and bp["runtime_ratio"]):
      continue
    outcome = (
      f"diverged at step {r['steps']}"
      if r["diverged"]
      else f"ran {r['steps'] / bp['steps']:.2f}× backprop's steps and reached test accuracy "
      f"{rep.num(r['test_accuracy'], '.3f')} against {rep.num(bp['test_accuracy'], '.3f')}"
    )
    step_ratio = rep.num(
      r["step_time_ms"] / bp["step_time_ms"] if r["step_time_ms"] else None, ".2f"
    )
    lines.append(
      f"- {label}: a step takes {step_ratio}× a backprop step (R_f/R_b = "
      f"{r['runtime_ratio'] / bp['runtime_ratio']:.2f}, each R against its run's own base "
      f"time); in the same time it {outcome}."
    )
  return "\n".join(lines) + "\n"


def plot(path: Path, result: dict[str, Any]) -> None:
  """Validation loss against steps and against training seconds, one line per row."""
  plt = records_lib.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for color, (label, r) in zip(COLORS, result["rows"].items()):
    c = r["curve"]
    if not c:
      continue
    loss = [p["val_loss"] for p in c]
    name = f"{label} (lr {r['lr']:g}" + (
      f", diverged at step {r['steps']})" if r["diverged"] else ")"
    )
    axes[0].plot([p["step"] for p in c], loss, "-", color=color, label=name)
    axes[1].plot([p["train_time_s"] for p in c], loss, "-", color=color, label=name)
  axes[0].set(xlabel="steps", ylabel="validation loss", xscale="log", yscale="log")
  axes[1].set(xlabel="training seconds (compile and evaluation excluded)", yscale="log")
  for ax in axes:
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=8)
  fig.suptitle(
    f"{result['model']} on {result['data']}: each method at its tuned lr, "
    f"{result['budget_s']:g} s of training each",
    fontsize=10,
  )
  rep.save_figure(fig, path, dpi=110)


def _report_search(result: dict[str, Any], out: Path) -> list[Path]:
  from fwdgrad_jax.training import lr_search

  s = result["search"]
  plt = records_lib.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  lr_search.draw(ax, s)
  ax.set(xlabel="learning rate", ylabel=f"{s['objective']} (mean over seeds)")
  ax.set_title(
    f"{result['row']}: {result['budget_s']:g} s per run (× diverged, ◇ unstable)", fontsize=9
  )
  ax.grid(alpha=0.3, which="both")
  png = rep.save_figure(fig, out / "lr_search.png", dpi=110)
  table = lr_search.markdown_table(s)
  md = out / "lr_search.md"
  md.write_text(
    f"# lr search: {result['row']}, {result['budget_s']:g} s per run\n\n"
    f"`{result['sweep_command']}`\n\n{table}"
  )
  edge = " (at the grid's edge: widen it)" if s["at_grid_edge"] else ""
  print("\n" + table)
  print(f"{result['row']}: best lr {s['best_lr']} ({s['objective']} {s['best_loss']}){edge}")
  print(
    f"diverged: {s['diverged_lrs'] or 'none'}; unstable: {s.get('unstable_lrs') or 'none'}; "
    f"sweep: {result['sweep_command']}"
  )
  return [md, png]


def report(result: dict[str, Any], out: Path) -> list[Path]:
  """``comparison.md`` and ``comparison.png`` (or the lr search's plot), table printed."""
  if result["kind"] == "lr_search":
    return _report_search(result, out)
  text = table(result)
  md, png = out / "comparison.md", out / "comparison.png"
  command = result.get("provenance", {}).get("command", "")
  md.write_text(f"# The main job\n\n`{command}`\n\n{text}\n")
  plot(png, result)
  print("\n" + text)
  print(f"plot: {png}")
  return [md, png]


def main(argv: list[str] | None = None) -> int:
  """Runs the comparison (or ``--tune``, or only the report).

  Returns:
    0, or 2 for a bad config value or a missing data set (one line on stderr).
  """
  from fwdgrad_jax import data
  from fwdgrad_jax.training import config as config_lib

  try:
    records_lib.script_main(
      __file__,
      run,
      report,
      result_file=lambda args: "lr_search.json" if args.tune else "comparison.json",
      description=__doc__,
      add_arguments=add_arguments,
      argv=argv,
    )
  except (config_lib.ConfigError, data.DatasetUnavailableError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
