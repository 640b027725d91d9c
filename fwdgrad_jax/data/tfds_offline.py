"""tfds without a network: offline preparation, a connectivity probe and an array cache.

:mod:`fwdgrad_jax.data` loads a data set in the two steps flax's examples show — get a
prepared tfds builder, read each split as one batch — and everything that makes those
two steps work on a machine without network lives here:

* :func:`prepared_builder`: tfds's builder for a data set whose files are prepared in
  the data dir, preparing them first when that is possible without waiting for a
  network that is not there: Fashion-MNIST from local IDX files (Debian's
  ``dataset-fashion-mnist``) by tfds's own builder, anything else by tfds's download
  only after a connectivity probe of a few seconds. Otherwise it raises
  :class:`DatasetUnavailableError` at once, instead of letting tfds retry an offline
  download for minutes.
* :func:`read_split`: a whole split as uint8 numpy arrays, through a cache of the
  decoded arrays (tfds stores PNGs and decodes them one by one, ~10 s per load).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import socket
import tempfile
import threading
import urllib.parse
import zipfile
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

FASHION_MNIST_DIR_ENV = "FWDGRAD_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# The file names tfds's fashion_mnist builder asks for; Debian ships the same.
FASHION_MNIST_FILES = (
  "train-images-idx3-ubyte.gz",
  "train-labels-idx1-ubyte.gz",
  "t10k-images-idx3-ubyte.gz",
  "t10k-labels-idx1-ubyte.gz",
)

# Where tfds downloads each data set from; only the host:port is probed.
SOURCE_URLS = {
  "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
  "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
  "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
}

# tfds's default TCP timeout is not what bounds an offline failure: its
# downloader retries for minutes. The probe is the only network wait we allow.
_PROBE_TIMEOUT_S = 3.0

# Sub-directory of the data dir holding decoded arrays (see read_split).
CACHE_DIRNAME = "fwdgrad_jax_arrays"


class DatasetUnavailableError(RuntimeError):
  """The data set is neither prepared nor preparable without the network.

  The message says how to get it, naming the switch that allows a download in the
  caller's words: ``download=True`` for :func:`fwdgrad_jax.data.load`, the config key
  in the app (:meth:`with_download_key`, e.g. ``data.download=true``).
  """

  def __init__(
    self,
    name: str,
    data_dir: Path,
    manual_dir: Path | None,
    download: bool,
    download_key: str | None = None,
  ):
    self.name, self.data_dir, self.manual_dir, self.download = name, data_dir, manual_dir, download
    self.download_key = download_key
    super().__init__(self._message())

  def with_download_key(self, key: str) -> DatasetUnavailableError:
    """The same error, naming the config ``key`` that allows a download."""
    return DatasetUnavailableError(self.name, self.data_dir, self.manual_dir, self.download, key)

  def _message(self) -> str:
    name, data_dir, key = self.name, os.fspath(self.data_dir), self.download_key
    lines = [f"Data set {name!r} is not prepared in data dir {data_dir!r}"]
    if self.download:
      host = urllib.parse.urlsplit(SOURCE_URLS[name]).hostname
      lines[0] += f" and cannot be downloaded: {host} is not reachable."
    else:
      lines[0] += f" and {key + '=false' if key else 'download=False'}."
    lines.append("To get it, either:")
    if name == "fashion_mnist" and self.manual_dir is not None:
      lines.append(
        "  * install Debian's files (apt-get install dataset-fashion-mnist), or put "
        f"{', '.join(FASHION_MNIST_FILES)} in {os.fspath(self.manual_dir)!r} "
        f"(set {FASHION_MNIST_DIR_ENV} or manual_dir to use another directory);"
      )
    lines.append(
      f"  * on a machine with network access run `python -m fwdgrad_jax.data prepare {name} "
      f"--data-dir DIR` and copy DIR to {data_dir!r} (or point the data dir at it)"
      + (";" if not self.download else ".")
    )
    if not self.download:
      how = f"rerun with {key}=true" if key else f"call load({name!r}, download=True)"
      lines.append(f"  * or, with network access here, {how}.")
    return "\n".join(lines)


def tfds() -> ModuleType:
  """tensorflow_datasets, imported on first use.

  Config validation and the static metadata of :mod:`fwdgrad_jax.data` must not pay
  for (or depend on) tfds and TensorFlow.
  """
  return importlib.import_module("tensorflow_datasets")


def resolve_manual_dir(manual_dir: str | os.PathLike[str] | None) -> Path:
  """``manual_dir``, else ``$FWDGRAD_FASHION_MNIST_DIR``, else Debian's directory."""
  if manual_dir is None:
    manual_dir = os.environ.get(FASHION_MNIST_DIR_ENV) or DEBIAN_FASHION_MNIST_DIR
  return Path(manual_dir).expanduser().absolute()


# --------------------------------------------------------------------------------------
# Preparing
# --------------------------------------------------------------------------------------


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
  base = tfds().builder_cls(name)
  return type(
    f"_{base.__name__}WithUrlInfos",
    (base,),
    {"name": name, "url_infos": url_infos, "__module__": __name__},
    skip_registration=True,
  )


def _missing_fashion_mnist_files(manual_dir: Path) -> list[str]:
  return [f for f in FASHION_MNIST_FILES if not (manual_dir / f).is_file()]


def _prepare_fashion_mnist_from_files(data_dir: Path, manual_dir: Path) -> None:
  """Prepare ``fashion_mnist`` from local IDX ``.gz`` files, without the network.

  tfds's builder finds a manually placed file by the file name in its
  checksum table, then validates the file against that table. Debian's files
  hold the same images but are compressed differently, so the checksums are
  those of the local files (which we trust as much as the package they came
  from).
  """
  from tensorflow_datasets.core.download import checksums

  base_url = tfds().image_classification.FashionMNIST.URL
  url_infos = {}
  for fname in FASHION_MNIST_FILES:
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
      download_config=tfds().download.DownloadConfig(
        manual_dir=os.fspath(manual_dir), try_download_gcs=False
      ),
    )


def _can_reach(url: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "https" else 80)
  reached, done = threading.Event(), threading.Event()

  def attempt() -> None:
    # Any failure at all means "offline" here.
    try:
      with (
        contextlib.suppress(Exception),
        socket.create_connection((parts.hostname, port), timeout=timeout),
      ):
        reached.set()
    finally:
      done.set()  # a refused or unresolvable host answers at once: no need to wait

  # A thread because name resolution has no timeout of its own and can hang
  # far longer than `timeout` on a machine without network.
  threading.Thread(target=attempt, name="fwdgrad-net-probe", daemon=True).start()
  done.wait(timeout)
  return reached.is_set()


def prepared_builder(
  name: str, data_dir: Path, manual_dir: str | os.PathLike[str] | None, download: bool
) -> Any:
  """tfds's builder for ``name`` whose data are prepared in ``data_dir``.

  Prepares the data set first when that is possible (see the module docstring):
  Fashion-MNIST's local files win even with ``download=True`` (same data, no network).

  Raises:
    DatasetUnavailableError: When it is not, within a few seconds.
  """
  builder = tfds().builder(name, data_dir=os.fspath(data_dir))
  if builder.is_prepared():
    return builder

  local_dir = None
  if name == "fashion_mnist":
    local_dir = resolve_manual_dir(manual_dir)
    if not _missing_fashion_mnist_files(local_dir):
      _prepare_fashion_mnist_from_files(data_dir, local_dir)
      return tfds().builder(name, data_dir=os.fspath(data_dir))

  if download and _can_reach(SOURCE_URLS[name]):
    # `url_infos=None`: validate against the checksum tables tfds ships.
    _builder_cls(name, None)(data_dir=os.fspath(data_dir)).download_and_prepare()
    return tfds().builder(name, data_dir=os.fspath(data_dir))

  raise DatasetUnavailableError(name, data_dir, local_dir, download)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _read_split_tfds(builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  # batch_size=-1 makes tfds return the whole split as one batch: one pass of
  # TensorFlow per split, then plain numpy.
  ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True, shuffle_files=False)
  images, labels = tfds().as_numpy(ds)
  return np.asarray(images), np.asarray(labels)


def read_split(
  builder: Any, split: str, data_dir: Path, *, cache: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """``(images, labels)`` of a whole split as numpy arrays, through the array cache.

  The decoded uint8 arrays are kept in
  ``data_dir/fwdgrad_jax_arrays/NAME/VERSION/SPLIT.npz``, tagged with a hash of
  tfds's ``dataset_info.json`` so that a re-prepared data set is read again. The cache
  is an optimisation only: a missing, stale, corrupt or unwritable one falls back to
  tfds.

  Args:
    builder: a prepared tfds builder (:func:`prepared_builder`).
    split: ``"train"`` or ``"test"``.
    data_dir: the tfds data dir; the cache lives under it.
    cache: use and fill the cache (False: always decode through tfds).

  Returns:
    uint8 NHWC images and integer labels.
  """
  if not cache:
    return _read_split_tfds(builder, split)
  fingerprint = hashlib.sha256((builder.data_path / "dataset_info.json").read_bytes()).hexdigest()
  path = data_dir / CACHE_DIRNAME / builder.name / str(builder.version) / f"{split}.npz"
  try:
    with np.load(path, allow_pickle=False) as cached:
      if str(cached["fingerprint"]) == fingerprint:
        return cached["images"], cached["labels"]
  # A truncated .npz is a damaged zip archive (BadZipFile is neither OSError nor
  # ValueError); a damaged member fails in zlib or as a short read.
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
    pass
  images, labels = _read_split_tfds(builder, split)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as fh:
      np.savez(fh, images=images, labels=labels, fingerprint=np.array(fingerprint))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
  except OSError:
    tmp.unlink(missing_ok=True)
  return images, labels
