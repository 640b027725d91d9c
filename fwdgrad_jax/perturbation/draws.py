"""The interpreter's random draws: the counter hash of :mod:`fwdgrad_jax.tangents`, per (index, salt).

A draw is named by an index (a parameter leaf, or a site) and a salt (which kind of draw
for it), so that every draw of a step has independent seeds from one key without a
threefry call, as the dense samplers' :func:`~fwdgrad_jax.tangents.leaf_seeds`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwdgrad_jax import tangents as tangents_lib

SALT_DENSE, SALT_A, SALT_B, SALT_PICK, SALT_SITE = 1, 2, 3, 4, 5


def seed(words: jax.Array, index: int, salt: int) -> jax.Array:
  """Two uint32 hash seeds for draw ``index`` of kind ``salt`` (independent per pair)."""
  mix = tangents_lib.fmix32
  i = jnp.uint32((2 * index + 1) * 0x9E3779B1 % (1 << 32))
  s = jnp.uint32(salt)
  return jnp.stack([mix(words[0] ^ mix(i ^ s)), mix(words[-1] + mix(i + s + 1))])


def normal(words, index, salt, shape, dtype) -> jax.Array:
  return tangents_lib.hash_normal(seed(words, index, salt), shape, dtype)


def rademacher(words, index, salt, shape, dtype) -> jax.Array:
  return tangents_lib.hash_rademacher(seed(words, index, salt), shape, dtype)


def uniform_index(words, index, salt, k: int, size: int) -> jax.Array:
  """k indices uniform in [0, size)."""
  bits = tangents_lib.hash_bits(seed(words, index, salt), k)
  # 53-bit-free: a float in [0, 1) from the top 24 bits, floored; bias < size / 2^24.
  u = (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
  return jnp.minimum((u * size).astype(jnp.int32), size - 1)
