"""The repository's root and Hydra composition of its ``configs/``."""

from __future__ import annotations

from pathlib import Path

#: The repository root (``experiments/`` and ``configs/`` are below it).
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
#: The Hydra training app, run by the sweeps as a path.
APP = ROOT / "experiments" / "train.py"


def compose(overrides: list[str] | tuple[str, ...] = ()):
  """The app's :class:`~fwdgrad_jax.training.config.Config` composed from ``configs/``."""
  from fwdgrad_jax.training import config as config_lib

  return config_lib.compose(list(overrides), config_dir=CONFIGS)
