"""Tests of the tangent samplers (fwdgrad_jax.tangents)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwdgrad_jax import tangents
from fwdgrad_jax import tangents as T

_PARAMS = {"w": jnp.zeros((30, 40)), "b": jnp.zeros((7,), jnp.bfloat16), "s": jnp.zeros(())}

# The draws are jitted: eagerly every op of one compiles on its own (about a hundred).
_sample = jax.jit(tangents.sample, static_argnums=(2, 3), static_argnames="normalized")


@pytest.mark.parametrize("name", sorted(tangents.SAMPLERS))
def test_shapes_dtypes_and_structure(name):
  batch = _sample(jax.random.key(0), _PARAMS, 3, name)
  assert jax.tree.structure(batch) == jax.tree.structure(_PARAMS)
  for v, p in zip(jax.tree.leaves(batch), jax.tree.leaves(_PARAMS)):
    assert v.shape == (3, *p.shape) and v.dtype == p.dtype


@pytest.mark.parametrize("name", ["normal", "rademacher", "normal_threefry", "rademacher_threefry"])
def test_unit_second_moment_and_independence(name):
  """E v = 0 and E v² = 1 per component, within standard errors, over 3×1207 draws."""
  batch = _sample(jax.random.key(1), {"w": jnp.zeros((400_000,))}, 2, name)
  v = np.asarray(batch["w"], np.float64)
  n = v.size
  assert abs(v.mean()) < 5 / math.sqrt(n)
  fourth = 3.0 if name.startswith("normal") else 1.0  # E v⁴, so Var v² = fourth − 1
  assert abs((v**2).mean() - 1) < 5 * math.sqrt(max(fourth - 1, 1e-12) / n) + 1e-12
  # Tangents of one batch are independent of each other: E[v_1 v_2] = 0.
  assert abs(np.mean(v[0] * v[1])) < 5 / math.sqrt(v.shape[1])
  # Neighbouring counters of the hash are independent too: E[v_j v_{j+1}] = 0.
  assert abs(np.mean(v[0, 1:] * v[0, :-1])) < 5 / math.sqrt(v.shape[1])
  if name.startswith("rademacher"):
    assert set(np.unique(v)) == {-1.0, 1.0}
  else:
    # Gaussian tails: P(|v| > 3) = 0.0027, with its binomial standard error.
    p = 2 * 0.0013499
    assert abs(np.mean(np.abs(v) > 3) - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_leaves_get_independent_streams():
  # Two leaves of the same shape must not receive the same (or a shifted) stream.
  batch = _sample(jax.random.key(9), {"a": jnp.zeros(50_000), "b": jnp.zeros(50_000)}, 1)
  a, b = np.asarray(batch["a"][0], np.float64), np.asarray(batch["b"][0], np.float64)
  assert abs(np.mean(a * b)) < 5 / math.sqrt(a.size)
  assert abs(np.mean(a[1:] * b[:-1])) < 5 / math.sqrt(a.size)


def test_rademacher_bits_are_balanced_per_position():
  # The bit-unpacking must not favour any of the 32 positions of a random word.
  v = np.asarray(_sample(jax.random.key(2), jnp.zeros((32 * 20_000,)), 1, "rademacher"))
  ones = (v.reshape(-1, 32) > 0).mean(0)
  assert np.all(np.abs(ones - 0.5) < 5 * 0.5 / math.sqrt(20_000))


def test_normalized_tangents_have_unit_norm_over_the_pytree():
  batch = _sample(jax.random.key(3), _PARAMS, 4, "normal", normalized=True)
  sq = sum(
    np.sum(np.asarray(v, np.float64).reshape(4, -1) ** 2, axis=1) for v in jax.tree.leaves(batch)
  )
  np.testing.assert_allclose(sq, 1.0, rtol=1e-2)  # bf16 leaf limits the precision


def test_partition_blocks_are_contiguous_and_sum_to_one_gaussian_vector():
  params = {"a": jnp.zeros((5,)), "b": jnp.zeros((7,))}
  batch = _sample(jax.random.key(4), params, 3, "partition")
  flat = np.concatenate([np.asarray(batch["a"]), np.asarray(batch["b"])], axis=1)  # (3, 12)
  owner = np.argmax(flat != 0, axis=0)
  np.testing.assert_array_equal(owner, (np.arange(12) * 3) // 12)
  assert ((flat != 0).sum(0) == 1).all()


def test_fresh_keys_give_fresh_tangents_and_same_keys_repeat():
  a = _sample(jax.random.key(5), _PARAMS, 2)
  b = _sample(jax.random.key(5), _PARAMS, 2)
  c = _sample(jax.random.key(6), _PARAMS, 2)
  np.testing.assert_array_equal(a["w"], b["w"])
  assert not np.allclose(a["w"], c["w"])
  assert not np.allclose(a["w"][0], a["w"][1])


def test_unknown_name_is_a_clear_error():
  with pytest.raises(ValueError, match="tangents='sobol'"):
    tangents.get_sampler("sobol")


def _cone_params():
  return {"w": jnp.zeros((6, 5)), "b": jnp.zeros(4)}


@pytest.mark.parametrize("angle", [np.pi / 2, np.pi / 4, 0.1])
def test_cone_tangents_sit_at_the_angle_to_the_first(angle):
  batch = jax.jit(T.cone(angle), static_argnums=2)(jax.random.key(0), _cone_params(), 8)
  flat = np.concatenate([np.asarray(v).reshape(8, -1) for v in jax.tree.leaves(batch)], 1)
  base = np.concatenate(
    [
      np.asarray(v).reshape(8, -1)
      for v in jax.tree.leaves(
        jax.jit(T.normal, static_argnums=2)(jax.random.key(0), _cone_params(), 8)
      )
    ],
    1,
  )
  cos = flat[1:] @ flat[0] / (np.linalg.norm(flat[1:], axis=1) * np.linalg.norm(flat[0]))
  np.testing.assert_allclose(cos, np.cos(angle), atol=1e-5)
  np.testing.assert_allclose(flat[0], base[0])  # v₁ is the base draw
  np.testing.assert_allclose(np.linalg.norm(flat, axis=1), np.linalg.norm(base, axis=1), rtol=1e-5)


def test_cone_rejects_a_bad_angle():
  with pytest.raises(ValueError, match="angle"):
    T.cone(0.0)
  with pytest.raises(ValueError, match="angle"):
    T.cone(2.0)
