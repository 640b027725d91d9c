"""Pure builders of the training steps: loss, optimizer, transform, one step, a compiled chunk
of steps, evaluation, the gradient check and the base time.

Nothing here touches a run directory or the host between steps: :mod:`.run` drives these
builders, and the benchmark and the experiments call them directly to time or reuse a step.
A step is ``(state, ...) -> (state, loss)`` over a :class:`TrainState`; a chunk runs
``log_every`` of them in one ``fori_loop`` with shuffling and batching on device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fwdgrad_jax import metrics, models, registry
from fwdgrad_jax.training import config as config_lib

PyTree = Any


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
  example its own directional derivative from it). A model with local losses
  (:func:`fwdgrad_jax.models.has_local_losses`) gives the marked total of its heads'
  losses (:func:`fwdgrad_jax.models.train_loss`).
  """

  def loss(params, x, y):
    # copy=True as in models.apply_fn: the closed-over `rest` is never written to.
    model = nnx.merge(graphdef, params, rest, copy=True)
    return models.train_loss(model, x, y, per_example=per_example)

  return loss


def make_stateful_loss(
  graphdef: nnx.GraphDef, *, per_example: bool = False
) -> Callable[..., tuple[jax.Array, nnx.State]]:
  """``loss(params, x, y, model_state) -> (loss, new_model_state)`` of a split NNX model.

  For a transform built with ``has_aux=True``: the new BatchNorm statistics and Dropout
  RNG state come back as aux. A model without such state has an empty ``model_state``.
  ``per_example`` and local losses as for :func:`make_loss`.
  """

  def loss(params, x, y, model_state):
    # As models.apply_with_state_fn: the writes happen on a copy, read back out.
    model = nnx.merge(graphdef, params, model_state, copy=True)
    value = models.train_loss(model, x, y, per_example=per_example)
    return value, nnx.split(model, nnx.Param, ...)[2]

  return loss


def per_example_losses(cfg: config_lib.EstimatorConfig) -> bool:
  """Whether the estimator takes the vector of per-example losses (activity perturbation)."""
  return cfg.name == "forward" and cfg.perturbation == "activity"


def learning_rate(
  cfg: config_lib.OptimizerConfig,
  total_steps: int | None = None,
  time_budget_s: float | None = None,
) -> float | optax.Schedule:
  """``cfg``'s learning rate: a float, or an optax schedule of the optimizer step count.

  Baydin's decay η_i = η_0 · exp(−i · decay); ``cosine``: optax's cosine decay from ``lr``
  to 0 over ``total_steps``; ``warmup_cosine``: 0 → ``lr`` linearly over
  ``warmup_steps``, then cosine to 0 at ``total_steps`` (Ren et al. 2023's schedule).
  With a ``time_budget_s`` a decaying schedule is not a function of the step count
  alone: the optimizer runs at the constant peak ``lr`` and :func:`budget_schedule`
  after it scales the updates (see :func:`make_tx`); this returns that peak.

  Raises:
    ValueError: a decaying schedule without ``total_steps``, or an unknown schedule.
  """
  if cfg.decay > 0:
    return optax.exponential_decay(cfg.lr, transition_steps=1, decay_rate=math.exp(-cfg.decay))
  if cfg.schedule == "constant" or (time_budget_s is not None and cfg.schedule in _DECAYING):
    return cfg.lr
  if total_steps is None:
    raise ValueError(f"optimizer.schedule={cfg.schedule!r} needs the run's total steps")
  if cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(cfg.lr, decay_steps=total_steps)
  if cfg.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, total_steps)
  raise ValueError(f"optimizer.schedule={cfg.schedule!r}: use one of {config_lib.SCHEDULES}")


_DECAYING = ("cosine", "warmup_cosine")


class BudgetScheduleState(NamedTuple):
  """State of :func:`budget_schedule`.

  Attributes:
    count: updates so far (the warmup's clock).
    budget_progress: the fraction of the time budget spent at the next update (the
      loop sets it from its clock between chunks).
    budget_rate: the fraction of the budget one update takes (the loop's latest
      measured step time / budget; 0 until a chunk has been timed).
    budget_scale: the multiplier of the last update (the logged ``lr`` is ``lr`` × this).
  """

  count: jax.Array
  budget_progress: jax.Array
  budget_rate: jax.Array
  budget_scale: jax.Array


def budget_schedule(total_steps: int, warmup_steps: int = 0) -> optax.GradientTransformation:
  """Scales updates by a cosine over the run's progress, time or steps, whichever ends it.

  A run with a time budget stops at a step count nobody knows in advance (a loaded
  machine runs fewer steps in the same seconds), so a schedule laid out over
  ``train.steps`` would stop anywhere along its decay. Here the progress is
  p = max(t / budget, count / total_steps), the fraction spent of whichever limit ends
  the run; the multiplier is min(1, count / warmup_steps) · ½ (1 + cos(π · min(p, 1))).
  Between the loop's clock readings (once per chunk, no host sync per step) the time
  fraction advances by ``budget_rate`` per update, so the decay is smooth within a
  chunk and corrected at every chunk boundary. The shape over the run is the same
  whether the machine runs N or 2N steps in the budget, so an lr chosen on one holds
  on the other (the peak lr, not the schedule, is what the step count moves).

  Put it after the optimizer (it scales the final updates, so momentum and Adam see the
  unscaled estimates, as with an optax lr schedule).

  Args:
    total_steps: ``train.steps``: the step count at which the run would stop anyway.
    warmup_steps: steps of linear warmup from 0 (0 = none).

  Returns:
    An optax ``GradientTransformation`` with :class:`BudgetScheduleState`.

  References:
    I. Loshchilov, F. Hutter, *SGDR: Stochastic Gradient Descent with Warm Restarts*,
    ICLR 2017 (the cosine); M. Ren et al., *Scaling Forward Gradient With Local
    Losses*, ICLR 2023 (warmup + cosine for forward gradients).
  """
  if total_steps < 1 or warmup_steps < 0:
    raise ValueError(
      f"budget_schedule: total_steps must be >= 1 and warmup_steps >= 0, got "
      f"total_steps={total_steps}, warmup_steps={warmup_steps}"
    )

  def init_fn(params):
    del params
    zero = jnp.zeros((), jnp.float32)
    return BudgetScheduleState(jnp.zeros((), jnp.int32), zero, zero, jnp.ones((), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    count = state.count.astype(jnp.float32)
    progress = jnp.clip(jnp.maximum(state.budget_progress, count / total_steps), 0.0, 1.0)
    scale = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    if warmup_steps:
      scale = scale * jnp.minimum(1.0, count / warmup_steps)
    updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    new = BudgetScheduleState(
      state.count + 1, state.budget_progress + state.budget_rate, state.budget_rate, scale
    )
    return updates, new

  return optax.GradientTransformation(init_fn, update_fn)


def uses_budget_schedule(cfg: config_lib.Config) -> bool:
  """Whether ``cfg``'s lr schedule runs over its time budget (:func:`budget_schedule`)."""
  return (
    cfg.train.time_budget_s is not None
    and cfg.optimizer.schedule in _DECAYING
    and cfg.optimizer.decay == 0
  )


def set_budget_clock(opt_state: PyTree, train_time: float, step_time: float, budget: float):
  """``opt_state`` with :func:`budget_schedule`'s clock set: t / budget and step time / budget.

  The progress never moves back (a host read of one scalar, between chunks).

  Args:
    opt_state: the run's optimizer state (holding one :class:`BudgetScheduleState`).
    train_time: training seconds spent so far.
    step_time: the latest measured seconds per step (0 before any).
    budget: ``train.time_budget_s``.
  """
  old = optax.tree_utils.tree_get(opt_state, "budget_progress")
  # Never back: when the last chunk's step time overestimated this one's, the clock is
  # behind the extrapolation, and the lr holds until the clock catches up (no lr rises).
  progress = max(train_time / budget, float(old))
  # Same dtype and placement as before: the compiled chunk takes (and donates) this state.
  put = lambda v: jax.device_put(jnp.asarray(v, jnp.float32), old.sharding)
  return optax.tree_utils.tree_set(
    opt_state, budget_progress=put(progress), budget_rate=put(step_time / budget)
  )


def lr_at(cfg: config_lib.OptimizerConfig, step: int, total_steps: int | None = None) -> float:
  """The learning rate of optimizer step ``step`` (optax's count; the first step is 0)."""
  lr = learning_rate(cfg, total_steps)
  return float(lr(step)) if callable(lr) else float(lr)


def make_optimizer(
  cfg: config_lib.OptimizerConfig,
  total_steps: int | None = None,
  time_budget_s: float | None = None,
) -> optax.GradientTransformation:
  """The optax optimizer of ``cfg`` with its :func:`learning_rate` and weight decay.

  Args:
    cfg: the optimizer config.
    total_steps: the run's ``train.steps`` (the end of ``cosine``/``warmup_cosine``).
    time_budget_s: the run's ``train.time_budget_s``: a decaying schedule then runs
      over the budget (:func:`budget_schedule`, added by :func:`make_tx`), not here.
  """
  lr = learning_rate(cfg, total_steps, time_budget_s)
  if cfg.name == "adam":
    if cfg.weight_decay:
      return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.name == "nesterov":
    sgd = optax.sgd(lr, momentum=cfg.momentum, nesterov=True)
  else:
    sgd = optax.sgd(lr, momentum=cfg.momentum or None)
  if cfg.weight_decay:
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), sgd)
  return sgd


def estimator_options(cfg: config_lib.EstimatorConfig) -> dict[str, Any]:
  """Keyword options of the estimator named by ``cfg.name``: its registry ``config_options``."""
  return {name: getattr(cfg, name) for name in registry.get(cfg.name).config_options}


def make_tx(
  cfg: config_lib.Config, key: jax.Array, *, has_aux: bool = False, mesh: Any = None
) -> optax.GradientTransformationExtraArgs:
  """Estimator transform → optional global-norm clipping → optimizer → budget schedule.

  The last only for a decaying ``optimizer.schedule`` with a ``train.time_budget_s``
  (:func:`budget_schedule`: the decay spans the budget, whatever the step count).

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
  parts = [registry.gradient_transform(est.name, key=key, has_aux=has_aux, **options)]
  if cfg.optimizer.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.optimizer.clip_norm))
  parts.append(make_optimizer(cfg.optimizer, cfg.train.steps, cfg.train.time_budget_s))
  if uses_budget_schedule(cfg):
    warmup = cfg.optimizer.warmup_steps if cfg.optimizer.schedule == "warmup_cosine" else 0
    parts.append(budget_schedule(cfg.train.steps, warmup))
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
  """``check(params, key, x, y, model_state=None, est_state=None) -> (cosine, ratio, ‖∇f‖,
  cosine per block)``.

  The estimate against ``jax.grad`` on the same batch: the cosine, the length ratio
  ‖ĝ‖/‖∇f‖ and the true gradient's norm ‖∇f‖ itself (with the ratio it tells whether
  late in training the step is mostly noise: ‖ĝ‖ staying put while ‖∇f‖ shrinks). With a ``model_state``, ``loss``
  is stateful; both gradients see the same state (the same dropout mask), so the check
  compares estimators, not masks. ``estimator_loss`` is what the estimator
  differentiates when it differs from ``loss`` (per-example losses for activity
  perturbation). A stateful estimator (``guided``) has no function form: its estimate
  comes from its optax transform at the run's current ``est_state``.
  """
  estimator = registry.get(cfg.name).value_and_grad
  options = estimator_options(cfg)
  est_loss = loss if estimator_loss is None else estimator_loss

  def check(params, key, x, y, model_state=None, est_state=None):
    stateful = model_state is not None
    args = (x, y) if not stateful else (x, y, model_state)
    if estimator is None:
      tx = registry.gradient_transform(cfg.name, key=key, has_aux=stateful, **options)
      kwargs = dict(x=x, y=y) if not stateful else dict(x=x, y=y, model_state=model_state)
      g, _ = tx.update(params, est_state, params, value_fn=est_loss, **kwargs)
    else:
      _, g = estimator(est_loss, has_aux=stateful, **options)(key, params, *args)
    true = jax.grad(loss, has_aux=stateful)(params, *args)
    true = true[0] if stateful else true
    per_block = {
      name: metrics.cosine_similarity(g_b, t_b) for name, (g_b, t_b) in _blocks(g, true).items()
    }
    return (
      metrics.cosine_similarity(g, true), metrics.norm_ratio(g, true), metrics.tree_norm(true),
      per_block,
    )  # fmt: skip

  return check


def _blocks(estimate: Any, true: Any) -> dict[str, tuple[Any, Any]]:
  """The two gradients split by the model's blocks: the first key of each parameter's
  path, with the index when it is a list (``blocks/0``, ``layers/1``, ``embed``), a
  block's local heads apart (``blocks/0/heads``).

  For a model with local losses the true gradient is the local one (of the marked
  total), so the cosine per block is the cosine to each block's local gradient.
  """

  def name(path) -> str:
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    head = [str(keys[0])] if keys else ["params"]
    if len(keys) > 1 and isinstance(keys[1], int):
      head.append(str(keys[1]))
    if any("head" in str(k) for k in keys[1:]):  # local heads: exact where after the sites
      head.append("heads")
    return "/".join(head)

  flat_g = jax.tree_util.tree_flatten_with_path(estimate)[0]
  flat_t = jax.tree.leaves(true)
  out: dict[str, tuple[list[Any], list[Any]]] = {}
  for (path, g), t in zip(flat_g, flat_t, strict=True):
    gs, ts = out.setdefault(name(path), ([], []))
    gs.append(g)
    ts.append(t)
  return {k: (v[0], v[1]) for k, v in out.items()} if len(out) > 1 else {}
