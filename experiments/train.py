"""Train one model with forward gradients or backprop: the Hydra app.

  python experiments/train.py                                   # Fashion-MNIST MLP, forward gradient
  python experiments/train.py estimator=backprop optimizer.lr=0.05
  python experiments/train.py estimator.num_tangents=4 estimator.aggregation=orthogonal
  python experiments/train.py train.time_budget_s=60            # stop after a minute of training
  python experiments/train.py +experiment=baydin_mlp data=fashion_mnist
  python experiments/train.py -m optimizer.lr=1e-4,3e-4,1e-3     # a sweep

Outputs (metrics.jsonl, summary.json, checkpoints/, run.log) go to Hydra's run
directory; rerun with the same ``hydra.run.dir`` and a larger ``train.steps`` to resume.

Exit codes: 0 done (also when the run diverged: a sweep goes on); 2 the run was refused
before it started — a bad or unknown key, a value of the wrong type, a resume with a
changed config, missing data, a run directory in use or not writable — with one line
naming the key or path; 1 the run failed after it started (e.g. a checkpoint could not
be saved: the disk is full), after writing summary.json if at all possible; 128 + the
signal number when SIGTERM/SIGINT/SIGHUP/SIGUSR1 stopped it (checkpoint and
summary.json written: rerun to resume; a second signal stops at once, in one line). In a
sweep (``-m``) a refused or failed job is logged and the sweep goes on (the job's
objective is inf); the sweep then exits with that code, naming the first such job. The
app returns the final validation loss for Hydra sweepers (Optuna): the mean of the last
3 evaluations, the lr searches' one rule (``fwdgrad_jax.training.lr_search.score``), and
inf for a run that diverged or was unstable (final > 1.5 × its best), as they are not
eligible there either.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fwdgrad_jax.training import config as config_lib

config_lib.register_schema()
log = logging.getLogger("fwdgrad_jax.app")


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


# Jobs of a sweep that were refused or failed: (exit code, job, message).
_failed_jobs: list[tuple[int, str, str]] = []


def _job_fails(message: str, code: int = 2) -> float:
  """A single run exits with ``code``; a sweep's job is recorded and the sweep goes on.

  One refused job (a bad lr among the sweep's values, a locked run directory) must not
  cancel the jobs after it: it is logged to the console and its train.log, returns inf as
  a diverged run does, and the sweep exits with ``code`` at its end.
  """
  from hydra.types import RunMode

  hydra_cfg = HydraConfig.get()
  if hydra_cfg.mode != RunMode.MULTIRUN:
    _fail(message, code)
  job = f"job {hydra_cfg.job.num} in {hydra_cfg.runtime.output_dir}"
  log.error("%s failed (exit %d): %s", job, code, message)
  _failed_jobs.append((code, job, message))
  return math.inf


def _save_hydra_config(run_dir: Path, raw: DictConfig) -> None:
  # Hydra's own copy (hydra.output_subdir) would be written before the run is checked,
  # overwriting the record of a run this one is then refused to resume.
  hydra_dir = run_dir / ".hydra"
  hydra_dir.mkdir(exist_ok=True)
  hydra_cfg = HydraConfig.get()
  OmegaConf.save(raw, hydra_dir / "config.yaml")
  OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), hydra_dir / "hydra.yaml")
  OmegaConf.save(hydra_cfg.overrides.task, hydra_dir / "overrides.yaml")


def _quiet_tensorboard_thread() -> None:
  """Drops the traceback of tensorboardX's writer thread dying on a full disk.

  The run notices the dead writer and says so in one line (MetricsLog.write); the
  thread's own 13-line traceback would come first.
  """
  previous = threading.excepthook

  def hook(args):
    if type(args.thread).__module__.startswith("tensorboardX") and issubclass(
      args.exc_type, OSError
    ):
      return
    previous(args)

  threading.excepthook = hook


# Set once Hydra has prepared the run directory and called main: errors after that are
# main's own to report.
_main_called = []


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(raw: DictConfig) -> float:
  _main_called.append(True)
  try:
    cfg = config_lib.from_hydra(raw)
  except config_lib.ConfigError as e:
    return _job_fails(str(e))
  # Imported after validation: a bad value fails in about a second, not after jax/tfds load.
  from fwdgrad_jax import data
  from fwdgrad_jax.training import run as run_lib
  from fwdgrad_jax.training import rundir

  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  # On a full disk train.log's handler fails on every line, each a traceback on stderr;
  # the run reports the full disk once (metrics, checkpoint) and the console keeps the log.
  logging.raiseExceptions = False
  _quiet_tensorboard_thread()
  run_dir = Path(HydraConfig.get().runtime.output_dir)
  started = []

  def on_start() -> None:
    started.append(True)
    _save_hydra_config(run_dir, raw)

  try:
    summary = run_lib.train(cfg, run_dir, on_start=on_start)
  except (config_lib.ConfigError, data.DatasetUnavailableError) as e:
    return _job_fails(str(e))
  except rundir.RunDirError as e:
    return _job_fails(str(e), code=1 if started else 2)
  except run_lib.StoppedAtOnce as e:
    _fail(str(e), code=128 + e.signum)  # a sweep stops too: that is what a signal asks
  import jax

  if jax.process_index() == 0:  # several processes: process 0 reports, as it logs
    log.info(_describe(summary, run_dir))  # to the console and run.log
  if summary["interrupted"]:
    sys.exit(128 + signal.Signals[summary["interrupted_by"]].value)
  final = summary.get("final_val_loss")
  if summary["diverged"] or summary.get("unstable") or final is None:
    return math.inf
  return final


def _describe(s: dict, run_dir: Path) -> str:
  if s["diverged"]:
    return f"{s['estimator']}: diverged at step {s['steps']} (metrics and checkpoints kept)"
  if s["interrupted"]:
    return (
      f"{s['estimator']}: {s['interrupted_by']} at step {s['steps']}; checkpoint and summary.json in "
      f"{run_dir} (rerun the same command to resume)"
    )
  parts = [f"{s['estimator']}: steps {s['steps']}"]
  if s["stopped_on_time"]:
    parts[0] += f" (time budget of {s['time_budget_s']:g} s reached)"
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


def _os_error(error: BaseException) -> OSError | None:
  """The OSError behind ``error`` (Hydra wraps a failing log file in a ValueError)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def _run() -> None:
  """Runs :func:`main`, turning what Hydra reports in 6–30 lines into one line, exit 2."""
  if os.environ.get("HYDRA_FULL_ERROR") == "1":
    main()  # the user asked for Hydra's full tracebacks
    return
  # Hydra then raises instead of printing and exiting 1, so the errors can be reworded.
  os.environ["HYDRA_FULL_ERROR"] = "1"
  from hydra.errors import HydraException

  try:
    main()
    if _failed_jobs:
      # The sweep went on past them; its exit status still says that not every job ran.
      code, job, message = _failed_jobs[0]
      more = f" (and {len(_failed_jobs) - 1} more, see above)" if len(_failed_jobs) > 1 else ""
      _fail(f"{job}: {message}{more}", max(c for c, _, _ in _failed_jobs))
  except HydraException as e:
    message = config_lib.hydra_error_message(e, [a for a in sys.argv[1:] if "=" in a])
    if message is None:
      raise
    _fail(message)
  except (OSError, ValueError) as e:
    # The run directory cannot be created or its log file opened (before main runs).
    os_error = _os_error(e)
    if os_error is None or _main_called:
      raise
    _fail(
      f"{os_error.filename or 'run directory'}: {os_error.strerror or os_error} (hydra.run.dir)"
    )


if __name__ == "__main__":
  _run()
