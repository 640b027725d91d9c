"""Runtime and memory of forward-gradient vs backprop train steps (Baydin et al. §5.2).

For one model, input shape and batch size, :func:`benchmark` builds the jitted
functions the training loop runs and times them against each other:

* ``base``: forward pass + loss, no derivative, no update (Baydin's base runtime);
* ``backprop``: one ``jax.grad`` train step (estimate + SGD update applied to params);
* ``forward k=K agg``: one forward-gradient train step for every number of tangents K
  and aggregation ``agg``.

A "train step" is exactly what :func:`fwdgrad_jax.train.train` runs per step: the
estimator transform of :func:`fwdgrad_jax.train.make_tx` followed by optax SGD and
``optax.apply_updates``, inside the chunked ``fori_loop`` of
:func:`fwdgrad_jax.train.make_chunk_fn` (on-device batching from a permutation of the
data, which is passed as an argument, never closed over). The base time comes from
:func:`fwdgrad_jax.train.make_base_fn`, batched the same way, so R = step / base
compares like with like and matches the ``runtime_ratio`` a training run reports.

Timing: every variant is compiled ahead of time and called once untimed; then, in each
of ``rounds`` rounds, every variant is called once in a shuffled order (fixed seed),
each call blocked on. One call runs ``steps`` train steps on device, so dispatch and
host sync are paid once per ``steps`` steps; the per-step time is the call's time / steps.
Interleaving means background load on a shared machine hits all variants alike; the
medians and the per-round paired ratios are what to read.

Memory: from XLA's compiled memory analysis of ONE train step (``jax.jit(step,
donate_argnums=0).lower(...).compile().memory_analysis()``, state donated as in the
training loop): temp, argument, output and alias bytes, and peak = argument + output +
temp − alias (the temp arena is already packed by liveness; XLA's own
``peak_memory_in_bytes`` is kept as ``xla_peak`` but leaves temp out on CPU). On backends whose device reports ``peak_bytes_in_use`` (GPU),
that is recorded too; it is a process-wide high-water mark, so it only grows from one
variant to the next (see :func:`benchmark`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fwdgrad_jax import config as config_lib
from fwdgrad_jax import models
from fwdgrad_jax import train as train_lib

__all__ = [
  "DEFAULT_AGGREGATIONS",
  "DEFAULT_TANGENTS",
  "Variant",
  "benchmark",
  "code_revision",
  "default_input_shape",
  "device_peak_bytes",
  "hardware_info",
  "make_variants",
  "memory_of",
  "render_markdown",
]

DEFAULT_TANGENTS: tuple[int, ...] = (1, 2, 4, 16)
DEFAULT_AGGREGATIONS: tuple[str, ...] = ("mean", "sum", "orthogonal")

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
  """

  name: str
  kind: str
  num_tangents: int | None = None
  aggregation: str | None = None


def make_variants(
  tangents: Sequence[int] = DEFAULT_TANGENTS,
  aggregations: Sequence[str] = DEFAULT_AGGREGATIONS,
  *,
  backprop: bool = True,
) -> list[Variant]:
  """``base``, ``backprop`` (optional) and ``forward k=K agg`` for every K × agg.

  Args:
    tangents: the numbers of tangents k (forward variants).
    aggregations: the aggregations (forward variants).
    backprop: include the backprop step.

  Returns:
    The variants, base first; aggregations vary slowest, so each block of k shares one.
  """
  out = [Variant("base", "base")]
  if backprop:
    out.append(Variant("backprop", "backprop"))
  for agg in aggregations:
    for k in tangents:
      out.append(Variant(f"forward k={int(k)} {agg}", "forward", int(k), agg))
  return out


def default_input_shape(model: str) -> tuple[int, int, int]:
  """(H, W, C) of the data set a model is used with: 32×32×3 for ``vgg``, else 28×28×1."""
  return _INPUT_SHAPES.get(model, _MNIST_SHAPE)


def _cpu_model() -> str | None:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def code_revision() -> str | None:
  """``git describe``-style revision of this checkout (``+dirty`` if the library has edits).

  The estimators and tangent samplers change under active development; a result without
  the revision it was measured at cannot be compared with a later one. None outside git.
  """
  root = Path(__file__).resolve().parent
  try:
    head = subprocess.run(
      ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
      capture_output=True,
      text=True,
      timeout=10,
      check=True,
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "."],
      capture_output=True,
      text=True,
      timeout=10,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return head + ("+dirty" if dirty else "")


def hardware_info() -> dict[str, Any]:
  """Platform, device kind, CPU model and core counts, jax/jaxlib versions.

  Returns:
    A JSON-able dict. ``device_kind`` is just ``"cpu"`` on the CPU backend, hence the
    CPU model from ``/proc/cpuinfo``; ``usable_cores`` is the scheduler affinity (what
    XLA's thread pool can actually use), ``logical_cores`` the machine's count.
  """
  dev = jax.devices()[0]
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    usable = os.cpu_count()
  import jaxlib

  return {
    "platform": dev.platform,
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "cpu_model": _cpu_model(),
    "logical_cores": os.cpu_count(),
    "usable_cores": usable,
    "jax_version": jax.__version__,
    "jaxlib_version": getattr(jaxlib, "__version__", None),
    "python": platform.python_version(),
  }


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
# Building the functions
# --------------------------------------------------------------------------------------


class _Lowered(NamedTuple):
  """A variant lowered, not yet compiled: one step (memory), the timed loop, its args."""

  step: jax.stages.Lowered
  loop: jax.stages.Lowered | None
  args: Callable[[], tuple] | None


def _config(model: str, options: dict[str, Any], variant: Variant, lr: float, scheme: str):
  est = config_lib.EstimatorConfig(name="backprop")
  if variant.kind == "forward":
    est = config_lib.EstimatorConfig(
      name="forward",
      num_tangents=variant.num_tangents,
      tangents=scheme,
      aggregation=variant.aggregation,
    )
  cfg = config_lib.Config(
    model=config_lib.ModelConfig(name=model, options=dict(options)),
    estimator=est,
    optimizer=config_lib.OptimizerConfig(name="sgd", lr=lr),
  )
  return config_lib.validate(cfg)


def _fresh(tree: Any) -> Any:
  # The timed train steps donate their state, as in the training loop; each call gets a
  # copy, so every call does the same work from the same parameters (no drift).
  return jax.block_until_ready(jax.tree.map(jnp.copy, tree))


def _lower(
  variant: Variant,
  *,
  loss: Callable[..., jax.Array],
  params: Any,
  cfg: config_lib.Config | None,
  keys: tuple[jax.Array, jax.Array],
  data: tuple[jax.Array, jax.Array],
  batch_size: int,
  steps: int,
  timed: bool,
) -> _Lowered:
  data_key, est_key = keys
  x, y = data
  xb, yb = x[:batch_size], y[:batch_size]
  common = dict(batch_size=batch_size, num_examples=int(x.shape[0]), chunk=steps, data_key=data_key)
  if variant.kind == "base":
    step = jax.jit(loss).lower(params, xb, yb)
    if not timed:
      return _Lowered(step, None, None)
    step0 = jnp.zeros((), jnp.int32)
    loop = jax.jit(train_lib.make_base_fn(loss, **common)).lower(params, step0, x, y)
    return _Lowered(step, loop, lambda: (params, step0, x, y))

  tx = train_lib.make_tx(cfg, est_key)
  state = train_lib.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
  step = jax.jit(train_lib.make_step_fn(loss, tx), donate_argnums=0).lower(state, xb, yb)
  if not timed:
    return _Lowered(step, None, None)
  n = jnp.int32(steps)
  loop = jax.jit(train_lib.make_chunk_fn(loss, tx, **common), donate_argnums=0).lower(
    state, n, x, y
  )
  return _Lowered(step, loop, lambda: (_fresh(state), n, x, y))


def _compile_all(lowered: list[jax.stages.Lowered]) -> list[tuple[Any, float]]:
  """Compiles in a thread pool: XLA compiles outside the GIL, and compiling is the slow part.

  Returns:
    (executable, seconds) per input, in order; the seconds are each compile's wall time,
    inflated when compiles share the cores.
  """

  def one(low):
    t0 = time.perf_counter()
    exe = low.compile()
    return exe, time.perf_counter() - t0

  workers = max(1, min(len(lowered), hardware_info()["usable_cores"] or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(one, lowered))


def _call(run: Any, args: Callable[[], tuple]) -> float:
  call_args = args()  # outside the timer: copying the donated state is not a step
  t0 = time.perf_counter()
  jax.block_until_ready(run(*call_args))
  return time.perf_counter() - t0


def _quantiles(x: Sequence[float]) -> dict[str, float]:
  q25, q50, q75 = np.percentile(np.asarray(x, np.float64), [25, 50, 75])
  return {"median": float(q50), "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25)}


def _ratio(a: float | None, b: float | None) -> float | None:
  if a is None or b is None or b == 0:
    return None
  return a / b


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
  rounds: int = 20,
  steps: int = 10,
  lr: float = 1e-4,
  seed: int = 0,
  timed: bool = True,
  log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Times and measures the memory of base, backprop and forward-gradient train steps.

  Args:
    model: a name in :data:`fwdgrad_jax.models.MODELS`.
    model_options: the model's constructor options (e.g. ``{"hidden": [1024, 1024]}``).
    input_shape: (H, W, C) of one example; :func:`default_input_shape` if None.
    num_classes: logits per example (random integer labels below this).
    batch_size: examples per step.
    tangents: numbers of tangents k of the forward variants.
    aggregations: aggregations of the forward variants.
    tangent_scheme: tangent sampler of the forward variants (``normal``, ...).
    backprop: include the backprop train step.
    rounds: timed rounds; each calls every variant once, in a shuffled order.
    steps: train steps (or base evaluations) per timed call, in one on-device loop.
    lr: SGD learning rate (the update is applied, so its value does not matter).
    seed: seeds the parameters, data, tangents and the order of calls.
    timed: False compiles the one-step functions for their memory and times nothing
      (cheap; e.g. memory against batch size).
    log: called with progress lines (e.g. ``print``), or None for silence.

  Returns:
    A JSON-able dict: ``settings`` (everything above, the parameter count and the
    timing method), ``hardware`` (:func:`hardware_info`) and ``variants``, one record
    per variant in build order with ``name``, ``kind``, ``num_tangents``,
    ``aggregation``, ``compile_s`` (``step``, ``loop``), ``memory`` (:func:`memory_of` of one step),
    ``device_peak_bytes`` and, when timed, ``ms_per_step`` (median, q25, q75, iqr over
    rounds), ``times_ms`` (per round, per step), ``R`` (median / base median),
    ``R_paired`` (median over rounds of the same-round ratio to base),
    ``vs_backprop`` (median / backprop median, i.e. R_f / R_b) and ``vs_k1``
    (median / the median of k = 1 with the same aggregation).

    ``device_peak_bytes`` is the device's high-water mark right after the variant's
    first (untimed) call, variants run in build order; it never decreases, so only a
    rise from the previous variant is attributable to this one. None on CPU.
  """
  say = log or (lambda _: None)
  # Now, not at the end: the library may be edited while a long run is going.
  revision = code_revision()
  model_options = dict(model_options or {})
  shape = tuple(int(d) for d in (input_shape or default_input_shape(model)))
  variants = make_variants(tangents, aggregations, backprop=backprop)
  if rounds < 1 or steps < 1 or batch_size < 1:
    raise ValueError(
      f"rounds, steps and batch_size must be >= 1, got {rounds}, {steps}, {batch_size}"
    )

  net = models.create(
    model, input_shape=shape, num_classes=num_classes, rngs=nnx.Rngs(seed), **model_options
  )
  graphdef, params, rest = models.split(net)
  # A plain pytree copy: nnx.split hands out the module's own Variables (see models.split).
  params = jax.tree.map(jnp.asarray, params)
  loss = train_lib.make_loss(graphdef, rest)
  num_params = models.count_params(params)

  data_key, est_key = jax.random.split(jax.random.PRNGKey(seed))
  # `steps` distinct batches: each step of a timed loop reads a different one (a loop
  # over one fixed batch would let XLA hoist the base pass out of the loop). numpy, not
  # jax.random: an eager threefry draw of a 4-D shape takes seconds to compile on CPU.
  n = batch_size * steps if timed else batch_size
  data_rng = np.random.default_rng(seed)
  x = jnp.asarray(data_rng.standard_normal((n, *shape), dtype=np.float32))
  y = jnp.asarray(data_rng.integers(0, num_classes, (n,), dtype=np.int32))

  lowered: dict[str, _Lowered] = {}
  for v in variants:
    cfg = None if v.kind == "base" else _config(model, model_options, v, lr, tangent_scheme)
    lowered[v.name] = _lower(
      v,
      loss=loss,
      params=params,
      cfg=cfg,
      keys=(data_key, est_key),
      data=(x, y),
      batch_size=batch_size,
      steps=steps,
      timed=timed,
    )
  say(f"lowered {len(variants)} variants; compiling")
  t0 = time.perf_counter()
  jobs = [(v.name, "step", lowered[v.name].step) for v in variants]
  jobs += [(v.name, "loop", lowered[v.name].loop) for v in variants if timed]
  done = _compile_all([low for _, _, low in jobs])
  exe = {(name, role): e for (name, role, _), e in zip(jobs, done)}
  compile_wall = time.perf_counter() - t0
  say(f"compiled {len(jobs)} executables in {compile_wall:.1f} s")

  device_peak: dict[str, int | None] = {}
  times: dict[str, list[float]] = {v.name: [] for v in variants}
  if timed:
    for v in variants:
      # First touch (page faults, thread-pool start-up, allocator), then the device's
      # high-water mark so far.
      _call(exe[v.name, "loop"][0], lowered[v.name].args)
      device_peak[v.name] = device_peak_bytes()
    rng = np.random.default_rng(seed)
    names = [v.name for v in variants]
    for r in range(rounds):
      for i in rng.permutation(len(names)):
        name = names[i]
        times[name].append(_call(exe[name, "loop"][0], lowered[name].args) / steps * 1e3)
      say(f"round {r + 1}/{rounds}")
  else:
    device_peak = {v.name: device_peak_bytes() for v in variants}

  records = []
  for v in variants:
    rec: dict[str, Any] = {
      "name": v.name,
      "kind": v.kind,
      "num_tangents": v.num_tangents,
      "aggregation": v.aggregation,
      "compile_s": {
        role: exe[v.name, role][1] for role in ("step", "loop") if (v.name, role) in exe
      },
      "memory": memory_of(exe[v.name, "step"][0]),
      "device_peak_bytes": device_peak.get(v.name),
    }
    if timed:
      rec["ms_per_step"] = _quantiles(times[v.name])
      rec["times_ms"] = times[v.name]
    records.append(rec)
  if timed:
    _add_ratios(records, times)

  settings = {
    "model": model,
    "model_options": model_options,
    "input_shape": list(shape),
    "num_classes": num_classes,
    "batch_size": batch_size,
    "num_params": num_params,
    "dtype": "float32",
    "tangents": [int(k) for k in tangents],
    "aggregations": list(aggregations),
    "tangent_scheme": tangent_scheme,
    "prng_impl": str(jax.config.jax_default_prng_impl),
    "backprop": backprop,
    "optimizer": f"sgd(lr={lr:g})",
    "rounds": rounds if timed else 0,
    "steps_per_call": steps,
    "seed": seed,
    "code_revision": revision,
    "timed": timed,
    "compile_wall_s": compile_wall,
    "timing": (
      "AOT-compiled; one untimed call each; then per round every variant once in a "
      f"shuffled order (numpy seed {seed}), each call = {steps} steps in one on-device "
      "fori_loop (train.make_chunk_fn / make_base_fn, state donated, a fresh copy per "
      "call made outside the timer), blocked on; ms per step = call time / steps"
    )
    if timed
    else "not timed (memory only)",
    "memory": (
      "compiled memory_analysis() of one jitted step (state donated) or of one loss "
      "evaluation (base); peak = argument + output + temp - alias; xla_peak = XLA's "
      "peak_memory_in_bytes (excludes temp on CPU)"
    ),
  }
  return {"settings": settings, "hardware": hardware_info(), "variants": records}


def _add_ratios(records: list[dict[str, Any]], times: dict[str, list[float]]) -> None:
  med = {r["name"]: r["ms_per_step"]["median"] for r in records}
  base = med["base"]
  k1 = {r["aggregation"]: med[r["name"]] for r in records if r["num_tangents"] == 1}
  for r in records:
    m = med[r["name"]]
    r["R"] = _ratio(m, base)
    r["R_paired"] = float(np.median(np.asarray(times[r["name"]]) / np.asarray(times["base"])))
    r["vs_backprop"] = _ratio(m, med.get("backprop"))
    r["vs_k1"] = _ratio(m, k1.get(r["aggregation"])) if r["kind"] == "forward" else None


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
  return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _mib(x: int | None) -> str:
  return "–" if x is None else f"{x / _MIB:.1f}"


def render_markdown(result: dict[str, Any]) -> str:
  """A markdown table of :func:`benchmark`'s result, one row per variant, plus settings.

  Args:
    result: the dict returned by :func:`benchmark`.

  Returns:
    Markdown: a settings line, a hardware line and the table (times in ms per step,
    memory in MiB).
  """
  s, hw = result["settings"], result["hardware"]
  opts = ", ".join(f"{k}={v}" for k, v in s["model_options"].items()) or "defaults"
  lines = [
    f"**{s['model']}** ({opts}; {s['num_params']:,} params), input {tuple(s['input_shape'])}, "
    f"batch {s['batch_size']}, {s['tangent_scheme']} tangents, {s['optimizer']}; "
    f"{s['rounds']} interleaved rounds × {s['steps_per_call']} steps per call.",
    "",
    f"Hardware: {hw['platform']} ({hw['device_kind']}), {hw['cpu_model']}, "
    f"{hw['usable_cores']} usable of {hw['logical_cores']} logical cores; "
    f"jax {hw['jax_version']}; fwdgrad_jax {s.get('code_revision') or 'unknown revision'}.",
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
