"""Tests of fwdgrad_jax.training.plot: run directories and sweeps drawn into one PNG."""

import json

import pytest

from fwdgrad_jax.training import plot


def _run(path, *, lr, cosine=False, torn=False, norms=False, estimator=None, lrs=None):
  path.mkdir(parents=True)
  estimator = estimator or {"name": "forward", "num_tangents": 4, "aggregation": "mean"}
  config = {"estimator": estimator}
  (path / "config.json").write_text(json.dumps({**config, "optimizer": {"lr": lr}}))
  records = []
  for step in (10, 20, 30):
    r = {"step": step, "train_loss": 2.0 / step, "train_time_s": step / 100}
    if step % 20 == 0:
      r.update(val_loss=2.5 / step, val_accuracy=step / 40)
    if cosine:
      r["cosine_to_true_grad"] = 0.01 * step
    if norms:
      r.update(param_norm=10.0 + step, grad_norm_ratio=1.0 + step)
    if lrs is not None:  # the logged lr, and a gradient check's ‖∇f‖
      r.update(lr=lrs[step // 10 - 1], true_grad_norm=1.0 / step)
    records.append(r)
  text = "".join(json.dumps(r) + "\n" for r in records)
  (path / "metrics.jsonl").write_text(text + ('{"step": 4' if torn else ""))
  return path


def _png_size(path):
  import matplotlib.image

  return matplotlib.image.imread(path).shape[:2]


def test_a_sweep_directory_stands_for_its_runs(tmp_path, capsys):
  sweep = tmp_path / "sweep"
  _run(sweep / "0", lr=0.1)
  _run(sweep / "1", lr=0.01, torn=True)
  out = tmp_path / "fig" / "curves.png"
  assert plot.main([str(sweep), "--out", str(out)]) == 0
  assert "2 run(s) drawn into" in capsys.readouterr().out
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  runs = [plot.load_run(p) for p in plot.find_runs([sweep])]
  # The perturbation is named (weights: the default when the config does not say).
  assert [r.label for r in runs] == [
    "forward weights k=4 mean lr=0.1",
    "forward weights k=4 mean lr=0.01",
  ]
  assert [len(r.records) for r in runs] == [3, 3]  # the torn line is not a record


def test_the_cosine_row_appears_only_where_it_was_logged(tmp_path):
  plain = plot.plot_runs([plot.load_run(_run(tmp_path / "a", lr=0.1))], tmp_path / "a.png")
  checked = plot.plot_runs(
    [plot.load_run(_run(tmp_path / "b", lr=0.1, cosine=True))], tmp_path / "b.png"
  )
  (h2, w2), (h3, w3) = _png_size(plain), _png_size(checked)
  assert w2 == w3 and h3 == pytest.approx(h2 * 3 / 2, rel=0.02)


def test_runs_of_one_method_get_distinct_labels(tmp_path):
  runs = [plot.load_run(_run(tmp_path / name, lr=0.1)) for name in ("seed0", "seed1")]
  labels = [r.label for r in plot._unique_labels(runs)]
  assert len(set(labels)) == 2 and all("seed" in label for label in labels)


def test_a_path_without_runs_is_an_error_naming_it(tmp_path, capsys):
  assert plot.main([str(tmp_path / "nothing")]) == 2
  assert str(tmp_path / "nothing") in capsys.readouterr().err


def test_param_norm_and_length_ratio_get_their_own_rows(tmp_path):
  plain = plot.plot_runs([plot.load_run(_run(tmp_path / "a", lr=0.1))], tmp_path / "a.png")
  logged = plot.load_run(_run(tmp_path / "b", lr=0.1, cosine=True, norms=True))
  full = plot.plot_runs([logged], tmp_path / "b.png")
  (h2, w2), (h5, w5) = _png_size(plain), _png_size(full)
  # loss, accuracy + parameter norm, cosine, ‖ĝ‖/‖∇f‖: five rows of the same height.
  assert w2 == w5 and h5 == pytest.approx(h2 * 5 / 2, rel=0.02)


def test_labels_name_the_perturbation_and_options_off_their_defaults(tmp_path):
  activity = {
    "name": "forward",
    "perturbation": "activity",
    "num_tangents": 1,
    "aggregation": "mean",
    "rescale": True,  # the default: not named
    "tangents": "normal",
  }
  raw = {**activity, "perturbation": "weights", "rescale": False, "tangents": "rank1"}
  runs = [
    plot.load_run(_run(tmp_path / "act", lr=0.03, estimator=activity)),
    plot.load_run(_run(tmp_path / "raw", lr=0.03, estimator=raw)),
    plot.load_run(_run(tmp_path / "bp", lr=0.1, estimator={"name": "backprop"})),
  ]
  assert [r.label for r in runs] == [
    "forward activity k=1 mean lr=0.03",
    "forward weights k=1 mean tangents=rank1 rescale=False lr=0.03",
    "backprop lr=0.1",
  ]


def test_true_gradient_norm_gets_a_row_and_the_lr_one_only_where_it_changed(tmp_path):
  plain = plot.plot_runs([plot.load_run(_run(tmp_path / "a", lr=0.1))], tmp_path / "a.png")
  const = plot.load_run(_run(tmp_path / "b", lr=0.1, lrs=[0.1, 0.1, 0.1]))
  decayed = plot.load_run(_run(tmp_path / "c", lr=0.1, lrs=[0.1, 0.05, 0.01]))
  (h2, _), (h3, _), (h4, _) = (
    _png_size(p)
    for p in (
      plain,
      plot.plot_runs([const], tmp_path / "b.png"),
      plot.plot_runs([decayed], tmp_path / "c.png"),
    )
  )
  # loss, accuracy + ‖∇f‖ (3 rows); + the lr when a schedule changed it (4 rows).
  assert h3 == pytest.approx(h2 * 3 / 2, rel=0.02) and h4 == pytest.approx(h2 * 4 / 2, rel=0.02)


def test_a_decaying_schedule_is_named_in_the_label(tmp_path):
  path = _run(tmp_path / "a", lr=0.1)
  config = json.loads((path / "config.json").read_text())
  config["optimizer"]["schedule"] = "cosine"
  (path / "config.json").write_text(json.dumps(config))
  assert plot.load_run(path).label == "forward weights k=4 mean lr=0.1 cosine"
