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
process on a single un-vmapped jitted run of each method (compile excluded), with the two
methods' repetitions interleaved so background load hits both alike, and the median kept.
It is logarithmic: in two dimensions a step is a handful of flops, and drawing the
random tangent (the per-step key split and the threefry bits that seed the tangent
sampler) costs far more than the jvp itself, so on CPU the forward step is tens of times
slower than the jax.grad step, not "slightly faster" as in the paper's PyTorch prototype.
With tangents drawn in advance the forward step costs about what the backprop step does.
``--prng-impl`` picks another key implementation (``unsafe_rbg`` is cheapest on CPU).

Writes ``fig2_test_functions.png`` and ``fig2_test_functions.json``.
Run: ``python experiments/baydin2022_fig2.py [--out DIR] [--runs 10] [--seed 0] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: the script only writes files
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from fwdgrad_jax import benchmark  # noqa: E402
from fwdgrad_jax.functions import FUNCTIONS, descend  # noqa: E402

# (function, start, learning rate, iterations, iterations with --quick)
SETUPS = [
  ("beale", (0.5, 1.0), 0.01, 2000, 300),
  ("rosenbrock", (-1.2, 1.0), 5e-4, 20000, 2000),
]
METHODS = ("forward", "backprop")
LABELS = {"forward": "Forward gradient", "backprop": "Backprop (jax.grad)"}
COLORS = {"forward": "tab:blue", "backprop": "tab:orange"}


def make_run(fn, start, lr, steps, method):
  """Jitted ``key -> (losses, xs)`` of one descent, with f at every iterate (steps + 1)."""

  def run(key):
    losses, xs = descend(
      fn, jnp.asarray(start), learning_rate=lr, steps=steps, key=key, estimator=method
    )
    return jnp.append(losses, fn(xs[-1])), xs

  return jax.jit(run)


def time_per_iteration(runs, key, steps, reps):
  """Median seconds per iteration of each single-run function, timed interleaved.

  Args:
    runs: method name -> jitted ``key -> outputs``.
    key: the key every timed call gets.
    steps: iterations per call.
    reps: timed calls per method.

  Returns:
    method name -> median seconds per iteration.
  """
  for run in runs.values():
    jax.block_until_ready(run(key))  # compile (and first-touch) outside the timing
  times = {name: [] for name in runs}
  names = list(runs)
  for rep in range(reps):
    # Alternate the order too, so neither method always runs right after the other.
    for name in names if rep % 2 == 0 else names[::-1]:
      t0 = time.perf_counter()
      jax.block_until_ready(runs[name](key))
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) / steps for name, t in times.items()}


def contour_window(tf, trajectories, margin=0.25):
  """Axis limits holding every trajectory and the minimiser, with a margin."""
  pts = np.concatenate([trajectories.reshape(-1, 2), tf.minimizer(2)[None]])
  lo, hi = pts.min(0), pts.max(0)
  pad = margin * (hi - lo) + 0.1
  return lo - pad, hi + pad


def draw_contours(ax, fn, lo, hi):
  """Log-spaced contours: both functions span many decades over the window."""
  gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
  grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)
  z = np.asarray(jax.jit(jax.vmap(fn))(grid)).reshape(gx.shape)
  z = np.maximum(z, 1e-4)
  levels = np.logspace(np.log10(z.min()), np.log10(z.max()), 20)
  ax.contour(
    gx, gy, z, levels=levels, norm=mcolors.LogNorm(), cmap="Greys_r", linewidths=0.6, alpha=0.8
  )


def plot(path, results):
  """The 2 × 3 figure: loss per iteration, loss per time, trajectories."""
  fig, axes = plt.subplots(len(results), 3, figsize=(15, 4.4 * len(results)), squeeze=False)
  for row, (name, res) in zip(axes, results.items()):
    tf = FUNCTIONS[name]
    steps = res["steps"]
    it = np.arange(steps + 1)
    # Strided for drawing only: 20001 points per line add nothing visible.
    stride = max(1, steps // 2000)
    for method in METHODS:
      losses = res["losses"][method]
      sec = res["seconds_per_iteration"][method]
      # The time axis is logarithmic (per-iteration times can differ by orders of
      # magnitude), so it starts at iteration 1, not at time 0.
      for x_axis, ax, first in ((it, row[0], 0), (it * sec * 1e3, row[1], 1)):
        sl = slice(first, None, stride)
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
    trajectories = np.concatenate([res["xs"][m] for m in METHODS])
    lo, hi = contour_window(tf, trajectories)
    draw_contours(ax, tf.fn, lo, hi)
    # Forward first; backprop on top, dashed: its runs all coincide, so one line shows ten.
    for method in METHODS:
      for i, xs in enumerate(res["xs"][method]):
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
    ax.plot(*tf.minimizer(2), "*", color="gold", mec="k", ms=15, label="global minimum")
    ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel="x", ylabel="y")
    ax.set_title(f"{name}, trajectories")
    ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def summary(values):
  return {
    "median": float(np.median(values)),
    "min": float(values.min()),
    "max": float(values.max()),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/baydin2022", help="output directory")
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
  args = parser.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  reps = args.timing_reps or (5 if args.quick else 30)
  device = jax.devices()[0]

  results, record = {}, {}
  for i, (name, start, lr, full_steps, quick_steps) in enumerate(SETUPS):
    tf = FUNCTIONS[name]
    steps = quick_steps if args.quick else full_steps
    key = jax.random.fold_in(jax.random.key(args.seed, impl=args.prng_impl), i)
    keys = jax.random.split(key, args.runs)
    single = {m: make_run(tf.fn, start, lr, steps, m) for m in METHODS}
    sec = time_per_iteration(single, key, steps, reps)

    res = {
      "start": start,
      "learning_rate": lr,
      "steps": steps,
      "losses": {},
      "xs": {},
      "seconds_per_iteration": sec,
    }
    entry = {
      "start": list(start),
      "learning_rate": lr,
      "iterations": steps,
      "start_loss": None,  # filled from the runs' first loss below
      "minimizer": tf.minimizer(2).tolist(),
      "methods": {},
    }
    for method in METHODS:
      # The ten runs: one jit of the vmapped single-run function.
      losses, xs = jax.jit(jax.vmap(single[method]))(keys)
      losses, xs = np.asarray(losses), np.asarray(xs)
      res["losses"][method], res["xs"][method] = losses, xs
      dist = np.linalg.norm(xs[:, -1] - tf.minimizer(2), axis=1)
      entry["methods"][method] = {
        "final_loss": summary(losses[:, -1]),
        "final_distance_to_minimizer": summary(dist),
        "all_finite": bool(np.isfinite(losses).all()),
        "seconds_per_iteration": sec[method],
      }
    entry["start_loss"] = float(res["losses"]["backprop"][0, 0])
    entry["time_ratio_forward_over_backprop"] = sec["forward"] / sec["backprop"]
    results[name], record[name] = res, entry

  png = out / "fig2_test_functions.png"
  plot(png, results)
  argv_used = sys.argv[1:] if argv is None else [str(a) for a in argv]
  doc = {
    "figure": "Baydin et al. 2022, Fig. 2",
    "runs": args.runs,
    "seed": args.seed,
    "prng_impl": args.prng_impl,
    "quick": args.quick,
    "timing": (
      f"median of {reps} interleaved calls of a single jitted run per method, compile "
      "excluded, divided by the iterations"
    ),
    "functions": record,
    "hardware": f"{device.device_kind} ({device.platform})",
    "cpu": benchmark.hardware_info()["cpu_model"],
    "jax_version": jax.__version__,
    "command": shlex.join(["python", "experiments/baydin2022_fig2.py", *argv_used]),
  }
  (out / "fig2_test_functions.json").write_text(json.dumps(doc, indent=2) + "\n")
  print(f"wrote {png} and {out / 'fig2_test_functions.json'} ({doc['hardware']})")
  for name, entry in record.items():
    for method, m in entry["methods"].items():
      fl = m["final_loss"]
      print(
        f"{name:10s} {method:8s} final f median {fl['median']:.3e} [{fl['min']:.1e}, "
        f"{fl['max']:.1e}]  {m['seconds_per_iteration'] * 1e6:.3f} µs/iter"
      )
    print(f"{name:10s} time ratio forward/backprop {entry['time_ratio_forward_over_backprop']:.2f}")
  return doc


if __name__ == "__main__":
  main()
