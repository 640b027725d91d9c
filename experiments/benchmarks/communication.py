"""Bytes a training step sends between devices: backprop vs forward gradients.

Data parallelism with backprop all-reduces a weight-sized gradient every step. Forward
gradients with tangents regenerated from a shared key (``estimator.regenerate=true``)
need only the k directional derivatives: each device computes d on its shard, the k
numbers are averaged across devices, and every device forms the same estimate V·c from
the key (:mod:`fwdgrad_jax.parallel`). This script compiles the app's training step (the
model's stateful loss, the estimator's optax transform, SGD: ``training.steps.make_step_fn``)
for each estimator on a mesh of forced CPU devices and reads the cross-device collectives
of the compiled HLO (:func:`fwdgrad_jax.parallel.collective_bytes`: all-reduce,
all-gather, reduce-scatter, collective-permute, all-to-all; operand shape × dtype, per
device). Nothing runs: shapes only, so the 100-layer MLP (100 M parameters) costs no
memory. Timing on forced CPU devices would mean nothing; bytes only.

Rows: backprop, forward with stored tangents (mean), forward regenerated (mean and, on
the MLP, orthogonal), on a data-parallel mesh (D × 1) and, on the MLP, a tangent-parallel
mesh (1 × D, forward with k a multiple of D). Each device count runs in its own
subprocess (the device count is fixed when JAX starts).

  python -m experiments.benchmarks.communication --out results/benchmarks
  python -m experiments.benchmarks.communication --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import script
from experiments._lib.config import ROOT

#: The models: Baydin et al.'s MLP (configs/model/mlp.yaml) and the 100-layer MLP of their
#: Fig. 6 scalability study (configs/model/deep_mlp.yaml with depth 100); whether to add
#: the orthogonal and tangent-parallel rows (the 100-layer steps take minutes each to
#: compile on 2 shared cores, so it gets data parallelism with the mean only).
MODELS = {
  "mlp 784-1024-1024-10": ("mlp", {"hidden": [1024, 1024], "activation": "relu"}, True),
  "deep_mlp 100 × 1024": ("deep_mlp", {"depth": 100, "width": 1024}, False),
}
#: The smoke test: every row is a compile through the same code, so the mean rows only
#: (backprop, stored, regenerated) on the data-parallel mesh.
QUICK_MODELS = {"mlp 784-64-64-10": ("mlp", {"hidden": [64, 64], "activation": "relu"}, False)}


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--devices", type=rep.ints, default=[2, 4], help="forced CPU device counts")
  p.add_argument("--tangents", type=rep.ints, default=[1, 4, 16], help="k values")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument(
    "--quick", action="store_true", help="a 64-wide MLP, 2 devices, k = 2, the mean rows only"
  )


def estimators(ks: list[int], devices: int, full: bool = True) -> list[dict[str, Any]]:
  """The rows for one device count: (label, mesh, estimator config); ``full``: with the
  orthogonal aggregation and the tangent-parallel meshes."""
  rows = [{"estimator": "backprop", "k": None, "mesh": (devices, 1), "cfg": {"name": "backprop"}}]
  for k in ks:
    for regenerate in (False, True):
      for agg in ("mean", "orthogonal"):
        if agg == "orthogonal" and (k == 1 or not regenerate or not full):
          continue  # k = 1: the mean's direction; stored: XLA's (all-gathers V for VᵀV)
        name = f"forward {'regenerated' if regenerate else 'stored'} {agg}"
        cfg = {"name": "forward", "num_tangents": k, "aggregation": agg, "regenerate": regenerate}
        rows.append({"estimator": name, "k": k, "mesh": (devices, 1), "cfg": cfg})
        if full and k % devices == 0:
          rows.append({"estimator": name, "k": k, "mesh": (1, devices), "cfg": cfg})
  return rows


def measure(devices: int, models: dict[str, Any], ks: list[int], batch_size: int) -> dict:
  """Compiles every row's step with ``devices`` CPU devices; returns collective bytes.

  Runs in a fresh process: the CPU device count is set before JAX touches a device.
  """
  import jax

  jax.config.update("jax_num_cpu_devices", devices)
  import jax.numpy as jnp
  from flax import nnx

  from fwdgrad_jax import models as models_lib
  from fwdgrad_jax import parallel
  from fwdgrad_jax.training import config as config_lib
  from fwdgrad_jax.training import steps

  out = []
  for label, (name, options, full) in models.items():
    model = nnx.eval_shape(
      lambda: models_lib.create(  # noqa: B023
        name, input_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0), **options
      )
    )
    graphdef, params, rest = models_lib.split(model)
    num_params = models_lib.count_params(params)
    for row in estimators(ks, devices, full):
      mesh = parallel.make_mesh(*row["mesh"])
      rep_ = parallel.replicated(mesh)
      cfg = config_lib.Config()
      cfg.estimator = config_lib.EstimatorConfig(**row["cfg"])
      cfg.optimizer = config_lib.OptimizerConfig(name="sgd", lr=0.01)
      loss = parallel.data_parallel(steps.make_stateful_loss(graphdef), mesh)
      tx = steps.make_tx(cfg, jax.random.PRNGKey(0), has_aux=True, mesh=mesh)
      state = jax.eval_shape(lambda p, r: steps.init_state(tx, p, r), params, rest)  # noqa: B023
      state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep_), state)  # noqa: B023
      x = jax.ShapeDtypeStruct((batch_size, 28, 28, 1), jnp.float32, sharding=rep_)
      y = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rep_)
      step = jax.jit(steps.make_step_fn(loss, tx), out_shardings=rep_)
      coll = parallel.collective_bytes(step.lower(state, x, y).compile().as_text())
      out.append(
        {
          "model": label,
          "params": num_params,
          "estimator": row["estimator"],
          "k": row["k"],
          "mesh": list(row["mesh"]),
          **coll,
        }
      )
      print(json.dumps({k: out[-1][k] for k in ("model", "estimator", "k", "mesh", "bytes")}),
            file=sys.stderr, flush=True)  # fmt: skip
  return {"devices": len(jax.devices()), "rows": out}


def run(args: argparse.Namespace) -> dict[str, Any]:
  models = QUICK_MODELS if args.quick else MODELS
  if args.quick:
    args.devices, args.tangents, args.batch_size = [2], [2], 8
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  procs = []
  for devices in args.devices:  # one process per device count, side by side (compiles only)
    code = (
      "import json, sys; from experiments.benchmarks.communication import measure; "
      f"print(json.dumps(measure({devices}, {models!r}, {args.tangents!r}, {args.batch_size})))"
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
      )
    )
  results = []
  for devices, proc in zip(args.devices, procs):
    out, _ = proc.communicate()
    if proc.returncode:
      raise RuntimeError(f"the measurement with {devices} devices failed (exit {proc.returncode})")
    results.append(json.loads(out.strip().splitlines()[-1]))
  return {
    "settings": {
      "models": list(models),
      "devices": args.devices,
      "tangents": args.tangents,
      "batch_size": args.batch_size,
      "optimizer": "sgd",
      "bytes": "operands of the compiled step's collectives, per device, once per op",
    },
    "results": results,
  }


def _mib(b: float) -> str:
  if b >= 2**20:
    return f"{b / 2**20:.1f} MiB"
  if b >= 2**10:
    return f"{b / 2**10:.1f} KiB"
  return f"{int(b)} B"


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s = result["settings"]
  table = rep.Table(
    ["model", "devices", "mesh (data × tangents)", "estimator", "k", "collectives",
     "bytes", "of backprop's"],
    ["---", "--:", "---", "---", "--:", "--:", "--:", "--:"],
  )  # fmt: skip
  worst: dict[str, float] = {}
  for res in result["results"]:
    back = {r["model"]: r["bytes"] for r in res["rows"] if r["estimator"] == "backprop"}
    for r in res["rows"]:
      frac = r["bytes"] / back[r["model"]] if back.get(r["model"]) else float("nan")
      if r["estimator"].startswith("forward regenerated"):
        worst[r["model"]] = max(worst.get(r["model"], 0.0), frac)
      ops = ", ".join(f"{o['count']} {kind}" for kind, o in sorted(r["ops"].items())) or "none"
      table.add_row(
        r["model"],
        res["devices"],
        "{} × {}".format(*r["mesh"]),
        r["estimator"],
        rep.DASH if r["k"] is None else r["k"],
        ops,
        f"{r['bytes']:,} ({_mib(r['bytes'])})",
        f"{100 * frac:.3g} %",
      )
  summary = "; ".join(f"{m}: at most {100 * f:.3g} %" for m, f in worst.items())
  text = "\n".join(
    [
      "# Bytes a step sends between devices",
      "",
      *rep.provenance_lines(result.get("provenance")),
      "",
      f"The app's training step (stateful loss, estimator transform, SGD), batch "
      f"{s['batch_size']}, compiled for forced CPU devices ({s['devices']}); bytes are the "
      f"{s['bytes']} (`fwdgrad_jax.parallel.collective_bytes` of the compiled HLO). No data "
      "set (shapes only); timing on forced CPU devices would mean nothing, so bytes only.",
      "",
      "Target (issue 22): the regenerated forward step's collective bytes ≤ 1 % of "
      f"backprop's. Regenerated rows, largest share of backprop's: {summary}.",
      "",
      *table.lines(),
      "",
    ]
  )
  path = out / "communication.md"
  path.write_text(text)
  print(text)
  return [path]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="communication.json",
    description=__doc__,
    add_arguments=add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
