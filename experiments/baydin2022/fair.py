"""Forward gradient vs backprop, each at its own tuned lr (the reproduction study's point).

Baydin et al. 2022 compare both methods at one shared lr. Here, for each preset
(default ``baydin_logreg`` and ``baydin_mlp_fast``) and each method, one learning-rate
grid search (:func:`fwdgrad_jax.training.lr_search.run_sweep`: the Hydra app with Optuna's
GridSampler, ``+experiment=[<preset>,lr_search_grid]``) over a log grid plus the
preset's lr, at the preset's decay and batch size, shorter runs. Each method's best lr
(lowest final validation loss, the mean of a run's last 3 evaluations; lrs that diverged
or were unstable — final > 1.5 × the run's best — are out:
:func:`fwdgrad_jax.training.lr_search.score`) is kept, and T_f/T_b
(experiments._lib.analysis) is computed at the tuned lrs and, from the same sweeps and
budget, at the paper's shared lr.

Writes ``fair.json`` (every search in lr_search's format, the T_f/T_b, the curves of
the runs compared), then ``fair.md`` and ``fair_lr.png``; the sweeps (one run directory
per lr and seed) go under ``--sweeps-dir`` (default ``<out>/sweeps``).

  python -m experiments.baydin2022.fair                 # 5000 iterations, 6 lrs per method
  # regenerates results/baydin2022/fair.{json,md} (sized for 2 shared CPU cores):
  python -m experiments.baydin2022.fair --steps 1000 --forward-lrs 1e-5,1e-2,7 \\
      --out results/baydin2022 --sweeps-dir outputs/baydin2022/sweeps
  python -m experiments.baydin2022.fair --quick      # smoke test: 2 lrs each, 50 iterations
  python -m experiments.baydin2022.fair --report-only results/baydin2022/fair.json \\
      --out results/baydin2022
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from experiments._lib import analysis, run_dirs, script, sweep
from experiments._lib import report as rep
from experiments._lib.config import APP, compose
from fwdgrad_jax.training import lr_search, records

METHODS = ("forward", "backprop")
LABELS = {"forward": "forward gradient (k=1)", "backprop": "backprop"}
COLORS = {"forward": "tab:blue", "backprop": "tab:orange"}
GRIDS = {"forward": (1e-5, 1e-3, 5), "backprop": (1e-3, 0.3, 5)}  # log-spaced (lo, hi, n)


def _grid(text: str) -> tuple[float, float, int]:
  try:
    lo, hi, n = text.split(",")
    grid = float(lo), float(hi), int(n)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text}: expected LO,HI,N") from None
  if not 0 < grid[0] <= grid[1] or grid[2] < 1:
    raise argparse.ArgumentTypeError(f"{text}: expected 0 < LO <= HI and N >= 1")
  return grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The comparison's options."""
  parser.add_argument(
    "--presets", default="baydin_logreg,baydin_mlp_fast", help="configs/experiment presets"
  )
  parser.add_argument("--steps", type=int, default=None, help="iterations per run (preset's / 2)")
  parser.add_argument("--eval-every", type=int, default=None, help="default steps / 20")
  parser.add_argument("--seeds", type=int, default=1, help="seeds per lr")
  for method, (lo, hi, n) in GRIDS.items():
    parser.add_argument(
      f"--{method}-lrs",
      type=_grid,
      default=(lo, hi, n),
      metavar="LO,HI,N",
      help=f"{method}: N log-spaced lrs from LO to HI, plus the preset's (default {lo:g},{hi:g},{n})",
    )
  parser.add_argument("--data", choices=["auto", "mnist", "fashion_mnist"], default="auto")
  parser.add_argument("--data-dir", default=None, help="tfds data dir")
  parser.add_argument(
    "--val-size", type=int, default=None, help="validation examples from train (5000; quick 500)"
  )
  parser.add_argument(
    "--sweeps-dir", type=Path, default=None, help="the sweeps' run directories (<out>/sweeps)"
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="smoke test: top lr + preset lr, 50 iterations, in this process",
  )
  parser.add_argument("--app", type=Path, default=APP, help="the Hydra training app")


def _data_name(choice: str, data_dir: str | None) -> tuple[str, list[str]]:
  from fwdgrad_jax import data

  if choice != "auto":
    return choice, []
  if data.is_prepared("mnist", data_dir=data_dir):
    return "mnist", []
  return "fashion_mnist", ["mnist is not prepared here (offline); used fashion_mnist"]


def _pick(search: lr_search.LrSearch, lr: float | None) -> dict[str, Any] | None:
  """The runs of one lr of a search: per seed, its run dir, summary and curve."""
  if lr is None:
    return None
  i = search.lrs.index(lr)
  runs = search.extra["runs"][i]
  summaries = [run_dirs.summary(r) for r in runs]
  return {
    "lr": lr,
    "loss": search.curve[i],
    "test_accuracy": analysis.finite_median(s.get("test_accuracy") for s in summaries),
    "diverged": any(search.diverged[i]),
    "status": search.status(i),
    "run_dirs": runs,
    "curves": [analysis.curve(run_dirs.metrics(r)) for r in runs],
  }


def _time_to_loss(bp: dict[str, Any] | None, fw: dict[str, Any] | None) -> dict[str, Any] | None:
  if bp is None or fw is None:
    return None
  pairs = [
    analysis.time_to_backprop_loss(run_dirs.metrics(b), run_dirs.metrics(f))
    for b, f in zip(bp["run_dirs"], fw["run_dirs"])
  ]
  return analysis.aggregate_time_to_loss(pairs)


def compare_preset(preset: str, args: argparse.Namespace, data: str) -> dict[str, Any]:
  """Both methods' lr searches on one preset, and T_f/T_b at the tuned and the shared lr."""

  cfg = compose([f"+experiment={preset}", f"data={data}"])
  preset_lr = cfg.optimizer.lr
  steps = args.steps or (50 if args.quick else max(1, cfg.train.steps // 2))
  eval_every = args.eval_every or (10 if args.quick else max(1, steps // 20))
  overrides = [
    f"data={data}",
    f"data.val_size={args.val_size or (500 if args.quick else 5000)}",
    f"train.steps={steps}",
    f"train.log_every={eval_every}",
    f"train.eval_every={eval_every}",
    "train.grad_check_every=0",
    "train.checkpoint_every=0",
    "train.progress=false",
  ]
  if args.data_dir:
    overrides.append(f"data.data_dir={args.data_dir}")
  searches = {}
  for method in METHODS:
    lo, hi, n = getattr(args, f"{method}_lrs")
    grid = (hi,) if args.quick else lr_search.log_grid(lo, hi, n)
    grid = tuple(sorted({*grid, preset_lr}))
    print(f"== {preset} {method}: lrs {list(grid)}, {steps} iterations", flush=True)
    searches[method] = sweep.run_sweep(
      ((args.sweeps_dir or args.out / "sweeps") / preset / method).absolute(),
      grid,
      app=args.app,
      seeds=range(args.seeds),
      presets=[preset],
      overrides=[*overrides, f"estimator={method}"],
      quiet=False,
      in_process=args.quick,
    )
  tuned = {m: _pick(searches[m], searches[m].best_lr) for m in METHODS}
  same = {m: _pick(searches[m], preset_lr) for m in METHODS}
  return {
    "preset": preset,
    "title": f"{cfg.model.name}, preset {preset}",
    "data": data,
    "steps": steps,
    "eval_every": eval_every,
    "seeds": list(range(args.seeds)),
    "preset_lr": preset_lr,
    "decay": cfg.optimizer.decay,
    "batch_size": cfg.train.batch_size,
    "searches": {m: searches[m].as_dict() for m in METHODS},
    # As typed from the working directory (the list in each search has full paths).
    "sweep_commands": {
      m: records.command_line(searches[m].extra["command"][1], searches[m].extra["command"][2:])
      for m in METHODS
    },
    "tuned": tuned,
    "same_lr": same,
    "T_tuned": _time_to_loss(tuned["backprop"], tuned["forward"]),
    "T_same_lr": _time_to_loss(same["backprop"], same["forward"]),
  }


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Every preset of ``--presets``; returns the comparison's document."""
  data, notes = _data_name(args.data, args.data_dir)
  presets = [p.strip() for p in args.presets.split(",") if p.strip()]
  entries = {p: compare_preset(p, args, data) for p in presets}
  return {"quick": args.quick, "data_notes": notes, "presets": entries}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _t_cell(t):
  if t is None:
    return "–"
  if t["n_reached"] == 0:
    return (
      f"not reached (best fwd val {rep.num(t['best_forward_val_loss'])} "
      f"vs bp {rep.num(t['target_val_loss'])})"
    )
  extra = f" ({t['n_reached']}/{t['n_pairs']} seeds)" if t["n_reached"] < t["n_pairs"] else ""
  return f"{rep.num(t['ratio'])}{extra}"


def plot(path: Path, presets: dict[str, Any]) -> None:
  """Per preset: best val loss vs lr per method; val loss vs time at tuned and shared lrs."""
  plt = records.pyplot()
  fig, axes = plt.subplots(len(presets), 2, figsize=(11, 4 * len(presets)), squeeze=False)
  for row, e in zip(axes, presets.values()):
    ax = row[0]
    for method in METHODS:
      lr_search.draw(ax, e["searches"][method], color=COLORS[method], label=LABELS[method])
    ax.axvline(e["preset_lr"], color="gray", ls=":", lw=1, label="paper's lr (both)")
    objective = e["searches"]["forward"].get("objective", "loss").replace("_", " ")
    ax.set(xlabel="initial learning rate η_0", ylabel=objective)
    ax.set_title(
      f"{e['title']}: {objective} per lr ({e['steps']} it.; × diverged, ◇ unstable)", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax = row[1]
    for method in METHODS:
      for which, style in (("tuned", "-"), ("same_lr", "--")):
        pick = e[which][method]
        if pick is None or not pick["curves"] or not pick["curves"][0]:
          continue
        c = pick["curves"][0]
        ax.plot(
          [p["train_time_s"] for p in c],
          [p["val_loss"] for p in c],
          style,
          color=COLORS[method],
          lw=2 if which == "tuned" else 1,
          label=f"{LABELS[method]}, {'tuned' if which == 'tuned' else 'paper'} lr "
          f"{rep.lr(pick['lr'])}",
        )
    ax.set(xlabel="training time (s)", ylabel="validation loss", yscale="log")
    # Log scale: a large-lr run can spike by an order of magnitude without diverging.
    ax.set_title(f"{e['title']}: tuned lrs (solid) vs the paper's lr (dashed)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  rep.save_figure(fig, path, dpi=110)


def render(doc: dict[str, Any]) -> str:
  """fair.md: the two settings side by side, every grid, the commands and the hardware."""
  prov = doc.get("provenance", {})
  lines = [
    "# Forward gradient vs backprop at each method's own tuned lr",
    "",
    "Generated by `experiments/baydin2022/fair.py` from `fair.json`. Each method gets one lr "
    "grid search (fwdgrad_jax.training.lr_search, Optuna's GridSampler over the Hydra app) over the "
    "grid below plus the paper's lr, at the preset's decay and batch; the lr with the lowest "
    "loss of the grids' rule below is kept. The 'paper "
    "lr' row is the same budget at Baydin et al.'s shared lr, from the same sweeps, so the "
    "two rows compare like with like.",
    "",
    "| preset | data | iterations × seeds | setting | lr fwd | lr bp | test acc fwd "
    "| test acc bp | val loss fwd | val loss bp | T_f/T_b |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for e in doc["presets"].values():
    for setting, key, t in (
      ("paper lr (same for both)", "same_lr", e["T_same_lr"]),
      ("tuned lr per method", "tuned", e["T_tuned"]),
    ):
      fw, bp = e[key]["forward"], e[key]["backprop"]
      head = f"| {e['preset']} | {e['data']} | {e['steps']} × {len(e['seeds'])} | {setting} |"
      if fw is None or bp is None:
        lines.append(f"{head} no finite run | | | | | | |")
        continue
      lines.append(
        f"{head} {rep.lr(fw['lr'])} | {rep.lr(bp['lr'])} | {rep.num(fw['test_accuracy'], '{:.4f}')} | "
        f"{rep.num(bp['test_accuracy'], '{:.4f}')} | {rep.num(fw['loss'])} | {rep.num(bp['loss'])} | "
        f"{_t_cell(t)} |"
      )
  searches = [s for e in doc["presets"].values() for s in e["searches"].values()]
  rule = lr_search.rule_line(searches[0]) if searches else ""
  lines += [
    "",
    f"Grids (* = kept, (div) = diverged, (unstable) = unstable). The val loss columns above "
    f"are this loss of the kept lr. {rule}",
    "",
  ]
  for e in doc["presets"].values():
    for method in METHODS:
      s = e["searches"][method]
      cells = lr_search.cells(s, rep.num)
      edge = " — best lr at the grid edge" if s["at_grid_edge"] else ""
      lines.append(f"- {e['preset']}, {LABELS[method]}: " + ", ".join(cells) + edge)
  lines += ["", "## Commands and hardware", "", f"- `{prov.get('command', '(not recorded)')}`"]
  for e in doc["presets"].values():
    for method in METHODS:
      lines.append(f"  - {e['preset']}, {method}: `{e['sweep_commands'][method]}`")
  lines += ["", records.hardware_line(prov)]
  if doc.get("data_notes"):
    lines += ["", "Data: " + "; ".join(doc["data_notes"])]
  return "\n".join(lines) + "\n"


def report(doc: dict[str, Any], out: Path) -> list[Path]:
  """``fair.md`` and ``fair_lr.png``."""
  png, md = out / "fair_lr.png", out / "fair.md"
  plot(png, doc["presets"])
  md.write_text(render(doc))
  return [md, png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the comparison (or only its report); returns the result written to the JSON."""
  return script.main(
    __file__,
    run,
    report,
    result_file="fair.json",
    description=__doc__,
    add_arguments=add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
