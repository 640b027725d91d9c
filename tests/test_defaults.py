"""What a new user gets without choosing anything (issue 24.5): the app's default learning
rates train, the ``[tensorboard]`` extra installs the viewer the README runs, and the
notebooks are committed with their outputs (a reader on a code host sees the plots)."""

import json
import re
import tomllib
from pathlib import Path

import pytest

from fwdgrad_jax.training import config as config_lib
from fwdgrad_jax.training import run as run_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adam"])
def test_the_default_learning_rates_train(optimizer, tiny_data, tmp_path):
  # The default estimator (forward, k = 1, rescaled) and model at the optimizer's default
  # lr, only the data and the budget set: the validation accuracy must be clearly above
  # chance (0.1 on 10 classes; with 64 validation examples its standard error is 0.0375,
  # so 0.3 is 5 standard errors above). lr 1e-4 (the old default) stays at chance.
  data_dir, ds = tiny_data
  cfg = config_lib.compose(
    [
      f"optimizer={optimizer}",
      f"data.data_dir={data_dir}",
      "data.val_size=64",
      "train.steps=200",
      "train.batch_size=16",
      "train.log_every=50",
      "train.eval_every=200",
      "train.progress=false",
      "train.checkpoint_every=0",
    ],
    config_dir=CONFIG_DIR,
  )
  summary = run_lib.train(cfg, tmp_path / "run", dataset=ds)
  assert not summary["diverged"]
  assert summary["val_accuracy"] > 0.3, summary["val_accuracy"]


def test_the_tensorboard_extra_installs_the_viewer():
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  names = {re.split(r"[<>=\[ ;]", d)[0].lower() for d in extras["tensorboard"]}
  assert {"tensorboardx", "tensorboard"} <= names


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_with_outputs_and_stay_small(path):
  nb = json.loads(path.read_text())
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code and all(c.get("execution_count") for c in code), "run every cell before committing"
  pngs = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert pngs, "a notebook shows at least one plot"
  assert path.stat().st_size < 300_000, "keep the outputs small (reduced sizes, modest PNGs)"
