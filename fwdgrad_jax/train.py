"""The training loop as a library function: ``train(config, run_dir) -> summary``.

One loop for both estimators: the gradient comes from the optax transform of
:mod:`fwdgrad_jax.transforms` (``forward`` or ``backprop``), followed by optional
clipping and the optimizer. Steps run on device in chunks: one compiled
``fori_loop`` runs up to ``log_every`` steps (shuffling and batching on device),
and the host only sees each chunk's per-step losses. Evaluation, gradient checks and
checkpoints happen between chunks, outside the timed segments.

Outputs in ``run_dir``: ``metrics.jsonl`` (one record per log line), ``summary.json``,
``config.json`` and orbax checkpoints in ``checkpoints/``. A rerun on the same
``run_dir`` with more ``train.steps`` resumes from the latest checkpoint; a diverged
run (non-finite loss) stops, keeps its metrics and last good checkpoint, and reports
``diverged: true``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fwdgrad_jax import config as config_lib
from fwdgrad_jax import data as data_lib
from fwdgrad_jax import estimators, metrics, models, transforms

PyTree = Any

# What must match for a run directory to be resumed (train.steps may grow).
_RESUME_KEYS = ("data", "model", "estimator", "optimizer", "seed")


class TrainState(NamedTuple):
  """What a checkpoint holds: parameters, optimizer state (with the tangent key), step."""

  params: PyTree
  opt_state: PyTree
  step: jax.Array


# --------------------------------------------------------------------------------------
# Building blocks (pure; reused by the benchmark)
# --------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def make_loss(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable[..., jax.Array]:
  """``loss(params, x, y)`` of a split NNX model; only ``params`` is differentiated."""
  apply = models.apply_fn(graphdef, rest)

  def loss(params, x, y):
    return cross_entropy(apply(params, x), y)

  return loss


def make_optimizer(cfg: config_lib.OptimizerConfig) -> optax.GradientTransformation:
  """The optax optimizer of ``cfg`` with Baydin's decay η_i = η_0 · exp(−i · decay)."""
  lr = cfg.lr
  if cfg.decay > 0:
    lr = optax.exponential_decay(cfg.lr, transition_steps=1, decay_rate=math.exp(-cfg.decay))
  if cfg.name == "adam":
    return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.name == "nesterov":
    return optax.sgd(lr, momentum=cfg.momentum, nesterov=True)
  return optax.sgd(lr, momentum=cfg.momentum or None)


def estimator_options(cfg: config_lib.EstimatorConfig) -> dict[str, Any]:
  """Keyword options of the estimator named by ``cfg.name`` (none for backprop)."""
  if cfg.name == "backprop":
    return {}
  return dict(
    num_tangents=cfg.num_tangents,
    tangents=cfg.tangents,
    aggregation=cfg.aggregation,
    normalize=cfg.normalize,
    max_jvp_norm=cfg.max_jvp_norm,
  )


def make_tx(cfg: config_lib.Config, key: jax.Array) -> optax.GradientTransformationExtraArgs:
  """Estimator transform → optional global-norm clipping → optimizer."""
  parts = [
    transforms.gradient_transform(cfg.estimator.name, key=key, **estimator_options(cfg.estimator))
  ]
  if cfg.optimizer.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.optimizer.clip_norm))
  parts.append(make_optimizer(cfg.optimizer))
  return optax.chain(*parts)


def make_step_fn(
  loss: Callable[..., jax.Array], tx: optax.GradientTransformationExtraArgs
) -> Callable[[TrainState, jax.Array, jax.Array], TrainState]:
  """``step(state, x, y) -> state``: one estimate + optimizer update on one batch.

  The body of the training loop; the benchmark times exactly this.
  """

  def step(state: TrainState, x: jax.Array, y: jax.Array) -> TrainState:
    updates, opt_state = tx.update(
      state.params, state.opt_state, state.params, value_fn=loss, x=x, y=y
    )
    return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)

  return step


def _batch(x, y, perm, step, batch_size, steps_per_epoch):
  start = (step % steps_per_epoch) * batch_size
  idx = jax.lax.dynamic_slice(perm, (start,), (batch_size,))
  return x[idx], y[idx]


def _epoch_perm(data_key, step, num_examples, steps_per_epoch):
  return jax.random.permutation(jax.random.fold_in(data_key, step // steps_per_epoch), num_examples)


def make_chunk_fn(
  loss: Callable[..., jax.Array],
  tx: optax.GradientTransformationExtraArgs,
  *,
  batch_size: int,
  num_examples: int,
  chunk: int,
  data_key: jax.Array,
) -> Callable[..., tuple[TrainState, jax.Array, jax.Array]]:
  """``run(state, num_steps, x, y) -> (state, losses[chunk], params_finite)``.

  Runs ``num_steps ≤ chunk`` steps in one ``fori_loop`` with a traced trip count, so
  every chunk length uses the same executable (no recompilation, and bit-identical
  steps whether a run is resumed or not). Batches come from a per-epoch permutation
  ``permutation(fold_in(data_key, epoch))``, recomputed on device at epoch starts.
  """
  steps_per_epoch = num_examples // batch_size
  train_step = make_step_fn(loss, tx)

  def run(state: TrainState, num_steps, x, y):
    def body(i, carry):
      state, perm, losses = carry
      step = state.step
      perm = jax.lax.cond(
        step % steps_per_epoch == 0,
        lambda: _epoch_perm(data_key, step, num_examples, steps_per_epoch),
        lambda: perm,
      )
      xb, yb = _batch(x, y, perm, step, batch_size, steps_per_epoch)
      state = train_step(state, xb, yb)
      losses = losses.at[i].set(state.opt_state[0].value)
      return state, perm, losses

    perm = _epoch_perm(data_key, state.step, num_examples, steps_per_epoch)
    losses = jnp.full((chunk,), jnp.nan, jnp.float32)
    state, _, losses = jax.lax.fori_loop(0, num_steps, body, (state, perm, losses))
    finite = jnp.isfinite(metrics.tree_norm(state.params))
    return state, losses, finite

  return run


def make_base_fn(
  loss: Callable[..., jax.Array],
  *,
  batch_size: int,
  num_examples: int,
  chunk: int,
  data_key: jax.Array,
) -> Callable[..., jax.Array]:
  """``base(params, step0, x, y)``: ``chunk`` forward+loss evaluations, batched like training.

  Baydin et al.'s base runtime: a forward pass and the loss, no derivative, no update,
  with the same on-device batching as a train step so the ratio R compares like with like.
  """
  steps_per_epoch = num_examples // batch_size

  def base(params, step0, x, y):
    perm = _epoch_perm(data_key, step0, num_examples, steps_per_epoch)

    def body(i, total):
      xb, yb = _batch(x, y, perm, step0 + i, batch_size, steps_per_epoch)
      return total + loss(params, xb, yb)

    return jax.lax.fori_loop(0, chunk, body, jnp.zeros((), jnp.float32))

  return base


def make_eval_fn(
  apply: Callable[..., jax.Array], batch_size: int
) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """``evaluate(params, x, y) -> (mean loss, accuracy)`` over a whole split, in batches."""

  def evaluate(params, x, y):
    n = x.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    xp = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(nb, batch_size, *x.shape[1:])
    yp = jnp.pad(y, (0, pad)).reshape(nb, batch_size)
    mask = (jnp.arange(nb * batch_size) < n).reshape(nb, batch_size)

    def one(args):
      xb, yb, mb = args
      logits = apply(params, xb)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      correct = jnp.argmax(logits, -1) == yb
      return jnp.sum(jnp.where(mb, losses, 0.0)), jnp.sum(jnp.where(mb, correct, False))

    loss_sums, correct = jax.lax.map(one, (xp, yp, mask))
    return jnp.sum(loss_sums) / n, jnp.sum(correct) / n

  return evaluate


def make_grad_check_fn(loss: Callable[..., jax.Array], cfg: config_lib.EstimatorConfig):
  """``check(params, key, x, y) -> (cosine, norm ratio)`` of the estimate vs ``jax.grad``."""
  estimate = estimators.get_estimator(cfg.name)(loss, **estimator_options(cfg))

  def check(params, key, x, y):
    _, g = estimate(key, params, x, y)
    true = jax.grad(loss)(params, x, y)
    return metrics.cosine_similarity(g, true), metrics.norm_ratio(g, true)

  return check


def median_time(fn: Callable[[], Any], reps: int) -> float:
  """Median wall time of ``fn()`` in seconds, blocking on its result each time."""
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


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


class _Metrics:
  """metrics.jsonl (+ TensorBoard when tensorboardX is installed)."""

  def __init__(self, run_dir: Path, resume_step: int):
    self.path = run_dir / "metrics.jsonl"
    records = []
    if resume_step > 0 and self.path.exists():
      # Records past the checkpoint belong to steps that will be run again.
      records = [
        r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= resume_step
      ]
    elif self.path.exists():
      self.path.unlink()
    self.records = records
    self.path.write_text("".join(json.dumps(r) + "\n" for r in records))
    self._file = self.path.open("a")
    self._tb = None
    try:
      from tensorboardX import SummaryWriter  # optional

      self._tb = SummaryWriter(str(run_dir / "tensorboard"))
    except ImportError:
      pass

  def write(self, record: dict[str, Any]) -> None:
    self.records.append(record)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, int | float) and v is not None:
          self._tb.add_scalar(k, v, record["step"])

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _check_resume_config(run_dir: Path, cfg: config_lib.Config) -> None:
  path = run_dir / "config.json"
  new = config_lib.to_dict(cfg)
  if path.exists():
    old = json.loads(path.read_text())
    changed = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
    if old.get("train", {}).get("batch_size") != new["train"]["batch_size"]:
      changed.append("train.batch_size")
    if changed:
      raise config_lib.ConfigError(
        f"{changed[0]}: differs from the run being resumed in {run_dir}; use a new run directory "
        "(only train.steps and the logging/eval/checkpoint intervals may change on resume)."
      )
  path.write_text(json.dumps(new, indent=2))


def train(
  cfg: config_lib.Config,
  run_dir: str | os.PathLike[str],
  *,
  dataset: data_lib.Dataset | None = None,
) -> dict[str, Any]:
  """Trains ``cfg`` into ``run_dir`` and returns the summary (also in ``summary.json``).

  Args:
    cfg: the run; validated first (:func:`fwdgrad_jax.config.validate`).
    run_dir: output directory; an existing checkpoint there is resumed.
    dataset: preloaded data (tests, notebooks); loaded from ``cfg.data`` otherwise.

  Returns:
    The summary: ``val_loss``, ``val_accuracy``, ``test_loss``, ``test_accuracy``,
    ``diverged``, ``steps``, ``step_time_ms``, ``base_time_ms``, ``runtime_ratio``
    (R_f or R_b), … and the essentials of the config.
  """
  import orbax.checkpoint as ocp

  config_lib.validate(cfg)
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  tr = cfg.train

  # Model first: bad model options fail here, before data loading and compiling.
  input_shape = dataset.input_shape if dataset is not None else data_lib.input_shape(cfg.data.name)
  n_classes = dataset.num_classes if dataset is not None else data_lib.num_classes(cfg.data.name)
  try:
    model = models.create(
      cfg.model.name,
      input_shape=input_shape,
      num_classes=n_classes,
      rngs=nnx.Rngs(cfg.seed),
      **cfg.model.options,
    )
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(f"model.options: {e}") from e
  _check_resume_config(run_dir, cfg)
  graphdef, params, rest = models.split(model)
  num_params = models.count_params(params)  # before the first chunk donates the buffers
  loss = make_loss(graphdef, rest)
  apply = models.apply_fn(graphdef, rest)

  if dataset is None:
    dataset = data_lib.load(
      cfg.data.name,
      data_dir=cfg.data.data_dir,
      val_size=cfg.data.val_size,
      seed=cfg.seed,
      download=cfg.data.download,
    )
  num_examples = int(dataset.x_train.shape[0])
  if num_examples < tr.batch_size:
    raise config_lib.ConfigError(
      f"train.batch_size={tr.batch_size}: larger than the {num_examples} training examples"
    )

  root = jax.random.PRNGKey(cfg.seed)  # raw keys: plain uint32 arrays checkpoint anywhere
  data_key, est_key, check_key = jax.random.split(root, 3)
  tx = make_tx(cfg, est_key)
  chunk = _chunk_length(tr)
  state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))

  ckpt = ocp.CheckpointManager(
    (run_dir / "checkpoints").absolute(),
    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
  )
  start_step = 0
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = ckpt.restore(ckpt.latest_step(), args=ocp.args.StandardRestore(abstract))
    start_step = int(state.step)
  log = _Metrics(run_dir, start_step)

  x_train, y_train = dataset.x_train, dataset.y_train
  common = dict(batch_size=tr.batch_size, num_examples=num_examples, chunk=chunk, data_key=data_key)
  run_chunk = (
    jax.jit(make_chunk_fn(loss, tx, **common), donate_argnums=0)
    .lower(state, jnp.int32(chunk), x_train, y_train)
    .compile()
  )
  base = (
    jax.jit(make_base_fn(loss, **common))
    .lower(state.params, state.step, x_train, y_train)
    .compile()
  )
  evaluate = jax.jit(make_eval_fn(apply, tr.eval_batch_size))
  grad_check = jax.jit(make_grad_check_fn(loss, cfg.estimator))

  # Base runtime: once per run, same chunk shape as the training chunks.
  base_time = median_time(lambda: base(state.params, state.step, x_train, y_train), reps=5) / chunk

  progress = None
  if tr.progress:
    from tqdm.auto import tqdm

    progress = tqdm(
      total=tr.steps, initial=start_step, desc=cfg.name, unit="step", dynamic_ncols=True
    )
  chunk_times, pending = [], []
  train_time = log.records[-1].get("train_time_s", 0.0) if log.records else 0.0
  diverged, step = False, start_step
  try:
    while step < tr.steps:
      n = min(chunk, tr.steps - step)
      t0 = time.perf_counter()
      new_state, losses, finite = run_chunk(state, jnp.int32(n), x_train, y_train)
      losses = np.asarray(losses[:n])  # the one host sync per chunk
      dt = time.perf_counter() - t0
      chunk_times.append(dt / n)  # AOT-compiled: no compile time in any chunk
      train_time += dt
      state = new_state
      if not (np.isfinite(losses).all() and bool(finite)):
        bad = int(np.argmin(np.isfinite(losses))) if not np.isfinite(losses).all() else n - 1
        pending.extend(losses[:bad].tolist())
        step += bad
        diverged = True
        break
      pending.extend(losses.tolist())
      step += n
      if progress is not None:
        progress.update(n)
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
      record: dict[str, Any] = {}
      if step % tr.log_every == 0 or step == tr.steps:
        record = {"step": step, "train_loss": float(np.mean(pending)), "train_time_s": train_time}
        pending = []
      if tr.eval_every and step % tr.eval_every == 0 and dataset.x_val.shape[0]:
        val_loss, val_acc = evaluate(state.params, dataset.x_val, dataset.y_val)
        record.update(val_loss=float(val_loss), val_accuracy=float(val_acc))
      if tr.grad_check_every and step % tr.grad_check_every == 0:
        key = jax.random.fold_in(check_key, step)
        idx = jax.random.choice(key, num_examples, (tr.batch_size,), replace=False)
        cos, ratio = grad_check(state.params, key, x_train[idx], y_train[idx])
        record.update(cosine_to_true_grad=float(cos), grad_norm_ratio=float(ratio))
      if record:
        record.setdefault("train_loss", float(np.mean(pending)) if pending else None)
        record.setdefault("train_time_s", train_time)
        record["step"] = step
        log.write(dict(sorted(record.items(), key=lambda kv: kv[0] != "step")))
      if tr.checkpoint_every and step % tr.checkpoint_every == 0 and step < tr.steps:
        ckpt.save(step, args=ocp.args.StandardSave(state))
  finally:
    if progress is not None:
      progress.close()

  if diverged:
    log.write({"step": step, "train_loss": None, "diverged": True, "train_time_s": train_time})
  elif ckpt.latest_step() != step:
    ckpt.save(step, args=ocp.args.StandardSave(state), force=True)
  ckpt.wait_until_finished()
  ckpt.close()
  log.close()

  val = test = (float("nan"), float("nan"))
  if not diverged:
    if dataset.x_val.shape[0]:
      val = evaluate(state.params, dataset.x_val, dataset.y_val)
    test = evaluate(state.params, dataset.x_test, dataset.y_test)
  evals = [r for r in log.records if r.get("val_loss") is not None]
  best = min(evals, key=lambda r: r["val_loss"]) if evals else None
  step_time = float(np.median(chunk_times)) if chunk_times else None
  summary = {
    "val_loss": _finite_or_none(val[0]),
    "val_accuracy": _finite_or_none(val[1]),
    "test_loss": _finite_or_none(test[0]),
    "test_accuracy": _finite_or_none(test[1]),
    "diverged": diverged,
    "steps": step,
    "step_time_ms": None if step_time is None else step_time * 1e3,
    "base_time_ms": base_time * 1e3,
    "runtime_ratio": None if step_time is None else step_time / base_time,
    "best_val_loss": best["val_loss"] if best else None,
    "best_val_step": best["step"] if best else None,
    "train_time_s": train_time,
    "num_params": num_params,
    "data": cfg.data.name,
    "model": cfg.model.name,
    "estimator": cfg.estimator.name,
    "num_tangents": cfg.estimator.num_tangents if cfg.estimator.name == "forward" else None,
    "tangents": cfg.estimator.tangents if cfg.estimator.name == "forward" else None,
    "aggregation": cfg.estimator.aggregation if cfg.estimator.name == "forward" else None,
    "optimizer": cfg.optimizer.name,
    "lr": cfg.optimizer.lr,
    "decay": cfg.optimizer.decay,
    "batch_size": tr.batch_size,
    "seed": cfg.seed,
    "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    "jax_version": jax.__version__,
    "config": dataclasses.asdict(cfg),
  }
  (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
