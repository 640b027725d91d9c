"""Yao Table I and Fig. 13: time per training step of every method, and against k.

One SGD step (estimate + update, the app's jitted training loop through
``fwdgrad_jax.training.benchmark.lower``) of backprop, the naive forward gradient, averaging of 3
directions, the partition (3 blocks), input-generated tangents (QR and approximation)
and the guided forward gradient (fix_gap 10: one true gradient per 10 steps, amortised;
each timed call runs a multiple of 10 steps from step 0), at batch 256 on the MLP
784-1024-1024-10 (Table I) and on Yao's CNN (backprop, naive, guided: Table I's last
rows); then averaging and partition against the number of directions / blocks k
(Fig. 13). Timed with the project's interleaved timer (medians over rounds; every
variant sees the same background load); ratios to backprop are the comparable figures.
Random inputs (timing does not depend on the data).

  python -m experiments.yao.time --out results/yao
  python -m experiments.yao.time --quick     # a smoke test
"""

from __future__ import annotations

import os

# LAPACK (QR) on a shared 2-core machine: OpenBLAS's own threads oversubscribe it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from experiments._lib import report as rep
from experiments._lib import script

TABLE_MLP = (
  "backprop",
  "naive",
  "average k=3",
  "partition k=3",
  "input (QR)",
  "input approx",
  "guided",
)
TABLE_CNN = ("backprop", "naive", "guided")
PAPER = {  # Table I (RTX 3080, PyTorch from scratch), seconds per iteration
  ("mlp", "backprop"): "0.0009–0.0011",
  ("mlp", "naive"): "0.0009–0.0011",
  ("mlp", "average k=3"): "Fig. 13 (linear in k)",
  ("mlp", "partition k=3"): "Fig. 13 (linear in k, steeper)",
  ("mlp", "input (QR)"): "0.0010–0.0012",
  ("mlp", "input approx"): "0.0010–0.0012",
  ("mlp", "guided"): "0.0012–0.0017 (checkpoints excluded)",
  ("yao_cnn", "backprop"): "0.025–0.03",
  ("yao_cnn", "naive"): "0.025–0.03",
  ("yao_cnn", "guided"): "0.027–0.03 (checkpoints excluded)",
}


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--ks", type=rep.ints, default=[1, 2, 4, 8, 16], help="k for Fig. 13")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=10, help="steps per timed call (multiple of 10)")
  p.add_argument("--models", default="mlp,yao_cnn")
  p.add_argument("--no-sweep", action="store_true", help="skip Fig. 13")
  p.add_argument(
    "--quick",
    action="store_true",
    help="MLP 784-64-64-10, backprop, k = 2, batch 32, 2 rounds",
  )


def _time_group(model: str, labels: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
  from experiments.yao import lib as yao
  from fwdgrad_jax.training import benchmark

  cfgs = {
    name: yao.train_config(model, est, batch_size=args.batch_size) for name, est in labels.items()
  }
  # The smoke test checks the run end to end, not the timings: a narrow MLP.
  options = {"hidden": (64, 64)} if args.quick and model == "mlp" else yao.MODEL_OPTIONS[model]
  problem = benchmark.make_problem(
    model,
    model_options=options,
    input_shape=(28, 28, 1),
    num_classes=10,
    examples=args.batch_size * args.steps,
    seed=0,
  )
  if model == "mlp":
    lowered = {
      n: benchmark.lower(c, problem, batch_size=args.batch_size, steps=args.steps)
      for n, c in cfgs.items()
    }
    exes = benchmark.compile_all([low.timed for low in lowered.values()])
    functions = {n: exe for n, (exe, _) in zip(lowered, exes)}
    call_args = {n: low.args for n, low in lowered.items()}
  else:
    functions, exes = yao.host_stepped(cfgs, problem, batch_size=args.batch_size, steps=args.steps)
    call_args = {n: tuple for n in functions}
  timings, _ = benchmark.time_variants(
    functions,
    call_args,
    rounds=args.rounds,
    steps=args.steps,
    seed=0,
    log=lambda m: print(f"{model}: {m}", flush=True),
  )
  base = timings["backprop"].median if "backprop" in timings else None
  return {
    n: dict(
      ms=t.as_dict(1e3),
      ratio_to_backprop=None if base is None else t.median / base,
      compile_s=exes[i][1],
    )
    for i, (n, t) in enumerate(timings.items())
  }


def run(args: argparse.Namespace) -> dict[str, Any]:
  from experiments.yao import lib as yao

  ks = args.ks
  if args.quick:
    args.batch_size, args.rounds, ks, args.models = 32, 2, [2], "mlp"
  table = {}
  for model in args.models.split(","):
    names = TABLE_MLP if model == "mlp" else TABLE_CNN
    # Every scheme is a compile of the same code: the quick table has backprop only (the
    # sweep below adds two forward schemes; its backprop is this one, from the cache).
    names = names[:1] if args.quick else names
    table[model] = _time_group(model, {n: yao.estimator_config(n) for n in names}, args)
    print(model, {n: round(v["ms"]["median"], 2) for n, v in table[model].items()}, flush=True)
  sweep = None
  if not args.no_sweep:
    labels = {"backprop": yao.estimator_config("backprop")}
    for k in ks:
      labels[f"average k={k}"] = yao.estimator_config("average k=3", num_tangents=k)
      labels[f"partition k={k}"] = yao.estimator_config("partition k=3", num_tangents=k)
    sweep = dict(ks=ks, times=_time_group("mlp", labels, args))
  return dict(
    settings=dict(
      batch_size=args.batch_size,
      rounds=args.rounds,
      steps_per_call=args.steps,
      optimizer="plain SGD",
      data="random inputs (timing only)",
      mlp="784-64-64-10 (quick)" if args.quick else "784-1024-1024-10",
    ),
    table=table,
    sweep=sweep,
  )


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s, prov = result["settings"], result["provenance"]
  lines = [
    "# Yao Table I and Fig. 13: time per training step",
    "",
    *rep.provenance_lines(prov),
    "",
    f"MLP {s.get('mlp', '784-1024-1024-10')}, batch {s['batch_size']}, {s['optimizer']}, "
    f"the app's jitted loop, {s['steps_per_call']} "
    f"steps per timed call, {s['rounds']} interleaved rounds (median, IQR). The machine was "
    "shared with other jobs (see the load average): compare the ratios, not the "
    "milliseconds. Guided: fix_gap 10, one true gradient per 10 steps included (amortised).",
    "",
  ]
  cols = ["model", "method", "ms / step (median)", "IQR", "ratio to backprop"]
  table = rep.Table([*cols, "paper (s / iteration, GPU)"])
  for model, rows in result["table"].items():
    for name, v in rows.items():
      ms, ratio = v["ms"], rep.num(v["ratio_to_backprop"], ".2f")
      table.add_row(
        model,
        name,
        f"{ms['median']:.1f}",
        f"{ms['iqr']:.1f}",
        ratio,
        PAPER.get((model, name), rep.DASH),
      )
  lines += table.lines()
  if not result.get("sweep"):
    return [rep.write_text(out / "time.md", [*lines, ""])]
  sw, t = result["sweep"], result["sweep"]["times"]

  def cell(v):
    return f"{v['ms']['median']:.1f} ({rep.num(v['ratio_to_backprop'], '.2f')})"

  table = rep.Table(["k", "average (mean of k)", "partition (k blocks, sum)"])
  for k in sw["ks"]:
    table.add_row(k, cell(t[f"average k={k}"]), cell(t[f"partition k={k}"]))
  lines += ["", "Fig. 13, MLP: ms / step against k (ratio to backprop in brackets)", ""]
  lines += table.lines()
  fig, ax = rep.pyplot().subplots(figsize=(5, 3.5))
  for kind in ("average", "partition"):
    ms = [t[f"{kind} k={k}"]["ms"] for k in sw["ks"]]
    med, lo, hi = ([m[q] for m in ms] for q in ("median", "q25", "q75"))
    err = [np.subtract(med, lo), np.subtract(hi, med)]
    ax.errorbar(sw["ks"], med, yerr=err, marker="o", label=kind, capsize=2)
  ax.axhline(t["backprop"]["ms"]["median"], color="k", ls="--", lw=1, label="backprop")
  ax.set_xlabel("number of directions / partitions k")
  ax.set_ylabel("ms per step (median, IQR)")
  ax.set_title(f"MLP, batch {s['batch_size']} (shared 2-core CPU)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  png = rep.save_figure(fig, out / "time_vs_k.png")
  lines += ["", f"![time vs k]({png.name})", "", ""]
  return [rep.write_text(out / "time.md", lines), png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="time.json",
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
