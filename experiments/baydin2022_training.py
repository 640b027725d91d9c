"""Baydin et al. 2022, §5.3–5.5: training with forward gradients vs backprop, and a fair rerun.

Part 1 (the paper's comparison). For each model preset (``configs/experiment/baydin_*.yaml``:
logistic regression lr 1e-4, MLP 784-1024-1024-10 at lr 2e-5 and 2e-4, CNN lr 2e-4) train
forward gradient (k = 1 Gaussian tangent) and backprop with plain SGD at the *same* lr, decay
η_i = η_0·exp(−i·1e-4), batch 64, the same number of iterations, several seeds. From the runs:

* R_f, R_b: ``runtime_ratio`` of :func:`fwdgrad_jax.train.train` (step time / time of one
  forward pass + loss), median over seeds; R_f/R_b is the ratio of those medians.
* T_f/T_b (:func:`time_to_backprop_loss`): T_b = ``train_time_s`` at which backprop reaches
  its lowest validation loss, T_f = ``train_time_s`` at which forward gradient first reaches
  that same loss, per seed pair. When forward gradient never gets there the result says
  "not reached" and gives the best forward validation loss instead: a finding, not an error.
* test accuracy, best validation loss of each method.

Part 2 (fair comparison, the reproduction study's point): Baydin compare both methods at one
lr. Here each method gets its own small log-spaced lr grid (plus the preset lr, so the
same-lr pair is in the grid at the same budget), one seed, shorter runs; each method's lr
with the best validation loss is kept and T_f/T_b is recomputed at the tuned lrs.

Data: MNIST when it can be loaded, else Fashion-MNIST (recorded). The data set is loaded
once and passed to ``train.train``; its validation split is fixed (seed 0), the model and
tangent seeds vary.

Outputs under ``--out`` (default results/baydin2022): ``training.json`` (every number, per
model, each with the command that produced it; later invocations update their models and
keep the others), ``training.md`` (paper vs ours), ``training_<model>.png`` (validation loss
vs iterations and vs time) and ``training_fair_lr.png``. Run directories (metrics.jsonl,
summary.json) go under ``--runs-dir`` (default outputs/baydin2022) and are replaced on rerun.

  python experiments/baydin2022_training.py                # the paper's settings: 5 seeds
  python experiments/baydin2022_training.py --quick        # smoke test: 1 seed, 50 steps
  # what results/baydin2022/training.md holds (2 shared CPU cores; see its commands):
  python experiments/baydin2022_training.py --models logreg,mlp_fast --seeds 3 --steps 2000 \
      --fair-steps 1000
  python experiments/baydin2022_training.py --models mlp --seeds 1 --steps 2000 --no-fair
  python experiments/baydin2022_training.py --models cnn --seeds 1 --steps 50 --eval-every 10 \
      --val-limit 500 --no-fair
  python experiments/baydin2022_training.py --models '' --fair-models logreg --fair-steps 1000 \
      --fair-forward-lrs 1e-5,1e-2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: the script only writes files
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("forward", "backprop")
LABELS = {"forward": "forward gradient (k=1)", "backprop": "backprop"}
COLORS = {"forward": "tab:blue", "backprop": "tab:orange"}

# The paper's Table (Baydin et al. 2022, §5; PyTorch on a Titan XP, MNIST). The MLP row
# gives R for both lrs (they do not depend on the lr) and T_f/T_b only at 2e-4.
MODELS: dict[str, dict[str, Any]] = {
  "logreg": dict(
    preset="baydin_logreg",
    short="logistic regression",
    title="multinomial logistic regression",
    paper=dict(lr="1e-4", R_f=2.435, R_b=4.389, R_ratio=0.555, T_ratio=0.553),
  ),
  "mlp": dict(
    preset="baydin_mlp",
    short="MLP",
    title="MLP 784-1024-1024-10, lr 2e-5",
    paper=dict(lr="2e-5", R_f=2.468, R_b=4.165, R_ratio=0.592, T_ratio=None),
  ),
  "mlp_fast": dict(
    preset="baydin_mlp_fast",
    short="MLP",
    title="MLP 784-1024-1024-10, lr 2e-4",
    paper=dict(lr="2e-4", R_f=2.468, R_b=4.165, R_ratio=0.592, T_ratio=0.211),
  ),
  "cnn": dict(
    preset="baydin_cnn",
    short="CNN",
    title="CNN 4×conv64 + fc1024",
    paper=dict(lr="2e-4", R_f=1.434, R_b=2.211, R_ratio=0.649, T_ratio=0.514),
  ),
}
# Fair-comparison grids (log-spaced); the preset lr is added to both.
FAIR_GRID = {"forward": (1e-5, 1e-3), "backprop": (1e-3, 0.3)}


# --------------------------------------------------------------------------------------
# T_f / T_b
# --------------------------------------------------------------------------------------


def _evals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Records with a finite validation loss, in step order."""
  out = [
    r
    for r in records
    if r.get("val_loss") is not None and math.isfinite(r["val_loss"]) and "train_time_s" in r
  ]
  return sorted(out, key=lambda r: r["step"])


def time_to_backprop_loss(
  backprop_records: list[dict[str, Any]], forward_records: list[dict[str, Any]]
) -> dict[str, Any]:
  """Baydin's T_f/T_b from two runs' ``metrics.jsonl`` records.

  T_b is the training time (``train_time_s``, evaluation excluded) at backprop's lowest
  validation loss; T_f is the training time at which forward gradient's validation loss
  first is at or below that loss. Both are read at evaluation steps, so they are only as
  fine as the evaluation interval.

  Returns:
    ``target_val_loss``, ``T_b``, ``step_b``; ``reached``; when reached ``T_f``, ``step_f``,
    ``ratio`` (T_f/T_b) and ``step_ratio`` (iterations_f / iterations_b), else those are
    None; always ``best_forward_val_loss`` and ``best_forward_step``. Everything is None
    (and ``reached`` False) when backprop has no finite evaluation.
  """
  bp, fw = _evals(backprop_records), _evals(forward_records)
  result: dict[str, Any] = dict(
    target_val_loss=None,
    T_b=None,
    step_b=None,
    reached=False,
    T_f=None,
    step_f=None,
    ratio=None,
    step_ratio=None,
    best_forward_val_loss=None,
    best_forward_step=None,
  )
  if fw:
    best_fw = min(fw, key=lambda r: r["val_loss"])
    result.update(best_forward_val_loss=best_fw["val_loss"], best_forward_step=best_fw["step"])
  if not bp:
    return result
  # min() keeps the first of equal losses: the earliest time backprop got there.
  best = min(bp, key=lambda r: r["val_loss"])
  result.update(target_val_loss=best["val_loss"], T_b=best["train_time_s"], step_b=best["step"])
  hit = next((r for r in fw if r["val_loss"] <= best["val_loss"]), None)
  if hit is not None:
    result.update(
      reached=True,
      T_f=hit["train_time_s"],
      step_f=hit["step"],
      ratio=hit["train_time_s"] / best["train_time_s"],
      step_ratio=hit["step"] / best["step"],
    )
  return result


def aggregate_time_to_loss(pairs: list[dict[str, Any]]) -> dict[str, Any]:
  """Seed-pair results of :func:`time_to_backprop_loss` → medians over the reached pairs."""
  reached = [p for p in pairs if p["reached"]]
  best_fw = [p["best_forward_val_loss"] for p in pairs if p["best_forward_val_loss"] is not None]
  targets = [p["target_val_loss"] for p in pairs if p["target_val_loss"] is not None]
  return dict(
    n_pairs=len(pairs),
    n_reached=len(reached),
    ratio=_median([p["ratio"] for p in reached]),
    step_ratio=_median([p["step_ratio"] for p in reached]),
    target_val_loss=_median(targets),
    best_forward_val_loss=_median(best_fw),
    per_seed=pairs,
  )


def time_to_loss_on_mean_curves(methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """T_f/T_b as the paper computes it: on each method's curve averaged over runs.

  ``methods[m]["runs"]`` hold ``curve`` lists (step, train_time_s, val_loss); time and loss
  are averaged over the runs at each evaluation step that every run of that method has.
  """
  records = {}
  for method in METHODS:
    curves = [r["curve"] for r in methods[method]["runs"]]
    common = set.intersection(*({p["step"] for p in c} for c in curves)) if curves else set()
    records[method] = [
      dict(
        step=step,
        train_time_s=float(
          np.mean([p["train_time_s"] for c in curves for p in c if p["step"] == step])
        ),
        val_loss=float(np.mean([p["val_loss"] for c in curves for p in c if p["step"] == step])),
      )
      for step in sorted(common)
    ]
  return time_to_backprop_loss(records["backprop"], records["forward"])


def _median(values: list[float | None]) -> float | None:
  values = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.median(values)) if values else None


# --------------------------------------------------------------------------------------
# Configs and runs
# --------------------------------------------------------------------------------------


def compose_config(preset: str, overrides: list[str]):
  """A validated :class:`fwdgrad_jax.config.Config` from a preset plus Hydra overrides."""
  from fwdgrad_jax import config as config_lib

  return config_lib.compose([f"+experiment={preset}", *overrides], config_dir=ROOT / "configs")


def load_dataset(choice: str, data_dir: str | None, val_size: int):
  """``(dataset, notes)``: MNIST if loadable (``choice='auto'``), else Fashion-MNIST."""
  from fwdgrad_jax import data

  names = ["mnist", "fashion_mnist"] if choice == "auto" else [choice]
  notes = []
  for name in names:
    try:
      return data.load(name, data_dir=data_dir, val_size=val_size, seed=0), notes
    except data.DatasetUnavailableError as e:
      notes.append(f"{name} unavailable: {str(e).splitlines()[0].rstrip('.')}")
  raise SystemExit("error: no data set could be loaded:\n  " + "\n  ".join(notes))


def run_one(preset, method, *, seed, steps, eval_every, data_name, data_dir, lr, run_dir, dataset):
  """Trains one preset run into a fresh ``run_dir``; returns (summary, metrics records)."""
  from fwdgrad_jax import train

  overrides = [
    f"data={data_name}",
    f"estimator={method}",
    f"seed={seed}",
    f"train.steps={steps}",
    f"train.log_every={eval_every}",
    f"train.eval_every={eval_every}",
    "train.grad_check_every=0",  # untimed but costly on CPU; not part of this study
    "train.checkpoint_every=0",
    "train.progress=false",
  ]
  if lr is not None:
    overrides.append(f"optimizer.lr={lr!r}")
  cfg = compose_config(preset, overrides)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
  run_dir = Path(run_dir)
  # train() resumes from a checkpoint in run_dir; a rerun of this script must start over.
  if run_dir.exists():
    shutil.rmtree(run_dir)
  summary = train.train(cfg, run_dir, dataset=dataset)
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return summary, records


_SUMMARY_KEYS = (
  "seed",
  "lr",
  "steps",
  "diverged",
  "val_loss",
  "test_loss",
  "test_accuracy",
  "best_val_loss",
  "best_val_step",
  "step_time_ms",
  "base_time_ms",
  "runtime_ratio",
  "train_time_s",
  "num_params",
)


def _curve(records):
  return [
    dict(step=r["step"], train_time_s=r["train_time_s"], val_loss=r["val_loss"])
    for r in _evals(records)
  ]


def _run_entry(summary, records, run_dir):
  entry = {k: summary.get(k) for k in _SUMMARY_KEYS}
  entry.update(run_dir=str(run_dir), curve=_curve(records))
  return entry


def _stats(runs, key):
  values = [r[key] for r in runs if r[key] is not None]
  return dict(median=_median(values), min=min(values, default=None), max=max(values, default=None))


def paper_comparison(key, args, dataset, data_name, say):
  """Part 1 for one model: both methods at the preset lr, ``args.seeds`` seeds."""
  spec = MODELS[key]
  runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
  records: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in METHODS}
  cfg = None
  for seed in range(args.seeds):
    for method in METHODS:
      run_dir = Path(args.runs_dir) / key / f"{method}-seed{seed}"
      t0 = time.perf_counter()
      summary, recs = run_one(
        spec["preset"],
        method,
        seed=seed,
        steps=args.steps_for(key),
        eval_every=args.eval_every_for(key),
        data_name=data_name,
        data_dir=args.data_dir,
        lr=None,
        run_dir=run_dir,
        dataset=dataset,
      )
      cfg = summary["config"]
      # Lets the lr grid reuse this run when it asks for the same run (see fair_comparison).
      run_key = (key, method, seed, args.steps_for(key), args.eval_every_for(key), summary["lr"])
      args.run_cache[run_key] = (summary, recs, run_dir)
      runs[method].append(_run_entry(summary, recs, run_dir))
      records[method].append(recs)
      say(
        f"  {key} {method:8s} seed {seed}: best val {summary['best_val_loss']}, "
        f"test acc {summary['test_accuracy']}, R {summary['runtime_ratio']}, "
        f"{time.perf_counter() - t0:.0f} s wall"
      )
  pairs = [time_to_backprop_loss(b, f) for b, f in zip(records["backprop"], records["forward"])]
  r_f = _stats(runs["forward"], "runtime_ratio")["median"]
  r_b = _stats(runs["backprop"], "runtime_ratio")["median"]
  step_f = _stats(runs["forward"], "step_time_ms")["median"]
  step_b = _stats(runs["backprop"], "step_time_ms")["median"]
  entry = dict(
    model=key,
    preset=spec["preset"],
    title=spec["title"],
    data=data_name,
    lr=cfg["optimizer"]["lr"],
    decay=cfg["optimizer"]["decay"],
    batch_size=cfg["train"]["batch_size"],
    steps=args.steps_for(key),
    eval_every=args.eval_every_for(key),
    seeds=list(range(args.seeds)),
    val_examples=int(dataset.x_val.shape[0]),
    R_f=r_f,
    R_b=r_b,
    R_ratio=r_f / r_b if r_f and r_b else None,
    step_time_ratio=step_f / step_b if step_f and step_b else None,
    T=aggregate_time_to_loss(pairs),
    T_mean_curves=None,  # filled below from the runs' curves
    methods={
      m: dict(
        runtime_ratio=_stats(runs[m], "runtime_ratio"),
        step_time_ms=_stats(runs[m], "step_time_ms"),
        base_time_ms=_stats(runs[m], "base_time_ms"),
        test_accuracy=_stats(runs[m], "test_accuracy"),
        best_val_loss=_stats(runs[m], "best_val_loss"),
        final_val_loss=_stats(runs[m], "val_loss"),
        diverged=sum(bool(r["diverged"]) for r in runs[m]),
        runs=runs[m],
      )
      for m in METHODS
    },
    paper=spec["paper"],
  )
  entry["T_mean_curves"] = time_to_loss_on_mean_curves(entry["methods"])
  return entry


def fair_grid(
  preset_lr: float, quick: bool, ranges: dict[str, tuple[float, float]] | None = None
) -> dict[str, list[float]]:
  """Per-method lr grid: 5 log-spaced values over ``ranges`` (default FAIR_GRID) + preset lr.

  With ``quick`` only the grid's top value and the preset lr: every run pays a compile of
  several seconds on CPU, whatever its length, and two lrs already exercise the selection.
  """
  grid = {}
  for method, (lo, hi) in (ranges or FAIR_GRID).items():
    values = [hi] if quick else np.geomspace(lo, hi, 5).tolist()
    grid[method] = sorted({float(f"{v:.3g}") for v in values} | {preset_lr})
  return grid


def fair_comparison(key, args, dataset, data_name, say):
  """Part 2 for one model: an lr grid per method, 1 seed, ``args.fair_steps`` steps."""
  spec = MODELS[key]
  preset_opt = compose_config(spec["preset"], [f"data={data_name}"]).optimizer
  preset_lr = preset_opt.lr
  grid = fair_grid(preset_lr, args.quick, args.fair_ranges)
  steps, eval_every = args.fair_steps, args.fair_eval_every
  results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
  records: dict[str, dict[float, list[dict[str, Any]]]] = {m: {} for m in METHODS}
  for method in METHODS:
    for lr in grid[method]:
      cached = args.run_cache.get((key, method, 0, steps, eval_every, lr))
      if cached is not None:
        # The paper-lr point of the grid, already run by paper_comparison with seed 0.
        summary, recs, run_dir = cached
      else:
        run_dir = Path(args.runs_dir) / "fair" / key / f"{method}-lr{lr:.3g}"
        summary, recs = run_one(
          spec["preset"],
          method,
          seed=0,
          steps=steps,
          eval_every=eval_every,
          data_name=data_name,
          data_dir=args.data_dir,
          lr=lr,
          run_dir=run_dir,
          dataset=dataset,
        )
      results[method].append(_run_entry(summary, recs, run_dir))
      records[method][lr] = recs
      say(
        f"  fair {key} {method:8s} lr {lr:.3g}: best val {summary['best_val_loss']}, "
        f"diverged {summary['diverged']}"
      )

  def pick(method):
    # A diverged run's early best is not a usable lr (it has no final model): it only
    # counts when every lr diverged.
    ok = [r for r in results[method] if r["best_val_loss"] is not None]
    stable = [r for r in ok if not r["diverged"]]
    return min(stable or ok, key=lambda r: r["best_val_loss"]) if ok else None

  best = {m: pick(m) for m in METHODS}
  at_edge = {
    m: best[m] is not None and best[m]["lr"] in (min(grid[m]), max(grid[m])) for m in METHODS
  }
  tuned = None
  if best["forward"] and best["backprop"]:
    tuned = time_to_backprop_loss(
      records["backprop"][best["backprop"]["lr"]], records["forward"][best["forward"]["lr"]]
    )
  same = time_to_backprop_loss(records["backprop"][preset_lr], records["forward"][preset_lr])
  same_lr = {m: next(r for r in results[m] if r["lr"] == preset_lr) for m in METHODS}
  return dict(
    model=key,
    preset=spec["preset"],
    title=spec["title"],
    data=data_name,
    steps=steps,
    eval_every=eval_every,
    seed=0,
    decay=preset_opt.decay,
    preset_lr=preset_lr,
    grid=grid,
    runs=results,
    best={m: (None if best[m] is None else {k: v for k, v in best[m].items()}) for m in METHODS},
    best_at_grid_edge=at_edge,
    T_tuned=tuned,
    T_same_lr=same,
    same_lr=same_lr,
  )


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _median_curve(curves):
  """(steps, median time, median val loss) over runs on a shared step grid (NaN-padded)."""
  steps = sorted({p["step"] for c in curves for p in c})
  if not steps:
    return np.array([]), np.array([]), np.array([])
  index = {s: i for i, s in enumerate(steps)}
  t = np.full((len(curves), len(steps)), np.nan)
  v = np.full_like(t, np.nan)
  for i, c in enumerate(curves):
    for p in c:
      t[i, index[p["step"]]] = p["train_time_s"]
      v[i, index[p["step"]]] = p["val_loss"]
  return np.array(steps), np.nanmedian(t, 0), np.nanmedian(v, 0)


def plot_model(path: Path, entry: dict[str, Any]) -> None:
  """Validation loss vs iterations and vs training time; every seed thin, median thick."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for method in METHODS:
    curves = [r["curve"] for r in entry["methods"][method]["runs"]]
    for c in curves:
      if c:
        steps = [p["step"] for p in c]
        axes[0].plot(steps, [p["val_loss"] for p in c], color=COLORS[method], lw=0.7, alpha=0.35)
        axes[1].plot(
          [p["train_time_s"] for p in c],
          [p["val_loss"] for p in c],
          color=COLORS[method],
          lw=0.7,
          alpha=0.35,
        )
    s, t, v = _median_curve(curves)
    label = f"{LABELS[method]} (median of {len(curves)})"
    axes[0].plot(s, v, color=COLORS[method], lw=2, label=label)
    axes[1].plot(t, v, color=COLORS[method], lw=2, label=label)
  target = entry["T"]["target_val_loss"]
  if target is not None:
    for ax in axes:
      # The loss T_f/T_b is measured at: backprop's best (median over seeds).
      ax.axhline(target, color="gray", ls=":", lw=1, label="backprop's best val loss")
  axes[0].set_xlabel("iteration")
  axes[1].set_xlabel("training time (s, evaluation excluded)")
  for ax in axes:
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(
    f"{entry['title']} on {entry['data']}: SGD lr {_lr(entry['lr'])}, decay {entry['decay']:g}, "
    f"batch {entry['batch_size']}, {entry['steps']} iterations",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_fair(path: Path, fair: dict[str, dict[str, Any]]) -> None:
  """Per model: best val loss vs lr per method; val loss vs time at tuned and same lrs."""
  keys = list(fair)
  fig, axes = plt.subplots(len(keys), 2, figsize=(11, 4 * len(keys)), squeeze=False)
  for row, key in zip(axes, keys):
    entry = fair[key]
    ax = row[0]
    for method in METHODS:
      runs = entry["runs"][method]
      lrs = [r["lr"] for r in runs]
      best = [r["best_val_loss"] if r["best_val_loss"] is not None else np.nan for r in runs]
      ax.plot(lrs, best, "o-", color=COLORS[method], label=LABELS[method])
      for r in runs:
        if r["diverged"]:
          y = r["best_val_loss"] if r["best_val_loss"] is not None else np.nanmax(best)
          ax.plot(r["lr"], y, "x", color="red", ms=10, mew=2)
      if entry["best"][method]:
        b = entry["best"][method]
        ax.plot(b["lr"], b["best_val_loss"], "*", color=COLORS[method], ms=16, mec="k")
    ax.axvline(entry["preset_lr"], color="gray", ls=":", lw=1, label="paper's lr (both)")
    ax.set_xscale("log")
    ax.set_xlabel("initial learning rate η_0")
    ax.set_ylabel("best validation loss")
    ax.set_title(
      f"{MODELS[entry['model']]['short']}: best val loss per lr ({entry['steps']} it., "
      "1 seed; × diverged)",
      fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax = row[1]
    for method in METHODS:
      for which, style in (("best", "-"), ("same_lr", "--")):
        r = entry[which][method]
        if r is None or not r["curve"]:
          continue
        what = "tuned" if which == "best" else "paper"
        ax.plot(
          [p["train_time_s"] for p in r["curve"]],
          [p["val_loss"] for p in r["curve"]],
          style,
          color=COLORS[method],
          lw=2 if which == "best" else 1,
          label=f"{LABELS[method]}, {what} lr {_lr(r['lr'])}",
        )
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss")
    ax.set_title(
      f"{MODELS[entry['model']]['short']}: tuned lrs (solid) vs the paper's lr (dashed)",
      fontsize=9,
    )
    # Log scale: a large-lr run can spike by an order of magnitude without diverging.
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _f(x, fmt="{:.3f}"):
  return "–" if x is None else fmt.format(x)


def _t_cell(t):
  """T_f/T_b for a table cell: the ratio, or 'not reached' with the best forward loss."""
  if t is None:
    return "–"
  if "n_pairs" in t:  # aggregated over seed pairs
    if t["n_reached"] == 0:
      return (
        f"not reached (best fwd val {_f(t['best_forward_val_loss'])} "
        f"vs bp {_f(t['target_val_loss'])})"
      )
    extra = f" ({t['n_reached']}/{t['n_pairs']} seeds)" if t["n_reached"] < t["n_pairs"] else ""
    return f"{_f(t['ratio'])}{extra}"
  if not t["reached"]:
    return (
      f"not reached (best fwd val {_f(t['best_forward_val_loss'])} "
      f"vs bp {_f(t['target_val_loss'])})"
    )
  return _f(t["ratio"])


def _lr(x):
  """A learning rate as the paper writes it: 1e-4, 2e-5, 0.3."""
  if x is None:
    return "–"
  if x >= 1e-2:
    return f"{x:.3g}"
  mantissa, exponent = f"{x:.2e}".split("e")
  return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _acc(stats):
  return _f(stats["median"], "{:.4f}")


def _reach_text(t: dict[str, Any]) -> str:
  if t["n_reached"] == 0:
    return (
      f"never reached backprop's best validation loss ({_f(t['target_val_loss'])}; best "
      f"forward {_f(t['best_forward_val_loss'])})"
    )
  return (
    f"reached backprop's best validation loss in {t['n_reached']}/{t['n_pairs']} seed pairs, "
    f"after {_f(t['step_ratio'], '{:.2f}')}× backprop's iterations and "
    f"{_f(t['ratio'], '{:.2f}')}× its time"
  )


def _findings(models: dict[str, Any], fair: dict[str, Any]) -> list[str]:
  """Plain-language bullets computed from the numbers (no hand-written claims)."""
  out = []
  for key in MODELS:
    e = models.get(key)
    if e is None:
      continue
    p = e["paper"]
    out.append(
      f"- {e['title']} (same lr): one forward-gradient step took "
      f"{_f(e['step_time_ratio'], '{:.2f}')}× a backprop step (R_f/R_b = "
      f"{_f(e['R_ratio'], '{:.2f}')}; paper {p['R_ratio']}); forward gradient "
      f"{_reach_text(e['T'])}; test accuracy forward "
      f"{_f(e['methods']['forward']['test_accuracy']['median'], '{:.3f}')} vs backprop "
      f"{_f(e['methods']['backprop']['test_accuracy']['median'], '{:.3f}')}."
    )
    if e["R_b"] is not None and e["R_b"] > 10 and "cpu" in e["hardware"].lower():
      out.append(
        f"  - R_b = {e['R_b']:.0f} is far outside the 2–5 expected of reverse mode: on this "
        "backend the backprop step itself is pathologically slow (XLA:CPU's convolution "
        "gradients inside the training loop), so this row measures the backend, not the "
        "method."
      )
    if len(e["seeds"]) < 3 or e["steps"] < 500:
      out.append(
        f"  - only {e['steps']} iterations × {len(e['seeds'])} seed(s): indicative, not a "
        "reproduction of the paper's curves."
      )
  for e in fair.values():
    fw, bp = e["best"]["forward"], e["best"]["backprop"]
    if fw is None or bp is None:
      continue
    t = e["T_tuned"]
    reach = (
      f"forward gradient reaches it at T_f/T_b = {_f(t['ratio'], '{:.2f}')}"
      if t and t["reached"]
      else "forward gradient never reaches it"
    )
    edges = [LABELS[m] for m in METHODS if e["best_at_grid_edge"][m]]
    out.append(
      f"- {MODELS[e['model']]['short']}, each method at its tuned lr ({e['steps']} iterations, "
      f"1 seed): backprop (lr {_lr(bp['lr'])}) gets to validation loss "
      f"{_f(bp['best_val_loss'])} / test accuracy {_f(bp['test_accuracy'], '{:.3f}')}, "
      f"forward gradient (lr {_lr(fw['lr'])}) to {_f(fw['best_val_loss'])} / "
      f"{_f(fw['test_accuracy'], '{:.3f}')}; {reach}."
      + (f" Best lr at the grid edge for: {', '.join(edges)}." if edges else "")
    )
  return out


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
  """training.md: paper's numbers beside ours, commands and hardware per row."""
  models = doc.get("models", {})
  fair = doc.get("fair", {})
  lines = [
    "# Baydin et al. 2022, §5.3–5.5: forward gradient vs backprop training",
    "",
    "Generated by `experiments/baydin2022_training.py` from `training.json`. Paper: PyTorch "
    "prototype on an NVIDIA Titan XP, MNIST, their own iteration counts and five seeds. Ours: "
    "fwdgrad_jax (`jax.jvp` with one Gaussian tangent vs `jax.grad`), plain SGD, "
    "η_i = η_0·exp(−i·1e-4), batch 64, the same iterations for both methods, on the data set "
    "and hardware named in each row — with far fewer iterations and seeds than the paper "
    "(see the steps × seeds column), because these runs had two shared CPU cores.",
    "",
    "R = step time / (forward pass + loss) time, median over seeds; R_f/R_b = ratio of the "
    "medians. T_b = training time at backprop's lowest validation loss, T_f = training time "
    "at which forward gradient first reaches that loss (training time excludes evaluation "
    "and compilation; both are read at evaluation steps). 'mean curves' applies this to each "
    "method's validation curve averaged over seeds, as the paper does; 'per seed pair' "
    "applies it to seed k of each method and gives the median over the pairs that reached "
    "the loss. 'not reached' = forward gradient never got to backprop's best validation loss "
    "within the same number of iterations; its best validation loss is given instead.",
    "",
    "## Runtime ratios and time to backprop's best loss (same lr for both methods)",
    "",
    "| model | lr | source | data | iterations × seeds | R_f | R_b | R_f/R_b "
    "| T_f/T_b (mean curves) | T_f/T_b (per seed pair) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for key, spec in MODELS.items():
    p = spec["paper"]
    lines.append(
      f"| {spec['title']} | {p['lr']} | paper | MNIST | (paper) | {p['R_f']} | {p['R_b']} | "
      f"{p['R_ratio']} | {_f(p['T_ratio']) if p['T_ratio'] else '– (not given)'} | |"
    )
    e = models.get(key)
    if e is None:
      lines.append(f"| | {p['lr']} | ours | – | not run | | | | | |")
      continue
    lines.append(
      f"| | {_lr(e['lr'])} | ours | {e['data']} | {e['steps']} × {len(e['seeds'])} | "
      f"{_f(e['R_f'])} | {_f(e['R_b'])} | {_f(e['R_ratio'])} | "
      f"{_t_cell(e.get('T_mean_curves'))} | {_t_cell(e['T'])} |"
    )
  lines += [
    "",
    "## Accuracy, losses and step times (ours, same lr, medians over seeds)",
    "",
    "| model | lr | data | test acc fwd | test acc bp | best val loss fwd | best val loss bp "
    "| step ms fwd | step ms bp | base ms | step time fwd/bp | iterations_f/iterations_b "
    "| diverged fwd/bp |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for key in MODELS:
    e = models.get(key)
    if e is None:
      continue
    fw, bp = e["methods"]["forward"], e["methods"]["backprop"]
    lines.append(
      f"| {e['title']} | {_lr(e['lr'])} | {e['data']} | {_acc(fw['test_accuracy'])} | "
      f"{_acc(bp['test_accuracy'])} | {_f(fw['best_val_loss']['median'])} | "
      f"{_f(bp['best_val_loss']['median'])} | {_f(fw['step_time_ms']['median'], '{:.2f}')} | "
      f"{_f(bp['step_time_ms']['median'], '{:.2f}')} | "
      f"{_f(bp['base_time_ms']['median'], '{:.2f}')} | {_f(e['step_time_ratio'])} | "
      f"{_f(e['T']['step_ratio'])} | {fw['diverged']}/{bp['diverged']} |"
    )
  if fair:
    lines += [
      "",
      "## Fair comparison: each method at its own tuned lr (reproduction study)",
      "",
      "One seed per lr, the lr grid below per method plus the paper's lr, same decay and "
      "batch; each method's lr with the lowest validation loss is kept. The 'paper lr' row is "
      "the same grid budget at the paper's shared lr, so the two rows compare like with like.",
      "",
      "| model | data | iterations | setting | lr fwd | lr bp | test acc fwd | test acc bp "
      "| best val loss fwd | best val loss bp | T_f/T_b |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in fair.values():
      for setting, pick, t in (
        ("paper lr (same for both)", e["same_lr"], e["T_same_lr"]),
        ("tuned lr per method", e["best"], e["T_tuned"]),
      ):
        fw, bp = pick["forward"], pick["backprop"]
        if fw is None or bp is None:
          lines.append(f"| {e['title']} | {e['data']} | {e['steps']} | {setting} | no finite run |")
          continue
        lines.append(
          f"| {e['title']} | {e['data']} | {e['steps']} | {setting} | {_lr(fw['lr'])} | "
          f"{_lr(bp['lr'])} | {_f(fw['test_accuracy'], '{:.4f}')} | "
          f"{_f(bp['test_accuracy'], '{:.4f}')} | {_f(fw['best_val_loss'])} | "
          f"{_f(bp['best_val_loss'])} | {_t_cell(t)} |"
        )
    lines += ["", "Grids (best val loss per lr; * = kept, (div) = diverged):", ""]
    for e in fair.values():
      for method in METHODS:
        cells = []
        for r in e["runs"][method]:
          mark = "*" if e["best"][method] and r["lr"] == e["best"][method]["lr"] else ""
          div = " (div)" if r["diverged"] else ""
          cells.append(f"{_lr(r['lr'])}: {_f(r['best_val_loss'])}{mark}{div}")
        edge = " — best lr at the grid edge" if e["best_at_grid_edge"][method] else ""
        lines.append(f"- {e['title']}, {LABELS[method]}: " + ", ".join(cells) + edge)
  lines += ["", "## What the numbers say", "", *_findings(models, fair)]
  lines += ["", "## Commands and hardware", ""]
  for key in MODELS:
    e = models.get(key)
    if e is None:
      continue
    lines.append(
      f"- {e['title']}: `{e['command']}` — {e['hardware']}; {e['cpu']}; jax {e['jax_version']}; "
      f"load average {e['loadavg_start']} → {e['loadavg_end']}; {e['date']}; "
      f"validation examples {e['val_examples']}, eval every {e['eval_every']} iterations."
    )
  for e in fair.values():
    lines.append(
      f"- fair grid, {e['title']}: `{e['command']}` — {e['hardware']}; {e['cpu']}; "
      f"jax {e['jax_version']}; load average {e['loadavg_start']} → {e['loadavg_end']}; "
      f"{e['date']}."
    )
  notes = sorted({n for e in [*models.values(), *fair.values()] for n in e.get("data_notes", [])})
  if notes:
    lines += ["", "Data: " + "; ".join(notes)]
  lines += [
    "",
    "Timings come from shared CPU cores (see the load averages): other jobs ran beside these, "
    "so absolute step times are noisy; R_f and R_b are each measured within one run (step time "
    "and base time from the same process), which cancels part of that noise.",
    "",
  ]
  path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _loadavg() -> str:
  try:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    return "?"


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
  return value


def _lr_range(text: str) -> tuple[float, float]:
  try:
    lo, hi = (float(x) for x in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text}: expected LO,HI") from None
  if not 0 < lo < hi:
    raise argparse.ArgumentTypeError(f"{text}: expected 0 < LO < HI")
  return lo, hi


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--models",
    default="logreg,mlp,mlp_fast,cnn",
    help=f"comma-separated, from {','.join(MODELS)} (mlp = lr 2e-5, mlp_fast = lr 2e-4); "
    "empty: only the lr grid of --fair-models",
  )
  parser.add_argument("--seeds", type=_positive_int, default=5, help="seeds per method (paper: 5)")
  parser.add_argument("--steps", type=_positive_int, default=None, help="iterations (preset's)")
  parser.add_argument(
    "--eval-every", type=_positive_int, default=None, help="iterations between evals (steps/20)"
  )
  parser.add_argument(
    "--fair",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also run the per-method lr grid",
  )
  parser.add_argument(
    "--fair-models",
    default=None,
    help="models for the lr grid (default: logreg and one MLP among --models)",
  )
  parser.add_argument(
    "--fair-steps", type=_positive_int, default=None, help="iterations per grid run (steps/2)"
  )
  for method, (lo, hi) in FAIR_GRID.items():
    parser.add_argument(
      f"--fair-{method}-lrs",
      type=_lr_range,
      default=(lo, hi),
      metavar="LO,HI",
      help=f"lr range of the {method} grid, 5 log-spaced values (default {lo:g},{hi:g})",
    )
  parser.add_argument("--data", choices=["auto", "mnist", "fashion_mnist"], default="auto")
  parser.add_argument("--data-dir", default=None, help="tfds data dir")
  parser.add_argument("--val-size", type=int, default=5000, help="validation examples from train")
  parser.add_argument(
    "--val-limit",
    type=_positive_int,
    default=None,
    help="evaluate on only the first N validation examples (cheaper evals; quick: 500)",
  )
  parser.add_argument("--out", default="results/baydin2022", help="results directory")
  parser.add_argument("--runs-dir", default="outputs/baydin2022", help="run directories")
  parser.add_argument(
    "--quick", action="store_true", help="smoke test: 1 seed, 50 iterations, small evals"
  )
  parser.add_argument(
    "--replot",
    action="store_true",
    help="no training: recompute derived numbers, training.md and the PNGs from training.json",
  )
  args = parser.parse_args(argv)
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = [m for m in args.models if m not in MODELS]
  if unknown:
    parser.error(f"--models: unknown {unknown}; use {list(MODELS)}")
  if args.quick:
    args.seeds = 1
    args.steps = args.steps or 50
    args.eval_every = args.eval_every or 10
    args.fair_steps = args.fair_steps or args.steps
    args.val_limit = args.val_limit or 500
  if args.fair_models is None:
    mlp = next((m for m in ("mlp_fast", "mlp") if m in args.models), None)
    args.fair_models = [m for m in ("logreg", mlp) if m is not None and m in args.models]
  else:
    args.fair_models = [m.strip() for m in args.fair_models.split(",") if m.strip()]
    unknown = [m for m in args.fair_models if m not in MODELS]
    if unknown:
      parser.error(f"--fair-models: unknown {unknown}; use {list(MODELS)}")
  if not args.fair:
    args.fair_models = []
  args.fair_ranges = {"forward": args.fair_forward_lrs, "backprop": args.fair_backprop_lrs}

  def steps_for(key):
    if args.steps is not None:
      return args.steps
    return compose_config(MODELS[key]["preset"], []).train.steps

  args.steps_for = steps_for
  args.eval_every_for = lambda key: args.eval_every or max(1, steps_for(key) // 20)
  if args.fair_models:
    default_fair = max(1, steps_for(args.fair_models[0]) // 2)
    args.fair_steps = args.fair_steps or default_fair
    args.fair_eval_every = args.eval_every or max(1, args.fair_steps // 20)
  return args


def main(argv: list[str] | None = None) -> int:
  from fwdgrad_jax import experiment

  args = parse_args(argv)
  args.run_cache = {}
  logging.getLogger("absl").setLevel(logging.WARNING)
  import jax

  def say(msg):
    print(msg, flush=True)

  argv_used = sys.argv[1:] if argv is None else [str(a) for a in argv]
  command = shlex.join(["python", "experiments/baydin2022_training.py", *argv_used])
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  json_path = out / "training.json"
  doc = json.loads(json_path.read_text()) if json_path.exists() else {}
  doc.setdefault("models", {})
  doc.setdefault("fair", {})

  if args.replot:
    for key, entry in doc["models"].items():
      entry["T_mean_curves"] = time_to_loss_on_mean_curves(entry["methods"])
      plot_model(out / f"training_{key}.png", entry)
    if doc["fair"]:
      plot_fair(out / "training_fair_lr.png", doc["fair"])
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    write_markdown(out / "training.md", doc)
    say(f"redrew {out / 'training.md'} and the PNGs from {json_path}")
    return 0

  dataset, notes = load_dataset(args.data, args.data_dir, args.val_size)
  data_name = dataset.name
  if args.val_limit is not None and args.val_limit < dataset.x_val.shape[0]:
    n = args.val_limit
    dataset = dataclasses.replace(dataset, x_val=dataset.x_val[:n], y_val=dataset.y_val[:n])
  if notes:
    notes.append(f"used {data_name}")
  device = jax.devices()[0]
  context = dict(
    command=command,
    hardware=f"jax.devices()[0] = {device!r} ({device.platform}, {device.device_kind})",
    cpu=experiment.hardware_info()["cpu_model"],
    jax_version=jax.__version__,
    data_notes=notes,
    quick=args.quick,
  )
  say(f"data: {data_name} ({'; '.join(notes) or 'as asked'}); device {context['hardware']}")

  def save():
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    write_markdown(out / "training.md", doc)

  for key in args.models:
    say(f"== {key}: {args.seeds} seed(s) x {args.steps_for(key)} iterations per method")
    start = dict(loadavg_start=_loadavg(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    entry = paper_comparison(key, args, dataset, data_name, say)
    entry.update(context, **start, loadavg_end=_loadavg())
    doc["models"][key] = entry
    plot_model(out / f"training_{key}.png", entry)
    save()
    say(
      f"  R_f {_f(entry['R_f'])}  R_b {_f(entry['R_b'])}  R_f/R_b {_f(entry['R_ratio'])}  "
      f"T_f/T_b {_t_cell(entry['T'])}"
    )

  for key in args.fair_models:
    say(f"== fair lr grid: {key}, {args.fair_steps} iterations per run")
    start = dict(loadavg_start=_loadavg(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    entry = fair_comparison(key, args, dataset, data_name, say)
    entry.update(context, **start, loadavg_end=_loadavg())
    doc["fair"][key] = entry
    save()
    say(f"  tuned: T_f/T_b {_t_cell(entry['T_tuned'])}; paper lr: {_t_cell(entry['T_same_lr'])}")
  if doc["fair"]:
    plot_fair(out / "training_fair_lr.png", doc["fair"])
  save()
  say(f"wrote {json_path}, {out / 'training.md'} and the PNGs in {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
