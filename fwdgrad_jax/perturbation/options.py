"""The names of the options that choose where tangents enter (checked by :mod:`fwdgrad_jax.schemes`)."""

from __future__ import annotations

#: Where the tangents enter.
PERTURBATIONS = ("weights", "activity")
#: Weight-tangent schemes handled here (structured by the op that consumes the leaf).
STRUCTURED_TANGENTS = ("rank1", "input", "input_approx")
#: Distributions of the activity tangents.
ACTIVITY_TANGENTS = ("normal", "rademacher")
#: Activity tangents that start with a guess: the gradient of each site's own local
#: losses through its head (Fournier et al. 2023), then random tangents of the first
#: :data:`ACTIVITY_TANGENTS` distribution.
GUESS_TANGENTS = ("local_guess",)
