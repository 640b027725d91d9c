"""Issue 21, item 5: which committed lr choices move under the final-loss rule — no training.

Before issue 21 the lr searches ranked an lr by the BEST validation loss of its runs; the
shared rule now (``fwdgrad_jax.training.lr_search.score``) ranks it by the FINAL one (mean
of the last 3 evaluations) and leaves out lrs with an unstable run (final > 1.5 × its
best). This script re-scores the committed searches from the evaluation curves their
result files stored and says for each: the lr chosen at the time (as recorded), the lr
the rule chooses now, which lrs are now unstable, and whether the choice moved. It only
reads JSON; no training is run.

What a result file stored decides how far that goes (``stored``):

* ``full``: every run's curve (``results/baydin2022/training.json``'s fair comparison):
  re-scored exactly as the rule scores a search now (``lr_search.summarize_curves``).
* ``bound``: the chosen lr's curves and the other lrs' best values (the reproduction
  study's fair comparisons, ``results/perturbation``). A run's best is a lower bound of
  its final, so the choice provably stays when the chosen lr is still eligible and its new
  final is below every other eligible lr's recorded best, and provably moves (to an lr the
  stored data cannot always name) when the chosen lr is now unstable or diverged;
  otherwise it is ``undetermined`` (with the margin a contender's final must meet).
* ``proxy``: best validation losses and the chosen lr's TEST loss curve (Flügel Fig. 6):
  no re-score, but a test curve that goes non-finite (diverged) or ends above 1.5 × its
  best says the chosen run would not be eligible now ("moved (proxy)").
* ``none``: best values only (the demo's searches before the rule): cannot be re-scored
  without a rerun.
* ``rule``: the search ran under the rule already (``final_evals`` recorded).
* ``scalar``: not a validation-curve search — Flügel Figs. 4–5 score the best function value
  of gradient descent on closed-form problems (the paper's protocol), lr_transfer one final
  validation loss per run; their scripts still pass a scalar, so the change does not reach
  them.

  python -m experiments.stability.reselect --out results/stability   # reselect.{json,md}
  python -m experiments.stability.reselect --quick                   # synthetic searches
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments._lib import report as rep
from experiments._lib import script
from experiments._lib.config import ROOT
from fwdgrad_jax.training import lr_search

RESULT_FILE = "reselect.json"
MOVED = ("moved", "moved (proxy)")


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--results", type=Path, default=ROOT / "results", help="the results folder")
  p.add_argument("--quick", action="store_true", help="score synthetic searches with known answers")


def _fin(x: Any) -> bool:
  return x is not None and math.isfinite(x)


def _mean(xs: Sequence[float]) -> float:
  return sum(xs) / len(xs)


# --------------------------------------------------------------------------------------
# Re-scoring, by what was stored
# --------------------------------------------------------------------------------------


def rescore_full(
  lrs: Sequence[float],
  seeds: Sequence[int],
  curves: Sequence[Sequence[Sequence[float | None] | None]],
  diverged: Sequence[Sequence[bool]],
  recorded_lr: float | None,
) -> dict[str, Any]:
  """Every run's curve is known: the search as the rule scores it now.

  Args:
    lrs, seeds, curves, diverged: as :func:`lr_search.summarize_curves`.
    recorded_lr: the lr chosen at the time.

  Returns:
    The row's fields: ``new_lr``, ``new_loss``, ``unstable_lrs``, ``verdict`` (``same`` or
    ``moved``) and the per-lr ``cells`` of the new scoring.
  """
  s = lr_search.summarize_curves(lrs, seeds, curves, diverged)
  same = s.best_lr is not None and recorded_lr is not None and math.isclose(s.best_lr, recorded_lr)
  return dict(
    stored="full",
    new_lr=s.best_lr,
    new_loss=s.best_loss,
    unstable_lrs=list(s.unstable_lrs),
    diverged_lrs=list(s.diverged_lrs),
    verdict="same" if same else "moved",
    cells=lr_search.cells(s),
    at_grid_edge=s.at_grid_edge,
  )


def rescore_bound(
  search: Mapping[str, Any], chosen_curves: Sequence[Sequence[float | None]]
) -> dict[str, Any]:
  """Only the chosen lr's curves are known; the other lrs' best values bound their finals.

  Args:
    search: the recorded search (an :class:`lr_search.LrSearch` dict, values = best
      validation losses; ``best_index`` the lr chosen by them).
    chosen_curves: the validation curves of the chosen lr's runs, one per seed.

  Returns:
    The row's fields. ``verdict``: ``same`` (proved), ``moved`` (the chosen lr is now
    unstable or diverged, so not eligible; ``new_lr`` when only one other lr finished and
    the rule's fallback picks it either way) or ``undetermined``; ``contenders``: the lrs
    whose recorded best is below the chosen lr's new final, each with the ``margin`` its
    final may exceed its best by and still win.
  """
  r = lr_search.LrSearch.from_dict(search)
  c = r.best_index
  scores = [lr_search.score(curve) for curve in chosen_curves]
  finals = [s.final for s in scores]
  ratios = [s.final / s.best for s in scores if _fin(s.final) and _fin(s.best) and s.best > 0]
  f = _mean(finals) if finals and all(_fin(x) for x in finals) else None
  out = dict(
    stored="bound",
    chosen_best=r.curve[c],
    chosen_final=f,
    chosen_final_over_best=max(ratios) if ratios else None,
    diverged_lrs=list(r.diverged_lrs),
    unstable_lrs=[],
  )
  others = [i for i in range(len(r.lrs)) if i != c and not any(r.diverged[i])]
  if any(s.diverged for s in scores) or any(s.unstable for s in scores):
    bad = "diverged" if any(s.diverged for s in scores) else "unstable"
    # With one other finished lr the rule takes it: eligible, it wins; unstable too, it
    # still has the lower final unless its own final is above the chosen lr's.
    sure = len(others) == 1 and f is not None and r.curve[others[0]] is not None
    named = [r.lrs[i] for i in others]
    return dict(
      out,
      unstable_lrs=[r.lrs[c]] if bad == "unstable" else [],
      new_lr=r.lrs[others[0]] if sure else None,
      verdict="moved",
      note=f"the chosen lr is now {bad}: not eligible; "
      + (
        f"the only other lr that finished is {named[0]:g} (it wins unless it too is "
        f"unstable with a final above {f:.4g})"
        if sure
        else f"the new choice is among {named} (their curves were not stored)"
      ),
    )
  # Another lr beats the chosen one only if its final (≥ its recorded best) is below f;
  # a tie goes to the smaller lr.
  contenders = [
    i for i in others if r.curve[i] is not None and (r.curve[i] < f or (r.curve[i] == f and i < c))
  ]
  if not contenders:
    return dict(
      out,
      new_lr=r.best_lr,
      verdict="same",
      note="its new final is below every other lr's best (a lower bound of that lr's final)",
    )
  margins = {r.lrs[i]: f / r.curve[i] - 1 for i in contenders}
  return dict(
    out,
    new_lr=None,
    verdict="undetermined",
    contenders=list(margins),
    note="; ".join(
      f"{lr:g} (best {r.curve[r.lrs.index(lr)]:.4g}) wins if its final is within "
      f"{100 * m:.1f} % of its best"
      for lr, m in margins.items()
    ),
  )


def proxy(search: Mapping[str, Any], test_curve: Sequence[float | None] | None) -> dict[str, Any]:
  """Best values and the chosen lr's test-loss curve: flag a chosen run that fell over.

  The test loss is measured on the same parameters as the validation loss (another
  held-out sample): a non-finite one means the run diverged, one ending above 1.5 × its
  best means the validation curve very likely did too.
  """
  row = dict(
    stored="proxy",
    new_lr=None,
    unstable_lrs=None,
    diverged_lrs=list(search.get("diverged_lrs", [])),
    verdict="cannot re-score",
    note="best validation losses only",
  )
  if not test_curve:
    return row
  sc = lr_search.score(test_curve)
  ratio = sc.final / sc.best if _fin(sc.final) and _fin(sc.best) and sc.best > 0 else None
  if sc.diverged:
    n = len([v for v in test_curve if _fin(v)])
    return dict(
      row,
      verdict="moved (proxy)",
      note=f"the chosen lr's test loss is non-finite from evaluation {n + 1} of "
      f"{len(test_curve)} on: its run diverged (not eligible); the other lrs' curves were "
      "not stored",
    )
  if sc.unstable:
    return dict(
      row,
      verdict="moved (proxy)",
      note=f"the chosen lr's test loss ends at {ratio:.2f} × its best (final "
      f"{sc.final:.3g}, best {sc.best:.3g}): unstable by the test curve; the other lrs' "
      "curves were not stored",
    )
  return dict(
    row,
    note=f"best validation losses only; the chosen lr's test loss ends at {ratio:.2f} × its best",
  )


def no_curves(search: Mapping[str, Any], why: str) -> dict[str, Any]:
  """Only best values were stored: no re-scoring."""
  return dict(
    stored="none",
    new_lr=None,
    unstable_lrs=None,
    diverged_lrs=list(search.get("diverged_lrs", [])),
    verdict="cannot re-score",
    note=why,
  )


def _recorded(search: Mapping[str, Any]) -> dict[str, Any]:
  return dict(
    lrs=list(search["lrs"]),
    seeds=list(search["seeds"]),
    recorded_lr=search["best_lr"],
    recorded_objective=search.get("objective"),
    recorded_cells=lr_search.cells(search),
  )


def _as_rule(search: Mapping[str, Any]) -> dict[str, Any]:
  if search.get("final_evals") is not None:
    return dict(
      stored="rule",
      new_lr=search["best_lr"],
      unstable_lrs=list(search.get("unstable_lrs", [])),
      verdict="already the rule",
    )
  return dict(stored="scalar", new_lr=None, unstable_lrs=None, verdict="not a curve search")


# --------------------------------------------------------------------------------------
# The committed results, one reader per layout
# --------------------------------------------------------------------------------------


def _prov(d: Mapping[str, Any]) -> dict[str, Any]:
  p = d.get("provenance") or {}
  git = p.get("git") or {}
  return dict(
    command=p.get("command") or p.get("commands"),
    revision=git.get("short") or git.get("committed_in"),
    date=p.get("date"),
    load_average=p.get("load_average"),
  )


def _drop_options(argv: Sequence[str], names: Iterable[str]) -> list[str]:
  """``argv`` without the options ``names`` and their values."""
  out, skip, names = [], False, set(names)
  for a in argv:
    if skip:
      skip = False
    elif a in names:
      skip = True
    else:
      out.append(a)
  return out


def _rel(path: Path, results: Path) -> str:
  return str(Path(results.name) / path.relative_to(results))


def _baydin_fair(path: Path, results: Path) -> list[dict[str, Any]]:
  d = json.loads(path.read_text())
  rerun = (
    "python -m experiments.baydin2022.fair --steps 1000 --forward-lrs 1e-5,1e-2,7 "
    "--out results/baydin2022 --sweeps-dir outputs/baydin2022/sweeps"
  )
  rows = []
  for model, f in d.get("fair", {}).items():
    for method, runs in f["runs"].items():
      lrs = sorted({float(r["lr"]) for r in runs})
      seeds = sorted({int(r["seed"]) for r in runs})
      by = {(float(r["lr"]), int(r["seed"])): r for r in runs}
      curves = [
        [
          None if (lr, s) not in by else lr_search.val_curve(by[lr, s]["curve"], by[lr, s])
          for s in seeds
        ]
        for lr in lrs
      ]
      div = [[bool(by.get((lr, s), {}).get("diverged")) for s in seeds] for lr in lrs]
      recorded_lr = float(f["best"][method]["lr"])  # the script of the time: lowest best val loss
      cells = []
      for lr in lrs:
        bests = [by[lr, s].get("best_val_loss") for s in seeds if (lr, s) in by]
        v = f"{_mean(bests):.4g}" if bests and all(_fin(b) for b in bests) else "—"
        mark = " (div)" if any(div[lrs.index(lr)]) else ""
        cells.append(f"{lr:g}: {v}{'*' if lr == recorded_lr else ''}{mark}")
      rows.append(
        dict(
          result=_rel(path, results),
          search=f"fair {model} {method}",
          lrs=lrs,
          seeds=seeds,
          recorded_lr=recorded_lr,
          recorded_objective="best_val_loss",
          recorded_cells=cells,
          **rescore_full(lrs, seeds, curves, div, recorded_lr),
          n_runs=len(runs),
          train_s=sum(float(r.get("train_time_s") or 0) for r in runs),
          provenance=_prov(f),
          rerun=rerun,
        )
      )
  return rows


def _repro_rerun(path: Path, d: Mapping[str, Any]) -> str:
  # The recorded command is of the script's old path (experiments/repro_fair.py); the same
  # options with today's module, the output named after the committed file, the sweeps in
  # a fresh folder (repro.fair reuses a finished sweep; the old ones are gone anyway) that
  # files sharing a sweep folder then share again (fair_5k and fair_beyond_5k: bp, fwd).
  argv = shlex.split((d.get("provenance") or {}).get("command", ""))
  argv = (
    argv[argv.index("experiments/repro_fair.py") + 1 :]
    if "experiments/repro_fair.py" in argv
    else []
  )
  sweeps = argv[argv.index("--sweeps-dir") + 1] if "--sweeps-dir" in argv else "outputs/repro_fair"
  rest = _drop_options(argv, ("--out", "--sweeps-dir", "--name"))
  return shlex.join(
    [
      "python", "-m", "experiments.repro.fair", *rest, "--name", path.stem,
      "--out", "results/reproduction_study", "--sweeps-dir", f"{sweeps}_rule",
    ]
  )  # fmt: skip


def _repro_fair(path: Path, results: Path) -> list[dict[str, Any]]:
  d = json.loads(path.read_text())
  rows = []
  for opt, od in d["optimizers"].items():
    for method, m in od["methods"].items():
      s = m["search"]
      runs = (m.get("best") or {}).get("runs") or []
      n_jobs = len(s["lrs"]) * len(s["seeds"])
      # The other lrs' runs took about as long per step as the chosen one's.
      train_s = _mean([float(r.get("train_time_s") or 0) for r in runs]) * n_jobs if runs else None
      base = dict(
        result=_rel(path, results),
        search=f"{opt} {m.get('label', method)}",
        **_recorded(s),
        n_runs=n_jobs,
        train_s=train_s,
        provenance=_prov(d),
        rerun=_repro_rerun(path, d),
      )
      if s.get("final_evals") is not None:
        rows.append(dict(base, **_as_rule(s)))
      elif len(runs) == len(s["seeds"]):
        curves = [lr_search.val_curve(r["records"], r) for r in runs]
        rows.append(dict(base, **rescore_bound(s, curves)))
      else:
        rows.append(dict(base, **no_curves(s, "the chosen lr's runs were not stored")))
  return rows


def _perturbation(path: Path, results: Path) -> list[dict[str, Any]]:
  d = json.loads(path.read_text())
  steps = int(d["settings"]["steps"])
  rows = []
  for v in d["variants"]:
    s = v["search"]
    best = v.get("best") or {}
    n_jobs = len(s["lrs"]) * len(s["seeds"])
    ms = best.get("step_time_ms")
    base = dict(
      result=_rel(path, results),
      search=v["label"],
      **_recorded(s),
      n_runs=n_jobs,
      train_s=None if ms is None else ms * steps / 1e3 * n_jobs,
      provenance=_prov(d),
      rerun="python -m experiments.perturbation.training --out results/perturbation "
      "--sweeps-dir outputs/perturbation_rule/sweeps",
    )
    if s.get("final_evals") is not None:
      rows.append(dict(base, **_as_rule(s)))
    elif best.get("curve") and len(s["seeds"]) == 1:
      rows.append(dict(base, **rescore_bound(s, [[r.get("val_loss") for r in best["curve"]]])))
    else:
      rows.append(dict(base, **no_curves(s, "the chosen lr's curve was not stored")))
  return rows


def _demo(path: Path, results: Path) -> list[dict[str, Any]]:
  d = json.loads(path.read_text())
  s = d["search"]
  n_jobs = len(s["lrs"]) * len(s["seeds"])
  base = dict(
    result=_rel(path, results),
    search=d.get("row", path.stem),
    **_recorded(s),
    n_runs=n_jobs,
    train_s=None if d.get("budget_s") is None else float(d["budget_s"]) * n_jobs,
    provenance=_prov(d),
    rerun=(d.get("provenance") or {})
    .get("command", "")
    .replace("python experiments/compare.py", "python -m experiments.compare"),
  )
  if s.get("final_evals") is not None:
    return [dict(base, **_as_rule(s))]
  why = (
    "best values only: the runs' metrics.jsonl were in an uncommitted sweep folder "
    f"({(s.get('extra') or {}).get('sweep_dir')}, gone)"
  )
  return [dict(base, **no_curves(s, why))]


def _fig6(path: Path, results: Path) -> list[dict[str, Any]]:
  d = json.loads(path.read_text())
  cmd = (d.get("provenance") or {}).get("command", "")
  rerun = cmd.replace(
    "python experiments/flugel2024_fig6.py", "python -m experiments.flugel2024.fig6"
  )
  rows = []
  for r in d["rows"]:
    s = r["search"]
    base = dict(
      result=_rel(path, results),
      search=f"w={r['width']} {r['variant']}",
      **_recorded(s),
      n_runs=len(s["lrs"]) * len(s["seeds"]),
      train_s=r.get("seconds_all_lrs"),
      provenance=_prov(d),
      rerun=rerun,
    )
    if s.get("final_evals") is not None:
      rows.append(dict(base, **_as_rule(s)))
    else:
      rows.append(dict(base, **proxy(s, r.get("test_loss_curve"))))
  return rows


def _searches_in(path: Path, results: Path, pick: Callable[[Any], Iterable]) -> list[dict]:
  d = json.loads(path.read_text())
  return [
    dict(
      result=_rel(path, results), search=label, **_recorded(s), **_as_rule(s), provenance=_prov(d)
    )
    for label, s in pick(d)
  ]


def _scalar_rows(path: Path, results: Path, what: str) -> list[dict]:
  """Closed-form searches (Flügel Figs. 4–5): rows with ``best_lr`` and no LrSearch."""
  d = json.loads(path.read_text())
  return [
    dict(
      result=_rel(path, results),
      search=" ".join(
        str(r[k]) for k in ("function", "n", "variant", "k", "aggregation", "angle_deg") if k in r
      ),
      recorded_lr=r.get("best_lr", r.get("st_best_lr")),
      recorded_objective=what,
      stored="scalar",
      new_lr=None,
      unstable_lrs=None,
      verdict="not a curve search",
      provenance=_prov(d),
    )
    for r in d.get("rows", [])
  ]


def committed(results: Path) -> list[dict[str, Any]]:
  """Every committed lr search under ``results`` (the layouts of the time), re-scored."""
  rows: list[dict[str, Any]] = []
  if (p := results / "baydin2022" / "training.json").exists():
    rows += _baydin_fair(p, results)
  for p in sorted((results / "reproduction_study").glob("fair*.json")):
    rows += _repro_fair(p, results)
  if (p := results / "perturbation" / "training.json").exists():
    rows += _perturbation(p, results)
  for p in sorted((results / "demo").glob("lr_search_*.json")):
    rows += _demo(p, results)
  for p in sorted((results / "flugel2024").glob("fig6*/fig6.json")):
    rows += _fig6(p, results)
  for p in sorted((results / "flugel2024").glob("fig[45]*/fig[45].json")):
    rows += _scalar_rows(p, results, "best value reached (closed form)")
  if (p := results / "lr_transfer" / "lr_transfer.json").exists():
    rows += _searches_in(
      p,
      results,
      lambda d: (
        [
          (f"k={x['k']} {x['aggregation']} rescale={x['rescale']}", x["search"])
          for x in d["searches"]
        ]
        + [("backprop", d["backprop"])]
      ),
    )
  if (p := results / "ren2023" / "table.json").exists():
    rows += _searches_in(p, results, lambda d: [(r["label"], r["search"]) for r in d["rows"]])
  return rows


# --------------------------------------------------------------------------------------
# --quick: synthetic searches with known answers
# --------------------------------------------------------------------------------------


def synthetic() -> list[dict[str, Any]]:
  """One search of each kind, with the verdict the rule must give (``expect``)."""

  def steady(end):  # levels off at `end`: final = end
    return [2.0, 1.5, 1.2, end + 0.05, end, end, end]

  dip_and_blow = [2.0, 0.5, 1.0, 1.6, 1.8, 2.0]  # best 0.5, final 1.8: unstable
  lrs, seeds = [0.01, 0.1, 1.0], [0]

  def old(values):  # a search of the time: values = best val losses, 0.1 chosen
    vals = [[v] for v in values]
    s = lr_search.summarize(lrs, seeds, vals, objective="best_val_loss").as_dict()
    assert s["best_lr"] == 0.1
    return s

  def row(label, expect, fields, recorded_lr=0.1):
    return dict(result="synthetic", search=label, recorded_lr=recorded_lr, expect=expect, **fields)

  full = [[steady(0.9)], [dip_and_blow], [None]]
  return [
    # the old rule chose 0.1 (best 0.5); now it is unstable and 0.01 wins
    row("full, dip and blow-up", "moved", rescore_full(lrs, seeds, full, [[0], [0], [1]], 0.1)),
    # chosen final 0.85 below the others' bests 0.9 and 1.0
    row("bound, stays", "same", rescore_bound(old([0.9, 0.85, 1.0]), [steady(0.85)])),
    # chosen final 0.95 above 0.01's best 0.9
    row(
      "bound, undetermined",
      "undetermined",
      rescore_bound(old([0.9, 0.7, 1.0]), [[2.0, 0.7, 0.95, 0.95, 0.95]]),
    ),
    row("bound, now unstable", "moved", rescore_bound(old([0.9, 0.5, 1.0]), [dip_and_blow])),
    row("proxy, diverged", "moved (proxy)", proxy(old([0.9, 0.5, 1.0]), [1.0, 0.5, None])),
    row("best values only", "cannot re-score", no_curves(old([0.9, 0.5, 1.0]), "synthetic")),
  ]


# --------------------------------------------------------------------------------------
# run / report
# --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
  rows = synthetic() if args.quick else committed(args.results)
  return dict(
    rule=dict(final_evals=lr_search.FINAL_EVALS, unstable_ratio=lr_search.UNSTABLE_RATIO),
    training_run=False,
    quick=bool(args.quick),
    rows=rows,
  )


def _lrs(xs: Any) -> str:
  return "?" if xs is None else (", ".join(rep.lr(x) for x in xs) or "none")


def _note(r: Mapping[str, Any]) -> str:
  note = r.get("note", "")
  if r.get("chosen_final") is not None:
    ratio = r.get("chosen_final_over_best")
    head = f"chosen lr: best {r['chosen_best']:.4g}, final {r['chosen_final']:.4g}"
    head += f" ({ratio:.2f}× its best)" if ratio else ""
    note = f"{head}; {note}" if note else head
  if r.get("expect"):
    note = f"expected {r['expect']}; {note}"
  return note


def report(result: dict[str, Any], out: Path) -> list[Path]:
  rows = result["rows"]
  prov = result.get("provenance") or {}
  git = prov.get("git") or {}
  rule = result["rule"]
  count = lambda v: sum(r["verdict"] == v for r in rows)
  lines = [
    "# Which committed lr choices move under the final-loss rule (issue 21, item 5)",
    "",
    f"**Command**: `{prov.get('command')}` at revision {git.get('short')}"
    + (" (with uncommitted changes)" if git.get("dirty") else "")
    + f", {prov.get('date')}. **No training was run**: the committed result files' stored "
    f"evaluation curves are re-scored by `fwdgrad_jax.training.lr_search` (final = mean of "
    f"a run's last {rule['final_evals']} evaluations; unstable = final > "
    f"{rule['unstable_ratio']:g} × the run's best; unstable and diverged lrs not eligible). "
    "The recorded lr was chosen by the best validation loss of its runs.",
    "",
    "**stored**: *full* = every run's validation curve (re-scored exactly); *bound* = the "
    "chosen lr's curve and the other lrs' best values (a best is a lower bound of a final: "
    "*same* is proved when the chosen lr's new final is below every other lr's best, "
    "*moved* when the chosen lr is now unstable or diverged, else *undetermined*); *proxy* "
    "= best values and the chosen lr's test-loss curve; *none* = best values only; *rule* "
    "= ran under the rule already; *scalar* = not a validation-curve search (Flügel Figs. "
    "4–5: best function value on closed-form problems; lr_transfer: one final validation "
    "loss per run), which the change does not reach.",
    "",
    f"Of {len(rows)} searches: moved {count('moved')}, moved by the test-loss proxy "
    f"{count('moved (proxy)')}, undetermined {count('undetermined')}, cannot be re-scored "
    f"{count('cannot re-score')}, same {count('same')}, already the rule "
    f"{count('already the rule')}, not a curve search {count('not a curve search')}.",
    "",
    "| result | search | recorded lr | new lr | unstable lrs now | stored | verdict | note |",
    "|---|---|---|---|---|---|---|---|",
  ]
  # The searches the change cannot reach, one line per file.
  quiet = ("already the rule", "not a curve search")
  for r in rows:
    if r["verdict"] in quiet:
      continue
    v = f"**{r['verdict']}**" if r["verdict"] in (*MOVED, "undetermined") else r["verdict"]
    lines.append(
      f"| {r.get('result')} | {r['search']} | {rep.lr(r.get('recorded_lr'))} "
      f"| {rep.lr(r.get('new_lr'))} | {_lrs(r.get('unstable_lrs'))} | {r['stored']} | {v} "
      f"| {_note(r)} |"
    )
  by_file: dict[tuple[str, str], list[dict]] = {}
  for r in rows:
    if r["verdict"] in quiet:
      by_file.setdefault((r["result"], r["verdict"]), []).append(r)
  for (res, verdict), rs in by_file.items():
    lrs_ = ", ".join(f"{r['search']} {rep.lr(r['recorded_lr'])}" for r in rs[:4])
    more = f" … ({len(rs)} searches)" if len(rs) > 4 else ""
    lines.append(f"| {res} | {lrs_}{more} | | | | {rs[0]['stored']} | {verdict} | |")
  full = [r for r in rows if r["stored"] == "full"]
  if full:
    lines += ["", "## Re-scored in full (per lr: old = best val loss, new = final val loss)", ""]
    for r in full:
      if r.get("recorded_cells"):
        lines.append(f"- {r['search']}: old {', '.join(r['recorded_cells'])}")
        lines.append(f"  → new {', '.join(r['cells'])}")
      else:
        lines.append(f"- {r['search']}: new {', '.join(r['cells'])}")
  todo = [r for r in rows if r["verdict"] in (*MOVED, "undetermined")]
  if todo and not result.get("quick"):
    lines += [
      "",
      "## Reruns (moved or undetermined)",
      "",
      "Training seconds as recorded (the chosen lr's run × the grid where only it was "
      "stored; at the load of the time), without each run's start-up, compile and "
      "evaluations.",
      "",
    ]
    cmds: dict[str, list[dict]] = {}
    for r in todo:
      cmds.setdefault(r.get("rerun") or "?", []).append(r)
    for cmd, rs in cmds.items():
      everything = [x for x in rows if x.get("rerun") == cmd]
      total = sum(x.get("train_s") or 0 for x in everything)
      names = "; ".join(f"{r['search']} ({r['verdict']})" for r in rs)
      lines.append(
        f"- {rs[0]['result']}: {names}. `{cmd}`: {sum(x.get('n_runs') or 0 for x in everything)} "
        f"runs, ≈ {total:.0f} s of training recorded."
      )
  md = out / "reselect.md"
  md.write_text("\n".join(lines) + "\n")
  return [md]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return script.main(
    __file__,
    run,
    report,
    result_file=RESULT_FILE,
    description=__doc__,
    add_arguments=_add_arguments,
    argv=argv,
  )


if __name__ == "__main__":
  main()
