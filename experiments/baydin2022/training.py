"""Baydin et al. 2022, §5.3–5.5: training with forward gradients vs backprop at one lr.

For each model preset (``configs/experiment/baydin_*.yaml``: logistic regression lr 1e-4,
MLP 784-1024-1024-10 at lr 2e-5 and 2e-4, CNN lr 2e-4) train forward gradient (k = 1
Gaussian tangent) and backprop with plain SGD at the *same* lr, decay
η_i = η_0·exp(−i·1e-4), batch 64, the same number of iterations, several seeds. From the
runs (experiments._lib.analysis):

* R_f, R_b: ``runtime_ratio`` of :func:`fwdgrad_jax.training.run.train` (step time / time of one
  forward pass + loss), median over seeds; R_f/R_b is the ratio of those medians.
* T_f/T_b: T_b = training time at backprop's lowest validation loss, T_f = training time
  at which forward gradient first reaches that loss, per seed pair and on the curves
  averaged over seeds. "Not reached" is reported with forward's best loss instead.
* test accuracy, best validation loss of each method.

The fair comparison (each method at its own tuned lr) is experiments/baydin2022/fair.py.

Data: MNIST when it can be loaded, else Fashion-MNIST (recorded). The data set is loaded
once and passed to ``run.train``; its validation split is fixed (seed 0), the model and
tangent seeds vary. Writes ``training.json``, then ``training.md`` (paper vs ours) and
``training_<model>.png`` (validation loss vs iterations and vs time); the run
directories (metrics, checkpoints) go under ``--runs-dir`` (default ``<out>/runs``).
Models run by separate commands are reported together with ``--report-only a.json b.json``.

  python -m experiments.baydin2022.training                # the paper's settings: 5 seeds
  python -m experiments.baydin2022.training --quick        # smoke test: 1 seed, 50 steps
  # regenerates results/baydin2022/training.md (sized for 2 shared CPU cores):
  python -m experiments.baydin2022.training --models logreg,mlp_fast --seeds 3 --steps 2000 \\
      --out results/baydin2022/training_logreg_mlp_fast --runs-dir outputs/baydin2022/runs
  python -m experiments.baydin2022.training --models mlp --seeds 1 --steps 2000 \\
      --out results/baydin2022/training_mlp --runs-dir outputs/baydin2022/runs
  python -m experiments.baydin2022.training --models cnn --seeds 1 --steps 50 --eval-every 10 \\
      --val-limit 500 --out results/baydin2022/training_cnn --runs-dir outputs/baydin2022/runs
  python -m experiments.baydin2022.training --report-only \\
      results/baydin2022/training_*/training.json --out results/baydin2022
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

from experiments._lib import analysis, script
from experiments._lib import report as rep
from experiments._lib.config import compose
from fwdgrad_jax.training import records as records_lib

METHODS = ("forward", "backprop")
LABELS = {"forward": "forward gradient (k=1)", "backprop": "backprop"}
COLORS = {"forward": "tab:blue", "backprop": "tab:orange"}

# The paper's Table (Baydin et al. 2022, §5; PyTorch on a Titan XP, MNIST). The MLP row
# gives R for both lrs (they do not depend on the lr) and T_f/T_b only at 2e-4.
MODELS: dict[str, dict[str, Any]] = {
  "logreg": dict(
    preset="baydin_logreg",
    title="multinomial logistic regression",
    paper=dict(lr="1e-4", R_f=2.435, R_b=4.389, R_ratio=0.555, T_ratio=0.553),
  ),
  "mlp": dict(
    preset="baydin_mlp",
    title="MLP 784-1024-1024-10, lr 2e-5",
    paper=dict(lr="2e-5", R_f=2.468, R_b=4.165, R_ratio=0.592, T_ratio=None),
  ),
  "mlp_fast": dict(
    preset="baydin_mlp_fast",
    title="MLP 784-1024-1024-10, lr 2e-4",
    paper=dict(lr="2e-4", R_f=2.468, R_b=4.165, R_ratio=0.592, T_ratio=0.211),
  ),
  "cnn": dict(
    preset="baydin_cnn",
    title="CNN 4×conv64 + fc1024",
    paper=dict(lr="2e-4", R_f=1.434, R_b=2.211, R_ratio=0.649, T_ratio=0.514),
  ),
}
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


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def compose_config(preset: str, overrides: list[str]):
  """A validated :class:`fwdgrad_jax.training.config.Config` from a preset plus Hydra overrides."""

  return compose([f"+experiment={preset}", *overrides])


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


def train_run(preset, method, *, seed, steps, eval_every, dataset, data_dir, run_dir):
  """Trains one run of a preset into a fresh ``run_dir``; returns (summary, records)."""
  from fwdgrad_jax.training import run as run_lib

  overrides = [
    f"data={dataset.name}",
    f"estimator={method}",
    f"seed={seed}",
    f"train.steps={steps}",
    f"train.log_every={eval_every}",
    f"train.eval_every={eval_every}",
    "train.grad_check_every=0",  # untimed but costly on CPU; not part of this study
    "train.checkpoint_every=0",
    "train.progress=false",
  ]
  cfg = compose_config(preset, overrides)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
  # train() resumes from a checkpoint in run_dir; a rerun must start over.
  shutil.rmtree(run_dir, ignore_errors=True)
  summary = run_lib.train(cfg, run_dir, dataset=dataset)
  records = [
    json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
  ]
  return summary, records


class Plan(NamedTuple):
  """What every model's runs share (from the command line).

  Attributes:
    seeds: seeds per method.
    steps: iterations per run (None: the preset's).
    eval_every: iterations between evaluations (None: steps / 20).
    runs_dir: parent of the run directories.
    data_dir: tfds data dir.
  """

  seeds: int
  steps: int | None
  eval_every: int | None
  runs_dir: Path
  data_dir: str | None


def compare_model(key: str, plan: Plan, dataset) -> dict[str, Any]:
  """Both methods at the preset's lr, ``plan.seeds`` seeds each: the model's entry."""
  spec = MODELS[key]
  steps = plan.steps or compose_config(spec["preset"], []).train.steps
  eval_every = plan.eval_every or max(1, steps // 20)
  runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
  records: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in METHODS}
  cfg = None
  for seed in range(plan.seeds):
    for method in METHODS:
      t0 = time.perf_counter()
      run_dir = plan.runs_dir / key / f"{method}-seed{seed}"
      summary, recs = train_run(
        spec["preset"],
        method,
        seed=seed,
        steps=steps,
        eval_every=eval_every,
        dataset=dataset,
        data_dir=plan.data_dir,
        run_dir=run_dir,
      )
      cfg = summary["config"]
      runs[method].append(
        {
          **{k: summary.get(k) for k in _SUMMARY_KEYS},
          "run_dir": str(run_dir),
          "curve": analysis.curve(recs),
        }
      )
      records[method].append(recs)
      print(
        f"  {key} {method:8s} seed {seed}: best val {summary['best_val_loss']}, test acc "
        f"{summary['test_accuracy']}, R {summary['runtime_ratio']}, "
        f"{time.perf_counter() - t0:.0f} s wall",
        flush=True,
      )
  pairs = [
    analysis.time_to_backprop_loss(b, f) for b, f in zip(records["backprop"], records["forward"])
  ]
  med = lambda m, k: analysis.finite_median(r[k] for r in runs[m])
  r_f, r_b = med("forward", "runtime_ratio"), med("backprop", "runtime_ratio")
  step_f, step_b = med("forward", "step_time_ms"), med("backprop", "step_time_ms")
  stats = lambda m, k: analysis.summary_stats(r[k] for r in runs[m])
  return {
    "model": key,
    "preset": spec["preset"],
    "title": spec["title"],
    "data": dataset.name,
    "lr": cfg["optimizer"]["lr"],
    "decay": cfg["optimizer"]["decay"],
    "batch_size": cfg["train"]["batch_size"],
    "steps": steps,
    "eval_every": eval_every,
    "seeds": list(range(plan.seeds)),
    "val_examples": int(dataset.x_val.shape[0]),
    "R_f": r_f,
    "R_b": r_b,
    "R_ratio": r_f / r_b if r_f and r_b else None,
    "step_time_ratio": step_f / step_b if step_f and step_b else None,
    "T": analysis.aggregate_time_to_loss(pairs),
    "T_mean_curves": analysis.time_to_loss_on_mean_curves(
      [r["curve"] for r in runs["backprop"]], [r["curve"] for r in runs["forward"]]
    ),
    "methods": {
      m: {
        "runtime_ratio": stats(m, "runtime_ratio"),
        "step_time_ms": stats(m, "step_time_ms"),
        "base_time_ms": stats(m, "base_time_ms"),
        "test_accuracy": stats(m, "test_accuracy"),
        "best_val_loss": stats(m, "best_val_loss"),
        "final_val_loss": stats(m, "val_loss"),
        "diverged": sum(bool(r["diverged"]) for r in runs[m]),
        "runs": runs[m],
      }
      for m in METHODS
    },
    "paper": spec["paper"],
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The study's options."""
  parser.add_argument(
    "--models",
    default="logreg,mlp,mlp_fast,cnn",
    help=f"comma-separated, from {','.join(MODELS)} (mlp = lr 2e-5, mlp_fast = lr 2e-4)",
  )
  parser.add_argument(
    "--seeds", type=rep.positive_int, default=5, help="seeds per method (paper 5)"
  )
  parser.add_argument("--steps", type=rep.positive_int, default=None, help="iterations (preset's)")
  parser.add_argument(
    "--eval-every", type=rep.positive_int, default=None, help="iterations between evals (steps/20)"
  )
  parser.add_argument("--data", choices=["auto", "mnist", "fashion_mnist"], default="auto")
  parser.add_argument("--data-dir", default=None, help="tfds data dir")
  parser.add_argument("--val-size", type=int, default=5000, help="validation examples from train")
  parser.add_argument(
    "--val-limit",
    type=rep.positive_int,
    default=None,
    help="evaluate on only the first N validation examples (cheaper evals; quick: 500)",
  )
  parser.add_argument(
    "--runs-dir", type=Path, default=None, help="run directories (default <out>/runs)"
  )
  parser.add_argument(
    "--quick", action="store_true", help="smoke test: 1 seed, 50 iterations, small evals"
  )


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Trains every model of ``--models`` with both methods; returns the study's document."""
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    raise SystemExit(f"error: --models: unknown {unknown}; use {list(MODELS)}")
  quick = args.quick
  plan = Plan(
    seeds=1 if quick else args.seeds,
    steps=args.steps or (50 if quick else None),
    eval_every=args.eval_every or (10 if quick else None),
    runs_dir=args.runs_dir or args.out / "runs",
    data_dir=args.data_dir,
  )
  val_limit = args.val_limit or (500 if quick else None)
  logging.getLogger("absl").setLevel(logging.WARNING)
  dataset, notes = load_dataset(args.data, args.data_dir, args.val_size)
  if val_limit is not None and val_limit < dataset.x_val.shape[0]:
    n = val_limit
    dataset = dataclasses.replace(dataset, x_val=dataset.x_val[:n], y_val=dataset.y_val[:n])
  if notes:
    notes.append(f"used {dataset.name}")
  print(f"data: {dataset.name} ({'; '.join(notes) or 'as asked'})", flush=True)
  doc: dict[str, Any] = {"quick": quick, "data_notes": notes, "models": {}}
  for key in models:
    print(f"== {key}: {plan.seeds} seed(s) per method", flush=True)
    entry = compare_model(key, plan, dataset)
    doc["models"][key] = entry
    print(
      f"  R_f {rep.num(entry['R_f'])}  R_b {rep.num(entry['R_b'])}  R_f/R_b {rep.num(entry['R_ratio'])}  "
      f"T_f/T_b {_t_cell(entry['T'])}",
      flush=True,
    )
  return doc


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
  """Several result files → one document; each model keeps the provenance of its file."""
  out: dict[str, Any] = {"quick": False, "data_notes": [], "models": {}}
  for doc in docs:
    out["quick"] |= doc.get("quick", False)
    out["data_notes"] += [n for n in doc.get("data_notes", []) if n not in out["data_notes"]]
    for key, entry in doc["models"].items():
      out["models"][key] = {**entry, "provenance": doc.get("provenance")}
  return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def plot_model(path: Path, entry: dict[str, Any]) -> None:
  """Validation loss vs iterations and vs training time; every seed thin, median thick."""
  plt = records_lib.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for method in METHODS:
    curves = [r["curve"] for r in entry["methods"][method]["runs"]]
    for c in curves:
      if c:
        v = [p["val_loss"] for p in c]
        kw = dict(color=COLORS[method], lw=0.7, alpha=0.35)
        axes[0].plot([p["step"] for p in c], v, **kw)
        axes[1].plot([p["train_time_s"] for p in c], v, **kw)
    s, t, v = analysis.median_curve(curves)
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
    f"{entry['title']} on {entry['data']}: SGD lr {rep.lr(entry['lr'])}, decay {entry['decay']:g}, "
    f"batch {entry['batch_size']}, {entry['steps']} iterations",
    fontsize=10,
  )
  rep.save_figure(fig, path, dpi=110)


def _not_reached(t):
  return f"not reached (best fwd val {rep.num(t['best_forward_val_loss'])} vs bp {rep.num(t['target_val_loss'])})"


def _t_cell(t):
  """T_f/T_b for a table cell: the ratio, or 'not reached' with the best forward loss."""
  if t is None:
    return "–"
  if "n_pairs" in t:  # aggregated over seed pairs
    if t["n_reached"] == 0:
      return _not_reached(t)
    extra = f" ({t['n_reached']}/{t['n_pairs']} seeds)" if t["n_reached"] < t["n_pairs"] else ""
    return f"{rep.num(t['ratio'])}{extra}"
  return rep.num(t["ratio"]) if t["reached"] else _not_reached(t)


def _reach_text(t: dict[str, Any]) -> str:
  if t["n_reached"] == 0:
    return (
      f"never reached backprop's best validation loss ({rep.num(t['target_val_loss'])}; best "
      f"forward {rep.num(t['best_forward_val_loss'])})"
    )
  return (
    f"reached backprop's best validation loss in {t['n_reached']}/{t['n_pairs']} seed pairs, "
    f"after {rep.num(t['step_ratio'], '{:.2f}')}× backprop's iterations and "
    f"{rep.num(t['ratio'], '{:.2f}')}× its time"
  )


def findings(models: dict[str, Any]) -> list[str]:
  """Plain-language bullets computed from the numbers (no hand-written claims)."""
  out = []
  for key in MODELS:
    e = models.get(key)
    if e is None:
      continue
    p, fw, bp = e["paper"], e["methods"]["forward"], e["methods"]["backprop"]
    out.append(
      f"- {e['title']} (same lr): one forward-gradient step took "
      f"{rep.num(e['step_time_ratio'], '{:.2f}')}× a backprop step (R_f/R_b = "
      f"{rep.num(e['R_ratio'], '{:.2f}')}; paper {p['R_ratio']}); forward gradient "
      f"{_reach_text(e['T'])}; test accuracy forward "
      f"{rep.num(fw['test_accuracy']['median'], '{:.3f}')} vs backprop "
      f"{rep.num(bp['test_accuracy']['median'], '{:.3f}')}."
    )
    platform = ((e.get("provenance") or {}).get("hardware") or {}).get("platform")
    if e["R_b"] is not None and e["R_b"] > 10 and platform == "cpu":
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
  return out


def render(doc: dict[str, Any]) -> str:
  """training.md: the paper's numbers beside ours, with commands and hardware per row."""
  models = doc["models"]
  lines = [
    "# Baydin et al. 2022, §5.3–5.5: forward gradient vs backprop training",
    "",
    "Generated by `experiments/baydin2022/training.py` from its JSON. Paper: PyTorch "
    "prototype on an NVIDIA Titan XP, MNIST, their own iteration counts and five seeds. Ours: "
    "fwdgrad_jax (`jax.jvp` with one Gaussian tangent vs `jax.grad`), plain SGD, "
    "η_i = η_0·exp(−i·1e-4), batch 64, the same iterations for both methods, on the data set "
    "and hardware named in each row — with far fewer iterations and seeds than the paper "
    "(see the iterations × seeds column). Each method at its own tuned lr: `fair.md` "
    "(experiments/baydin2022/fair.py).",
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
      f"{p['R_ratio']} | {rep.num(p['T_ratio']) if p['T_ratio'] else '– (not given)'} | |"
    )
    e = models.get(key)
    if e is None:
      lines.append(f"| | {p['lr']} | ours | – | not run | | | | | |")
      continue
    lines.append(
      f"| | {rep.lr(e['lr'])} | ours | {e['data']} | {e['steps']} × {len(e['seeds'])} | "
      f"{rep.num(e['R_f'])} | {rep.num(e['R_b'])} | {rep.num(e['R_ratio'])} | "
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
      f"| {e['title']} | {rep.lr(e['lr'])} | {e['data']} | {rep.num(fw['test_accuracy']['median'], '{:.4f}')} | "
      f"{rep.num(bp['test_accuracy']['median'], '{:.4f}')} | {rep.num(fw['best_val_loss']['median'])} | "
      f"{rep.num(bp['best_val_loss']['median'])} | {rep.num(fw['step_time_ms']['median'], '{:.2f}')} | "
      f"{rep.num(bp['step_time_ms']['median'], '{:.2f}')} | "
      f"{rep.num(bp['base_time_ms']['median'], '{:.2f}')} | {rep.num(e['step_time_ratio'])} | "
      f"{rep.num(e['T']['step_ratio'])} | {fw['diverged']}/{bp['diverged']} |"
    )
  lines += ["", "## What the numbers say", "", *findings(models)]
  lines += ["", "## Commands and hardware", ""]
  for key in MODELS:
    e = models.get(key)
    if e is None:
      continue
    prov = e.get("provenance") or doc.get("provenance") or {}
    lines.append(
      f"- {e['title']}: `{prov.get('command', '(not recorded)')}` — "
      f"{records_lib.hardware_line(prov)} Validation examples {e['val_examples']}, eval every "
      f"{e['eval_every']} iterations."
    )
  if doc.get("data_notes"):
    lines += ["", "Data: " + "; ".join(doc["data_notes"])]
  lines += [
    "",
    "Timings come from shared CPU cores (see the load averages): other jobs ran beside these, "
    "so absolute step times are noisy; R_f and R_b are each measured within one run (step time "
    "and base time from the same process), which cancels part of that noise.",
    "",
  ]
  return "\n".join(lines)


def report(doc: dict[str, Any], out: Path) -> list[Path]:
  """``training.md`` and ``training_<model>.png`` for every model in the document."""
  models = doc["models"]
  if "provenance" in doc:  # one result file: every model shares its provenance
    models = {k: {"provenance": doc["provenance"], **e} for k, e in models.items()}
  doc = {**doc, "models": models}
  paths = []
  for key, entry in models.items():
    paths.append(out / f"training_{key}.png")
    plot_model(paths[-1], entry)
  paths.append(out / "training.md")
  paths[-1].write_text(render(doc))
  return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the study (or only its report); returns the result written to the JSON."""
  return script.main(
    __file__,
    run,
    report,
    result_file="training.json",
    description=__doc__,
    add_arguments=add_arguments,
    merge=merge,
    argv=argv,
  )


if __name__ == "__main__":
  main()
