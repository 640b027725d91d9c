"""Where tangents enter: step time, compiled memory and cosine to ∇f of every scheme.

For the Baydin MLP (784-1024-1024-10) and the Baydin CNN, batch 64, one SGD step of:
backprop; forward gradients with dense Gaussian and Rademacher weight tangents, rank-1
weight tangents, Yao's input-generated tangents (the cheap approximation) and activity
perturbation with per-example losses, at k = 1, 4, 16 (mean aggregation). Timed with the
project's benchmark (interleaved rounds, medians, compile excluded), against the base
pass (forward + loss) and backprop; memory from XLA's compiled analysis of one step; the
mean cosine of each estimate to ``jax.grad`` on a real Fashion-MNIST batch.

The MLP steps are timed as the training loop runs them (a compiled chunk of 10 steps);
the CNN steps as one jitted step per call from Python (what ``train.loop=auto`` does for
convolutional models on CPU, where XLA runs reverse-mode convolutions inside a loop
~25× slower).

  python -m experiments.perturbation.benchmark --out results/perturbation
  python -m experiments.perturbation.benchmark --models mlp --ks 1 --rounds 2   # quick look
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import fwdgrad_jax as fg
from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax import data
from fwdgrad_jax.training import benchmark, records
from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import steps as steps_lib

#: (label, estimator config fields): the schemes compared.
SCHEMES = {
  "weights normal": dict(tangents="normal"),
  "weights rademacher": dict(tangents="rademacher"),
  "rank1": dict(tangents="rank1"),
  "input_approx": dict(tangents="input_approx"),
  "activity": dict(perturbation="activity"),
}
CALLS = {"mlp": "loop", "cnn": "single"}


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--models", default="mlp,cnn")
  p.add_argument("--ks", default="1,4,16")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--steps", type=int, default=10, help="steps per timed call (loop)")
  p.add_argument("--cosine-samples", type=int, default=16)
  p.add_argument(
    "--schemes", default=",".join(SCHEMES), help="comma-separated labels (default: all)"
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="MLP 784-64-64-10, k = 1, activity only, 2 rounds of 2 steps",
  )


def _config(model: str, label: str | None, k: int) -> config_lib.Config:
  est = config_lib.EstimatorConfig(name="backprop")
  if label is not None:
    est = config_lib.EstimatorConfig(name="forward", num_tangents=k, **SCHEMES[label])
  return config_lib.validate(
    config_lib.Config(
      model=config_lib.ModelConfig(name=model),
      estimator=est,
      optimizer=config_lib.OptimizerConfig(name="sgd", lr=1e-4),
    )
  )


def _variants(model: str, ks: list[int], schemes: list[str]) -> dict[str, config_lib.Config | None]:
  out: dict[str, config_lib.Config | None] = {"base": None, "backprop": _config(model, None, 1)}
  for k in ks:
    for label in schemes:
      out[f"{label} k={k}"] = _config(model, label, k)
  return out


def _cosines(model: str, variants, samples: int, options: dict[str, Any]) -> dict[str, float]:
  """Mean cosine of each estimate to jax.grad on one real Fashion-MNIST batch."""
  ds = data.load("fashion_mnist", val_size=0)
  problem = benchmark.make_problem(
    model, model_options=options, input_shape=ds.input_shape, num_classes=10, examples=64, seed=0
  )
  x, y = ds.x_train[:64], ds.y_train[:64]
  true = jax.grad(problem.loss)(problem.params, x, y)
  keys = jax.random.split(jax.random.key(1), samples)
  out = {}
  for name, cfg in variants.items():
    if cfg is None or cfg.estimator.name != "forward":
      continue
    est = fg.value_and_forward_grad(
      problem.estimated(cfg), **steps_lib.estimator_options(cfg.estimator)
    )
    # params and data as arguments: closed over, they are constants that XLA
    # constant-folds (seconds per convolution at compile time).
    cos = jax.jit(
      lambda keys, params, x, y, true, est=est: jax.lax.map(
        lambda k: fg.cosine_similarity(est(k, params, x, y)[1], true), keys
      )
    )(keys, problem.params, x, y, true)
    out[name] = float(jnp.mean(cos))
  return out


def _one_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
  ks = [int(k) for k in args.ks.split(",")]
  schemes = args.schemes.split(",")
  unknown = sorted(set(schemes) - set(SCHEMES))
  if unknown:
    raise ValueError(f"--schemes: unknown {unknown}; known: {', '.join(SCHEMES)}")
  variants = _variants(model, ks, schemes)
  # The smoke test's MLP is narrow: it checks the run end to end, not the numbers.
  options = {"hidden": (64, 64)} if args.quick and model == "mlp" else {}
  shape = benchmark.default_input_shape(model)
  calls = CALLS[model]
  steps = args.steps if calls == "loop" else 1
  problem = benchmark.make_problem(
    model, model_options=options, input_shape=shape, num_classes=10, examples=64 * steps, seed=0
  )
  lowered = {
    n: benchmark.lower(c, problem, batch_size=64, steps=steps, calls=calls)
    for n, c in variants.items()
  }
  compiled = benchmark.compile_all([low.step for low in lowered.values()])
  timed = [low.timed for low in lowered.values() if low.timed is not None]
  timed_exes = iter(benchmark.compile_all(timed))
  functions, memory = {}, {}
  for (name, low), (step_exe, _) in zip(lowered.items(), compiled):
    memory[name] = benchmark.memory_of(step_exe)
    functions[name] = next(timed_exes)[0] if low.timed is not None else step_exe
  args_of = {n: low.args for n, low in lowered.items()}
  timings, _ = benchmark.time_variants(
    functions,
    args_of,
    rounds=args.rounds,
    steps={n: low.steps for n, low in lowered.items()},
    seed=0,
    log=lambda line: print(model, line, flush=True),
  )
  cosines = _cosines(model, variants, args.cosine_samples, options)
  base, bp = timings["base"].median, timings["backprop"].median
  rows = []
  for name in variants:
    t = timings[name]
    rows.append(
      dict(
        name=name,
        ms=t.as_dict(1e3),
        x_base=t.median / base,
        x_backprop=t.median / bp,
        memory=memory[name],
        cosine=cosines.get(name, 1.0 if name == "backprop" else None),
      )
    )
  k1 = {
    r["name"].rsplit(" k=", 1)[0]: r["ms"]["median"] for r in rows if r["name"].endswith(" k=1")
  }
  for r in rows:
    if " k=" in r["name"]:
      r["x_k1"] = r["ms"]["median"] / k1[r["name"].rsplit(" k=", 1)[0]]
  return dict(
    model=model, calls=calls, steps_per_call=steps, num_params=problem.num_params, rows=rows
  )


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.quick:
    args.models, args.ks, args.rounds, args.steps, args.cosine_samples = "mlp", "1", 2, 2, 2
    args.schemes = "activity"  # each scheme is two compiles through the same code
  return dict(
    settings=dict(
      batch_size=64,
      aggregation="mean",
      rounds=args.rounds,
      data_for_cosine="fashion_mnist",
      cosine_samples=args.cosine_samples,
    ),
    models=[_one_model(m, args) for m in args.models.split(",")],
  )


def report(result: dict[str, Any], out: Path) -> list[Path]:
  prov = result["provenance"]
  lines = ["# Where tangents enter: step time, memory and cosine", ""]
  lines.append(f"`{prov['command']}`")
  lines += ["", records.hardware_line(prov)]
  for m in result["models"]:
    how = (
      f"a compiled chunk of {m['steps_per_call']} steps (the training loop)"
      if m["calls"] == "loop"
      else "one jitted step per call from Python"
    )
    lines += [
      "",
      f"## {m['model']} ({m['num_params']:,} params), batch 64, timed as {how}",
      "",
    ]
    cols = ["variant", "median ms", "× base", "× backprop", "× k=1", "temp MiB", "peak MiB"]
    table = rep.Table([*cols, "mean cos to ∇f"])
    for r in m["rows"]:
      mem = r["memory"]
      ratios = (rep.num(r.get(x), ".2f") for x in ("x_base", "x_backprop", "x_k1"))
      mib = (f"{mem[x] / 2**20:.1f}" for x in ("temp", "peak"))
      table.add_row(
        r["name"], f"{r['ms']['median']:.2f}", *ratios, *mib, rep.num(r["cosine"], ".4f")
      )
    lines += table.lines()
  lines += [
    "",
    "Mean aggregation. Memory: XLA's compiled analysis of one step (state donated; "
    "peak = arguments + outputs + temp − aliased). Cosine: mean over "
    f"{result['settings'].get('cosine_samples', 16)} keys on the first 64 Fashion-MNIST "
    "training images, at initialisation.",
  ]
  md = out / "benchmark.md"
  md.write_text("\n".join(lines) + "\n")
  return [md]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="benchmark.json",
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
