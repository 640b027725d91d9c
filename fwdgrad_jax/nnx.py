"""Forward gradients for Flax NNX models: an ``nnx.Optimizer`` that estimates its own gradient.

A train step reads like Flax's MNIST tutorial, with the gradient estimator named once::

  import fwdgrad_jax.nnx  # needs the [train] extra (Flax)

  optimizer = fwdgrad_jax.nnx.ForwardOptimizer(
      model, optax.adam(1e-3), loss_fn, num_tangents=4, perturbation="activity", key=0)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    return optimizer.update(model, x, y)  # the loss of this step (a fresh array)

  model.eval()  # BatchNorm's running averages, no Dropout: evaluate as usual

:class:`ForwardOptimizer` does what a hand-written step gets wrong (issue 24): it splits
the model into ``nnx.Param`` (differentiated) and the rest, merges a *copy* inside the
estimator's trace (never writing into Variables of another trace level), runs the loss in
train mode, and writes the copy's new state back into ``model`` — BatchNorm's running
statistics and the Dropout RNG counts, so every step draws a new dropout mask. No aux has
to be seeded before the first step and nothing is kept in a mutable buffer: ``update``
returns the step's loss as a new array.

This module is part of the app layer (it imports Flax); ``import fwdgrad_jax`` does not
load it.

References:
  Baydin et al., 2022. Gradients without Backpropagation. arXiv:2202.08587.
  Ren et al., 2023. Scaling Forward Gradient With Local Losses. arXiv:2210.03310.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

try:
  from flax import nnx
except ModuleNotFoundError as err:  # pragma: no cover - exercised by tests/test_nnx.py
  raise ModuleNotFoundError(
    "fwdgrad_jax.nnx needs Flax, which comes with the [train] extra: "
    "pip install 'fwdgrad_jax[train]' (the core, import fwdgrad_jax, needs only jax, optax "
    "and numpy).",
    name=err.name,
  ) from err

from fwdgrad_jax import registry, schemes

__all__ = ["ForwardOptimizer"]


class ForwardOptimizer(nnx.Optimizer):
  """An ``nnx.Optimizer`` whose ``update(model, *batch)`` estimates the gradient itself.

  ``loss_fn(model, *args, **kwargs)`` is called on a train-mode copy of ``model`` holding
  the parameters being differentiated; it returns a scalar loss, per-example losses of
  shape ``(batch,)`` (with ``perturbation="activity"`` every example gets its own
  directional derivative; other estimators take their mean), or ``(loss, aux)`` with
  ``has_aux=True``. Local losses (:func:`fwdgrad_jax.local_loss`) and activity sites
  (:func:`fwdgrad_jax.site`) placed inside the model are honoured as by
  :func:`fwdgrad_jax.value_and_forward_grad`.

  Being an ``nnx.Optimizer`` (``step``, ``opt_state``, ``tx``, ``wrt``), it goes through
  ``nnx.jit`` and checkpoints like one; its extra state is the estimator's RNG stream.
  Its ``update`` differs: it takes the loss's arguments, not gradients.
  """

  def __init__(
    self,
    model: nnx.Module,
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., Any],
    *,
    key: jax.Array | int,
    estimator: str = "forward",
    has_aux: bool = False,
    train: bool = True,
    wrt: Any = nnx.Param,
    **options: Any,
  ):
    """Builds the optimizer and checks the estimator's options (here, with a name).

    Args:
      model: the NNX model; only its ``wrt`` variables are differentiated and updated.
      tx: the optax optimizer applied to the estimate (``optax.adam(1e-3)``…).
      loss_fn: ``loss_fn(model, *args, **kwargs)`` → loss, per-example losses, or
        ``(loss, aux)`` with ``has_aux``.
      key: PRNG key or integer seed of the tangents; each step draws from a fresh key.
      estimator: a name of :data:`fwdgrad_jax.ESTIMATORS` with a function-transform form:
        ``"forward"`` (default) or ``"backprop"`` (the exact gradient, for a baseline).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``update`` then returns both.
      train: run ``loss_fn`` on a copy in train mode (``Module.train()``: Dropout on,
        BatchNorm on batch statistics) whatever mode ``model`` is in, so an evaluation
        that leaves ``model.eval()`` set does not silently turn Dropout off in training.
        ``False`` keeps the model's own mode.
      wrt: the filter of the differentiated variables (``nnx.Param``).
      **options: the estimator's options, :data:`fwdgrad_jax.estimators.FORWARD_OPTIONS`
        (``num_tangents``, ``tangents``, ``aggregation``, ``perturbation``, ``rescale``…).

    Raises:
      ValueError: an unknown estimator or a bad option, named.
    """
    if "key" in options or "has_aux" in options:
      raise ValueError("pass key= and has_aux= by name, once (not inside the options).")
    make = registry.get_estimator(estimator)
    if estimator != "forward" and options:
      raise ValueError(f"estimator={estimator!r} takes no options, got {sorted(options)}.")
    if estimator == "forward":
      self.per_example = schemes.parse(
        options.get("tangents", "normal"),
        perturbation=options.get("perturbation", "weights"),
        normalize=options.get("normalize", False),
        regenerate=options.get("regenerate", False),
      ).per_example
    else:
      self.per_example = False
    # Built once now so a bad option fails here rather than inside the first jit trace.
    make(lambda p: jnp.sum(p), has_aux=False, **options)
    super().__init__(model, tx, wrt=wrt)
    self.loss_fn = loss_fn
    self.has_aux = has_aux
    self.train_mode = train
    self.estimator = estimator
    self.options = dict(options)
    self.rngs = nnx.Rngs(tangents=key)

  def _value_fn(self, graphdef: nnx.GraphDef) -> Callable[..., Any]:
    def value_fn(params, rest, args, kwargs):
      # copy=True: the forward pass writes BatchNorm statistics and RNG counts into fresh
      # Variables of this trace; they come back as aux and are written into the model
      # after the estimate (never from inside the jvp's trace).
      model = nnx.merge(graphdef, params, rest, copy=True)
      if self.train_mode:
        model.train()
      out = self.loss_fn(model, *args, **kwargs)
      loss, aux = out if self.has_aux else (out, None)
      if jnp.ndim(loss) == 1 and not self.per_example:
        loss = jnp.mean(loss)
      new_rest = nnx.as_pure(nnx.state(model, nnx.Not(self.wrt)))
      return loss, (aux, new_rest)

    return value_fn

  def update(self, model: nnx.Module, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
    """One step: the estimate of ∇ ``loss_fn(model, *args, **kwargs)``, then ``tx``.

    Writes the new parameters and the forward pass's new state (BatchNorm statistics,
    Dropout RNG counts) into ``model``; call it inside ``nnx.jit``.

    Args:
      model: the model this optimizer was built for.
      *args, **kwargs: passed to ``loss_fn`` after the model (a batch).

    Returns:
      The step's loss (the mean of per-example losses), a new array every step; with
      ``has_aux``, ``(loss, aux)``.
    """
    graphdef, params, rest = nnx.split(model, self.wrt, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    make = registry.get_estimator(self.estimator)
    value_and_grad = make(self._value_fn(graphdef), has_aux=True, **self.options)
    (loss, (aux, new_rest)), grads = value_and_grad(
      self.rngs.tangents(), params, rest, args, kwargs
    )
    nnx.update(model, new_rest)
    opt_state = nnx.as_pure(self.opt_state)
    updates, new_opt_state = self.tx.update(grads, opt_state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    nnx.update(self.opt_state, nnx.state(new_opt_state))
    self.step[...] += 1
    loss = jnp.mean(loss) if jnp.ndim(loss) else loss
    return (loss, aux) if self.has_aux else loss
