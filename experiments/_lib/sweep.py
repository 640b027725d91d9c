"""The scripts' lr sweeps of the training app: Hydra's multirun in a subprocess, or in this process.

:func:`run_sweep` is :func:`fwdgrad_jax.training.lr_search.run_sweep` (the Hydra app with
Optuna's GridSampler, one job per (lr, seed), in a subprocess) unless ``in_process``: then
every job is :func:`fwdgrad_jax.training.run.train` of the config the app would compose,
in this process, into the directory the sweep would give it (``<sweep_dir>/<job number>``,
with a ``.hydra/`` folder), so :func:`~fwdgrad_jax.training.lr_search.read_sweep` reads
both alike and the result records the same sweep command. The smoke tests (``--quick``)
run in process: a subprocess per sweep imports jax, Hydra and tfds and loads the data
again, and compiles what this process has compiled already; the sweep through Hydra and
Optuna is tested on its own (tests/test_lr_search.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

from experiments._lib.config import APP, compose
from fwdgrad_jax.training import lr_search


def run_sweep(
  sweep_dir: str | os.PathLike[str],
  lrs: Sequence[float],
  *,
  in_process: bool = False,
  app: str | os.PathLike[str] = APP,
  seeds: Sequence[int] | None = None,
  presets: Sequence[str] = (),
  overrides: Sequence[str] = (),
  cwd: str | os.PathLike[str] | None = None,
  quiet: bool = True,
) -> lr_search.LrSearch:
  """The lr sweep of ``app`` (see :func:`fwdgrad_jax.training.lr_search.run_sweep`).

  Args:
    sweep_dir, lrs, seeds, presets, overrides: as ``lr_search.run_sweep``.
    in_process: train every job in this process (``app`` must be the repository's app,
      whose configs :func:`experiments._lib.config.compose` composes).
    app: the Hydra app run in the subprocess.
    cwd, quiet: the subprocess's working directory, and whether its output is captured.

  Returns:
    The :class:`~fwdgrad_jax.training.lr_search.LrSearch`, ``extra["command"]`` the
    sweep's command line either way.
  """
  if not in_process:
    return lr_search.run_sweep(
      app, sweep_dir, lrs, seeds=seeds, presets=presets, overrides=overrides, cwd=cwd,
      quiet=quiet,
    )  # fmt: skip
  if Path(app).resolve() != APP.resolve():
    raise ValueError(f"an in-process sweep runs {APP}'s configs, not {app}")
  from fwdgrad_jax.training import run as run_lib

  cmd = lr_search.sweep_command(
    app, sweep_dir, lrs, seeds=seeds, presets=presets, overrides=overrides
  )
  # The presets as the sweep applies them, without the grid preset (lr_search_grid): it
  # configures Hydra's sweeper only.
  choice = presets[0] if len(presets) == 1 else f"[{','.join(presets)}]"
  preset = [f"+experiment={choice}"] if presets else []
  for num, (lr, seed) in enumerate(itertools.product(lrs, [None] if seeds is None else seeds)):
    job = Path(sweep_dir) / str(num)
    seed_override = [] if seed is None else [f"seed={int(seed)}"]
    cfg = compose([*preset, *overrides, f"optimizer.lr={float(lr)!r}", *seed_override])
    (job / ".hydra").mkdir(parents=True, exist_ok=True)  # what read_sweep takes for a job
    run_lib.train(cfg, job)
  result = lr_search.read_sweep(sweep_dir)
  return dataclasses.replace(result, extra={**result.extra, "command": cmd})
