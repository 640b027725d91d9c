"""Runtime and memory benchmark: base vs backprop vs forward-gradient steps.

Times the jitted functions of fwdgrad_jax.training.benchmark (base = forward + loss, backprop,
forward gradients for every k and aggregation) on random data of the model's input
shape, interleaved over rounds, and records the compiled memory of one step. Two ways
to call them: --calls loop (default: the training loop's chunk of SGD steps, on device)
and --calls single (one jitted value_and_forward_grad / jax.value_and_grad call per step
from Python, the way a user calls the function transforms). Writes <name>.json
(everything, incl. per-round times and provenance) and <name>.md (the table).

  python -m experiments.benchmarks.benchmark --model mlp --batch-size 64 \\
      --tangents 1,2,4,16 --aggregations mean,sum,orthogonal --rounds 15 \\
      --out results/benchmarks
  python -m experiments.benchmarks.benchmark --model mlp --tangents 1,4,16 --aggregations mean \\
      --calls single --rounds 20
  python -m experiments.benchmarks.benchmark --model mlp --model-option hidden=[256,256]
  python -m experiments.benchmarks.benchmark --model deep_mlp --model-option depth=100 --memory-only
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.benchmarks.benchmark \
      --model mlp --tangents 4,16 --aggregations mean --mesh 2,2 --name mlp_b64_mesh2x2
  python -m experiments.benchmarks.benchmark --report-only results/benchmarks/mlp_b64.json \\
      --out results/benchmarks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import script


def _option(text: str) -> tuple[str, Any]:
  """``key=value`` with a JSON value (``hidden=[1024,1024]``, ``use_bias=false``), else a string."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
  try:
    return key.strip(), json.loads(value)
  except json.JSONDecodeError:
    return key.strip(), value


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The benchmark's options (see the module docstring)."""
  p.add_argument("--model", default="mlp", help="name in fwdgrad_jax.models.MODELS")
  p.add_argument(
    "--model-option",
    action="append",
    type=_option,
    default=[],
    metavar="KEY=VALUE",
    help="model constructor option, value as JSON (repeatable), e.g. hidden=[1024,1024]",
  )
  p.add_argument("--model-options", default=None, help="model options as a JSON object")
  p.add_argument(
    "--input-shape", type=rep.ints, default=None, help="H,W,C (default 28,28,1; 32,32,3 for vgg)"
  )
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--tangents", type=rep.ints, default=[1, 2, 4, 16], help="k values, e.g. 1,2,4,16")
  p.add_argument("--aggregations", type=rep.names, default=["mean", "sum", "orthogonal"])
  p.add_argument("--tangent-scheme", default="normal", help="normal, rademacher, partition")
  p.add_argument("--no-backprop", action="store_true", help="leave out the backprop step")
  p.add_argument(
    "--regenerate",
    choices=["off", "on", "both"],
    default="off",
    help="forward variants with tangents stored (off), regenerated from the key (on), or both",
  )
  p.add_argument(
    "--calls",
    choices=["loop", "single"],
    default="loop",
    help="loop: the training loop's on-device chunk of SGD steps; single: one jitted "
    "estimator call per step from Python, as a user calls value_and_forward_grad",
  )
  p.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
  p.add_argument("--steps", type=int, default=10, help="train steps per timed call (loop)")
  p.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate of the steps")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="logreg, batch 8, k=2 mean, 2 rounds")
  p.add_argument("--memory-only", action="store_true", help="compile for memory, time nothing")
  p.add_argument(
    "--prng-impl",
    default=None,
    help="jax_default_prng_impl (e.g. rbg); on CPU the threefry tangent draw dominates",
  )
  p.add_argument(
    "--mesh",
    type=rep.ints,
    default=[1, 1],
    metavar="DATA,TANGENTS",
    help="devices along the batch and the tangent axes (fwdgrad_jax.parallel); on a CPU "
    "set XLA_FLAGS=--xla_force_host_platform_device_count=N first",
  )
  p.add_argument(
    "--name",
    default=None,
    help="file name without suffix (default <model>_b<batch>, plus _single for --calls single)",
  )


def _name(args: argparse.Namespace) -> str:
  suffix = "_single" if args.calls == "single" else ""
  return args.name or f"{args.model}_b{args.batch_size}{suffix}"


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs :func:`fwdgrad_jax.training.benchmark.benchmark` with the command line's settings."""
  import jax

  if args.quick:
    args.model, args.batch_size, args.tangents, args.aggregations = "logreg", 8, [2], ["mean"]
    args.rounds, args.steps = 2, 2

  if args.prng_impl:
    # Before any key exists: make_tx's PRNGKey then uses this implementation.
    jax.config.update("jax_default_prng_impl", args.prng_impl)
  from fwdgrad_jax.training import benchmark as bench

  options = json.loads(args.model_options) if args.model_options else {}
  options.update(dict(args.model_option))
  result = bench.benchmark(
    args.model,
    model_options=options,
    input_shape=args.input_shape,
    num_classes=args.num_classes,
    batch_size=args.batch_size,
    tangents=args.tangents,
    aggregations=args.aggregations,
    tangent_scheme=args.tangent_scheme,
    backprop=not args.no_backprop,
    regenerate={"off": (False,), "on": (True,), "both": (False, True)}[args.regenerate],
    calls=args.calls,
    rounds=args.rounds,
    steps=args.steps,
    lr=args.lr,
    seed=args.seed,
    timed=not args.memory_only,
    log=lambda line: print(line, flush=True),
    mesh=tuple(getattr(args, "mesh", None) or (1, 1)),
  )
  return {"name": _name(args), **result}


def report(result: dict[str, Any], out: Path) -> list[Path]:
  """``<name>.md``: the command and the table; the table is printed too."""
  from fwdgrad_jax.training import benchmark as bench

  s = result["settings"]
  table = bench.render_markdown(result)
  command = result.get("provenance", {}).get("command", "(command not recorded)")
  name = result.get("name") or f"{s['model']}_b{s['batch_size']}"
  path = out / f"{name}.md"
  title = f"# Benchmark: {s['model']}, batch {s['batch_size']}, calls: {s.get('calls', 'loop')}"
  path.write_text(f"{title}\n\n`{command}`\n\n{table}")
  print(table)
  return [path]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark (or only its report) and writes ``<name>.json`` and ``<name>.md``."""
  return script.main(
    __file__,
    run,
    report,
    result_file=lambda args: f"{_name(args)}.json",
    description=__doc__,
    add_arguments=add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
