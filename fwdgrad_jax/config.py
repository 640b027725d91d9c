"""The run configuration: typed dataclasses and their validation.

These dataclasses are the schema of the Hydra app (``experiments/train.py`` registers
them in Hydra's ConfigStore so that types are checked on every override) and the
plain-Python input of :func:`fwdgrad_jax.train.train`, so the library never needs
Hydra. :func:`validate` checks values — ranges, names, combinations — and raises a
:class:`ConfigError` naming the key, before any data is loaded or anything compiled.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwdgrad_jax import aggregation, data, models, tangents


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the key."""


@dataclass
class DataConfig:
  """Which data set and how to split it.

  Attributes:
    name: ``mnist``, ``fashion_mnist`` (offline from Debian's package) or ``cifar10``.
    data_dir: tfds data dir (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    val_size: examples split off train (seeded by ``seed``) for validation.
    download: let tfds download a data set that is not prepared (needs network).
  """

  name: str = "fashion_mnist"
  data_dir: str | None = None
  val_size: int = 5000
  download: bool = False


@dataclass
class ModelConfig:
  """A model from ``fwdgrad_jax.models.MODELS`` and its constructor options.

  Attributes:
    name: registry name (``logreg``, ``mlp``, ``cnn``, ``vgg``, ``deep_mlp``, …).
    options: keyword options of that model class (e.g. ``hidden``, ``depth``).
  """

  name: str = "mlp"
  options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EstimatorConfig:
  """How gradients are estimated.

  Attributes:
    name: ``forward`` (forward gradients) or ``backprop`` (``jax.grad``).
    num_tangents: k tangents per step (forward only).
    tangents: tangent scheme (``normal``, ``rademacher``, ``partition``).
    aggregation: ``mean``, ``sum`` or ``orthogonal``.
    normalize: unit-norm tangents (Flügel's normalized sum/mean).
    max_jvp_norm: cap on the norm of the directional derivatives (reproduction study).
  """

  name: str = "forward"
  num_tangents: int = 1
  tangents: str = "normal"
  aggregation: str = "mean"
  normalize: bool = False
  max_jvp_norm: float | None = None


@dataclass
class OptimizerConfig:
  """The optax optimizer after the estimator.

  Attributes:
    name: ``sgd``, ``nesterov`` (SGD with Nesterov momentum) or ``adam``.
    lr: initial learning rate η_0.
    decay: Baydin's exponential decay: η_i = η_0 · exp(−i · decay); 0 = constant.
    momentum: momentum of ``sgd`` (0 = none) and ``nesterov``.
    b1: Adam's β1.
    b2: Adam's β2.
    eps: Adam's ε.
    clip_norm: clip the estimate by this global norm before the optimizer (None = off).
  """

  name: str = "sgd"
  lr: float = 1e-4
  decay: float = 0.0
  momentum: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float | None = None


@dataclass
class TrainConfig:
  """The loop.

  Attributes:
    steps: total optimizer steps (a rerun with more steps resumes).
    batch_size: examples per step.
    log_every: steps between train-loss records (the device runs this many steps
      between host round-trips).
    eval_every: steps between validation evaluations (0 = only at the end).
    grad_check_every: steps between cosine-to-true-gradient checks (0 = off).
    checkpoint_every: steps between checkpoints (0 = only at the end).
    eval_batch_size: batch size of evaluation passes.
    progress: show a tqdm progress bar.
  """

  steps: int = 1000
  batch_size: int = 64
  log_every: int = 50
  eval_every: int = 500
  grad_check_every: int = 0
  checkpoint_every: int = 0
  eval_batch_size: int = 1000
  progress: bool = True


@dataclass
class Config:
  """A whole run."""

  data: DataConfig = field(default_factory=DataConfig)
  model: ModelConfig = field(default_factory=ModelConfig)
  estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
  optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  seed: int = 0
  name: str = "run"


OPTIMIZERS = ("sgd", "nesterov", "adam")
ESTIMATORS = ("forward", "backprop")


def _require(ok: bool, key: str, value: Any, what: str) -> None:
  if not ok:
    raise ConfigError(f"{key}={value!r}: {what}")


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _positive_int(key: str, value: Any) -> None:
  _require(_is_int(value) and value >= 1, key, value, "must be an integer >= 1")


def _nonnegative_int(key: str, value: Any) -> None:
  _require(_is_int(value) and value >= 0, key, value, "must be an integer >= 0 (0 = off)")


def _choice(key: str, value: Any, choices: Any) -> None:
  _require(value in choices, key, value, f"use one of {sorted(choices)}")


def _optional_positive(key: str, value: Any) -> None:
  if value is not None:
    _require(_is_real(value) and value > 0, key, value, "must be > 0 or null")


def _unit_interval(key: str, value: Any) -> None:
  _require(_is_real(value) and 0 <= value < 1, key, value, "must be in [0, 1)")


def validate(cfg: Config) -> Config:
  """Checks every value of ``cfg``; returns it unchanged.

  Raises:
    ConfigError: the first invalid value, naming its key.
  """
  _choice("data.name", cfg.data.name, data.SUPPORTED)
  _nonnegative_int("data.val_size", cfg.data.val_size)
  _choice("model.name", cfg.model.name, models.MODELS)
  est = cfg.estimator
  _choice("estimator.name", est.name, ESTIMATORS)
  _positive_int("estimator.num_tangents", est.num_tangents)
  _choice("estimator.tangents", est.tangents, tangents.SAMPLERS)
  _choice("estimator.aggregation", est.aggregation, aggregation.AGGREGATIONS)
  _optional_positive("estimator.max_jvp_norm", est.max_jvp_norm)
  opt = cfg.optimizer
  _choice("optimizer.name", opt.name, OPTIMIZERS)
  _require(_is_real(opt.lr) and opt.lr > 0, "optimizer.lr", opt.lr, "must be a finite number > 0")
  _require(_is_real(opt.decay) and opt.decay >= 0, "optimizer.decay", opt.decay, "must be >= 0")
  for key in ("momentum", "b1", "b2"):
    _unit_interval(f"optimizer.{key}", getattr(opt, key))
  if opt.name == "nesterov":
    _require(opt.momentum > 0, "optimizer.momentum", opt.momentum, "nesterov needs momentum > 0")
  _require(_is_real(opt.eps) and opt.eps > 0, "optimizer.eps", opt.eps, "must be > 0")
  _optional_positive("optimizer.clip_norm", opt.clip_norm)
  tr = cfg.train
  for key in ("steps", "batch_size", "log_every", "eval_batch_size"):
    _positive_int(f"train.{key}", getattr(tr, key))
  for key in ("eval_every", "grad_check_every", "checkpoint_every"):
    _nonnegative_int(f"train.{key}", getattr(tr, key))
  _require(_is_int(cfg.seed), "seed", cfg.seed, "must be an integer")
  return cfg


_SECTIONS = {
  "data": DataConfig,
  "model": ModelConfig,
  "estimator": EstimatorConfig,
  "optimizer": OptimizerConfig,
  "train": TrainConfig,
}


def _known_keys(cls: type, where: str, values: dict[str, Any]) -> None:
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f"{where}{unknown[0]}: unknown key; known keys are {sorted(known)}")


def from_dict(raw: dict[str, Any]) -> Config:
  """Builds a :class:`Config` from nested plain dicts (e.g. ``OmegaConf.to_container``).

  Unknown keys raise :class:`ConfigError` naming them; model options are free-form and
  checked against the model class by :func:`fwdgrad_jax.models.create`.
  """
  _known_keys(Config, "", raw)
  top = {k: v for k, v in raw.items() if k not in _SECTIONS}
  sections = {}
  for name, cls in _SECTIONS.items():
    values = dict(raw.get(name) or {})
    _known_keys(cls, f"{name}.", values)
    sections[name] = cls(**values)
  return Config(**sections, **top)


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def register_schema() -> None:
  """Registers :class:`Config` as Hydra's ``schema`` node (``configs/config.yaml`` uses it)."""
  from hydra.core.config_store import ConfigStore  # Hydra only where configs are composed

  ConfigStore.instance().store(name="schema", node=Config)


def compose(overrides: list[str], *, config_dir: str | Path = CONFIG_DIR) -> Config:
  """The validated :class:`Config` that ``experiments/train.py <overrides>`` would run.

  For scripts and notebooks that start runs without the Hydra CLI.

  Raises:
    ConfigError: an invalid value, naming its key.
  """
  from hydra import compose as hydra_compose
  from hydra import initialize_config_dir
  from omegaconf import OmegaConf

  register_schema()
  with initialize_config_dir(config_dir=str(Path(config_dir).absolute()), version_base="1.3"):
    raw = hydra_compose("config", overrides=list(overrides))
  return validate(OmegaConf.to_object(raw))


def to_dict(cfg: Config) -> dict[str, Any]:
  """The config as nested plain dicts (JSON-ready)."""
  return dataclasses.asdict(cfg)
