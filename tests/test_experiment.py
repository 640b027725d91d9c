"""Tests of fwdgrad_jax.training.records: the shared timer, provenance, result files, the CLI helper.

The timer is tested on what it must get right whatever the machine: a variant that
really takes three times as long is measured so, calls are interleaved in shuffled
rounds, and setup work handed to ``args`` is not timed. Sleeps make the durations
known; their tolerances allow for the scheduler's overshoot (a few ms on a loaded box).
"""

import json
import subprocess
import time
from pathlib import Path

import pytest

from fwdgrad_jax.training import records


def _sleeper(seconds, calls=None, name=None):
  def fn(*args):
    if calls is not None:
      calls.append(name)
    time.sleep(seconds)

  return fn


def test_a_variant_three_times_slower_is_measured_three_times_slower():
  t = records.time_interleaved({"fast": _sleeper(0.01), "slow": _sleeper(0.03)}, rounds=7, seed=1)
  # Sleep overshoot adds ~0.1-2 ms to each call: at most ±20 % on the 10 ms one.
  assert t["slow"].median / t["fast"].median == pytest.approx(3.0, rel=0.2)
  assert t["fast"].median == pytest.approx(0.01, rel=0.5)
  assert len(t["fast"].times) == 7 and t["fast"].q25 <= t["fast"].median <= t["fast"].q75


def test_times_are_per_step():
  # One call runs 4 "steps" of 5 ms: 5 ms per step, not 20.
  t = records.time_interleaved({"loop": _sleeper(0.02)}, rounds=3, steps=4)
  assert t["loop"].median == pytest.approx(0.005, rel=0.5)
  assert t["loop"].as_dict(1e3)["median"] == pytest.approx(t["loop"].median * 1e3)


def test_rounds_interleave_every_variant_in_a_shuffled_order():
  calls = []
  names = ["a", "b", "c"]
  variants = {n: _sleeper(0, calls, n) for n in names}
  rounds = []
  records.time_interleaved(
    variants, rounds=12, warmup=2, seed=3, on_round=lambda r: rounds.append(r)
  )
  warm, timed = calls[: 2 * len(names)], calls[2 * len(names) :]
  assert sorted(warm) == sorted(names * 2)  # warmup: every variant, untimed
  assert rounds == list(range(12))
  orders = [tuple(timed[i : i + 3]) for i in range(0, len(timed), 3)]
  assert len(orders) == 12 and all(sorted(o) == names for o in orders)
  # Shuffled, not a fixed rotation: several distinct orders, no variant always first.
  assert len(set(orders)) >= 3 and len({o[0] for o in orders}) > 1
  # The order is fixed by the seed.
  again = []
  records.time_interleaved({n: _sleeper(0, again, n) for n in names}, rounds=12, warmup=2, seed=3)
  assert again == calls


def test_argument_setup_is_not_timed():
  # Copying donated state (here: a 50 ms setup) happens outside the timer.
  t = records.time_interleaved(
    {"f": _sleeper(0.005)}, rounds=3, args={"f": lambda: time.sleep(0.05) or ()}
  )
  assert t["f"].median < 0.03


def test_timer_rejects_bad_counts():
  with pytest.raises(ValueError, match="rounds"):
    records.time_interleaved({"f": _sleeper(0)}, rounds=0)
  with pytest.raises(ValueError, match="steps"):
    records.time_interleaved({"f": _sleeper(0)}, rounds=1, steps={"f": 0})


def _git(repo, *args):
  subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_git_revision_records_the_dirty_flag(tmp_path):
  _git(tmp_path, "init", "-q")
  _git(tmp_path, "config", "user.email", "t@example.com")
  _git(tmp_path, "config", "user.name", "t")
  (tmp_path / "a.py").write_text("x = 1\n")
  _git(tmp_path, "add", "a.py")
  _git(tmp_path, "commit", "-qm", "one")
  clean = records.git_revision(tmp_path)
  assert clean["dirty"] is False and len(clean["revision"]) == 40
  assert clean["short"] == clean["revision"][:10]
  (tmp_path / "untracked.txt").write_text("not part of the code\n")
  assert records.git_revision(tmp_path)["dirty"] is False
  (tmp_path / "a.py").write_text("x = 2\n")
  dirty = records.git_revision(tmp_path)
  assert dirty["dirty"] is True and dirty["revision"] == clean["revision"]
  outside = records.git_revision(tmp_path / "..")
  assert outside["revision"] is None or outside["revision"] != clean["revision"]


def test_provenance_names_the_command_code_and_machine():
  p = records.provenance(["--quick", "a b"], program="experiments/x.py", data="fashion_mnist")
  assert p["command"] == "python experiments/x.py --quick 'a b'"
  assert p["hardware"]["jax_version"] and p["hardware"]["platform"]
  assert p["hardware"]["usable_cores"] >= 1
  assert set(p["git"]) == {"revision", "short", "dirty"}
  assert p["date"].endswith("+00:00") and p["data"] == "fashion_mnist"


def test_write_json_adds_provenance_and_writes_plain_json(tmp_path):
  np = pytest.importorskip("numpy")
  payload = {"x": np.float32(1.5), "curve": np.arange(3), "bad": float("nan"), "n": {"k": [1]}}
  path = records.write_json(tmp_path / "sub" / "r.json", payload, provenance_record={"p": 1})
  text = path.read_text()
  assert json.loads(text) == {
    "x": 1.5,
    "curve": [0, 1, 2],
    "bad": None,
    "n": {"k": [1]},
    "provenance": {"p": 1},
  }
  assert '"curve": [0, 1, 2]' in text  # arrays of numbers on one line
  assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind
  assert "command" in records.read_json(records.write_json(tmp_path / "d.json", {}))["provenance"]


def test_fresh_dir_never_reuses_a_directory(tmp_path):
  a = records.fresh_dir(tmp_path, "script")
  b = records.fresh_dir(tmp_path, "script")
  assert a != b and a.is_dir() and b.is_dir() and a.parent == b.parent == tmp_path / "script"


def _toy_script(tmp_path):
  """run/report of a toy script, recording the calls."""
  calls = []

  def add_arguments(p):
    p.add_argument("--n", type=int, default=2)

  def run(args):
    calls.append(("run", args.out))
    return {"squares": [i * i for i in range(args.n)]}

  def report(result, out):
    calls.append(("report", out))
    path = Path(out) / "r.md"
    path.write_text(f"{sum(result['squares'])} {result['provenance']['command']}\n")
    return [path]

  return calls, dict(run=run, report=report, add_arguments=add_arguments)


def test_script_main_runs_writes_json_then_reports(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  calls, fns = _toy_script(tmp_path)
  main = lambda argv: records.script_main(
    tmp_path / "toy.py", result_file="toy.json", description="Toy.\n\n  usage", argv=argv, **fns
  )
  result = main(["--n", "4"])
  (kind, out), (kind2, out2) = calls
  assert (kind, kind2) == ("run", "report") and out == out2
  # The default output directory is fresh, under outputs/<script>/, never reused.
  assert out.parent == Path("outputs/toy") and out.is_dir()
  saved = json.loads((out / "toy.json").read_text())
  assert saved["squares"] == [0, 1, 4, 9] == result["squares"]
  assert saved["provenance"]["command"] == "python toy.py --n 4"
  assert (out / "r.md").read_text().startswith("14 ")
  main(["--n", "4"])
  assert calls[2][1] != out  # a second run gets its own directory
  assert "wrote" in capsys.readouterr().out


def test_script_main_report_only_does_not_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  calls, fns = _toy_script(tmp_path)
  main = lambda argv, **kw: records.script_main(
    tmp_path / "toy.py", result_file="toy.json", argv=argv, **fns, **kw
  )
  main(["--n", "3", "--out", "first"])
  calls.clear()
  result = main(["--report-only", "first/toy.json", "--out", "again"])
  assert calls == [("report", Path("again"))]
  assert result["squares"] == [0, 1, 4] and (tmp_path / "again" / "r.md").exists()
  with pytest.raises(SystemExit):  # several files need the script's merge
    main(["--report-only", "first/toy.json", "first/toy.json"])
  merged = main(
    ["--report-only", "first/toy.json", "first/toy.json", "--out", "m"],
    merge=lambda rs: {
      "squares": sum((r["squares"] for r in rs), []),
      "provenance": rs[0]["provenance"],
    },
  )
  assert merged["squares"] == [0, 1, 4, 0, 1, 4]
  # the merged result is written too, so a later --report-only of it needs no merge
  assert json.loads((tmp_path / "m" / "toy.json").read_text())["squares"] == merged["squares"]


def test_command_line_is_what_a_user_types(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  script = tmp_path / "experiments" / "x.py"
  assert records.command_line(script, ["-m", "a=[1,2]", 3]) == (
    "python experiments/x.py -m 'a=[1,2]' 3"
  )
