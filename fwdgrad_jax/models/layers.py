"""Building blocks shared by the model families: activations, initialisers, conv and pooling."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

#: Activation names accepted wherever a model takes ``activation``; strings keep configs
#: (YAML) free of Python objects.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": jax.nn.relu,
  "tanh": jnp.tanh,
  "sigmoid": jax.nn.sigmoid,
  "gelu": jax.nn.gelu,
  "silu": jax.nn.silu,
  "elu": jax.nn.elu,
  "leaky_relu": jax.nn.leaky_relu,
  "softplus": jax.nn.softplus,
  "identity": lambda x: x,
}

_INITS: dict[str, Callable[[], nnx.Initializer]] = {
  "lecun_normal": nnx.initializers.lecun_normal,  # flax default for Linear/Conv
  "he_normal": nnx.initializers.he_normal,
  "glorot_normal": nnx.initializers.glorot_normal,
  "glorot_uniform": nnx.initializers.glorot_uniform,
}


def get_activation(act: str | Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
  if callable(act):
    return act
  try:
    return ACTIVATIONS[act]
  except KeyError:
    raise ValueError(
      f"unknown activation {act!r}; known: {', '.join(sorted(ACTIVATIONS))}"
    ) from None


def get_kernel_init(name: str) -> nnx.Initializer:
  try:
    return _INITS[name]()
  except KeyError:
    raise ValueError(f"unknown kernel_init {name!r}; known: {', '.join(_INITS)}") from None


def flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  # VALID pooling floors odd sizes (7 -> 3), matching PyTorch's MaxPool2d(2) that the
  # reference implementations use.
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def fan_in_init_2d(init: nnx.Initializer) -> nnx.Initializer:
  """Draw a conv kernel as a 2-D ``(kh*kw*cin, cout)`` matrix and reshape it.

  XLA:CPU takes seconds (up to ~20 s on 2 cores) to compile a partitionable-threefry
  draw of a 4-D shape such as ``(3, 3, 8, 16)``, versus ~0.3 s for the same number of
  values in 2-D; every distinct conv shape pays it again. For fan-in initialisers
  (LeCun, He; in_axis=-2, out_axis=-1) the 2-D view has the same fan-in,
  ``kh*kw*cin``, so the distribution is unchanged. Not valid for fan_out/fan_avg modes.
  """

  def init_2d(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    shape = tuple(shape)
    if len(shape) <= 2:
      return init(key, shape, dtype)
    return init(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)

  return init_2d


# flax's default Conv initialiser, made cheap to compile (see fan_in_init_2d).
CONV_INIT = fan_in_init_2d(nnx.initializers.lecun_normal())


def conv3x3(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Conv:
  # 'SAME' with a 3x3 kernel and stride 1 is exactly PyTorch's padding=1 (zero padding).
  return nnx.Conv(cin, cout, kernel_size=(3, 3), padding="SAME", kernel_init=CONV_INIT, rngs=rngs)
