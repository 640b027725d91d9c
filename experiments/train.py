"""Train one model with forward gradients or backprop: the Hydra app.

  python experiments/train.py                                   # Fashion-MNIST MLP, forward gradient
  python experiments/train.py estimator=backprop optimizer.lr=0.05
  python experiments/train.py estimator.num_tangents=4 estimator.aggregation=orthogonal
  python experiments/train.py +experiment=baydin_mlp data=fashion_mnist
  python experiments/train.py -m optimizer.lr=1e-4,3e-4,1e-3     # a sweep

Outputs (metrics.jsonl, summary.json, checkpoints/) go to Hydra's run directory; rerun
with the same ``hydra.run.dir`` and a larger ``train.steps`` to resume. Bad values stop
the app with exit code 2 and one line naming the key, before any data is loaded.
The app returns the validation loss (inf for a diverged run) for Hydra sweepers.
"""

from __future__ import annotations

import logging
import math
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fwdgrad_jax import config as config_lib

config_lib.register_schema()


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(raw: DictConfig) -> float:
  try:
    cfg = config_lib.validate(OmegaConf.to_object(raw))
  except config_lib.ConfigError as e:
    _fail(str(e))
  # Imported after validation: a bad value fails in about a second, not after jax/tfds load.
  from fwdgrad_jax import data, train

  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  run_dir = HydraConfig.get().runtime.output_dir
  try:
    summary = train.train(cfg, run_dir)
  except (config_lib.ConfigError, data.DatasetUnavailableError) as e:
    _fail(str(e))
  print(_describe(summary), flush=True)
  if summary["diverged"] or summary["val_loss"] is None:
    return math.inf
  return summary["val_loss"]


def _describe(s: dict) -> str:
  if s["diverged"]:
    return f"{s['estimator']}: diverged at step {s['steps']} (metrics and checkpoints kept)"
  parts = [f"{s['estimator']}: steps {s['steps']}"]
  fields = [
    ("val loss", "val_loss", ".4f"),
    ("test accuracy", "test_accuracy", ".4f"),
    ("step", "step_time_ms", ".2f"),
    ("base", "base_time_ms", ".2f"),
    ("R", "runtime_ratio", ".2f"),
  ]
  # None when there is nothing to report: no validation split, or no steps left to run.
  parts += [f"{name} {s[key]:{fmt}}" for name, key, fmt in fields if s[key] is not None]
  return ", ".join(parts)


if __name__ == "__main__":
  main()
