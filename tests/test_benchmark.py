"""Tests of the runtime/memory benchmark and the depth-scaling script (tiny models).

Timings of real steps are noise on a shared machine, so the timing path is checked with
functions of known duration (sleeps), and the real benchmark on properties that hold on
any machine: every variant is timed every round, and each extra tangent holds at least
one more parameter-sized buffer in the compiled step.
"""

import json
import time

import pytest

from experiments.baydin2022 import scaling as baydin2022_scaling
from experiments.benchmarks import benchmark
from fwdgrad_jax.training import benchmark as bench
from fwdgrad_jax.training import records as records_lib

TINY = dict(model_options={"hidden": [16], "use_bias": False}, batch_size=8)
PARAM_BYTES = (784 * 16 + 16 * 10) * 4


def _sleeper(seconds):
  return lambda *args: time.sleep(seconds)


def test_known_durations_give_the_right_ratios():
  # The benchmark's timing and records on variants of known cost: base 10 ms, backprop
  # 20 ms, forward k=1 30 ms and k=2 60 ms per 2-step call.
  cost = {"base": 0.01, "backprop": 0.02, "forward k=1 sum": 0.03, "forward k=2 sum": 0.06}
  timings, peaks = bench.time_variants(
    {n: _sleeper(c) for n, c in cost.items()},
    {n: tuple for n in cost},
    rounds=5,
    steps=2,
    seed=0,
  )
  variants = bench.make_variants((1, 2), ("sum",))
  records = [
    bench.variant_record(
      v, compile_s={}, memory={}, device_peak=peaks[v.name], timing=timings[v.name]
    )
    for v in variants
  ]
  bench._add_ratios(records)
  r = {rec["name"]: rec for rec in records}
  # Sleep overshoot is ~0.1-2 ms per call: 20 % on the 10 ms base.
  assert r["base"]["ms_per_step"]["median"] == pytest.approx(5.0, rel=0.2)
  assert r["forward k=2 sum"]["R"] == pytest.approx(6.0, rel=0.2)
  assert r["forward k=2 sum"]["R_paired"] == pytest.approx(6.0, rel=0.2)
  assert r["forward k=1 sum"]["vs_backprop"] == pytest.approx(1.5, rel=0.2)
  assert r["forward k=2 sum"]["vs_k1"] == pytest.approx(2.0, rel=0.2)
  assert r["backprop"]["vs_k1"] is None and len(r["backprop"]["times_ms"]) == 5


@pytest.fixture(scope="module")
def tiny():
  # One forward variant: each is two compiles (step and loop) through the same code.
  return bench.benchmark("mlp", tangents=(2,), aggregations=("sum",), rounds=3, steps=2, **TINY)


def test_every_variant_is_timed_every_round_and_measured(tiny):
  names = [r["name"] for r in tiny["variants"]]
  assert names == ["base", "backprop", "forward k=2 sum"]
  for r in tiny["variants"]:
    t = r["ms_per_step"]
    assert len(r["times_ms"]) == 3 and min(r["times_ms"]) > 0, r["name"]
    assert t["q25"] <= t["median"] <= t["q75"], r["name"]
    assert r["memory"]["argument"] > 0
    assert r["device_peak_bytes"] is None or r["device_peak_bytes"] > 0
    assert set(r["compile_s"]) == {"step", "loop"}
  s = tiny["settings"]
  assert s["num_params"] * 4 == PARAM_BYTES and s["calls"] == "loop"
  assert s["rounds"] == 3 and s["steps_per_call"] == 2 and s["input_shape"] == [28, 28, 1]
  json.dumps(tiny)  # JSON-able as it stands


def _temp(result):
  return {r["name"]: r["memory"]["temp"] for r in result["variants"]}


@pytest.mark.parametrize("calls", ["loop", "single"])
def test_each_tangent_holds_a_parameter_sized_buffer(calls):
  # Without backprop: its step is not compared here (one compile fewer).
  res = bench.benchmark(
    "mlp",
    tangents=(1, 2, 4),
    aggregations=("sum",),
    backprop=False,
    timed=False,
    calls=calls,
    **TINY,
  )
  temp = _temp(res)
  assert temp["forward k=2 sum"] - temp["forward k=1 sum"] >= PARAM_BYTES
  assert temp["forward k=4 sum"] - temp["forward k=2 sum"] >= 2 * PARAM_BYTES
  # The base pass keeps neither tangents nor gradients.
  assert temp["base"] < PARAM_BYTES / 10
  assert all("ms_per_step" not in r for r in res["variants"])


def test_single_calls_time_the_estimators_as_users_call_them():
  res = bench.benchmark(
    "logreg", tangents=(1, 2), aggregations=("mean",), calls="single", rounds=2, batch_size=4
  )
  s = res["settings"]
  assert s["calls"] == "single" and s["steps_per_call"] == 1 and s["optimizer"] is None
  assert [r["name"] for r in res["variants"]] == [
    "base",
    "backprop",
    "forward k=1 mean",
    "forward k=2 mean",
  ]
  assert all(len(r["times_ms"]) == 2 for r in res["variants"])
  assert all(set(r["compile_s"]) == {"step"} for r in res["variants"])
  assert "single" in bench.render_markdown(res)


def test_time_configs_times_training_configs():
  from fwdgrad_jax.training import config as config_lib

  def cfg(**est):
    c = config_lib.Config()
    c.model = config_lib.ModelConfig(name="logreg")
    c.estimator = config_lib.EstimatorConfig(**est)
    c.train.batch_size = 4
    return c

  t = bench.time_configs(
    {"bp": cfg(name="backprop"), "fwd": cfg(num_tangents=2)},
    input_shape=(28, 28, 1),
    rounds=2,
    steps=2,
  )
  assert set(t) == {"bp", "fwd"} and all(x.median > 0 for x in t.values())
  with pytest.raises(ValueError, match="share"):
    other = cfg(name="backprop")
    other.train.batch_size = 8
    bench.time_configs({"a": cfg(name="backprop"), "b": other}, input_shape=(28, 28, 1))


def test_markdown_has_a_row_per_variant_and_the_hardware(tiny):
  prov = records_lib.provenance([], program="experiments/benchmarks/benchmark.py")
  md = bench.render_markdown({**tiny, "provenance": prov})
  for r in tiny["variants"]:
    assert sum(line.startswith(f"| {r['name']} |") for line in md.splitlines()) == 1
  assert "R = t/base" in md and f"jax {prov['hardware']['jax_version']}" in md
  assert "Hardware: not recorded." in bench.render_markdown(tiny)


def test_cli_writes_json_with_provenance_and_md(tmp_path, capsys):
  argv = ["--model", "logreg", "--batch-size", "4", "--tangents", "2", "--aggregations"]
  argv += ["orthogonal", "--memory-only", "--model-option", "use_bias=false"]
  res = benchmark.main([*argv, "--out", str(tmp_path)])
  assert [r["name"] for r in res["variants"]] == ["base", "backprop", "forward k=2 orthogonal"]
  rec = json.loads((tmp_path / "logreg_b4.json").read_text())
  assert rec["settings"]["model_options"] == {"use_bias": False}
  assert rec["settings"]["num_params"] == 784 * 10 and not rec["settings"]["timed"]
  assert "--model-option use_bias=false" in rec["provenance"]["command"]
  assert rec["provenance"]["git"]["revision"] and rec["provenance"]["hardware"]["cpu_model"]
  md = (tmp_path / "logreg_b4.md").read_text()
  assert "| forward k=2 orthogonal |" in md and "median ms" not in md
  assert "| backprop |" in capsys.readouterr().out
  # The report alone, again, from the JSON.
  benchmark.main(
    ["--report-only", str(tmp_path / "logreg_b4.json"), "--out", str(tmp_path / "again")]
  )
  assert (tmp_path / "again" / "logreg_b4.md").read_text() == md


@pytest.mark.slow
def test_scaling_quick_writes_its_files(tmp_path):
  # One timed depth (each costs six compiles) and a second, compile-only batch size.
  argv = ["--quick", "--depths", "2", "--width", "32", "--out", str(tmp_path)]
  doc = baydin2022_scaling.main(argv)
  for name in ("scaling.json", "scaling.md"):
    assert (tmp_path / name).stat().st_size > 500
  for name in ("scaling_runtime.png", "scaling_memory_depth.png", "scaling_memory_batch.png"):
    assert (tmp_path / name).stat().st_size > 10_000
  assert [r["depth"] for r in doc["depths"]] == [2]
  assert doc["settings"]["memory_depth"] == 2 and doc["settings"]["quick"]
  assert [r["batch_size"] for r in doc["batches"]] == [16, 64]
  assert doc["provenance"]["command"].endswith(" ".join(argv))
  for r in doc["depths"]:
    assert r["R_f"] > 0.5 and r["R_b"] > 0.5
  # Backprop keeps activations: its temp memory grows with the batch.
  bp = [r["memory"]["backprop"]["temp"] for r in doc["batches"]]
  assert bp[1] > bp[0]
  md = (tmp_path / "scaling.md").read_text()
  assert "--quick" in md and "| 2 |" in md and "Hardware: cpu" in md
