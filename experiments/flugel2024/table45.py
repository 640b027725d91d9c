"""Flügel et al. 2024, §4.5 table: ResNet18 and ViT, k tangents, mean vs orthogonal vs backprop.

Two parts, each for every model in ``--models``:

* ``timing`` — what the paper could not measure (its forward gradients were simulated
  with backprop): seconds per step of the real thing, one jitted call per step on one
  batch, timed against each other with the shared interleaved timer
  (``fwdgrad_jax.records.time_interleaved``): ``base`` (forward pass + loss),
  ``backprop`` (``jax.value_and_grad``) and forward gradients with activity perturbation
  at Flügel's layers (``fwdgrad_jax.site`` markers of ``fwdgrad_jax.models.flugel2024``; true forward
  mode, per-example directional derivatives, local VJPs inside each block) for
  k ∈ {1, 2, 4, 16}, mean and orthogonal. R_f = forward step / base, R_b = backprop / base.
* ``training`` — a very short SGD training of a stateless model (the ViT) for backprop
  and the forward variants from the same initialisation, one jitted ``lax.scan`` per
  variant, Fashion-MNIST; test error on a subset of the test set. (ResNet18 trains through
  the app, ``experiments/train.py model=resnet18``, which threads its BatchNorm state.)

REDUCED budgets (2 shared CPU cores; the paper trains up to 100 epochs on an A100, with a
per-variant lr search): timing batch sizes and the training steps are set by the options
below; training uses ``rescale=True`` (the app's default: the estimate scaled to the
expected length of ∇f) so that one lr serves every k and aggregation instead of a
per-variant search. Every number says what it was measured with.

  python -m experiments.flugel2024.table45 --part timing --models resnet18 --out results/flugel2024/table45_timing_resnet18
  python -m experiments.flugel2024.table45 --part timing --models vit --out results/flugel2024/table45_timing_vit
  python -m experiments.flugel2024.table45 --part training --models vit --train-steps 60 --train-batch 16 --lr 0.1 --out results/flugel2024/table45_training_vit_a
  python -m experiments.flugel2024.table45 --report-only results/flugel2024/table45_*/table45.json --out results/flugel2024/table45
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fwdgrad_jax as fg
from experiments._lib import report as rep
from experiments._lib import script
from experiments._lib.sgd import minibatch, sgd
from fwdgrad_jax import data, models
from fwdgrad_jax.training import records
from fwdgrad_jax.training import steps as steps_lib

SHAPE = (28, 28, 1)  # Fashion-MNIST


def _forward_variants(ks):
  out = []
  for k in ks:
    for agg in ("mean", "orthogonal") if k > 1 else ("mean",):
      out.append((f"forward k={k} {agg}" if k > 1 else "forward k=1", k, agg))
  return out


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--part", choices=("timing", "training"), default="timing")
  p.add_argument("--models", nargs="+", default=None, help="default resnet18 vit (--quick: vit)")
  p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 16])
  p.add_argument(
    "--timing-batch",
    type=int,
    nargs="+",
    default=[8],
    help="batch size of the timed steps, one per model or one for all",
  )
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--train-steps", type=int, default=100)
  p.add_argument("--train-batch", type=int, default=32)
  p.add_argument("--train-ks", type=int, nargs="+", default=[1, 4, 16])
  p.add_argument("--train-resnet-width", type=int, default=16)
  p.add_argument("--train-variants", nargs="*", default=None, help="labels to train (default: all)")
  p.add_argument(
    "--test-examples", type=int, default=2000, help="test images evaluated after training"
  )
  p.add_argument(
    "--lr", type=float, default=0.05, help="SGD lr of every variant (rescaled estimates)"
  )
  p.add_argument("--quick", action="store_true", help="tiny models, k = 1, 2 rounds / 10 steps")


def _model_options(name: str, args: argparse.Namespace, training: bool) -> dict[str, Any]:
  if args.quick:
    return (
      {"width": 4} if name == "resnet18" else {"hidden": 16, "heads": 4, "mlp": 32, "layers": 1}
    )
  if name == "resnet18" and training:
    return {"width": args.train_resnet_width}
  return {}


def _timing(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
  opts = _model_options(name, args, training=False)
  model = models.create(name, input_shape=SHAPE, num_classes=10, rngs=nnx.Rngs(0), **opts)
  graphdef, params, rest = models.split(model)
  params = jax.tree.map(jnp.asarray, params)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, *SHAPE), dtype=np.float32))
  y = jnp.asarray(rng.integers(0, 10, (batch,), dtype=np.int32))
  loss = steps_lib.make_loss(graphdef, rest)
  per_example = steps_lib.make_loss(graphdef, rest, per_example=True)
  key = jax.random.key(0)
  fns: dict[str, Any] = {
    "base": (jax.jit(loss), (params, x, y)),
    "backprop": (jax.jit(jax.value_and_grad(loss)), (params, x, y)),
  }
  for label, k, agg in _forward_variants(args.ks):
    est = fg.value_and_forward_grad(
      per_example, num_tangents=k, aggregation=agg, perturbation="activity"
    )
    fns[label] = (jax.jit(est), (key, params, x, y))
  compile_s = {}
  compiled = {}
  for label, (fn, a) in fns.items():
    t0 = time.perf_counter()
    compiled[label] = fn.lower(*a).compile()
    compile_s[label] = time.perf_counter() - t0
    print(f"{name}: compiled {label} in {compile_s[label]:.0f}s", flush=True)
  timings = records.time_interleaved(
    {label: compiled[label] for label in fns},
    rounds=args.rounds,
    args={label: (lambda a=a: a) for label, (_, a) in fns.items()},
    warmup=1,
    on_round=lambda r: print(f"{name}: round {r + 1}/{args.rounds}", flush=True),
  )
  med = {label: t.median for label, t in timings.items()}
  rows = []
  for label in fns:
    t = timings[label].as_dict(1e3)
    rows.append(
      dict(
        variant=label,
        ms_median=t["median"],
        ms_q25=t["q25"],
        ms_q75=t["q75"],
        times_ms=t["times"],
        compile_s=compile_s[label],
        R=med[label] / med["base"],
        vs_backprop=med[label] / med["backprop"],
      )
    )
  return dict(
    model=name,
    model_options=opts,
    num_params=models.count_params(params),
    batch=batch,
    rounds=args.rounds,
    rows=rows,
  )


def _training(name: str, ds: data.Dataset, args: argparse.Namespace) -> dict[str, Any]:
  """Short SGD runs of one stateless model (the ViT): one jitted scan per variant.

  Data and parameters are arguments of the jitted function (closed-over arrays would be
  constant-folded by XLA at compile time). Forward variants use activity perturbation at
  the sites with ``rescale=True``, so the one lr serves every k and aggregation.
  """
  opts = _model_options(name, args, training=True)
  steps = 10 if args.quick else args.train_steps
  model = models.create(name, input_shape=SHAPE, num_classes=10, rngs=nnx.Rngs(0), **opts)
  graphdef, params, rest = models.split(model)
  if jax.tree.leaves(rest):
    raise ValueError(f"--part training runs stateless models only; {name} has state {rest}")
  params = jax.tree.map(jnp.asarray, params)
  loss = steps_lib.make_loss(graphdef, rest)
  per_example = steps_lib.make_loss(graphdef, rest, per_example=True)
  apply = models.apply_fn(graphdef, rest)
  variants = [("backprop", None, None), *_forward_variants([1] if args.quick else args.train_ks)]
  if args.train_variants:
    variants = [v for v in variants if v[0] in args.train_variants]
  xt, yt = ds.x_test[: args.test_examples], ds.y_test[: args.test_examples]
  rows = []
  for label, k, agg in variants:
    if k is None:
      est = fg.value_and_exact_grad(loss)
    else:
      est = fg.value_and_forward_grad(
        per_example, num_tangents=k, aggregation=agg, perturbation="activity", rescale=True
      )

    def train_and_test(p, x, y, xt, yt):
      on_batches = minibatch(est, x, y, args.train_batch)
      p, losses = sgd(on_batches, p, jax.random.key(1), args.lr, steps)
      # Cosine of one more estimate to the true minibatch gradient, at the end.
      xb, yb = x[: args.train_batch], y[: args.train_batch]
      _, g = est(jax.random.key(2), p, xb, yb)
      cos = fg.cosine_similarity(g, jax.grad(loss)(p, xb, yb))
      logits = apply(p, xt)
      return (
        losses,
        cos,
        steps_lib.cross_entropy(logits, yt),
        jnp.mean(jnp.argmax(logits, -1) != yt),
      )

    t0 = time.perf_counter()
    losses, cos, test_loss, test_err = jax.jit(train_and_test)(
      params, ds.x_train, ds.y_train, xt, yt
    )
    wall = time.perf_counter() - t0
    losses = np.asarray(losses, np.float64)
    rows.append(
      dict(
        variant=label,
        test_error=float(test_err),
        test_loss=float(test_loss),
        diverged=not bool(np.all(np.isfinite(losses))),
        train_loss_first=float(losses[0]),
        train_loss_last10=float(np.mean(losses[-10:])),
        grad_check_cosine=float(cos),
        wall_s=wall,
      )
    )
    print(f"{name} {label}: test error {rows[-1]['test_error']:.3f} ({wall:.0f}s)", flush=True)
  return dict(
    model=name,
    model_options=opts,
    num_params=models.count_params(params),
    steps=steps,
    batch=args.train_batch,
    lr=args.lr,
    test_examples=int(xt.shape[0]),
    rows=rows,
  )


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.quick:  # every variant is a compile of the same code: k = 1 beside backprop
    args.ks, args.rounds = [1], 2
  if args.models is None:  # ResNet18's compiles dominate a smoke test
    args.models = ["vit"] if args.quick else ["resnet18", "vit"]
  out: dict[str, Any] = dict(
    settings=dict(
      part=args.part, models=args.models, ks=args.ks, data="fashion_mnist", input_shape=SHAPE
    ),
    timing=[],
    training=[],
  )
  if args.part == "timing":
    batches = (
      args.timing_batch * len(args.models) if len(args.timing_batch) == 1 else args.timing_batch
    )
    for name, batch in zip(args.models, batches):
      out["timing"].append(_timing(name, batch, args))
  else:
    ds = data.load("fashion_mnist", val_size=5000, seed=0)
    for name in args.models:
      out["training"].append(_training(name, ds, args))
  return out


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
  return dict(
    settings=results[0]["settings"],
    timing=[t for r in results for t in r.get("timing", [])],
    training=[t for r in results for t in r.get("training", [])],
    provenances=[r.get("provenance") for r in results],
  )


def report(result: dict[str, Any], out: Path) -> list[Path]:
  provs = result.get("provenances") or [result.get("provenance")]
  lines = ["# §4.5: ResNet18 and ViT on Fashion-MNIST, true forward mode", ""]
  lines += [
    f"- {records.hardware_line(p)}; command: `{(p or {}).get('command', '?')}`" for p in provs
  ]
  paths = []
  if result["timing"]:
    lines += [
      "",
      "## Step time and R_f / R_b (true forward mode, activity perturbation at the sites)",
      "",
      "One jitted call per step on one batch of random 28×28×1 images; medians of the "
      "interleaved rounds. R = step / base (forward pass + loss). The machine was shared "
      "(see load averages above): absolute times are noisy, ratios are paired by round.",
      "",
    ]
    for t in result["timing"]:
      lines += [
        f"### {t['model']} ({t['num_params']:,} params, options {t['model_options'] or 'default'}, "
        f"batch {t['batch']}, {t['rounds']} rounds)",
        "",
      ]
      table = rep.Table(["variant", "ms / step (median)", "IQR", "R", "× backprop", "compile s"])
      for r in t["rows"]:
        table.add_row(
          r["variant"],
          f"{r['ms_median']:.1f}",
          f"{r['ms_q25']:.1f}–{r['ms_q75']:.1f}",
          f"{r['R']:.2f}",
          f"{r['vs_backprop']:.2f}",
          f"{r['compile_s']:.0f}",
        )
      lines += [*table.lines(), ""]
    plt = records.pyplot()
    fig, axes = plt.subplots(
      1, len(result["timing"]), figsize=(5.5 * len(result["timing"]), 4), squeeze=False
    )
    for ax, t in zip(axes[0], result["timing"]):
      rb = [r["R"] for r in t["rows"] if r["variant"] == "backprop"][0]
      for agg, ls in (("mean", "--"), ("orthogonal", "-")):
        pts = sorted(
          (int(r["variant"].split("=")[1].split()[0]), r["R"])
          for r in t["rows"]
          if r["variant"].startswith("forward")
          and (agg in r["variant"] or r["variant"] == "forward k=1")
        )
        ax.plot(*zip(*pts), ls=ls, marker="o", label=f"forward (activity) {agg}")
      ax.axhline(rb, color="k", ls=":", label=f"backprop R_b = {rb:.2f}")
      ax.set_xscale("log", base=2)
      ax.set_xlabel("k")
      ax.set_ylabel("R = step time / forward pass")
      ax.set_title(f"{t['model']}, batch {t['batch']}")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    png = rep.save_figure(fig, out / "table45_timing.png")
    paths.append(png)
    lines += ["![R against k](table45_timing.png)", ""]
  if result["training"]:
    lines += ["", "## Very short training (REDUCED)", ""]
    for t in result["training"]:
      lines += [
        f"### {t['model']} ({t['num_params']:,} params, options {t['model_options'] or 'default'}): "
        f"{t['steps']} SGD steps of batch {t['batch']} from the same initialisation, lr {t['lr']} for "
        f"every variant (forward: activity perturbation, rescaled estimates); test error on the "
        f"first {t['test_examples']} test images",
        "",
      ]
      cols = ["variant", "test error", "test loss", "train loss (first → mean of last 10)"]
      table = rep.Table([*cols, "cos to ∇f at the end", "wall s"])
      for r in t["rows"]:
        table.add_row(
          r["variant"],
          f"{100 * r['test_error']:.1f}%",
          f"{r['test_loss']:.3f}",
          f"{r['train_loss_first']:.3f} → {r['train_loss_last10']:.3f}",
          f"{r['grad_check_cosine']:.3f}",
          f"{r['wall_s']:.0f}",
        )
      lines += [*table.lines(), ""]
  md = out / "table45.md"
  md.write_text("\n".join(lines))
  return [md, *paths]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="table45.json",
    description=__doc__,
    add_arguments=_add_arguments,
    merge=merge,
    argv=argv,
  )


if __name__ == "__main__":
  main()
