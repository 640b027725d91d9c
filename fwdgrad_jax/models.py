"""Model zoo and the pure-function boundary used by the gradient estimators.

Every model is a Flax NNX module that takes a batch of NHWC ``float32`` images and
returns logits of shape ``(batch, num_classes)``. Models are looked up by name in
:data:`MODELS`; adding a new architecture (e.g. ResNet18, a small ViT) means writing a
class whose constructor is ``__init__(self, *, input_shape, num_classes, rngs, **options)``,
decorating it with ``@register("name")`` and adding a config file -- nothing else changes.

The estimators (forward gradient via ``jax.jvp``, backprop via ``jax.grad``) work on pure
functions ``loss(params, batch)`` over a pytree of float arrays, so a model is cut into

* ``graphdef`` -- static structure (hashable, safe to close over in ``jax.jit``),
* ``params``   -- the ``nnx.Param`` state: the only thing that is differentiated,
* ``rest``     -- everything else (BatchNorm statistics, Dropout RNG key/counter, ...).

``rest`` is kept out of ``params`` because RNG counters are ``uint32`` and RNG keys are
typed key arrays: neither can carry a tangent, so a random tangent drawn with
``jax.tree.map(normal_like, params)`` would fail or be meaningless on them.

Typical use::

    model = create("mlp", input_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0))
    graphdef, params, rest = split(model)
    f = apply_fn(graphdef, rest)               # stateless models
    logits = f(params, x)

    g = apply_with_state_fn(graphdef)          # BatchNorm / Dropout models
    logits, rest = g(params, rest, x)

    e = apply_with_state_fn(eval_graphdef(graphdef, params, rest))
    logits, _ = e(params, rest, x)             # eval mode: running averages, no dropout

A model with state trains through ``apply_with_state_fn``: the new ``rest`` (updated
BatchNorm statistics, advanced Dropout RNG counters) comes back with the logits and is
threaded into the next step, so two steps see different dropout masks.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
  "ACTIVATIONS",
  "MLP",
  "MODELS",
  "BaydinCNN",
  "DeepMLP",
  "LogReg",
  "VGGLike",
  "apply_fn",
  "apply_with_state_fn",
  "count_params",
  "create",
  "eval_graphdef",
  "register",
  "split",
]

Shape = tuple[int, int, int]  # (H, W, C), no batch axis
_M = TypeVar("_M", bound=type)

# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------

#: Name -> model class. Every class is built as ``cls(input_shape=..., num_classes=...,
#: rngs=..., **options)``.
MODELS: dict[str, type[nnx.Module]] = {}

# The constructor arguments every model receives from ``create``; anything else is a
# model-specific option and is validated against the class signature.
_COMMON_ARGS = ("input_shape", "num_classes", "rngs")


def register(name: str) -> Callable[[_M], _M]:
  """Class decorator adding a model class to :data:`MODELS` under ``name``."""

  def deco(cls: _M) -> _M:
    if name in MODELS and MODELS[name] is not cls:
      raise ValueError(f"model name {name!r} is already registered to {MODELS[name].__qualname__}")
    sig = inspect.signature(cls.__init__)
    missing = [a for a in _COMMON_ARGS if a not in sig.parameters]
    if missing:
      raise TypeError(
        f"{cls.__qualname__}.__init__ must accept {', '.join(_COMMON_ARGS)}; "
        f"missing: {', '.join(missing)}"
      )
    MODELS[name] = cls
    return cls

  return deco


def _options_of(cls: type) -> dict[str, inspect.Parameter]:
  params = inspect.signature(cls.__init__).parameters
  return {
    k: p
    for k, p in params.items()
    if k != "self"
    and k not in _COMMON_ARGS
    and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
  }


def create(
  name: str,
  *,
  input_shape: Sequence[int],
  num_classes: int,
  rngs: nnx.Rngs,
  **kwargs: Any,
) -> nnx.Module:
  """Build the model registered as ``name``.

  Args:
    name: key of :data:`MODELS`.
    input_shape: ``(H, W, C)`` of one image, without the batch axis.
    num_classes: number of logits.
    rngs: ``nnx.Rngs`` used for initialisation (and, for Dropout models, a ``dropout``
      stream).
    **kwargs: model-specific options (see each class's constructor).

  Raises:
    ValueError: unknown ``name`` (the message lists the known names) or a malformed
      ``input_shape``.
    TypeError: an option the model does not accept (the message names it and lists the
      accepted ones).
  """
  try:
    cls = MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
  shape = tuple(int(d) for d in input_shape)
  if len(shape) != 3 or min(shape) <= 0:
    raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got {input_shape!r}")
  accepted = _options_of(cls)
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise TypeError(
      f"model {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
      f"accepted options: {', '.join(accepted) or '(none)'}"
    )
  return cls(input_shape=shape, num_classes=int(num_classes), rngs=rngs, **kwargs)


# ---------------------------------------------------------------------------------------
# Pure-function boundary
# ---------------------------------------------------------------------------------------


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """``(graphdef, params, rest)``: only ``nnx.Param`` goes into ``params``.

  Note that flax 0.12 ``nnx.split`` hands out the model's own ``Variable`` objects, so
  ``params``/``rest`` alias the module until a JAX transform or ``jax.tree.map`` rebuilds
  them; treat them as immutable.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def apply_fn(
  graphdef: nnx.GraphDef, rest: nnx.State
) -> Callable[[nnx.State, jax.Array], jax.Array]:
  """Pure ``f(params, x) -> logits`` for models without state updates.

  ``rest`` is closed over. Any state the forward pass would write (BatchNorm running
  statistics, Dropout RNG counter) is computed on a private copy and dropped -- use
  :func:`apply_with_state_fn` for models that need those updates.
  """

  def f(params: nnx.State, x: jax.Array) -> jax.Array:
    # copy=True: a closed-over `rest` lives at the outer trace level, and a model
    # merged from it in place would either raise TraceContextError on write or leak
    # the jvp/jit tracer into the caller's state.
    model = nnx.merge(graphdef, params, rest, copy=True)
    return model(x)

  return f


def apply_with_state_fn(
  graphdef: nnx.GraphDef,
) -> Callable[[nnx.State, nnx.State, jax.Array], tuple[jax.Array, nnx.State]]:
  """Pure ``f(params, rest, x) -> (logits, new_rest)`` for models with mutable state.

  Fit for ``jax.jvp(lambda p: f(p, rest, x), (params,), (tangent,), has_aux=True)``:
  the tangent touches ``params`` only and the updated BatchNorm statistics / RNG counters
  come back as (primal-only) aux, so nothing is mutated behind JAX's back and no tracer
  escapes. ``new_rest`` has the same tree structure as ``rest``.
  """

  def f(params: nnx.State, rest: nnx.State, x: jax.Array) -> tuple[jax.Array, nnx.State]:
    # copy=True so the caller's Variables are never written to; the writes happen on
    # fresh Variables that are read back out below.
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(x)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return logits, new_rest

  return f


def eval_graphdef(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State) -> nnx.GraphDef:
  """The graphdef of the same model in eval mode (``Module.eval()``).

  BatchNorm then normalises with its running averages and Dropout is off. The mode is
  a static attribute, so it lives in the graphdef; ``params`` and ``rest`` keep their
  structure and are shared by both modes.
  """
  model = nnx.merge(graphdef, params, rest, copy=True)
  model.eval()
  return nnx.split(model, nnx.Param, ...)[0]


def count_params(params: Any) -> int:
  """Total number of scalars in a pytree (e.g. the ``params`` from :func:`split`)."""
  # Shapes only: abstract models (nnx.eval_shape) are counted without allocating.
  return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

#: Activation names accepted wherever a model takes ``activation``; strings keep configs
#: (YAML) free of Python objects.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": jax.nn.relu,
  "tanh": jnp.tanh,
  "sigmoid": jax.nn.sigmoid,
  "gelu": jax.nn.gelu,
  "silu": jax.nn.silu,
  "elu": jax.nn.elu,
  "leaky_relu": jax.nn.leaky_relu,
  "softplus": jax.nn.softplus,
  "identity": lambda x: x,
}

_INITS: dict[str, Callable[[], nnx.Initializer]] = {
  "lecun_normal": nnx.initializers.lecun_normal,  # flax default for Linear/Conv
  "he_normal": nnx.initializers.he_normal,
  "glorot_normal": nnx.initializers.glorot_normal,
  "glorot_uniform": nnx.initializers.glorot_uniform,
}


def _activation(act: str | Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
  if callable(act):
    return act
  try:
    return ACTIVATIONS[act]
  except KeyError:
    raise ValueError(
      f"unknown activation {act!r}; known: {', '.join(sorted(ACTIVATIONS))}"
    ) from None


def _kernel_init(name: str) -> nnx.Initializer:
  try:
    return _INITS[name]()
  except KeyError:
    raise ValueError(f"unknown kernel_init {name!r}; known: {', '.join(_INITS)}") from None


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


def _max_pool_2x2(x: jax.Array) -> jax.Array:
  # VALID pooling floors odd sizes (7 -> 3), matching PyTorch's MaxPool2d(2) that the
  # reference implementations use.
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def _fan_in_init_2d(init: nnx.Initializer) -> nnx.Initializer:
  """Draw a conv kernel as a 2-D ``(kh*kw*cin, cout)`` matrix and reshape it.

  XLA:CPU takes seconds (up to ~20 s on 2 cores) to compile a partitionable-threefry
  draw of a 4-D shape such as ``(3, 3, 8, 16)``, versus ~0.3 s for the same number of
  values in 2-D; every distinct conv shape pays it again. For fan-in initialisers
  (LeCun, He; in_axis=-2, out_axis=-1) the 2-D view has the same fan-in,
  ``kh*kw*cin``, so the distribution is unchanged. Not valid for fan_out/fan_avg modes.
  """

  def init_2d(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    shape = tuple(shape)
    if len(shape) <= 2:
      return init(key, shape, dtype)
    return init(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)

  return init_2d


# flax's default Conv initialiser, made cheap to compile (see _fan_in_init_2d).
_CONV_INIT = _fan_in_init_2d(nnx.initializers.lecun_normal())


def _conv3x3(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Conv:
  # 'SAME' with a 3x3 kernel and stride 1 is exactly PyTorch's padding=1 (zero padding).
  return nnx.Conv(cin, cout, kernel_size=(3, 3), padding="SAME", kernel_init=_CONV_INIT, rngs=rngs)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


@register("logreg")
class LogReg(nnx.Module):
  """Multinomial logistic regression: one ``Linear`` on the flattened image.

  The convex baseline of Baydin et al. 2022, "Gradients without Backpropagation"
  (Fig. 3, MNIST logistic regression).
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    use_bias: bool = True,
  ):
    self.linear = nnx.Linear(math.prod(input_shape), num_classes, use_bias=use_bias, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(_flatten(x))


@register("mlp")
class MLP(nnx.Module):
  """Fully connected net, by default 784-1024-1024-10 with ReLU.

  The MNIST MLP of Baydin et al. 2022, "Gradients without Backpropagation" (Fig. 4).
  With ``batch_norm`` or ``dropout`` it is the small stateful model of the tests and the
  reference for stateful models in the app: each hidden layer is
  Linear → [BatchNorm] → activation → [Dropout].

  Args:
    hidden: widths of the hidden layers (each followed by ``activation``).
    activation: name in :data:`ACTIVATIONS` or a callable.
    use_bias: give every Linear a bias.
    kernel_init: name of the weight initialiser (flax default ``lecun_normal``).
    batch_norm: BatchNorm after every hidden Linear (running statistics in ``rest``).
    dropout: Dropout rate after every hidden activation (0 = none); its RNG state is
      in ``rest`` and advances with every call in train mode.
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    hidden: Sequence[int] = (1024, 1024),
    activation: str | Callable[[jax.Array], jax.Array] = "relu",
    use_bias: bool = True,
    kernel_init: str = "lecun_normal",
    batch_norm: bool = False,
    dropout: float = 0.0,
  ):
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    self.activation = _activation(activation)
    init = _kernel_init(kernel_init)
    widths = [math.prod(input_shape), *(int(h) for h in hidden)]
    self.hidden = nnx.List(
      [
        nnx.Linear(a, b, use_bias=use_bias, kernel_init=init, rngs=rngs)
        for a, b in itertools.pairwise(widths)
      ]
    )
    self.norms = nnx.List([nnx.BatchNorm(w, rngs=rngs) for w in widths[1:]] if batch_norm else [])
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.head = nnx.Linear(widths[-1], num_classes, use_bias=use_bias, kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = _flatten(x)
    for i, layer in enumerate(self.hidden):
      h = layer(h)
      if self.norms:
        h = self.norms[i](h)
      h = self.activation(h)
      if self.dropout is not None:
        h = self.dropout(h)
    return self.head(h)


class _BlockCNN(nnx.Module):
  """Blocks of [conv3x3-ReLU, conv3x3-ReLU, maxpool 2x2], then Linear-ReLU, Linear."""

  def __init__(
    self, input_shape: Shape, num_classes: int, rngs: nnx.Rngs, channels: Sequence[int], hidden: int
  ):
    h, w, c = input_shape
    convs = []
    cin = c
    for cout in channels:
      convs += [_conv3x3(cin, cout, rngs), _conv3x3(cout, cout, rngs)]
      cin = cout
      h, w = h // 2, w // 2
    self.convs = nnx.List(convs)
    self.fc1 = nnx.Linear(h * w * cin, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x))
      if i % 2 == 1:
        x = _max_pool_2x2(x)
    x = jax.nn.relu(self.fc1(_flatten(x)))
    return self.fc2(x)


@register("cnn")
class BaydinCNN(_BlockCNN):
  """CNN of Baydin et al. 2022, "Gradients without Backpropagation" (Sec. 5, Fig. 5).

  conv3x3(64)-ReLU, conv3x3(64)-ReLU, maxpool 2x2, conv3x3(64)-ReLU, conv3x3(64)-ReLU,
  maxpool 2x2, Linear(1024)-ReLU, Linear(num_classes). Convolutions use 'SAME' zero
  padding, so a 28x28 input reaches the first Linear as 7x7x64 = 3136 features.
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    channels: int = 64,
    hidden: int = 1024,
  ):
    super().__init__(input_shape, num_classes, rngs, (channels, channels), hidden)


@register("vgg")
class VGGLike(_BlockCNN):
  """VGG-like CIFAR-10 CNN of the forward-gradient reproduction study.

  Three blocks of [conv3x3-ReLU, conv3x3-ReLU, maxpool 2x2] with 64, 128 and 256
  channels (padding 1, i.e. 'SAME'), then Linear(4096)-ReLU, Linear(num_classes). On a
  32x32x3 input the flattened feature map is 4x4x256 = 4096.
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    channels: Sequence[int] = (64, 128, 256),
    hidden: int = 4096,
  ):
    super().__init__(input_shape, num_classes, rngs, tuple(channels), hidden)


@register("deep_mlp")
class DeepMLP(nnx.Module):
  """Bias-free ReLU MLP of adjustable depth for the scalability (depth) study.

  How ``depth`` is counted: ``depth`` = L is the number of hidden Linear layers, each
  ``width`` wide, without bias and followed by ReLU. A bias-free Linear head to
  ``num_classes`` comes on top and is NOT counted, so the model has L + 1 weight
  matrices and no other parameters. ``depth=0`` is bias-free logistic regression.

  Weights default to He-normal: with no bias and ReLU, the flax default (LeCun) halves
  the activation variance per layer, so deep nets would start with vanishing signal and
  the depth study would measure that instead of the gradient estimator.
  """

  def __init__(
    self,
    *,
    input_shape: Shape,
    num_classes: int,
    rngs: nnx.Rngs,
    depth: int = 4,
    width: int = 1024,
    kernel_init: str = "he_normal",
  ):
    if int(depth) != depth or depth < 0:
      raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
    self.depth = int(depth)
    init = _kernel_init(kernel_init)
    widths = [math.prod(input_shape)] + [int(width)] * self.depth
    self.hidden = nnx.List(
      [
        nnx.Linear(a, b, use_bias=False, kernel_init=init, rngs=rngs)
        for a, b in itertools.pairwise(widths)
      ]
    )
    self.head = nnx.Linear(widths[-1], num_classes, use_bias=False, kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = _flatten(x)
    for layer in self.hidden:
      h = jax.nn.relu(layer(h))
    return self.head(h)


# Models kept in their own modules register themselves on import.
from fwdgrad_jax import models_flugel as _models_flugel  # noqa: E402, F401  (resnet18, vit)
from fwdgrad_jax import models_yao as _models_yao  # noqa: E402, F401  (Yao's CNN, "yao_cnn")
