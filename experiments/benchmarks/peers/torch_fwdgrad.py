"""The PyTorch peer: forward gradients the orobix/fwdgrad way (optional; needs torch).

``torch.func.jvp`` of ``torch.func.functional_call`` along one Gaussian tangent at a time,
a Python loop over the k tangents, the estimate the mean of d_i v_i, then a plain SGD
update — one step per call, on Baydin et al.'s MLP 784-1024-1024-10 (ReLU) at batch 64.
It runs only where torch is importable (e.g. a separate venv: ``pip install torch``); the
project never imports it. Two modes:

  python experiments/benchmarks/peers/torch_fwdgrad.py --tangents 1,4,16 --rounds 10 --out peer.json
  python experiments/benchmarks/peers/torch_fwdgrad.py --serve     # for experiments/benchmarks/peer.py

``--serve`` reads lines ``K STEPS`` on stdin, runs STEPS steps with K tangents and
answers one JSON line ``{"k": K, "steps": STEPS, "seconds": …}`` (its own timer), so
the project's benchmark can interleave the peer's calls with its own in one timer.

References:
  Baydin et al., 2022. Gradients without Backpropagation.
  orobix/fwdgrad (github.com/orobix/fwdgrad): the PyTorch implementation this mirrors.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from torch import nn
from torch.func import functional_call, jvp


def make_model(hidden=(1024, 1024), inputs=784, classes=10, seed=0):
  torch.manual_seed(seed)
  widths = [inputs, *hidden]
  layers: list[nn.Module] = [nn.Flatten()]
  for a, b in zip(widths[:-1], widths[1:]):
    layers += [nn.Linear(a, b), nn.ReLU()]
  layers.append(nn.Linear(widths[-1], classes))
  return nn.Sequential(*layers)


def make_step(model: nn.Module, k: int, lr: float):
  """One forward-gradient SGD step with k Gaussian tangents (orobix/fwdgrad's loop)."""
  names = [n for n, _ in model.named_parameters()]
  params = {n: p.detach() for n, p in model.named_parameters()}
  loss_fn = nn.CrossEntropyLoss()

  def f(p, x, y):
    return loss_fn(functional_call(model, p, (x,)), y)

  @torch.no_grad()
  def step(x, y):
    grad = {n: torch.zeros_like(params[n]) for n in names}
    for _ in range(k):
      v = {n: torch.randn_like(params[n]) for n in names}
      _, d = jvp(lambda p: f(p, x, y), (params,), (v,))
      for n in names:
        grad[n].add_(v[n], alpha=float(d) / k)
    for n in names:
      params[n].sub_(grad[n], alpha=lr)

  return step


class Peer:
  def __init__(self, batch_size=64, lr=1e-4, seed=0):
    self.model = make_model(seed=seed)
    g = torch.Generator().manual_seed(seed)
    self.x = torch.randn(batch_size, 1, 28, 28, generator=g)
    self.y = torch.randint(0, 10, (batch_size,), generator=g)
    self.lr = lr
    self.steps = {}

  def run(self, k: int, steps: int) -> float:
    if k not in self.steps:
      self.steps[k] = make_step(self.model, k, self.lr)
      self.steps[k](self.x, self.y)  # first touch, untimed
    step = self.steps[k]
    t0 = time.perf_counter()
    for _ in range(steps):
      step(self.x, self.y)
    return time.perf_counter() - t0


def info() -> dict:
  return {
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "python": platform.python_version(),
    "machine": platform.processor() or platform.machine(),
  }


def serve(peer: Peer) -> None:
  print(json.dumps({"ready": True, **info()}), flush=True)
  for line in sys.stdin:
    if not line.strip():
      continue
    k, steps = (int(t) for t in line.split())
    seconds = peer.run(k, steps)
    print(json.dumps({"k": k, "steps": steps, "seconds": seconds}), flush=True)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--serve", action="store_true")
  p.add_argument("--tangents", default="1,4,16")
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--steps", type=int, default=10, help="steps per timed call")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
  p.add_argument(
    "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
  )
  args = p.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  peer = Peer(batch_size=args.batch_size)
  if args.serve:
    serve(peer)
    return
  ks = [int(t) for t in args.tangents.split(",")]
  times = {k: [] for k in ks}
  for _ in range(args.rounds):
    for k in ks:
      times[k].append(peer.run(k, args.steps) / args.steps * 1e3)
  result = {
    "peer": "torch.func.jvp + functional_call, Python loop over k (orobix/fwdgrad)",
    "model": "MLP 784-1024-1024-10 ReLU",
    "batch_size": args.batch_size,
    "steps_per_call": args.steps,
    "ms_per_step": {str(k): statistics.median(v) for k, v in times.items()},
    "times_ms": {str(k): v for k, v in times.items()},
    **info(),
  }
  text = json.dumps(result, indent=1)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  main()
