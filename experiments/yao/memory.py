"""Yao Fig. 14: peak memory of one training step against the batch size, forward modes vs backprop.

For each method and batch size, one SGD training step (the app's step, through
``fwdgrad_jax.training.benchmark.lower``) is compiled and its compiled memory read with
``fwdgrad_jax.training.benchmark.memory_of``: peak = arguments + outputs + XLA's temporary arena
− donated aliases. A compiled figure, not a measurement of a running process: on a GPU,
``benchmark.device_peak_bytes`` would give the device's own peak, but no GPU was lent to
this task. "forward pass" is the loss alone (no gradient), the floor every method pays.
Random inputs (memory does not depend on the data values).

Paper (PyTorch from scratch, GPU): forward mode uses less memory than backprop, and the
saving grows with the batch size, because no activations are kept for a backward pass.

  python -m experiments.yao.memory --out results/yao
  python -m experiments.yao.memory --quick     # a smoke test
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax.training import records

METHODS = {
  "mlp": (
    "backprop",
    "naive",
    "average k=3",
    "partition k=3",
    "input (QR)",
    "input approx",
    "guided",
  ),
  "yao_cnn": ("backprop", "naive", "input approx", "guided"),
}


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batches", default="64,256,1024,4096")
  p.add_argument("--cnn-batches", default="64,256,1024")
  p.add_argument("--models", default="mlp,yao_cnn")
  p.add_argument(
    "--quick", action="store_true", help="MLP 784-64-64-10 only, batch 16; two methods"
  )


def run(args: argparse.Namespace) -> dict[str, Any]:
  from experiments.yao import lib as yao
  from fwdgrad_jax.training import benchmark

  out = {}
  for model in args.models.split(","):
    batches = [int(b) for b in (args.batches if model == "mlp" else args.cnn_batches).split(",")]
    methods = METHODS[model]
    options = yao.MODEL_OPTIONS[model]
    if args.quick:  # every (method, batch) is a compile: one batch, a narrow MLP
      batches, methods, options = [16], methods[:2], {"hidden": (64, 64)}
      if model != "mlp":
        continue
    problem = benchmark.make_problem(
      model,
      model_options=options,
      input_shape=(28, 28, 1),
      num_classes=10,
      examples=max(batches),
      seed=0,
    )
    jobs = []
    for b in batches:
      jobs.append(("forward pass", b, None))
      for m in methods:
        jobs.append((m, b, yao.train_config(model, yao.estimator_config(m), batch_size=b)))
    lowered = [
      benchmark.lower(cfg, problem, batch_size=b, steps=1, timed=False).step for _, b, cfg in jobs
    ]
    compiled = benchmark.compile_all(lowered)
    rows = []
    for (m, b, _), (exe, secs) in zip(jobs, compiled):
      mem = benchmark.memory_of(exe)
      rows.append(dict(method=m, batch_size=b, compile_s=secs, **mem))
      print(f"{model} {m} batch {b}: peak {mem['peak'] / 2**20:.1f} MiB", flush=True)
    out[model] = dict(num_params=problem.num_params, batches=batches, rows=rows)
  return dict(settings=dict(figure="compiled memory (benchmark.memory_of), XLA:CPU"), models=out)


def report(result: dict[str, Any], out: Path) -> list[Path]:
  prov = result["provenance"]
  lines = [
    "# Yao Fig. 14: peak memory of one training step against the batch size",
    "",
    f"`{prov['command']}`",
    "",
    records.hardware_line(prov),
    "",
    "Compiled peak (arguments + outputs + XLA temp − donated aliases) of one SGD step, "
    "MiB, on XLA:CPU; no GPU was lent to this task, so no device peak. Ratio = method / "
    "backprop at the same batch.",
    "",
  ]
  models = result["models"]
  fig, axes = rep.pyplot().subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
  for ax, (model, r) in zip(axes[0], models.items()):
    methods = list(dict.fromkeys(row["method"] for row in r["rows"]))
    peak = {(row["method"], row["batch_size"]): row["peak"] for row in r["rows"]}
    lines += [f"## {model} ({r['num_params']:,} parameters)", ""]
    table = rep.Table(["method", *(f"batch {b}" for b in r["batches"])])
    for m in methods:
      cells = []
      for b in r["batches"]:
        p, bp = peak[(m, b)], peak.get(("backprop", b))
        ratio = "" if bp in (None, 0) or m == "backprop" else f" ({p / bp:.2f})"
        cells.append(f"{p / 2**20:.1f}{ratio}")
      table.add_row(m, *cells)
      ax.plot(
        r["batches"],
        [peak[(m, b)] / 2**20 for b in r["batches"]],
        marker="o",
        label=m,
        ls="--" if m in ("backprop", "forward pass") else "-",
      )
    lines += [*table.lines(), ""]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("compiled peak, MiB")
    ax.set_title(f"{model}: one SGD step", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  png = rep.save_figure(fig, out / "memory.png")
  lines += [f"![memory vs batch]({png.name})", ""]
  md = out / "memory.md"
  md.write_text("\n".join(lines) + "\n")
  return [md, png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="memory.json",
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
