"""Every experiment script runs its ``--quick`` smoke test in-process and writes its result.

The scripts are found, not listed: every module below ``experiments/<folder>/`` with a
``main(argv)`` (the shared command line, :func:`experiments._lib.script.main`). Each runs
as ``main(["--quick", "--out", tmp])`` in this process (one jax import for all) and must
write its result JSON (with the recorded command) and a report.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

#: Scripts whose quick run takes more than ~10 s of work on 2 cores with a cold compile
#: cache, with the reason (run them with ``-m slow``). A quick run is mostly compiles: each
#: script's ``--quick`` compiles as few programs as go through all of its code.
SLOW = {
  "experiments.baydin2022.fair": "tunes both methods: four runs of the app (in process)",
  "experiments.baydin2022.training": "trains three models with both methods on Fashion-MNIST",
  "experiments.benchmarks.communication": "compiles 3 steps for 2 devices in a subprocess",
  "experiments.benchmarks.gpu_check": "compiles and times 3 loops, then trains a demo row",
  "experiments.flugel2024.fig6": "3 compiled, vmapped training runs",
  "experiments.flugel2024.lr_transfer": "3 lr searches, each a compiled, vmapped training run",
  "experiments.flugel2024.table45": "compiles 3 ViT steps",
  "experiments.fournier2023.local_guess": "compiles a LocalMixer's step, 2 gradients, an estimator",
  "experiments.perturbation.benchmark": "compiles and times 3 loops, then a cosine",
  "experiments.repro.explosions": "two runs of the app (in process), on the real data",
  "experiments.repro.fair": "tunes both methods: four runs of the app (in process), real data",
  "experiments.repro.table1": "trains two Table I rows through the app, on the real data",
  "experiments.ren2023.table": "a run of the app with gradient checks (in process)",
  "experiments.yao.guided": "a compiled SGD scan per method and guided shuffle ratio (3)",
  "experiments.yao.time": "compiles the app's training loop for 3 methods and times it",
}
#: Scripts whose --quick run (or a smaller one, on the tiny data set) a dedicated test makes
#: and checks in more detail: run once, there.
COVERED = {
  "experiments.baydin2022.fair": "tests/test_baydin2022_training.py",
  "experiments.baydin2022.training": "tests/test_baydin2022_training.py",
  "experiments.baydin2022.scaling": "tests/test_benchmark.py (test_scaling_quick_writes_its_files)",
  "experiments.baydin2022.fig1": "tests/test_experiments_fig.py (--quick is the same run)",
  "experiments.baydin2022.fig2": "tests/test_experiments_fig.py",
  "experiments.benchmarks.benchmark": "tests/test_benchmark.py (test_cli_writes_json_with_provenance_and_md)",
  "experiments.repro.fair": "tests/test_repro.py",
  "experiments.repro.explosions": "tests/test_repro.py",
  "experiments.repro.table1": "tests/test_repro.py",
}
#: Scripts that need what a test machine may not have.
NEEDS = {
  "experiments.benchmarks.peer": "a Python with torch ($FWDGRAD_PEER_PYTHON) for the peer",
}


def _scripts() -> list[str]:
  out = []
  for path in sorted(EXPERIMENTS.glob("*/*.py")):
    if path.parent.name.startswith("_") or path.stem in ("__init__", "lib"):
      continue
    if "def main(" in path.read_text():
      out.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
  return out


SCRIPTS = _scripts()


def _param(name: str):
  marks = []
  if name in SLOW:
    marks.append(pytest.mark.slow)
  if name in NEEDS:
    marks.append(pytest.mark.skip(reason=NEEDS[name]))
  if name in COVERED:
    marks.append(pytest.mark.skip(reason=f"its quick run is tested in {COVERED[name]}"))
  return pytest.param(name, marks=marks, id=name.removeprefix("experiments."))


def test_the_scripts_are_found():
  assert len(SCRIPTS) >= 20 and "experiments.flugel2024.fig4" in SCRIPTS
  assert set(SLOW) | set(NEEDS) | set(COVERED) <= set(SCRIPTS)


@pytest.fixture(scope="module")
def shared_data():
  """``fwdgrad_jax.data.load`` returning one Dataset per arguments to all the scripts.

  The Dataset is immutable (jax arrays); loading Fashion-MNIST again took seconds per script.
  """
  from fwdgrad_jax import data

  loaded = {}
  load = data.load

  def shared(name, **kwargs):
    key = (name, *sorted(kwargs.items()))
    if key not in loaded:
      loaded[key] = load(name, **kwargs)
    return loaded[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(data, "load", shared)
    yield


@pytest.mark.parametrize("name", [_param(n) for n in SCRIPTS])
def test_quick_run_writes_its_result(name, tmp_path, capsys, shared_data):
  module = importlib.import_module(name)
  result = module.main(["--quick", "--out", str(tmp_path)])
  assert isinstance(result, dict) and result["provenance"]["command"].startswith(
    f"python -m {name} --quick"
  )
  written = [p for p in tmp_path.rglob("*.json") if p.parent == tmp_path]
  assert written, f"{name} wrote no result JSON under --out"
  assert any(json.loads(p.read_text()).get("provenance") for p in written)
  assert list(tmp_path.glob("*.md")) or list(tmp_path.glob("*.png")), "no report written"
