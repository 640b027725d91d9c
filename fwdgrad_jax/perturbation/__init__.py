"""Where tangents enter: structured weight tangents and activity perturbation, for any JAX function.

A dense forward gradient perturbs every weight with an i.i.d. tangent. The schemes that
make forward gradients work change *where the tangent enters the network*; this module
does that in true forward mode (``jax.jvp`` rules, no simulation with backprop) for an
arbitrary function ``fun(params, *args)``:

* ``tangents="rank1"``: a parameter leaf W consumed by a ``dot_general`` or a
  ``conv_general_dilated`` (what ``@``, ``jnp.einsum``, ``nnx.Linear``, ``nnx.Conv``
  lower to) gets the tangent a ⊗ b, a Gaussian over the contracted (input) axes and b
  Gaussian over the output axes. E[vvᵀ] = E[aaᵀ] ⊗ E[bbᵀ] = I keeps the estimate
  unbiased, and x·(a ⊗ b) = (x·a) ⊗ b costs O(batch·(in + out)) instead of
  O(batch·in·out): the factored tangent never meets a full matmul.
* ``tangents="input"``: Yao's input-generated tangents, a taken from the layer's input
  batch u (rows × in): a = √m · q_j, q_j a uniformly drawn column of Q in uᵀ = QR
  (m = rank = min(rows, in)). E[aaᵀ] = Q Qᵀ is the projector onto the span of the
  inputs, which holds the minibatch gradient of W (∇W = uᵀ ∂f/∂z), so with b ~ N(0, I)
  the estimate is unbiased for the minibatch gradient; the factor √m is Yao's "multiply
  by the batch size" (m = batch size when the batch is smaller than the fan-in).
* ``tangents="input_approx"``: Yao's cheap approximation, a = √rows · u_j / ‖u_j‖ for a
  uniformly drawn input row j (no QR). It equals the QR scheme — and is unbiased — when
  the rows are orthogonal; for correlated inputs it is biased toward the dominant input
  directions (E[aaᵀ] = Σ_j û_j û_jᵀ instead of a projector). Yao's argument is that
  high-dimensional rows are nearly orthogonal.
* ``perturbation="activity"`` (Ren et al. 2023; Flügel et al.'s network runs): the
  tangents enter at the *outputs* z of every parameter-consuming op (a bias added right
  after is part of that output), weights carry none. The directional derivative
  estimates ∇_z; the parameters' estimate is the local VJP of the op at that estimate
  (for z = x·W: ĝ_W = xᵀ ĝ_z) — no backward pass through the network. With per-example
  losses (``fun`` returns shape (batch,)) every example has its own directional
  derivative, so the dimension perturbed per example is its number of activations.
* :func:`site`: an identity marker on a block's output (Flügel's "layers"). With marked
  sites, activity tangents enter there only, and the parameters inside a block get their
  estimate by a local VJP within the block.
* :func:`local_loss`: an identity marker on a local loss (Ren et al.'s local greedy
  losses). Each activity site, or weight leaf, is credited only with the directional
  derivatives of the marked losses it reaches, read from the same jvp pass.

Mechanism: a small interpreter over ``fun``'s jaxpr. ``jax.make_jaxpr`` gives the
program; ``jit``/``remat`` calls are inlined; each parameter leaf is followed through
``convert_element_type``/``transpose``/``copy`` to the op that consumes it; every other
equation is evaluated by ``jax.jvp`` of its own primitive with the k tangents vmapped
and the primal unbatched (so the forward pass runs once, whatever k). Why a jaxpr
interpreter and not markers or a custom Flax module: it works for *any* JAX function —
plain ``@``, ``einsum``, NNX and Linen models alike — without the model's cooperation,
and what it does not understand it handles exactly instead of refusing: where a
rank-1 leaf is consumed by anything else (a weight-decay term, a ``scan``, a ``cond``,
a custom derivative rule) that use gets the dense form a ⊗ b of the *same* tangent —
the identical estimate, only slower. Activity sites need no markers either; markers
only coarsen them into blocks.

Layout: :mod:`.markers` (the :func:`site` and :func:`local_loss` markers, primitives of their own), :mod:`.credit` (which marked losses a value reaches), :mod:`.program`
(the flat program and one op's evaluation), :mod:`.rules` (per-primitive rules, keyed by
the primitive objects), :mod:`.draws` (the interpreter's hash draws), :mod:`.weights` (the
weights pass), :mod:`.activity` (the activity pass), :mod:`.options`. The tangent types
(:class:`~fwdgrad_jax.tangents.Rank1`) live in :mod:`fwdgrad_jax.tangents`.

References:
  Baydin et al., 2022. Gradients without Backpropagation. arXiv:2202.08587.
  Ren et al., 2023. Scaling Forward Gradient With Local Losses. ICLR 2023.
  Flügel et al., 2024. Multi-Tangent Forward Gradients. arXiv:2410.17764.
  Yao. Studies on Forward Mode Gradient Descent (input-generated tangents).
"""

from fwdgrad_jax.perturbation.activity import activity_estimate
from fwdgrad_jax.perturbation.credit import credited, loss_ids
from fwdgrad_jax.perturbation.markers import fwdgrad_site, local_loss, local_loss_p, site, site_p
from fwdgrad_jax.perturbation.options import (
  ACTIVITY_TANGENTS,
  GUESS_TANGENTS,
  PERTURBATIONS,
  STRUCTURED_TANGENTS,
)
from fwdgrad_jax.perturbation.program import Op, Program, evaluate, flatten, trace
from fwdgrad_jax.perturbation.rules import FACTORED_RULES, LINEAR_PRIMITIVES, VIEW_RULES
from fwdgrad_jax.perturbation.weights import (
  local_losses_of,
  regenerated_gram,
  regenerated_jvps,
  weight_tangents_and_jvps,
)
from fwdgrad_jax.tangents import Rank1, is_rank1

# The private names the tests (and one release of callers) reach for.
_flatten_program = flatten
_trace = trace

__all__ = [
  "ACTIVITY_TANGENTS",
  "GUESS_TANGENTS",
  "FACTORED_RULES",
  "LINEAR_PRIMITIVES",
  "Op",
  "PERTURBATIONS",
  "Program",
  "Rank1",
  "STRUCTURED_TANGENTS",
  "VIEW_RULES",
  "activity_estimate",
  "credited",
  "evaluate",
  "flatten",
  "fwdgrad_site",
  "is_rank1",
  "local_loss",
  "local_loss_p",
  "local_losses_of",
  "loss_ids",
  "regenerated_gram",
  "regenerated_jvps",
  "site",
  "site_p",
  "trace",
  "weight_tangents_and_jvps",
]
