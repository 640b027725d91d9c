"""The run configuration: typed dataclasses and their validation.

These dataclasses are the schema of the Hydra app (``experiments/train.py`` registers
them in Hydra's ConfigStore so that types are checked on every override) and the
plain-Python input of :func:`fwdgrad_jax.training.run.train`, so the library never needs
Hydra. :func:`validate` checks values — ranges, names, combinations — and raises a
:class:`ConfigError` naming the key, before any data is loaded or anything compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwdgrad_jax import aggregation, data, models, perturbation, registry, schemes, tangents


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
    name: registry name (``logreg``, ``mlp``, ``cnn``, ``vgg``, ``deep_mlp``,
      ``local_mixer``, …).
    options: keyword options of that model class (e.g. ``hidden``, ``depth``).
    local_losses: Ren et al.'s local greedy losses (a head and a loss per layer/block,
      ``stop_gradient`` between them; evaluation uses the last head), for models whose
      class takes ``local_losses`` (``mlp``, ``cnn``, ``vgg``, ``local_mixer``); None =
      the model's default.
  """

  name: str = "mlp"
  options: dict[str, Any] = field(default_factory=dict)
  local_losses: bool | None = None


def model_options(cfg: ModelConfig) -> dict[str, Any]:
  """The constructor options of ``cfg``'s model: ``options`` and ``local_losses`` if set."""
  extra = {} if cfg.local_losses is None else {"local_losses": cfg.local_losses}
  return {**cfg.options, **extra}


@dataclass
class EstimatorConfig:
  """How gradients are estimated.

  Attributes:
    name: ``forward`` (forward gradients), ``backprop`` (``jax.grad``) or ``guided``
      (Yao's guided forward gradients; biased by design).
    num_tangents: k tangents per step (forward only).
    tangents: tangent scheme: dense ``normal``, ``rademacher``, ``partition``,
      ``normal_threefry``, ``rademacher_threefry``; structured ``rank1``, ``input``,
      ``input_approx``; with ``perturbation=activity`` the activity tangents'
      distribution (``normal``, ``rademacher``) or ``local_guess`` (each site's
      local-loss gradient through its head, then ``num_tangents − 1`` normal tangents;
      Fournier et al. 2023, biased; see ``fwdgrad_jax.schemes.LocalGuess``).
    aggregation: ``mean``, ``sum`` or ``orthogonal``.
    perturbation: ``weights`` or ``activity`` (tangents on the outputs of the
      parameter-consuming ops, per-example directional derivatives).
    normalize: unit-norm tangents (Flügel's normalized sum/mean).
    rescale: divide the estimate by its expected length ratio to ∇f for its (n, k,
      aggregation, scheme), so one lr transfers across k and aggregations (on by
      default: results/lr_transfer shows one best lr for every k and aggregation, where
      the raw estimates' best lrs spread 10⁵×). The papers' presets turn it off, since
      their learning rates are for the raw estimates.
    max_jvp_norm: cap on the norm of the directional derivatives (reproduction study).
    regenerate: keep the key, not the tangents: each layer's tangents are redrawn where
      they are used (dense ``normal``/``rademacher`` weight tangents; MeZO-style memory).
    fix_gap, decay_rate, shuffle_ratio, decrease_gap: ``guided`` only, Yao's
      Algorithm 1 (see ``fwdgrad_jax.guided_forward_gradient``).
  """

  name: str = "forward"
  num_tangents: int = 1
  tangents: str = "normal"
  aggregation: str = "mean"
  perturbation: str = "weights"
  normalize: bool = False
  rescale: bool = True
  max_jvp_norm: float | None = None
  regenerate: bool = False
  fix_gap: int = 10
  decay_rate: float = 0.9
  shuffle_ratio: float = 0.0
  decrease_gap: int = 10


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
    schedule: ``constant``, ``cosine`` (optax cosine decay from ``lr`` to 0 over
      ``train.steps``) or ``warmup_cosine`` (linear from 0 to ``lr`` over ``warmup_steps``,
      then cosine to 0 at ``train.steps``); the ``lr`` field of ``metrics.jsonl``.
    warmup_steps: steps of linear warmup (``warmup_cosine`` only; < ``train.steps``).
    weight_decay: weight decay: ``adamw``'s decoupled decay for ``adam``; for ``sgd`` and
      ``nesterov`` ``weight_decay · params`` added to the estimate (L2, as PyTorch's SGD
      and Ren et al.); 0 = none.
  """

  name: str = "sgd"
  lr: float = 0.2
  decay: float = 0.0
  momentum: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float | None = None
  schedule: str = "constant"
  warmup_steps: int = 0
  weight_decay: float = 0.0


SCHEDULES = ("constant", "cosine", "warmup_cosine")


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
    checkpoint_every: steps between checkpoints (0 = only at the end and at an
      interrupt, which always write one).
    eval_batch_size: batch size of evaluation passes.
    progress: show a tqdm progress bar.
    time_budget_s: stop once this many seconds of training have run (compilation,
      evaluation, gradient checks and checkpoints not counted; checked between chunks
      of ``log_every`` steps); None = run all ``steps``. Compares methods for the
      same wall-clock budget.
    loop: ``device`` (each chunk one compiled ``fori_loop``), ``host`` (one compiled
      step per Python call, dispatched asynchronously: XLA:CPU runs convolutions
      inside loops ~25× slower in reverse mode) or ``auto`` (``host`` for convolutional
      models on CPU differentiated in reverse mode: backprop, guided, activity).
  """

  steps: int = 1000
  batch_size: int = 64
  log_every: int = 50
  eval_every: int = 500
  grad_check_every: int = 0
  checkpoint_every: int = 0
  eval_batch_size: int = 1000
  progress: bool = True
  time_budget_s: float | None = None
  loop: str = "auto"


@dataclass
class MeshConfig:
  """Devices: data and tangent parallelism (:mod:`fwdgrad_jax.parallel`).

  Attributes:
    data: devices the batch is split across (``train.batch_size`` a multiple of it).
    tangents: devices the k tangents are split across (``estimator.num_tangents`` a
      multiple of it; dense weight tangents of the ``forward`` estimator).
      ``data × tangents`` must not exceed the devices present (on a CPU, more come from
      ``XLA_FLAGS=--xla_force_host_platform_device_count=N``).
    distributed: call ``jax.distributed.initialize()`` first, so the mesh spans every
      process's devices. With none of the three keys below set, the cluster is detected
      from the environment (SLURM, Open MPI, Cloud TPU).
    coordinator_address: ``host:port`` of process 0's coordinator (all processes give
      the same), e.g. ``127.0.0.1:12355`` for processes on one machine.
    num_processes: how many processes take part.
    process_id: this process's index, 0 … num_processes − 1. Process 0 writes the
      metrics, the summary and the logs; every process saves and restores the
      checkpoints (orbax) and takes its share of each batch.
  """

  data: int = 1
  tangents: int = 1
  distributed: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def distributed_options(self) -> dict[str, Any]:
    """The keyword arguments of ``jax.distributed.initialize``: the keys that are set."""
    keys = ("coordinator_address", "num_processes", "process_id")
    return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class Config:
  """A whole run."""

  data: DataConfig = field(default_factory=DataConfig)
  model: ModelConfig = field(default_factory=ModelConfig)
  estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
  optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  seed: int = 0
  name: str = "run"


OPTIMIZERS = ("sgd", "nesterov", "adam")
#: Every tangent name the app accepts for weight perturbation.
TANGENT_NAMES = (*tangents.SAMPLERS, *perturbation.STRUCTURED_TANGENTS)


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
  if cfg.model.local_losses is not None:
    _require(
      isinstance(cfg.model.local_losses, bool),
      "model.local_losses",
      cfg.model.local_losses,
      "must be a boolean or null",
    )
    _require(
      "local_losses" in inspect.signature(models.MODELS[cfg.model.name].__init__).parameters,
      "model.local_losses",
      cfg.model.local_losses,
      f"model {cfg.model.name!r} has no local losses; use mlp, cnn, vgg or local_mixer",
    )
  est = cfg.estimator
  _choice("estimator.name", est.name, registry.ESTIMATORS)
  _positive_int("estimator.num_tangents", est.num_tangents)
  _choice("estimator.perturbation", est.perturbation, perturbation.PERTURBATIONS)
  if est.perturbation == "activity":
    _choice(
      "estimator.tangents",
      est.tangents,
      (*perturbation.ACTIVITY_TANGENTS, *perturbation.GUESS_TANGENTS),
    )
    _require(not est.normalize, "estimator.normalize", est.normalize, "applies to weight tangents")
  else:
    _require(
      est.tangents not in perturbation.GUESS_TANGENTS,
      "estimator.tangents",
      est.tangents,
      "needs estimator.perturbation=activity (the guess is a local loss's gradient at an "
      "activity site)",
    )
    _choice("estimator.tangents", est.tangents, TANGENT_NAMES)
  _choice("estimator.aggregation", est.aggregation, aggregation.AGGREGATIONS)
  _optional_positive("estimator.max_jvp_norm", est.max_jvp_norm)
  if est.name == "forward":  # the combinations, checked by the scheme itself (one place)
    try:
      scheme = schemes.parse(
        est.tangents,
        perturbation=est.perturbation,
        normalize=est.normalize,
        regenerate=est.regenerate,
      )
      scheme.check(num_tangents=est.num_tangents, aggregation=est.aggregation)
    except ValueError as e:
      raise ConfigError(f"estimator: {e}") from None
  _positive_int("estimator.fix_gap", est.fix_gap)
  _positive_int("estimator.decrease_gap", est.decrease_gap)
  _require(
    _is_real(est.decay_rate) and 0 < est.decay_rate <= 1,
    "estimator.decay_rate",
    est.decay_rate,
    "must be in (0, 1]",
  )
  _require(
    _is_real(est.shuffle_ratio) and 0 <= est.shuffle_ratio <= 1,
    "estimator.shuffle_ratio",
    est.shuffle_ratio,
    "must be in [0, 1]",
  )
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
  _choice("optimizer.schedule", opt.schedule, SCHEDULES)
  _nonnegative_int("optimizer.warmup_steps", opt.warmup_steps)
  _require(
    opt.warmup_steps < cfg.train.steps or not (_is_int(cfg.train.steps) and cfg.train.steps > 0),
    "optimizer.warmup_steps",
    opt.warmup_steps,
    f"must be < train.steps={cfg.train.steps}",
  )
  _require(
    opt.warmup_steps == 0 or opt.schedule == "warmup_cosine",
    "optimizer.warmup_steps",
    opt.warmup_steps,
    "applies to optimizer.schedule=warmup_cosine only",
  )
  _require(
    opt.decay == 0 or opt.schedule == "constant",
    "optimizer.decay",
    opt.decay,
    f"Baydin's decay is its own schedule; use optimizer.schedule=constant, not {opt.schedule!r}",
  )
  _require(
    _is_real(opt.weight_decay) and opt.weight_decay >= 0,
    "optimizer.weight_decay",
    opt.weight_decay,
    "must be >= 0",
  )
  tr = cfg.train
  for key in ("steps", "batch_size", "log_every", "eval_batch_size"):
    _positive_int(f"train.{key}", getattr(tr, key))
  for key in ("eval_every", "grad_check_every", "checkpoint_every"):
    _nonnegative_int(f"train.{key}", getattr(tr, key))
  _optional_positive("train.time_budget_s", tr.time_budget_s)
  _choice("train.loop", tr.loop, ("auto", "device", "host"))
  _validate_mesh(cfg)
  _require(_is_int(cfg.seed), "seed", cfg.seed, "must be an integer")
  return cfg


def _validate_mesh(cfg: Config) -> None:
  """The mesh's counts and what they must divide (the device count is checked at the run)."""
  mesh, est = cfg.mesh, cfg.estimator
  _positive_int("mesh.data", mesh.data)
  _positive_int("mesh.tangents", mesh.tangents)
  _require(
    isinstance(mesh.distributed, bool), "mesh.distributed", mesh.distributed, "must be a boolean"
  )
  for key, value in mesh.distributed_options().items():
    _require(mesh.distributed, f"mesh.{key}", value, "needs mesh.distributed=true")
  if mesh.coordinator_address is not None:
    _require(
      isinstance(mesh.coordinator_address, str) and ":" in mesh.coordinator_address,
      "mesh.coordinator_address",
      mesh.coordinator_address,
      "must be 'host:port' (process 0's address)",
    )
  if mesh.num_processes is not None:
    _positive_int("mesh.num_processes", mesh.num_processes)
  if mesh.process_id is not None:
    n = mesh.num_processes
    _require(
      _is_int(mesh.process_id) and mesh.process_id >= 0 and (n is None or mesh.process_id < n),
      "mesh.process_id",
      mesh.process_id,
      "must be an integer in [0, mesh.num_processes)",
    )
  _require(
    cfg.train.batch_size % mesh.data == 0,
    "train.batch_size",
    cfg.train.batch_size,
    f"must be a multiple of mesh.data={mesh.data}",
  )
  if mesh.tangents > 1:
    dense = (
      est.name == "forward" and est.perturbation == "weights" and est.tangents in tangents.SAMPLERS
    )
    _require(
      dense,
      "mesh.tangents",
      mesh.tangents,
      "tangent parallelism needs estimator.name=forward with dense weight tangents "
      f"({', '.join(sorted(tangents.SAMPLERS))}); use mesh.tangents=1",
    )
    _require(
      est.num_tangents % mesh.tangents == 0,
      "estimator.num_tangents",
      est.num_tangents,
      f"must be a multiple of mesh.tangents={mesh.tangents}",
    )


_SECTIONS = {
  "data": DataConfig,
  "model": ModelConfig,
  "estimator": EstimatorConfig,
  "optimizer": OptimizerConfig,
  "train": TrainConfig,
  "mesh": MeshConfig,
}


def _closest(key: str, known: list[str]) -> str | None:
  prefix, _, leaf = key.rpartition(".")
  close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.5)
  return (f"{prefix}.{close[0]}" if prefix else close[0]) if close else None


def _unknown_keys(keys: list[str], known: dict[str, list[str]]) -> ConfigError:
  """The error for unknown dotted ``keys``, each with the closest known key.

  Args:
    keys: the unknown keys, the first one leads the message.
    known: section (``""`` for the top level) -> its known keys.
  """

  def hint(key):
    section = key.rpartition(".")[0]
    close = _closest(key, known[section])
    return f"did you mean {close}?" if close else f"known keys: {', '.join(known[section])}"

  message = f"{keys[0]}: unknown key; {hint(keys[0])}"
  if len(keys) > 1:
    message += " Also unknown: " + ", ".join(f"{k} ({hint(k)})" for k in keys[1:])
  return ConfigError(message)


def _known() -> dict[str, list[str]]:
  return {
    section: [f.name for f in dataclasses.fields(cls)]
    for section, cls in {"": Config, **_SECTIONS}.items()
  }


def from_dict(raw: dict[str, Any]) -> Config:
  """Builds a :class:`Config` from nested plain dicts (e.g. ``OmegaConf.to_container``).

  Unknown keys raise :class:`ConfigError` naming each key and the closest known one
  (Hydra records a ``+section.typo=…`` override silently); model options are free-form
  and checked against the model class by :func:`fwdgrad_jax.models.create`.
  """
  known = _known()
  unknown = [k for k in raw if k not in known[""]]
  for section in _SECTIONS:
    unknown += [f"{section}.{k}" for k in (raw.get(section) or {}) if k not in known[section]]
  if unknown:
    raise _unknown_keys(unknown, known)
  top = {k: v for k, v in raw.items() if k not in _SECTIONS}
  sections = {name: cls(**dict(raw.get(name) or {})) for name, cls in _SECTIONS.items()}
  return Config(**sections, **top)


#: Each optimizer's default lr for (weight, activity) perturbation: ``lr: ${default_lr:sgd}`` in
#: ``configs/optimizer/*.yaml``. Activity perturbation needs ~7-10× less: at the weights'
#: default it diverged or ended unstable in 200 steps of the Fashion-MNIST MLP (SGD 0.2:
#: diverged at step 101; 0.1: val loss 7.6; Nesterov 0.02: diverged; Adam 1e-3: val loss
#: 10.2); at these it reached test accuracy 0.57 (SGD 0.03), 0.58 (Nesterov 0.003) and 0.62
#: (Adam 1e-4) — `python experiments/train.py train.steps=200 estimator.perturbation=activity
#: optimizer=NAME`, git aa5e62c, 2-core CPU, jax 0.10.2 (issue 24's trial, re-run).
DEFAULT_LRS = {"sgd": (0.2, 0.03), "nesterov": (0.02, 0.003), "adam": (1e-3, 1e-4)}


def _default_lr(optimizer: str, *, _root_: Any) -> float:
  from omegaconf import OmegaConf

  if optimizer not in DEFAULT_LRS:
    raise ConfigError(f"default_lr: unknown optimizer {optimizer!r}; one of {sorted(DEFAULT_LRS)}")
  perturbation = OmegaConf.select(_root_, "estimator.perturbation", default="weights")
  weights, activity = DEFAULT_LRS[optimizer]
  return activity if perturbation == "activity" else weights


def register_schema() -> None:
  """Registers :class:`Config` as Hydra's ``schema`` node (``configs/config.yaml`` uses it).

  And the ``default_lr`` resolver of the optimizer groups (:data:`DEFAULT_LRS`).
  """
  from hydra.core.config_store import ConfigStore  # Hydra only where configs are composed
  from omegaconf import OmegaConf

  ConfigStore.instance().store(name="schema", node=Config)
  OmegaConf.register_new_resolver("default_lr", _default_lr, replace=True)


def from_hydra(raw: Any) -> Config:
  """The validated :class:`Config` of a composed Hydra config (a ``DictConfig``).

  Raises:
    ConfigError: an unknown key or an invalid value, naming the key.
  """
  from omegaconf import OmegaConf

  return validate(from_dict(OmegaConf.to_container(raw, resolve=True)))


def hydra_error_message(error: BaseException, overrides: list[str] = ()) -> str | None:
  """One line naming the key for an error Hydra raises while composing a config.

  Hydra reports type errors and unknown groups in 6–8 lines (or a traceback); this
  says the same in one line that starts with the key.

  Args:
    error: what Hydra's compose raised.
    overrides: the command-line overrides, to find the one that does not parse.

  Returns:
    The line, or None when ``error`` is not a composition error.
  """
  from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
  )
  from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

  if isinstance(error, MissingConfigException) and error.missing_cfg_file:
    group, _, option = error.missing_cfg_file.rpartition("/")
    if group:
      options = ", ".join(error.options or [])
      return f"{group}={option}: no such {group} config; use one of {options}"
    return f"{error.missing_cfg_file}: config not found"
  if isinstance(error, OverrideParseException):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
      try:
        parser.parse_override(override)
      except HydraException:
        return f"{override}: cannot parse this override ({str(error).splitlines()[0]})"
    return f"cannot parse the overrides: {str(error).splitlines()[0]}"
  cause = error.__cause__
  if isinstance(error, ConfigCompositionException) and isinstance(cause, OmegaConfBaseException):
    key = getattr(cause, "full_key", "") or ""
    section = key.rpartition(".")[0]
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and section in _known():
      return str(_unknown_keys([key], _known()))
    # "Error merging override estimator.num_tangents=1.5": name the override as typed.
    override = str(error).removeprefix("Error merging override ")
    what = override if override.startswith(f"{key}=") else key or "config"
    line = f"{what}: {str(cause).splitlines()[0]}"
    hint = str(error).splitlines()[1:]  # Hydra's "To append to your config use +key=…"
    return f"{line}; {hint[0][0].lower()}{hint[0][1:]}" if hint and hint[0] else line
  if isinstance(error, ConfigCompositionException):
    return str(error).splitlines()[0]
  return None


def compose(overrides: list[str], *, config_dir: str | Path) -> Config:
  """The validated :class:`Config` that ``experiments/train.py <overrides>`` would run.

  For scripts and notebooks that start runs without the Hydra CLI. The library does
  not know where the repository's ``configs/`` is: the caller passes it.

  Args:
    overrides: Hydra overrides, as on the command line.
    config_dir: the directory holding ``config.yaml`` and the config groups.

  Raises:
    ConfigError: an unknown key, a value of the wrong type or an invalid value,
      naming the key.
  """
  from hydra import compose as hydra_compose
  from hydra import initialize_config_dir
  from hydra.errors import HydraException

  register_schema()
  try:
    with initialize_config_dir(config_dir=str(Path(config_dir).absolute()), version_base="1.3"):
      raw = hydra_compose("config", overrides=list(overrides))
  except HydraException as e:
    message = hydra_error_message(e, list(overrides))
    if message is None:
      raise
    raise ConfigError(message) from e
  return from_hydra(raw)


def to_dict(cfg: Config) -> dict[str, Any]:
  """The config as nested plain dicts (JSON-ready)."""
  return dataclasses.asdict(cfg)
