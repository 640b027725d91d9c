"""fwdgrad_jax against the PyTorch peer: one jitted forward-gradient SGD step per call.

The setting of issue #12 (Baydin et al.'s MLP 784-1024-1024-10, batch 64, Gaussian
tangents, k = 1, 4, 16, one SGD step per call from Python): fwdgrad_jax's
``value_and_forward_grad`` + SGD update in one jitted call (parameters donated), against
``experiments/benchmarks/peers/torch_fwdgrad.py`` (``torch.func.jvp`` + ``functional_call``, a
Python loop over k — the orobix/fwdgrad approach). The peer runs in its own process
(torch may live in another venv: ``--peer-python``) and answers over a pipe, so both are
timed in ONE interleaved timer (:func:`fwdgrad_jax.records.time_interleaved`: rounds
in a shuffled order, medians), under the same load. Without a peer the fwdgrad_jax times
are recorded alone; ``--peer-json`` reads a standalone run of the peer instead.

  python -m experiments.benchmarks.peer --peer-python /work/torchvenv/bin/python \\
      --rounds 15 --out results/benchmarks
  python -m experiments.benchmarks.peer --schemes normal,rademacher,normal_threefry
  python -m experiments.benchmarks.peer --report-only results/benchmarks/peer_b64.json \\
      --out results/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax.training import records

PEER = Path(__file__).resolve().parent / "peers" / "torch_fwdgrad.py"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tangents", type=rep.ints, default=[1, 4, 16])
  p.add_argument(
    "--schemes",
    type=rep.names,
    default=["normal", "rademacher"],
    help="fwdgrad_jax tangent samplers to time (the peer draws torch.randn)",
  )
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--steps", type=int, default=10, help="steps per timed call")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--peer-python",
    default=os.environ.get("FWDGRAD_PEER_PYTHON"),
    help="a Python with torch to run the peer (default $FWDGRAD_PEER_PYTHON)",
  )
  p.add_argument("--peer-json", default=None, help="a standalone run of the peer to report beside")
  p.add_argument("--peer-threads", type=int, default=None, help="the peer's torch threads")


class _PeerProcess:
  """The peer in ``--serve`` mode: ``run(k, steps)`` → seconds by its own clock."""

  def __init__(self, python: str, batch_size: int, threads: int | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    extra = ["--threads", str(threads)] if threads else []
    self.proc = subprocess.Popen(
      [python, str(PEER), "--serve", "--batch-size", str(batch_size), *extra],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=env,
    )
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the peer did not start ({python} {PEER} --serve)")
    self.info = json.loads(line)
    self.seconds: dict[int, list[float]] = {}

  def run(self, k: int, steps: int) -> None:
    self.proc.stdin.write(f"{k} {steps}\n")
    self.proc.stdin.flush()
    reply = json.loads(self.proc.stdout.readline())
    self.seconds.setdefault(k, []).append(reply["seconds"] / steps)

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=30)


def make_step(loss, k: int, scheme: str, lr: float):
  """``step(key, params, x, y) -> (key, params)``: one estimate and SGD update, jitted."""
  import jax

  import fwdgrad_jax as fg

  estimate = fg.value_and_forward_grad(loss, num_tangents=k, tangents=scheme)

  def step(key, params, x, y):
    key, sub = jax.random.split(key)
    _, g = estimate(sub, params, x, y)
    return key, jax.tree.map(lambda p, d: p - lr * d, params, g)

  return jax.jit(step, donate_argnums=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  from fwdgrad_jax.training import benchmark as bench

  problem = bench.make_problem(
    "mlp",
    model_options={"hidden": [1024, 1024]},
    input_shape=(28, 28, 1),
    num_classes=10,
    examples=args.batch_size,
    seed=args.seed,
  )
  x, y = problem.x, problem.y
  variants, states = {}, {}

  def jax_call(name, step):
    def call():
      key, params = states[name]
      for _ in range(args.steps):
        key, params = step(key, params, x, y)
      states[name] = (key, params)
      return params

    return call

  for scheme in args.schemes:
    for k in args.tangents:
      name = f"fwdgrad_jax {scheme} k={k}"
      states[name] = (problem.est_key, jax.tree.map(jnp.copy, problem.params))
      variants[name] = jax_call(name, make_step(problem.loss, k, scheme, args.lr))
  peer = None
  if args.peer_python:
    peer = _PeerProcess(args.peer_python, args.batch_size, args.peer_threads)
  try:
    if peer is not None:
      for k in args.tangents:
        variants[f"torch k={k}"] = lambda k=k: peer.run(k, args.steps)
    timings = records.time_interleaved(
      variants,
      rounds=args.rounds,
      steps=args.steps,
      warmup=1,
      seed=args.seed,
      on_round=lambda r: print(f"round {r + 1}/{args.rounds}", flush=True),
    )
  finally:
    if peer is not None:
      peer.close()
  result: dict[str, Any] = {
    "settings": {
      "model": "mlp 784-1024-1024-10 (ReLU)",
      "num_params": problem.num_params,
      "batch_size": args.batch_size,
      "tangents": args.tangents,
      "schemes": args.schemes,
      "aggregation": "mean",
      "optimizer": f"sgd(lr={args.lr:g})",
      "rounds": args.rounds,
      "steps_per_call": args.steps,
      "timing": "one jitted step per Python call, steps_per_call calls per timed call, "
      "interleaved rounds in a shuffled order, median ms per step",
    },
    "ms_per_step": {n: t.median * 1e3 for n, t in timings.items()},
    "iqr_ms": {n: (t.q75 - t.q25) * 1e3 for n, t in timings.items()},
  }
  if peer is not None:
    import statistics

    result["peer"] = {
      **peer.info,
      "self_timed_ms_per_step": {
        str(k): statistics.median(v) * 1e3 for k, v in sorted(peer.seconds.items())
      },
    }
  if args.peer_json:
    result["peer_standalone"] = json.loads(Path(args.peer_json).read_text())
  return result


def _peer_ms(result: dict[str, Any], k: int) -> float | None:
  if f"torch k={k}" in result["ms_per_step"]:
    return result["ms_per_step"][f"torch k={k}"]
  standalone = result.get("peer_standalone")
  if standalone:
    return standalone["ms_per_step"].get(str(k))
  return None


def render(result: dict[str, Any]) -> str:
  s = result["settings"]
  ms = result["ms_per_step"]
  head = ["k", *[f"fwdgrad_jax {sc} ms" for sc in s["schemes"]], "PyTorch ms"]
  head += [f"PyTorch / {sc}" for sc in s["schemes"]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for k in s["tangents"]:
    peer = _peer_ms(result, k)
    ours = [ms.get(f"fwdgrad_jax {sc} k={k}") for sc in s["schemes"]]
    row = [str(k), *[f"{t:.2f}" for t in ours], rep.num(peer, ".2f")]
    row += [rep.num(peer and peer / t, "{:.2f}×") for t in ours]
    lines.append("| " + " | ".join(row) + " |")
  peer_info = result.get("peer") or result.get("peer_standalone")
  who = f"PyTorch {peer_info['torch']} ({peer_info['threads']} threads)" if peer_info else "no peer"
  return (
    f"{s['model']}, {s['num_params']:,} params, batch {s['batch_size']}, {s['aggregation']} of "
    f"k tangents, {s['optimizer']}; {s['timing']}; {s['rounds']} rounds × "
    f"{s['steps_per_call']} steps. Peer: {who}. Ratio > 1: fwdgrad_jax is faster.\n\n"
    + records.hardware_line(result.get("provenance"))
    + "\n\n"
    + "\n".join(lines)
    + "\n"
  )


def report(result: dict[str, Any], out: Path) -> list[Path]:
  command = result.get("provenance", {}).get("command", "(command not recorded)")
  table = render(result)
  path = out / "peer_b64.md"
  path.write_text(f"# fwdgrad_jax vs the PyTorch peer\n\n`{command}`\n\n{table}")
  print(table)
  return [path]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="peer_b64.json",
    description=__doc__,
    add_arguments=add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
