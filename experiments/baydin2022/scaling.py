"""Baydin et al. 2022, §5.6 / Fig. 6: runtime and memory of forward gradient vs depth.

A bias-free ReLU MLP (``deep_mlp``: L hidden Linear layers of width 1024 plus a Linear
head, batch 64, random 28×28×1 inputs) for L ∈ {1, 2, 5, 10, 20, 50, 100}. For every L,
:func:`fwdgrad_jax.training.benchmark.benchmark` times the base pass (forward + loss), one
forward-gradient SGD step (k = 1, Gaussian tangent) and one backprop SGD step,
interleaved, and gives R_f = forward / base, R_b = backprop / base, R_f/R_b, and the
compiled memory of one step of each. Then, at the deepest L, the compiled memory of
both steps against the batch size (compiled only, never run, so it stays cheap).

The paper (PyTorch, Titan XP) found R_b ∈ [4, 5], R_f ∈ [3, 4], R_f/R_b < 0.6 up to ten
layers and ≈ 0.8 at 100, and "virtually no difference" in memory.

Deep models get fewer rounds and one step per timed call (a step of L = 100 takes
seconds on a CPU); the rounds and steps used at every L are in the tables. Timings on a
shared 2-core machine are noisy: read the medians and the per-round paired ratios.

Writes ``scaling.json``, ``scaling.md`` and three PNGs (``scaling_runtime.png``,
``scaling_memory_depth.png``, ``scaling_memory_batch.png``) to ``--out`` (default: a
fresh directory under outputs/).

  python -m experiments.baydin2022.scaling --out results/baydin2022   # the full study
  python -m experiments.baydin2022.scaling --quick                    # smoke test
  python -m experiments.baydin2022.scaling --report-only results/baydin2022/scaling.json \
      --out results/baydin2022
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax.training import records

DEPTHS = (1, 2, 5, 10, 20, 50, 100)
BATCHES = (64, 256, 1024, 4096)
QUICK_DEPTHS = (1, 2)
QUICK_BATCHES = (16, 64)
_MIB = 2**20
_FORWARD = "forward k=1 mean"


def plan(depth: int, quick: bool) -> tuple[int, int]:
  """(rounds, steps per timed call) at depth L: fewer of both as a step gets dearer.

  A step costs about L times the L = 1 step. Shallow nets run several steps per call
  so each call is long against dispatch; deep ones (a step of seconds) need neither
  many steps nor many rounds to resolve a median, and the full run stays ~10 minutes.
  """
  if quick:
    return 3, 2
  if depth <= 5:
    return 20, max(1, 10 // depth)
  if depth <= 10:
    return 15, 1
  if depth <= 20:
    return 10, 1
  if depth <= 50:
    return 7, 1
  return 5, 1


def _by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
  return {r["name"]: r for r in result["variants"]}


def depth_row(depth: int, result: dict[str, Any]) -> dict[str, Any]:
  """The depth table's row from one benchmark result (base, backprop, forward k=1)."""
  v = _by_name(result)
  base, bp, fwd = v["base"], v["backprop"], v[_FORWARD]
  paired = np.median(np.asarray(fwd["times_ms"]) / np.asarray(bp["times_ms"]))
  return {
    "depth": depth,
    "num_params": result["settings"]["num_params"],
    "rounds": result["settings"]["rounds"],
    "steps_per_call": result["settings"]["steps_per_call"],
    "base_ms": base["ms_per_step"]["median"],
    "forward_ms": fwd["ms_per_step"]["median"],
    "backprop_ms": bp["ms_per_step"]["median"],
    "forward_iqr_ms": fwd["ms_per_step"]["iqr"],
    "backprop_iqr_ms": bp["ms_per_step"]["iqr"],
    "R_f": fwd["R"],
    "R_b": bp["R"],
    "R_f_over_R_b": fwd["vs_backprop"],
    "R_f_over_R_b_paired": float(paired),
    "memory": memory_row(result),
  }


def memory_row(result: dict[str, Any]) -> dict[str, Any]:
  """Compiled memory (bytes) of base, forward k=1 and backprop from one result."""
  v = _by_name(result)
  out = {}
  for key, name in (("base", "base"), ("forward", _FORWARD), ("backprop", "backprop")):
    m = v[name]["memory"]
    out[key] = {"temp": m["temp"], "peak": m["peak"], "xla_peak": m["xla_peak"]}
    out[key]["device_peak"] = v[name]["device_peak_bytes"]
  f, b = out["forward"]["peak"], out["backprop"]["peak"]
  out["forward_over_backprop_peak"] = f / b if f and b else None
  return out


def _mib(x: int | None) -> str:
  return rep.num(None if x is None else x / _MIB, ".1f")


def render(doc: dict[str, Any]) -> str:
  """scaling.md: the command, hardware and both tables."""
  s, prov = doc["settings"], doc.get("provenance", {})
  lines = [
    "# Baydin et al. 2022, §5.6: forward gradient vs backprop against depth",
    "",
    f"`{prov.get('command', '(command not recorded)')}`",
    "",
    f"{records.hardware_line(prov)} "
    f"Model: deep_mlp, width {s['width']}, no bias, ReLU, "
    f"input {tuple(s['input_shape'])}, batch {s['batch_size']}, SGD; forward = k = 1 "
    f"'{s['tangent_scheme']}' tangent (fwdgrad_jax.tangents; jax PRNG keys: "
    f"{s['prng_impl']}).",
    "",
    "## Runtime and memory vs depth L",
    "",
    "| L | params | rounds × steps | base ms | forward ms | backprop ms | R_f | R_b | "
    "R_f/R_b | R_f/R_b paired | fwd temp MiB | bp temp MiB | fwd peak MiB | bp peak MiB "
    "| fwd/bp peak |",
    "|" + "---|" * 15,
  ]
  for r in doc["depths"]:
    m = r["memory"]
    lines.append(
      f"| {r['depth']} | {r['num_params']:,} | {r['rounds']} × {r['steps_per_call']} | "
      f"{r['base_ms']:.2f} | {r['forward_ms']:.2f} | {r['backprop_ms']:.2f} | "
      f"{r['R_f']:.2f} | {r['R_b']:.2f} | {r['R_f_over_R_b']:.3f} | "
      f"{r['R_f_over_R_b_paired']:.3f} | {_mib(m['forward']['temp'])} | "
      f"{_mib(m['backprop']['temp'])} | {_mib(m['forward']['peak'])} | "
      f"{_mib(m['backprop']['peak'])} | {m['forward_over_backprop_peak']:.2f} |"
    )
  lines += [
    "",
    f"## Compiled memory vs batch size (L = {s['memory_depth']}, not timed)",
    "",
    "| batch | base peak MiB | fwd temp MiB | bp temp MiB | fwd peak MiB | bp peak MiB "
    "| fwd/bp peak |",
    "|" + "---|" * 7,
  ]
  for r in doc["batches"]:
    m = r["memory"]
    lines.append(
      f"| {r['batch_size']} | {_mib(m['base']['peak'])} | {_mib(m['forward']['temp'])} | "
      f"{_mib(m['backprop']['temp'])} | {_mib(m['forward']['peak'])} | "
      f"{_mib(m['backprop']['peak'])} | {m['forward_over_backprop_peak']:.2f} |"
    )
  lines += ["", *(f"- {n}" for n in doc["notes"]), ""]
  return "\n".join(lines)


def plot(doc: dict[str, Any], out: Path) -> list[Path]:
  """The three PNGs: R vs L, memory vs L, memory vs batch size."""
  plt = records.pyplot()
  rows, batches = doc["depths"], doc["batches"]
  L = [r["depth"] for r in rows]
  paths = []

  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  ax.axhspan(3, 4, color="tab:blue", alpha=0.08, label="paper R_f ∈ [3, 4]")
  ax.axhspan(4, 5, color="tab:orange", alpha=0.08, label="paper R_b ∈ [4, 5]")
  ax.plot(L, [r["R_f"] for r in rows], "o-", color="tab:blue", label="R_f (forward, k=1)")
  ax.plot(L, [r["R_b"] for r in rows], "s-", color="tab:orange", label="R_b (backprop)")
  ax.set(xscale="log", xlabel="depth L (hidden layers)", ylabel="step time / base time")
  ax.set_title("Runtime ratio vs depth")
  ax2.plot(L, [r["R_f_over_R_b"] for r in rows], "o-", color="k", label="ratio of medians")
  ax2.plot(
    L, [r["R_f_over_R_b_paired"] for r in rows], "x--", color="0.5", label="median paired ratio"
  )
  ax2.plot(
    [1, 10, 100],
    [0.6, 0.6, 0.8],
    ":",
    color="tab:red",
    label="paper: < 0.6 to L = 10, ≈ 0.8 at 100",
  )
  ax2.axhline(1.0, color="0.7", lw=0.8)
  ax2.set(xscale="log", xlabel="depth L (hidden layers)", ylabel="R_f / R_b")
  ax2.set_title("Forward-gradient step / backprop step")
  for a in (ax, ax2):
    _ticks(a, L)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
  fig.suptitle(_caption(doc), fontsize=8)
  paths.append(rep.save_figure(fig, out / "scaling_runtime.png", dpi=120))

  for key, xs, rows_of, xlabel, name in (
    ("depth", L, rows, "depth L (hidden layers)", "scaling_memory_depth.png"),
    (
      "batch",
      [r["batch_size"] for r in batches],
      batches,
      "batch size",
      "scaling_memory_batch.png",
    ),
  ):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for est, color, marker in (("forward", "tab:blue", "o"), ("backprop", "tab:orange", "s")):
      peak = [r["memory"][est]["peak"] / _MIB for r in rows_of]
      temp = [max(r["memory"][est]["temp"], 1) / _MIB for r in rows_of]
      ax.plot(xs, peak, marker + "-", color=color, label=f"{est} step: peak")
      ax.plot(xs, temp, marker + "--", color=color, alpha=0.6, label=f"{est} step: temp")
    base = [r["memory"]["base"]["peak"] / _MIB for r in rows_of]
    ax.plot(xs, base, "^:", color="0.4", label="base (forward + loss): peak")
    where = f"L = {doc['settings']['memory_depth']}" if key == "batch" else "batch "
    where += "" if key == "batch" else str(doc["settings"]["batch_size"])
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="MiB (compiled memory analysis)")
    ax.set_title(f"Compiled memory of one step vs {key} ({where})", fontsize=10)
    _ticks(ax, xs)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(_caption(doc), fontsize=7)
    paths.append(rep.save_figure(fig, out / name, dpi=120))
  return paths


def _ticks(ax: Any, xs: list[int]) -> None:
  from matplotlib.ticker import NullFormatter, ScalarFormatter

  # Log axes label only powers of ten by default; label the measured points instead.
  ax.set_xticks(xs)
  ax.xaxis.set_major_formatter(ScalarFormatter())
  ax.xaxis.set_minor_formatter(NullFormatter())
  if ax.get_yscale() == "log":
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _caption(doc: dict[str, Any]) -> str:
  s = doc["settings"]
  hw = doc.get("provenance", {}).get("hardware", {})
  device = hw.get("gpu_model") or hw.get("cpu_model")
  return (
    f"deep_mlp width {s['width']}, no bias, batch {s['batch_size']}; {hw.get('platform')} "
    f"{device} ({hw.get('usable_cores')} cores), jax {hw.get('jax_version')}"
    + (" — QUICK smoke run" if s["quick"] else "")
  )


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The study's options."""
  p.add_argument("--depths", type=rep.ints, default=None, help=f"default {DEPTHS}")
  p.add_argument("--batches", type=rep.ints, default=None, help=f"memory study, default {BATCHES}")
  p.add_argument("--memory-depth", type=int, default=None, help="L of the batch study (deepest)")
  p.add_argument("--width", type=int, default=1024)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--tangent-scheme", default="normal")
  p.add_argument("--rounds", type=int, default=None, help="override the per-depth rounds")
  p.add_argument("--steps", type=int, default=None, help="override the per-depth steps per call")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--prng-impl", default=None, help="jax_default_prng_impl (e.g. rbg)")
  p.add_argument("--quick", action="store_true", help="two depths, few rounds (smoke test)")


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Times every depth and compiles every batch size; returns the study's document."""
  import jax

  if args.prng_impl:
    jax.config.update("jax_default_prng_impl", args.prng_impl)
  from fwdgrad_jax.training import benchmark as bench

  depths = args.depths or (QUICK_DEPTHS if args.quick else DEPTHS)
  batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
  memory_depth = args.memory_depth or max(depths)
  common = dict(
    input_shape=(28, 28, 1),
    tangents=(1,),
    aggregations=("mean",),
    tangent_scheme=args.tangent_scheme,
    seed=args.seed,
  )

  def say(line: str) -> None:
    print(line, flush=True)

  rows, results = [], {}
  for depth in depths:
    rounds, steps = plan(depth, args.quick)
    rounds, steps = args.rounds or rounds, args.steps or steps
    say(f"L = {depth}: {rounds} rounds × {steps} steps")
    res = bench.benchmark(
      "deep_mlp",
      model_options={"depth": depth, "width": args.width},
      batch_size=args.batch_size,
      rounds=rounds,
      steps=steps,
      log=say,
      **common,
    )
    results[depth] = res
    rows.append(depth_row(depth, res))
    r = rows[-1]
    say(f"L = {depth}: R_f {r['R_f']:.2f}  R_b {r['R_b']:.2f}  R_f/R_b {r['R_f_over_R_b']:.3f}")

  batch_rows = []
  for b in batches:
    if b == args.batch_size and memory_depth in results:
      mem = memory_row(results[memory_depth])  # already compiled for the timing
    else:
      say(f"memory: L = {memory_depth}, batch {b}")
      res = bench.benchmark(
        "deep_mlp",
        model_options={"depth": memory_depth, "width": args.width},
        batch_size=b,
        timed=False,
        log=say,
        **common,
      )
      mem = memory_row(res)
    batch_rows.append({"batch_size": b, "memory": mem})

  deepest = max(depths)
  return {
    "figure": "Baydin et al. 2022, §5.6 (Fig. 6): scalability with depth",
    "settings": {
      "model": "deep_mlp",
      "width": args.width,
      "input_shape": [28, 28, 1],
      "batch_size": args.batch_size,
      "depths": list(depths),
      "batches": list(batches),
      "memory_depth": memory_depth,
      "tangent_scheme": args.tangent_scheme,
      "prng_impl": str(jax.config.jax_default_prng_impl),
      "seed": args.seed,
      "quick": args.quick,
      "plan": {str(d): dict(zip(("rounds", "steps"), plan(d, args.quick))) for d in depths},
      "rounds_override": args.rounds,
      "steps_override": args.steps,
      "timing": results[deepest]["settings"]["timing"],
      "memory": results[deepest]["settings"]["memory"],
    },
    "depths": rows,
    "batches": batch_rows,
    "notes": [
      "L counts hidden layers (each width × width, no bias, ReLU); a bias-free head to 10 "
      "logits comes on top, so L = 1 has 784·1024 + 1024·10 weights.",
      "Deep models are timed with few rounds and one step per call (see rounds × steps); "
      "R_f/R_b paired = median over rounds of the same-round forward/backprop ratio.",
      "Memory = compiled memory_analysis of one step with the state donated: peak = "
      "argument + output + temp − alias. temp holds what a step allocates beyond "
      "parameters and batch: the tangent and the estimate (forward) or the stored "
      "activations and the gradient (backprop). The batch study is compiled, never run.",
    ]
    + (["QUICK smoke run: not a measurement."] if args.quick else []),
    "results": {str(d): r for d, r in results.items()},
  }


def report(doc: dict[str, Any], out: Path) -> list[Path]:
  """``scaling.md`` and the three PNGs; the Markdown is printed too."""
  md = out / "scaling.md"
  md.write_text(render(doc))
  print(render(doc))
  return [md, *plot(doc, out)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the study (or only its report) and writes ``scaling.json``, ``.md`` and PNGs.

  Args:
    argv: command-line arguments (``sys.argv[1:]`` if None).

  Returns:
    The document written to ``scaling.json``.
  """
  return script.main(
    __file__,
    run,
    report,
    result_file="scaling.json",
    description=__doc__,
    add_arguments=add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
