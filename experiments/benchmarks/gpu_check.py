"""A GPU check in one command (``make gpu-check``): forward vs backprop steps, memory, demo rows.

Sized for about 8 minutes on one H100 (``--budget-s``: a model and batch that would start
past the budget is skipped and says so; the JSON is rewritten after each, so a run cut
short keeps what it measured). Needs only jax, flax, optax and numpy (no Hydra, no tfds):

* step times of the training loop (``fwdgrad_jax.training.benchmark``: the app's chunked
  ``fori_loop`` of estimator + SGD, interleaved rounds, medians) for backprop, dense
  forward k = 1, 4, 16 (mean), rank-1 k = 1, activity k = 1 and regenerated k = 16, on
  Baydin's MLP (784-1024-1024-10), CNN and ResNet18 (32×32×3) at batch 64 and 256, as
  ratios to the base pass (R) and to backprop; the compiled peak memory of each loop;
* 200 training steps of each demo row (configs/demo.yaml: the MLP at batch 64 on
  Fashion-MNIST, each row's lr) with its final validation loss and step time. The data:
  ``.gpu_data/fashion_mnist.npz`` (``make gpu-check-data`` writes it here, 8 MB; carry
  the folder), else random data of the same shapes (the report says which).

Writes ``<out>/<device>.md`` and ``<out>/gpu_check.json``; ``make gpu-check`` puts them in
``$OUT`` when that is set (the device machine), else in ``results/benchmarks/gpu/``.

  python -m experiments.benchmarks.gpu_check --out results/benchmarks/gpu
  python -m experiments.benchmarks.gpu_check --quick
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import script
from experiments._lib.config import ROOT

DATA = ROOT / ".gpu_data" / "fashion_mnist.npz"
MODELS = {
  "mlp": ("mlp", {"hidden": [1024, 1024], "activation": "relu"}, (28, 28, 1)),
  "cnn": ("cnn", {"channels": 64, "hidden": 1024}, (28, 28, 1)),
  "resnet18": ("resnet18", {"width": 64, "norm": "batch", "sites": True}, (32, 32, 3)),
}
QUICK_MODELS = {"mlp": ("mlp", {"hidden": [32], "activation": "relu"}, (28, 28, 1))}
VARIANTS = {
  "backprop": {"name": "backprop"},
  "forward k=1": {"num_tangents": 1},
  "forward k=4": {"num_tangents": 4},
  "forward k=16": {"num_tangents": 16},
  "rank1 k=1": {"num_tangents": 1, "tangents": "rank1"},
  "activity k=1": {"num_tangents": 1, "perturbation": "activity"},
  "regenerated k=16": {"num_tangents": 16, "regenerate": True},
}
#: The smoke test's variants and demo rows: backprop (the reference of the ratios) and one
#: forward step, the first demo row (a group choice and a value, the two kinds of override).
#: The others run the same code with other options; each would be one more compile.
QUICK_VARIANTS = ("backprop", "forward k=1")
QUICK_DEMO_ROWS = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--models", type=rep.names, default=list(MODELS))
  p.add_argument("--batch-sizes", type=rep.ints, default=[64, 256])
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=10, help="steps per timed call")
  p.add_argument("--demo-steps", type=int, default=200)
  p.add_argument("--budget-s", type=float, default=420.0, help="start nothing new after this")
  p.add_argument(
    "--quick",
    action="store_true",
    help="a 32-wide MLP, batch 8, 2 rounds, backprop and forward k=1, one demo row",
  )


def _config(model: str, options: dict, batch: int, estimator: dict, lr: float = 1e-4):
  from fwdgrad_jax.training import config as config_lib

  cfg = config_lib.Config()
  cfg.model = config_lib.ModelConfig(name=model, options=dict(options))
  cfg.estimator = config_lib.EstimatorConfig(**{"name": "forward", **estimator})
  cfg.optimizer = config_lib.OptimizerConfig(name="sgd", lr=lr)
  cfg.train = config_lib.TrainConfig(batch_size=batch, checkpoint_every=0, progress=False)
  return cfg


def _variants(quick: bool) -> dict[str, dict[str, Any]]:
  return {v: VARIANTS[v] for v in QUICK_VARIANTS} if quick else VARIANTS


def step_times(label: str, model: tuple, batch: int, args: argparse.Namespace) -> list[dict]:
  """Every variant's loop step on one model and batch: ms, R, vs backprop, peak memory."""
  from fwdgrad_jax.training import benchmark as bench

  name, options, shape = model
  problem = bench.make_problem(
    name,
    model_options=options,
    input_shape=shape,
    num_classes=10,
    examples=batch * args.steps,
    seed=0,
  )
  variants = _variants(args.quick)
  configs = {"base": None} | {v: _config(name, options, batch, est) for v, est in variants.items()}
  lowered, failed = {}, {}
  for v, cfg in configs.items():
    try:
      lowered[v] = bench.lower(cfg, problem, batch_size=batch, steps=args.steps)
    except Exception as e:  # noqa: BLE001 - one variant's failure is a row, not the end
      failed[v] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  exes = bench.compile_all([low.timed for low in lowered.values()])
  functions = {v: exe for v, (exe, _) in zip(lowered, exes)}
  timings, _ = bench.time_variants(
    functions,
    {v: low.args for v, low in lowered.items()},
    rounds=args.rounds,
    steps=args.steps,
    seed=0,
  )
  base = timings["base"].median
  back = timings["backprop"].median if "backprop" in timings else None
  rows = []
  for v in configs:
    if v in failed:
      rows.append({"model": label, "batch": batch, "variant": v, "error": failed[v]})
      continue
    ms = timings[v].median * 1e3
    rows.append(
      {
        "model": label,
        "batch": batch,
        "variant": v,
        "params": problem.num_params,
        "ms": ms,
        "R": timings[v].median / base,
        "vs_backprop": None if back is None else timings[v].median / back,
        "compile_s": exes[list(lowered).index(v)][1],
        "peak_bytes": bench.memory_of(functions[v])["peak"],
      }
    )
  return rows


def _demo_rows() -> dict[str, list[str]]:
  import yaml

  return yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["rows"]


def _apply(cfg, override: str) -> None:
  """One Hydra-style override of a demo row (``estimator=backprop``, ``a.b=value``)."""
  import yaml

  key, value = override.split("=", 1)
  if key == "model":  # the group's file, read without Hydra (not on the GPU machine)
    from fwdgrad_jax.training import config as config_lib

    fields = yaml.safe_load((ROOT / "configs" / "model" / f"{value}.yaml").read_text())
    cfg.model = config_lib.ModelConfig(**fields)
    return
  if "." not in key:  # the other group choices the demo rows use are estimators
    cfg.estimator.name = value
    return
  section, field = key.split(".", 1)
  setattr(getattr(cfg, section), field, yaml.safe_load(value))


def write_data(train: int = 12800) -> Path:
  """Writes ``.gpu_data/fashion_mnist.npz``: the app's Fashion-MNIST splits as uint8.

  The loaded images are an affine map of the 0-255 pixels (per-channel normalisation),
  so storing ``round(255 (x − lo)/(hi − lo))`` with lo and hi is exact; ``train`` training
  examples (200 steps of batch 64), the whole validation and test splits: about 8 MB.
  """
  import numpy as np

  from fwdgrad_jax import data as data_lib

  ds = data_lib.load("fashion_mnist")
  xs = {"train": np.asarray(ds.x_train[:train]), "val": np.asarray(ds.x_val),
        "test": np.asarray(ds.x_test)}  # fmt: skip
  lo = min(float(x.min()) for x in xs.values())
  hi = max(float(x.max()) for x in xs.values())
  q = {f"x_{s}": np.round((x - lo) * (255.0 / (hi - lo))).astype(np.uint8) for s, x in xs.items()}
  ys = {"y_train": np.asarray(ds.y_train[:train]), "y_val": np.asarray(ds.y_val),
        "y_test": np.asarray(ds.y_test)}  # fmt: skip
  DATA.parent.mkdir(exist_ok=True)
  np.savez_compressed(DATA, lo=lo, hi=hi, **q, **ys)
  print(f"wrote {DATA} ({DATA.stat().st_size / 2**20:.1f} MiB)")
  return DATA


def _dataset(quick: bool):
  """Fashion-MNIST from ``.gpu_data`` (uint8, exact) or random data; (dataset, what)."""
  import jax.numpy as jnp
  import numpy as np

  from fwdgrad_jax import data as data_lib

  if DATA.exists() and not quick:
    z = np.load(DATA)
    lo, hi = float(z["lo"]), float(z["hi"])

    def x(name):
      return jnp.asarray(lo + z[name].astype(np.float32) * ((hi - lo) / 255.0))

    arrays = {s: x(f"x_{s}") for s in ("train", "val", "test")}
    labels = {s: jnp.asarray(z[f"y_{s}"]) for s in ("train", "val", "test")}
    what = f"Fashion-MNIST ({DATA.relative_to(ROOT)}: {arrays['train'].shape[0]} training examples)"
  else:
    rng = np.random.default_rng(0)
    sizes = {"train": 512 if quick else 12800, "val": 256 if quick else 5000, "test": 256}
    arrays = {
      s: jnp.asarray(rng.standard_normal((n, 28, 28, 1), dtype=np.float32))
      for s, n in sizes.items()
    }
    labels = {s: jnp.asarray(rng.integers(0, 10, n, dtype=np.int32)) for s, n in sizes.items()}
    what = "random data (no .gpu_data/fashion_mnist.npz: `make gpu-check-data` here, then carry .gpu_data)"
  ds = data_lib.Dataset(
    name="fashion_mnist",
    num_classes=10,
    x_train=arrays["train"],
    y_train=labels["train"],
    x_val=arrays["val"],
    y_val=labels["val"],
    x_test=arrays["test"],
    y_test=labels["test"],
    mean=(0.0,),
    std=(1.0,),
  )
  return ds, what


def demo(args: argparse.Namespace, out: Path) -> dict[str, Any]:
  """``--demo-steps`` training steps of every demo row, as the app runs them."""
  import tempfile

  from fwdgrad_jax.training import run as run_lib

  dataset, what = _dataset(args.quick)
  options = QUICK_MODELS["mlp"][1] if args.quick else MODELS["mlp"][1]
  rows = {}
  demo_rows = list(_demo_rows().items())
  for label, overrides in demo_rows[:QUICK_DEMO_ROWS] if args.quick else demo_rows:
    cfg = _config("mlp", options, 64, {})
    for o in overrides:
      _apply(cfg, o)
    cfg.train.steps = args.demo_steps
    cfg.train.log_every = max(1, args.demo_steps // 4)
    cfg.train.eval_every = args.demo_steps
    with tempfile.TemporaryDirectory(dir=out) as d:
      t0 = time.perf_counter()
      summary = run_lib.train(cfg, d, dataset=dataset)
      wall = time.perf_counter() - t0
    rows[label] = {
      "overrides": overrides,
      "val_loss": summary["val_loss"],
      "val_accuracy": summary["val_accuracy"],
      "step_time_ms": summary["step_time_ms"],
      "runtime_ratio": summary["runtime_ratio"],
      "wall_s": wall,
    }
  return {"data": what, "steps": args.demo_steps, "rows": rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
  import jax

  models = QUICK_MODELS if args.quick else {m: MODELS[m] for m in args.models}
  if args.quick:
    args.batch_sizes, args.rounds, args.steps, args.demo_steps = [8], 2, 2, 4
  device = jax.devices()[0]
  result: dict[str, Any] = {
    "settings": {
      "device": f"{device.platform}:{device.device_kind}",
      "models": {m: list(models[m][:2]) for m in models},
      "batch_sizes": args.batch_sizes,
      "variants": _variants(args.quick),
      "rounds": args.rounds,
      "steps": args.steps,
      "budget_s": args.budget_s,
      "timing": "the training loop's chunk of `steps` steps, interleaved rounds, median",
    },
    "steps": [],
    "skipped": [],
  }
  start = time.perf_counter()
  partial = Path(args.out) / "gpu_check.partial.json"

  def over_budget(what: str) -> bool:
    if time.perf_counter() - start > args.budget_s:
      result["skipped"].append(what)
      return True
    return False

  # The MLP and CNN first, then the demo rows, then ResNet18 (the slowest to compile).
  order = [m for m in models if m != "resnet18"]
  for label in order:
    for batch in args.batch_sizes:
      if not over_budget(f"{label} batch {batch}"):
        result["steps"] += step_times(label, models[label], batch, args)
        partial.write_text(json.dumps(result, indent=1))
        print(f"{label} batch {batch}: {time.perf_counter() - start:.0f} s", flush=True)
  if not over_budget("demo rows"):
    result["demo"] = demo(args, Path(args.out))
    partial.write_text(json.dumps(result, indent=1))
    print(f"demo rows: {time.perf_counter() - start:.0f} s", flush=True)
  if "resnet18" in models:
    for batch in args.batch_sizes:
      if not over_budget(f"resnet18 batch {batch}"):
        result["steps"] += step_times("resnet18", models["resnet18"], batch, args)
        partial.write_text(json.dumps(result, indent=1))
        print(f"resnet18 batch {batch}: {time.perf_counter() - start:.0f} s", flush=True)
  result["total_s"] = time.perf_counter() - start
  partial.unlink(missing_ok=True)
  return result


def _num(x: float | None, spec: str) -> str:
  return rep.DASH if x is None else format(x, spec)


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s = result["settings"]
  table = rep.Table(
    ["model", "batch", "variant", "ms / step", "R (÷ base)", "÷ backprop", "peak MiB", "compile s"],
    ["---", "--:", "---", "--:", "--:", "--:", "--:", "--:"],
  )
  for r in result["steps"]:
    if "error" in r:
      table.add_row(r["model"], r["batch"], r["variant"], r["error"], "", "", "", "")
      continue
    peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
    table.add_row(
      r["model"],
      r["batch"],
      r["variant"],
      _num(r["ms"], ".3f"),
      _num(r["R"], ".2f"),
      _num(r["vs_backprop"], ".2f"),
      _num(peak, ".1f"),
      _num(r["compile_s"], ".1f"),
    )
  lines = [
    f"# GPU check: {s['device']}",
    "",
    *rep.provenance_lines(result.get("provenance")),
    "",
    f"Step times: {s['timing']} ({s['steps']} steps per call, {s['rounds']} rounds); R = "
    "step ÷ base pass; peak = compiled memory of the loop (arguments + outputs + temp − "
    f"aliased). Total {result.get('total_s', 0):.0f} s.",
    "",
    *table.lines(),
    "",
  ]
  if result.get("skipped"):
    lines += [f"Skipped (past the {s['budget_s']:g} s budget): {', '.join(result['skipped'])}.", ""]
  if "demo" in result:
    d = result["demo"]
    demo_table = rep.Table(
      ["row", "val loss", "val accuracy", "ms / step", "R", "wall s"],
      ["---", "--:", "--:", "--:", "--:", "--:"],
    )
    for label, r in d["rows"].items():
      demo_table.add_row(
        label,
        _num(r["val_loss"], ".4f"),
        _num(r["val_accuracy"], ".4f"),
        _num(r["step_time_ms"], ".3f"),
        _num(r["runtime_ratio"], ".2f"),
        _num(r["wall_s"], ".1f"),
      )
    lines += [
      f"## Demo rows, {d['steps']} training steps each",
      "",
      f"configs/demo.yaml's rows (MLP 784-1024-1024-10, batch 64, each row's lr) on {d['data']}.",
      "",
      *demo_table.lines(),
      "",
    ]
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", s["device"].split(":", 1)[-1]).strip("_") or "device"
  path = out / f"{name}.md"
  path.write_text("\n".join(lines))
  print("\n".join(lines))
  return [path]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="gpu_check.json",
    description=__doc__,
    add_arguments=add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
