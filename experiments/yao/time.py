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

from experiments._lib import script
from fwdgrad_jax.training import records

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
  p.add_argument("--ks", default="1,2,4,8,16", help="k for Fig. 13")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=10, help="steps per timed call (multiple of 10)")
  p.add_argument("--models", default="mlp,yao_cnn")
  p.add_argument("--no-sweep", action="store_true", help="skip Fig. 13")
  p.add_argument("--quick", action="store_true", help="batch 32, 2 rounds, k 1,2")


def _time_group(model: str, labels: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
  from experiments.yao import lib as yao
  from fwdgrad_jax.training import benchmark

  cfgs = {
    name: yao.train_config(model, est, batch_size=args.batch_size) for name, est in labels.items()
  }
  problem = benchmark.make_problem(
    model,
    model_options=yao.MODEL_OPTIONS[model],
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
    functions, exes = _host_stepped(cfgs, problem, args)
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


def _host_stepped(cfgs, problem, args):
  """CNN steps from the host, one compiled step per call, as the app's ``loop=host``.

  Convolutions inside an XLA:CPU loop run ~20x slower (jax-ml/jax#12868), so the app
  steps convolutional models from Python; so does this timer. The state advances from
  call to call (each timed call runs ``steps`` consecutive steps, so the guided method
  pays exactly one true gradient per call of 10 steps).
  """
  import time

  import jax

  from fwdgrad_jax.training import steps as steps_lib

  b = args.batch_size
  batches = [
    (problem.x[i * b : (i + 1) * b], problem.y[i * b : (i + 1) * b]) for i in range(args.steps)
  ]
  functions, exes = {}, []
  for name, cfg in cfgs.items():
    tx = steps_lib.make_tx(cfg, problem.est_key)
    # Copies: the step donates its state, and the key and params are shared with others.
    state = jax.tree.map(jax.numpy.copy, steps_lib.init_state(tx, problem.params))
    t0 = time.perf_counter()
    exe = (
      jax.jit(steps_lib.make_step_fn(problem.loss, tx), donate_argnums=0)
      .lower(state, *batches[0])
      .compile()
    )
    exes.append((exe, time.perf_counter() - t0))
    box = {"state": state}

    def calls(exe=exe, box=box):
      st = box["state"]
      for xb, yb in batches:
        st = exe(st, xb, yb)
      box["state"] = st
      return st.params

    functions[name] = calls
  return functions, exes


def run(args: argparse.Namespace) -> dict[str, Any]:
  from experiments.yao import lib as yao

  ks = [int(k) for k in args.ks.split(",")]
  if args.quick:
    args.batch_size, args.rounds, ks = 32, 2, [1, 2]
  table = {}
  for model in args.models.split(","):
    names = TABLE_MLP if model == "mlp" else TABLE_CNN
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
    ),
    table=table,
    sweep=sweep,
  )


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s, prov = result["settings"], result["provenance"]
  lines = [
    "# Yao Table I and Fig. 13: time per training step",
    "",
    f"`{prov['command']}`",
    "",
    records.hardware_line(prov),
    "",
    f"Batch {s['batch_size']}, {s['optimizer']}, the app's jitted loop, {s['steps_per_call']} "
    f"steps per timed call, {s['rounds']} interleaved rounds (median, IQR). The machine was "
    "shared with other jobs (see the load average): compare the ratios, not the "
    "milliseconds. Guided: fix_gap 10, one true gradient per 10 steps included (amortised).",
    "",
    "| model | method | ms / step (median) | IQR | ratio to backprop | paper (s / iteration, GPU) |",
    "|---|---|---|---|---|---|",
  ]
  for model, rows in result["table"].items():
    for name, v in rows.items():
      lines.append(
        f"| {model} | {name} | {v['ms']['median']:.1f} | {v['ms']['iqr']:.1f} | "
        f"{_f(v['ratio_to_backprop'])} | {PAPER.get((model, name), '–')} |"
      )
  files = []
  if result.get("sweep"):
    sw = result["sweep"]
    t = sw["times"]
    lines += [
      "",
      "Fig. 13, MLP: ms / step against k (ratio to backprop in brackets)",
      "",
      "| k | average (mean of k) | partition (k blocks, sum) |",
      "|---|---|---|",
    ]
    for k in sw["ks"]:
      a, p = t[f"average k={k}"], t[f"partition k={k}"]
      lines.append(
        f"| {k} | {a['ms']['median']:.1f} ({_f(a['ratio_to_backprop'])}) | "
        f"{p['ms']['median']:.1f} ({_f(p['ratio_to_backprop'])}) |"
      )
    png = out / "time_vs_k.png"
    plt = records.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in ("average", "partition"):
      med = [t[f"{kind} k={k}"]["ms"]["median"] for k in sw["ks"]]
      lo = [t[f"{kind} k={k}"]["ms"]["q25"] for k in sw["ks"]]
      hi = [t[f"{kind} k={k}"]["ms"]["q75"] for k in sw["ks"]]
      ax.errorbar(
        sw["ks"],
        med,
        yerr=[np.subtract(med, lo), np.subtract(hi, med)],
        marker="o",
        label=kind,
        capsize=2,
      )
    ax.axhline(t["backprop"]["ms"]["median"], color="k", ls="--", lw=1, label="backprop")
    ax.set_xlabel("number of directions / partitions k")
    ax.set_ylabel("ms per step (median, IQR)")
    ax.set_title(f"MLP, batch {s['batch_size']} (shared 2-core CPU)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    lines += ["", f"![time vs k]({png.name})", ""]
    files.append(png)
  md = out / "time.md"
  md.write_text("\n".join(lines) + "\n")
  return [md, *files]


def _f(x, spec=".2f"):
  return "–" if x is None else format(x, spec)


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
