"""Yao Figs. 7–8: the distribution of (estimate − true gradient) per scheme, and QR vs approximation.

At fixed parameters (the MLP 784-1024-1024-10 at initialisation, seed 0) and one fixed
Fashion-MNIST minibatch, ``--draws`` independent estimates of each scheme are compared
with the true minibatch gradient (``jax.grad``): naive forward gradient (one Gaussian
tangent), averaging of 3 directions, the direction partition (3 blocks, summed) and
Yao's input-generated tangents, exact (QR) and approximate. All raw (no rescale).

Per scheme and weight matrix: the histogram of the errors (Fig. 7's two consecutive
layers: ``hidden[0].kernel`` 784×1024 and ``hidden[1].kernel`` 1024×1024), their RMS
(for the Gaussian schemes beside the closed form: Var[ĝ_i] = ‖g_B‖² + g_i² for one
Gaussian tangent over the block B that holds i — the whole network for the naive
estimate, one third of it per partition block — divided by k when averaging), the
cosine of each estimate to the true gradient, and a bias check along ∇f: the
projection c = ĝ·g/‖g‖² has mean 1 for an unbiased estimator (reported with its
standard error over the draws); Yao's approximation is biased on correlated inputs.

  python -m experiments.yao.estimate_error --out results/yao
  python -m experiments.yao.estimate_error --quick     # a smoke test
"""

from __future__ import annotations

import os

# LAPACK (QR) on a shared 2-core machine: OpenBLAS's own threads oversubscribe it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax.training import records

SCHEMES = ("naive", "average k=3", "partition k=3", "input (QR)", "input approx")
#: The smoke test's schemes, one per closed form (Gaussian, partition, none): each is a compile.
QUICK_SCHEMES = ("naive", "partition k=3", "input approx")
LAYERS = ("['hidden'][0]['kernel']", "['hidden'][1]['kernel']")
SAMPLE = 4000  # error entries per layer and draw kept for the histogram


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--draws", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--schemes", default=",".join(SCHEMES))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="4 draws, a tiny MLP, 3 schemes")


def _closed_form_var(label: str, g_flat: np.ndarray, k: int) -> np.ndarray | None:
  """Per-coordinate Var[ĝ_i] of the Gaussian schemes (None for the input-generated ones)."""
  if label == "naive" or label.startswith("average"):
    return (np.sum(g_flat**2) + g_flat**2) / k
  if label.startswith("partition"):
    n = g_flat.size
    bounds = (np.arange(k + 1) * n) // k  # fwdgrad_jax.tangents.partition's blocks
    var = np.empty_like(g_flat)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      var[lo:hi] = np.sum(g_flat[lo:hi] ** 2) + g_flat[lo:hi] ** 2
    return var
  return None


def run(args: argparse.Namespace) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  from jax.flatten_util import ravel_pytree

  from experiments.yao import lib as yao
  from fwdgrad_jax import data, estimators, metrics
  from fwdgrad_jax.training import steps as steps_lib

  ds = data.load("fashion_mnist")
  options = {"hidden": (64, 64)} if args.quick else None
  draws = 4 if args.quick else args.draws
  problem = yao.make_problem("mlp", ds.x_train, ds.y_train, seed=args.seed, options=options)
  rng = np.random.default_rng(args.seed)
  idx = jnp.asarray(rng.choice(ds.x_train.shape[0], args.batch_size, replace=False))
  xb, yb = ds.x_train[idx], ds.y_train[idx]
  params = problem.params
  g = jax.jit(jax.grad(problem.loss))(params, xb, yb)
  g_flat, _ = ravel_pytree(g)
  g_np = np.asarray(g_flat, np.float64)
  # Where each layer sits in the flat vector (ravel_pytree follows the leaves' order).
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(g)]
  paths = [p.removesuffix(".value") for p in paths]
  sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(g)]
  offsets = dict(zip(paths, np.cumsum([0, *sizes[:-1]])))
  size_of = dict(zip(paths, sizes))
  picks = {
    layer: np.sort(rng.choice(size_of[layer], min(SAMPLE, size_of[layer]), replace=False))
    for layer in LAYERS
  }

  out = []
  for label in QUICK_SCHEMES if args.quick else args.schemes.split(","):
    est = yao.estimator_config(label)
    fn = estimators.value_and_forward_grad(problem.loss, **steps_lib.estimator_options(est))

    @jax.jit
    def one(key, fn=fn):
      _, e = fn(key, params, xb, yb)
      flat = ravel_pytree(e)[0]
      return flat, metrics.cosine_similarity(e, g)

    projections = []
    sq = {layer: 0.0 for layer in (*LAYERS, "all")}
    samples = {layer: [] for layer in LAYERS}
    cosines = []
    for d in range(draws):
      flat, cos = one(jax.random.fold_in(jax.random.key(args.seed + 1), d))
      e = np.asarray(flat, np.float64)
      err = e - g_np
      projections.append(float(e @ g_np / (g_np @ g_np)))
      sq["all"] += float(np.sum(err**2))
      for layer in LAYERS:
        sl = err[offsets[layer] : offsets[layer] + size_of[layer]]
        sq[layer] += float(np.sum(sl**2))
        samples[layer].append(sl[picks[layer]])
      cosines.append(float(cos))
    var_cf = _closed_form_var(label, g_np, est.num_tangents)
    layers = {}
    for layer in (*LAYERS, "all"):
      lo, n = (0, g_np.size) if layer == "all" else (offsets[layer], size_of[layer])
      mse = sq[layer] / (draws * n)
      layers[layer] = dict(
        size=n,
        rms_error=float(np.sqrt(mse)),
        rms_error_closed_form=None
        if var_cf is None
        else float(np.sqrt(np.mean(var_cf[lo : lo + n]))),
        rms_true_grad=float(np.sqrt(np.mean(g_np[lo : lo + n] ** 2))),
      )
      if layer != "all":
        layers[layer]["error_sample"] = np.concatenate(samples[layer]).astype(np.float32)
    out.append(
      dict(
        label=label,
        estimator=vars(est),
        cosines=cosines,
        cosine=yao.summary_stats(cosines),
        projection=dict(
          mean=float(np.mean(projections)),
          stderr=float(np.std(projections, ddof=1) / np.sqrt(draws)),
          values=projections,
        ),
        layers=layers,
      )
    )
    print(
      f"{label}: rms error {layers['all']['rms_error']:.3g}, projection "
      f"{np.mean(projections):.3f}, cosine {np.mean(cosines):.4f}",
      flush=True,
    )
  # Histograms on common bins per layer (range from the naive errors) keep the JSON small.
  for layer in LAYERS:
    ref = max(s["layers"][layer]["rms_error"] for s in out)
    bins = np.linspace(-4 * ref, 4 * ref, 81)
    for s in out:
      sample = s["layers"][layer].pop("error_sample")
      counts, _ = np.histogram(np.clip(sample, bins[0], bins[-1]), bins)
      s["layers"][layer]["histogram"] = dict(edges=bins.tolist(), counts=counts.tolist())
  return dict(
    settings=dict(
      model="mlp " + ("784-64-64-10 (quick)" if args.quick else "784-1024-1024-10"),
      num_params=problem.num_params,
      params="initialisation (seed %d)" % args.seed,
      data="fashion_mnist, one fixed training minibatch",
      batch_size=args.batch_size,
      draws=draws,
      true_grad_norm=float(np.linalg.norm(g_np)),
    ),
    schemes=out,
  )


def report(result: dict[str, Any], out: Path) -> list[Path]:
  s, prov = result["settings"], result["provenance"]
  lines = [
    "# Yao Figs. 7–8: estimate − true gradient per scheme",
    "",
    f"`{prov['command']}`",
    "",
    records.hardware_line(prov),
    "",
    f"{s['model']} ({s['num_params']:,} parameters) at {s['params']}, {s['data']} of "
    f"{s['batch_size']}; {s['draws']} independent estimates per scheme (REDUCED: the paper "
    f"does not state its sample). ‖∇f‖ = {s['true_grad_norm']:.4g}. Raw estimates.",
    "",
  ]
  errors = rep.Table(["scheme", "layer", "RMS error", "closed form", "RMS true grad"])
  cosines = rep.Table(
    ["scheme", "cosine to ∇f: mean", "5 %", "95 %", "ĝ·∇f/‖∇f‖² (1 if unbiased) ± s.e."]
  )
  for sc in result["schemes"]:
    for layer, v in sc["layers"].items():
      closed = rep.num(v["rms_error_closed_form"], ".3g")
      errors.add_row(
        sc["label"], _short(layer), f"{v['rms_error']:.3g}", closed, f"{v['rms_true_grad']:.3g}"
      )
    c, pr = sc["cosine"], sc["projection"]
    cosines.add_row(
      sc["label"],
      *(f"{c[q]:.4f}" for q in ("mean", "q05", "q95")),
      f"{pr['mean']:.3f} ± {pr['stderr']:.3f}",
    )
  lines += [*errors.lines(), "", *cosines.lines()]
  png = out / "estimate_error.png"
  lines += ["", f"![error histograms]({png.name})", ""]
  _plot(result, png)
  md = out / "estimate_error.md"
  md.write_text("\n".join(lines) + "\n")
  return [md, png]


def _short(layer: str) -> str:
  return {
    "['hidden'][0]['kernel']": "hidden[0].kernel",
    "['hidden'][1]['kernel']": "hidden[1].kernel",
  }.get(layer, layer)


def _plot(result: dict[str, Any], png: Path) -> None:
  plt = records.pyplot()
  schemes = result["schemes"]
  fig, axes = plt.subplots(2, len(schemes), figsize=(3.2 * len(schemes), 5.4), squeeze=False)
  for j, sc in enumerate(schemes):
    for i, layer in enumerate(LAYERS):
      h = sc["layers"][layer]["histogram"]
      edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"])
      ax = axes[i, j]
      ax.stairs(counts / max(1, counts.sum()), edges, fill=True, alpha=0.7)
      ax.set_title(f"{sc['label']}\n{_short(layer)}", fontsize=8)
      ax.tick_params(labelsize=6)
      ax.set_yscale("log")
      ax.set_ylim(1e-5, 1)
      rms = sc["layers"][layer]["rms_error"]
      ax.text(0.02, 0.95, f"RMS {rms:.2g}", transform=ax.transAxes, fontsize=7, va="top")
  for ax in axes[-1]:
    ax.set_xlabel("estimate − true gradient", fontsize=7)
  fig.suptitle("Error of one estimate per weight (fraction of entries, log scale)", fontsize=9)
  rep.save_figure(fig, png, dpi=90)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file="estimate_error.json",
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
