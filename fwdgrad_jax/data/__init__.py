"""Image-classification data sets (MNIST, Fashion-MNIST, CIFAR-10) as device arrays.

Every split is read from tensorflow-datasets (tfds) once, as whole numpy arrays, and
placed on the default JAX device; training code then only slices device arrays and
never runs TensorFlow. The load path is the one of flax's examples — a prepared tfds
builder, each split read as one batch::

    builder = tfds_offline.prepared_builder(name, data_dir, manual_dir, download)
    images, labels = tfds_offline.read_split(builder, "train", data_dir)

:mod:`fwdgrad_jax.tfds_offline` holds what makes that work offline: Fashion-MNIST
prepared from Debian's ``dataset-fashion-mnist`` (or any directory holding its four
IDX ``.gz`` files, ``$FWDGRAD_FASHION_MNIST_DIR``), downloads only after a quick
connectivity probe, and a cache of the decoded arrays. A data set that is neither
prepared nor preparable raises :class:`DatasetUnavailableError` at once.

Command line::

    python -m fwdgrad_jax.data prepare NAME [--data-dir DIR] [--manual-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad_jax.data import tfds_offline
from fwdgrad_jax.data.tfds_offline import (
  DEBIAN_FASHION_MNIST_DIR,
  FASHION_MNIST_DIR_ENV,
  DatasetUnavailableError,
)

__all__ = [
  "DATA_DIR_ENV",
  "DEBIAN_FASHION_MNIST_DIR",
  "FASHION_MNIST_DIR_ENV",
  "SUPPORTED",
  "Dataset",
  "DatasetUnavailableError",
  "default_data_dir",
  "input_shape",
  "is_prepared",
  "load",
  "main",
  "num_classes",
  "prepare",
]

DATA_DIR_ENV = "TFDS_DATA_DIR"

# name -> (image shape (H, W, C), number of classes): known without importing tfds.
_SPECS: dict[str, tuple[tuple[int, int, int], int]] = {
  "mnist": ((28, 28, 1), 10),
  "fashion_mnist": ((28, 28, 1), 10),
  "cifar10": ((32, 32, 3), 10),
}

SUPPORTED: tuple[str, ...] = tuple(_SPECS)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A fully loaded data set, all splits on device.

  Images are float32 NHWC, normalised per channel with ``mean``/``std`` of
  ``x_train`` (computed after the validation examples were taken out, so the
  validation split does not leak into the statistics). Labels are int32.
  ``eq=False``: comparing or hashing device arrays element-wise is never what
  a caller wants from a data set.
  """

  name: str
  num_classes: int
  x_train: jax.Array
  y_train: jax.Array
  x_val: jax.Array
  y_val: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one image, ``(H, W, C)``."""
    return tuple(self.x_train.shape[1:])


def _check_name(name: str) -> str:
  if name not in _SPECS:
    raise ValueError(f"name={name!r}: unknown data set; supported: {', '.join(SUPPORTED)}")
  return name


def input_shape(name: str) -> tuple[int, int, int]:
  """Shape ``(H, W, C)`` of one image of a supported data set, without loading it.

  Raises:
    ValueError: If ``name`` is not in :data:`SUPPORTED`.
  """
  return _SPECS[_check_name(name)][0]


def num_classes(name: str) -> int:
  """Number of label classes of a supported data set, without loading it.

  Raises:
    ValueError: If ``name`` is not in :data:`SUPPORTED`.
  """
  return _SPECS[_check_name(name)][1]


def default_data_dir() -> Path:
  """The data dir used when none is given: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
  return _resolve_data_dir(None)


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets"
  return Path(data_dir).expanduser().absolute()


def is_prepared(name: str, *, data_dir: str | os.PathLike[str] | None = None) -> bool:
  """Whether :func:`load` can read ``name`` without preparing anything (no network).

  Raises:
    ValueError: If ``name`` is not in :data:`SUPPORTED`.
  """
  _check_name(name)
  builder = tfds_offline.tfds().builder(name, data_dir=os.fspath(_resolve_data_dir(data_dir)))
  return bool(builder.is_prepared())


def prepare(
  name: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  manual_dir: str | os.PathLike[str] | None = None,
  download: bool = True,
) -> dict[str, int]:
  """Make sure ``name`` is prepared in the data dir, preparing it if needed.

  Args:
    name: One of :data:`SUPPORTED`.
    data_dir: tfds data dir; default :func:`default_data_dir`.
    manual_dir: Directory with the Fashion-MNIST IDX ``.gz`` files; default
      ``$FWDGRAD_FASHION_MNIST_DIR``, else Debian's ``/usr/share/datasets/fashion-mnist``.
    download: Whether tfds may download the data set when the network is reachable.

  Returns:
    ``{split name: number of examples}``, train first.

  Raises:
    ValueError: If ``name`` is not supported.
    DatasetUnavailableError: If it can be neither found nor prepared.
  """
  _check_name(name)
  builder = tfds_offline.prepared_builder(name, _resolve_data_dir(data_dir), manual_dir, download)
  splits = sorted(builder.info.splits.items(), key=lambda item: (item[0] != "train", item[0]))
  return {split: int(info.num_examples) for split, info in splits}


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of NHWC ``images`` (population std, float64).

  Summed in float64 chunk by chunk: exact enough for 8-bit pixels without a
  float64 copy of the whole split (1.2 GB for CIFAR-10's train split).
  A constant channel gets std 1 so that normalising never divides by zero.
  """
  channels = images.shape[-1]
  total = np.zeros(channels)
  total_sq = np.zeros(channels)
  for start in range(0, images.shape[0], chunk):
    block = images[start : start + chunk].reshape(-1, channels).astype(np.float64)
    total += block.sum(axis=0)
    total_sq += np.square(block).sum(axis=0)
  count = images.size // channels
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  return mean, np.where(std > 0.0, std, 1.0)


@jax.jit
def _normalise(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  return (images.astype(jnp.float32) - mean) / std


def _to_device(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> jax.Array:
  # Transfer the compact uint8 pixels, convert on device.
  return _normalise(
    jax.device_put(images), jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  )


def _split_indices(num: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint (train, val) index arrays, each in increasing order."""
  is_val = np.zeros(num, dtype=bool)
  is_val[np.random.default_rng(seed).permutation(num)[:val_size]] = True
  return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def load(
  name: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  val_size: int = 5000,
  seed: int = 0,
  download: bool = False,
  manual_dir: str | os.PathLike[str] | None = None,
  cache: bool = True,
) -> Dataset:
  """Load a whole data set onto the default JAX device.

  Args:
    name: One of :data:`SUPPORTED`.
    data_dir: tfds data dir; default ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.
    val_size: Number of training examples held out as the validation split (0: none).
    seed: Seed choosing which training examples go to validation.
    download: Let tfds download a data set that is not prepared, after a
      connectivity probe of at most a few seconds.
    manual_dir: Directory with the Fashion-MNIST IDX ``.gz`` files (prepared offline on
      first use); default ``$FWDGRAD_FASHION_MNIST_DIR``, else Debian's
      ``/usr/share/datasets/fashion-mnist``. Ignored for other data sets.
    cache: Keep/reuse the decoded uint8 arrays under ``data_dir/fwdgrad_jax_arrays``
      (seconds instead of tens of seconds per load).

  Returns:
    A :class:`Dataset` with float32 NHWC images and int32 labels on device.

  Raises:
    ValueError: An invalid argument, named first (``name=…``, ``val_size=…``): an
      unknown data set, or ``val_size`` negative or not smaller than the train split.
    DatasetUnavailableError: If the data set is not prepared and cannot be prepared here.
  """
  _check_name(name)
  if isinstance(val_size, bool) or not isinstance(val_size, int | np.integer) or val_size < 0:
    raise ValueError(f"val_size={val_size!r}: must be a non-negative integer")

  root = _resolve_data_dir(data_dir)
  builder = tfds_offline.prepared_builder(name, root, manual_dir, download)
  num_train = int(builder.info.splits["train"].num_examples)  # checked before reading
  if val_size >= num_train:
    raise ValueError(
      f"val_size={val_size}: must be smaller than the {num_train} examples of {name}'s train split"
    )
  train_images, train_labels = tfds_offline.read_split(builder, "train", root, cache=cache)
  test_images, test_labels = tfds_offline.read_split(builder, "test", root, cache=cache)

  train_idx, val_idx = _split_indices(len(train_images), val_size, seed)
  x_train, x_val = train_images[train_idx], train_images[val_idx]
  mean, std = _channel_stats(x_train)
  return Dataset(
    name=name,
    num_classes=int(builder.info.features["label"].num_classes),
    x_train=_to_device(x_train, mean, std),
    y_train=jax.device_put(train_labels[train_idx].astype(np.int32)),
    x_val=_to_device(x_val, mean, std),
    y_val=jax.device_put(train_labels[val_idx].astype(np.int32)),
    x_test=_to_device(test_images, mean, std),
    y_test=jax.device_put(test_labels.astype(np.int32)),
    mean=tuple(float(m) for m in mean),
    std=tuple(float(s) for s in std),
  )


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m fwdgrad_jax.data prepare NAME``; returns the exit status."""
  parser = argparse.ArgumentParser(
    prog="python -m fwdgrad_jax.data", description="Manage fwdgrad_jax data sets."
  )
  commands = parser.add_subparsers(dest="command", required=True)
  prep = commands.add_parser(
    "prepare", help="prepare a data set with tfds (offline for fashion_mnist, else by download)"
  )
  prep.add_argument("name", choices=SUPPORTED)
  prep.add_argument(
    "--data-dir",
    default=None,
    help=f"tfds data dir (default: ${DATA_DIR_ENV} or ~/tensorflow_datasets)",
  )
  prep.add_argument(
    "--manual-dir",
    default=None,
    help="directory with the Fashion-MNIST IDX .gz files "
    f"(default: ${FASHION_MNIST_DIR_ENV} or {DEBIAN_FASHION_MNIST_DIR})",
  )
  args = parser.parse_args(argv)

  data_dir = _resolve_data_dir(args.data_dir)
  try:
    sizes = prepare(args.name, data_dir=data_dir, manual_dir=args.manual_dir)
  except DatasetUnavailableError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  print(f"{args.name} is prepared in {data_dir}")
  for split, count in sizes.items():
    print(f"  {split}: {count} examples")
  return 0
