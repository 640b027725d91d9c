"""Tests for fwdgrad_jax.data.

Everything runs offline: sockets are refused for the whole module, and the
data come from tiny IDX files written here and prepared by tfds's real
``fashion_mnist`` builder.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import _tiny_tfds
import numpy as np
import pytest

# Imported up front so that the timed tests measure data.py, not imports.
import tensorflow_datasets as tfds

from fwdgrad_jax import data
from fwdgrad_jax.data import tfds_offline

N_TRAIN, N_TEST, VAL_SIZE = 40, 12, 8
_TFDS_FASHION_CHECKSUMS = Path(tfds.__file__).parent / "url_checksums" / "fashion_mnist.txt"


@pytest.fixture(autouse=True)
def _isolated(no_network, monkeypatch):
  # The developer's own settings must not leak into the tests.
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, no_network):
  """A tiny Fashion-MNIST-format data set prepared by tfds into a temp data dir."""
  manual = tmp_path_factory.mktemp("manual")
  data_dir = tmp_path_factory.mktemp("tfds")
  checksums_before = hashlib.sha256(_TFDS_FASHION_CHECKSUMS.read_bytes()).hexdigest()
  ds, (train_x, train_y, test_x, test_y) = _tiny_tfds.make(
    manual, data_dir, N_TRAIN, N_TEST, seed=1234, val_size=VAL_SIZE
  )
  return SimpleNamespace(
    ds=ds,
    data_dir=data_dir,
    manual=manual,
    train={x.tobytes(): int(y) for x, y in zip(train_x, train_y)},
    test={x.tobytes(): int(y) for x, y in zip(test_x, test_y)},
    checksums_before=checksums_before,
  )


def _raw(ds: data.Dataset, x) -> list[bytes]:
  """Undo the normalisation and return each image's uint8 bytes (H, W)."""
  pixels = np.asarray(x, dtype=np.float64) * np.asarray(ds.std) + np.asarray(ds.mean)
  assert np.allclose(pixels, np.round(pixels), atol=1e-3)
  return [img[..., 0].tobytes() for img in np.round(pixels).astype(np.uint8)]


# --------------------------------------------------------------------------- #
# Preparing and loading through tfds.
# --------------------------------------------------------------------------- #


def test_prepared_by_tfds_without_touching_installed_tfds(tiny):
  builder = tfds.builder("fashion_mnist", data_dir=str(tiny.data_dir))
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == N_TRAIN
  assert builder.info.splits["test"].num_examples == N_TEST
  assert data.is_prepared("fashion_mnist", data_dir=tiny.data_dir)
  assert not data.is_prepared("mnist", data_dir=tiny.data_dir)
  # The local files' checksums were never registered into site-packages.
  after = hashlib.sha256(_TFDS_FASHION_CHECKSUMS.read_bytes()).hexdigest()
  assert after == tiny.checksums_before
  assert not (Path(data.__file__).parent / "checksums.tsv").exists()


def test_shapes_and_dtypes(tiny):
  ds = tiny.ds
  assert ds.name == "fashion_mnist"
  assert ds.num_classes == 10
  assert ds.input_shape == (28, 28, 1)
  assert ds.x_train.shape == (N_TRAIN - VAL_SIZE, 28, 28, 1)
  assert ds.x_val.shape == (VAL_SIZE, 28, 28, 1)
  assert ds.x_test.shape == (N_TEST, 28, 28, 1)
  assert ds.y_train.shape == (N_TRAIN - VAL_SIZE,)
  assert ds.y_val.shape == (VAL_SIZE,)
  assert ds.y_test.shape == (N_TEST,)
  for x in (ds.x_train, ds.x_val, ds.x_test):
    assert x.dtype == np.float32
  for y in (ds.y_train, ds.y_val, ds.y_test):
    assert y.dtype == np.int32


def test_train_split_is_standardised_per_channel(tiny):
  x = np.asarray(tiny.ds.x_train, dtype=np.float64)
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
  # Random pixels: the statistics are those of the data, not defaults.
  assert 100 < tiny.ds.mean[0] < 155
  assert 60 < tiny.ds.std[0] < 90


def test_images_and_labels_preserved_and_val_disjoint(tiny):
  ds = tiny.ds
  train = _raw(ds, ds.x_train)
  val = _raw(ds, ds.x_val)
  test = _raw(ds, ds.x_test)
  assert set(train).isdisjoint(val)
  assert sorted(train + val) == sorted(tiny.train)
  assert sorted(test) == sorted(tiny.test)
  assert [tiny.train[b] for b in train] == np.asarray(ds.y_train).tolist()
  assert [tiny.train[b] for b in val] == np.asarray(ds.y_val).tolist()
  assert [tiny.test[b] for b in test] == np.asarray(ds.y_test).tolist()


def test_validation_split_is_seeded(tiny):
  kwargs = {"data_dir": tiny.data_dir, "manual_dir": tiny.manual, "val_size": VAL_SIZE}
  same = data.load("fashion_mnist", seed=0, **kwargs)
  other = data.load("fashion_mnist", seed=1, **kwargs)
  np.testing.assert_array_equal(np.asarray(same.x_val), np.asarray(tiny.ds.x_val))
  np.testing.assert_array_equal(np.asarray(same.y_val), np.asarray(tiny.ds.y_val))
  assert set(_raw(other, other.x_val)) != set(_raw(tiny.ds, tiny.ds.x_val))


def test_zero_val_size_gives_empty_val_arrays(tiny):
  ds = data.load("fashion_mnist", data_dir=tiny.data_dir, val_size=0)
  assert ds.x_train.shape == (N_TRAIN, 28, 28, 1)
  assert ds.x_val.shape == (0, 28, 28, 1) and ds.x_val.dtype == np.float32
  assert ds.y_val.shape == (0,) and ds.y_val.dtype == np.int32


def test_prepared_copy_is_reused(tiny, monkeypatch):
  def no_prepare(*args, **kwargs):
    raise AssertionError("prepared again")

  monkeypatch.setattr(tfds_offline, "_prepare_fashion_mnist_from_files", no_prepare)
  ds = data.load("fashion_mnist", data_dir=tiny.data_dir, manual_dir=tiny.manual, val_size=0)
  assert ds.x_train.shape[0] == N_TRAIN


def test_array_cache_matches_tfds_and_survives_corruption(tiny):
  cache_file = tiny.data_dir / "fwdgrad_jax_arrays" / "fashion_mnist" / "3.0.1" / "train.npz"
  assert cache_file.is_file()
  cached = data.load("fashion_mnist", data_dir=tiny.data_dir, val_size=0)
  uncached = data.load("fashion_mnist", data_dir=tiny.data_dir, val_size=0, cache=False)
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(
      np.asarray(getattr(cached, field)), np.asarray(getattr(uncached, field))
    )
  cache_file.write_bytes(b"not an npz file")
  rebuilt = data.load("fashion_mnist", data_dir=tiny.data_dir, val_size=0)
  np.testing.assert_array_equal(np.asarray(rebuilt.x_train), np.asarray(uncached.x_train))
  with np.load(cache_file) as fresh:  # rewritten
    assert fresh["images"].shape == (N_TRAIN, 28, 28, 1)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_truncated_array_cache_falls_back_to_tfds(tiny, keep):
  # `truncate -s` of the cache: the zip's directory (at its end) is gone, or one member is cut.
  cache_file = tiny.data_dir / "fwdgrad_jax_arrays" / "fashion_mnist" / "3.0.1" / "train.npz"
  data.load("fashion_mnist", data_dir=tiny.data_dir, val_size=0)  # the cache exists
  whole = cache_file.read_bytes()
  cache_file.write_bytes(whole[: int(len(whole) * keep)])
  ds = data.load("fashion_mnist", data_dir=tiny.data_dir, val_size=0)
  assert ds.x_train.shape[0] == N_TRAIN
  assert cache_file.read_bytes() == whole  # rewritten whole


def test_channel_stats_are_per_channel_and_chunked():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
  images[..., 2] = 9  # constant channel
  mean, std = data._channel_stats(images, chunk=2)
  np.testing.assert_allclose(mean, images.mean(axis=(0, 1, 2)))
  np.testing.assert_allclose(std[:2], images[..., :2].std(axis=(0, 1, 2)))
  assert std[2] == 1.0


# --------------------------------------------------------------------------- #
# Failing fast and clearly.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("download", [False, True])
def test_missing_dataset_fails_fast(tmp_path, download):
  start = time.monotonic()
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.load("mnist", data_dir=tmp_path, download=download)
  assert time.monotonic() - start < 10
  message = str(err.value)
  assert "'mnist'" in message
  assert str(tmp_path) in message
  assert "python -m fwdgrad_jax.data prepare mnist" in message
  assert isinstance(err.value, RuntimeError)


def test_unavailable_message_names_the_callers_download_switch(tmp_path):
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.load("mnist", data_dir=tmp_path)
  assert "download=False" in str(err.value) and "load('mnist', download=True)" in str(err.value)
  app = err.value.with_download_key("data.download")
  assert isinstance(app, data.DatasetUnavailableError)
  first, *rest = str(app).splitlines()
  assert "'mnist'" in first and str(tmp_path) in first and "data.download=false" in first
  assert "data.download=true" in rest[-1] and "load(" not in str(app)


def test_config_validation_path_does_not_import_tfds():
  # config.py validates data names through data.SUPPORTED: that must stay light.
  code = (
    "import sys; import fwdgrad_jax.training.config, fwdgrad_jax.data; "
    "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_fashion_mnist_without_local_files_fails_fast(tmp_path):
  empty_manual = tmp_path / "no-files"
  empty_manual.mkdir()
  start = time.monotonic()
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.load("fashion_mnist", data_dir=tmp_path / "tfds", manual_dir=empty_manual)
  assert time.monotonic() - start < 10
  message = str(err.value)
  assert "'fashion_mnist'" in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert str(empty_manual) in message


def test_directories_default_to_environment(tmp_path, monkeypatch):
  assert data.default_data_dir() == Path("~/tensorflow_datasets").expanduser()
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env-data"))
  monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path / "env-manual"))
  assert data.default_data_dir() == tmp_path / "env-data"
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.load("fashion_mnist")
  assert str(tmp_path / "env-data") in str(err.value)
  assert str(tmp_path / "env-manual") in str(err.value)


def test_probe_gives_up_on_time(monkeypatch):
  # A hanging name lookup or connect must not hold the caller past the timeout.
  monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))
  start = time.monotonic()
  assert not tfds_offline._can_reach("https://example.org/", timeout=0.5)
  assert time.monotonic() - start < 3


def test_probe_offline_is_false():
  # Offline (sockets refused here) answers at once, not after the probe's 3 s timeout.
  start = time.monotonic()
  assert not tfds_offline._can_reach("https://storage.googleapis.com/")
  assert time.monotonic() - start < 1


@pytest.fixture
def no_tfds(monkeypatch):
  """Fail if tfds is used at all."""

  def forbidden():
    raise AssertionError("tfds used")

  monkeypatch.setattr(tfds_offline, "tfds", forbidden)


@pytest.mark.parametrize(
  "call",
  [
    lambda: data.load("imagenet"),
    lambda: data.prepare("imagenet"),
    lambda: data.is_prepared("imagenet"),
    lambda: data.input_shape("imagenet"),
    lambda: data.num_classes("imagenet"),
  ],
)
def test_unknown_name_is_rejected_before_tfds(no_tfds, call):
  with pytest.raises(ValueError, match="imagenet") as err:
    call()
  for name in data.SUPPORTED:
    assert name in str(err.value)


@pytest.mark.parametrize("val_size", [-1, 2.5, True, "10"])
def test_invalid_val_size_is_rejected_before_tfds(no_tfds, val_size):
  with pytest.raises(ValueError, match="val_size"):
    data.load("mnist", val_size=val_size)


@pytest.mark.parametrize("val_size", [N_TRAIN, N_TRAIN + 1])
def test_val_size_not_smaller_than_train_is_rejected(tiny, val_size):
  with pytest.raises(ValueError, match=f"val_size={val_size}"):
    data.load("fashion_mnist", data_dir=tiny.data_dir, val_size=val_size)


def test_static_metadata():
  assert data.SUPPORTED == ("mnist", "fashion_mnist", "cifar10")
  assert data.input_shape("mnist") == (28, 28, 1)
  assert data.input_shape("fashion_mnist") == (28, 28, 1)
  assert data.input_shape("cifar10") == (32, 32, 3)
  assert {data.num_classes(n) for n in data.SUPPORTED} == {10}


# --------------------------------------------------------------------------- #
# Command line.
# --------------------------------------------------------------------------- #


def test_cli_prepare_prints_split_sizes(tiny, capsys):
  argv = ["prepare", "fashion_mnist", "--data-dir", str(tiny.data_dir)]
  assert data.main(argv + ["--manual-dir", str(tiny.manual)]) == 0
  out = capsys.readouterr().out
  assert f"train: {N_TRAIN} examples" in out
  assert f"test: {N_TEST} examples" in out


def test_cli_prepare_unavailable_exits_nonzero(tmp_path, capsys):
  assert data.main(["prepare", "mnist", "--data-dir", str(tmp_path)]) == 1
  assert "'mnist'" in capsys.readouterr().err


def test_cli_rejects_unknown_name(capsys):
  with pytest.raises(SystemExit) as exc:
    data.main(["prepare", "imagenet"])
  assert exc.value.code == 2
