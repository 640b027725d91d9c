"""Baydin et al. 2022, Fig. 1: five forward-gradient samples on Beale at (1.5, −0.1).

Each sample draws one Gaussian tangent v_k and forms the forward gradient
g_k = (∇f·v_k) v_k from a single jvp; the figure shows the tangents, the five g_k, their
empirical mean and the true gradient over a contour plot of Beale, with the global
minimum (3, 0.5) starred. Writes ``fig1_beale_samples.json`` and, from it,
``fig1_beale_samples.png``.

  python -m experiments.baydin2022.fig1 --out results/baydin2022
  python -m experiments.baydin2022.fig1 --report-only results/baydin2022/fig1_beale_samples.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fwdgrad_jax as fg
from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax.functions import FUNCTIONS
from fwdgrad_jax.training import records

POINT = (1.5, -0.1)  # the paper's evaluation point
NUM_SAMPLES = 5


def forward_gradient_samples(fn, x, key, num_samples):
  """Returns (tangents, directional derivatives, forward gradients), one row per sample.

  The gradients come from the library estimator; the tangents are redrawn from the same
  keys through ``fwdgrad_jax.tangents.sample``, which is what the estimator calls, so
  tangent k is exactly the one behind sample k.
  """
  value_and_grad = fg.value_and_forward_grad(fn, num_tangents=1, tangents="normal")

  @jax.jit  # one compilation instead of one per primitive
  def draw(keys):
    _, grads = jax.vmap(value_and_grad, in_axes=(0, None))(keys, x)
    tangents = jax.vmap(lambda k: fg.tangents.sample(k, x, 1, "normal")[0])(keys)
    return tangents, tangents @ jax.grad(fn)(x), grads

  tangents, jvps, grads = draw(jax.random.split(key, num_samples))
  return np.asarray(tangents), np.asarray(jvps), np.asarray(grads)


def plot(path, fn, x, minimizer, tangents, grads, mean, true_grad):
  """Draws the arrows over log-scaled Beale contours and saves the figure."""
  import matplotlib.colors as mcolors
  import matplotlib.ticker as mticker

  plt = records.pyplot()
  # Gradients reach ~10 at this point while tangents are ~1, so the gradient-like arrows
  # (samples, mean, true) share one scale that keeps the longest of them readable, and the
  # tangents keep their own length; the JSON has the unscaled numbers.
  longest = max(np.linalg.norm(grads, axis=1).max(), np.linalg.norm(true_grad))
  scale = 1.6 / longest
  tips = np.concatenate(
    [x + scale * grads, x + tangents, [x + scale * mean, x + scale * true_grad]]
  )
  pts = np.concatenate([tips, [x, minimizer]])
  lo, hi = pts.min(0) - 0.4, pts.max(0) + 0.4

  gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 400), np.linspace(lo[1], hi[1], 400))
  grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)
  z = np.asarray(jax.jit(jax.vmap(fn))(grid)).reshape(gx.shape)
  # Beale spans ~10 decades over such a window: log levels show the valley and the walls.
  levels = np.logspace(np.log10(max(z.min(), 1e-3)), np.log10(z.max()), 25)

  fig, ax = plt.subplots(figsize=(7.2, 6.4))
  norm = mcolors.LogNorm(levels[0], levels[-1])
  cf = ax.contourf(gx, gy, z, levels=levels, norm=norm, cmap="viridis", alpha=0.35)
  ax.contour(gx, gy, z, levels=levels, norm=norm, cmap="viridis", linewidths=0.6)
  # Decade ticks: the default would label all 25 contour levels.
  fig.colorbar(cf, ax=ax, label="Beale f(x, y)", ticks=mticker.LogLocator(), shrink=0.8)

  def arrow(vec, color, width, label=None, alpha=1.0):
    ax.annotate(
      "",
      xy=x + vec,
      xytext=x,
      arrowprops=dict(arrowstyle="-|>", color=color, lw=width, alpha=alpha, shrinkA=0, shrinkB=0),
    )
    if label is not None:  # annotate() makes no legend entry, so add a proxy line
      ax.plot([], [], color=color, lw=width, label=label)

  for i, (v, g) in enumerate(zip(tangents, grads)):
    arrow(v, "tab:orange", 1.2, r"tangent $v_k$" if i == 0 else None, alpha=0.9)
    arrow(
      scale * g, "tab:blue", 1.2, r"forward gradient $(\nabla f\cdot v_k)\,v_k$" if i == 0 else None
    )
    ax.annotate(f"{i + 1}", x + scale * g, textcoords="offset points", xytext=(4, 4), fontsize=8)
  arrow(scale * mean, "tab:green", 2.2, "mean of the 5 forward gradients")
  arrow(scale * true_grad, "tab:red", 2.2, r"true gradient $\nabla f$")
  ax.plot(*x, "ko", ms=4)
  ax.plot(*minimizer, "*", color="gold", mec="k", ms=16, label="global minimum (3, 0.5)")
  ax.set(
    xlim=(lo[0], hi[0]),
    ylim=(lo[1], hi[1]),
    xlabel="x",
    ylabel="y",
    title=f"Beale at {POINT}: gradient arrows ×{scale:.2g}, tangents ×1",
  )
  ax.set_aspect("equal")
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
  rep.save_figure(fig, path, dpi=150)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The figure's options."""
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the tangents")
  parser.add_argument("--quick", action="store_true", help="the same run (it takes seconds)")


def run(args: argparse.Namespace) -> dict[str, Any]:
  """The five samples, their mean and the true gradient at the paper's point."""
  tf = FUNCTIONS["beale"]
  x = jnp.array(POINT, jnp.float32)
  tangents, jvps, grads = forward_gradient_samples(tf.fn, x, jax.random.key(args.seed), NUM_SAMPLES)
  true_grad = np.asarray(jax.jit(jax.grad(tf.fn))(x))
  mean = grads.mean(0)
  cosine = jax.jit(fg.cosine_similarity)
  return {
    "figure": "Baydin et al. 2022, Fig. 1",
    "function": "beale",
    "point": list(POINT),
    "value": float(tf.fn(x)),
    "minimizer": tf.minimizer(2).tolist(),
    "seed": args.seed,
    "samples": [
      {
        "tangent": v.tolist(),
        "directional_derivative": float(d),
        "forward_gradient": g.tolist(),
        "cosine_to_true": float(cosine(g, true_grad)),
      }
      for v, d, g in zip(tangents, jvps, grads)
    ],
    "mean": mean.tolist(),
    "cosine_mean_to_true": float(cosine(mean, true_grad)),
    "true_gradient": true_grad.tolist(),
  }


def report(record: dict[str, Any], out: Path) -> list[Path]:
  """``fig1_beale_samples.png``; prints the gradients and cosines."""
  png = out / "fig1_beale_samples.png"
  samples = record["samples"]
  tangents = np.array([s["tangent"] for s in samples])
  grads = np.array([s["forward_gradient"] for s in samples])
  true_grad, mean = np.array(record["true_gradient"]), np.array(record["mean"])
  fn = FUNCTIONS[record["function"]].fn
  plot(
    png,
    fn,
    np.array(record["point"]),
    np.array(record["minimizer"]),
    tangents,
    grads,
    mean,
    true_grad,
  )
  cos = [s["cosine_to_true"] for s in samples]
  print(f"true gradient {np.round(true_grad, 4)}, mean of {len(samples)} {np.round(mean, 4)}")
  print(
    f"cosines to the true gradient: {np.round(cos, 3)}; of the mean: "
    f"{record['cosine_mean_to_true']:.3f}"
  )
  return [png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Draws the figure (or only its report); returns the result written to the JSON."""
  return script.main(
    __file__,
    run,
    report,
    result_file="fig1_beale_samples.json",
    description=__doc__,
    add_arguments=add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
