"""A tiny Fashion-MNIST-format data set prepared by tfds's real builder (for tests).

tfds's MNIST-family builders read exactly ``_TRAIN_EXAMPLES`` (60000) and
``_TEST_EXAMPLES`` (10000) images, ignoring the count in the IDX header, so tiny files
need those two module constants lowered. Everything else is tfds's real code:
manual-dir lookup, checksum validation, .gz extraction, example generation, PNG
encoding, tfrecord writing and as_dataset. (``raising=True``, the default of
``setattr``: if tfds renames them this fails loudly.)
"""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fwdgrad_jax import data


def write_idx_images(path: Path, images: np.ndarray) -> None:
  n, rows, cols = images.shape
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">IIII", 0x803, n, rows, cols) + images.tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def make(manual: Path, data_dir: Path, n_train: int, n_test: int, *, seed: int, val_size: int):
  """Writes random IDX files to ``manual``, prepares them into ``data_dir``, loads them.

  The labels are a deterministic function of the images (the brightest of 10 stripes)
  so that a model can learn them.

  Returns:
    ``(dataset, (train_x, train_y, test_x, test_y))`` — the loaded data set and the raw
    uint8 arrays written.
  """
  rng = np.random.default_rng(seed)

  def images_and_labels(n):
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = np.argmax(x[:, :20, :].reshape(n, 10, -1).mean(-1), axis=1)
    return x, y

  train_x, train_y = images_and_labels(n_train)
  test_x, test_y = images_and_labels(n_test)
  write_idx_images(manual / "train-images-idx3-ubyte.gz", train_x)
  write_idx_labels(manual / "train-labels-idx1-ubyte.gz", train_y)
  write_idx_images(manual / "t10k-images-idx3-ubyte.gz", test_x)
  write_idx_labels(manual / "t10k-labels-idx1-ubyte.gz", test_y)
  mnist_module = sys.modules[tfds.image_classification.FashionMNIST.__module__]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(mnist_module, "_TRAIN_EXAMPLES", n_train)
    mp.setattr(mnist_module, "_TEST_EXAMPLES", n_test)
    ds = data.load("fashion_mnist", data_dir=data_dir, manual_dir=manual, val_size=val_size, seed=0)
  return ds, (train_x, train_y, test_x, test_y)
