"""Model zoo and the pure-function boundary used by the gradient estimators.

Every model is a Flax NNX module that takes a batch of NHWC ``float32`` images and
returns logits of shape ``(batch, num_classes)``. Models are looked up by name in
:data:`MODELS`; adding a new architecture means one file in this package with a class
whose constructor is ``__init__(self, *, input_shape, num_classes, rngs, **options)``,
decorated with ``@register("name")``, imported below, and a config file -- nothing else
changes.

The package holds one module per family, none reaching into another's privates:

* :mod:`.registry` -- ``register``/``create`` and the pure-function boundary below;
* :mod:`.layers` -- building blocks shared by the families (activations, initialisers,
  a cheap-to-compile conv initialiser, pooling);
* :mod:`.baydin` -- logistic regression, MLP, the small CNNs, VGG-like, deep MLP;
* :mod:`.flugel2024` -- ResNet18 and a small ViT (Flügel et al. 2024);
* :mod:`.yao` -- Yao's CNN;
* :mod:`.local` -- local losses (heads, the marked total) and Ren et al.'s LocalMixer.

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

# The families register themselves on import.
from fwdgrad_jax.models import flugel2024, yao  # noqa: F401
from fwdgrad_jax.models.baydin import MLP, BaydinCNN, DeepMLP, LogReg, VGGLike
from fwdgrad_jax.models.layers import ACTIVATIONS
from fwdgrad_jax.models.local import (
  LocalHead,
  LocalMixer,
  has_local_losses,
  local_losses_total,
  train_loss,
)
from fwdgrad_jax.models.registry import (
  MODELS,
  Shape,
  apply_fn,
  apply_with_state_fn,
  count_params,
  create,
  eval_graphdef,
  register,
  split,
)

__all__ = [
  "ACTIVATIONS",
  "MLP",
  "MODELS",
  "BaydinCNN",
  "DeepMLP",
  "LocalHead",
  "LocalMixer",
  "LogReg",
  "Shape",
  "VGGLike",
  "apply_fn",
  "apply_with_state_fn",
  "count_params",
  "create",
  "eval_graphdef",
  "has_local_losses",
  "local_losses_total",
  "register",
  "split",
  "train_loss",
]
