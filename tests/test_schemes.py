"""Tests of the tangent scheme objects (fwdgrad_jax.schemes), the one option list and the registry."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad_jax as fg
from fwdgrad_jax import estimators, registry, schemes
from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import steps as steps_lib

S = schemes


def _mlp():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {
    "w1": jax.random.normal(k1, (6, 5)) / 3,
    "b1": jnp.zeros(5),
    "w2": jax.random.normal(k2, (5, 3)) / 3,
  }
  x = jax.random.normal(k3, (8, 6))

  def losses(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.sum(jnp.sin(h @ p["w2"]), -1)

  return params, x, losses


# --------------------------------------------------------------------------------------
# parse: every documented string
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "options, scheme",
  [
    ({}, S.Dense("normal")),
    ({"tangents": "normal"}, S.Dense("normal")),
    ({"tangents": "gaussian"}, S.Dense("gaussian")),
    ({"tangents": "rademacher"}, S.Dense("rademacher")),
    ({"tangents": "partition"}, S.Dense("partition")),
    ({"tangents": "normal_threefry"}, S.Dense("normal_threefry")),
    ({"tangents": "rademacher_threefry"}, S.Dense("rademacher_threefry")),
    ({"tangents": "normal", "normalize": True}, S.Dense("normal", normalize=True)),
    ({"tangents": "rademacher", "regenerate": True}, S.Dense("rademacher", regenerate=True)),
    ({"regenerate": True}, S.Dense("normal", regenerate=True)),
    ({"tangents": "rank1"}, S.Rank1()),
    ({"tangents": "rank1", "normalize": True}, S.Rank1(normalize=True)),
    ({"tangents": "input"}, S.Input()),
    ({"tangents": "input_approx"}, S.Input(approx=True)),
    ({"tangents": "input", "normalize": True}, S.Input(normalize=True)),
    ({"perturbation": "weights"}, S.Dense()),
    ({"perturbation": "activity"}, S.Activity("normal")),
    ({"perturbation": "activity", "tangents": "rademacher"}, S.Activity("rademacher")),
  ],
)
def test_parse_reads_every_documented_string(options, scheme):
  assert schemes.parse(**options) == scheme


def test_parse_takes_a_callable_and_returns_an_object_as_is():
  sampler = fg.tangents.cone(0.5)
  assert schemes.parse(sampler) == S.Dense(sampler)
  obj = S.Rank1(normalize=True)
  assert schemes.parse(obj) is obj


def test_every_config_tangent_name_parses():
  for name in config_lib.TANGENT_NAMES:
    assert isinstance(schemes.parse(name), S.Scheme)
  for name in fg.perturbation.ACTIVITY_TANGENTS:
    assert isinstance(schemes.parse(name, perturbation="activity"), S.Activity)


# --------------------------------------------------------------------------------------
# Validation, at construction
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "build, match",
  [
    (lambda: S.Dense("uniform"), "tangents='uniform'"),
    (lambda: S.Dense(3), "tangents=3"),
    (lambda: S.Dense("rank1"), "tangents='rank1'"),
    (lambda: S.Dense("partition", regenerate=True), "regenerate=True.*tangents='partition'"),
    (lambda: S.Dense(lambda k, p, n: p, regenerate=True), "regenerate=True"),
    (lambda: S.Dense(normalize=True, regenerate=True), "regenerate=True.*normalize=True"),
    (lambda: S.Activity("rank1"), "does not apply to perturbation='activity'"),
    (lambda: S.Activity("partition"), "tangents='partition'"),
    (lambda: schemes.parse("uniform"), "tangents='uniform'"),
    (lambda: schemes.parse(perturbation="sideways"), "perturbation='sideways'"),
    (lambda: schemes.parse("rank1", perturbation="activity"), "perturbation='activity'"),
    (lambda: schemes.parse(perturbation="activity", normalize=True), "normalize=True"),
    (lambda: schemes.parse(perturbation="activity", regenerate=True), "regenerate=True"),
    (lambda: schemes.parse("input", regenerate=True), "regenerate=True.*tangents='input'"),
    (lambda: schemes.parse(S.Rank1(), normalize=True), "scheme object.*normalize=True"),
    (lambda: schemes.parse(S.Dense(), perturbation="activity"), "perturbation='activity'"),
    (lambda: schemes.parse(S.Dense(), regenerate=True), "regenerate=True"),
  ],
)
def test_bad_options_raise_naming_the_option(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_check_refuses_combinations_with_the_other_options():
  fake = type("FakeMesh", (), {"shape": {"data": 1, "tangents": 2}})()
  regen = S.Dense(regenerate=True)
  with pytest.raises(ValueError, match="regenerate=True.*aggregation="):
    regen.check(num_tangents=2, aggregation=lambda v, d: v)
  # Tangent parallelism regenerates each device's share (tests/test_parallel.py).
  regen.check(num_tangents=2, aggregation="mean", mesh=fake)
  with pytest.raises(ValueError, match="multiple of mesh.tangents=2"):
    regen.check(num_tangents=3, aggregation="mean", mesh=fake)
  for scheme in (S.Rank1(), S.Input(), S.Activity()):
    with pytest.raises(ValueError, match="dense weight tangents"):
      scheme.check(num_tangents=2, aggregation="mean", mesh=fake)
  with pytest.raises(ValueError, match="multiple of mesh.tangents=2"):
    S.Dense().check(num_tangents=3, aggregation="mean", mesh=fake)
  S.Dense().check(num_tangents=4, aggregation="orthogonal", mesh=fake)


def test_schemes_are_frozen_and_hashable():
  s = S.Dense("rademacher", normalize=True)
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.normalize = False
  assert len({s, S.Dense("rademacher", normalize=True), S.Rank1(), S.Rank1()}) == 2


# --------------------------------------------------------------------------------------
# An object and its string: the identical estimate with the same key
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "options, scheme",
  [
    ({"tangents": "normal"}, S.Dense()),
    ({"tangents": "rademacher", "normalize": True}, S.Dense("rademacher", normalize=True)),
    ({"tangents": "partition"}, S.Dense("partition")),
    ({"tangents": "normal", "regenerate": True}, S.Dense(regenerate=True)),
    ({"tangents": "rank1"}, S.Rank1()),
    ({"tangents": "rank1", "normalize": True}, S.Rank1(normalize=True)),
    ({"tangents": "input"}, S.Input()),
    ({"tangents": "input_approx"}, S.Input(approx=True)),
    ({"perturbation": "activity"}, S.Activity()),
    ({"perturbation": "activity", "tangents": "rademacher"}, S.Activity("rademacher")),
  ],
)
@pytest.mark.parametrize("aggregation", ["mean", "orthogonal"])
def test_an_object_and_its_string_give_the_identical_estimate(options, scheme, aggregation):
  params, x, losses = _mlp()
  per_example = options.get("perturbation") == "activity"
  fun = losses if per_example else (lambda p, x: jnp.mean(losses(p, x)))
  common = dict(num_tangents=3, aggregation=aggregation, rescale=True, max_jvp_norm=10.0)
  by_name = fg.value_and_forward_grad(fun, **options, **common)
  by_object = fg.value_and_forward_grad(fun, tangents=scheme, **common)
  both = lambda key: (by_name(key, params, x), by_object(key, params, x))
  # Eagerly every op compiles on its own, once for all the cases that share it; the
  # regenerated draws (one per tangent and leaf) and the activity passes have many of
  # their own: one compiled program for both estimates instead.
  if options.get("regenerate") or per_example:
    both = jax.jit(both)
  (v1, g1), (v2, g2) = both(jax.random.key(4))
  np.testing.assert_array_equal(v1, v2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(g1))


def test_forward_gradient_takes_a_scheme_object():
  params, x, losses = _mlp()
  fun = lambda p, x: jnp.mean(losses(p, x))
  key = jax.random.key(1)
  by_name = fg.forward_gradient(2, "rank1", key=key)
  by_object = fg.forward_gradient(2, S.Rank1(), key=key)

  def updates():
    return [
      tx.update(params, tx.init(params), params, value_fn=fun, x=x)[0]
      for tx in (by_name, by_object)
    ]

  # One compiled program for both updates (eagerly every op compiles on its own).
  g1, g2 = jax.jit(updates)()
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(a, b)


def test_norm_ratio_is_expected_norm_ratio_of_the_scheme():
  n, k = 50, 4
  assert S.Dense("rademacher").norm_ratio(n, k, "sum") == fg.expected_norm_ratio(
    n, k, "sum", "rademacher"
  )
  assert S.Dense(normalize=True).norm_ratio(n, k, "mean") == fg.expected_norm_ratio(
    n, k, "mean", normalize=True
  )
  assert S.Rank1().norm_ratio(n, k, "mean") == fg.expected_norm_ratio(n, k, "mean", "rank1")
  assert S.Dense(lambda key, p, k: p).norm_ratio(n, k, "mean") == 1.0


# --------------------------------------------------------------------------------------
# The option list, stated once
# --------------------------------------------------------------------------------------


def _keyword_defaults(fn, skip):
  return {
    name: p.default for name, p in inspect.signature(fn).parameters.items() if name not in skip
  }


def test_the_estimators_signatures_are_the_option_list():
  assert _keyword_defaults(fg.value_and_forward_grad, ("fun",)) == estimators.FORWARD_OPTIONS
  assert _keyword_defaults(fg.forward_gradient, ("key",)) == estimators.FORWARD_OPTIONS
  assert list(_keyword_defaults(fg.forward_gradient, ("key",))) == list(estimators.FORWARD_OPTIONS)


# Config defaults that deliberately differ from the library's (see EstimatorConfig).
_CONFIG_DEFAULTS = {"rescale": True}


def test_the_config_schema_and_estimator_options_follow_the_option_list():
  config_fields = {f.name: f for f in dataclasses.fields(config_lib.EstimatorConfig)}
  options = {n for est in registry.ESTIMATORS.values() for n in est.config_options}
  # Every config field but the name is some estimator's option, and the reverse.
  assert set(config_fields) - {"name"} == options
  forward = registry.ESTIMATORS["forward"].config_options
  assert set(forward) == set(estimators.FORWARD_OPTIONS) - set(estimators.RUNTIME_OPTIONS)
  for name in forward:
    want = _CONFIG_DEFAULTS.get(name, estimators.FORWARD_OPTIONS[name])
    assert config_fields[name].default == want, name
  guided = inspect.signature(fg.guided_forward_gradient).parameters
  for name in registry.ESTIMATORS["guided"].config_options:
    assert config_fields[name].default == guided[name].default, name
  for name, est in registry.ESTIMATORS.items():
    cfg = config_lib.EstimatorConfig(name=name)
    got = steps_lib.estimator_options(cfg)
    assert got == {n: getattr(cfg, n) for n in est.config_options}
    if est.uses_key:  # the options build the estimator
      registry.gradient_transform(name, key=jax.random.key(0), **got)
    else:
      assert got == {}


# --------------------------------------------------------------------------------------
# The registry (the import graph is checked in test_architecture.py)
# --------------------------------------------------------------------------------------


def test_the_registry_names_stay_where_they_were():
  from fwdgrad_jax import functions, transforms

  with pytest.warns(DeprecationWarning, match="moved to fwdgrad_jax.registry"):
    assert fg.ESTIMATORS is registry.ESTIMATORS is transforms.ESTIMATORS
  assert fg.get_estimator is registry.get_estimator is estimators.get_estimator
  assert fg.gradient_transform is registry.gradient_transform is transforms.gradient_transform
  assert registry.get("forward").value_and_grad is fg.value_and_forward_grad
  assert fg.directional_derivatives is schemes.directional_derivatives
  assert fg.expected_norm_ratio is schemes.expected_norm_ratio
  assert fg.schemes is schemes
  assert callable(functions.descend)
  with pytest.raises(AttributeError):
    transforms.no_such_name  # noqa: B018


def test_the_config_checks_combinations_through_the_scheme():
  # Fails on a config that passes every per-key check: only the scheme knows the combination.
  cfg = config_lib.from_dict(
    {"estimator": {"name": "forward", "tangents": "partition", "regenerate": True}}
  )
  with pytest.raises(config_lib.ConfigError, match="^estimator: regenerate=True .*partition"):
    config_lib.validate(cfg)
