"""Yao's CNN: three convolutions, each followed by a 2×2 max-pool, then two dense layers.

Yao, "Studies on Forward Mode Gradient Descent", §IV: "three convolutional layers
followed by two fully connected layers. All of these layers use ReLU as the activation
function and there is one MaxPooling layer after each convolutional layer." The paper
gives no widths or kernel sizes; the defaults here (3×3 kernels, 'SAME' padding, 16, 32
and 64 channels, a 128-wide hidden dense layer) are our choice, sized so that the CNN
runs on a 2-core CPU. On a 28×28 input the maps are 28 → 14 → 7 → 3 (the last pool
floors, like PyTorch's ``MaxPool2d(2)``), so the first dense layer sees 3·3·64 = 576
features; 98 442 parameters by default.

Registered in :data:`fwdgrad_jax.models.MODELS` as ``yao_cnn`` (``model=yao_cnn`` in
the app). Imported at the end of :mod:`fwdgrad_jax.models`.

References:
  Yao. Studies on Forward Mode Gradient Descent.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from fwdgrad_jax.models.layers import conv3x3, flatten, max_pool_2x2
from fwdgrad_jax.models.registry import Shape, register

__all__ = ["YaoCNN"]


@register("yao_cnn")
class YaoCNN(nnx.Module):
  """conv3x3-ReLU-maxpool ×3, Linear(hidden)-ReLU, Linear(num_classes).

  Args:
    channels: output channels of the three convolutions (any number of them works;
      Yao's CNN has three).
    hidden: width of the first dense layer.
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    channels: Sequence[int] = (16, 32, 64),
    hidden: int = 128,
  ):
    channels = tuple(int(c) for c in channels)
    if not channels or min(channels) < 1:
      raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels!r}")
    h, w, cin = input_shape
    convs = []
    for cout in channels:
      convs.append(conv3x3(cin, cout, rngs))
      cin = cout
      h, w = h // 2, w // 2
    if h < 1 or w < 1:
      raise ValueError(
        f"input_shape {tuple(input_shape)} is too small for {len(channels)} 2x2 max-pools"
      )
    self.convs = nnx.List(convs)
    self.fc1 = nnx.Linear(h * w * cin, int(hidden), rngs=rngs)
    self.fc2 = nnx.Linear(int(hidden), num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv in self.convs:
      x = max_pool_2x2(jax.nn.relu(conv(x)))
    x = jax.nn.relu(self.fc1(flatten(x)))
    return self.fc2(x)
