"""Tests for the Flügel et al. 2024 experiment scripts' own formulas (the runs are in results/)."""

import math

import numpy as np
import pytest

from experiments.flugel2024 import fig3, lib


def test_one_tangent_abs_cosine_closed_form_matches_known_cases_and_monte_carlo():
  # n = 1: the estimate is always ±∇f; n = 2: the angle is uniform, E|cos θ| = 2/π.
  assert lib.expected_abs_cos_one_tangent(1) == pytest.approx(1.0)
  assert lib.expected_abs_cos_one_tangent(2) == pytest.approx(2 / math.pi)
  # Large n: √(2/(πn)) (Flügel et al. §3).
  assert lib.expected_abs_cos_one_tangent(10_000) == pytest.approx(
    math.sqrt(2 / (math.pi * 1e4)), rel=1e-3
  )
  # n = 7 against 200k numpy draws (s.e. ≈ 6e-4).
  v = np.random.default_rng(0).standard_normal((200_000, 7))
  mc = np.mean(np.abs(v[:, 0]) / np.linalg.norm(v, axis=1))
  assert lib.expected_abs_cos_one_tangent(7) == pytest.approx(mc, abs=4 * 6e-4)


def test_fig3_k_grid_runs_past_n_and_includes_n():
  ks = fig3._ks(64)
  assert ks[0] == 1 and 64 in ks and ks[-1] == 128 and ks == sorted(set(ks))
