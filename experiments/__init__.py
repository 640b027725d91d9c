"""The project's experiments: one folder per paper, one for benchmarks, and their shared body.

``train.py`` (the Hydra training app) and ``compare.py`` (the main job, ``make demo``) run
as paths (``python experiments/train.py …``); every script in a folder runs as a module
from the repository root (``python -m experiments.flugel2024.fig4 --quick``). What the
scripts share lives in :mod:`experiments._lib`. The library (``fwdgrad_jax``) never
imports this package.
"""
