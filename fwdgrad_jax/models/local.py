"""Local losses for NNX models (Ren et al. 2023's local greedy losses), and LocalMixer.

A model with local losses is cut into blocks with ``jax.lax.stop_gradient`` between them;
each block feeds a small classifier head (zero-initialised) with its own cross-entropy.
The convention the training app reads:

* ``model.local_losses`` is True;
* ``model.local_logits(x)`` returns a list of logits, one per local loss, each of shape
  ``(batch, ..., num_classes)`` (the axes between batch and classes, e.g. patches and
  channel groups, are averaged in that loss), in the order of the blocks, the last
  head's last;
* ``model(x)`` returns the last head's ``(batch, num_classes)`` logits: what evaluation uses.

:func:`local_losses_total` turns the list into the total, every term marked with
:func:`fwdgrad_jax.local_loss`, so ``jax.grad`` of the total is LG-BP and a forward
estimator with ``perturbation="activity"`` credits each activity only with the losses it
reaches (LG-FG-A). :func:`train_loss` is the app's loss of any model, local or not.

Order matters for ``perturbation="activity"``: compute a block's head *before* the next
block reads ``stop_gradient`` of the same features. The activity interpreter gives an
op (the block's last activation) to the first block in program order that reads it, and
refuses a program in which a later head reads an activation already given to the next
block (its local VJP would miss that path).

References:
  Ren, Kornblith, Liao, Hinton, 2023. Scaling Forward Gradient With Local Losses. ICLR 2023,
  arXiv:2210.03310.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fwdgrad_jax.models.layers import get_activation
from fwdgrad_jax.models.registry import Shape, register
from fwdgrad_jax.perturbation.markers import local_loss, site

_zeros = nnx.initializers.zeros_init()


class LocalHead(nnx.Module):
  """A local classifier head: [LayerNorm →] zero-initialised Linear to ``num_classes``.

  Zero-initialised, so a new head predicts uniformly and sends no gradient into its block
  until it has learnt something (Ren et al.'s heads). Features come in as ``(..., features)``
  (pool spatial axes first, or keep them for one prediction per position).

  Args:
    features: width of the block's output.
    num_classes: number of logits.
    rngs: ``nnx.Rngs``.
    norm: a LayerNorm before the Linear.
  """

  def __init__(self, features: int, num_classes: int, *, rngs: nnx.Rngs, norm: bool = False):
    self.norm = nnx.LayerNorm(features, rngs=rngs) if norm else None
    self.linear = nnx.Linear(features, num_classes, kernel_init=_zeros, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    if self.norm is not None:
      h = self.norm(h)
    return self.linear(h)


def has_local_losses(model: nnx.Module) -> bool:
  """Whether ``model`` follows the local-loss convention (``local_losses`` and ``local_logits``)."""
  return bool(getattr(model, "local_losses", False)) and callable(
    getattr(model, "local_logits", None)
  )


def local_losses_total(
  logits: Sequence[jax.Array], labels: jax.Array, *, per_example: bool = False
) -> jax.Array:
  """Σ_b ``local_loss(ce_b)``: the total of the heads' cross-entropies, each term marked.

  Args:
    logits: one ``(batch, ..., num_classes)`` array per local loss; its cross-entropy is
      averaged over the axes between batch and classes.
    labels: ``(batch,)`` integer labels.
    per_example: mark and sum ``(batch,)`` vectors (activity perturbation: each example its
      own directional derivatives); otherwise mark and sum scalar means (the core refuses
      per-example marks inside a scalar total).

  Returns:
    The total, ``(batch,)`` or a scalar.
  """
  total = 0.0
  for z in logits:
    y = jnp.broadcast_to(labels.reshape(labels.shape + (1,) * (z.ndim - 2)), z.shape[:-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
    if not per_example:
      total = total + local_loss(jnp.mean(ce))
      continue
    # Marked per slice (batch, *axes), each 1/slices of its example's loss: a site
    # sliced like it (Ren et al.'s loss per patch and group) is credited per slice.
    mid = tuple(range(1, ce.ndim))
    total = total + jnp.sum(local_loss(ce / math.prod(ce.shape[1:])), axis=mid)
  return total


def train_loss(model: nnx.Module, x: jax.Array, y: jax.Array, *, per_example: bool = False):
  """The training loss of ``model`` on a batch: the marked local total, or the plain CE.

  Args:
    model: any NNX classifier; one with :func:`has_local_losses` trains on its local losses.
    x: the batch of inputs.
    y: ``(batch,)`` integer labels.
    per_example: the ``(batch,)`` vector instead of the mean.
  """
  if has_local_losses(model):
    return local_losses_total(model.local_logits(x), y, per_example=per_example)
  ce = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
  return ce if per_example else jnp.mean(ce)


class _TokenMixing(nnx.Module):
  """Linear across tokens (patches), the same for every channel."""

  def __init__(self, tokens: int, rngs: nnx.Rngs):
    self.linear = nnx.Linear(tokens, tokens, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:  # (B, P, D)
    return jnp.swapaxes(self.linear(jnp.swapaxes(h, 1, 2)), 1, 2)


class _MixerBlock(nnx.Module):
  """LayerNorm → token mixing (residual) → LayerNorm → channel MLP whose second layer is
  grouped (one Linear per group, residual per group) → per group a head on every patch."""

  def __init__(self, tokens, channels, hidden, groups, num_classes, act, rngs):
    self.groups = groups
    self.norm1 = nnx.LayerNorm(channels, rngs=rngs)
    self.token = _TokenMixing(tokens, rngs)
    self.norm2 = nnx.LayerNorm(channels, rngs=rngs)
    self.fc1 = nnx.Linear(channels, hidden, rngs=rngs)
    self.fc2 = nnx.List(
      [nnx.Linear(hidden // groups, channels // groups, rngs=rngs) for _ in range(groups)]
    )
    self.heads = nnx.List(
      [LocalHead(channels // groups, num_classes, rngs=rngs, norm=True) for _ in range(groups)]
    )
    self.act = act

  def __call__(self, z: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    u = z + self.token(self.norm1(z))
    a = self.act(self.fc1(self.norm2(u)))
    a_groups = jnp.split(a, self.groups, axis=-1)
    u_groups = jnp.split(u, self.groups, axis=-1)
    outs = [ug + fc(ag) for ug, fc, ag in zip(u_groups, self.fc2, a_groups, strict=True)]
    # The block's output is its activity-perturbation site, sliced (batch, patch, group,
    # features) like its losses: each (patch, group) slice is credited with its own loss.
    zg = site(jnp.stack(outs, axis=2))
    logits = [head(zg[:, :, g]) for g, head in enumerate(self.heads)]  # (B, P, classes) each
    return zg.reshape(*zg.shape[:2], -1), jnp.stack(logits, axis=2)  # (B, P, G, classes)


@register("local_mixer")
class LocalMixer(nnx.Module):
  """Ren et al. 2023's LocalMixer, small: patches → linear embedding → mixer blocks.

  The image is cut into ``patches × patches`` non-overlapping patches (tokens), embedded
  by one Linear to ``channels``. Each block: LayerNorm → token mixing (a Linear across
  tokens, residual) → LayerNorm → channel MLP (``channels → hidden``, activation, then a
  grouped Linear: each of ``groups`` channel groups its own weights, residual). Each
  group of each block has a head (LayerNorm → zero-initialised Linear) applied to every
  patch, so that every (patch, group) pair predicts the label; a block's loss is their
  mean. With ``local_losses`` each block's input is ``stop_gradient``-ed and its loss
  is marked per example, patch and group (see the module docstring); without, the model is an
  ordinary MLP-Mixer trained end to end on the last block's output. ``model(x)`` averages
  the last block's logits over patches and groups.

  Each block's output carries a :func:`fwdgrad_jax.site` marker: with
  ``perturbation="activity"`` the tangents go there (one per example), the block's
  parameters get their estimate by a VJP local to the block, and the heads, after the
  sites, by the exact local gradient (as in Ren et al.'s code). Per-layer sites inside a
  block are not possible here: LayerNorm's statistics and the channel MLP's first layer
  are shared by the groups, and the activity interpreter refuses a value read across
  sites. The block's site reaches only its own block's loss (stop-gradient), and it is
  shaped (batch, patch, group, features) like that loss (batch, patch, group): each
  (patch, group) slice of the activity is credited with its own head's loss only — a
  directional derivative in ``channels/groups`` dimensions, as in Ren et al.'s LG-FG-A.

  Simplifications against Ren et al.: no per-patch stop-gradient in the token mixing, no
  Kaiming-capped init (flax's default).

  Args:
    patches: patches per side (``H`` and ``W`` must be multiples of it).
    channels: embedding width (a multiple of ``groups``).
    hidden: width of the channel MLP (a multiple of ``groups``).
    groups: channel groups (a loss each).
    blocks: number of mixer blocks.
    activation: name in :data:`fwdgrad_jax.models.ACTIVATIONS`.
    local_losses: stop-gradient between blocks and a marked loss per block and group.
    stop_gradient: with ``local_losses``, the stop-gradient between blocks (Ren et al.);
      False trains every block on all later blocks' losses too (deep supervision: the
      total's gradient is then global, and a block's own head's gradient only a guess of
      it, as in Fournier et al. 2023's local guesses).

  References:
    Ren et al., 2023. Scaling Forward Gradient With Local Losses. ICLR 2023, arXiv:2210.03310.
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    patches: int = 4,
    channels: int = 64,
    hidden: int = 128,
    groups: int = 4,
    blocks: int = 2,
    activation: str = "relu",
    local_losses: bool = True,
    stop_gradient: bool = True,
  ):
    h, w, c = input_shape
    if patches < 1 or h % patches or w % patches:
      raise ValueError(f"patches={patches!r} must divide the image size {h}x{w}")
    if groups < 1 or channels % groups or hidden % groups:
      raise ValueError(f"channels={channels} and hidden={hidden} must be multiples of groups")
    if blocks < 1:
      raise ValueError(f"blocks must be >= 1, got {blocks!r}")
    self.patches = patches
    self.local_losses = bool(local_losses)
    self.stop_gradient = bool(stop_gradient)
    tokens = patches * patches
    self.embed = nnx.Linear((h // patches) * (w // patches) * c, channels, rngs=rngs)
    act = get_activation(activation)
    self.blocks = nnx.List(
      [_MixerBlock(tokens, channels, hidden, groups, num_classes, act, rngs) for _ in range(blocks)]
    )

  def _tokens(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    p = self.patches
    x = x.reshape(b, p, h // p, p, w // p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, p * p, -1)

  def _block_logits(self, x: jax.Array) -> list[list[jax.Array]]:
    z = self.embed(self._tokens(x))
    out = []
    for i, block in enumerate(self.blocks):
      if self.local_losses and self.stop_gradient and i:  # the embedding learns with block 0
        z = jax.lax.stop_gradient(z)
      z, logits = block(z)
      out.append(logits)
    return out

  def local_logits(self, x: jax.Array) -> list[jax.Array]:
    """Every block's logits per patch and group, ``(batch, patches², groups, num_classes)``."""
    return self._block_logits(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.mean(self._block_logits(x)[-1], axis=(1, 2))


def pooled(h: jax.Array) -> jax.Array:
  """Mean over every axis between batch and features: ``(B, ..., C) → (B, C)``."""
  return jnp.mean(h, axis=tuple(range(1, h.ndim - 1))) if h.ndim > 2 else h


__all__ = [
  "LocalHead",
  "LocalMixer",
  "has_local_losses",
  "local_losses_total",
  "pooled",
  "train_loss",
]
