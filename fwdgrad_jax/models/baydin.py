"""The classic models: logistic regression, MLPs and the small CNNs of Baydin et al. 2022 and the
reproduction study (VGG-like), and a deep MLP for memory studies."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import jax
from flax import nnx

from fwdgrad_jax.models.layers import (
  conv3x3,
  flatten,
  get_activation,
  get_kernel_init,
  max_pool_2x2,
)
from fwdgrad_jax.models.local import LocalHead, pooled
from fwdgrad_jax.models.registry import Shape, register

# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


@register("logreg")
class LogReg(nnx.Module):
  """Multinomial logistic regression: one ``Linear`` on the flattened image.

  The convex baseline of Baydin et al. 2022, "Gradients without Backpropagation"
  (Fig. 3, MNIST logistic regression).
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    use_bias: bool = True,
  ):
    self.linear = nnx.Linear(math.prod(input_shape), num_classes, use_bias=use_bias, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(flatten(x))


@register("mlp")
class MLP(nnx.Module):
  """Fully connected net, by default 784-1024-1024-10 with ReLU.

  The MNIST MLP of Baydin et al. 2022, "Gradients without Backpropagation" (Fig. 4).
  With ``batch_norm`` or ``dropout`` it is the small stateful model of the tests and the
  reference for stateful models in the app: each hidden layer is
  Linear → [BatchNorm] → activation → [Dropout].

  Args:
    hidden: widths of the hidden layers (each followed by ``activation``).
    activation: name in :data:`ACTIVATIONS` or a callable.
    use_bias: give every Linear a bias.
    kernel_init: name of the weight initialiser (flax default ``lecun_normal``).
    batch_norm: BatchNorm after every hidden Linear (running statistics in ``rest``).
    dropout: Dropout rate after every hidden activation (0 = none); its RNG state is
      in ``rest`` and advances with every call in train mode.
    local_losses: Ren et al. 2023's local greedy losses: a zero-initialised head from
      every hidden layer's width (the last one is ``head``, also zero-initialised) and
      ``stop_gradient`` between hidden layers, so each layer learns from its own head's
      loss; ``local_logits(x)`` lists the heads' logits (:mod:`fwdgrad_jax.models.local`).
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    hidden: Sequence[int] = (1024, 1024),
    activation: str | Callable[[jax.Array], jax.Array] = "relu",
    use_bias: bool = True,
    kernel_init: str = "lecun_normal",
    batch_norm: bool = False,
    dropout: float = 0.0,
    local_losses: bool = False,
  ):
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    self.activation = get_activation(activation)
    init = get_kernel_init(kernel_init)
    widths = [math.prod(input_shape), *(int(h) for h in hidden)]
    self.hidden = nnx.List(
      [
        nnx.Linear(a, b, use_bias=use_bias, kernel_init=init, rngs=rngs)
        for a, b in itertools.pairwise(widths)
      ]
    )
    self.norms = nnx.List([nnx.BatchNorm(w, rngs=rngs) for w in widths[1:]] if batch_norm else [])
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.local_losses = bool(local_losses)
    head_init = nnx.initializers.zeros_init() if local_losses else init
    self.local_heads = nnx.List(
      [LocalHead(w, num_classes, rngs=rngs) for w in widths[1:-1]] if local_losses else []
    )
    self.head = nnx.Linear(
      widths[-1], num_classes, use_bias=use_bias, kernel_init=head_init, rngs=rngs
    )

  def local_logits(self, x: jax.Array) -> list[jax.Array]:
    """The logits of every hidden layer's head, the last one ``head``'s."""
    h, out = flatten(x), []
    for i, layer in enumerate(self.hidden):
      if self.local_losses and i:
        # A head reads h before the stop-gradient: the activity interpreter assigns an op
        # to the first block in program order that reads it (see the module docstring).
        out.append(self.local_heads[i - 1](h))
        h = jax.lax.stop_gradient(h)
      h = layer(h)
      if self.norms:
        h = self.norms[i](h)
      h = self.activation(h)
      if self.dropout is not None:
        h = self.dropout(h)
    return [*out, self.head(h)]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.local_logits(x)[-1]


class _BlockCNN(nnx.Module):
  """Blocks of [conv3x3-ReLU, conv3x3-ReLU, maxpool 2x2], then Linear-ReLU, Linear.

  With ``local_losses`` each conv block has a zero-initialised head on its mean-pooled
  output, the Linear-ReLU-Linear top is the last block (its last Linear zero-initialised),
  and every block's input is ``stop_gradient``-ed (:mod:`fwdgrad_jax.models.local`).
  """

  def __init__(
    self,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    channels: Sequence[int],
    hidden: int,
    local_losses: bool = False,
  ):
    h, w, c = input_shape
    convs = []
    cin = c
    for cout in channels:
      convs += [conv3x3(cin, cout, rngs), conv3x3(cout, cout, rngs)]
      cin = cout
      h, w = h // 2, w // 2
    self.convs = nnx.List(convs)
    self.local_losses = bool(local_losses)
    self.local_heads = nnx.List(
      [LocalHead(cout, num_classes, rngs=rngs) for cout in channels] if local_losses else []
    )
    self.fc1 = nnx.Linear(h * w * cin, hidden, rngs=rngs)
    fc2_init = {"kernel_init": nnx.initializers.zeros_init()} if local_losses else {}
    self.fc2 = nnx.Linear(hidden, num_classes, rngs=rngs, **fc2_init)

  def local_logits(self, x: jax.Array) -> list[jax.Array]:
    """The logits of every conv block's head (mean-pooled features), then ``fc2``'s."""
    out = []
    for i, conv in enumerate(self.convs):
      if self.local_losses and i and i % 2 == 0:
        x = jax.lax.stop_gradient(x)
      x = jax.nn.relu(conv(x))
      if i % 2 == 1:
        x = max_pool_2x2(x)
        if self.local_losses:
          out.append(self.local_heads[i // 2](pooled(x)))
    if self.local_losses:
      x = jax.lax.stop_gradient(x)
    x = jax.nn.relu(self.fc1(flatten(x)))
    return [*out, self.fc2(x)]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.local_logits(x)[-1]


@register("cnn")
class BaydinCNN(_BlockCNN):
  """CNN of Baydin et al. 2022, "Gradients without Backpropagation" (Sec. 5, Fig. 5).

  conv3x3(64)-ReLU, conv3x3(64)-ReLU, maxpool 2x2, conv3x3(64)-ReLU, conv3x3(64)-ReLU,
  maxpool 2x2, Linear(1024)-ReLU, Linear(num_classes). Convolutions use 'SAME' zero
  padding, so a 28x28 input reaches the first Linear as 7x7x64 = 3136 features.
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    channels: int = 64,
    hidden: int = 1024,
    local_losses: bool = False,
  ):
    super().__init__(input_shape, num_classes, rngs, (channels, channels), hidden, local_losses)


@register("vgg")
class VGGLike(_BlockCNN):
  """VGG-like CIFAR-10 CNN of the forward-gradient reproduction study.

  Three blocks of [conv3x3-ReLU, conv3x3-ReLU, maxpool 2x2] with 64, 128 and 256
  channels (padding 1, i.e. 'SAME'), then Linear(4096)-ReLU, Linear(num_classes). On a
  32x32x3 input the flattened feature map is 4x4x256 = 4096.
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    channels: Sequence[int] = (64, 128, 256),
    hidden: int = 4096,
    local_losses: bool = False,
  ):
    super().__init__(input_shape, num_classes, rngs, tuple(channels), hidden, local_losses)


@register("deep_mlp")
class DeepMLP(nnx.Module):
  """Bias-free ReLU MLP of adjustable depth for the scalability (depth) study.

  How ``depth`` is counted: ``depth`` = L is the number of hidden Linear layers, each
  ``width`` wide, without bias and followed by ReLU. A bias-free Linear head to
  ``num_classes`` comes on top and is NOT counted, so the model has L + 1 weight
  matrices and no other parameters. ``depth=0`` is bias-free logistic regression.

  Weights default to He-normal: with no bias and ReLU, the flax default (LeCun) halves
  the activation variance per layer, so deep nets would start with vanishing signal and
  the depth study would measure that instead of the gradient estimator.
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    depth: int = 4,
    width: int = 1024,
    kernel_init: str = "he_normal",
  ):
    if int(depth) != depth or depth < 0:
      raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
    self.depth = int(depth)
    init = get_kernel_init(kernel_init)
    widths = [math.prod(input_shape)] + [int(width)] * self.depth
    self.hidden = nnx.List(
      [
        nnx.Linear(a, b, use_bias=False, kernel_init=init, rngs=rngs)
        for a, b in itertools.pairwise(widths)
      ]
    )
    self.head = nnx.Linear(widths[-1], num_classes, use_bias=False, kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = flatten(x)
    for layer in self.hidden:
      h = jax.nn.relu(layer(h))
    return self.head(h)
