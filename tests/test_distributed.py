"""Multi-process training on one machine: two processes on 127.0.0.1 form one mesh.

Each process is tests/_distributed_worker.py with 2 CPU devices; they join through
``jax.distributed`` (the run's ``mesh.coordinator_address``, ``mesh.num_processes``,
``mesh.process_id``; CPU collectives over gloo) into a ``mesh.data=4`` mesh. The same
run in one process with 4 devices is the reference: the mesh is the same, so are the
batches and the tangents, and the losses agree to float32 rounding. The two-process run
is killed (SIGKILL, both processes, right after the checkpoint of step 4) and rerun: it
resumes from that checkpoint, and only process 0 wrote the metrics.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_distributed_worker.py"
TIMEOUT_S = 300  # per launch: a hung coordinator must not hang the suite
# float32 sums over devices in another order (one process vs two): a few ulps per step.
RTOL = 2e-5


def _env():
  path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
  return {**os.environ, "PYTHONPATH": path, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(run_dir: Path, processes: int, *extra: str) -> list[subprocess.CompletedProcess]:
  """Starts the processes of one run together and waits for all of them."""
  port = _free_port()
  devices = 4 // processes
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(WORKER),
        str(run_dir),
        "--devices",
        str(devices),
        "--processes",
        str(processes),
        "--process-id",
        str(i),
        "--port",
        str(port),
        *extra,
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=_env(),
    )  # fmt: skip
    for i in range(processes)
  ]
  done = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=TIMEOUT_S)
      done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return done


def _summary(proc: subprocess.CompletedProcess) -> dict:
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_losses(run_dir: Path) -> tuple[list[int], list[float]]:
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in records], [r["train_loss"] for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("distributed")
  one = _launch(base / "one", 1)
  killed = _launch(base / "two", 2, "--kill-at", "4")
  resumed = _launch(base / "two", 2)
  return {"base": base, "one": one, "killed": killed, "resumed": resumed}


def test_two_processes_give_the_one_process_losses_and_resume_after_a_kill(runs):
  base = runs["base"]
  ref = _summary(runs["one"][0])
  assert (ref["processes"], ref["devices"]) == (1, 4)
  # Both processes were killed at the checkpoint of step 4 (SIGKILL: -9), not earlier.
  assert [p.returncode for p in runs["killed"]] == [-9, -9], [
    p.stderr[-2000:] for p in runs["killed"]
  ]
  got = [_summary(p) for p in runs["resumed"]]
  assert [(g["process"], g["processes"], g["devices"]) for g in got] == [(0, 2, 4), (1, 2, 4)]
  # The rerun resumed: it ran steps 5-8 only, on top of the checkpoint of step 4.
  log = runs["resumed"][0].stderr
  assert "resuming from step 4" in log, log[-3000:]
  steps_one, losses_one = _train_losses(base / "one")
  steps_two, losses_two = _train_losses(base / "two")
  # One record per step: process 1 wrote none (two writers would duplicate them).
  assert steps_one == steps_two == [2, 4, 6, 8]
  np.testing.assert_allclose(losses_two, losses_one, rtol=RTOL)
  for key in ("val_loss", "test_loss"):
    np.testing.assert_allclose([g[key] for g in got], [ref[key]] * 2, rtol=RTOL)
  assert len(set(np.round(losses_one, 4))) == len(losses_one)  # the run moved
  # Both processes saved the checkpoints into the one directory (orbax, collectively).
  assert sorted(int(p.name) for p in (base / "two" / "checkpoints").iterdir()) == [6, 8]


def test_only_process_0_logs(runs):
  zero, one = (p.stderr for p in runs["resumed"])
  assert "resuming from step 4" in zero
  assert "resuming from step" not in one
