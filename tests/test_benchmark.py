"""Smoke tests of the runtime/memory benchmark and the depth-scaling script (tiny models).

Benchmarks are not timed tests: only sanity bounds on the numbers, and consistency of the
ratios with the medians they come from.
"""

import json

import _scripts
import numpy as np
import pytest

from fwdgrad_jax import benchmark as bench


@pytest.fixture(scope="module")
def tiny():
  return bench.benchmark(
    "mlp",
    # Bias-free: half the parameter leaves, and compile time grows with the leaves.
    model_options={"hidden": [16], "use_bias": False},
    batch_size=8,
    tangents=(1, 2),
    aggregations=("sum",),
    rounds=3,
    steps=2,
  )


def test_every_variant_has_times_and_memory(tiny):
  names = [r["name"] for r in tiny["variants"]]
  assert names == ["base", "backprop", "forward k=1 sum", "forward k=2 sum"]
  for r in tiny["variants"]:
    t = r["ms_per_step"]
    assert len(r["times_ms"]) == 3 and min(r["times_ms"]) > 0, r["name"]
    assert t["q25"] <= t["median"] <= t["q75"] and t["iqr"] >= 0, r["name"]
    # A train step does more than the base pass; 0.5 leaves room for timing noise.
    assert r["R"] >= (1.0 if r["kind"] == "base" else 0.5), r["name"]
    m = r["memory"]
    assert m["argument"] > 0 and m["peak"] > 0, r["name"]
    assert m["peak"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
    assert r["device_peak_bytes"] is None or r["device_peak_bytes"] > 0
  s, hw = tiny["settings"], tiny["hardware"]
  assert s["num_params"] == 784 * 16 + 16 * 10
  assert s["rounds"] == 3 and s["steps_per_call"] == 2 and s["input_shape"] == [28, 28, 1]
  assert hw["platform"] and hw["jax_version"] and hw["usable_cores"] >= 1
  json.dumps(tiny)  # JSON-able as it stands


def test_ratios_match_the_medians(tiny):
  v = {r["name"]: r for r in tiny["variants"]}
  med = {n: r["ms_per_step"]["median"] for n, r in v.items()}
  for n, r in v.items():
    assert r["R"] == pytest.approx(med[n] / med["base"])
    assert r["vs_backprop"] == pytest.approx(med[n] / med["backprop"])
    paired = np.median(np.array(r["times_ms"]) / np.array(v["base"]["times_ms"]))
    assert r["R_paired"] == pytest.approx(paired)
  assert v["base"]["R"] == 1.0 and v["backprop"]["vs_backprop"] == 1.0
  assert v["forward k=1 sum"]["vs_k1"] == 1.0
  assert v["forward k=2 sum"]["vs_k1"] == pytest.approx(
    med["forward k=2 sum"] / med["forward k=1 sum"]
  )
  # R_f / R_b is the same number whichever way it is computed.
  f = v["forward k=2 sum"]
  assert f["R"] / v["backprop"]["R"] == pytest.approx(f["vs_backprop"])
  assert v["backprop"]["vs_k1"] is None


def test_markdown_has_a_row_per_variant(tiny):
  md = bench.render_markdown(tiny)
  for r in tiny["variants"]:
    assert sum(line.startswith(f"| {r['name']} |") for line in md.splitlines()) == 1
  assert "R = t/base" in md and f"jax {tiny['hardware']['jax_version']}" in md


def test_cli_writes_json_and_md(tmp_path, capsys):
  out = tmp_path / "lr_b4"
  argv = ["--model", "logreg", "--batch-size", "4", "--tangents", "2", "--aggregations"]
  argv += ["orthogonal", "--memory-only", "--model-option", "use_bias=false"]
  res = _scripts.load("benchmark").main([*argv, "--out", str(out)])
  assert [r["name"] for r in res["variants"]] == ["base", "backprop", "forward k=2 orthogonal"]
  rec = json.loads(out.with_suffix(".json").read_text())
  assert rec["settings"]["model_options"] == {"use_bias": False}
  assert rec["settings"]["num_params"] == 784 * 10 and not rec["settings"]["timed"]
  assert "--model-option use_bias=false" in rec["command"]
  for r in rec["variants"]:
    assert "ms_per_step" not in r and r["memory"]["peak"] > 0
  md = out.with_suffix(".md").read_text()
  assert "| forward k=2 orthogonal |" in md and "median ms" not in md
  assert "| backprop |" in capsys.readouterr().out


def test_scaling_quick_writes_its_files(tmp_path):
  # One timed depth (each costs six compiles) and a second, compile-only batch size.
  argv = ["--quick", "--depths", "2", "--width", "32", "--out", str(tmp_path)]
  doc = _scripts.load("baydin2022_scaling").main(argv)
  for name in ("scaling.json", "scaling.md"):
    assert (tmp_path / name).stat().st_size > 500
  for name in ("scaling_runtime.png", "scaling_memory_depth.png", "scaling_memory_batch.png"):
    assert (tmp_path / name).stat().st_size > 10_000
  assert [r["depth"] for r in doc["depths"]] == [2]
  assert doc["settings"]["memory_depth"] == 2 and doc["settings"]["quick"]
  assert [r["batch_size"] for r in doc["batches"]] == [16, 64]
  for r in doc["depths"]:
    assert r["R_f"] > 0.5 and r["R_b"] > 0.5
    assert r["R_f_over_R_b"] == pytest.approx(r["forward_ms"] / r["backprop_ms"])
  # Backprop keeps activations: its temp memory grows with the batch.
  bp = [r["memory"]["backprop"]["temp"] for r in doc["batches"]]
  assert bp[1] > bp[0]
  md = (tmp_path / "scaling.md").read_text()
  assert "--quick" in md and "| 2 |" in md


def test_estimator_timing_script_reports_every_variant():
  med = _scripts.load("estimator_timing").main(["--model", "logreg", "--k", "1,2", "--reps", "2"])
  assert set(med) == {"base (loss)", "jax.value_and_grad", "forward k=1", "forward k=2"}
  assert all(ms > 0 for ms in med.values())
