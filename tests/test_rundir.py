"""Tests of fwdgrad_jax.training.rundir: the lock, robust checkpoints and metrics.jsonl."""

import errno
import json
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fwdgrad_jax.training import rundir

# -- lock -----------------------------------------------------------------------------


def test_lock_refuses_a_second_holder_naming_the_directory(tmp_path):
  run = tmp_path / "run"
  with rundir.lock(run):
    assert (run / rundir.LOCK_NAME).is_file()
    with pytest.raises(rundir.RunDirLocked) as err, rundir.lock(run):
      pass
    message = str(err.value)
    assert str(run) in message and "\n" not in message
  # Released on exit: the file is gone and the directory can be taken again.
  assert not (run / rundir.LOCK_NAME).exists()
  with rundir.lock(run):
    pass


def test_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  run = tmp_path / "run"
  holder = (
    "import os, sys, time; from fwdgrad_jax import rundir\n"
    "with rundir.lock(sys.argv[1]):\n"
    "  print('locked', flush=True); time.sleep(600)\n"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", holder, str(run)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(rundir.RunDirLocked, match=f"pid {proc.pid}"), rundir.lock(run):
      pass
  finally:
    proc.kill()  # like kill -9: no cleanup, the lock file stays behind
    proc.wait()
  assert f"pid {proc.pid}" in (run / rundir.LOCK_NAME).read_text()
  with caplog.at_level(logging.WARNING), rundir.lock(run):
    pass
  assert any("took over" in r.message and str(proc.pid) in r.message for r in caplog.records)


def test_lock_on_an_unwritable_path_names_it(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(rundir.RunDirError, match=str(blocker)), rundir.lock(blocker / "run"):
    pass


# -- checkpoints ----------------------------------------------------------------------


def _state(value):
  return {"w": jnp.full((3, 4), value, jnp.float32), "step": jnp.int32(value)}


def _saved(tmp_path, steps):
  ckpts = rundir.Checkpoints(tmp_path, max_to_keep=5)
  for s in steps:
    ckpts.save(s, _state(s))
  ckpts.close()


# orbax leaves the coroutines of a failed restore to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_skips_damaged_steps_and_moves_them_aside(tmp_path, caplog):
  _saved(tmp_path, [10, 20])
  files = [p for p in (tmp_path / "checkpoints" / "20").rglob("*") if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:10])  # truncated
  (tmp_path / "checkpoints" / "30").mkdir()  # an empty step directory
  ckpts = rundir.Checkpoints(tmp_path)
  with caplog.at_level(logging.WARNING):
    state, step = ckpts.restore(_state(0))
  assert step == 10 and int(state["step"]) == 10
  np.testing.assert_array_equal(state["w"], np.full((3, 4), 10.0))
  skipped = [r.message for r in caplog.records if "skipped" in r.message]
  assert len(skipped) == 2 and "/30:" in skipped[0] and "/20:" in skipped[1]
  assert all("\n" not in m for m in skipped)
  assert sorted(p.name for p in (tmp_path / rundir.UNREADABLE_NAME).iterdir()) == ["20", "30"]
  # The steps are free again: a resumed run saves them.
  ckpts.save(20, _state(20))
  assert ckpts.steps() == [10, 20]
  ckpts.close()


def test_no_readable_checkpoint_fails_in_one_line(tmp_path):
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  ckpts = rundir.Checkpoints(tmp_path)
  with pytest.raises(rundir.RunDirError) as err:
    ckpts.restore(_state(0))
  assert str(tmp_path / "checkpoints") in str(err.value) and "\n" not in str(err.value)


def test_no_checkpoint_restores_nothing(tmp_path):
  assert rundir.Checkpoints(tmp_path).restore(_state(0)) == (None, None)


def test_a_failing_save_names_the_directory(tmp_path, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  ckpts = rundir.Checkpoints(tmp_path)
  with pytest.raises(rundir.RunDirError) as err:
    ckpts.save(1, _state(1))
  message = str(err.value)
  assert str(tmp_path / "checkpoints") in message and "disk full" in message
  assert "\n" not in message


# -- metrics.jsonl --------------------------------------------------------------------


def _write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines))


def test_resume_keeps_exactly_the_records_up_to_the_restored_step(tmp_path):
  # Two writers' worth of damage: duplicates and out-of-order steps past the checkpoint.
  steps = [10, 20, 30, 20, 30, 40, 50, 40]
  _write_lines(tmp_path / "metrics.jsonl", [json.dumps({"step": s}) for s in steps])
  log = rundir.MetricsLog(tmp_path, resume_step=30)
  log.write({"step": 40})
  log.close()
  got = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert got == [10, 20, 30, 40]


def test_a_half_written_last_line_is_dropped_with_a_note(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 10}\n{"step": 20}\n{"step": 3')
  with caplog.at_level(logging.WARNING):
    log = rundir.MetricsLog(tmp_path, resume_step=20)
  log.close()
  assert [r["step"] for r in log.records] == [10, 20]
  notes = [r.message for r in caplog.records]
  assert len(notes) == 1 and "half-written last line" in notes[0] and str(path) in notes[0]
  assert rundir.read_metrics(path) == [{"step": 10}, {"step": 20}]


def test_a_fresh_run_starts_an_empty_log(tmp_path):
  _write_lines(tmp_path / "metrics.jsonl", ['{"step": 10}'])
  rundir.MetricsLog(tmp_path, resume_step=0).close()
  assert (tmp_path / "metrics.jsonl").read_text() == ""


# -- config comparison and JSON files -------------------------------------------------


def test_changed_key_names_the_leaf():
  old = {"optimizer": {"lr": 0.1, "name": "sgd"}, "model": {"options": {"hidden": [32]}}}
  new = {"optimizer": {"lr": 0.5, "name": "sgd"}, "model": {"options": {"hidden": [32]}}}
  assert rundir.changed_key(old, new, set()) == ("optimizer.lr", 0.1, 0.5)
  assert rundir.changed_key(old, new, {"optimizer.lr"}) is None
  wider = {**new, "model": {"options": {"hidden": [64]}}}
  assert rundir.changed_key(new, wider, set())[0] == "model.options.hidden"


def test_a_key_an_older_run_did_not_record_counts_as_its_default():
  # A run directory written before optimizer.schedule existed resumes with the default,
  # and is refused with a non-default value naming the key.
  old = {"optimizer": {"lr": 0.1}}
  defaults = {"optimizer": {"lr": 1e-4, "schedule": "constant"}}
  same = {"optimizer": {"lr": 0.1, "schedule": "constant"}}
  assert rundir.changed_key(old, same, set()) == ("optimizer.schedule", None, "constant")
  assert rundir.changed_key(old, same, set(), defaults) is None
  other = {"optimizer": {"lr": 0.1, "schedule": "cosine"}}
  assert rundir.changed_key(old, other, set(), defaults) == (
    "optimizer.schedule",
    "constant",
    "cosine",
  )


def test_write_json_is_atomic_and_names_the_path_on_failure(tmp_path):
  path = tmp_path / "summary.json"
  rundir.write_json(path, {"a": 1})
  assert rundir.read_json(path) == {"a": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
  with pytest.raises(rundir.RunDirError, match=str(tmp_path / "missing")):
    rundir.write_json(tmp_path / "missing" / "x.json", {})


def test_checkpoints_hold_typed_keys_and_empty_states(tmp_path):
  state = {"key": jax.random.key(3), "empty": {}, "w": jnp.ones(2)}
  ckpts = rundir.Checkpoints(tmp_path)
  ckpts.save(1, state)
  restored, step = ckpts.restore(state)
  ckpts.close()
  assert step == 1
  np.testing.assert_array_equal(
    jax.random.key_data(restored["key"]), jax.random.key_data(state["key"])
  )
