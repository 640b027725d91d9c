"""Yao Figs. 9–12: guided ("momentum") forward gradients at lr 1e-6, and their cosine to ∇f.

Plain SGD at the paper's lr 1e-6 (no schedule) on Fashion-MNIST with
``fwdgrad_jax.guided_forward_gradient`` (Yao's Algorithm 1) at fix_gap = decrease_gap =
10 over the paper's grid decay_rate ∈ {0.7, 0.8, 0.9, 1.0} × shuffle_ratio ∈ {0, 0.2,
0.4, 0.5}, beside backprop and the naive forward gradient at the same lr (Fig. 9) and
backprop at a large lr (the paper's point of comparison). Every run records, per step,
the minibatch loss and the cosine of its estimate to the true minibatch gradient
(Fig. 12) and the number of true gradients the guided method paid for. Raw estimates (``rescale=false``).

REDUCED budget: a few hundred steps (the paper: more than 1000 iterations for Fig. 12).
Default model: Yao's CNN (98k parameters). On the MLP (1.86M parameters) each guided step
sorts 1.86M numbers twice, 1–4 s a step on XLA:CPU here: run it with few steps
(``--model mlp --steps 60 --grid 1.0:0.0,0.9:0.5``).

  python -m experiments.yao.guided --out results/yao
  python -m experiments.yao.guided --model mlp --steps 60 --grid 1.0:0.0,0.9:0.5 --no-ref --out results/yao
  python -m experiments.yao.guided --quick     # a smoke test
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax.training import records

DECAY_RATES = (0.7, 0.8, 0.9, 1.0)
SHUFFLE_RATIOS = (0.0, 0.2, 0.4, 0.5)


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--model", default=None, choices=("mlp", "yao_cnn"), help="default yao_cnn (--quick: mlp)"
  )
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--lr", type=float, default=1e-6)
  p.add_argument("--ref-lr", type=float, default=1e-2, help="backprop reference lr")
  p.add_argument("--no-ref", action="store_true", help="skip the backprop reference run")
  p.add_argument(
    "--grid",
    default=",".join(f"{d}:{s}" for d, s in itertools.product(DECAY_RATES, SHUFFLE_RATIOS)),
    help="decay_rate:shuffle_ratio pairs",
  )
  p.add_argument("--fix-gap", type=int, default=10)
  p.add_argument("--decrease-gap", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--quick", action="store_true", help="10 steps, 2 guided configs, MLP 784-64-64-10"
  )


def _result_file(args: argparse.Namespace) -> str:
  return f"guided_{args.model}.json"


def run(args: argparse.Namespace) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  from experiments.yao import lib as yao
  from fwdgrad_jax import data

  grid = [tuple(float(v) for v in pair.split(":")) for pair in args.grid.split(",")]
  if args.quick:  # a compile per shuffle ratio, the decay rates vmapped: one ratio, two rates
    args.steps, grid = 10, [(1.0, 0.5), (0.9, 0.5)]
  if args.model is None:  # the CNN is stepped from the host: slow for a smoke test
    args.model = "mlp" if args.quick else "yao_cnn"
  ds = data.load("fashion_mnist")
  # A smoke test checks the run end to end, not the numbers: a narrow MLP compiles and
  # sorts in a fraction of the time of the paper's 1.86M parameters.
  options = {"hidden": (64, 64)} if args.quick and args.model == "mlp" else None
  problem = yao.make_problem(args.model, ds.x_train, ds.y_train, seed=args.seed, options=options)
  # One compilation per (method, shuffle_ratio): the lrs of backprop and the guided
  # decay rates (a field of the guided state) are vmapped.
  groups = [("backprop", yao.estimator_config("backprop"), [{"lr": args.lr}])]
  if not args.no_ref:
    groups[0][2].append({"lr": args.ref_lr})
  groups.append(("naive", yao.estimator_config("naive"), [{"lr": args.lr}]))
  for shuffle in sorted({s for _, s in grid}):
    est = yao.estimator_config(
      "guided",
      fix_gap=args.fix_gap,
      decrease_gap=args.decrease_gap,
      decay_rate=1.0,
      shuffle_ratio=shuffle,
    )
    members = [
      {"lr": args.lr, "decay_rate": d, "shuffle_ratio": shuffle} for d, s in grid if s == shuffle
    ]
    groups.append(("guided", est, members))
  runs = []
  tail = max(1, args.steps // 10)
  for name, est, members in groups:
    lrs = jnp.asarray([m["lr"] for m in members], jnp.float32)
    decays = jnp.asarray([m.get("decay_rate", 1.0) for m in members], jnp.float32)
    changes = (lambda d: {"decay_rate": d}) if name == "guided" else (lambda d: None)
    t0 = time.perf_counter()
    if args.model == "mlp":
      out = jax.jit(
        jax.vmap(
          lambda prob, lr, d, est=est, changes=changes: yao.sgd_run(
            prob,
            est,
            lr=lr,
            seed=args.seed,
            steps=args.steps,
            batch_size=args.batch_size,
            cosine=True,
            state_changes=changes(d),
          ),
          in_axes=(None, 0, 0),
        )
      )(problem, lrs, decays)
    else:
      # Convolutions inside a loop are ~20x slower on XLA:CPU (jax-ml/jax#12868): one
      # jitted (vmapped) step per Python call.
      init = jax.jit(
        jax.vmap(
          lambda prob, d, est=est, changes=changes: yao.sgd_init(
            prob, est, seed=args.seed, state_changes=changes(d)
          ),
          in_axes=(None, 0),
        )
      )
      step = jax.jit(
        jax.vmap(
          lambda prob, c, lr, t, est=est: yao.sgd_step(
            prob, est, c, t, lr=lr, batch_size=args.batch_size, cosine=True
          ),
          in_axes=(None, 0, 0, None),
        ),
        donate_argnums=1,
      )
      carry, outs = init(problem, decays), []
      for t in range(args.steps):
        carry, o = step(problem, carry, lrs, jnp.int32(t))
        outs.append(o)
      out = {k: jnp.stack([o[k] for o in outs], axis=1) for k in outs[0]}
      out["true_grads"] = jax.vmap(yao.true_grads_of)(carry)
    losses = np.asarray(out["loss"], np.float64)
    cosines = np.asarray(out["cosine"], np.float64)
    true_grads = np.asarray(out["true_grads"])
    secs = time.perf_counter() - t0
    for i, m in enumerate(members):
      rec = dict(
        method=name,
        **m,
        fix_gap=args.fix_gap if name == "guided" else None,
        decrease_gap=args.decrease_gap if name == "guided" else None,
        loss=losses[i].tolist(),
        cosine=cosines[i].tolist(),
        final_loss=float(np.mean(losses[i][-tail:])),
        mean_cosine=float(np.nanmean(cosines[i])),
        true_grads=int(true_grads[i]),
        seconds_group=secs,
      )
      runs.append(rec)
      print(
        f"{_label(rec)}: final loss {rec['final_loss']:.4f}, mean cosine "
        f"{rec['mean_cosine']:.4f}, true grads {rec['true_grads']} ({secs:.0f} s group)",
        flush=True,
      )
  return dict(
    settings=dict(
      model=args.model,
      num_params=problem.num_params,
      data=f"fashion_mnist (train split, {problem.x.shape[0]} examples)",
      steps=args.steps,
      batch_size=args.batch_size,
      lr=args.lr,
      ref_lr=None if args.no_ref else args.ref_lr,
      fix_gap=args.fix_gap,
      decrease_gap=args.decrease_gap,
      seed=args.seed,
      optimizer="plain SGD, constant lr, raw estimates",
    ),
    runs=runs,
  )


def _label(r: dict[str, Any]) -> str:
  if r["method"] == "guided":
    return f"guided d={r['decay_rate']:g} s={r['shuffle_ratio']:g}"
  return f"{r['method']} lr {r['lr']:g}"


def _smooth(x: np.ndarray, w: int = 10) -> np.ndarray:
  if len(x) < w:
    return x
  return np.convolve(x, np.ones(w) / w, mode="valid")


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s, prov = result["settings"], result["provenance"]
  runs = result["runs"]
  model = s["model"]
  first = runs[0]["loss"][0]
  lines = [
    f"# Yao Figs. 9–12: guided forward gradients ({model})",
    "",
    f"`{prov['command']}`",
    "",
    records.hardware_line(prov),
    "",
    f"{model} ({s['num_params']:,} parameters) on {s['data']}, {s['optimizer']}, batch "
    f"{s['batch_size']}, **{s['steps']} steps** (REDUCED: the paper shows more than 1000), "
    f"seed {s['seed']}; guided at lr {s['lr']:g} with fix_gap {s['fix_gap']}, decrease_gap "
    f"{s['decrease_gap']}. Initial minibatch loss {first:.3f}. Final loss = mean minibatch "
    "loss over the last tenth of the steps; cosine = mean over all steps of the cosine "
    "of the estimate to the true minibatch gradient.",
    "",
  ]
  table = rep.Table(["run", "lr", "final loss", "mean cosine to ∇f", "true gradients paid"])
  for r in runs:
    true_grads = {"guided": r["true_grads"], "backprop": "every step"}.get(r["method"], 0)
    table.add_row(
      _label(r),
      f"{r['lr']:g}",
      rep.num(r["final_loss"], ".4f", "NaN (diverged)"),
      rep.num(r["mean_cosine"], ".4f", "NaN (diverged)"),
      true_grads,
    )
  lines += table.lines()
  guided = [r for r in runs if r["method"] == "guided"]
  decays = sorted({r["decay_rate"] for r in guided})
  shuffles = sorted({r["shuffle_ratio"] for r in guided})
  if len(decays) > 1 and len(shuffles) > 1:
    lines += [
      "",
      "Final loss over the grid (rows decay_rate, columns shuffle_ratio):",
      "",
    ]
    table = rep.Table(["decay \\ shuffle", *(f"{v:g}" for v in shuffles)])
    for d in decays:
      cells = []
      for sh in shuffles:
        m = [r for r in guided if r["decay_rate"] == d and r["shuffle_ratio"] == sh]
        cells.append(rep.num(m[0]["final_loss"], ".4f", "NaN (diverged)") if m else rep.DASH)
      table.add_row(f"{d:g}", *cells)
    lines += table.lines()
  png = out / f"guided_{model}.png"
  lines += ["", f"![loss and cosine]({png.name})", ""]
  _plot(result, png)
  md = out / f"guided_{model}.md"
  md.write_text("\n".join(lines) + "\n")
  return [md, png]


def _plot(result: dict[str, Any], png: Path) -> None:
  plt = records.pyplot()
  runs = result["runs"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  base = [r for r in runs if r["method"] != "guided"]
  guided = [r for r in runs if r["method"] == "guided"]
  for r in base:
    axes[0].plot(_smooth(np.asarray(r["loss"], np.float64)), label=_label(r), lw=1.5, ls="--")
  cmap = plt.get_cmap("viridis")
  for i, r in enumerate(guided):
    axes[0].plot(
      _smooth(np.asarray(r["loss"], np.float64)),
      label=_label(r),
      lw=0.8,
      color=cmap(i / max(1, len(guided) - 1)),
    )
  axes[0].set_title("minibatch loss (moving mean of 10)", fontsize=9)
  axes[0].set_xlabel("step")
  axes[0].legend(fontsize=5, ncol=2)
  # Fig. 10: the two slices of the grid the paper shows.
  for r in guided:
    if (
      r["shuffle_ratio"] == 0.5
      or r["decay_rate"] == 0.9
      or (r["decay_rate"], r["shuffle_ratio"]) == (1.0, 0.0)
    ):
      axes[1].plot(_smooth(np.asarray(r["loss"], np.float64)), label=_label(r), lw=1)
  for r in base:
    axes[1].plot(_smooth(np.asarray(r["loss"], np.float64)), label=_label(r), lw=1.5, ls="--")
  axes[1].set_title("Figs. 9–11 slices: shuffle 0.5 / decay 0.9 / (1.0, 0.0)", fontsize=9)
  axes[1].set_xlabel("step")
  axes[1].legend(fontsize=6)
  # Fig. 12: cosine to the true gradient over the iterations.
  for r in runs:
    key = (r.get("decay_rate"), r.get("shuffle_ratio"))
    if r["method"] == "naive" or key in ((1.0, 0.0), (0.9, 0.5)):
      axes[2].plot(np.asarray(r["cosine"], np.float64), label=_label(r), lw=0.6)
  axes[2].set_title("Fig. 12: cosine of the estimate to the true gradient", fontsize=9)
  axes[2].set_xlabel("step")
  axes[2].legend(fontsize=7)
  for ax in axes:
    ax.grid(alpha=0.3)
  rep.save_figure(fig, png, dpi=90)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file=_result_file,
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
