"""Per-example orthogonal projections of several estimates in one jit do not hang (issue 24, item 4).

The program is ``tests/_lapack_hang.py`` (its docstring has the cause: jaxlib's batched CPU
LAPACK kernels deadlock XLA:CPU's thread pool when as many run at once as the pool has
threads). It runs in a subprocess with a timeout, so a hang fails the test instead of the
session. Before the fix it hung in every run, within its first two steps.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_lapack_hang.py")
ROOT = Path(__file__).resolve().parents[1]
# Import and compile take ~8 s on the 2-core machine (~25 s when it is shared); 30 steps
# of the compiled program well under a second. A hang never ends.
TIMEOUT_S = 120


@pytest.mark.slow
def test_concurrent_batched_eigh_of_activity_estimates_does_not_hang():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  try:
    run = subprocess.run(
      [sys.executable, str(SCRIPT), "30"],
      capture_output=True,
      text=True,
      timeout=TIMEOUT_S,
      env=env,
      cwd=ROOT,
    )
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
    pytest.fail(f"{SCRIPT.name} hung: no 'ok' within {TIMEOUT_S} s; its output:\n{out}")
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.strip().endswith("ok"), run.stdout
