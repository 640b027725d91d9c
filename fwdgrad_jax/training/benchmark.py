"""Runtime and memory of forward-gradient vs backprop steps (Baydin et al. §5.2).

For one model, input shape and batch size, :func:`benchmark` builds the jitted functions
a user or the training loop runs and times them against each other:

* ``base``: forward pass + loss, no derivative, no update (Baydin's base runtime);
* ``backprop``: ``jax.grad``;
* ``forward k=K agg``: forward gradients with K tangents aggregated by ``agg``.

Two ways to call them (``calls``):

* ``"loop"`` (default): what :func:`fwdgrad_jax.training.run.train` runs — the estimator
  transform of :func:`fwdgrad_jax.training.run.make_tx`, optax SGD and ``apply_updates``,
  ``steps`` of them per call inside the chunked ``fori_loop`` of
  :func:`fwdgrad_jax.training.run.make_chunk_fn` (on-device batching, state donated); the base
  is :func:`fwdgrad_jax.training.run.make_base_fn`, batched the same way, so R = step / base
  matches the ``runtime_ratio`` a training run reports.
* ``"single"``: the way a user calls the function transforms — one jitted
  ``value_and_forward_grad`` / ``jax.value_and_grad`` (or loss) call per step from
  Python on one batch, no optimizer; dispatch and the host round trip are in the time.

The pipeline is small named steps: :func:`make_problem` (model, loss, data) →
:func:`lower` one variant → :func:`compile_all` → :func:`time_variants` (the shared
interleaved timer, :func:`fwdgrad_jax.records.time_interleaved`) →
:func:`variant_record` and the ratios. :func:`time_configs` times arbitrary training
configs with the same pieces.

Memory: from XLA's compiled memory analysis of ONE step (:func:`memory_of`; in ``loop``
mode ``jax.jit(step, donate_argnums=0)``, state donated as in the training loop): temp,
argument, output and alias bytes, and peak = argument + output + temp − alias (XLA's own
``peak_memory_in_bytes`` is kept as ``xla_peak`` but leaves temp out on CPU). Where the
device reports ``peak_bytes_in_use`` (GPU) that is recorded too; it is a process-wide
high-water mark, so it only grows from one variant to the next.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fwdgrad_jax import models, parallel, registry
from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import records as records_lib
from fwdgrad_jax.training import run as run_lib
from fwdgrad_jax.training import steps as steps_lib

__all__ = [
  "CALLS",
  "DEFAULT_AGGREGATIONS",
  "DEFAULT_TANGENTS",
  "Lowered",
  "Problem",
  "Variant",
  "benchmark",
  "compile_all",
  "default_input_shape",
  "device_peak_bytes",
  "lower",
  "make_problem",
  "make_variants",
  "memory_of",
  "render_markdown",
  "time_configs",
  "time_variants",
  "variant_config",
  "variant_record",
]

DEFAULT_TANGENTS: tuple[int, ...] = (1, 2, 4, 16)
DEFAULT_AGGREGATIONS: tuple[str, ...] = ("mean", "sum", "orthogonal")
CALLS: tuple[str, ...] = ("loop", "single")

# Image shapes (H, W, C) the registered models are built for in this project.
_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {"vgg": (32, 32, 3)}
_MNIST_SHAPE = (28, 28, 1)
_MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Variant:
  """One timed function.

  Attributes:
    name: unique label, e.g. ``"base"``, ``"backprop"``, ``"forward k=4 mean"``.
    kind: ``"base"``, ``"backprop"`` or ``"forward"``.
    num_tangents: k (forward only).
    aggregation: ``mean``, ``sum`` or ``orthogonal`` (forward only).
    regenerate: tangents redrawn from the key where used, not stored (forward only).
  """

  name: str
  kind: str
  num_tangents: int | None = None
  aggregation: str | None = None
  regenerate: bool = False


def make_variants(
  tangents: Sequence[int] = DEFAULT_TANGENTS,
  aggregations: Sequence[str] = DEFAULT_AGGREGATIONS,
  *,
  backprop: bool = True,
  regenerate: Sequence[bool] = (False,),
) -> list[Variant]:
  """``base``, ``backprop`` (optional) and ``forward k=K agg`` for every K × agg.

  With ``True`` in ``regenerate``, also ``forward k=K agg regen`` (``regenerate=True``).

  Returns:
    The variants, base first; aggregations vary slowest, so each block of k shares one.
  """
  out = [Variant("base", "base")]
  if backprop:
    out.append(Variant("backprop", "backprop"))
  for agg in aggregations:
    for k in tangents:
      for regen in regenerate:
        name = f"forward k={int(k)} {agg}" + (" regen" if regen else "")
        out.append(Variant(name, "forward", int(k), agg, bool(regen)))
  return out


def default_input_shape(model: str) -> tuple[int, int, int]:
  """(H, W, C) of the data set a model is used with: 32×32×3 for ``vgg``, else 28×28×1."""
  return _INPUT_SHAPES.get(model, _MNIST_SHAPE)


def memory_of(compiled: Any) -> dict[str, int | None]:
  """The compiled memory analysis of an executable, in bytes.

  Args:
    compiled: a ``jax.stages.Compiled``.

  Returns:
    ``temp``, ``argument``, ``output``, ``alias``, ``generated_code``; ``peak`` =
    argument + output + temp − alias (arguments and outputs live throughout, the temp
    arena at its size, donated inputs that become outputs counted once); ``xla_peak``:
    XLA's own ``peak_memory_in_bytes`` where this jaxlib has it (else None). On XLA:CPU
    (jaxlib 0.10) ``xla_peak`` is argument + output − alias and leaves the temp arena
    out, so it cannot tell a forward step from a backprop step; ``peak`` is the figure
    to compare. All None if the backend gives no analysis.
  """
  stats = compiled.memory_analysis()
  keys = ("temp", "argument", "output", "alias", "generated_code", "peak", "xla_peak")
  if stats is None:
    return dict.fromkeys(keys)
  out = {
    k: int(getattr(stats, f"{k}_size_in_bytes"))
    for k in ("temp", "argument", "output", "alias", "generated_code")
  }
  xla_peak = getattr(stats, "peak_memory_in_bytes", None)
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  out["xla_peak"] = None if xla_peak is None else int(xla_peak)
  return out


def device_peak_bytes() -> int | None:
  """The device's own ``peak_bytes_in_use`` (GPU/TPU), or None where it is not exposed."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


# --------------------------------------------------------------------------------------
# Lowering
# --------------------------------------------------------------------------------------


class Problem(NamedTuple):
  """What every variant of one benchmark shares.

  Attributes:
    loss: ``loss(params, x, y)`` of the model.
    params: its parameters (a plain pytree).
    x, y: random inputs and labels, ``batch_size × steps`` examples, so each step of a
      timed loop reads a different batch (a loop over one fixed batch would let XLA
      hoist the base pass out of the loop).
    num_params: the parameter count.
    data_key, est_key: the keys of the on-device batching and of the estimators.
    losses: ``losses(params, x, y)``, the (batch,) vector (activity perturbation's
      per-example directional derivatives differentiate it).
  """

  loss: Callable[..., jax.Array]
  params: Any
  x: jax.Array
  y: jax.Array
  num_params: int
  data_key: jax.Array
  est_key: jax.Array
  losses: Callable[..., jax.Array] | None = None

  def estimated(self, cfg: config_lib.Config) -> Callable[..., jax.Array]:
    """The loss ``cfg``'s estimator differentiates (per-example for activity)."""
    return self.losses if steps_lib.per_example_losses(cfg.estimator) else self.loss


def make_problem(
  model: str,
  *,
  model_options: Mapping[str, Any],
  input_shape: Sequence[int],
  num_classes: int,
  examples: int,
  seed: int,
) -> Problem:
  """Builds the model, its loss and ``examples`` random examples (seeded by ``seed``)."""
  net = models.create(
    model,
    input_shape=tuple(input_shape),
    num_classes=num_classes,
    rngs=nnx.Rngs(seed),
    **model_options,
  )
  graphdef, params, rest = models.split(net)
  # A plain pytree copy: nnx.split hands out the module's own Variables (see models.split).
  params = jax.tree.map(jnp.asarray, params)
  data_key, est_key = jax.random.split(jax.random.PRNGKey(seed))
  # numpy, not jax.random: an eager threefry draw of a 4-D shape takes seconds to
  # compile on CPU.
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((examples, *input_shape), dtype=np.float32))
  y = jnp.asarray(rng.integers(0, num_classes, (examples,), dtype=np.int32))
  return Problem(
    steps_lib.make_loss(graphdef, rest),
    params,
    x,
    y,
    models.count_params(params),
    data_key,
    est_key,
    steps_lib.make_loss(graphdef, rest, per_example=True),
  )


def variant_config(
  model: str,
  model_options: Mapping[str, Any],
  variant: Variant,
  *,
  lr: float,
  tangent_scheme: str,
) -> config_lib.Config | None:
  """The training config of a variant (SGD at ``lr``); None for ``base``."""
  if variant.kind == "base":
    return None
  est = config_lib.EstimatorConfig(name="backprop")
  if variant.kind == "forward":
    est = config_lib.EstimatorConfig(
      name="forward",
      num_tangents=variant.num_tangents,
      tangents=tangent_scheme,
      aggregation=variant.aggregation,
      regenerate=variant.regenerate,
    )
  cfg = config_lib.Config(
    model=config_lib.ModelConfig(name=model, options=dict(model_options)),
    estimator=est,
    optimizer=config_lib.OptimizerConfig(name="sgd", lr=lr),
  )
  return config_lib.validate(cfg)


class Lowered(NamedTuple):
  """One variant lowered, not yet compiled.

  Attributes:
    step: one step (its compiled memory is the variant's memory).
    timed: what is timed (the chunked loop), or None: time ``step`` itself.
    args: returns the timed call's arguments (fresh copies of donated state).
    steps: steps one timed call runs.
  """

  step: jax.stages.Lowered
  timed: jax.stages.Lowered | None
  args: Callable[[], tuple]
  steps: int


def _fresh(tree: Any) -> Any:
  # The timed train steps donate their state, as in the training loop; each call gets a
  # copy, so every call does the same work from the same parameters (no drift).
  return jax.block_until_ready(jax.tree.map(jnp.copy, tree))


def _on_mesh(problem: Problem, mesh: Any) -> Problem:
  """The problem's parameters and data replicated over ``mesh``, its losses data-parallel."""
  if mesh is None:
    return problem
  params, x, y = parallel.replicate((problem.params, problem.x, problem.y), mesh)
  return problem._replace(
    params=params,
    x=x,
    y=y,
    loss=parallel.data_parallel(problem.loss, mesh),
    losses=parallel.data_parallel(problem.losses, mesh),
  )


def _lower_single(
  cfg: config_lib.Config | None, problem: Problem, batch_size: int, mesh: Any = None
) -> Lowered:
  p = _on_mesh(problem, mesh)
  xb, yb = p.x[:batch_size], p.y[:batch_size]
  if cfg is None:
    step = jax.jit(p.loss).lower(p.params, xb, yb)
    return Lowered(step, None, lambda: (p.params, xb, yb), 1)
  options = steps_lib.estimator_options(cfg.estimator)
  if mesh is not None and cfg.estimator.name == "forward":
    options["mesh"] = mesh
  estimate = registry.get_estimator(cfg.estimator.name)(p.estimated(cfg), **options)
  step = jax.jit(estimate).lower(p.est_key, p.params, xb, yb)
  return Lowered(step, None, lambda: (p.est_key, p.params, xb, yb), 1)


def _lower_loop(
  cfg: config_lib.Config | None,
  problem: Problem,
  batch_size: int,
  steps: int,
  timed: bool,
  mesh: Any = None,
) -> Lowered:
  p = _on_mesh(problem, mesh)
  xb, yb = p.x[:batch_size], p.y[:batch_size]
  common = dict(
    batch_size=batch_size, num_examples=int(p.x.shape[0]), chunk=steps, data_key=p.data_key
  )
  if cfg is None:
    step = jax.jit(p.loss).lower(p.params, xb, yb)
    step0 = jnp.zeros((), jnp.int32)
    loop = jax.jit(steps_lib.make_base_fn(p.loss, **common)).lower(p.params, step0, p.x, p.y)
    return Lowered(step, loop if timed else None, lambda: (p.params, step0, p.x, p.y), steps)
  tx = steps_lib.make_tx(cfg, p.est_key, mesh=mesh)
  state = steps_lib.init_state(tx, p.params)
  if mesh is not None:
    state = parallel.replicate(state, mesh)
  loss = p.estimated(cfg)
  step = jax.jit(steps_lib.make_step_fn(loss, tx), donate_argnums=0).lower(state, xb, yb)
  n = jnp.int32(steps)
  loop = jax.jit(steps_lib.make_chunk_fn(loss, tx, **common), donate_argnums=0).lower(
    state, n, p.x, p.y
  )
  return Lowered(step, loop if timed else None, lambda: (_fresh(state), n, p.x, p.y), steps)


def lower(
  cfg: config_lib.Config | None,
  problem: Problem,
  *,
  batch_size: int,
  steps: int,
  calls: str = "loop",
  timed: bool = True,
  mesh: Any = None,
) -> Lowered:
  """Lowers one variant: ``cfg`` is its training config, None for the base pass.

  Args:
    cfg: the estimator and optimizer to step with (``None``: forward + loss only).
    problem: :func:`make_problem`'s model, loss and data.
    batch_size: examples per step.
    steps: steps per timed call (``loop``; ``single`` runs one).
    calls: ``"loop"`` or ``"single"`` (see the module docstring).
    timed: False lowers only the one-step function (memory).
    mesh: a :func:`fwdgrad_jax.parallel.make_mesh` mesh: parameters and data
      replicated, each batch split along ``"data"``, the forward estimator's tangents
      along ``"tangents"`` (backprop and the base use the data axis only).

  Returns:
    The :class:`Lowered` functions.
  """
  if calls not in CALLS:
    raise ValueError(f"calls must be one of {CALLS}, got {calls!r}")
  if calls == "single":
    return _lower_single(cfg, problem, batch_size, mesh)
  return _lower_loop(cfg, problem, batch_size, steps, timed, mesh)


def compile_all(lowered: Sequence[jax.stages.Lowered]) -> list[tuple[Any, float]]:
  """Compiles in a thread pool: XLA compiles outside the GIL, and compiling is the slow part.

  Returns:
    (executable, seconds) per input, in order; the seconds are each compile's wall time,
    inflated when compiles share the cores.
  """

  def one(low):
    t0 = time.perf_counter()
    exe = low.compile()
    return exe, time.perf_counter() - t0

  cores = records_lib.hardware_info()["usable_cores"] or 1
  with concurrent.futures.ThreadPoolExecutor(max(1, min(len(lowered), cores))) as pool:
    return list(pool.map(one, lowered))


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def time_variants(
  functions: Mapping[str, Callable[..., Any]],
  args: Mapping[str, Callable[[], tuple]],
  *,
  rounds: int,
  steps: Mapping[str, int] | int,
  seed: int,
  log: Callable[[str], None] | None = None,
) -> tuple[dict[str, records_lib.Timing], dict[str, int | None]]:
  """Times compiled functions against each other with the shared interleaved timer.

  Each function is first called once, untimed, in the given order (first touch: page
  faults, thread pools, allocator), and the device's high-water mark read after it;
  then :func:`fwdgrad_jax.records.time_interleaved` runs the rounds.

  Returns:
    ``(timings in seconds per step, device peak bytes after each first call)``.
  """
  peaks = {}
  for name, fn in functions.items():
    jax.block_until_ready(fn(*args[name]()))
    peaks[name] = device_peak_bytes()
  say = log or (lambda _: None)
  timings = records_lib.time_interleaved(
    functions,
    rounds=rounds,
    args=args,
    steps=steps,
    warmup=0,
    seed=seed,
    on_round=lambda r: say(f"round {r + 1}/{rounds}"),
  )
  return timings, peaks


def time_configs(
  configs: Mapping[str, config_lib.Config],
  *,
  input_shape: Sequence[int],
  num_classes: int = 10,
  rounds: int = 3,
  steps: int = 10,
  seed: int = 0,
) -> dict[str, records_lib.Timing]:
  """Seconds per training-loop step of each config, interleaved (e.g. to size a budget).

  Every config must use the same model and batch size (they share one problem).

  Returns:
    name → :class:`fwdgrad_jax.records.Timing` in seconds per step.
  """
  first = next(iter(configs.values()))
  batch = first.train.batch_size
  if any(c.model != first.model or c.train.batch_size != batch for c in configs.values()):
    raise ValueError("time_configs: every config must share the model and the batch size")
  problem = make_problem(
    first.model.name,
    model_options=first.model.options,
    input_shape=input_shape,
    num_classes=num_classes,
    examples=batch * steps,
    seed=seed,
  )
  lowered = {n: lower(c, problem, batch_size=batch, steps=steps) for n, c in configs.items()}
  exes = compile_all([low.timed for low in lowered.values()])
  functions = {n: exe for n, (exe, _) in zip(lowered, exes)}
  args = {n: low.args for n, low in lowered.items()}
  timings, _ = time_variants(functions, args, rounds=rounds, steps=steps, seed=seed)
  return timings


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
  if a is None or b is None or b == 0:
    return None
  return a / b


def variant_record(
  variant: Variant,
  *,
  compile_s: Mapping[str, float],
  memory: Mapping[str, int | None],
  device_peak: int | None,
  timing: records_lib.Timing | None,
) -> dict[str, Any]:
  """One variant's JSON record (times in ms per step); ratios are added by :func:`_add_ratios`."""
  rec: dict[str, Any] = {
    "name": variant.name,
    "kind": variant.kind,
    "num_tangents": variant.num_tangents,
    "aggregation": variant.aggregation,
    "compile_s": dict(compile_s),
    "memory": dict(memory),
    "device_peak_bytes": device_peak,
  }
  if timing is not None:
    ms = timing.as_dict(1e3)
    rec["ms_per_step"] = {k: ms[k] for k in ("median", "q25", "q75", "iqr")}
    rec["times_ms"] = ms["times"]
  return rec


def _add_ratios(records: list[dict[str, Any]]) -> None:
  # Rounds are paired: round r called every variant once, so times_ms[r] of two
  # variants saw the same background load.
  med = {r["name"]: r["ms_per_step"]["median"] for r in records}
  times = {r["name"]: np.asarray(r["times_ms"]) for r in records}
  k1 = {r["aggregation"]: med[r["name"]] for r in records if r["num_tangents"] == 1}
  for r in records:
    m = med[r["name"]]
    r["R"] = _ratio(m, med["base"])
    r["R_paired"] = float(np.median(times[r["name"]] / times["base"]))
    r["vs_backprop"] = _ratio(m, med.get("backprop"))
    r["vs_k1"] = _ratio(m, k1.get(r["aggregation"])) if r["kind"] == "forward" else None


def _timing_text(calls: str, steps: int, seed: int) -> str:
  if calls == "single":
    return (
      "AOT-compiled; one untimed call each; then per round every variant once in a "
      f"shuffled order (numpy seed {seed}), each call = one jitted estimator call "
      "(value_and_forward_grad / jax.value_and_grad / loss) from Python on one batch, "
      "blocked on (records_lib.time_interleaved)"
    )
  return (
    "AOT-compiled; one untimed call each; then per round every variant once in a "
    f"shuffled order (numpy seed {seed}), each call = {steps} steps in one on-device "
    "fori_loop (train.make_chunk_fn / make_base_fn, state donated, a fresh copy per "
    "call made outside the timer), blocked on; ms per step = call time / steps "
    "(records_lib.time_interleaved)"
  )


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------


def benchmark(
  model: str = "mlp",
  *,
  model_options: dict[str, Any] | None = None,
  input_shape: Sequence[int] | None = None,
  num_classes: int = 10,
  batch_size: int = 64,
  tangents: Sequence[int] = DEFAULT_TANGENTS,
  aggregations: Sequence[str] = DEFAULT_AGGREGATIONS,
  tangent_scheme: str = "normal",
  backprop: bool = True,
  regenerate: Sequence[bool] = (False,),
  calls: str = "loop",
  rounds: int = 20,
  steps: int = 10,
  lr: float = 1e-4,
  seed: int = 0,
  timed: bool = True,
  log: Callable[[str], None] | None = None,
  mesh: Sequence[int] = (1, 1),
) -> dict[str, Any]:
  """Times and measures the memory of base, backprop and forward-gradient steps.

  Args:
    model: a name in :data:`fwdgrad_jax.models.MODELS`.
    model_options: the model's constructor options (e.g. ``{"hidden": [1024, 1024]}``).
    input_shape: (H, W, C) of one example; :func:`default_input_shape` if None.
    num_classes: logits per example (random integer labels below this).
    batch_size: examples per step.
    tangents: numbers of tangents k of the forward variants.
    aggregations: aggregations of the forward variants.
    tangent_scheme: tangent sampler of the forward variants (``normal``, ...).
    backprop: include the backprop variant.
    regenerate: forward variants with stored (False) and/or regenerated (True) tangents.
    calls: ``"loop"`` (training-loop chunks) or ``"single"`` (one jitted estimator call
      per step from Python); see the module docstring.
    rounds: timed rounds; each calls every variant once, in a shuffled order.
    steps: train steps (or base evaluations) per timed call in ``loop`` mode.
    lr: SGD learning rate (the update is applied, so its value does not matter).
    seed: seeds the parameters, data, tangents and the order of calls.
    timed: False compiles the one-step functions for their memory and times nothing
      (cheap; e.g. memory against batch size).
    log: called with progress lines (e.g. ``print``), or None for silence.
    mesh: ``(data, tangents)`` device counts (:mod:`fwdgrad_jax.parallel`): the batch
      split over ``data`` devices, the forward variants' tangents over ``tangents``
      (every k a multiple of it); backprop and the base use the data axis only.

  Returns:
    A JSON-able dict: ``settings`` (everything above, the parameter count and the
    timing method) and ``variants``, one record per variant in build order with
    ``name``, ``kind``, ``num_tangents``, ``aggregation``, ``compile_s`` (``step``,
    ``loop``), ``memory`` (:func:`memory_of` of one step), ``device_peak_bytes`` and,
    when timed, ``ms_per_step`` (median, q25, q75, iqr over rounds), ``times_ms`` (per
    round, per step), ``R`` (median / base median), ``R_paired`` (median over rounds of
    the same-round ratio to base), ``vs_backprop`` (median / backprop median, i.e.
    R_f / R_b) and ``vs_k1`` (median / the median of k = 1 with the same aggregation).
    Hardware and code revision belong in the result file's provenance
    (:func:`fwdgrad_jax.records.write_json`).

  Raises:
    ValueError: ``rounds``, ``steps`` or ``batch_size`` < 1, or an unknown ``calls``.
  """
  say = log or (lambda _: None)
  if rounds < 1 or steps < 1 or batch_size < 1:
    raise ValueError(
      f"rounds, steps and batch_size must be >= 1, got {rounds}, {steps}, {batch_size}"
    )
  if calls not in CALLS:
    raise ValueError(f"calls must be one of {CALLS}, got {calls!r}")
  steps = steps if calls == "loop" else 1
  model_options = dict(model_options or {})
  shape = tuple(int(d) for d in (input_shape or default_input_shape(model)))
  variants = make_variants(tangents, aggregations, backprop=backprop, regenerate=regenerate)
  mesh_cfg = config_lib.MeshConfig(*(int(n) for n in mesh))
  device_mesh = run_lib.make_run_mesh(mesh_cfg)
  parallel.check_divisible(device_mesh, batch_size=batch_size)
  for k in tangents:
    parallel.check_divisible(device_mesh, num_tangents=int(k))
  problem = make_problem(
    model,
    model_options=model_options,
    input_shape=shape,
    num_classes=num_classes,
    examples=batch_size * steps if timed else batch_size,
    seed=seed,
  )
  lowered = {
    v.name: lower(
      variant_config(model, model_options, v, lr=lr, tangent_scheme=tangent_scheme),
      problem,
      batch_size=batch_size,
      steps=steps,
      calls=calls,
      timed=timed,
      mesh=device_mesh,
    )
    for v in variants
  }
  say(f"lowered {len(variants)} variants; compiling")
  t0 = time.perf_counter()
  jobs = [(name, "step", low.step) for name, low in lowered.items()]
  jobs += [(name, "loop", low.timed) for name, low in lowered.items() if low.timed is not None]
  done = compile_all([low for _, _, low in jobs])
  exe = {(name, role): e for (name, role, _), e in zip(jobs, done)}
  compile_wall = time.perf_counter() - t0
  say(f"compiled {len(jobs)} executables in {compile_wall:.1f} s")

  timings: dict[str, records_lib.Timing] = {}
  if timed:
    functions = {n: exe.get((n, "loop"), exe[n, "step"])[0] for n in lowered}
    args = {n: low.args for n, low in lowered.items()}
    timings, peaks = time_variants(functions, args, rounds=rounds, steps=steps, seed=seed, log=say)
  else:
    peaks = {v.name: device_peak_bytes() for v in variants}

  records = [
    variant_record(
      v,
      compile_s={role: exe[v.name, role][1] for role in ("step", "loop") if (v.name, role) in exe},
      memory=memory_of(exe[v.name, "step"][0]),
      device_peak=peaks.get(v.name),
      timing=timings.get(v.name),
    )
    for v in variants
  ]
  if timed:
    _add_ratios(records)
  settings = {
    "model": model,
    "model_options": model_options,
    "input_shape": list(shape),
    "num_classes": num_classes,
    "batch_size": batch_size,
    "num_params": problem.num_params,
    "dtype": "float32",
    "tangents": [int(k) for k in tangents],
    "aggregations": list(aggregations),
    "tangent_scheme": tangent_scheme,
    "prng_impl": str(jax.config.jax_default_prng_impl),
    "backprop": backprop,
    "regenerate": list(regenerate),
    "mesh": parallel.describe(device_mesh),
    "calls": calls,
    "optimizer": f"sgd(lr={lr:g})" if calls == "loop" else None,
    "rounds": rounds if timed else 0,
    "steps_per_call": steps,
    "seed": seed,
    "timed": timed,
    "compile_wall_s": compile_wall,
    "timing": _timing_text(calls, steps, seed) if timed else "not timed (memory only)",
    "memory": (
      "compiled memory_analysis() of one jitted step (state donated) or of one loss "
      "evaluation (base); peak = argument + output + temp - alias; xla_peak = XLA's "
      "peak_memory_in_bytes (excludes temp on CPU)"
    ),
  }
  return {"settings": settings, "variants": records}


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
  return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _mib(x: int | None) -> str:
  return "–" if x is None else f"{x / _MIB:.1f}"


def render_markdown(result: Mapping[str, Any]) -> str:
  """A markdown table of :func:`benchmark`'s result, one row per variant, plus settings.

  Args:
    result: the dict returned by :func:`benchmark`, with its ``provenance`` once written.

  Returns:
    Markdown: a settings line, a hardware line and the table (times in ms per step,
    memory in MiB).
  """
  s = result["settings"]
  opts = ", ".join(f"{k}={v}" for k, v in s["model_options"].items()) or "defaults"
  how = (
    f"{s['rounds']} interleaved rounds × {s['steps_per_call']} steps per call"
    if s.get("calls", "loop") == "loop"
    else f"{s['rounds']} interleaved rounds of single jitted calls from Python"
  )
  step = s["optimizer"] or "estimator only (no update)"
  mesh = s.get("mesh") or {"devices": 1}
  if mesh["devices"] > 1:
    how += f" Mesh: data {mesh['data']} × tangents {mesh['tangents']} ({mesh['devices']} devices)."
  lines = [
    f"**{s['model']}** ({opts}; {s['num_params']:,} params), input {tuple(s['input_shape'])}, "
    f"batch {s['batch_size']}, {s['tangent_scheme']} tangents, {step}; {how}.",
    "",
    records_lib.hardware_line(result.get("provenance")),
    "",
  ]
  timed = s["timed"]
  head = ["variant", "k", "aggregation"]
  if timed:
    head += ["median ms", "IQR ms", "R = t/base", "× backprop", "× k=1"]
  head += ["temp MiB", "peak MiB", "device peak MiB"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in result["variants"]:
    row = [r["name"], _fmt(r["num_tangents"], "d"), r["aggregation"] or "–"]
    if timed:
      t = r["ms_per_step"]
      row += [
        f"{t['median']:.3f}",
        f"{t['iqr']:.3f}",
        _fmt(r["R"], ".3f"),
        _fmt(r["vs_backprop"], ".3f"),
        _fmt(r["vs_k1"], ".2f"),
      ]
    m = r["memory"]
    row += [_mib(m["temp"]), _mib(m["peak"]), _mib(r["device_peak_bytes"])]
    lines.append("| " + " | ".join(row) + " |")
  lines += [
    "",
    "R = median step time / median base time (base = forward pass + loss); "
    "× backprop = R_f / R_b; × k=1 = cost of k tangents relative to one, same aggregation. "
    "Memory: compiled memory analysis of one step (state donated); "
    "peak = argument + output + temp − alias; "
    "device peak = the device's high-water mark (GPU only; cumulative over variants).",
  ]
  return "\n".join(lines) + "\n"
