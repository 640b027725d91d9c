"""The inner loop's split (tests/_durations.py): measured durations -> slow markers."""

import _durations

LOG = """
============================= slowest durations ==============================
12.00s call     tests/test_a.py::test_big[x-1]
3.00s setup    tests/test_a.py::test_big[x-1]
1.00s call     tests/test_a.py::test_small
20.00s call     tests/test_b.py::test_only
0.50s call     tests/test_b.py::test_tiny
(3 durations < 0.005s hidden.)
"""


def test_parse_sums_setup_call_and_teardown_per_test():
  seconds = _durations.parse(LOG)
  assert seconds == {
    "tests/test_a.py::test_big[x-1]": 15.0,
    "tests/test_a.py::test_small": 1.0,
    "tests/test_b.py::test_only": 20.0,
    "tests/test_b.py::test_tiny": 0.5,
  }


def test_the_threshold_fits_the_budget_and_every_file_keeps_a_test():
  seconds = _durations.parse(LOG)
  # 2 workers, 1 s of wall time: 0.5 + 1.0 = 1.5 s of work fits, 16.5 s does not.
  threshold = _durations.choose_threshold(seconds, budget_s=1.0, workers=2)
  assert threshold == 1.0
  slow = _durations.slow_ids(seconds, threshold)
  assert slow == {"tests/test_a.py::test_big[x-1]", "tests/test_b.py::test_only"}
  # A file whose every test is over the threshold keeps its quickest one.
  only_big = {"tests/test_c.py::test_1": 9.0, "tests/test_c.py::test_2": 8.0}
  assert _durations.slow_ids(only_big, 1.0) == {"tests/test_c.py::test_1"}


class _Def:
  def __init__(self, scope):
    self.scope = scope


class _Info:
  def __init__(self, scopes):
    self.name2fixturedefs = {f"f{i}": [_Def(s)] for i, s in enumerate(scopes)}


class _Item:
  def __init__(self, nodeid, *scopes):
    self.nodeid = nodeid
    self._fixtureinfo = _Info(scopes)


def test_longest_first_keeps_a_module_fixtures_tests_together():
  seconds = _durations.parse(LOG)
  items = [
    _Item("tests/test_a.py::test_big[x-1]"),
    _Item("tests/test_a.py::test_small"),
    _Item("tests/test_b.py::test_only", "function"),
    _Item("tests/test_b.py::test_tiny"),
    _Item("tests/test_c.py::test_one", "module"),  # unmeasured: 1 s each, 2 s together
    _Item("tests/test_c.py::test_two", "module"),
    _Item("tests/test_d.py::test_new"),  # unmeasured: 1 s
  ]
  order = [i.nodeid for i in _durations.longest_first(items, seconds)]
  assert order == [
    "tests/test_b.py::test_only",
    "tests/test_a.py::test_big[x-1]",
    "tests/test_c.py::test_one",
    "tests/test_c.py::test_two",
    "tests/test_a.py::test_small",
    "tests/test_d.py::test_new",
    "tests/test_b.py::test_tiny",
  ]
