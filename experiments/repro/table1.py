"""Table I of the reproduction study, run: every preset row beside the paper's test loss.

The study (digest §3) trains an MLP (NN), a 4-conv CNN and a VGG-like CNN with forward
gradients and backprop under SGD, Nesterov and Adam, at per-method tuned lrs, batch 64,
and reports the test loss after 50 (CIFAR-10: 100) epochs. Every row is a preset
``configs/experiment/repro_<model>_<data>_<opt>_<fwd|bp>.yaml``; this script runs them
through the training app's API (:func:`fwdgrad_jax.training.run.train`, the same loop as
``experiments/train.py``; each run records the equivalent app command) and writes
``table1.json``, ``table1.md`` and ``table1_curves.png`` (validation loss per optimizer).

Forward rows run as preset (the directional derivative capped at 1, no clipping) and, with
``--fwd-variants preset,clip 1``, also with the estimate clipped at global norm 1
(``optimizer.clip_norm=1.0``). The paper gives no clipping threshold; with the raw
single-tangent estimate (‖ĝ‖ ≈ √n·|d| in n = 1.86 M dimensions) clipping at 1 turns every
step into a step of length lr along ±v/‖v‖, which barely moves the weights at the paper's
lrs (see the README), so the presets do not clip.

MNIST and CIFAR-10 cannot be prepared offline here: ``--data auto`` uses MNIST where tfds
has it, else Fashion-MNIST (said in the table); CIFAR-10 rows are listed as not run unless
CIFAR-10 is prepared. Budgets below the paper's are stated per row (epochs, steps).

Runs are kept under ``--runs-dir`` (default ``<out>/runs``); a rerun with more epochs
resumes each run from its checkpoint, a finished run is reused.

  # results/reproduction_study/table1.* (commands of every part: its README):
  python -m experiments.repro.table1 --nn-epochs 50 --cnn-steps 500 \\
      --out outputs/repro_table1 --runs-dir outputs/reproduction_study/table1
  python -m experiments.repro.table1 --rows repro_nn_mnist_sgd_bp --nn-epochs 1   # one row
  python -m experiments.repro.table1 --report-only results/reproduction_study/table1_nn_5ep.json \\
      results/reproduction_study/table1_nn50.json results/reproduction_study/table1_cnn.json \\
      --out results/reproduction_study   # merged (a later file's run of a variant wins)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import run_dirs, script
from experiments._lib.config import compose
from fwdgrad_jax.training import records

STEPS_PER_EPOCH = 859  # 55 000 training examples (60 000 − 5 000 validation) / 64

# Table I of the study: (epochs, test loss) per row.
PAPER = {
  "repro_nn_mnist_sgd_fwd": (50, 0.332),
  "repro_nn_mnist_sgd_bp": (50, 0.000),
  "repro_nn_mnist_nesterov_fwd": (50, 0.270),
  "repro_nn_mnist_nesterov_bp": (50, 0.000),
  "repro_nn_mnist_adam_fwd": (50, 0.283),
  "repro_nn_mnist_adam_bp": (50, 0.000),
  "repro_cnn_mnist_sgd_fwd": (50, 0.548),
  "repro_cnn_mnist_sgd_bp": (50, 0.000),
  "repro_cnn_mnist_nesterov_fwd": (50, 0.559),
  "repro_cnn_mnist_nesterov_bp": (50, 0.000),
  "repro_cnn_mnist_adam_fwd": (50, 0.669),
  "repro_cnn_mnist_adam_bp": (50, 0.000),
  "repro_vgg_cifar10_sgd_fwd": (100, 6.955),
  "repro_vgg_cifar10_sgd_bp": (100, 1.685),
}
FWD_VARIANTS = {"preset": [], "clip 1": ["optimizer.clip_norm=1.0"]}
SUMMARY_KEYS = (
  "val_loss", "val_accuracy", "test_loss", "test_accuracy", "best_val_loss", "best_val_step",
  "diverged", "steps", "step_time_ms", "train_time_s", "lr", "decay", "data",
)  # fmt: skip


def parse_row(row: str) -> dict[str, str]:
  """``repro_<model>_<data>_<opt>_<fwd|bp>`` → its parts."""
  _, model, data, opt, grad = row.split("_")
  return {"model": model, "data": data, "optimizer": opt, "grad": grad}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The script's options."""
  parser.add_argument("--rows", default=",".join(PAPER), help="comma-separated presets")
  parser.add_argument("--nn-epochs", type=float, default=50, help="epochs of the NN rows (50)")
  parser.add_argument("--cnn-steps", type=int, default=300, help="steps of the CNN rows")
  parser.add_argument("--vgg-steps", type=int, default=100, help="steps of the VGG rows")
  parser.add_argument(
    "--fwd-variants", default="preset", help="comma-separated, of: " + ", ".join(FWD_VARIANTS)
  )
  parser.add_argument(
    "--quick", action="store_true", help="the SGD NN rows, 0.02 epochs, 2 evals, small MLP"
  )
  parser.add_argument("--evals", type=int, default=10, help="evaluations per run")
  parser.add_argument("--data", choices=["auto", "mnist", "fashion_mnist"], default="auto")
  parser.add_argument("--runs-dir", type=Path, default=None, help="run directories (<out>/runs)")
  parser.add_argument(
    "overrides", nargs="*", help="Hydra overrides for every run (e.g. data.data_dir=...)"
  )


def _override(overrides: list[str], key: str) -> str | None:
  for o in overrides:
    if o.startswith(key + "="):
      return o.split("=", 1)[1]
  return None


def _relative(path: Path) -> str:
  try:
    return os.path.relpath(path)
  except ValueError:  # another drive (Windows)
    return str(path)


_DATA_CACHE: dict[tuple, Any] = {}


def _dataset(cfg):
  from fwdgrad_jax import data as data_lib

  d = cfg.data
  key = (d.name, d.data_dir, d.val_size, cfg.seed)
  if key not in _DATA_CACHE:
    _DATA_CACHE.clear()  # one data set in memory at a time
    _DATA_CACHE[key] = data_lib.load(
      d.name, data_dir=d.data_dir, val_size=d.val_size, seed=cfg.seed
    )
  return _DATA_CACHE[key]


def train_run(overrides: list[str], run_dir: Path) -> dict[str, Any]:
  """One app run (resumed or reused if ``run_dir`` holds one); its summary and curve.

  Returns:
    ``command`` (the equivalent ``experiments/train.py`` line), ``summary`` (the keys of
    :data:`SUMMARY_KEYS`), ``curve`` (per log line: step, train_loss, val_loss, time).
  """
  from fwdgrad_jax.training import run as run_lib

  cfg = compose(overrides)
  summary_path = run_dir / "summary.json"
  done = None
  if summary_path.exists():
    s = json.loads(summary_path.read_text())
    if s.get("diverged") or (s.get("steps", 0) >= cfg.train.steps and not s.get("interrupted")):
      done = s
  if done is None:
    print(f"-- {run_dir.name}: {' '.join(overrides)}", flush=True)
    done = run_lib.train(cfg, run_dir, dataset=_dataset(cfg))
  curve = [
    {k: r.get(k) for k in ("step", "train_loss", "val_loss", "val_accuracy", "train_time_s")}
    for r in run_dirs.metrics(run_dir)
  ]
  return {
    "command": records.command_line(
      "experiments/train.py", [*overrides, f"hydra.run.dir={_relative(run_dir)}"]
    ),
    "run_dir": str(run_dir),
    "summary": {k: done.get(k) for k in SUMMARY_KEYS},
    "curve": curve,
  }


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Every row of ``--rows`` (forward rows in each of ``--fwd-variants``)."""
  if args.quick:
    args.rows, args.nn_epochs, args.evals = "repro_nn_mnist_sgd_bp,repro_nn_mnist_sgd_fwd", 0.02, 2
    args.overrides = [
      *["data.val_size=64", "model.options.hidden=[32]", "train.batch_size=16"],
      *args.overrides,
    ]
  from fwdgrad_jax import data as data_lib

  user = list(args.overrides)
  data_dir = _override(user, "data.data_dir")
  mnist, note = run_dirs.mnist_or_fashion(args.data, data_dir)
  runs_dir = (args.runs_dir or args.out / "runs").absolute()
  variants = [v.strip() for v in args.fwd_variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in FWD_VARIANTS]
  if unknown:
    raise SystemExit(f"--fwd-variants: unknown {unknown}; known: {list(FWD_VARIANTS)}")
  rows = []
  for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
    if row not in PAPER:
      raise SystemExit(f"--rows: unknown row {row!r}; known: {', '.join(PAPER)}")
    parts = parse_row(row)
    paper_epochs, paper_loss = PAPER[row]
    data = mnist if parts["data"] == "mnist" else parts["data"]
    base = [f"+experiment={row}", f"data={data}", "train.progress=false", *user]
    preset = compose(base)
    entry = {
      "row": row,
      **parts,
      "paper_epochs": paper_epochs,
      "paper_test_loss": paper_loss,
      "lr": preset.optimizer.lr,
      "decay": preset.optimizer.decay,
      "momentum": preset.optimizer.momentum if parts["optimizer"] == "nesterov" else None,
      "betas": [preset.optimizer.b1, preset.optimizer.b2] if parts["optimizer"] == "adam" else None,
      "clip_norm": preset.optimizer.clip_norm,
      "max_jvp_norm": preset.estimator.max_jvp_norm if parts["grad"] == "fwd" else None,
      "data_run": data,
      "runs": {},
    }
    if data == "cifar10" and not data_lib.is_prepared("cifar10", data_dir=data_dir):
      entry["not_run"] = "CIFAR-10 is not prepared here and cannot be downloaded (offline)"
      rows.append(entry)
      continue
    if parts["model"] == "nn":
      steps = max(1, round(args.nn_epochs * STEPS_PER_EPOCH))
    else:
      steps = args.cnn_steps if parts["model"] == "cnn" else args.vgg_steps
    every = max(1, steps // max(1, args.evals))
    budget = [f"train.steps={steps}", f"train.log_every={every}", f"train.eval_every={every}"]
    entry.update(steps=steps, epochs=steps / STEPS_PER_EPOCH)
    for variant in variants if parts["grad"] == "fwd" else ["preset"]:
      name = row if variant == "preset" else f"{row}-{variant.replace(' ', '_')}"
      entry["runs"][variant] = train_run([*base, *budget, *FWD_VARIANTS[variant]], runs_dir / name)
    rows.append(entry)
  return {"data_note": note, "nn_epochs": args.nn_epochs, "rows": rows}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _settings(e: dict[str, Any]) -> str:
  out = []
  if e.get("momentum") is not None:
    out.append(f"momentum {e['momentum']:g}")
  if e.get("betas"):
    out.append(f"β {e['betas'][0]:g}, {e['betas'][1]:g}")
  return "; ".join(out) or "–"


def render(doc: dict[str, Any]) -> str:
  """table1.md: the paper's test loss beside ours, per row and variant, with commands."""
  prov = doc.get("provenance", {})
  lines = [
    "# Reproduction study, Table I: the rows run",
    "",
    "Generated by `experiments/repro/table1.py` from its JSON (`table1*.json`). Paper: test loss after "
    "the row's epochs on MNIST (CIFAR-10 for VGG), batch 64. Ours: the same preset (lr, "
    "decay, momentum/betas, batch 64, forward rows with the directional derivative capped "
    "at 1, no clipping) on the data and budget stated per row; `clip 1` = the forward "
    "preset with the estimate also clipped at global norm 1.",
    "",
    "| row | grad | model | optimizer | lr | decay | momentum / β | paper epochs | paper "
    "test loss | variant | our data | our epochs (steps) | our test loss | test acc | best "
    "val loss | diverged |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for e in doc["rows"]:
    head = (
      f"| {e['row']} | {e['grad']} | {e['model']} | {e['optimizer']} | {e['lr']:g} | "
      f"{e['decay']:g} | {_settings(e)} | {e['paper_epochs']} | {e['paper_test_loss']:.3f} |"
    )
    if e.get("not_run"):
      lines.append(f"{head} – | – | not run: {e['not_run']} | | | | |")
      continue
    for variant, r in e["runs"].items():
      s = r["summary"]
      lines.append(
        f"{head} {variant} | {e['data_run']} | {s['steps'] / STEPS_PER_EPOCH:.2f} "
        f"({s['steps']}) | {rep.num(s['test_loss'])} | {rep.num(s['test_accuracy'], '{:.4f}')} | "
        f"{rep.num(s['best_val_loss'])} | {'yes' if s['diverged'] else 'no'} |"
      )
  parts = doc.get("parts") or [prov]
  lines += ["", "## Commands", ""]
  lines += [f"- rows run by: `{p.get('command', '(not recorded)')}`" for p in parts]
  lines.append("- each run, as an app command (equivalent; run from the repository root):")
  for e in doc["rows"]:
    for variant, r in e.get("runs", {}).items():
      lines.append(f"  - {e['row']} ({variant}): `{r['command']}`")
  lines += [""] + [records.hardware_line(p) for p in parts]
  if doc.get("data_note"):
    lines += ["", "Data: " + doc["data_note"] + "."]
  return "\n".join(lines) + "\n"


STYLE = {("bp", "preset"): "k-", ("fwd", "preset"): "C0-", ("fwd", "clip 1"): "C3--"}


def plot(path: Path, doc: dict[str, Any]) -> None:
  """Validation loss against steps, one panel per (model, optimizer)."""
  plt = records.pyplot()
  panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for e in doc["rows"]:
    if e.get("runs"):
      panels.setdefault((e["model"], e["optimizer"]), []).append(e)
  if not panels:
    panels = {("none", "none"): []}
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
  for ax, ((model, opt), entries) in zip(axes[0], panels.items()):
    for e in entries:
      for variant, r in e["runs"].items():
        pts = [p for p in r["curve"] if p.get("val_loss") is not None]
        if not pts:
          continue
        epochs = r["summary"]["steps"] / STEPS_PER_EPOCH
        label = f"{'backprop' if e['grad'] == 'bp' else 'forward, ' + variant} ({epochs:.3g} ep.)"
        ax.plot(
          [p["step"] for p in pts],
          [p["val_loss"] for p in pts],
          STYLE.get((e["grad"], variant), "C2-"),
          marker=".",
          label=label,
        )
    ax.set(title=f"{model.upper()}, {opt} ({entries[0]['data_run'] if entries else ''})")
    ax.set(xlabel="iteration", ylabel="validation loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  rep.save_figure(fig, path, dpi=110)


def report(doc: dict[str, Any], out: Path) -> list[Path]:
  """``table1.md`` and ``table1_curves.png``."""
  md, png = out / "table1.md", out / "table1_curves.png"
  md.write_text(render(doc))
  plot(png, doc)
  return [md, png]


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
  """Several result files (e.g. the NN and the CNN rows, run by separate commands) as one."""
  rows: dict[str, Any] = {}
  for d in docs:
    for e in d["rows"]:
      # A later file's run of a variant replaces an earlier one; other variants stay.
      runs = {**rows.get(e["row"], {}).get("runs", {}), **e.get("runs", {})}
      rows[e["row"]] = {**e, "runs": runs}
  order = {row: i for i, row in enumerate(PAPER)}
  return {
    "data_note": next((d["data_note"] for d in docs if d.get("data_note")), None),
    "rows": sorted(rows.values(), key=lambda e: order.get(e["row"], len(order))),
    "provenance": docs[0].get("provenance", {}),
    "parts": [d.get("provenance", {}) for d in docs],
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the rows (or only the report); returns the result written to the JSON."""
  return script.main(
    __file__,
    run,
    report,
    result_file="table1.json",
    description=__doc__,
    add_arguments=add_arguments,
    merge=merge,
    argv=argv,
  )


if __name__ == "__main__":
  main()
