"""The main job: forward gradients vs backprop on the same model, data and loop.

Trains the Fashion-MNIST MLP (784-1024-1024-10, batch 64) offline with backprop (SGD,
lr 0.05) and with forward gradients (SGD, lr 1e-4, k = 1 and 4 tangents), then prints
test accuracy, step times and the runtime ratios R = step time / base time (R_b for
backprop, R_f for forward gradients). Configs come from configs/ (Hydra), so any
override works:

  python experiments/compare.py                      # 300 steps each
  python experiments/compare.py train.steps=1000 model=cnn

Each run's metrics.jsonl / summary.json land in outputs/compare/<run>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from fwdgrad_jax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]

# (label, overrides): the methods compared, each at its own learning rate.
RUNS = [
  ("backprop", ["estimator=backprop", "optimizer.lr=0.05"]),
  ("forward k=1", ["estimator=forward", "estimator.num_tangents=1", "optimizer.lr=1e-4"]),
  ("forward k=4", ["estimator=forward", "estimator.num_tangents=4", "optimizer.lr=1e-4"]),
]
DEFAULTS = [
  "train.steps=300",
  "train.log_every=50",
  "train.eval_every=300",
  "train.grad_check_every=100",
]


def _num(value: float | None, width: int, digits: int) -> str:
  # None: a resumed run with no steps left has no step time.
  return f"{value:{width}.{digits}f}" if value is not None else f"{'–':>{width}}"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
  parser.add_argument("--out", default="outputs/compare", help="parent of the run directories")
  args = parser.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.WARNING)
  configs = []
  for label, overrides in RUNS:
    try:
      cfg = config_lib.compose(DEFAULTS + overrides + args.overrides, config_dir=ROOT / "configs")
    except config_lib.ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    configs.append((label, cfg))

  import jax

  from fwdgrad_jax import data, train

  cfg0 = configs[0][1]
  try:
    dataset = data.load(
      cfg0.data.name, data_dir=cfg0.data.data_dir, val_size=cfg0.data.val_size, seed=cfg0.seed
    )
  except data.DatasetUnavailableError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summaries = []
  for label, cfg in configs:
    run_dir = Path(args.out) / label.replace(" ", "_").replace("=", "")
    # A comparison starts fresh: an old checkpoint here would be resumed, not re-timed.
    shutil.rmtree(run_dir, ignore_errors=True)
    print(
      f"\n== {label}: {cfg.model.name} on {cfg.data.name}, {cfg.train.steps} steps -> {run_dir}",
      flush=True,
    )
    summaries.append((label, train.train(cfg, run_dir, dataset=dataset)))

  device = jax.devices()[0]
  print(
    f"\n{cfg0.model.name} on {cfg0.data.name}, batch {cfg0.train.batch_size}, {cfg0.train.steps} steps; "
  )
  print(f"jax {jax.__version__} on {device.platform} ({device.device_kind})\n")
  header = f"{'method':12s} {'lr':>7s} {'test acc':>8s} {'test loss':>9s} {'step ms':>8s} {'base ms':>8s} {'R':>6s}"
  print(header + "   (R = step time / forward+loss time: R_b for backprop, R_f for forward)")
  for label, s in summaries:
    if s["diverged"]:
      print(f"{label:12s} {s['lr']:7.0e}  diverged at step {s['steps']}")
      continue
    cols = [(s["test_accuracy"], 8, 4), (s["test_loss"], 9, 4), (s["step_time_ms"], 8, 2)]
    cols += [(s["base_time_ms"], 8, 2), (s["runtime_ratio"], 6, 2)]
    print(f"{label:12s} {s['lr']:7.0e} " + " ".join(_num(v, w, p) for v, w, p in cols))
  r_b = summaries[0][1]["runtime_ratio"]
  for label, s in summaries[1:]:
    if s["runtime_ratio"] and r_b:
      print(f"R_f/R_b ({label}) = {s['runtime_ratio'] / r_b:.3f}")
  Path(args.out).mkdir(parents=True, exist_ok=True)
  (Path(args.out) / "comparison.json").write_text(
    json.dumps({lbl: s for lbl, s in summaries}, indent=2)
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
