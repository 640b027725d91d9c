"""What every experiment of the project shares: timing, provenance, result files, plotting.

* :func:`time_interleaved` — the one timer: rounds × variants, each round calls every
  variant once in a shuffled order (so background load hits all alike), compile and
  first-touch excluded, medians and IQR. The training loop, the benchmark and every
  paper's script time with it.
* :func:`provenance` — the record written into every result JSON: the exact command,
  the git revision (and whether the tree was dirty), jax/jaxlib versions, the device
  and CPU/GPU model, the date.
* :func:`write_json` / :func:`read_json` — result files carry their provenance.
* :func:`pyplot` — matplotlib set up headless, once.
* :func:`script_main` — the command line every experiment script shares: ``run(args)
  -> dict`` writes one JSON (with provenance), ``report(result, out_dir)`` turns it into
  Markdown and PNGs, and ``--report-only RESULT.json`` reruns only the report. Outputs go
  to a fresh directory (:func:`fresh_dir`) unless ``--out`` names one, so a command
  copied from a results page never overwrites committed results.

Nothing here imports jax at module level except what timing needs, and nothing finds
files of the repository: callers pass paths.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
  "Timing",
  "command_line",
  "fresh_dir",
  "git_revision",
  "hardware_info",
  "hardware_line",
  "provenance",
  "pyplot",
  "read_json",
  "script_main",
  "time_interleaved",
  "write_json",
]


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


class Timing(NamedTuple):
  """Seconds per step of one variant over the timed rounds.

  Attributes:
    median, q25, q75, iqr: quantiles of ``times``.
    times: per round, the call's wall time divided by the steps it ran.
  """

  median: float
  q25: float
  q75: float
  iqr: float
  times: tuple[float, ...]

  def as_dict(self, scale: float = 1.0) -> dict[str, Any]:
    """JSON-ready quantiles and per-round times, multiplied by ``scale`` (1e3: ms)."""
    return {
      "median": self.median * scale,
      "q25": self.q25 * scale,
      "q75": self.q75 * scale,
      "iqr": self.iqr * scale,
      "times": [t * scale for t in self.times],
    }


def _timing(times: Sequence[float]) -> Timing:
  q25, q50, q75 = np.percentile(np.asarray(times, np.float64), [25, 50, 75])
  return Timing(float(q50), float(q25), float(q75), float(q75 - q25), tuple(map(float, times)))


def _block(out: Any) -> None:
  import jax  # only when something is timed

  jax.block_until_ready(out)


def time_interleaved(
  variants: Mapping[str, Callable[..., Any]],
  *,
  rounds: int,
  args: Mapping[str, Callable[[], tuple]] | None = None,
  steps: Mapping[str, int] | int = 1,
  warmup: int = 1,
  seed: int = 0,
  on_round: Callable[[int], None] | None = None,
) -> dict[str, Timing]:
  """Times ``variants`` against each other: interleaved rounds, medians.

  Every variant is first called ``warmup`` times untimed (compilation if it is not
  compiled yet, page faults, thread-pool start-up). Then each of ``rounds`` rounds calls
  every variant once, in an order shuffled by ``seed``, blocking on each result.

  Args:
    variants: name → function. It is called as ``fn(*args[name]())`` (or ``fn()``).
    rounds: timed calls per variant.
    args: name → a function returning the call's arguments, called outside the timer:
      fresh copies of donated buffers go here, so copying is never timed.
    steps: steps each call runs (e.g. a ``fori_loop`` of training steps), per variant
      or for all; the times are per step.
    warmup: untimed calls per variant before the rounds.
    seed: seeds the order of the calls within each round.
    on_round: called with the round index after each round (progress).

  Returns:
    name → :class:`Timing` in seconds per step.

  Raises:
    ValueError: ``rounds`` < 1 or ``warmup`` < 0, or a step count < 1.
  """
  if rounds < 1 or warmup < 0:
    raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
  names = list(variants)
  per_call = {n: steps if isinstance(steps, int) else steps[n] for n in names}
  if any(s < 1 for s in per_call.values()):
    raise ValueError(f"steps must be >= 1, got {per_call}")
  args = args or {}

  def call(name: str) -> float:
    a = args[name]() if name in args else ()
    t0 = time.perf_counter()
    _block(variants[name](*a))
    return time.perf_counter() - t0

  for name in names:
    for _ in range(warmup):
      call(name)
  times: dict[str, list[float]] = {n: [] for n in names}
  rng = np.random.default_rng(seed)
  for r in range(rounds):
    for i in rng.permutation(len(names)):
      name = names[i]
      times[name].append(call(name) / per_call[name])
    if on_round is not None:
      on_round(r)
  return {n: _timing(t) for n, t in times.items()}


# --------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------


def _git(path: Path, *args: str) -> str | None:
  try:
    out = subprocess.run(
      ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def git_revision(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
  """The git commit of the checkout holding ``path`` (default: this package) and its state.

  Returns:
    ``{"revision": full sha or None, "short": short sha, "dirty": bool or None}``;
    dirty means tracked files differ from the commit (untracked files are ignored).
  """
  where = Path(path) if path is not None else Path(__file__).resolve().parent
  head = _git(where, "rev-parse", "HEAD")
  if not head:
    return {"revision": None, "short": None, "dirty": None}
  status = _git(where, "status", "--porcelain", "--untracked-files=no")
  return {"revision": head, "short": head[:10], "dirty": bool(status)}


def _cpu_model() -> str | None:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def hardware_info() -> dict[str, Any]:
  """Platform, device kind and count, CPU model and cores, jax/jaxlib/python versions.

  ``device_kind`` is just ``"cpu"`` on the CPU backend, hence the CPU model from
  ``/proc/cpuinfo``; on a GPU it names the GPU. ``usable_cores`` is the scheduler
  affinity (what XLA's thread pool can use), ``logical_cores`` the machine's count.
  """
  import jax
  import jaxlib

  dev = jax.devices()[0]
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    usable = os.cpu_count()
  return {
    "platform": dev.platform,
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "gpu_model": dev.device_kind if dev.platform == "gpu" else None,
    "cpu_model": _cpu_model(),
    "logical_cores": os.cpu_count(),
    "usable_cores": usable,
    "jax_version": jax.__version__,
    "jaxlib_version": getattr(jaxlib, "__version__", None),
    "python": platform.python_version(),
  }


def command_line(program: str | os.PathLike[str], argv: Sequence[Any]) -> str:
  """``python <program> <argv>`` as a user types it: the program relative to the cwd, quoted.

  Args:
    program: the script (absolute or relative).
    argv: its arguments.
  """
  program = str(program)
  try:
    program = os.path.relpath(program)
  except ValueError:  # another drive (Windows)
    pass
  return shlex.join(["python", program, *map(str, argv)])


def _command(argv: Sequence[str] | None, program: str | None) -> str:
  if argv is None:
    argv = sys.argv[1:]
  if program is None:
    program = sys.argv[0] if sys.argv and sys.argv[0] else "python"
  return command_line(program, argv)


def _load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except (AttributeError, OSError):  # not on Unix
    return None


def provenance(
  argv: Sequence[str] | None = None, *, program: str | None = None, **extra: Any
) -> dict[str, Any]:
  """The record that makes a result reproducible and comparable.

  Args:
    argv: the program's arguments (default ``sys.argv[1:]``).
    program: the script as typed (default ``sys.argv[0]`` relative to the cwd).
    **extra: more fields (e.g. ``data="fashion_mnist"``).

  Returns:
    ``command``, ``git`` (:func:`git_revision`), ``hardware`` (:func:`hardware_info`),
    ``date`` (UTC, ISO 8601), ``load_average`` (1, 5, 15 min when taken: timings from a
    shared machine are only as good as its load) and ``extra``'s fields.
  """
  return {
    "command": _command(argv, program),
    "git": git_revision(),
    "hardware": hardware_info(),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "load_average": _load_average(),
    **extra,
  }


def hardware_line(provenance: Mapping[str, Any] | None) -> str:
  """One line naming the hardware, jax and code revision of a result's provenance."""
  if not provenance:
    return "Hardware: not recorded."
  hw, git = provenance.get("hardware", {}), provenance.get("git", {})
  rev = git.get("short") or "unknown revision"
  if git.get("dirty"):
    rev += " (uncommitted changes)"
  device = hw.get("gpu_model") or hw.get("cpu_model")
  load = provenance.get("load_average")
  return (
    f"Hardware: {hw.get('platform')} ({device}), {hw.get('usable_cores')} usable of "
    f"{hw.get('logical_cores')} logical cores; jax {hw.get('jax_version')}; "
    f"fwdgrad_jax {rev}; {provenance.get('date')}"
    + (f"; load average {' '.join(map(str, load))}" if load else "")
    + "."
  )


# --------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None  # JSON has no NaN/inf; a missing number reads as null
  return x


def _is_flat(x: Any) -> bool:
  """Scalars, or lists of scalars / of short lists of scalars (a curve, a trajectory)."""
  if isinstance(x, list):
    return all(not isinstance(v, dict) and (not isinstance(v, list) or _is_flat(v)) for v in x)
  return not isinstance(x, dict)


def _dumps(x: Any, indent: int = 0) -> str:
  # Indented like json.dumps(indent=2), except that arrays of numbers stay on one line:
  # a curve of 2000 points is one line, not 2000.
  if _is_flat(x):
    return json.dumps(x, separators=(", ", ": "))
  pad, inner = " " * indent, " " * (indent + 2)
  if isinstance(x, dict):
    if not x:
      return "{}"
    items = [f"{inner}{json.dumps(k)}: {_dumps(v, indent + 2)}" for k, v in x.items()]
    return "{\n" + ",\n".join(items) + f"\n{pad}}}"
  items = [f"{inner}{_dumps(v, indent + 2)}" for v in x]
  return "[\n" + ",\n".join(items) + f"\n{pad}]"


def write_json(
  path: str | os.PathLike[str], payload: Mapping[str, Any], *, provenance_record: Any = None
) -> Path:
  """Writes ``payload`` with a ``provenance`` field (:func:`provenance` unless given).

  Non-finite floats become null and numpy scalars/arrays plain JSON; arrays of numbers
  are written on one line each. The file is written to a temporary name and renamed, so
  a reader never sees half of it.

  Returns:
    The path written.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  record = dict(payload)
  record["provenance"] = provenance_record if provenance_record is not None else provenance()
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(_dumps(_jsonable(record)) + "\n")
  os.replace(tmp, path)
  return path


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads a result file written by :func:`write_json`."""
  return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------------------
# Plotting
# --------------------------------------------------------------------------------------


def pyplot() -> Any:
  """``matplotlib.pyplot`` on the headless Agg backend (set once, before pyplot loads)."""
  import matplotlib

  if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


# --------------------------------------------------------------------------------------
# The command line of an experiment script
# --------------------------------------------------------------------------------------


def fresh_dir(parent: str | os.PathLike[str], name: str) -> Path:
  """Creates and returns ``parent/name/<UTC date-time>``, a directory that did not exist.

  Two calls in the same second get ``…-1``, ``…-2`` suffixes rather than sharing one.
  """
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d_%H-%M-%S")
  base = Path(parent) / name
  base.mkdir(parents=True, exist_ok=True)
  for i in range(1000):
    path = base / (stamp if i == 0 else f"{stamp}-{i}")
    try:
      path.mkdir()
    except FileExistsError:
      continue
    return path
  raise FileExistsError(f"no fresh directory under {base} for {stamp}")


def positive_floats(text: str) -> tuple[float, ...]:
  """An argparse ``type`` for a comma-separated list of positive numbers (an lr grid)."""
  try:
    values = tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text}: expected comma-separated numbers") from None
  if not values or any(v <= 0 for v in values):
    raise argparse.ArgumentTypeError(f"{text}: expected positive numbers")
  return values


def merge_by_label(results: list[dict[str, Any]], key: str, label: str = "label") -> dict[str, Any]:
  """Several runs' ``result[key]`` entries in one result (a later run's entry replaces an
  earlier one with the same ``label``); a ``merge`` for :func:`script_main`."""
  entries: dict[str, Any] = {}
  for r in results:
    for e in r[key]:
      entries[e[label]] = e
  return {
    **results[-1],
    key: list(entries.values()),
    "merged_from": [r["provenance"]["command"] for r in results],
  }


def script_main(
  file: str | os.PathLike[str],
  run: Callable[[argparse.Namespace], Mapping[str, Any]],
  report: Callable[[dict[str, Any], Path], Sequence[Path]],
  *,
  result_file: str | Callable[[argparse.Namespace], str],
  description: str | None = None,
  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
  merge: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
  argv: Sequence[str] | None = None,
  outputs: str | os.PathLike[str] = "outputs",
  module: str | None = None,
) -> dict[str, Any]:
  """The shared command line: run → JSON (with provenance) → report, or only the report.

  Options added to the script's own (``add_arguments``):

  * ``--out DIR``: where the JSON and the report go (default: a fresh
    ``<outputs>/<script name>/<date-time>``, see :func:`fresh_dir`). ``args.out`` is the
    :class:`~pathlib.Path` when ``run`` is called, so runs can put their files under it.
  * ``--report-only JSON [JSON ...]``: skip ``run``; read the result file(s) and write
    the report again (several files only where the script gives ``merge``).

  The provenance is taken before ``run`` starts (the code may change during a long run)
  and written into the JSON by :func:`write_json`.

  Args:
    file: the script's ``__file__``; names the output folder and the recorded command.
    run: ``args -> result`` (JSON-able; numpy values are fine).
    report: ``(result with provenance, out_dir) -> paths written``.
    result_file: the JSON's file name inside the output directory, or a function of the
      parsed arguments returning it.
    description: the script's ``__doc__``: first line as the description, the rest
      (usage examples) as the help's epilog.
    add_arguments: adds the script's options to the parser.
    merge: combines several result files for ``--report-only`` (e.g. models run by
      separate commands); without it only one file is accepted.
    argv: the arguments (default ``sys.argv[1:]``).
    outputs: parent of the default output directories (relative to the cwd).
    module: the script's module name when it runs as ``python -m <module>`` (e.g.
      ``experiments.flugel2024.fig4``): the recorded command and ``--help`` use that form,
      and the default output folder is named after the module below its package
      (``flugel2024_fig4``). None: the script runs as a path.

  Returns:
    The result as written (with ``provenance``), or the merged result of
    ``--report-only``.
  """
  script = Path(file)
  stem = "_".join(module.split(".")[1:]) if module else script.stem
  doc = (description or "").strip()
  head, _, rest = doc.partition("\n")
  parser = argparse.ArgumentParser(
    prog=f"python -m {module}" if module else f"python {_relpath(script)}",
    description=head or None,
    epilog=rest.strip() or None,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  if add_arguments is not None:
    add_arguments(parser)
  parser.add_argument(
    "--out",
    type=Path,
    default=None,
    help=f"output directory (default: a fresh {outputs}/{stem}/<date-time>)",
  )
  parser.add_argument(
    "--report-only",
    nargs="+",
    type=Path,
    default=None,
    metavar="JSON",
    help="no run: write the report again from result file(s) of an earlier run",
  )
  argv = list(sys.argv[1:] if argv is None else map(str, argv))
  args = parser.parse_args(argv)
  if args.report_only is not None and len(args.report_only) > 1 and merge is None:
    parser.error("--report-only: this script reports one result file at a time")
  out = args.out if args.out is not None else fresh_dir(outputs, stem)
  out.mkdir(parents=True, exist_ok=True)
  args.out = out

  if args.report_only is not None:
    results = [read_json(p) for p in args.report_only]
    result = merge(results) if merge is not None else results[0]
    if len(results) > 1:  # the merged result is a result file of its own
      name = result_file(args) if callable(result_file) else result_file
      merged = write_json(out / name, result, provenance_record=result.get("provenance"))
      print(f"wrote {merged}", flush=True)
  else:
    # Taken before the run: the code may change during a long one.
    record = provenance(argv, program=_relpath(script))
    if module:
      record["command"] = shlex.join(["python", "-m", module, *argv])
    name = result_file(args) if callable(result_file) else result_file
    path = write_json(out / name, run(args), provenance_record=record)
    result = read_json(path)  # exactly what a later --report-only will see
    print(f"wrote {path}", flush=True)
  for path in report(result, out):
    print(f"wrote {path}", flush=True)
  return result


def _relpath(path: Path) -> str:
  try:  # as a user types it from the repository root
    return os.path.relpath(path)
  except ValueError:  # another drive (Windows)
    return str(path)
