"""What the Yao experiments share: the schemes compared, the problem, a plain-SGD run.

Yao, "Studies on Forward Mode Gradient Descent", compares backprop, the naive forward
gradient and three variance reductions (averaging k directions, the direction partition,
input-generated tangents) plus the guided ("momentum") forward mode. Each is one
:class:`fwdgrad_jax.training.config.EstimatorConfig` here, always with the RAW estimate
(``rescale=False``): the paper's learning rates are for it. The scripts
``experiments/yao/*.py`` build on :func:`sgd_run`, a ``lax.scan`` of plain SGD steps
(no lr schedule, as in the paper) that is jittable and vmappable over the learning rate
and the seed, so an lr grid × seeds runs as one compiled call.

Imports flax (through :mod:`fwdgrad_jax.models`): part of the app, not of the core.

References:
  Yao. Studies on Forward Mode Gradient Descent.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fwdgrad_jax import metrics, models, registry
from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import steps as steps_lib

__all__ = [
  "host_stepped",
  "SCHEMES",
  "Problem",
  "SgdCarry",
  "estimator_config",
  "make_problem",
  "make_transform",
  "sgd_init",
  "sgd_run",
  "sgd_step",
  "train_config",
]

#: The paper's schemes, label → estimator config (raw estimates: rescale=False).
SCHEMES: dict[str, config_lib.EstimatorConfig] = {
  "backprop": config_lib.EstimatorConfig(name="backprop"),
  "naive": config_lib.EstimatorConfig(name="forward", rescale=False),
  "average k=3": config_lib.EstimatorConfig(
    name="forward", num_tangents=3, aggregation="mean", rescale=False
  ),
  "partition k=3": config_lib.EstimatorConfig(
    name="forward", num_tangents=3, tangents="partition", aggregation="sum", rescale=False
  ),
  "input (QR)": config_lib.EstimatorConfig(name="forward", tangents="input", rescale=False),
  "input approx": config_lib.EstimatorConfig(
    name="forward", tangents="input_approx", rescale=False
  ),
  "guided": config_lib.EstimatorConfig(
    name="guided", fix_gap=10, decrease_gap=10, decay_rate=0.9, shuffle_ratio=0.5, rescale=False
  ),
}

#: The paper's models: the MLP 784-1024-1024-10 and the CNN (widths ours, fwdgrad_jax/models/yao.py).
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
  "mlp": {"hidden": (1024, 1024)},
  "yao_cnn": {"channels": (16, 32, 64), "hidden": 128},
}


def estimator_config(label: str, **changes: Any) -> config_lib.EstimatorConfig:
  """The config of scheme ``label`` (a key of :data:`SCHEMES`), with ``changes`` applied.

  Raises:
    ValueError: unknown label, listing the known ones.
  """
  if label not in SCHEMES:
    raise ValueError(f"unknown scheme {label!r}; known: {', '.join(SCHEMES)}")
  return dataclasses.replace(SCHEMES[label], **changes)


def make_transform(
  est: config_lib.EstimatorConfig, key: jax.Array
) -> Any:  # optax.GradientTransformationExtraArgs
  """The estimator transform of ``est`` (as the app builds it), without an optimizer."""
  return registry.gradient_transform(est.name, key=key, **steps_lib.estimator_options(est))


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["params", "x", "y"],
  meta_fields=["loss", "num_params"],
)
@dataclasses.dataclass(frozen=True)
class Problem:
  """A model's loss, initial parameters and the training data.

  A pytree whose leaves are the parameters and the data: pass it to a jitted function as an
  argument, so the training split is an input of the program, not a constant compiled into
  it (a 172 MB constant costs about a minute per compile on 2 cores).

  Attributes:
    loss: ``loss(params, x, y)``, mean cross-entropy (static).
    params: initial parameters (plain pytree).
    x, y: training images (N, H, W, C) and labels.
    num_params: parameter count (static).
  """

  loss: Callable[..., jax.Array]
  params: Any
  x: jax.Array
  y: jax.Array
  num_params: int


def make_problem(
  model: str, x: jax.Array, y: jax.Array, *, seed: int = 0, options: Mapping[str, Any] | None = None
) -> Problem:
  """Builds ``model`` (default options from :data:`MODEL_OPTIONS`) for the data ``x, y``."""
  opts = dict(MODEL_OPTIONS.get(model, {}) if options is None else options)
  net = models.create(model, input_shape=x.shape[1:], num_classes=10, rngs=nnx.Rngs(seed), **opts)
  graphdef, params, rest = models.split(net)
  params = jax.tree.map(jnp.asarray, params)
  return Problem(steps_lib.make_loss(graphdef, rest), params, x, y, models.count_params(params))


class SgdCarry(NamedTuple):
  """What one SGD step carries: parameters, estimator state, the batches' key."""

  params: Any
  state: Any
  data_key: jax.Array


def sgd_init(
  problem: Problem,
  est: config_lib.EstimatorConfig,
  *,
  seed: jax.Array | int,
  params: Any = None,
  state_changes: Mapping[str, Any] | None = None,
) -> SgdCarry:
  """The carry of :func:`sgd_step` at step 0 (see :func:`sgd_run` for the arguments)."""
  p0 = problem.params if params is None else params
  data_key, est_key = jax.random.split(jax.random.key(jnp.asarray(seed, jnp.uint32)))
  state = make_transform(est, est_key).init(p0)
  if state_changes:
    state = state._replace(
      **{k: jnp.asarray(v, jnp.result_type(getattr(state, k))) for k, v in state_changes.items()}
    )
  return SgdCarry(p0, state, data_key)


def sgd_step(
  problem: Problem,
  est: config_lib.EstimatorConfig,
  carry: SgdCarry,
  t: jax.Array | int,
  *,
  lr: jax.Array | float,
  batch_size: int,
  cosine: bool = False,
) -> tuple[SgdCarry, dict[str, jax.Array]]:
  """Step ``t``: θ ← θ − lr·ĝ on a batch drawn with ``fold_in(data_key, t)``."""
  # The transform's key lives in its state (from sgd_init); this one is never used.
  tx = make_transform(est, jax.random.key(0))
  p, s, data_key = carry
  n = problem.x.shape[0]
  idx = jax.random.randint(jax.random.fold_in(data_key, t), (batch_size,), 0, n)
  xb, yb = problem.x[idx], problem.y[idx]
  g, s = tx.update(p, s, p, value_fn=problem.loss, x=xb, y=yb)
  out = {"loss": s.value}
  if cosine:
    out["cosine"] = metrics.cosine_similarity(g, jax.grad(problem.loss)(p, xb, yb))
  p = jax.tree.map(lambda a, b: a - lr * b, p, g)
  return SgdCarry(p, s, data_key), out


def true_grads_of(carry: SgdCarry) -> jax.Array:
  """The true gradients the estimator paid for (guided: its state's count; else 0)."""
  return getattr(carry.state, "true_grads", jnp.zeros((), jnp.int32))


def sgd_run(
  problem: Problem,
  est: config_lib.EstimatorConfig,
  *,
  lr: jax.Array | float,
  seed: jax.Array | int,
  steps: int,
  batch_size: int,
  params: Any = None,
  cosine: bool = False,
  state_changes: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
  """``steps`` plain SGD steps θ ← θ − lr·ĝ with the estimator ``est``; jittable, vmappable.

  One ``lax.scan``. The batches are drawn uniformly with replacement from ``problem.x``
  (keyed by ``seed``, the same for every estimator at one seed); the tangents' key is
  derived from ``seed`` too. Convolutional models on XLA:CPU run ~20× slower inside a
  loop (jax-ml/jax#12868): step them from the host with :func:`sgd_init` and a jitted
  :func:`sgd_step` instead.

  Args:
    problem: :func:`make_problem`'s model and data; an argument of the jitted caller
      (``in_axes=None`` under vmap), not a closure, or the data compile in as a constant.
    est: the estimator.
    lr: the learning rate (may be traced: vmap over a grid).
    seed: the seed of the batches and tangents (may be traced).
    steps: number of steps.
    batch_size: examples per step.
    params: start here instead of ``problem.params``.
    cosine: also record, every step, the cosine of the estimate to the true minibatch
      gradient (one extra ``jax.grad`` per step).
    state_changes: fields of the estimator's initial state to replace (may be traced),
      e.g. ``{"decay_rate": d}`` for the guided estimator, whose state carries its decay
      rate: a grid of decay rates then runs as one vmapped call (one compilation).

  Returns:
    ``loss`` (steps,): the minibatch loss before each step; ``cosine`` (steps,) if asked;
    ``true_grads``: the true gradients the estimator itself evaluated (guided only, else 0).
  """
  carry = sgd_init(problem, est, seed=seed, params=params, state_changes=state_changes)

  def body(carry, t):
    return sgd_step(problem, est, carry, t, lr=lr, batch_size=batch_size, cosine=cosine)

  carry, out = jax.lax.scan(body, carry, jnp.arange(steps))
  out["true_grads"] = true_grads_of(carry)
  return out


def summary_stats(values: np.ndarray) -> dict[str, float]:
  """mean, std, and the 5/50/95 % quantiles of a sample (NaNs dropped)."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if v.size == 0:
    return dict(
      mean=float("nan"), std=float("nan"), q05=float("nan"), q50=float("nan"), q95=float("nan")
    )
  q05, q50, q95 = np.quantile(v, [0.05, 0.5, 0.95])
  return dict(
    mean=float(v.mean()), std=float(v.std()), q05=float(q05), q50=float(q50), q95=float(q95)
  )


def train_config(
  model: str, est: config_lib.EstimatorConfig, *, lr: float = 1e-4, batch_size: int = 256
) -> config_lib.Config:
  """The app's config of one scheme (plain SGD at ``lr``), for the benchmark's lowering."""
  cfg = config_lib.Config(
    model=config_lib.ModelConfig(name=model, options=dict(MODEL_OPTIONS.get(model, {}))),
    estimator=est,
    optimizer=config_lib.OptimizerConfig(name="sgd", lr=lr),
    train=config_lib.TrainConfig(batch_size=batch_size),
  )
  return config_lib.validate(cfg)


def host_stepped(
  cfgs: Mapping[str, config_lib.Config], problem: Any, *, batch_size: int, steps: int
) -> tuple[dict[str, Callable[[], Any]], list[tuple[Any, float]]]:
  """CNN steps from the host, one compiled step per call, as the app's ``loop=host``.

  Convolutions inside an XLA:CPU loop run ~20x slower (jax-ml/jax#12868), so the app
  steps convolutional models from Python; so does this timer. The state advances from
  call to call (each timed call runs ``steps`` consecutive steps, so the guided method
  pays exactly one true gradient per call of 10 steps).

  Args:
    cfgs: name → training config (:func:`train_config`).
    problem: :func:`fwdgrad_jax.training.benchmark.make_problem`'s model and data (at
      least ``batch_size * steps`` examples).
    batch_size, steps: each call runs ``steps`` steps on consecutive batches.

  Returns:
    name → a function running one call (for :func:`fwdgrad_jax.training.records.time_interleaved`),
    and per name (compiled step, compile seconds).
  """
  b = batch_size
  batches = [(problem.x[i * b : (i + 1) * b], problem.y[i * b : (i + 1) * b]) for i in range(steps)]
  functions, exes = {}, []
  for name, cfg in cfgs.items():
    tx = steps_lib.make_tx(cfg, problem.est_key)
    # Copies: the step donates its state, and the key and params are shared with others.
    state = jax.tree.map(jax.numpy.copy, steps_lib.init_state(tx, problem.params))
    t0 = time.perf_counter()
    exe = (
      jax.jit(steps_lib.make_step_fn(problem.loss, tx), donate_argnums=0)
      .lower(state, *batches[0])
      .compile()
    )
    exes.append((exe, time.perf_counter() - t0))
    box = {"state": state}

    def calls(exe=exe, box=box):
      st = box["state"]
      for xb, yb in batches:
        st = exe(st, xb, yb)
      box["state"] = st
      return st.params

    functions[name] = calls
  return functions, exes
