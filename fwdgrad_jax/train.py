"""The training loop as a library function: ``train(config, run_dir) -> summary``.

One loop for both estimators: the gradient comes from the optax transform registered
under ``estimator.name`` in :data:`fwdgrad_jax.transforms.ESTIMATORS`, followed by
optional clipping and the optimizer. :func:`train` reads top to bottom:

1. **init** (:func:`_init`) — the model, split into parameters and the rest of its state
   (BatchNorm statistics, Dropout RNG counters), the transform, the compiled chunk of
   training steps, evaluation in eval mode, the gradient check, the base time;
2. **restore** — the newest readable checkpoint of ``run_dir`` (:mod:`fwdgrad_jax.rundir`);
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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fwdgrad_jax import config as config_lib
from fwdgrad_jax import data as data_lib
from fwdgrad_jax import experiment, metrics, models, parallel, rundir, transforms

PyTree = Any
log = logging.getLogger(__name__)

# What may change when a run directory is resumed; everything else must match.
_MAY_CHANGE_ON_RESUME = frozenset(
  {"name", "data.data_dir", "data.download", "mesh.data", "mesh.tangents", "mesh.distributed"}
  | {f"train.{key}" for key in ("steps", "eval_batch_size", "progress", "time_budget_s")}
  | {f"train.{key}_every" for key in ("log", "eval", "grad_check", "checkpoint")}
)


class TrainState(NamedTuple):
  """What a checkpoint holds.

  Attributes:
    params: the ``nnx.Param`` state, the only thing differentiated.
    opt_state: the optax state (with the tangent key, the last loss in ``value`` and,
      for the app's stateful loss, the new model state in ``aux``).
    step: optimizer steps taken.
    model_state: the model's other state (BatchNorm statistics, Dropout RNG counters),
      threaded through the steps; None for a loss ``loss(params, x, y)`` without state.
  """

  params: PyTree
  opt_state: PyTree
  step: jax.Array
  model_state: PyTree = None


# --------------------------------------------------------------------------------------
# Building blocks (pure; reused by the benchmark)
# --------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, *, per_example: bool = False) -> jax.Array:
  """Softmax cross-entropy with integer labels: the mean, or the (batch,) vector."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return losses if per_example else jnp.mean(losses)


def make_loss(
  graphdef: nnx.GraphDef, rest: nnx.State, *, per_example: bool = False
) -> Callable[..., jax.Array]:
  """``loss(params, x, y)`` of a split NNX model without state updates (``rest`` fixed).

  ``per_example``: the (batch,) vector of losses (activity perturbation gives every
  example its own directional derivative from it).
  """
  apply = models.apply_fn(graphdef, rest)

  def loss(params, x, y):
    return cross_entropy(apply(params, x), y, per_example=per_example)

  return loss


def make_stateful_loss(
  graphdef: nnx.GraphDef, *, per_example: bool = False
) -> Callable[..., tuple[jax.Array, nnx.State]]:
  """``loss(params, x, y, model_state) -> (loss, new_model_state)`` of a split NNX model.

  For a transform built with ``has_aux=True``: the new BatchNorm statistics and Dropout
  RNG state come back as aux. A model without such state has an empty ``model_state``.
  ``per_example`` as for :func:`make_loss`.
  """
  apply = models.apply_with_state_fn(graphdef)

  def loss(params, x, y, model_state):
    logits, new_state = apply(params, model_state, x)
    return cross_entropy(logits, y, per_example=per_example), new_state

  return loss


def per_example_losses(cfg: config_lib.EstimatorConfig) -> bool:
  """Whether the estimator takes the vector of per-example losses (activity perturbation)."""
  return cfg.name == "forward" and cfg.perturbation == "activity"


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
  """Keyword options of the estimator named by ``cfg.name``: its registry ``config_options``."""
  return {name: getattr(cfg, name) for name in transforms.get(cfg.name).config_options}


def make_tx(
  cfg: config_lib.Config, key: jax.Array, *, has_aux: bool = False, mesh: Any = None
) -> optax.GradientTransformationExtraArgs:
  """Estimator transform → optional global-norm clipping → optimizer.

  Args:
    cfg: the run's config.
    key: PRNG key of the tangents.
    has_aux: the loss returns ``(loss, new_model_state)`` (:func:`make_stateful_loss`).
    mesh: a :func:`fwdgrad_jax.parallel.make_mesh` mesh; the forward estimator splits
      its tangents along its ``"tangents"`` axis.
  """
  est = cfg.estimator
  options = estimator_options(est)
  if mesh is not None and est.name == "forward":
    options["mesh"] = mesh
  parts = [transforms.gradient_transform(est.name, key=key, has_aux=has_aux, **options)]
  if cfg.optimizer.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.optimizer.clip_norm))
  parts.append(make_optimizer(cfg.optimizer))
  return optax.chain(*parts)


def init_state(
  tx: optax.GradientTransformationExtraArgs, params: PyTree, model_state: PyTree = None
) -> TrainState:
  """The state at step 0; with a ``model_state``, ``tx`` must have been built with ``has_aux``.

  The transform's ``aux`` starts as a copy of ``model_state`` so that the state keeps
  one structure through ``fori_loop`` (a copy: a chunk donates its state, and one buffer
  cannot be donated twice).
  """
  opt_state = tx.init(params)
  if model_state is not None:
    opt_state = optax.tree_utils.tree_set(opt_state, aux=jax.tree.map(jnp.copy, model_state))
  return TrainState(params, opt_state, jnp.zeros((), jnp.int32), model_state)


def make_step_fn(
  loss: Callable[..., Any], tx: optax.GradientTransformationExtraArgs
) -> Callable[[TrainState, jax.Array, jax.Array], TrainState]:
  """``step(state, x, y) -> state``: one estimate + optimizer update on one batch.

  The body of the training loop; the benchmark times exactly this. With
  ``state.model_state`` set, ``loss`` is stateful (:func:`make_stateful_loss`) and the
  new model state is read from the transform's ``aux``.
  """

  def step(state: TrainState, x: jax.Array, y: jax.Array) -> TrainState:
    kwargs = {} if state.model_state is None else {"model_state": state.model_state}
    updates, opt_state = tx.update(
      state.params, state.opt_state, state.params, value_fn=loss, x=x, y=y, **kwargs
    )
    model_state = None
    if state.model_state is not None:
      model_state = optax.tree_utils.tree_get(opt_state, "aux")
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1, model_state)

  return step


def _batch(x, y, perm, step, batch_size, steps_per_epoch):
  start = (step % steps_per_epoch) * batch_size
  idx = jax.lax.dynamic_slice(perm, (start,), (batch_size,))
  return x[idx], y[idx]


def _epoch_perm(data_key, step, num_examples, steps_per_epoch):
  return jax.random.permutation(jax.random.fold_in(data_key, step // steps_per_epoch), num_examples)


def _batched_step(loss, tx, *, batch_size: int, num_examples: int, data_key: jax.Array):
  """``one(state, perm, x, y) -> (state, perm, loss)``: one step on the epoch's next batch.

  The permutation is ``permutation(fold_in(data_key, epoch))``, redrawn at each epoch's
  first step; both loops (on device and from the host) run exactly this.
  """
  steps_per_epoch = num_examples // batch_size
  train_step = make_step_fn(loss, tx)

  def one(state: TrainState, perm, x, y):
    step = state.step
    perm = jax.lax.cond(
      step % steps_per_epoch == 0,
      lambda: _epoch_perm(data_key, step, num_examples, steps_per_epoch),
      lambda: perm,
    )
    xb, yb = _batch(x, y, perm, step, batch_size, steps_per_epoch)
    state = train_step(state, xb, yb)
    return state, perm, optax.tree_utils.tree_get(state.opt_state, "value")

  return one


def make_chunk_fn(
  loss: Callable[..., Any],
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
  one = _batched_step(loss, tx, batch_size=batch_size, num_examples=num_examples, data_key=data_key)

  def run(state: TrainState, num_steps, x, y):
    def body(i, carry):
      state, perm, losses = carry
      state, perm, value = one(state, perm, x, y)
      return state, perm, losses.at[i].set(value)

    perm = _epoch_perm(data_key, state.step, num_examples, steps_per_epoch)
    losses = jnp.full((chunk,), jnp.nan, jnp.float32)
    state, _, losses = jax.lax.fori_loop(0, num_steps, body, (state, perm, losses))
    finite = jnp.isfinite(optax.tree_utils.tree_norm(state.params))
    return state, losses, finite

  return run


def make_host_chunk_fn(
  loss: Callable[..., Any],
  tx: optax.GradientTransformationExtraArgs,
  *,
  batch_size: int,
  num_examples: int,
  chunk: int,
  data_key: jax.Array,
  example: tuple[TrainState, jax.Array, jax.Array],
) -> Callable[..., tuple[TrainState, jax.Array, jax.Array]]:
  """:func:`make_chunk_fn`'s contract with one compiled step per Python call.

  XLA:CPU runs convolutions inside a while-loop body ~20× slower than the same
  convolutions alone (jax-ml/jax#12868: measured here 2.5 s vs 0.12 s per CNN step), so
  for convolutional models on CPU the chunk is a Python loop over one AOT-compiled step.
  The steps are dispatched asynchronously and the losses stay on device, so the host
  still syncs once per chunk; the batches and their order are the device loop's.

  Args:
    example: ``(state, x, y)`` to compile the step for (shapes only).
  """
  steps_per_epoch = num_examples // batch_size
  one = _batched_step(loss, tx, batch_size=batch_size, num_examples=num_examples, data_key=data_key)
  state0, x0, y0 = example
  first_perm = jax.jit(lambda step: _epoch_perm(data_key, step, num_examples, steps_per_epoch))
  perm0 = first_perm(state0.step)
  step_exe = jax.jit(one, donate_argnums=(0, 1)).lower(state0, perm0, x0, y0).compile()
  finish = jax.jit(
    lambda params, losses: (
      jnp.full((chunk,), jnp.nan, jnp.float32).at[: losses.shape[0]].set(losses),
      jnp.isfinite(optax.tree_utils.tree_norm(params)),
    )
  )

  def run(state: TrainState, num_steps, x, y):
    perm = first_perm(state.step)
    losses = []
    for _ in range(int(num_steps)):
      state, perm, value = step_exe(state, perm, x, y)
      losses.append(value)
    padded, finite = finish(state.params, jnp.stack(losses))
    return state, padded, finite

  return run


def uses_convolutions(fun: Callable[..., Any], *args: Any) -> bool:
  """Whether ``fun(*args)`` runs a convolution (its jaxpr, nested jaxprs included)."""
  return "conv_general_dilated" in str(jax.make_jaxpr(fun)(*args))


def reverse_mode(cfg: config_lib.EstimatorConfig) -> bool:
  """Whether a step differentiates in reverse mode: backprop, guided's true gradients,
  activity perturbation's local VJPs (forward-mode convolutions run fine in loops)."""
  return cfg.name in ("backprop", "guided") or cfg.perturbation == "activity"


def host_loop(cfg: config_lib.TrainConfig, has_convolutions: bool, reverse: bool = True) -> bool:
  """Whether to run the steps from Python (``train.loop``).

  ``auto``: on CPU, for convolutional models differentiated in reverse mode — XLA:CPU's
  transposed convolutions inside a while loop run ~25× slower (Baydin's CNN: 8.7 s
  vs 0.35 s per backprop step), while jvp convolutions do not (0.18 s in the loop vs
  0.22 s from Python).
  """
  if cfg.loop == "auto":
    return has_convolutions and reverse and jax.default_backend() == "cpu"
  return cfg.loop == "host"


def make_base_fn(
  loss: Callable[..., Any],
  *,
  batch_size: int,
  num_examples: int,
  chunk: int,
  data_key: jax.Array,
  host: bool = False,
) -> Callable[..., jax.Array]:
  """``base(params, step0, x, y, model_state=None)``: ``chunk`` forward+loss evaluations.

  Baydin et al.'s base runtime: a forward pass and the loss, no derivative, no update,
  with the same on-device batching as a train step so the ratio R compares like with
  like. With a ``model_state``, ``loss`` is stateful and runs in train mode, as in a step.
  ``host``: one compiled evaluation per Python call, as :func:`make_host_chunk_fn`.
  """
  steps_per_epoch = num_examples // batch_size

  def one(params, perm, step, x, y, model_state):
    xb, yb = _batch(x, y, perm, step, batch_size, steps_per_epoch)
    if model_state is None:
      return loss(params, xb, yb)
    return loss(params, xb, yb, model_state)[0]

  def first_perm(step0):
    return _epoch_perm(data_key, step0, num_examples, steps_per_epoch)

  if host:
    one_jit, perm_jit = jax.jit(one), jax.jit(first_perm)

    def base_host(params, step0, x, y, model_state=None):
      perm = perm_jit(step0)
      return sum(one_jit(params, perm, step0 + i, x, y, model_state) for i in range(chunk))

    return base_host

  def base(params, step0, x, y, model_state=None):
    perm = first_perm(step0)
    body = lambda i, total: total + one(params, perm, step0 + i, x, y, model_state)
    return jax.lax.fori_loop(0, chunk, body, jnp.zeros((), jnp.float32))

  return base


def make_eval_fn(
  apply: Callable[..., Any], batch_size: int, *, host: bool = False
) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """``evaluate(params, x, y, model_state=None) -> (mean loss, accuracy)`` over a split.

  ``apply`` is ``apply(params, x) -> logits``, or with a ``model_state`` the stateful
  ``apply(params, model_state, x) -> (logits, new_state)`` of the eval-mode graphdef
  (:func:`fwdgrad_jax.models.eval_graphdef`): evaluation never updates the state.
  The batches run in a ``lax.map`` (one compiled call), or with ``host`` one compiled
  call per batch (see :func:`make_host_chunk_fn`); either way the result is jitted.
  """

  def one(params, model_state, xb, yb, mb):
    logits = apply(params, xb) if model_state is None else apply(params, model_state, xb)[0]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
    correct = jnp.argmax(logits, -1) == yb
    return jnp.sum(jnp.where(mb, losses, 0.0)), jnp.sum(jnp.where(mb, correct, False))

  def batches(x, y):
    n = x.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    xp = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(nb, batch_size, *x.shape[1:])
    yp = jnp.pad(y, (0, pad)).reshape(nb, batch_size)
    mask = (jnp.arange(nb * batch_size) < n).reshape(nb, batch_size)
    return xp, yp, mask

  if host:
    one_jit, batches_jit = jax.jit(one), jax.jit(batches)

    def evaluate_host(params, x, y, model_state=None):
      xp, yp, mask = batches_jit(x, y)
      sums = [one_jit(params, model_state, xp[i], yp[i], mask[i]) for i in range(xp.shape[0])]
      return sum(s[0] for s in sums) / x.shape[0], sum(s[1] for s in sums) / x.shape[0]

    return evaluate_host

  def evaluate(params, x, y, model_state=None):
    xp, yp, mask = batches(x, y)
    loss_sums, correct = jax.lax.map(lambda args: one(params, model_state, *args), (xp, yp, mask))
    return jnp.sum(loss_sums) / x.shape[0], jnp.sum(correct) / x.shape[0]

  return jax.jit(evaluate)


def make_grad_check_fn(
  loss: Callable[..., Any],
  cfg: config_lib.EstimatorConfig,
  estimator_loss: Callable[..., Any] | None = None,
):
  """``check(params, key, x, y, model_state=None, est_state=None) -> (cosine, norm ratio)``.

  The estimate against ``jax.grad`` on the same batch. With a ``model_state``, ``loss``
  is stateful; both gradients see the same state (the same dropout mask), so the check
  compares estimators, not masks. ``estimator_loss`` is what the estimator
  differentiates when it differs from ``loss`` (per-example losses for activity
  perturbation). A stateful estimator (``guided``) has no function form: its estimate
  comes from its optax transform at the run's current ``est_state``.
  """
  estimator = transforms.get(cfg.name).value_and_grad
  options = estimator_options(cfg)
  est_loss = loss if estimator_loss is None else estimator_loss

  def check(params, key, x, y, model_state=None, est_state=None):
    stateful = model_state is not None
    args = (x, y) if not stateful else (x, y, model_state)
    if estimator is None:
      tx = transforms.gradient_transform(cfg.name, key=key, has_aux=stateful, **options)
      kwargs = dict(x=x, y=y) if not stateful else dict(x=x, y=y, model_state=model_state)
      g, _ = tx.update(params, est_state, params, value_fn=est_loss, **kwargs)
    else:
      _, g = estimator(est_loss, has_aux=stateful, **options)(key, params, *args)
    true = jax.grad(loss, has_aux=stateful)(params, *args)
    true = true[0] if stateful else true
    return metrics.cosine_similarity(g, true), metrics.norm_ratio(g, true)

  return check


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


class _Interrupts:
  """SIGTERM/SIGINT while training: note it, finish the chunk, checkpoint, summarize.

  A second signal stops at once (KeyboardInterrupt). Handlers can only be installed in
  the main thread; elsewhere (a notebook's worker thread) signals keep their meaning, as
  does a signal the parent told this process to ignore (``nohup``, a background job).
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> _Interrupts:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
          self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
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
  that failed its checks before starting must not block its corrected rerun).
  """
  ckpt_dir = run_dir / rundir.CHECKPOINTS_NAME
  if not (ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
    return
  old = rundir.read_json(run_dir / "config.json")
  if old is None:
    return
  change = rundir.changed_key(old, config_lib.to_dict(cfg), _MAY_CHANGE_ON_RESUME)
  if change is not None:
    key, was, now = change
    raise config_lib.ConfigError(
      f"{key}: {now!r} differs from {was!r} of the run being resumed in {run_dir}; use a new "
      "run directory (train.steps, the intervals and the time budget may change on resume)"
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
      **cfg.model.options,
    )
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(f"model.options: {e}") from e


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
  timing = experiment.time_interleaved(
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
  """The hooks that measure between chunks: log, eval, gradient check (not timed)."""
  tr, ds = run.cfg.train, run.dataset
  record: dict[str, Any] = {}
  if step % tr.log_every == 0 or last:
    record["train_loss"] = float(np.mean(pending)) if pending else None
  if tr.eval_every and step % tr.eval_every == 0 and ds.x_val.shape[0]:
    val_loss, val_acc = run.evaluate(state.params, ds.x_val, ds.y_val, state.model_state)
    record.update(val_loss=float(val_loss), val_accuracy=float(val_acc))
  if tr.grad_check_every and step % tr.grad_check_every == 0:
    key = jax.random.fold_in(run.check_key, step)
    idx = jax.random.choice(key, ds.x_train.shape[0], (tr.batch_size,), replace=False)
    cos, ratio = run.grad_check(
      state.params, key, ds.x_train[idx], ds.y_train[idx], state.model_state, state.opt_state[0]
    )
    record.update(cosine_to_true_grad=float(cos), grad_norm_ratio=float(ratio))
  if not record:
    return record
  record.setdefault("train_loss", float(np.mean(pending)) if pending else None)
  return {"step": step, **record, "train_time_s": train_time}


@contextlib.contextmanager
def _progress(cfg: config_lib.Config, start: int) -> Iterator[Any]:
  if not cfg.train.progress:
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

  def should_stop() -> bool:
    out.interrupted = interrupts.signum
    budget = tr.time_budget_s
    out.stopped_on_time = budget is not None and out.train_time >= budget and step < tr.steps
    return out.interrupted is not None or out.stopped_on_time

  with _progress(run.cfg, step) as bar:
    while step < tr.steps and not should_stop():
      n = min(run.chunk, tr.steps - step)
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
      if record:
        metrics_log.write(record)
        log.info(_describe(record))
      if step % tr.log_every == 0 or last:
        pending = []  # train_loss is the mean over the log interval
      if tr.checkpoint_every and step % tr.checkpoint_every == 0 and step < tr.steps:
        try:
          ckpts.save(step, state)
        except rundir.RunDirError as e:
          out.error = e
          break
  out.state, out.step = state, step
  if out.diverged:
    metrics_log.write(
      {"step": step, "train_loss": None, "diverged": True, "train_time_s": out.train_time}
    )
    log.warning("step %d: non-finite loss; stopped (the last good checkpoint is kept)", step)
  elif out.error is None:
    # Always a checkpoint at the end, at an interrupt and on the time budget.
    try:
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
    "provenance": experiment.provenance(),
  }


def train(
  cfg: config_lib.Config,
  run_dir: str | os.PathLike[str],
  *,
  dataset: data_lib.Dataset | None = None,
  on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
  """Trains ``cfg`` into ``run_dir`` and returns the summary (also in ``summary.json``).

  Args:
    cfg: the run; validated first (:func:`fwdgrad_jax.config.validate`).
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
  parallel.initialize_distributed(cfg.mesh.distributed)
  make_run_mesh(cfg.mesh)  # too few devices fails here, before the data are loaded
  with rundir.lock(run_dir) as run_dir, _Interrupts() as interrupts:
    _check_resumable(run_dir, cfg)
    model = _create_model(cfg, dataset)  # bad model options fail before data loading
    dataset = dataset if dataset is not None else _load_data(cfg)
    run, state = _init(cfg, model, dataset)
    ckpts = rundir.Checkpoints(run_dir)
    try:
      state = _restore(ckpts, state)
      what = f"{cfg.model.name} on {cfg.data.name}, {cfg.estimator.name} + {cfg.optimizer.name}"
      log.info("%s: %s, lr %g, %d steps", run_dir, what, cfg.optimizer.lr, cfg.train.steps)
      rundir.write_json(run_dir / "config.json", config_lib.to_dict(cfg))
      if on_start is not None:
        on_start()
      base_time = _base_time(run, state)
      metrics_log = rundir.MetricsLog(run_dir, int(state.step))
      try:
        out = _loop(run, state, metrics_log, ckpts, interrupts)
      finally:
        metrics_log.close()
    finally:
      ckpts.close()
    summary = _summarize(run, out, metrics_log.records, base_time)
    try:
      rundir.write_json(run_dir / "summary.json", summary)
    except rundir.RunDirError as e:
      if out.error is None:
        raise
      log.warning("%s", e)  # the disk is full: the save's error is the one to report
    if out.error is not None:
      raise out.error
  return summary
