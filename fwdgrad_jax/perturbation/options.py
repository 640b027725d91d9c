"""The names of the options that choose where tangents enter (checked by :mod:`fwdgrad_jax.schemes`)."""

from __future__ import annotations

#: Where the tangents enter.
PERTURBATIONS = ("weights", "activity")
#: Weight-tangent schemes handled here (structured by the op that consumes the leaf).
STRUCTURED_TANGENTS = ("rank1", "input", "input_approx")
#: Distributions of the activity tangents.
ACTIVITY_TANGENTS = ("normal", "rademacher")
