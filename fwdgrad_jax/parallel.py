"""Many devices: data parallelism and tangent parallelism with ``jax.sharding``.

Forward gradients parallelise along two axes (Flügel et al.'s outlook):

* **data** — the batch is split across devices; every device runs the primal and the
  jvps of its examples, and the loss (a mean over the batch) and its directional
  derivatives are combined across devices;
* **tangents** — the k tangents are split across devices; every device draws and runs
  its k / T share of the vmapped jvp, and the aggregation Σ_i c_i v_i (a contraction over
  the tangent axis) is summed across devices. The orthogonal aggregation's Gram matrix
  VᵀV couples every pair of tangents, so its k × k matrix is formed from all of them.

A :class:`jax.sharding.Mesh` with the axes ``("data", "tangents")`` holds both. Nothing
here writes communication by hand: the arrays carry :class:`~jax.sharding.NamedSharding`
annotations (the batch along ``"data"``, the tangent batch along ``"tangents"``, the
parameters replicated) and XLA's SPMD partitioner derives the per-device programs and
the all-reduces. Because the annotations only say *where* values live, never *what*
they are, a run on a 2 × 2 mesh computes the same tangents and the same estimate as on
one device, up to the order of floating-point sums (``tests/test_parallel.py``).

The tangents of the built-in samplers are hashes of a counter (or partitionable
threefry), so each device computes only the rows of its own share of the batch.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize`` (once,
before anything touches a device); on SLURM or a TPU pod it finds the coordinator
itself. Then ``jax.devices()`` lists every process's devices and a mesh spans hosts.

References:
  Flügel et al., 2024. Multi-Tangent Forward Gradients (outlook: tangent parallelism).
"""

from __future__ import annotations

import math
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
  """``tree`` placed on every device of ``mesh`` (outside ``jit``)."""
  return jax.device_put(tree, replicated(mesh))


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
) -> Callable[..., Any]:
  """``fun(params, *args, **kwargs)`` with its batch arguments split along ``"data"``.

  For a loss ``loss(params, x, y, ...)``: the arguments at positions ``batch_argnums``
  of ``args`` (after params) and the keywords ``batch_argnames`` are annotated as split
  along axis 0 before ``fun`` runs. The loss's mean over the batch then becomes a
  per-device partial sum and an all-reduce, and so do its directional derivatives
  (the jvp is linear in the loss); BatchNorm statistics are reduced the same way.
  """
  if axis_size(mesh, DATA) == 1:
    return fun

  def sharded(params, *args, **kwargs):
    args = tuple(shard_batch(a, mesh) if i in batch_argnums else a for i, a in enumerate(args))
    kwargs = {k: shard_batch(v, mesh) if k in batch_argnames else v for k, v in kwargs.items()}
    return fun(params, *args, **kwargs)

  return sharded


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
