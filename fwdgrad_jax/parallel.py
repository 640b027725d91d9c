"""Many devices: data parallelism and tangent parallelism with ``jax.sharding``.

Forward gradients parallelise along two axes (Flügel et al.'s outlook):

* **data** — the batch is split across devices; every device runs the primal and the
  jvps of its examples, and the loss (a mean over the batch) and its directional
  derivatives are combined across devices;
* **tangents** — the k tangents are split across devices; every device draws and runs
  its k / T share of the vmapped jvp, and the aggregation Σ_i c_i v_i (a contraction over
  the tangent axis) is summed across devices. The orthogonal aggregation's Gram matrix
  VᵀV couples every pair of tangents, so its k × k matrix is formed from all of them.

A :class:`jax.sharding.Mesh` with the axes ``("data", "tangents")`` holds both. With
stored tangents nothing here writes communication by hand: the arrays carry :class:`~jax.sharding.NamedSharding`
annotations (the batch along ``"data"``, the tangent batch along ``"tangents"``, the
parameters replicated) and XLA's SPMD partitioner derives the per-device programs and
the all-reduces. Because the annotations only say *where* values live, never *what*
they are, a run on a 2 × 2 mesh computes the same tangents and the same estimate as on
one device, up to the order of floating-point sums (``tests/test_parallel.py``).

The tangents of the built-in samplers are hashes of a counter (or partitionable
threefry), so each device computes only the rows of its own share of the batch.

**Communicating k numbers.** With tangents regenerated from the key (``regenerate=True``)
the estimator does not leave the partitioning to XLA: it runs under ``jax.shard_map``,
each device computes the directional derivatives d of its shard of the batch (and of its
share of the tangents), and only d crosses devices — a ``pmean`` of k numbers over
``"data"``, an ``all_gather`` of them over ``"tangents"``. Every device then forms the
same estimate Σ c_i v_i itself, redrawing all k tangents from the shared key (and, for
the orthogonal aggregation, their Gram matrix): no weight-sized gradient is reduced.
:func:`collective_bytes` reads what a compiled step sends from its HLO
(``experiments/benchmarks/communication.py`` measures it).

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize`` (once,
before anything touches a device); on SLURM or a TPU pod it finds the coordinator
itself. Then ``jax.devices()`` lists every process's devices and a mesh spans hosts.

References:
  Flügel et al., 2024. Multi-Tangent Forward Gradients (outlook: tangent parallelism).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

DATA = "data"
TANGENTS = "tangents"
AXES = (DATA, TANGENTS)

_distributed = False


def initialize_distributed(enabled: bool = True, **kwargs: Any) -> bool:
  """Calls ``jax.distributed.initialize(**kwargs)`` once when ``enabled``.

  Must run before any computation touches a device. Without arguments JAX reads the
  cluster from the environment (SLURM, Open MPI, Cloud TPU); pass
  ``coordinator_address``, ``num_processes`` and ``process_id`` elsewhere.

  Returns:
    Whether the distributed runtime is initialised (now or by an earlier call).
  """
  global _distributed
  if enabled and not _distributed:
    jax.distributed.initialize(**kwargs)
    _distributed = True
  return _distributed


def make_mesh(
  data: int = 1, tangents: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A ``(data, tangents)`` mesh over the first ``data × tangents`` devices.

  Args:
    data: devices along the batch axis.
    tangents: devices along the tangent axis.
    devices: the devices to use (default ``jax.devices()``, every process's).

  Returns:
    A :class:`jax.sharding.Mesh` with axis names ``("data", "tangents")``.

  Raises:
    ValueError: a count < 1, or more devices asked for than present (naming the key
      and how to get more CPU devices).
  """
  for name, n in ((DATA, data), (TANGENTS, tangents)):
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
      raise ValueError(f"mesh.{name}={n!r}: must be an integer >= 1 (devices along that axis)")
  devices = list(jax.devices() if devices is None else devices)
  need = data * tangents
  if need > len(devices):
    raise ValueError(
      f"mesh.data={data} × mesh.tangents={tangents} = {need} devices, but only "
      f"{len(devices)} are present ({devices[0].platform}). On a CPU, set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={need} before JAX starts."
    )
  grid = np.asarray(devices[:need], dtype=object).reshape(data, tangents)
  return Mesh(grid, AXES)


def is_trivial(mesh: Mesh | None) -> bool:
  """Whether ``mesh`` is absent or a single device (nothing to shard)."""
  return mesh is None or mesh.size == 1


def axis_size(mesh: Mesh | None, axis: str) -> int:
  """Devices along ``axis`` of ``mesh`` (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.shape[axis])


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, keys)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Axis 0 (the examples) split along ``"data"``."""
  return NamedSharding(mesh, PartitionSpec(DATA))


def tangent_sharding(mesh: Mesh) -> NamedSharding:
  """Axis 0 (the k tangents) split along ``"tangents"``."""
  return NamedSharding(mesh, PartitionSpec(TANGENTS))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """``tree`` placed on every device of ``mesh`` (outside ``jit``).

  With several processes each process gives its own copy (the same values: the same
  seed, the same data) to its own devices, without ``jax.device_put``'s check that the
  processes agree (a collective per leaf, which fails on NaN, e.g. a "no loss yet").
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree)


def check_divisible(
  mesh: Mesh | None, *, num_tangents: int | None = None, batch_size: int | None = None
) -> None:
  """Raises ValueError unless k and the batch split evenly over their mesh axes."""
  t, d = axis_size(mesh, TANGENTS), axis_size(mesh, DATA)
  if num_tangents is not None and num_tangents % t:
    raise ValueError(
      f"estimator.num_tangents={num_tangents}: must be a multiple of mesh.tangents={t} "
      "(each device runs an equal share of the tangents)"
    )
  if batch_size is not None and batch_size % d:
    raise ValueError(
      f"train.batch_size={batch_size}: must be a multiple of mesh.data={d} "
      "(each device gets an equal share of the batch)"
    )


def _constrain(tree: PyTree, sharding: NamedSharding) -> PyTree:
  def one(x):
    if not hasattr(x, "ndim") or x.ndim == 0:
      return x
    return jax.lax.with_sharding_constraint(x, sharding)

  return jax.tree.map(one, tree)


def shard_tangents(batch: PyTree, mesh: Mesh | None) -> PyTree:
  """Annotates a dense tangent batch (leaves ``(k, …)``) as split along ``"tangents"``.

  Inside ``jit``: the draw, the vmapped jvp and the aggregation's contraction over k are
  then partitioned by tangent; a no-op without a tangent axis.
  """
  if axis_size(mesh, TANGENTS) == 1:
    return batch
  return _constrain(batch, tangent_sharding(mesh))


def tangent_constraint(mesh: Mesh | None) -> Callable[[jax.Array, int], jax.Array] | None:
  """For :func:`fwdgrad_jax.tangents.draw`: splits a leaf's tangent axis (wherever the
  draw lays it out) along ``"tangents"``; None without a tangent axis."""
  if axis_size(mesh, TANGENTS) == 1:
    return None

  def constrain(v: jax.Array, axis: int) -> jax.Array:
    spec = [None] * v.ndim
    spec[axis] = TANGENTS
    return jax.lax.with_sharding_constraint(v, NamedSharding(mesh, PartitionSpec(*spec)))

  return constrain


def shard_batch(tree: PyTree, mesh: Mesh | None) -> PyTree:
  """Annotates arrays of examples (axis 0) as split along ``"data"`` (inside ``jit``)."""
  if axis_size(mesh, DATA) == 1:
    return tree
  return _constrain(tree, batch_sharding(mesh))


def data_parallel(
  fun: Callable[..., Any],
  mesh: Mesh | None,
  *,
  batch_argnums: Sequence[int] = (0, 1),
  batch_argnames: Sequence[str] = ("x", "y"),
  reduction: str = "mean",
) -> Callable[..., Any]:
  """``fun(params, *args, **kwargs)`` with its batch arguments split along ``"data"``.

  For a loss ``loss(params, x, y, ...)``: the arguments at positions ``batch_argnums``
  of ``args`` (after params) and the keywords ``batch_argnames`` are annotated as split
  along axis 0 before ``fun`` runs. The loss's mean over the batch then becomes a
  per-device partial sum and an all-reduce, and so do its directional derivatives
  (the jvp is linear in the loss); BatchNorm statistics are reduced the same way.

  The function returned carries a :class:`BatchArgs` (``batch_args``): the regenerated
  estimator (``regenerate=True``) runs ``fun`` per device on its shard instead and
  combines only the directional derivatives, by ``reduction``. There BatchNorm uses each
  device's statistics (its new running statistics are averaged), as in data parallelism
  without synchronised BatchNorm.

  Args:
    fun: the loss.
    mesh: the mesh (a no-op without a ``"data"`` axis of more than one device).
    batch_argnums: positions, after params, of the arguments split along axis 0.
    batch_argnames: keywords split along axis 0.
    reduction: ``"mean"`` (the default: the loss is a mean over the examples) or
      ``"sum"``: how the per-device values combine under ``shard_map``.

  Returns:
    The annotated loss, same signature.
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction={reduction!r}: use 'mean' or 'sum' (how fun reduces the batch)")
  if axis_size(mesh, DATA) == 1:
    return fun

  def sharded(params, *args, **kwargs):
    args = tuple(shard_batch(a, mesh) if i in batch_argnums else a for i, a in enumerate(args))
    kwargs = {k: shard_batch(v, mesh) if k in batch_argnames else v for k, v in kwargs.items()}
    return fun(params, *args, **kwargs)

  sharded.batch_args = BatchArgs(fun, mesh, tuple(batch_argnums), tuple(batch_argnames), reduction)
  return sharded


@dataclasses.dataclass(frozen=True)
class BatchArgs:
  """What :func:`data_parallel` marks on the loss it returns (its ``batch_args``).

  The regenerated estimator reads it to run ``fun`` itself on each device's shard under
  ``jax.shard_map`` (:func:`batch_args_of`).

  Attributes:
    fun: the loss, unwrapped.
    mesh: the mesh it was split over.
    argnums: positions (after params) of the arguments split along ``"data"``.
    argnames: keywords split along ``"data"``.
    reduction: ``"mean"`` or ``"sum"``: how ``fun`` reduces over the examples, so how the
      shards' values and directional derivatives combine (``pmean`` or ``psum``).
  """

  fun: Callable[..., Any]
  mesh: Mesh
  argnums: tuple[int, ...]
  argnames: tuple[str, ...]
  reduction: str = "mean"


def batch_args_of(fun: Callable[..., Any]) -> BatchArgs | None:
  """The :class:`BatchArgs` of a :func:`data_parallel` loss, None for any other function."""
  marked = getattr(fun, "batch_args", None)
  return marked if isinstance(marked, BatchArgs) else None


def shard_map_specs(
  args: tuple, kwargs: dict, marked: BatchArgs | None, mesh: Mesh
) -> tuple[tuple, dict]:
  """``jax.shard_map`` in_specs of ``(args, kwargs)``: the marked batch arguments split
  along ``"data"`` (axis 0), everything else replicated.

  Raises:
    ValueError: a batch argument whose leading axis does not split evenly over ``"data"``.
  """
  n = axis_size(mesh, DATA)

  def spec(tree, batched, name):
    def one(x):
      if not batched or jax.numpy.ndim(x) == 0:
        return PartitionSpec()
      if x.shape[0] % n:
        raise ValueError(
          f"{name}: {x.shape[0]} examples do not split evenly over mesh.data={n} devices"
        )
      return PartitionSpec(DATA)

    return jax.tree.map(one, tree)

  argnums = () if marked is None else marked.argnums
  argnames = () if marked is None else marked.argnames
  arg_specs = tuple(spec(a, i in argnums, f"argument {i}") for i, a in enumerate(args))
  kwarg_specs = {k: spec(v, k in argnames, k) for k, v in kwargs.items()}
  return arg_specs, kwarg_specs


def describe(mesh: Mesh | None) -> dict[str, Any]:
  """A JSON-ready description of ``mesh`` for summaries and benchmark records."""
  if mesh is None:
    return {"data": 1, "tangents": 1, "devices": 1}
  devices = mesh.devices.reshape(-1)
  return {
    "data": axis_size(mesh, DATA),
    "tangents": axis_size(mesh, TANGENTS),
    "devices": int(math.prod(mesh.devices.shape)),
    "platform": devices[0].platform,
    "processes": jax.process_count(),
  }


# --------------------------------------------------------------------------------------
# What a compiled step sends between devices
# --------------------------------------------------------------------------------------

#: Cross-device collectives of XLA's HLO (an async op counts once, at its ``-start``).
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_DTYPE_BYTES = {
  "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
  "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
  "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9a-z]*)?)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")


def _shape_bytes(shape: str) -> tuple[int, int]:
  """(bytes, largest array's elements) of an HLO shape string (an array or a tuple)."""
  total, largest = 0, 0
  for dtype, dims in _ARRAY.findall(shape):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
      continue  # token[] and the like
    total += int(n * size)
    largest = max(largest, n)
  return total, largest


def _operands(rest: str) -> list[str]:
  """The ``%names`` between an instruction's opening parenthesis and its closing one."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  return re.findall(r"%([\w.\-]+)", rest[:end])


def collective_bytes(hlo_text: str) -> dict[str, Any]:
  """The cross-device collectives of a compiled program and the bytes they send.

  Reads the text of ``jax.jit(f).lower(...).compile().as_text()``: every all-reduce,
  all-gather, reduce-scatter, collective-permute and all-to-all, with the size of its
  operands (shape × dtype, per device; for an all-gather the local shard, not the
  gathered result). Each op is counted once where it appears in the program text (an
  op inside a loop body once, not once per iteration).

  Args:
    hlo_text: the compiled HLO module's text.

  Returns:
    ``{"bytes": total, "count": ops, "largest": elements of the largest operand array,
    "ops": {kind: {"count", "bytes"}}}``.
  """
  shapes: dict[str, str] = {}
  found: list[tuple[str, str]] = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    shapes[name] = shape
    base = opcode.removesuffix("-start")
    if base in COLLECTIVES and not opcode.endswith("-done"):
      found.append((base, rest))
  ops: dict[str, dict[str, int]] = {}
  total = largest = 0
  for kind, rest in found:
    size = 0
    for operand in _operands(rest):
      b, n = _shape_bytes(shapes.get(operand, ""))
      size += b
      largest = max(largest, n)
    entry = ops.setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += size
    total += size
  return {"bytes": total, "count": len(found), "largest": largest, "ops": ops}
