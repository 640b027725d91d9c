"""What users and clusters do to a run directory (the third probe round): each test is one
finding's recipe, on the tiny data set of conftest.py and a small MLP.

Nothing done to a run directory may mix two runs in one metrics file, lose records without
a line saying so, or end in a traceback where one line would do.
"""

import errno
import logging
import os
import signal
import time
from pathlib import Path

import pytest
from test_train import (
  _app_overrides,
  _cfg,
  _ckpt_steps,
  _records,
  _snapshot,
  _summary,
  app_here,  # noqa: F401  (the fixture: the Hydra app in this process)
)

from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import run as run_lib
from fwdgrad_jax.training import rundir


def _quiet(data_dir, **train):
  """A config without evaluations or gradient checks: the fastest run."""
  return _cfg(data_dir, train={"eval_every": 0, "grad_check_every": 0, **train})


# ---- 1. config.json damaged or missing ------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_checkpoints_without_a_readable_config_are_refused_and_kept(tiny_data, tmp_path, damage):
  data_dir, ds = tiny_data
  run_lib.train(_quiet(data_dir, steps=10), tmp_path, dataset=ds)
  config = tmp_path / "config.json"
  if damage == "truncated":
    config.write_text(config.read_text()[:200])
  else:
    config.unlink()
  before = _snapshot(tmp_path)
  changed = _quiet(data_dir, steps=20)
  changed.optimizer.lr = 0.5
  changed.model = config_lib.ModelConfig(name="logreg")
  with pytest.raises(config_lib.ConfigError) as err:
    run_lib.train(changed, tmp_path, dataset=ds)
  message = str(err.value)
  assert message.startswith(f"{config}: ") and "\n" not in message
  assert "step 10" in message and "new run directory" in message
  # Refused before anything was read or moved: the valid checkpoint stays where it is.
  assert _snapshot(tmp_path) == before
  assert not (tmp_path / rundir.UNREADABLE_NAME).exists()


def test_a_checkpoints_file_is_refused_before_the_run(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(rundir.RunDirError, match=f"^{tmp_path / 'checkpoints'}: not a directory"):
    run_lib.train(_quiet(data_dir, steps=10), tmp_path, dataset=ds)
  assert not (tmp_path / "metrics.jsonl").exists()


def test_lowering_train_steps_below_the_checkpoint_is_refused(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  run_lib.train(_quiet(data_dir, steps=20), tmp_path, dataset=ds)
  before = _snapshot(tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r"^train\.steps=10: .* already at step 20"):
    run_lib.train(_quiet(data_dir, steps=10), tmp_path, dataset=ds)
  assert _snapshot(tmp_path) == before


def test_a_scheduled_run_is_not_extended_but_resumes_at_its_steps(tiny_data, tmp_path):
  # A cosine schedule is laid out over train.steps: extending the run would change the lr
  # of steps already taken; the same train.steps resumes.
  data_dir, ds = tiny_data
  cfg = _quiet(data_dir, steps=20)
  cfg.optimizer.schedule = "cosine"
  run_lib.train(cfg, tmp_path, dataset=ds)
  before = _snapshot(tmp_path)
  longer = _quiet(data_dir, steps=40)
  longer.optimizer.schedule = "cosine"
  with pytest.raises(config_lib.ConfigError, match=r"^train\.steps: 40 differs from 20 .*cosine"):
    run_lib.train(longer, tmp_path, dataset=ds)
  assert _snapshot(tmp_path) == before
  assert run_lib.train(cfg, tmp_path, dataset=ds)["steps"] == 20


# ---- 2. new intervals on resume ---------------------------------------------------------


def test_new_intervals_on_resume_land_on_their_multiples(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  run_lib.train(_quiet(data_dir, steps=30), tmp_path, dataset=ds)  # stopped at 30
  resumed = _quiet(data_dir, steps=100, log_every=25, eval_every=50, checkpoint_every=25)
  run_lib.train(resumed, tmp_path, dataset=ds)
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [10, 20, 30, 50, 75, 100]
  assert [r["step"] for r in records if "val_loss" in r] == [50, 100]
  assert _ckpt_steps(tmp_path) == [75, 100]  # the two newest kept


# ---- 4. a full disk while writing metrics.jsonl ---------------------------------------


def test_disk_full_in_metrics_stops_in_one_line_without_a_torn_line(
  tiny_data, tmp_path, monkeypatch
):
  data_dir, ds = tiny_data
  write = os.write
  metrics = tmp_path / "metrics.jsonl"
  calls = []

  def fill_up(fd, data):
    # Half of the record of step 30 fits, then the disk is full.
    if calls or (b'"step": 30' in data and os.fstat(fd).st_ino == metrics.stat().st_ino):
      calls.append(data)
      if len(calls) == 1:
        return write(fd, data[: len(data) // 2])
      raise OSError(errno.ENOSPC, "No space left on device")
    return write(fd, data)

  monkeypatch.setattr(rundir.os, "write", fill_up)
  with pytest.raises(rundir.RunDirError) as err:
    run_lib.train(_quiet(data_dir, steps=50), tmp_path, dataset=ds)
  monkeypatch.undo()
  message = str(err.value)
  assert message.startswith(f"{metrics}: writing the record of step 30 failed (disk full")
  assert "\n" not in message
  assert metrics.read_text().endswith("}\n")  # no torn line
  assert [r["step"] for r in _records(tmp_path)] == [10, 20]
  summary = _summary(tmp_path)
  assert summary["error"] == message and summary["steps"] == 30


def test_a_failing_save_says_disk_full_from_tensorstores_words(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  def full(*args, **kwargs):
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:  # TensorStore wraps it in a ValueError
      raise ValueError("Error writing local file: [OS error: No space left on device]") from e

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  ckpts = rundir.Checkpoints(tmp_path)
  with pytest.raises(rundir.RunDirError, match=r"\(disk full: No space left on device\)"):
    ckpts.save(1, {"w": 1})
  ckpts.close()


# ---- 5. rerunning a finished run ----------------------------------------------------------


def test_rerunning_a_finished_run_keeps_its_timings(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  first = run_lib.train(_quiet(data_dir, steps=10), tmp_path, dataset=ds)
  again = run_lib.train(_quiet(data_dir, steps=10), tmp_path, dataset=ds)
  for key in ("step_time_ms", "base_time_ms", "runtime_ratio"):
    assert again[key] == first[key] is not None, key
  assert _summary(tmp_path)["step_time_ms"] == first["step_time_ms"]


# ---- 6. a metrics line that is JSON but not a record -------------------------------------


def test_a_json_line_that_is_not_a_record_is_dropped_with_a_note(tiny_data, tmp_path, caplog):
  data_dir, ds = tiny_data
  run_lib.train(_quiet(data_dir, steps=20), tmp_path, dataset=ds)
  metrics = tmp_path / "metrics.jsonl"
  lines = metrics.read_text().splitlines(keepends=True)
  metrics.write_text("".join([lines[0], "[1, 2]\n", "3\n", *lines[1:]]))
  with caplog.at_level(logging.WARNING):
    summary = run_lib.train(_quiet(data_dir, steps=30), tmp_path, dataset=ds)
  assert summary["steps"] == 30
  assert [r["step"] for r in _records(tmp_path)] == [10, 20, 30]
  notes = [r.message for r in caplog.records if "not a record" in r.message]
  assert len(notes) == 2 and str(metrics) in notes[0] and "line 2" in notes[0]


# ---- 8. the lock or the metrics file replaced under a run ---------------------------------


@pytest.mark.parametrize("victim", [rundir.LOCK_NAME, rundir.METRICS_NAME])
def test_a_run_whose_lock_or_metrics_is_replaced_stops_saying_so(
  tiny_data, tmp_path, monkeypatch, victim
):
  data_dir, ds = tiny_data
  write = rundir.MetricsLog.write
  path = tmp_path / victim

  def write_then_replace(self, record):
    write(self, record)
    if record["step"] == 20:
      # `rm` and a second run: a new file at the path, which this run must leave alone.
      path.unlink()
      path.write_text("pid 1 on another-run\n")

  monkeypatch.setattr(rundir.MetricsLog, "write", write_then_replace)
  with pytest.raises(rundir.RunDirLost) as err:
    run_lib.train(_quiet(data_dir, steps=100, checkpoint_every=10), tmp_path, dataset=ds)
  message = str(err.value)
  assert message.startswith(f"{path}: removed or replaced") and "\n" not in message
  # It wrote nothing more: no record, checkpoint or summary after step 20, and the other
  # run's file is untouched.
  assert path.read_text() == "pid 1 on another-run\n"
  assert not (tmp_path / "summary.json").exists()
  # The lock is checked before each save too: none after it was replaced.
  assert _ckpt_steps(tmp_path) == ([10] if victim == rundir.LOCK_NAME else [10, 20])
  if victim == rundir.LOCK_NAME:
    assert [r["step"] for r in _records(tmp_path)] == [10, 20]


# ---- minor: values that cannot run, signals ------------------------------------------------


def test_tangents_that_cannot_fit_are_refused_before_compiling(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  cfg = _quiet(data_dir, steps=10)
  cfg.estimator.num_tangents = 10**9
  t0 = time.perf_counter()
  with pytest.raises(config_lib.ConfigError, match=r"^estimator\.num_tangents=1000000000: "):
    run_lib.train(cfg, tmp_path, dataset=ds)
  assert time.perf_counter() - t0 < 10
  assert not (tmp_path / "config.json").exists()


def test_a_zero_width_is_a_bad_model_option(tiny_data, tmp_path):
  data_dir, ds = tiny_data
  cfg = _quiet(data_dir, steps=10)
  cfg.model.options = {"hidden": [0]}
  with pytest.raises(config_lib.ConfigError, match=r"^model\.options: mlp\(hidden=\[0\]\)"):
    run_lib.train(cfg, tmp_path, dataset=ds)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1])
def test_sighup_and_sigusr1_stop_like_sigterm(tiny_data, tmp_path, monkeypatch, sig):
  data_dir, ds = tiny_data
  write = rundir.MetricsLog.write

  def write_then_signal(self, record):
    write(self, record)
    if record["step"] == 20:
      os.kill(os.getpid(), sig)

  monkeypatch.setattr(rundir.MetricsLog, "write", write_then_signal)
  summary = run_lib.train(_quiet(data_dir, steps=10_000), tmp_path, dataset=ds)
  assert summary["interrupted_by"] == signal.Signals(sig).name and summary["steps"] == 20
  assert _ckpt_steps(tmp_path) == [20]


def test_a_second_signal_stops_at_once_in_one_line():
  with run_lib._Interrupts() as interrupts:
    os.kill(os.getpid(), signal.SIGTERM)
    assert interrupts.signum == signal.SIGTERM
    with pytest.raises(run_lib.StoppedAtOnce) as err:
      os.kill(os.getpid(), signal.SIGTERM)
  assert err.value.signum == signal.SIGTERM
  assert str(err.value).startswith("SIGTERM again: stopped at once") and "\n" not in str(err.value)


# ---- 3. a sweep goes on past a refused job --------------------------------------------


def test_a_refused_job_does_not_stop_the_sweep(tiny_data, tmp_path, request):
  # The app in this process (test_train.py runs it in a process of its own once).
  data_dir, _ = tiny_data
  sweep = tmp_path / "sweep"
  base = [o for o in _app_overrides(data_dir) if not o.startswith("train.eval_every")]
  out = request.getfixturevalue("app_here")(
    "-m",
    *base,
    "train.eval_every=0",
    "optimizer.lr=1e-4,-1,1e-3",
    f"hydra.sweep.dir={sweep}",
    cwd=tmp_path,
  )
  assert out.returncode == 2, out.stderr[-3000:]
  assert [_summary(sweep / str(i))["lr"] for i in (0, 2)] == [1e-4, 1e-3]
  assert not (Path(sweep / "1") / "summary.json").exists()
  errors = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(errors) == 1 and "Traceback" not in out.stderr
  assert errors[0].startswith(f"error: job 1 in {sweep / '1'}: optimizer.lr=-1.0: must be")
  assert "job 1" in (sweep / "1" / "train.log").read_text()


def test_tensorboard_on_a_full_disk_neither_blocks_nor_raises(tmp_path, monkeypatch, caplog):
  tensorboardX = pytest.importorskip("tensorboardX")
  log = rundir.MetricsLog(tmp_path, resume_step=0)
  assert log._tb is not None
  with caplog.at_level(logging.WARNING):
    # Its writer thread died on ENOSPC: the run goes on without TensorBoard, saying so.
    monkeypatch.setattr(rundir, "_tensorboard_alive", lambda writer: False)
    log.write({"step": 1, "train_loss": 1.0})
    assert log._tb is None
    log.write({"step": 2, "train_loss": 1.0})
  assert [r["step"] for r in rundir.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
  assert any("TensorBoard's writer stopped" in r.message for r in caplog.records)
  log.close()

  def full(self):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(tensorboardX.SummaryWriter, "close", full)
  (tmp_path / "other").mkdir()
  other = rundir.MetricsLog(tmp_path / "other", resume_step=0)
  with caplog.at_level(logging.WARNING):
    other.close()  # the final flush fails: one line, no exception
  assert any("TensorBoard events were not written" in r.message for r in caplog.records)


@pytest.mark.parametrize("key", ["run", "sweep"])
def test_two_launches_in_the_same_second_get_their_own_run_directories(key):
  # The default run directory is a time stamp: to the second, two runs started together
  # shared one directory and the second was refused (rc 2). Format the configured pattern
  # at two instants 1 ms apart in the same second, as Hydra's ${now:...} resolver does.
  import datetime
  import re

  from omegaconf import OmegaConf
  from test_train import CONFIG_DIR

  pattern = OmegaConf.load(CONFIG_DIR / "config.yaml").hydra[key]._get_node("dir")._value()
  stamps = re.findall(r"\$\{now:([^}]*)\}", pattern)
  assert stamps, pattern
  t0 = datetime.datetime(2026, 12, 6, 9, 30, 0, 1000)
  t1 = t0 + datetime.timedelta(milliseconds=1)
  assert [t0.strftime(s) for s in stamps] != [t1.strftime(s) for s in stamps]
