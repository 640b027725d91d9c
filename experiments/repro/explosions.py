"""Sudden explosions of forward-gradient training, and the study's two safeguards.

The reproduction study (digest §3): forward gradients "were very unstable and suddenly
exploded"; clipping the gradient and capping the directional derivative at norm 1
stopped it. Here the forward-gradient NN row (``repro_nn_mnist_sgd_fwd``: one Gaussian
tangent, raw estimate, SGD with the paper's lr and decay, batch 64) runs in the four
combinations of

* clipping the estimate at global norm ``--clip`` (``optimizer.clip_norm``), and
* capping the directional derivative at ``--cap`` (``estimator.max_jvp_norm``),

for several seeds (and lrs) as one Hydra sweep per combination
(:func:`fwdgrad_jax.training.lr_search.run_sweep`). A run whose loss becomes non-finite stops
with ``diverged: true`` in its ``summary.json`` and the sweep goes on with the next job;
this script checks that every job of every sweep wrote its summary. Reported per
combination: how many runs diverged and at which iteration, how many logged a spike
(a logged train loss above ``--spike`` × the lowest one logged before it) and the final
validation loss of those that did not diverge.

Writes ``explosions.json``, ``explosions.md`` and ``explosions.png`` (train loss of
every run per combination, × where a run diverged).

  # results/reproduction_study/explosions.* (2 shared CPU cores):
  python -m experiments.repro.explosions --steps 1500 --seeds 3 \\
      --out results/reproduction_study --sweeps-dir outputs/reproduction_study/explosions
  python -m experiments.repro.explosions --report-only \\
      results/reproduction_study/explosions.json --out results/reproduction_study
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import run_dirs, script, sweep
from experiments._lib.config import APP, compose
from fwdgrad_jax.training import records

PRESET = "repro_nn_mnist_sgd_fwd"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The script's options."""
  parser.add_argument("--preset", default=PRESET, help="a forward-gradient Table I row")
  parser.add_argument(
    "--lrs", type=records.positive_floats, default=None, help="lrs (default: the preset's)"
  )
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--log-every", type=int, default=25)
  parser.add_argument("--clip", type=float, default=1.0, help="global-norm clipping threshold")
  parser.add_argument("--cap", type=float, default=1.0, help="cap on |directional derivative|")
  parser.add_argument(
    "--conditions", default="all", help="comma-separated subset of: none, cap, clip, clip+cap"
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="lr 1e3, 2 seeds, 20 steps, no safeguard, small MLP, in this process",
  )
  parser.add_argument("--spike", type=float, default=2.0, help="spike: loss > this × its min")
  parser.add_argument("--data", choices=["mnist", "fashion_mnist"], default="fashion_mnist")
  parser.add_argument("--sweeps-dir", type=Path, default=None, help="(<out>/sweeps)")
  parser.add_argument("--app", type=Path, default=APP, help="the Hydra training app")
  parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")


def _finite(x: Any) -> bool:
  return x is not None and math.isfinite(x)


def spikes(losses: list[float | None], factor: float) -> list[int]:
  """Indices of finite losses above ``factor`` × the lowest finite loss before them."""
  out, low = [], math.inf
  for i, x in enumerate(losses):
    if not _finite(x):
      continue
    if x > factor * low:
      out.append(i)
    low = min(low, x)
  return out


def conditions(clip: float, cap: float, which: str = "all") -> dict[str, list[str]]:
  """The safeguard combinations (``which``: "all" or a subset of none, cap, clip, clip+cap)."""
  every = {
    "none": ("none", ["optimizer.clip_norm=null", "estimator.max_jvp_norm=null"]),
    "cap": (f"cap {cap:g}", ["optimizer.clip_norm=null", f"estimator.max_jvp_norm={cap}"]),
    "clip": (f"clip {clip:g}", [f"optimizer.clip_norm={clip}", "estimator.max_jvp_norm=null"]),
    "clip+cap": (
      f"clip {clip:g} + cap {cap:g}",
      [f"optimizer.clip_norm={clip}", f"estimator.max_jvp_norm={cap}"],
    ),
  }
  keys = list(every) if which == "all" else [k.strip() for k in which.split(",") if k.strip()]
  unknown = [k for k in keys if k not in every]
  if unknown:
    raise SystemExit(f"--conditions: unknown {unknown}; known: {', '.join(every)}")
  return dict(every[k] for k in keys)


def run(args: argparse.Namespace) -> dict[str, Any]:
  """One sweep (lrs × seeds) per safeguard combination; per run its fate and curve."""
  if args.quick:
    args.lrs, args.seeds, args.steps, args.log_every, args.conditions = (1e3,), 2, 20, 2, "none"
    args.overrides = [
      *["data.val_size=64", "model.options.hidden=[32]", "train.batch_size=16"],
      *args.overrides,
    ]

  preset_cfg = compose([f"+experiment={args.preset}"])
  if preset_cfg.estimator.name != "forward":
    raise SystemExit(f"--preset: {args.preset} is not a forward-gradient row")
  lrs = args.lrs or (float(preset_cfg.optimizer.lr),)
  base = [
    f"data={args.data}",
    f"train.steps={args.steps}",
    f"train.log_every={args.log_every}",
    f"train.eval_every={args.steps}",
    "train.grad_check_every=0",
    "train.checkpoint_every=0",
    "train.progress=false",
    *args.overrides,
  ]
  out: dict[str, Any] = {
    "preset": args.preset,
    "data": args.data,
    "lrs": list(lrs),
    "seeds": args.seeds,
    "steps": args.steps,
    "spike_factor": args.spike,
    "conditions": {},
  }
  for name, overrides in conditions(args.clip, args.cap, args.conditions).items():
    sweep_dir = (args.sweeps_dir or args.out / "sweeps") / name.replace(" ", "_").replace("+", "")
    print(f"== {name}: lrs {list(lrs)}, {args.seeds} seeds, {args.steps} iterations", flush=True)
    search = sweep.run_sweep(
      sweep_dir.absolute(),
      lrs,
      app=args.app,
      seeds=range(args.seeds),
      presets=[args.preset],
      overrides=[*base, *overrides],
      quiet=False,
      in_process=args.quick,
    )
    runs = []
    for i, lr in enumerate(search.lrs):
      for j, seed in enumerate(search.seeds):
        run_dir = search.extra["runs"][i][j]
        path = Path(run_dir) / "summary.json" if run_dir else None
        s = json.loads(path.read_text()) if path and path.exists() else {}
        recs = run_dirs.metrics(run_dir)
        losses = [r.get("train_loss") for r in recs if "train_loss" in r]
        steps = [r["step"] for r in recs if "train_loss" in r]
        spike_at = [steps[k] for k in spikes(losses, args.spike)]
        runs.append(
          {
            "lr": lr,
            "seed": seed,
            "run_dir": run_dir,
            "summary_written": bool(s),
            "diverged": bool(s.get("diverged")),
            # final val loss > 1.5 × its best (lr_search.score): exploded without a NaN
            "unstable": bool(s.get("unstable")),
            "steps": s.get("steps"),
            "val_loss": s.get("val_loss"),
            "test_loss": s.get("test_loss"),
            "test_accuracy": s.get("test_accuracy"),
            "spike_steps": spike_at,
            "curve": [[st, x] for st, x in zip(steps, losses)],
          }
        )
    out["conditions"][name] = {
      "overrides": overrides,
      "command": records.command_line(search.extra["command"][1], search.extra["command"][2:]),
      "failed_jobs": search.extra["failed_jobs"],
      "runs": runs,
    }
  return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def stats(cond: dict[str, Any]) -> dict[str, Any]:
  """Counts of a condition's runs: diverged, spiked, their steps, finished runs' losses."""
  runs = cond["runs"]
  div = [r for r in runs if r["diverged"]]
  ok = [r for r in runs if not r["diverged"]]
  finals = [r["val_loss"] for r in ok if _finite(r["val_loss"])]
  return {
    "n": len(runs),
    "n_summaries": sum(r["summary_written"] for r in runs),
    "n_diverged": len(div),
    "n_unstable": sum(bool(r.get("unstable")) for r in ok),
    "diverged_at": sorted(r["steps"] for r in div),
    "n_spiked": sum(bool(r["spike_steps"]) for r in runs),
    "first_spikes": sorted(r["spike_steps"][0] for r in runs if r["spike_steps"]),
    "val_loss_median": sorted(finals)[len(finals) // 2] if finals else None,
    "val_loss_range": [min(finals), max(finals)] if finals else None,
  }


def render(doc: dict[str, Any]) -> str:
  """explosions.md: per safeguard combination, how often and when runs explode."""
  prov = doc.get("provenance", {})
  lrs = ", ".join(f"{x:g}" for x in doc["lrs"])
  lines = [
    "# Explosions of forward-gradient training and the study's safeguards",
    "",
    f"Generated by `experiments/repro/explosions.py` from `explosions.json`. Preset "
    f"`{doc['preset']}` (MLP 784-1024-1024-10, one Gaussian tangent, raw estimate, SGD, "
    f"batch 64) on {doc['data']}, lr {lrs}, {doc['seeds']} seeds, {doc['steps']} iterations "
    "(REDUCED: the study trains 50 epochs = 42 950 iterations). A spike: a logged train loss "
    f"(mean over the log interval) above {doc['spike_factor']:g}× the lowest logged before it.",
    "",
  ]
  cols = ["safeguards", "runs", "summaries written", "diverged (non-finite loss)"]
  cols += ["diverged at iteration", "runs with a spike", "first spike at"]
  table = rep.Table([*cols, "final val loss of the others (median, range)"])
  for name, cond in doc["conditions"].items():
    s = stats(cond)
    rng = s["val_loss_range"]
    final = rep.num(s["val_loss_median"]) + (
      f" ({rep.num(rng[0])}–{rep.num(rng[1])})" if rng else ""
    )
    table.add_row(
      name,
      s["n"],
      s["n_summaries"],
      s["n_diverged"],
      ", ".join(map(str, s["diverged_at"])) or rep.DASH,
      s["n_spiked"],
      ", ".join(map(str, s["first_spikes"])) or rep.DASH,
      final,
    )
  lines += table.lines()
  lines += ["", "## Commands and hardware", "", f"- `{prov.get('command', '(not recorded)')}`"]
  for name, cond in doc["conditions"].items():
    lines.append(f"  - {name}: `{cond['command']}`")
  lines += ["", records.hardware_line(prov)]
  return "\n".join(lines) + "\n"


def plot(path: Path, doc: dict[str, Any]) -> None:
  """Train loss of every run, one panel per combination; × at a divergence."""
  plt = records.pyplot()
  conds = doc["conditions"]
  fig, axes = plt.subplots(1, len(conds), figsize=(4 * len(conds), 3.5), squeeze=False, sharey=True)
  for ax, (name, cond) in zip(axes[0], conds.items()):
    for k, r in enumerate(cond["runs"]):
      pts = [(s, x) for s, x in r["curve"] if _finite(x)]
      color = f"C{k % 10}"
      if pts:
        ax.plot(*zip(*pts), color=color, lw=1, label=f"lr {r['lr']:g}, seed {r['seed']}")
      if r["diverged"]:
        y = pts[-1][1] if pts else 1.0
        ax.plot([r["steps"]], [y], "x", color=color, ms=10, mew=2)
    s = stats(cond)
    ax.set(title=f"{name}: {s['n_diverged']}/{s['n']} diverged", xlabel="iteration")
    ax.set(yscale="log")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("train loss (log interval mean)")
  axes[0][0].legend(fontsize=7)
  rep.save_figure(fig, path, dpi=110)


def report(doc: dict[str, Any], out: Path) -> list[Path]:
  """``explosions.md`` and ``explosions.png``."""
  md, png = out / "explosions.md", out / "explosions.png"
  md.write_text(render(doc))
  plot(png, doc)
  return [md, png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the sweeps (or only the report); returns the result written to the JSON."""
  return script.main(
    __file__,
    run,
    report,
    result_file="explosions.json",
    description=__doc__,
    add_arguments=add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
