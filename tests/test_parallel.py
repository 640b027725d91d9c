"""Tests of fwdgrad_jax.parallel: meshes, and data/tangent parallelism giving the same run.

The suite runs with one CPU device; the checks that need four run in one subprocess
(tests/_parallel_worker.py) that sets XLA_FLAGS=--xla_force_host_platform_device_count=4
before JAX starts. Same-run comparisons use a float32 tolerance: a mesh changes only the
order of the sums (over examples, over tangents), never the tangents or the batches.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad_jax as fg
from fwdgrad_jax import parallel
from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import run as run_lib

ROOT = Path(__file__).resolve().parents[1]
# float32 sums in another order: a few ulps per step, compounding over 8 steps.
RTOL = 2e-5


@pytest.fixture(scope="module")
def four_devices():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run(
    [sys.executable, str(ROOT / "tests" / "_parallel_worker.py"), "all"],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_worker_sees_four_devices(four_devices):
  assert four_devices["devices"] == 4


# (mean: test_the_same_training_run_on_one_device_and_on_a_2x2_mesh[forward+batchnorm 2x2])
@pytest.mark.parametrize("aggregation", ["orthogonal"])
def test_a_2x2_mesh_gives_the_one_device_estimate(four_devices, aggregation):
  diff = four_devices["estimates"][aggregation]
  assert diff["value"] < 1e-5
  assert diff["grad"] < 1e-5


def test_each_device_holds_only_its_share_of_the_tangents(four_devices):
  # k = 8 tangents of 68k parameters: 2.2 MB on one device; a quarter of them (plus
  # per-layer temporaries) on each of four.
  temp = four_devices["memory"]
  assert temp["1x4"] < 0.4 * temp["one"], temp


# (2x2 mean: test_the_same_training_run_on_one_device_and_on_a_2x2_mesh[forward regenerated])
@pytest.mark.parametrize("case", ["2x2 orthogonal", "4x1 sum", "1x4 orthogonal"])
def test_regenerated_tangents_on_a_mesh_give_the_one_device_estimate(four_devices, case):
  got = four_devices["regenerated"][case]
  assert got["value"] < 1e-5
  assert got["grad"] < 1e-5
  assert got["replicated"]


# (2x2 mean sends what 2x2 orthogonal sends: d and the loss)
@pytest.mark.parametrize("case", ["2x2 orthogonal", "4x1 sum", "1x4 orthogonal"])
def test_regenerated_tangents_on_a_mesh_send_k_numbers_not_a_gradient(four_devices, case):
  regen = four_devices["regenerated"]
  n = regen["params"]
  # Backprop all-reduces the whole gradient (the parser sees weight-sized operands) …
  back = regen["backprop 4x1"]["collectives"]
  assert back["bytes"] >= 4 * n, back
  # … the regenerated step only d (k = 4 numbers, a device's share over "tangents") and
  # the loss: no collective operand as large as the smallest weight (32 × 10).
  coll = regen[case]["collectives"]
  assert coll["count"] >= 1, coll  # the devices do combine something
  assert coll["largest"] <= 4, coll
  assert coll["bytes"] <= 4 * (4 + 1), coll


@pytest.mark.parametrize("name", ["forward+batchnorm 2x2", "forward regenerated 2x2"])
def test_the_same_training_run_on_one_device_and_on_a_2x2_mesh(four_devices, name):
  run = four_devices["training"][name]
  (train_one, val_one), (train_many, val_many) = run["one"], run["many"]
  assert len(train_one) == len(train_many) == 4
  np.testing.assert_allclose(train_many, train_one, rtol=RTOL)
  np.testing.assert_allclose(val_many, val_one, rtol=RTOL)
  # The losses moved: a run that did nothing would match trivially.
  assert len(set(np.round(train_one, 4))) == len(train_one)


# ---- one device: meshes, errors, the trivial mesh -----------------------------------


def test_a_mesh_larger_than_the_devices_is_a_clear_error():
  n = len(jax.devices())
  with pytest.raises(ValueError, match=r"mesh.data=2 × mesh.tangents=.*xla_force_host_platform"):
    parallel.make_mesh(2, n)


@pytest.mark.parametrize("data,tangents", [(0, 1), (1, -1), (1.5, 1), (True, 1)])
def test_bad_counts_name_the_key(data, tangents):
  with pytest.raises(ValueError, match=r"mesh\.(data|tangents)="):
    parallel.make_mesh(data, tangents)


def test_a_one_device_mesh_has_both_axes():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data", "tangents")
  assert parallel.describe(mesh)["devices"] == 1


def test_the_estimate_on_a_one_device_mesh_is_the_plain_one():
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  x = jnp.arange(6.0).reshape(2, 3)

  def loss(p, x):
    return jnp.sum(jnp.tanh(x @ p["w"]) ** 2)

  key = jax.random.PRNGKey(1)
  mesh = parallel.make_mesh()
  ref = fg.value_and_forward_grad(loss, num_tangents=3)(key, params, x)
  got = jax.jit(
    fg.value_and_forward_grad(parallel.data_parallel(loss, mesh), num_tangents=3, mesh=mesh)
  )(key, params, x)
  np.testing.assert_allclose(got[1]["w"], ref[1]["w"], rtol=1e-6)


def test_tangent_parallelism_refuses_structured_tangents_and_uneven_k():
  mesh = parallel.make_mesh()
  # A one-device mesh has nothing to split: these are fine.
  fg.value_and_forward_grad(lambda p: p, tangents="rank1", mesh=mesh)
  fake = type("FakeMesh", (), {"shape": {"data": 1, "tangents": 2}})()
  with pytest.raises(ValueError, match="dense weight tangents"):
    fg.value_and_forward_grad(lambda p: p, tangents="rank1", num_tangents=2, mesh=fake)
  with pytest.raises(ValueError, match=r"num_tangents=3: must be a multiple of mesh.tangents=2"):
    fg.value_and_forward_grad(lambda p: p, num_tangents=3, mesh=fake)


@pytest.mark.parametrize(
  "sections,key",
  [
    ({"mesh": {"tangents": 2}, "estimator": {"num_tangents": 3}}, "estimator.num_tangents"),
    ({"mesh": {"tangents": 2}, "estimator": {"name": "backprop"}}, "mesh.tangents"),
    (
      {"mesh": {"tangents": 2}, "estimator": {"num_tangents": 2, "tangents": "rank1"}},
      "mesh.tangents",
    ),
    ({"mesh": {"data": 3}}, "train.batch_size"),
    ({"mesh": {"data": 0}}, "mesh.data"),
    ({"mesh": {"distributed": "yes"}}, "mesh.distributed"),
    ({"mesh": {"process_id": 1}}, "mesh.process_id"),  # without mesh.distributed=true
    ({"mesh": {"distributed": True, "num_processes": 2, "process_id": 2}}, "mesh.process_id"),
    ({"mesh": {"distributed": True, "num_processes": 0}}, "mesh.num_processes"),
    (
      {"mesh": {"distributed": True, "coordinator_address": "localhost"}},
      "mesh.coordinator_address",
    ),
  ],
)
def test_validate_names_the_bad_mesh_key(sections, key):
  cfg = config_lib.Config()
  for section, values in sections.items():
    for k, v in values.items():
      setattr(getattr(cfg, section), k, v)
  with pytest.raises(config_lib.ConfigError, match=rf"^{key}="):
    config_lib.validate(cfg)


def test_the_run_refuses_more_devices_than_present_naming_the_keys():
  n = len(jax.devices())
  with pytest.raises(config_lib.ConfigError, match=r"mesh.data=.*devices"):
    run_lib.make_run_mesh(config_lib.MeshConfig(data=2 * n))


def test_the_mesh_group_composes():
  cfg = config_lib.compose(["mesh.data=2", "train.batch_size=64"], config_dir=ROOT / "configs")
  assert (cfg.mesh.data, cfg.mesh.tangents, cfg.mesh.distributed) == (2, 1, False)
  assert cfg.mesh.distributed_options() == {}  # null: the cluster is detected
  cfg = config_lib.compose(
    ["mesh.distributed=true", "mesh.coordinator_address=127.0.0.1:12355"]
    + ["mesh.num_processes=2", "mesh.process_id=1"],
    config_dir=ROOT / "configs",
  )
  config_lib.validate(cfg)
  assert cfg.mesh.distributed_options() == {
    "coordinator_address": "127.0.0.1:12355",
    "num_processes": 2,
    "process_id": 1,
  }


HLO = """
ENTRY %main {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = bf16[3]{0} parameter(1)
  %all-reduce.1 = (f32[4,8]{1,0}, bf16[3]{0}) all-reduce(%p0, %p1), channel_id=1, to_apply=%add
  %all-gather = f32[8,8]{1,0} all-gather(%p0), channel_id=2, dimensions={0}
  %ars = f32[4,8]{1,0} all-reduce-start(%p0), channel_id=3, to_apply=%add
  %ard = f32[4,8]{1,0} all-reduce-done(%ars)
  ROOT %t = (f32[4,8]{1,0}) tuple(%ard)
}
"""


def test_collective_bytes_reads_the_operands_of_each_collective():
  got = parallel.collective_bytes(HLO)
  # all-reduce: 32 f32 + 3 bf16; all-gather: its 32-element shard, not the gathered 64;
  # the async all-reduce once (at its start).
  assert got["ops"] == {
    "all-reduce": {"count": 2, "bytes": 4 * 32 + 2 * 3 + 4 * 32},
    "all-gather": {"count": 1, "bytes": 4 * 32},
  }
  assert (got["bytes"], got["count"], got["largest"]) == (390, 3, 32)
  assert parallel.collective_bytes("") == {"bytes": 0, "count": 0, "largest": 0, "ops": {}}


def test_data_parallel_marks_the_batch_arguments_and_checks_the_reduction():
  fake = type("FakeMesh", (), {"shape": {"data": 2, "tangents": 1}})()
  marked = parallel.batch_args_of(parallel.data_parallel(lambda p, x: x, fake, reduction="sum"))
  assert (marked.argnums, marked.argnames, marked.reduction) == ((0, 1), ("x", "y"), "sum")
  assert parallel.batch_args_of(lambda p: p) is None
  with pytest.raises(ValueError, match="reduction='max'"):
    parallel.data_parallel(lambda p: p, fake, reduction="max")
