"""fwdgrad_jax: forward gradients for JAX — gradient estimates from jax.jvp along random tangents.

The core is pure functions over pytrees; models, data and the training loop live in
their own modules and are imported explicitly (``from fwdgrad_jax import train``).
"""

from fwdgrad_jax import (
  aggregation,
  functions,
  metrics,
  parallel,
  perturbation,
  registry,
  schemes,
  tangents,
)
from fwdgrad_jax.estimators import (
  cap_jvp_norm,
  directional_derivatives,
  expected_norm_ratio,
  forward_grad,
  value_and_exact_grad,
  value_and_forward_grad,
)
from fwdgrad_jax.guided import GuidedForwardGradientState, guided_forward_gradient
from fwdgrad_jax.metrics import cosine_similarity, norm_ratio
from fwdgrad_jax.perturbation import local_loss, site
from fwdgrad_jax.registry import ESTIMATORS, get_estimator, gradient_transform
from fwdgrad_jax.transforms import (
  ExactGradientState,
  ForwardGradientState,
  exact_gradient,
  forward_gradient,
)

__version__ = "0.1.0"

__all__ = [
  "ESTIMATORS",
  "ExactGradientState",
  "ForwardGradientState",
  "GuidedForwardGradientState",
  "aggregation",
  "cap_jvp_norm",
  "cosine_similarity",
  "directional_derivatives",
  "exact_gradient",
  "expected_norm_ratio",
  "forward_grad",
  "forward_gradient",
  "functions",
  "get_estimator",
  "gradient_transform",
  "guided_forward_gradient",
  "local_loss",
  "metrics",
  "norm_ratio",
  "parallel",
  "perturbation",
  "registry",
  "schemes",
  "site",
  "tangents",
  "value_and_exact_grad",
  "value_and_forward_grad",
]
