"""Baydin et al. 2022, Fig. 2: forward gradient vs backprop on Beale and Rosenbrock.

Plain gradient descent (``fwdgrad_jax.functions.descend``), ten runs of each method: Beale
at lr 0.01 and Rosenbrock at lr 5e-4, as in the paper. Each row of the figure is one
function, with the paper's three columns: loss per iteration (every run thin, the median
thick), loss per time, and the trajectories over a contour plot with the minimum starred.

The paper gives neither start points nor iteration counts. Beale starts at (0.5, 1): on
the line y = 1 Beale is 14.2 for every x, as at the often-used (1, 1), but the gradient
there is half as steep (13.9 vs 27.8), and at lr 0.01 a forward-gradient run from (1, 1)
occasionally diverges (4 of 1000 runs; none of 1000 from (0.5, 1)). It runs 2000
iterations, which end near the minimum (3, 0.5). Rosenbrock starts at the classic
(−1.2, 1) and runs 20000 iterations: it first drops into the curved valley, then follows
its flat floor to (1, 1), slowly at lr 5e-4 (from (−1.5, 2), 8 of 1000 forward-gradient
runs diverged; none of 1000 from (−1.2, 1)). Both methods run the same number of
iterations, as in the paper.

The time axis is iteration × the per-iteration time of that method, measured in this
process on a single un-vmapped jitted run of each method (compile excluded) with the
shared interleaved timer (fwdgrad_jax.records.time_interleaved: rounds of both
methods in a shuffled order, so background load hits both alike; medians).
It is logarithmic: in two dimensions a step is a handful of flops, and drawing the
random tangent (the per-step key split and the threefry bits that seed the tangent
sampler) costs far more than the jvp itself, so on CPU the forward step is tens of times
slower than the jax.grad step, not "slightly faster" as in the paper's PyTorch prototype.
With tangents drawn in advance the forward step costs about what the backprop step does.
``--prng-impl`` picks another key implementation (``unsafe_rbg`` is cheapest on CPU).

Writes ``fig2_test_functions.json`` (the numbers and the curves, sampled at up to
``CURVE_POINTS`` iterations) and, from it, ``fig2_test_functions.png``.

  python -m experiments.baydin2022.fig2 --out results/baydin2022   # the figure
  python -m experiments.baydin2022.fig2 --quick                    # a quick look / smoke test
  python -m experiments.baydin2022.fig2 --report-only results/baydin2022/fig2_test_functions.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from experiments._lib import report as rep
from experiments._lib import script
from fwdgrad_jax.training import records

# (function, start, learning rate, iterations, iterations with --quick)
SETUPS = [
  ("beale", (0.5, 1.0), 0.01, 2000, 300),
  ("rosenbrock", (-1.2, 1.0), 5e-4, 20000, 2000),
]
METHODS = ("forward", "backprop")
LABELS = {"forward": "Forward gradient", "backprop": "Backprop (jax.grad)"}
COLORS = {"forward": "tab:blue", "backprop": "tab:orange"}
CURVE_POINTS = 400  # iterations kept per curve in the JSON: linear and log-spaced


def make_run(fn, start, lr, steps, method):
  """Jitted ``key -> (losses, xs)`` of one descent, with f at every iterate (steps + 1)."""
  import jax
  import jax.numpy as jnp

  from fwdgrad_jax.functions import descend

  def run(key):
    losses, xs = descend(
      fn, jnp.asarray(start), learning_rate=lr, steps=steps, key=key, estimator=method
    )
    return jnp.append(losses, fn(xs[-1])), xs

  return jax.jit(run)


def sample_iterations(steps: int, points: int = CURVE_POINTS) -> np.ndarray:
  """Iterations 0..steps to keep for drawing: half linear, half log-spaced (both axes)."""
  lin = np.linspace(0, steps, points // 2)
  log = np.geomspace(1, steps, points // 2) if steps >= 1 else np.array([])
  return np.unique(np.concatenate([[0, steps], lin, log]).round().astype(int))


def summary(values):
  return {
    "median": float(np.median(values)),
    "min": float(values.min()),
    "max": float(values.max()),
  }


def _one_function(i, setup, args) -> dict[str, Any]:
  import jax

  from fwdgrad_jax.functions import FUNCTIONS

  name, start, lr, full_steps, quick_steps = setup
  tf = FUNCTIONS[name]
  steps = quick_steps if args.quick else full_steps
  key = jax.random.fold_in(jax.random.key(args.seed, impl=args.prng_impl), i)
  keys = jax.random.split(key, args.runs)
  single = {m: make_run(tf.fn, start, lr, steps, m) for m in METHODS}
  reps = args.timing_reps or (5 if args.quick else 30)
  timing = records.time_interleaved(
    single, rounds=reps, args={m: lambda: (key,) for m in METHODS}, steps=steps, seed=args.seed
  )
  keep = sample_iterations(steps)
  entry: dict[str, Any] = {
    "start": list(start),
    "learning_rate": lr,
    "iterations": steps,
    "minimizer": tf.minimizer(2).tolist(),
    "timing_rounds": reps,
    "curve_iterations": keep.tolist(),
    "methods": {},
  }
  for method in METHODS:
    # The runs: one jit of the vmapped single-run function.
    losses, xs = jax.jit(jax.vmap(single[method]))(keys)
    losses, xs = np.asarray(losses, np.float64), np.asarray(xs, np.float64)
    dist = np.linalg.norm(xs[:, -1] - tf.minimizer(2), axis=1)
    entry["methods"][method] = {
      "final_loss": summary(losses[:, -1]),
      "final_distance_to_minimizer": summary(dist),
      "all_finite": bool(np.isfinite(losses).all()),
      "seconds_per_iteration": timing[method].median,
      "timing_s": timing[method].as_dict(),
      # Five significant digits: enough to draw, a fraction of the file.
      "losses": np.vectorize(lambda v: float(f"{v:.5g}"))(losses[:, keep]),
      "trajectories": np.vectorize(lambda v: float(f"{v:.5g}"))(xs[:, keep]),
    }
  entry["start_loss"] = float(entry["methods"]["backprop"]["losses"][0][0])
  sec = {m: entry["methods"][m]["seconds_per_iteration"] for m in METHODS}
  entry["time_ratio_forward_over_backprop"] = sec["forward"] / sec["backprop"]
  return entry


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The figure's options."""
  parser.add_argument("--runs", type=int, default=10, help="independent runs per method")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
  parser.add_argument(
    "--prng-impl",
    default="threefry2x32",
    help="jax.random key implementation (e.g. rbg); on CPU, threefry dominates a 2-D step",
  )
  parser.add_argument(
    "--timing-reps", type=int, default=None, help="timed calls per method (default 30, quick 5)"
  )


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Both functions, both methods: final losses, time per iteration, sampled curves."""
  functions = {s[0]: _one_function(i, s, args) for i, s in enumerate(SETUPS)}
  return {
    "figure": "Baydin et al. 2022, Fig. 2",
    "runs": args.runs,
    "seed": args.seed,
    "prng_impl": args.prng_impl,
    "quick": args.quick,
    "timing": (
      "records.time_interleaved: a single jitted run per method, one untimed call, then "
      "interleaved rounds in a shuffled order, compile excluded; median / iterations"
    ),
    "functions": functions,
  }


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def contour_window(minimizer, trajectories, margin=0.25):
  """Axis limits holding every trajectory and the minimiser, with a margin."""
  pts = np.concatenate([np.asarray(trajectories).reshape(-1, 2), np.asarray(minimizer)[None]])
  lo, hi = pts.min(0), pts.max(0)
  pad = margin * (hi - lo) + 0.1
  return lo - pad, hi + pad


def draw_contours(ax, fn, lo, hi):
  """Log-spaced contours: both functions span many decades over the window."""
  import jax
  import matplotlib.colors as mcolors

  gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
  grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)
  z = np.asarray(jax.jit(jax.vmap(fn))(grid)).reshape(gx.shape)
  z = np.maximum(z, 1e-4)
  levels = np.logspace(np.log10(z.min()), np.log10(z.max()), 20)
  ax.contour(
    gx, gy, z, levels=levels, norm=mcolors.LogNorm(), cmap="Greys_r", linewidths=0.6, alpha=0.8
  )


def plot(path: Path, functions: dict[str, Any]) -> None:
  """The 2 × 3 figure: loss per iteration, loss per time, trajectories."""
  from fwdgrad_jax.functions import FUNCTIONS

  plt = records.pyplot()
  fig, axes = plt.subplots(len(functions), 3, figsize=(15, 4.4 * len(functions)), squeeze=False)
  for row, (name, res) in zip(axes, functions.items()):
    it = np.asarray(res["curve_iterations"], np.float64)
    for method in METHODS:
      m = res["methods"][method]
      losses = np.asarray(m["losses"], np.float64)
      sec = m["seconds_per_iteration"]
      # The time axis is logarithmic (per-iteration times can differ by orders of
      # magnitude), so it starts at iteration 1, not at time 0.
      for x_axis, ax, first in ((it, row[0], 0), (it * sec * 1e3, row[1], 1)):
        sl = slice(first, None)
        for run_losses in losses:
          ax.plot(x_axis[sl], run_losses[sl], color=COLORS[method], lw=0.5, alpha=0.35)
        ax.plot(
          x_axis[sl],
          np.median(losses, 0)[sl],
          color=COLORS[method],
          lw=1.8,
          label=f"{LABELS[method]} (median of {len(losses)}), {sec * 1e6:.3g} µs/iter"
          if first
          else f"{LABELS[method]} (median of {len(losses)})",
        )
    lr = res["learning_rate"]
    row[0].set(xlabel="Iteration", ylabel="Loss", yscale="log", title=f"{name}, lr {lr:g}")
    row[1].set(
      xlabel="Time (ms, log scale) = iteration × measured time per iteration",
      ylabel="Loss",
      xscale="log",
      yscale="log",
      title=f"{name}, loss per time",
    )
    for ax in row[:2]:
      ax.legend(fontsize=8, loc="lower left")
      ax.grid(alpha=0.3)

    ax = row[2]
    trajectories = np.concatenate([res["methods"][m]["trajectories"] for m in METHODS])
    lo, hi = contour_window(res["minimizer"], trajectories)
    draw_contours(ax, FUNCTIONS[name].fn, lo, hi)
    # Forward first; backprop on top, dashed: its runs all coincide, so one line shows ten.
    for method in METHODS:
      for i, xs in enumerate(np.asarray(res["methods"][method]["trajectories"])):
        ax.plot(
          xs[:, 0],
          xs[:, 1],
          color=COLORS[method],
          lw=0.7 if method == "forward" else 1.6,
          ls="-" if method == "forward" else "--",
          alpha=0.6 if method == "forward" else 1.0,
          label=LABELS[method] if i == 0 else None,
        )
    ax.plot(*res["start"], "ko", ms=5, label="start")
    ax.plot(*res["minimizer"], "*", color="gold", mec="k", ms=15, label="global minimum")
    ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel="x", ylabel="y")
    ax.set_title(f"{name}, trajectories")
    ax.legend(fontsize=8, loc="best")
  rep.save_figure(fig, path, dpi=130)


def report(doc: dict[str, Any], out: Path) -> list[Path]:
  """``fig2_test_functions.png``; prints the final losses and the time per iteration."""
  png = out / "fig2_test_functions.png"
  plot(png, doc["functions"])
  hw = doc.get("provenance", {}).get("hardware", {})
  print(f"{hw.get('platform')} ({hw.get('cpu_model')}), jax {hw.get('jax_version')}")
  for name, entry in doc["functions"].items():
    for method, m in entry["methods"].items():
      fl = m["final_loss"]
      print(
        f"{name:10s} {method:8s} final f median {fl['median']:.3e} [{fl['min']:.1e}, "
        f"{fl['max']:.1e}]  {m['seconds_per_iteration'] * 1e6:.3f} µs/iter"
      )
    print(f"{name:10s} time ratio forward/backprop {entry['time_ratio_forward_over_backprop']:.2f}")
  return [png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the figure (or only its report); returns the result written to the JSON."""
  return script.main(
    __file__,
    run,
    report,
    result_file="fig2_test_functions.json",
    description=__doc__,
    add_arguments=add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
