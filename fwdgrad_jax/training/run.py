"""The training loop as a library function: ``train(config, run_dir) -> summary``.

One loop for both estimators: the gradient comes from the optax transform registered
under ``estimator.name`` in :data:`fwdgrad_jax.registry.ESTIMATORS`, followed by
optional clipping and the optimizer. :func:`train` reads top to bottom:

1. **init** (:func:`_init`) — the model, split into parameters and the rest of its state
   (BatchNorm statistics, Dropout RNG counters), the transform, the compiled chunk of
   training steps, evaluation in eval mode, the gradient check, the base time;
2. **restore** — the newest readable checkpoint of ``run_dir`` (:mod:`fwdgrad_jax.training.rundir`);
3. **loop** (:func:`_loop`) — chunks of up to ``log_every`` steps in one compiled
   ``fori_loop`` (shuffling and batching on device; the host syncs once per chunk),
   with periodic hooks between chunks: log, eval, gradient check, checkpoint. It
   stops at ``train.steps``, on a non-finite loss, on SIGTERM/SIGINT, or once the
   training time exceeds ``train.time_budget_s``;
4. **summary** (:func:`_summarize`) — final evaluation and ``summary.json``.

Models with state train through ``loss(params, x, y, model_state) -> (loss,
new_model_state)``: the transform keeps the new state in its ``aux`` and the loop
carries it in :class:`TrainState` and its checkpoints, so BatchNorm statistics update
and two steps see different dropout masks.

Outputs in ``run_dir``: ``metrics.jsonl``, ``summary.json``, ``config.json`` (written
once the run has really started), ``checkpoints/`` and a lock while it runs. A rerun on
the same ``run_dir`` with more ``train.steps`` resumes from the newest checkpoint; one
is always written at the end and at an interrupt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fwdgrad_jax import data as data_lib
from fwdgrad_jax import metrics, models, parallel
from fwdgrad_jax import tangents as tangents_lib
from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import lr_search, rundir
from fwdgrad_jax.training import records as records_lib
from fwdgrad_jax.training.steps import (
  TrainState,
  host_loop,
  init_state,
  lr_at,
  make_base_fn,
  make_chunk_fn,
  make_eval_fn,
  make_grad_check_fn,
  make_host_chunk_fn,
  make_stateful_loss,
  make_tx,
  per_example_losses,
  reverse_mode,
  set_budget_clock,
  uses_budget_schedule,
  uses_convolutions,
)

PyTree = Any
log = logging.getLogger(__name__)

# What may change when a run directory is resumed; everything else must match.
_MAY_CHANGE_ON_RESUME = frozenset(
  {"name", "data.data_dir", "data.download"}
  | {f"mesh.{key}" for key in ("data", "tangents", "distributed")}
  | {f"mesh.{key}" for key in ("coordinator_address", "num_processes", "process_id")}
  | {f"train.{key}" for key in ("steps", "eval_batch_size", "progress", "time_budget_s")}
  | {f"train.{key}_every" for key in ("log", "eval", "grad_check", "checkpoint")}
)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _chunk_length(tr: config_lib.TrainConfig) -> int:
  # Every event (log, eval, grad check, checkpoint) falls on a chunk boundary.
  return math.gcd(
    *(n for n in (tr.log_every, tr.eval_every, tr.grad_check_every, tr.checkpoint_every) if n > 0)
  )


def _finite_or_none(x: Any) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


class StoppedAtOnce(KeyboardInterrupt):
  """A second stop signal: the run stops where it is (the last checkpoint is kept)."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum

  def __str__(self) -> str:
    return (
      f"{signal.Signals(self.signum).name} again: stopped at once, without a checkpoint or "
      "summary.json of this session (the last checkpoint is kept: rerun to resume)"
    )


# What clusters and terminals send to stop a job: each one a graceful stop. SIGHUP (a
# closed terminal or ssh session) and SIGUSR1 (SLURM's --signal warning) would otherwise
# kill the run at once, with all the work since the last checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class _Interrupts:
  """A stop signal while training: note it, finish the chunk, checkpoint, summarize.

  Any of :data:`STOP_SIGNALS`. A second signal stops at once (:class:`StoppedAtOnce`, a
  KeyboardInterrupt). Handlers can only be installed in
  the main thread; elsewhere (a notebook's worker thread) signals keep their meaning, as
  does a signal the parent told this process to ignore (``nohup``, a background job).
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> _Interrupts:
    if threading.current_thread() is threading.main_thread():
      for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
          self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:
      raise StoppedAtOnce(signum)
    self.signum = signum
    log.warning(
      "%s: stopping after this chunk of steps (a checkpoint and summary.json follow; send it "
      "again to stop at once)",
      signal.Signals(signum).name,
    )

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class _Run:
  """What :func:`_init` builds: the compiled functions and the data of one run."""

  cfg: config_lib.Config
  dataset: data_lib.Dataset
  chunk: int
  run_chunk: Callable[..., Any]
  base: Callable[..., Any]
  evaluate: Callable[..., Any]
  grad_check: Callable[..., Any]
  param_norm: Callable[..., Any]
  check_key: jax.Array
  num_params: int


@dataclasses.dataclass
class _Outcome:
  """How the loop ended."""

  state: TrainState
  step: int
  train_time: float
  chunk_times: list[float]
  diverged: bool = False
  interrupted: int | None = None  # the signal
  stopped_on_time: bool = False
  error: rundir.RunDirError | None = None


def _check_resumable(run_dir: Path, cfg: config_lib.Config) -> None:
  """Refuses a run whose config differs from the checkpointed run in ``run_dir``.

  A directory without checkpoints is fresh whatever its ``config.json`` says (a run
  that failed its checks before starting must not block its corrected rerun). With
  checkpoints, a missing or damaged ``config.json`` is refused too: without it nothing
  says which run the checkpoints belong to, and resuming them under another config would
  mix two runs in one metrics file.

  Raises:
    ConfigError: a changed key, or checkpoints without a readable ``config.json``.
    RunDirError: ``checkpoints`` is not a directory.
  """
  ckpt_dir = run_dir / rundir.CHECKPOINTS_NAME
  if ckpt_dir.exists() and not ckpt_dir.is_dir():
    # Found here, not at the run's final save after hours of training.
    raise rundir.RunDirError(
      f"{ckpt_dir}: not a directory; move it away or use a new run directory"
    )
  steps = (
    sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []
  )
  if not steps:
    return
  config_path = run_dir / "config.json"
  old = rundir.read_json(config_path)
  if not isinstance(old, dict):
    what = "missing" if not config_path.exists() else "damaged (not a JSON config)"
    raise config_lib.ConfigError(
      f"{config_path}: {what}, so the checkpoints up to step {steps[-1]} cannot be matched "
      "to this config; restore the file (the summary.json of the run holds a copy under "
      "'config') or use a new run directory"
    )
  defaults = config_lib.to_dict(config_lib.Config())
  change = rundir.changed_key(old, config_lib.to_dict(cfg), _MAY_CHANGE_ON_RESUME, defaults)
  if change is not None:
    key, was, now = change
    raise config_lib.ConfigError(
      f"{key}: {now!r} differs from {was!r} of the run being resumed in {run_dir}; use a new "
      "run directory (train.steps, the intervals and the time budget may change on resume)"
    )
  schedule = old.get("optimizer", {}).get("schedule", "constant")
  old_steps = old.get("train", {}).get("steps")
  if schedule != "constant" and old_steps != cfg.train.steps:
    # The schedule is laid out over train.steps: more steps would rewrite its past.
    raise config_lib.ConfigError(
      f"train.steps: {cfg.train.steps} differs from {old_steps} of the run being resumed in "
      f"{run_dir}, whose optimizer.schedule={schedule} decays over train.steps; resume with "
      f"train.steps={old_steps} or use a new run directory"
    )


def _create_model(cfg: config_lib.Config, dataset: data_lib.Dataset | None) -> nnx.Module:
  name = cfg.data.name
  shape = dataset.input_shape if dataset is not None else data_lib.input_shape(name)
  classes = dataset.num_classes if dataset is not None else data_lib.num_classes(name)
  try:
    return models.create(
      cfg.model.name,
      input_shape=shape,
      num_classes=classes,
      rngs=nnx.Rngs(cfg.seed),
      **config_lib.model_options(cfg.model),
    )
  except (TypeError, ValueError, ArithmeticError) as e:
    # ArithmeticError: e.g. a zero width (hidden=[0]) divides by zero in an initializer.
    options = ", ".join(f"{k}={v!r}" for k, v in cfg.model.options.items())
    raise config_lib.ConfigError(
      f"model.options: {cfg.model.name}({options}) cannot be built ({type(e).__name__}: {e})"
    ) from e


def _load_data(cfg: config_lib.Config) -> data_lib.Dataset:
  d = cfg.data
  try:
    return data_lib.load(
      d.name, data_dir=d.data_dir, val_size=d.val_size, seed=cfg.seed, download=d.download
    )
  except data_lib.DatasetUnavailableError as e:
    raise e.with_download_key("data.download") from None
  except ValueError as e:
    # data.load names its argument first ("val_size=…"), and DataConfig mirrors them.
    raise config_lib.ConfigError(f"data.{e}") from e


def make_run_mesh(cfg: config_lib.MeshConfig) -> Any:
  """The run's mesh (:func:`fwdgrad_jax.parallel.make_mesh`), None for one device.

  Raises:
    ConfigError: more devices asked for than present, naming the keys.
  """
  if cfg.data * cfg.tangents == 1:
    return None
  try:
    return parallel.make_mesh(cfg.data, cfg.tangents)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e


def _on_mesh(mesh: Any, dataset: data_lib.Dataset, state: TrainState):
  """The data set and state replicated over ``mesh`` (each step shards its batch)."""
  if mesh is None:
    return dataset, state
  splits = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
  placed = parallel.replicate({s: getattr(dataset, s) for s in splits}, mesh)
  return dataclasses.replace(dataset, **placed), parallel.replicate(state, mesh)


def _device_memory() -> tuple[int | None, str]:
  """Bytes of memory of the first device (an accelerator's limit, else the host's RAM)."""
  device = jax.devices()[0]
  stats = None
  with contextlib.suppress(Exception):  # not every backend reports memory
    stats = device.memory_stats()
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.platform}:{device.device_kind}"
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the host's memory"
  except (ValueError, OSError):
    return None, "the host's memory"


def _check_tangent_memory(cfg: config_lib.Config, num_params: int) -> None:
  """Refuses dense weight tangents that cannot fit on the device, before compiling.

  k dense tangents are k copies of the parameters; XLA finds out only after compiling
  (tens of seconds) and reports it in ~50 lines without naming the key.
  """
  est = cfg.estimator
  dense = est.name == "forward" and est.perturbation == "weights" and not est.regenerate
  if not (dense and est.tangents in tangents_lib.SAMPLERS):
    return
  k = est.num_tangents // cfg.mesh.tangents  # per device
  need = k * num_params * 4  # float32; a lower bound: XLA keeps more than one copy
  available, where = _device_memory()
  if available is not None and need > available:
    raise config_lib.ConfigError(
      f"estimator.num_tangents={est.num_tangents}: the tangents alone need "
      f"{need / 2**30:.1f} GiB ({k} × {num_params} parameters × 4 bytes), more than the "
      f"{available / 2**30:.1f} GiB of {where}; use fewer tangents, estimator.regenerate=true "
      "or mesh.tangents"
    )


def _init(
  cfg: config_lib.Config, model: nnx.Module, dataset: data_lib.Dataset
) -> tuple[_Run, TrainState]:
  """Builds the run's compiled functions and its state at step 0."""
  tr = cfg.train
  mesh = make_run_mesh(cfg.mesh)
  num_examples = int(dataset.x_train.shape[0])
  if num_examples < tr.batch_size:
    raise config_lib.ConfigError(
      f"train.batch_size={tr.batch_size}: larger than the {num_examples} training examples"
    )
  graphdef, params, rest = models.split(model)
  num_params = models.count_params(params)  # before the first chunk donates the buffers
  eval_apply = models.apply_with_state_fn(models.eval_graphdef(graphdef, params, rest))
  loss = make_stateful_loss(graphdef)
  # What the estimator differentiates: per-example losses for activity perturbation.
  est_loss = (
    make_stateful_loss(graphdef, per_example=True) if per_example_losses(cfg.estimator) else loss
  )

  est_loss = parallel.data_parallel(est_loss, mesh)  # the batch split along mesh.data
  if (
    cfg.estimator.regenerate
    and cfg.mesh.data > 1
    and jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  ):
    log.warning(
      "estimator.regenerate=true with mesh.data=%d: BatchNorm normalises with each device's "
      "batch statistics (only the directional derivatives cross devices), so the run "
      "differs from one device's",
      cfg.mesh.data,
    )
  data_key, est_key, check_key = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
  tx = make_tx(cfg, est_key, has_aux=True, mesh=mesh)
  state = init_state(tx, params, rest)
  dataset, state = _on_mesh(mesh, dataset, state)
  chunk = _chunk_length(tr)
  x, y = dataset.x_train, dataset.y_train
  common = dict(batch_size=tr.batch_size, num_examples=num_examples, chunk=chunk, data_key=data_key)
  host = host_loop(
    tr, uses_convolutions(loss, params, x[:1], y[:1], rest), reverse_mode(cfg.estimator)
  )
  if host:
    run_chunk = make_host_chunk_fn(est_loss, tx, **common, example=(state, x, y))
  else:
    run_chunk = (
      jax.jit(make_chunk_fn(est_loss, tx, **common), donate_argnums=0)
      .lower(state, jnp.int32(chunk), x, y)
      .compile()
    )
  base = make_base_fn(loss, **common, host=host)
  if not host:
    base = jax.jit(base).lower(params, state.step, x, y, rest).compile()
  run = _Run(
    cfg=cfg,
    dataset=dataset,
    chunk=chunk,
    run_chunk=run_chunk,
    base=base,
    evaluate=make_eval_fn(eval_apply, tr.eval_batch_size, host=host),
    grad_check=jax.jit(make_grad_check_fn(loss, cfg.estimator, est_loss)),
    param_norm=jax.jit(metrics.tree_norm),
    check_key=check_key,
    num_params=num_params,
  )
  return run, state


def _restore(ckpts: rundir.Checkpoints, state: TrainState) -> TrainState:
  """The state of the newest readable checkpoint, or ``state`` when there is none."""
  restored, step = ckpts.restore(state)
  if restored is None:
    return state
  log.info("%s: resuming from step %d", ckpts.directory, step)
  return restored


def _base_time(run: _Run, state: TrainState) -> float:
  """Seconds per forward+loss evaluation, batched like a training chunk (median)."""
  x, y = run.dataset.x_train, run.dataset.y_train
  timing = records_lib.time_interleaved(
    {"base": run.base},
    rounds=5,
    args={"base": lambda: (state.params, state.step, x, y, state.model_state)},
    steps=run.chunk,
  )
  return timing["base"].median


def _describe(record: dict[str, Any]) -> str:
  parts = [f"step {record['step']}"]
  for key, value in record.items():
    if key != "step" and isinstance(value, float):
      parts.append(f"{key} {value:.4g}")
  return ", ".join(parts)


def _periodic_record(
  run: _Run, step: int, state: TrainState, pending: list[float], train_time: float, last: bool
) -> dict[str, Any]:
  """The hooks that measure between chunks: log, eval, gradient check (not timed).

  At an evaluation or a gradient check the record also gets ``param_norm``, the global
  L2 norm of the parameters (a run that destabilises late often does so as its weights
  grow); the check gives ``cosine_to_true_grad`` and ``grad_norm_ratio`` = ‖ĝ‖/‖∇f‖ of
  the estimate to ``jax.grad`` on the same batch, ``true_grad_norm`` = ‖∇f‖, and
  ``cosine_block/<name>`` the cosine per block of the model (its top-level modules, list
  items apart). All of them come to the host in one transfer.
  """
  tr, ds = run.cfg.train, run.dataset
  record: dict[str, Any] = {}
  if step % tr.log_every == 0 or last:
    record["train_loss"] = float(np.mean(pending)) if pending else None
  on_device: dict[str, jax.Array] = {}
  evaluating = bool(tr.eval_every) and step % tr.eval_every == 0
  if evaluating and ds.x_val.shape[0]:
    val_loss, val_acc = run.evaluate(state.params, ds.x_val, ds.y_val, state.model_state)
    on_device.update(val_loss=val_loss, val_accuracy=val_acc)
  checking = bool(tr.grad_check_every) and step % tr.grad_check_every == 0
  if checking:
    key = jax.random.fold_in(run.check_key, step)
    idx = jax.random.choice(key, ds.x_train.shape[0], (tr.batch_size,), replace=False)
    cos, ratio, true_norm, per_block = run.grad_check(
      state.params, key, ds.x_train[idx], ds.y_train[idx], state.model_state, state.opt_state[0]
    )
    on_device.update(cosine_to_true_grad=cos, grad_norm_ratio=ratio, true_grad_norm=true_norm)
    on_device.update({f"cosine_block/{name}": c for name, c in per_block.items()})
  if evaluating or checking:
    on_device["param_norm"] = run.param_norm(state.params)
  record.update({k: float(v) for k, v in jax.device_get(on_device).items()})
  if not record:
    return record
  record.setdefault("train_loss", float(np.mean(pending)) if pending else None)
  if uses_budget_schedule(run.cfg):  # the multiplier the last step applied
    scale = optax.tree_utils.tree_get(state.opt_state, "budget_scale")
    record["lr"] = run.cfg.optimizer.lr * float(scale)
  else:
    record["lr"] = lr_at(run.cfg.optimizer, max(step - 1, 0), tr.steps)  # the last step's lr
  return {"step": step, **record, "train_time_s": train_time}


@contextlib.contextmanager
def _progress(cfg: config_lib.Config, start: int) -> Iterator[Any]:
  # One bar for a run of several processes: process 0's, as its log.
  if not cfg.train.progress or (cfg.mesh.distributed and jax.process_index() != 0):
    yield None
    return
  from tqdm.auto import tqdm
  from tqdm.contrib.logging import logging_redirect_tqdm

  # Log lines go through tqdm.write while the bar is drawn, so neither garbles the other.
  with (
    logging_redirect_tqdm(),
    tqdm(
      total=cfg.train.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True
    ) as bar,
  ):
    yield bar


def _loop(
  run: _Run,
  state: TrainState,
  metrics_log: rundir.MetricsLog,
  ckpts: rundir.Checkpoints,
  interrupts: _Interrupts,
) -> _Outcome:
  """Runs chunks of steps with the periodic hooks until a stop; checkpoints at the end."""
  tr = run.cfg.train
  x, y = run.dataset.x_train, run.dataset.y_train
  records = metrics_log.records
  step = int(state.step)
  out = _Outcome(state, step, records[-1].get("train_time_s", 0.0) if records else 0.0, [])
  pending: list[float] = []
  # A schedule over the time budget reads the loop's clock once per chunk.
  budget_clock = tr.time_budget_s if uses_budget_schedule(run.cfg) else None

  def should_stop() -> bool:
    out.interrupted = interrupts.signum
    budget = tr.time_budget_s
    out.stopped_on_time = budget is not None and out.train_time >= budget and step < tr.steps
    return out.interrupted is not None or out.stopped_on_time

  with _progress(run.cfg, step) as bar:
    while step < tr.steps and not should_stop():
      # Up to the next multiple of the chunk, so that a run resumed from any step (with
      # the same or new intervals) lands on every interval's multiples again.
      n = min(run.chunk - step % run.chunk, tr.steps - step)
      if budget_clock:
        step_time = out.chunk_times[-1] if out.chunk_times else 0.0
        opt_state = set_budget_clock(state.opt_state, out.train_time, step_time, budget_clock)
        state = state._replace(opt_state=opt_state)
      t0 = time.perf_counter()
      state, losses, finite = run.run_chunk(state, jnp.int32(n), x, y)
      losses = np.asarray(losses[:n])  # the one host sync per chunk
      dt = time.perf_counter() - t0
      out.chunk_times.append(dt / n)  # AOT-compiled: no compile time in any chunk
      out.train_time += dt
      if not (np.isfinite(losses).all() and bool(finite)):
        bad = int(np.argmin(np.isfinite(losses))) if not np.isfinite(losses).all() else n - 1
        pending.extend(losses[:bad].tolist())
        step += bad
        out.diverged = True
        break
      pending.extend(losses.tolist())
      step += n
      if bar is not None:
        bar.update(n)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
      last = step == tr.steps or should_stop()
      record = _periodic_record(run, step, state, pending, out.train_time, last)
      try:
        if record:
          rundir.check_lock(ckpts.run_dir)
          metrics_log.write(record)
          log.info(_describe(record))
        if step % tr.log_every == 0 or last:
          pending = []  # train_loss is the mean over the log interval
        if tr.checkpoint_every and step % tr.checkpoint_every == 0 and step < tr.steps:
          rundir.check_lock(ckpts.run_dir)
          ckpts.save(step, state)
      except rundir.RunDirError as e:
        out.error = e
        break
  out.state, out.step = state, step
  try:
    if out.diverged:
      rundir.check_lock(ckpts.run_dir)
      metrics_log.write(
        {"step": step, "train_loss": None, "diverged": True, "train_time_s": out.train_time}
      )
      log.warning("step %d: non-finite loss; stopped (the last good checkpoint is kept)", step)
    elif out.error is None:
      # Always a checkpoint at the end, at an interrupt and on the time budget.
      rundir.check_lock(ckpts.run_dir)
      ckpts.save(step, state)
  except rundir.RunDirError as e:
    out.error = e
  return out


def _summarize(run: _Run, out: _Outcome, records: list[dict[str, Any]], base_time: float):
  """The summary of the run (final evaluation unless it diverged, was stopped or failed)."""
  cfg, ds, tr = run.cfg, run.dataset, run.cfg.train
  val = test = (float("nan"), float("nan"))
  if not (out.diverged or out.interrupted or out.error):
    state = out.state
    if ds.x_val.shape[0]:
      val = run.evaluate(state.params, ds.x_val, ds.y_val, state.model_state)
    test = run.evaluate(state.params, ds.x_test, ds.y_test, state.model_state)
  evals = [r for r in records if r.get("val_loss") is not None]
  best = min(evals, key=lambda r: r["val_loss"]) if evals else None
  # The lr searches' one rule (lr_search.score), so a summary says what a search will.
  end = {"val_loss": _finite_or_none(val[0]), "steps": out.step}
  scored = lr_search.score(lr_search.val_curve(records, end), diverged=out.diverged)
  step_time = float(np.median(out.chunk_times)) if out.chunk_times else None
  forward = cfg.estimator.name == "forward"
  est_state = out.state.opt_state[0]
  device = jax.devices()[0]
  return {
    "val_loss": _finite_or_none(val[0]),
    "val_accuracy": _finite_or_none(val[1]),
    "test_loss": _finite_or_none(test[0]),
    "test_accuracy": _finite_or_none(test[1]),
    "diverged": out.diverged,
    "interrupted": out.interrupted is not None,
    "interrupted_by": None if out.interrupted is None else signal.Signals(out.interrupted).name,
    "stopped_on_time": out.stopped_on_time,
    "error": None if out.error is None else str(out.error),
    "steps": out.step,
    "time_budget_s": tr.time_budget_s,
    "step_time_ms": None if step_time is None else step_time * 1e3,
    "base_time_ms": base_time * 1e3,
    "runtime_ratio": None if step_time is None else step_time / base_time,
    "best_val_loss": best["val_loss"] if best else None,
    "best_val_step": best["step"] if best else None,
    "final_val_loss": scored.final,
    "final_evals": lr_search.FINAL_EVALS,
    "unstable": scored.unstable,
    "train_time_s": out.train_time,
    "num_params": run.num_params,
    "data": cfg.data.name,
    "model": cfg.model.name,
    "estimator": cfg.estimator.name,
    "num_tangents": cfg.estimator.num_tangents if forward else None,
    "tangents": cfg.estimator.tangents if forward else None,
    "aggregation": cfg.estimator.aggregation if forward else None,
    "perturbation": cfg.estimator.perturbation if forward else None,
    "rescale": cfg.estimator.rescale if forward else None,
    # Guided forward gradients pay for a true gradient every fix_gap steps.
    "true_grads": int(est_state.true_grads) if hasattr(est_state, "true_grads") else None,
    "optimizer": cfg.optimizer.name,
    "lr": cfg.optimizer.lr,
    "decay": cfg.optimizer.decay,
    "batch_size": tr.batch_size,
    "seed": cfg.seed,
    "device": f"{device.platform}:{device.device_kind}",
    "jax_version": jax.__version__,
    "config": config_lib.to_dict(cfg),
    "provenance": records_lib.provenance(),
  }


def _keep_timings(summary: dict[str, Any], previous: Any) -> None:
  """The timings of the session that ran the steps, for a session that ran none.

  Rerunning a finished run (a sweep started again) times no chunk; its summary would
  otherwise replace the measured step time and runtime ratio with null.
  """
  if not (isinstance(previous, dict) and previous.get("steps") == summary["steps"]):
    return
  if previous.get("step_time_ms") is None:
    return
  for key in ("step_time_ms", "base_time_ms", "runtime_ratio"):
    summary[key] = previous.get(key)


@contextlib.contextmanager
def _run_dir(run_dir: str | os.PathLike[str], primary: bool) -> Iterator[Path]:
  """The run directory: locked by process 0 (:func:`rundir.lock`), shared by the others."""
  if primary:
    with rundir.lock(run_dir) as path:
      yield path
    return
  path = Path(run_dir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise rundir.RunDirError(f"{path}: {e.strerror or e}") from e
  yield path


@contextlib.contextmanager
def _quiet_unless(primary: bool) -> Iterator[None]:
  """The library's INFO lines from process 0 only (the others log warnings and errors)."""
  logger = logging.getLogger("fwdgrad_jax")
  level = logger.level
  if not primary:
    logger.setLevel(max(logging.WARNING, level))
  try:
    yield
  finally:
    logger.setLevel(level)


def train(
  cfg: config_lib.Config,
  run_dir: str | os.PathLike[str],
  *,
  dataset: data_lib.Dataset | None = None,
  on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
  """Trains ``cfg`` into ``run_dir`` and returns the summary (also in ``summary.json``).

  Several processes (``mesh.distributed=true``, README "Many devices") each call this
  with the same ``cfg`` (but ``mesh.process_id``) and the same ``run_dir``: process 0
  holds the directory's lock and writes ``config.json``, ``metrics.jsonl``,
  ``summary.json`` and the INFO log lines; all of them save and restore the checkpoints.

  Args:
    cfg: the run; validated first (:func:`fwdgrad_jax.training.config.validate`).
    run_dir: output directory; its newest readable checkpoint is resumed.
    dataset: preloaded data (tests, notebooks); loaded from ``cfg.data`` otherwise.
    on_start: called once the run has really started — lock held, config, data and
      checkpoint checked, ``config.json`` written — e.g. to record the Hydra config.

  Returns:
    The summary: ``val_loss``, ``val_accuracy``, ``test_loss``, ``test_accuracy``,
    ``diverged``, ``interrupted``, ``stopped_on_time``, ``steps``, ``step_time_ms``,
    ``base_time_ms``, ``runtime_ratio`` (R_f or R_b), … and the config.

  Raises:
    ConfigError: an invalid value or a resume with a changed config, naming the key;
      nothing in ``run_dir`` is touched.
    DatasetUnavailableError: the data set is not prepared (and cannot be here).
    RunDirError: the run directory is in use, unwritable, holds no readable
      checkpoint, or a checkpoint save failed; raised after ``summary.json`` was written
      when the run had started. One line naming the path.
  """
  config_lib.validate(cfg)
  parallel.initialize_distributed(cfg.mesh.distributed, **cfg.mesh.distributed_options())
  make_run_mesh(cfg.mesh)  # too few devices fails here, before the data are loaded
  # Several processes share the run directory: process 0 holds its lock and writes the
  # metrics, the summary and the logs; every process saves and restores the checkpoints
  # (orbax's saves are collective).
  # (Asked only of a distributed run: the question starts JAX's backend, whose log lines
  # must not reach a run directory that the checks below may yet refuse.)
  primary = not cfg.mesh.distributed or jax.process_index() == 0
  with (
    _run_dir(run_dir, primary) as run_dir,
    _quiet_unless(primary),
    _Interrupts() as interrupts,
  ):
    _check_resumable(run_dir, cfg)
    previous = rundir.read_json(run_dir / "summary.json")
    model = _create_model(cfg, dataset)  # bad model options fail before data loading
    _check_tangent_memory(cfg, models.count_params(models.split(model)[1]))
    dataset = dataset if dataset is not None else _load_data(cfg)
    run, state = _init(cfg, model, dataset)
    ckpts = rundir.Checkpoints(run_dir)
    try:
      state = _restore(ckpts, state)
      if int(state.step) > cfg.train.steps:
        # Resuming would "finish" at the checkpoint's step under a config saying fewer.
        raise config_lib.ConfigError(
          f"train.steps={cfg.train.steps}: the run in {run_dir} is already at step "
          f"{int(state.step)}; use train.steps >= {int(state.step)} or a new run directory"
        )
      what = f"{cfg.model.name} on {cfg.data.name}, {cfg.estimator.name} + {cfg.optimizer.name}"
      log.info("%s: %s, lr %g, %d steps", run_dir, what, cfg.optimizer.lr, cfg.train.steps)
      if primary:
        rundir.write_json(run_dir / "config.json", config_lib.to_dict(cfg))
        if on_start is not None:
          on_start()
      base_time = _base_time(run, state)
      metrics_log = rundir.MetricsLog(run_dir, int(state.step), write=primary)
      try:
        out = _loop(run, state, metrics_log, ckpts, interrupts)
      finally:
        metrics_log.close()
    finally:
      ckpts.close()
    summary = _summarize(run, out, metrics_log.records, base_time)
    if not out.chunk_times:
      _keep_timings(summary, previous)
    if isinstance(out.error, rundir.RunDirLost):
      raise out.error  # the directory may be another run's now: write nothing more there
    try:
      if primary:
        rundir.write_json(run_dir / "summary.json", summary)
    except rundir.RunDirError as e:
      if out.error is None:
        raise
      log.warning("%s", e)  # the disk is full: the save's error is the one to report
    if out.error is not None:
      raise out.error
  return summary
