"""Which tests are ``slow``: measured, not guessed.

``tests/durations.json`` holds each test's measured seconds (setup + call + teardown) from a
full run on the project's 2-core CI machine, and the threshold above which ``conftest.py``
marks a test ``slow`` (``pytest -m "not slow"``: the inner loop). The quickest test of every
file always stays in the inner loop, so it still touches every module. Tests missing from
the file (new ones) count as fast until the next measurement. The budget is the measured
work only: each worker's imports, the tiny data set and the compiles that the full run shared
with deselected tests come on top (55 s of measured work per worker ran in 2.5 minutes on 2
cores: the README examples, the four-device worker and the two-process run are module fixtures
that come with their file's quickest test).

Regenerate after adding or changing tests (``make test-durations``)::

    python -m pytest -q --durations=0 tests > .durations.log
    python tests/_durations.py .durations.log --budget-s 55 --workers 2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

PATH = Path(__file__).with_name("durations.json")
_LINE = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S.*?)\s*$")


def parse(log: str) -> dict[str, float]:
  """Seconds per test node id from pytest's ``--durations=0`` report."""
  seconds: dict[str, float] = defaultdict(float)
  for line in log.splitlines():
    m = _LINE.match(line)
    if m:
      seconds[m.group(3)] += float(m.group(1))
  return dict(seconds)


def choose_threshold(seconds: dict[str, float], budget_s: float, workers: int) -> float:
  """The largest per-test threshold whose inner loop fits ``budget_s`` on ``workers`` cores."""
  best = 0.0
  for t in sorted(set(seconds.values())):
    if sum(s for s in seconds.values() if s <= t) / workers > budget_s:
      break
    best = t
  return best


def slow_ids(seconds: dict[str, float], threshold: float) -> set[str]:
  """Tests above ``threshold``, except the quickest test of each file."""
  by_file: dict[str, list[str]] = defaultdict(list)
  for node in seconds:
    by_file[node.split("::")[0]].append(node)
  keep = {min(nodes, key=seconds.__getitem__) for nodes in by_file.values()}
  return {n for n, s in seconds.items() if s > threshold and n not in keep}


def longest_first(items: list, seconds: dict[str, float], *, unknown_s: float = 1.0) -> list:
  """``items`` in decreasing measured duration: the order that lets 2 workers finish together.

  With pytest-xdist's ``worksteal`` scheduling the longest tests start first and the short
  ones fill the gaps at the end (longest-processing-time-first), instead of a 50 s test
  starting last on one worker while the other idles. The tests of a module with a
  module-scoped fixture stay together (in their order), ranked by their sum: spread out,
  each worker would set the fixture up again after every other module's test.
  """
  units: dict[str, list] = {}
  for item in items:
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    shared = any(d[-1].scope == "module" for d in defs.values() if d)
    key = item.nodeid.split("::")[0] if shared else item.nodeid
    units.setdefault(key, []).append(item)

  def cost(unit: list) -> float:
    return sum(seconds.get(i.nodeid, unknown_s) for i in unit)

  ranked = sorted(units.values(), key=cost, reverse=True)  # stable: ties keep file order
  return [item for unit in ranked for item in unit]


def load() -> tuple[dict[str, float], float]:
  """(seconds per node id, threshold); empty when the file is missing."""
  if not PATH.exists():
    return {}, float("inf")
  data = json.loads(PATH.read_text())
  return data["seconds"], data["threshold_s"]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("log", type=Path, help="output of pytest --durations=0")
  parser.add_argument("--budget-s", type=float, default=55.0, help="inner loop's wall time (s)")
  parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (cores)")
  args = parser.parse_args(argv)
  seconds = parse(args.log.read_text())
  if not seconds:
    parser.error(f"{args.log}: no durations found (run pytest with --durations=0)")
  threshold = choose_threshold(seconds, args.budget_s, args.workers)
  slow = slow_ids(seconds, threshold)
  data = {
    "threshold_s": threshold,
    "seconds": {k: round(v, 2) for k, v in sorted(seconds.items())},
  }
  PATH.write_text(json.dumps(data, indent=1) + "\n")
  fast = sum(v for k, v in seconds.items() if k not in slow)
  print(
    f"wrote {PATH}: {len(seconds)} tests, {len(slow)} slow (> {threshold:.2f} s); "
    f"inner loop {fast:.0f} s of {sum(seconds.values()):.0f} s measured"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
