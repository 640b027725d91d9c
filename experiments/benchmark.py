"""Runtime and memory benchmark: base vs backprop vs forward-gradient train steps.

Times the jitted functions of :mod:`fwdgrad_jax.benchmark` (base = forward + loss, one
backprop SGD step, one forward-gradient SGD step for every k and aggregation) on random
data of the model's input shape, interleaved over rounds, and records the compiled
memory of one step. Writes ``<out>.json`` (everything, incl. per-round times) and
``<out>.md`` (the table) and prints the table.

  python experiments/benchmark.py --model mlp --batch-size 64 \\
      --tangents 1,2,4,16 --aggregations mean,sum,orthogonal --rounds 20 \\
      --out results/benchmarks/mlp_b64
  python experiments/benchmark.py --model mlp --model-option hidden=[256,256]
  python experiments/benchmark.py --model cnn --model-options '{"channels": 32}'
  python experiments/benchmark.py --model deep_mlp --model-option depth=100 --memory-only
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any


def _ints(text: str) -> list[int]:
  return [int(t) for t in text.split(",") if t.strip()]


def _names(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def _option(text: str) -> tuple[str, Any]:
  """``key=value`` with a JSON value (``hidden=[1024,1024]``, ``use_bias=false``), else a string."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
  try:
    return key.strip(), json.loads(value)
  except json.JSONDecodeError:
    return key.strip(), value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """The command line (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    "--input-shape", type=_ints, default=None, help="H,W,C (default 28,28,1; 32,32,3 for vgg)"
  )
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--tangents", type=_ints, default=[1, 2, 4, 16], help="k values, e.g. 1,2,4,16")
  p.add_argument("--aggregations", type=_names, default=["mean", "sum", "orthogonal"])
  p.add_argument("--tangent-scheme", default="normal", help="normal, rademacher, partition")
  p.add_argument("--no-backprop", action="store_true", help="leave out the backprop step")
  p.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
  p.add_argument("--steps", type=int, default=10, help="train steps per timed call (fori_loop)")
  p.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate of the steps")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--memory-only", action="store_true", help="compile for memory, time nothing")
  p.add_argument(
    "--prng-impl",
    default=None,
    help="jax_default_prng_impl (e.g. rbg); on CPU the threefry tangent draw dominates",
  )
  p.add_argument(
    "--out",
    default=None,
    help="output path without suffix (default results/benchmarks/<model>_b<batch>)",
  )
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, writes ``<out>.json`` and ``<out>.md``, prints the table.

  Args:
    argv: command-line arguments (``sys.argv[1:]`` if None).

  Returns:
    The result dict of :func:`fwdgrad_jax.benchmark.benchmark` plus ``command``.
  """
  args = parse_args(argv)
  import jax

  if args.prng_impl:
    # Before any key exists: make_tx's PRNGKey then uses this implementation.
    jax.config.update("jax_default_prng_impl", args.prng_impl)
  from fwdgrad_jax import benchmark as bench

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
    rounds=args.rounds,
    steps=args.steps,
    lr=args.lr,
    seed=args.seed,
    timed=not args.memory_only,
    log=lambda line: print(line, file=sys.stderr, flush=True),
  )
  argv_used = sys.argv[1:] if argv is None else [str(a) for a in argv]
  result["command"] = shlex.join(["python", "experiments/benchmark.py", *argv_used])
  out = Path(args.out or f"results/benchmarks/{args.model}_b{args.batch_size}")
  out.parent.mkdir(parents=True, exist_ok=True)
  table = bench.render_markdown(result)
  md = f"# Benchmark: {args.model}, batch {args.batch_size}\n\n`{result['command']}`\n\n{table}"
  Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
  Path(f"{out}.md").write_text(md)
  print(table)
  print(f"wrote {out}.json and {out}.md")
  return result


if __name__ == "__main__":
  main()
