"""Image-classification data sets (MNIST, Fashion-MNIST, CIFAR-10) for training.

Every split is read from tensorflow-datasets (tfds) once, as whole numpy
arrays, and placed on the default JAX device; training code then only slices
device arrays and never runs TensorFlow.

Where the data come from:

* a copy already prepared by tfds in the data dir (``data_dir`` argument, else
  ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``);
* for ``fashion_mnist`` only, Debian's ``dataset-fashion-mnist`` package (or
  any directory holding the four IDX ``.gz`` files, see
  ``FWDGRAD_FASHION_MNIST_DIR``), prepared offline by tfds's own builder on
  first use;
* with ``download=True``, tfds's regular download, tried only after a quick
  connectivity probe.

Anything else raises :class:`DatasetUnavailableError` at once, instead of
letting tfds retry an offline download for minutes.

tfds stores images as PNGs and decodes them one by one, which is slow, so the
decoded uint8 arrays are also kept in ``data_dir/fwdgrad_jax_arrays`` and reused
by later loads (``load(..., cache=False)`` skips that).

Command line::

    python -m fwdgrad_jax.data prepare NAME [--data-dir DIR] [--manual-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import os
import socket
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
FASHION_MNIST_DIR_ENV = "FWDGRAD_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# The file names tfds's fashion_mnist builder asks for; Debian ships the same.
_FASHION_MNIST_FILES = (
  "train-images-idx3-ubyte.gz",
  "train-labels-idx1-ubyte.gz",
  "t10k-images-idx3-ubyte.gz",
  "t10k-labels-idx1-ubyte.gz",
)

# tfds's default TCP timeout is not what bounds an offline failure: its
# downloader retries for minutes. The probe is the only network wait we allow.
_PROBE_TIMEOUT_S = 3.0

# Sub-directory of the data dir holding decoded arrays (see _read_split_cached).
_CACHE_DIRNAME = "fwdgrad_jax_arrays"


@dataclasses.dataclass(frozen=True)
class _Spec:
  input_shape: tuple[int, int, int]
  num_classes: int
  # Where tfds downloads the data set from; only its host:port is probed.
  source_url: str


_SPECS: dict[str, _Spec] = {
  "mnist": _Spec((28, 28, 1), 10, "https://storage.googleapis.com/cvdf-datasets/mnist/"),
  "fashion_mnist": _Spec(
    (28, 28, 1), 10, "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
  ),
  "cifar10": _Spec((32, 32, 3), 10, "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"),
}

SUPPORTED: tuple[str, ...] = tuple(_SPECS)


class DatasetUnavailableError(RuntimeError):
  """The data set is neither prepared nor preparable without the network."""


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


# --------------------------------------------------------------------------- #
# Static metadata (no tfds import).
# --------------------------------------------------------------------------- #


def _spec(name: str) -> _Spec:
  if name not in _SPECS:
    raise ValueError(f"Unknown data set {name!r}; supported data sets: {', '.join(SUPPORTED)}")
  return _SPECS[name]


def input_shape(name: str) -> tuple[int, int, int]:
  """Shape ``(H, W, C)`` of one image of a supported data set, without loading it.

  Args:
    name: One of :data:`SUPPORTED`.

  Returns:
    The image shape, e.g. ``(28, 28, 1)`` for ``mnist``.

  Raises:
    ValueError: If ``name`` is not supported.
  """
  return _spec(name).input_shape


def num_classes(name: str) -> int:
  """Number of label classes of a supported data set, without loading it.

  Args:
    name: One of :data:`SUPPORTED`.

  Returns:
    The number of classes (10 for all supported data sets).

  Raises:
    ValueError: If ``name`` is not supported.
  """
  return _spec(name).num_classes


def default_data_dir() -> Path:
  """The data dir used when none is given: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.

  Returns:
    An absolute path (it need not exist).
  """
  return _resolve_data_dir(None)


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets"
  return Path(data_dir).expanduser().absolute()


def _resolve_manual_dir(manual_dir: str | os.PathLike[str] | None) -> Path:
  if manual_dir is None:
    manual_dir = os.environ.get(FASHION_MNIST_DIR_ENV) or DEBIAN_FASHION_MNIST_DIR
  return Path(manual_dir).expanduser().absolute()


# --------------------------------------------------------------------------- #
# Preparing through tfds.
# --------------------------------------------------------------------------- #


def _tfds() -> ModuleType:
  # Imported lazily: `input_shape`/`num_classes` and config validation must
  # not pay for (or depend on) tfds and TensorFlow.
  return importlib.import_module("tensorflow_datasets")


def _builder_cls(name: str, url_infos: dict[str, Any] | None) -> type:
  """tfds's own builder class for ``name``, with its download checksums replaced.

  tfds looks the expected checksums up through ``Builder.url_infos``, read
  from the checksum file next to the builder's code; registering new ones
  means writing into the installed tfds package (``register_checksums=True``),
  and ``tfds.download.add_checksums_dir`` cannot help because the builder's
  own table takes precedence over it. A throw-away, unregistered subclass
  that only swaps that table keeps all of tfds's preparation code (split
  generation, encoding, file layout) and leaves the tfds installation untouched.
  It also sidesteps ``Builder.url_infos`` itself, which on tfds 4.9.10 with
  etils >= 1.15 fails importing the no longer installed ``importlib_resources``.

  Args:
    name: Registered tfds name; the subclass keeps it, so the data land in
      ``data_dir/name/version`` exactly where tfds's own builder reads them.
    url_infos: ``{url: tfds UrlInfo}`` to validate downloads against, or
      ``None`` to use only the checksum tables tfds ships.

  Returns:
    The subclass.
  """
  base = _tfds().builder_cls(name)
  return type(
    f"_{base.__name__}WithUrlInfos",
    (base,),
    {"name": name, "url_infos": url_infos, "__module__": __name__},
    skip_registration=True,
  )


def _missing_fashion_mnist_files(manual_dir: Path) -> list[str]:
  return [f for f in _FASHION_MNIST_FILES if not (manual_dir / f).is_file()]


def _prepare_fashion_mnist_from_files(data_dir: Path, manual_dir: Path) -> None:
  """Prepare ``fashion_mnist`` from local IDX ``.gz`` files, without the network.

  tfds's builder finds a manually placed file by the file name in its
  checksum table, then validates the file against that table. Debian's files
  hold the same images but are compressed differently, so the checksums are
  those of the local files (which we trust as much as the package they came
  from).
  """
  from tensorflow_datasets.core.download import checksums

  tfds = _tfds()
  base_url = tfds.image_classification.FashionMNIST.URL
  url_infos = {}
  for fname in _FASHION_MNIST_FILES:
    info = checksums.compute_url_info(manual_dir / fname)
    url_infos[urllib.parse.urljoin(base_url, fname)] = checksums.UrlInfo(
      size=info.size, checksum=info.checksum, filename=fname
    )
  builder = _builder_cls("fashion_mnist", url_infos)(data_dir=os.fspath(data_dir))
  # tfds extracts the .gz files into the download dir; nothing there is worth
  # keeping once the data set is written, so use a temporary one.
  with tempfile.TemporaryDirectory(prefix="fwdgrad_fashion_mnist_") as tmp:
    builder.download_and_prepare(
      download_dir=tmp,
      download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir), try_download_gcs=False
      ),
    )


def _can_reach(url: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "https" else 80)
  reached = threading.Event()

  def attempt() -> None:
    # Any failure at all means "offline" here.
    with (
      contextlib.suppress(Exception),
      socket.create_connection((parts.hostname, port), timeout=timeout),
    ):
      reached.set()

  # A thread because name resolution has no timeout of its own and can hang
  # far longer than `timeout` on a machine without network.
  threading.Thread(target=attempt, name="fwdgrad-net-probe", daemon=True).start()
  return reached.wait(timeout)


def _unavailable_message(name: str, data_dir: Path, manual_dir: Path | None, download: bool) -> str:
  lines = [f"Data set {name!r} is not prepared in data dir {os.fspath(data_dir)!r}"]
  if download:
    host = urllib.parse.urlsplit(_SPECS[name].source_url).hostname
    lines[0] += f" and cannot be downloaded: {host} is not reachable."
  else:
    lines[0] += " and download=False."
  lines.append("To get it, either:")
  if name == "fashion_mnist" and manual_dir is not None:
    lines.append(
      "  * install Debian's files (apt-get install dataset-fashion-mnist), or put "
      f"{', '.join(_FASHION_MNIST_FILES)} in {os.fspath(manual_dir)!r} "
      f"(set {FASHION_MNIST_DIR_ENV} or manual_dir to use another directory);"
    )
  lines += [
    f"  * on a machine with network access run `python -m fwdgrad_jax.data prepare {name} "
    f"--data-dir DIR` and copy DIR to {os.fspath(data_dir)!r} (or point data_dir / "
    f"${DATA_DIR_ENV} at it)" + (";" if not download else "."),
  ]
  if not download:
    lines.append(f"  * or, with network access here, call load({name!r}, download=True).")
  return "\n".join(lines)


def _prepared_builder(
  name: str, data_dir: Path, manual_dir: str | os.PathLike[str] | None, download: bool
) -> Any:
  """A tfds builder for ``name`` whose data are prepared in ``data_dir``.

  Prepares the data set first when that is possible (see module docstring).

  Raises:
    DatasetUnavailableError: When it is not, within a few seconds.
  """
  tfds = _tfds()
  builder = tfds.builder(name, data_dir=os.fspath(data_dir))
  if builder.is_prepared():
    return builder

  local_dir = None
  if name == "fashion_mnist":
    # Offline files win even with download=True: same data, no network.
    local_dir = _resolve_manual_dir(manual_dir)
    if not _missing_fashion_mnist_files(local_dir):
      _prepare_fashion_mnist_from_files(data_dir, local_dir)
      return tfds.builder(name, data_dir=os.fspath(data_dir))

  if download and _can_reach(_SPECS[name].source_url):
    # `url_infos=None`: validate against the checksum tables tfds ships.
    downloader = _builder_cls(name, None)(data_dir=os.fspath(data_dir))
    downloader.download_and_prepare()
    return tfds.builder(name, data_dir=os.fspath(data_dir))

  raise DatasetUnavailableError(_unavailable_message(name, data_dir, local_dir, download))


def is_prepared(name: str, *, data_dir: str | os.PathLike[str] | None = None) -> bool:
  """Whether ``name`` is already prepared in the data dir (no preparation, no network).

  Args:
    name: One of :data:`SUPPORTED`.
    data_dir: tfds data dir; default :func:`default_data_dir`.

  Returns:
    True if :func:`load` can read it without preparing anything.

  Raises:
    ValueError: If ``name`` is not supported.
  """
  _spec(name)
  return bool(_tfds().builder(name, data_dir=os.fspath(_resolve_data_dir(data_dir))).is_prepared())


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
      ``$FWDGRAD_FASHION_MNIST_DIR``, else Debian's
      ``/usr/share/datasets/fashion-mnist``. Ignored for other data sets.
    download: Whether tfds may download the data set when the network is
      reachable.

  Returns:
    ``{split name: number of examples}``.

  Raises:
    ValueError: If ``name`` is not supported.
    DatasetUnavailableError: If it can be neither found nor prepared.
  """
  _spec(name)
  builder = _prepared_builder(name, _resolve_data_dir(data_dir), manual_dir, download)
  splits = sorted(builder.info.splits.items(), key=lambda item: (item[0] != "train", item[0]))
  return {split: int(info.num_examples) for split, info in splits}


# --------------------------------------------------------------------------- #
# Loading.
# --------------------------------------------------------------------------- #


def _read_split(builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  # batch_size=-1 makes tfds return the whole split as one batch: one pass of
  # TensorFlow per split, then plain numpy.
  ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True, shuffle_files=False)
  images, labels = _tfds().as_numpy(ds)
  return np.asarray(images), np.asarray(labels)


def _read_split_cached(
  builder: Any, split: str, data_dir: Path, use_cache: bool
) -> tuple[np.ndarray, np.ndarray]:
  """Like :func:`_read_split`, through a cache of the decoded arrays in ``data_dir``.

  tfds stores every image as a PNG and decodes them one by one: about 10 s
  for Fashion-MNIST on 2 cores, every time. The decoded uint8 arrays are
  kept in ``data_dir/fwdgrad_jax_arrays/NAME/VERSION/SPLIT.npz``, tagged with
  a hash of tfds's ``dataset_info.json`` so that a re-prepared data set is
  read again. The cache is an optimisation only: a missing, stale, corrupt or
  unwritable one falls back to tfds.
  """
  if not use_cache:
    return _read_split(builder, split)
  fingerprint = hashlib.sha256((builder.data_path / "dataset_info.json").read_bytes()).hexdigest()
  path = data_dir / _CACHE_DIRNAME / builder.name / str(builder.version) / f"{split}.npz"
  try:
    with np.load(path, allow_pickle=False) as cached:
      if str(cached["fingerprint"]) == fingerprint:
        return cached["images"], cached["labels"]
  except (OSError, KeyError, ValueError, EOFError):
    pass
  images, labels = _read_split(builder, split)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as fh:
      np.savez(fh, images=images, labels=labels, fingerprint=np.array(fingerprint))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
  except OSError:
    tmp.unlink(missing_ok=True)
  return images, labels


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
    jax.device_put(images),
    jnp.asarray(mean, dtype=jnp.float32),
    jnp.asarray(std, dtype=jnp.float32),
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

  ``fashion_mnist`` is prepared from local IDX files on first use when they
  are present (see ``manual_dir``); afterwards the prepared copy is reused.

  Args:
    name: One of :data:`SUPPORTED`.
    data_dir: tfds data dir; default ``$TFDS_DATA_DIR``, else
      ``~/tensorflow_datasets``.
    val_size: Number of training examples held out as the validation split
      (0 for none).
    seed: Seed choosing which training examples go to validation.
    download: Let tfds download a data set that is not prepared, after a
      connectivity probe of at most a few seconds.
    manual_dir: Directory with the Fashion-MNIST IDX ``.gz`` files; default
      ``$FWDGRAD_FASHION_MNIST_DIR``, else ``/usr/share/datasets/fashion-mnist``
      (Debian's ``dataset-fashion-mnist``). Ignored for other data sets.
    cache: Keep/reuse the decoded uint8 arrays under
      ``data_dir/fwdgrad_jax_arrays`` so that later loads skip tfds's
      per-image PNG decoding (seconds instead of tens of seconds).

  Returns:
    A :class:`Dataset` with float32 NHWC images and int32 labels on device.

  Raises:
    ValueError: If ``name`` is not supported, or ``val_size`` is negative or
      not smaller than the training split.
    DatasetUnavailableError: If the data set is not prepared and cannot be
      prepared here.
  """
  _spec(name)
  if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or val_size < 0:
    raise ValueError(f"val_size must be a non-negative integer, got {val_size!r}")

  root = _resolve_data_dir(data_dir)
  builder = _prepared_builder(name, root, manual_dir, download)
  # Checked against the metadata before reading anything.
  num_train = int(builder.info.splits["train"].num_examples)
  if val_size >= num_train:
    raise ValueError(
      f"val_size={val_size} must be smaller than the {num_train} examples of {name!r}'s train split"
    )

  train_images, train_labels = _read_split_cached(builder, "train", root, cache)
  test_images, test_labels = _read_split_cached(builder, "test", root, cache)
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


# --------------------------------------------------------------------------- #
# Command line.
# --------------------------------------------------------------------------- #


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (``python -m fwdgrad_jax.data``).

  Args:
    argv: Arguments without the program name; default ``sys.argv[1:]``.

  Returns:
    The process exit status.
  """
  parser = argparse.ArgumentParser(
    prog="python -m fwdgrad_jax.data", description="Manage fwdgrad_jax data sets."
  )
  commands = parser.add_subparsers(dest="command", required=True)
  prep = commands.add_parser(
    "prepare",
    help="prepare a data set with tfds (offline for fashion_mnist, else by download)",
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


if __name__ == "__main__":
  sys.exit(main())
