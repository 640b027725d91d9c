"""ResNet18 and a small ViT of Flügel et al. 2024, "Multi-Tangent Forward Gradients" (§4.5).

Both are registered in :data:`fwdgrad_jax.models.MODELS` (``model=resnet18``,
``model=vit`` in the Hydra app) and take NHWC images of any size the stem/patching
divides, in particular 28×28×1 (MNIST, Fashion-MNIST) and 32×32×3 (CIFAR-10).

Flügel et al. use activity perturbation over coarse "layers" (their App. B.2): for the
ResNet each of the four residual stages is a layer and the processing before and after
them forms one more; for the ViT each encoder layer is a layer, the input processing
merged into the first and the output processing into the last. Here a layer is a block
between two :func:`fwdgrad_jax.site` markers (see :mod:`fwdgrad_jax.perturbation`):

* ResNet18: sites on the outputs of stages 1–4 and on the logits, so the blocks are
  [stem + stage 1], stage 2, stage 3, stage 4, [pool + head] — five layers like the
  paper's, with the pre-processing merged into stage 1 (the paper groups pre and post
  processing into a single layer, which one output marker cannot express).
* ViT: sites on the outputs of encoder layers 1–5 and on the logits, so the blocks are
  [patch embedding + layer 1], layers 2–5, [layer 6 + final norm + head] — the paper's.

The markers are the identity for every other estimator (backprop, weight-perturbed
forward gradients), so the same model serves all of them.

BatchNorm in the ResNet couples the examples of a batch in train mode. With per-example
activity losses (the app's activity estimator) every example's directional derivative is
taken on its own loss, so the estimate of ∂loss_b/∂z_b leaves out the cross-example terms
∂loss_j/∂z_b (j ≠ b) that flow through the batch statistics; they are O(1/batch).
``norm="none"`` or ``norm="group"`` removes the coupling where that matters.

References:
  He et al., 2016. Deep Residual Learning for Image Recognition.
  Dosovitskiy et al., 2021. An Image is Worth 16x16 Words (ViT).
  Flügel et al., 2024. Multi-Tangent Forward Gradients. arXiv:2410.17764, §4.5, App. B.2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fwdgrad_jax.models.layers import CONV_INIT
from fwdgrad_jax.models.registry import register
from fwdgrad_jax.perturbation import site

__all__ = ["ResNet18", "ViT"]

Shape = tuple[int, int, int]
_NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int, rngs: nnx.Rngs) -> nnx.Module | None:
  if kind == "batch":
    return nnx.BatchNorm(channels, rngs=rngs)
  if kind == "group":
    # 32 groups as in Wu & He 2018, fewer for narrow test nets.
    return nnx.GroupNorm(channels, num_groups=math.gcd(32, channels), rngs=rngs)
  return None


def _conv(cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  # Bias-free: a normalisation follows every convolution (as in torchvision's ResNet).
  pad = "SAME" if kernel == 3 else "VALID"
  if kernel == 3 and stride > 1:
    pad = ((1, 1), (1, 1))  # PyTorch padding=1 with stride 2 (SAME would pad (0, 1))
  return nnx.Conv(
    cin,
    cout,
    kernel_size=(kernel, kernel),
    strides=(stride, stride),
    padding=pad,
    use_bias=False,
    kernel_init=CONV_INIT,
    rngs=rngs,
  )


class _BasicBlock(nnx.Module):
  """conv3x3-norm-ReLU-conv3x3-norm, plus the (1×1-projected where the shape changes) input, ReLU."""

  def __init__(self, cin: int, cout: int, stride: int, norm: str, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, cout, 3, stride, rngs)
    self.norm1 = _norm(norm, cout, rngs)
    self.conv2 = _conv(cout, cout, 3, 1, rngs)
    self.norm2 = _norm(norm, cout, rngs)
    if stride != 1 or cin != cout:
      self.proj = _conv(cin, cout, 1, stride, rngs)
      self.proj_norm = _norm(norm, cout, rngs)
    else:
      self.proj = None
      self.proj_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(x)
    if self.norm1 is not None:
      h = self.norm1(h)
    h = jax.nn.relu(h)
    h = self.conv2(h)
    if self.norm2 is not None:
      h = self.norm2(h)
    if self.proj is not None:
      x = self.proj(x)
      if self.proj_norm is not None:
        x = self.proj_norm(x)
    return jax.nn.relu(h + x)


@register("resnet18")
class ResNet18(nnx.Module):
  """ResNet18 with the CIFAR stem (He et al. 2016; Flügel et al. §4.5).

  Stem conv3x3(width)-norm-ReLU at stride 1 and no max-pool (the usual CIFAR variant,
  also right for 28×28), four stages of two basic blocks with width·(1, 2, 4, 8) channels
  at strides (1, 2, 2, 2), global average pooling, Linear(num_classes). With the default
  ``width=64`` it has 11.2 M parameters (11.17 M for 1 input channel and 10 classes).
  Spatial sizes: 28 → 28, 14, 7, 4; 32 → 32, 16, 8, 4.

  Args:
    width: channels of the stem and the first stage (64 in the paper; smaller for tests
      and CPU timing).
    blocks: basic blocks per stage (2: ResNet18). 1 keeps every kind of block (the first
      stage's identity skip, the later stages' projected ones), the stages and the sites,
      with half the convolutions to compile: the tests' short ResNet.
    norm: ``"batch"`` (BatchNorm, running statistics in ``rest``), ``"group"`` or
      ``"none"``.
    sites: put :func:`fwdgrad_jax.site` markers on the stage outputs and the logits
      (Flügel's layers for activity perturbation).
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    width: int = 64,
    blocks: int = 2,
    norm: str = "batch",
    sites: bool = True,
  ):
    if norm not in _NORMS:
      raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if int(width) != width or width < 1:
      raise ValueError(f"width must be a positive integer, got {width!r}")
    if int(blocks) != blocks or blocks < 1:
      raise ValueError(f"blocks must be a positive integer, got {blocks!r}")
    width, blocks = int(width), int(blocks)
    self.sites = bool(sites)
    self.stem = _conv(input_shape[2], width, 3, 1, rngs)
    self.stem_norm = _norm(norm, width, rngs)
    stages, cin = [], width
    for i, stride in enumerate((1, 2, 2, 2)):
      cout = width * 2**i
      first = _BasicBlock(cin, cout, stride, norm, rngs)
      stages.append(
        nnx.List([first] + [_BasicBlock(cout, cout, 1, norm, rngs) for _ in range(blocks - 1)])
      )
      cin = cout
    self.stages = nnx.List(stages)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def _mark(self, x: jax.Array) -> jax.Array:
    return site(x) if self.sites else x

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.stem(x)
    if self.stem_norm is not None:
      h = self.stem_norm(h)
    h = jax.nn.relu(h)
    for stage in self.stages:
      for block in stage:
        h = block(h)
      h = self._mark(h)
    return self._mark(self.head(jnp.mean(h, axis=(1, 2))))


class _EncoderLayer(nnx.Module):
  """Pre-LN transformer encoder layer: x + MHA(LN(x)), then x + MLP(LN(x)) with GELU."""

  def __init__(self, hidden: int, heads: int, mlp: int, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(hidden, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=heads,
      in_features=hidden,
      qkv_features=hidden,
      out_features=hidden,
      decode=False,
      rngs=rngs,
    )
    self.ln2 = nnx.LayerNorm(hidden, rngs=rngs)
    self.fc1 = nnx.Linear(hidden, mlp, rngs=rngs)
    self.fc2 = nnx.Linear(mlp, hidden, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.ln1(x)
    x = x + self.attn(h, h, h)
    h = self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))
    return x + h


@register("vit")
class ViT(nnx.Module):
  """Small vision transformer (Dosovitskiy et al. 2021) of Flügel et al. §4.5: 6 layers, 4 heads.

  The paper's extracted text lost the hidden and MLP widths; the defaults here are
  hidden 128 and MLP 256 (4 heads of 32). Non-overlapping ``patch``×``patch`` patches
  (default 4: 28×28 → 7×7 = 49 tokens, 32×32 → 8×8 = 64 tokens) are embedded linearly,
  a learned class token and learned position embeddings are added, then ``layers``
  pre-LN encoder layers, a final LayerNorm and a Linear head on the class token. No
  dropout. With the defaults: 0.80 M parameters on 28×28×1, 10 classes.

  Args:
    patch: patch side; must divide the image height and width.
    hidden: token width.
    heads: attention heads (must divide ``hidden``).
    mlp: hidden width of each encoder layer's MLP.
    layers: number of encoder layers.
    sites: put :func:`fwdgrad_jax.site` markers on encoder layers 1..L−1 and on the
      logits (Flügel's layers: embedding merged into the first, head into the last).
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    patch: int = 4,
    hidden: int = 128,
    heads: int = 4,
    mlp: int = 256,
    layers: int = 6,
    sites: bool = True,
  ):
    h, w, c = input_shape
    if h % patch or w % patch:
      raise ValueError(f"patch={patch} must divide the image size {h}x{w}")
    if hidden % heads:
      raise ValueError(f"heads={heads} must divide hidden={hidden}")
    if layers < 1:
      raise ValueError(f"layers must be >= 1, got {layers!r}")
    self.patch = int(patch)
    self.sites = bool(sites)
    tokens = (h // patch) * (w // patch)
    self.embed = nnx.Linear(patch * patch * c, hidden, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.cls = nnx.Param(init(rngs.params(), (1, 1, hidden)))
    self.pos = nnx.Param(init(rngs.params(), (1, tokens + 1, hidden)))
    self.layers = nnx.List([_EncoderLayer(hidden, heads, mlp, rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def _patches(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    p = self.patch
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def __call__(self, x: jax.Array) -> jax.Array:
    t = self.embed(self._patches(x))
    cls = jnp.broadcast_to(self.cls[...], (t.shape[0], 1, t.shape[2]))
    t = jnp.concatenate([cls, t], axis=1) + self.pos[...]
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      t = layer(t)
      if self.sites and i < last:
        t = site(t)
    logits = self.head(self.ln(t[:, 0]))
    return site(logits) if self.sites else logits
