"""Before/after of issue #12's tangent layout fix, timed in one process.

``before``: the estimator's former dense path — ``tangents.sample`` then
``tangents.materialize`` (the draw inside no conditional, its buffer copied out of one)
and the aggregation as a ``tensordot`` over k (which XLA:CPU runs after copying V into
the matmul's order). ``after``: ``fwdgrad_jax.value_and_forward_grad`` as it is now
(``tangents.draw``: drawn inside the conditional, dense layers stored (in, k, out);
the aggregation a reduction). Same tangents, same estimate; Baydin's MLP at batch 64,
mean of k tangents, jitted estimator calls, interleaved rounds. Also the compiled temp
memory of each.

  python -m experiments.benchmarks.tangent_layout --tangents 1,4,16 --rounds 10 \\
      --out results/benchmarks
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax.training import records


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tangents", type=rep.ints, default=[1, 4, 16])
  p.add_argument("--schemes", default="normal,rademacher")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--quick",
    action="store_true",
    help="MLP 784-32-10, normal tangents, k ∈ {1, 2}, batch 8, 2 rounds",
  )


def before(loss, k: int, scheme: str):
  """The former dense path: sample, materialize, tensordot."""
  import jax
  import jax.numpy as jnp

  import fwdgrad_jax as fg
  from fwdgrad_jax import tangents

  def est(key, params, x, y):
    v = tangents.materialize(tangents.sample(key, params, k, scheme), key)
    value, d, _ = fg.directional_derivatives(lambda q: loss(q, x, y), params, v)
    c = d / k
    if k == 1:
      return value, jax.tree.map(lambda t: c[0] * t[0], v)
    hi = jax.lax.Precision.HIGHEST
    return value, jax.tree.map(lambda t: jnp.tensordot(c, t, axes=1, precision=hi), v)

  return est


def run(args: argparse.Namespace) -> dict[str, Any]:
  import jax

  hidden = [1024, 1024]
  if args.quick:  # each (scheme, k, before/after) is a compile: one scheme, a narrow MLP
    args.tangents, args.batch_size, args.rounds, args.schemes = [1, 2], 8, 2, "normal"
    hidden = [32]

  import fwdgrad_jax as fg
  from fwdgrad_jax.training import benchmark as bench

  p = bench.make_problem(
    "mlp",
    model_options={"hidden": hidden},
    input_shape=(28, 28, 1),
    num_classes=10,
    examples=args.batch_size,
    seed=args.seed,
  )
  schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
  fns, memory = {}, {}
  for scheme in schemes:
    for k in args.tangents:
      for when, est in (
        ("before", before(p.loss, k, scheme)),
        ("after", fg.value_and_forward_grad(p.loss, num_tangents=k, tangents=scheme)),
      ):
        name = f"{when} {scheme} k={k}"
        exe = jax.jit(est).lower(p.est_key, p.params, p.x, p.y).compile()
        fns[name] = exe
        memory[name] = bench.memory_of(exe)["temp"]
  fns["forward pass"] = jax.jit(lambda key, params, x, y: p.loss(params, x, y))
  args_of = {n: (lambda: (p.est_key, p.params, p.x, p.y)) for n in fns}
  timings = records.time_interleaved(
    fns,
    rounds=args.rounds,
    args=args_of,
    steps=1,
    seed=args.seed,
    on_round=lambda r: print(f"round {r + 1}/{args.rounds}", flush=True),
  )
  return {
    "settings": {
      "model": "mlp " + "-".join(str(n) for n in (784, *hidden, 10)),
      "batch_size": args.batch_size,
      "schemes": schemes,
      "tangents": args.tangents,
      "aggregation": "mean",
      "rounds": args.rounds,
      "timing": "one jitted estimator call per timed call, interleaved, median",
    },
    "ms": {n: t.median * 1e3 for n, t in timings.items()},
    "iqr_ms": {n: (t.q75 - t.q25) * 1e3 for n, t in timings.items()},
    "temp_bytes": memory,
  }


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s, ms, iqr, mem = result["settings"], result["ms"], result["iqr_ms"], result["temp_bytes"]
  table = rep.Table(
    [
      "scheme",
      "k",
      "before ms (IQR)",
      "after ms (IQR)",
      "before / after",
      "temp MiB before → after",
    ]
  )
  for scheme in s["schemes"]:
    for k in s["tangents"]:
      b, a = f"before {scheme} k={k}", f"after {scheme} k={k}"
      table.add_row(
        scheme,
        k,
        f"{ms[b]:.1f} ({iqr[b]:.1f})",
        f"{ms[a]:.1f} ({iqr[a]:.1f})",
        f"{ms[b] / ms[a]:.2f}×",
        f"{mem[b] / 2**20:.1f} → {mem[a] / 2**20:.1f}",
      )
  lines = table.lines()
  command = result.get("provenance", {}).get("command", "(command not recorded)")
  text = (
    f"# Tangent layout: before/after\n\n`{command}`\n\n{s['model']}, batch {s['batch_size']}, "
    f"{s['aggregation']} of k tangents; {s['timing']}, {s['rounds']} rounds; forward pass "
    f"{ms['forward pass']:.1f} ms.\n\n"
    + records.hardware_line(result.get("provenance"))
    + "\n\n"
    + "\n".join(lines)
    + "\n"
  )
  path = out / "tangent_layout.md"
  path.write_text(text)
  print(text)
  return [path]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="tangent_layout.json",
    description=__doc__,
    add_arguments=add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
