"""The options that choose where tangents enter, and whether the interpreter is needed."""

from __future__ import annotations

from typing import Any

#: Where the tangents enter.
PERTURBATIONS = ("weights", "activity")
#: Weight-tangent schemes handled here (structured by the op that consumes the leaf).
STRUCTURED_TANGENTS = ("rank1", "input", "input_approx")
#: Distributions of the activity tangents.
ACTIVITY_TANGENTS = ("normal", "rademacher")


def check_options(perturbation: Any, tangents: Any, normalize: bool) -> None:
  """Validates the combination of perturbation and tangent scheme; raises ValueError."""
  if perturbation not in PERTURBATIONS:
    raise ValueError(
      f"perturbation={perturbation!r} is not known; use one of {list(PERTURBATIONS)}."
    )
  if perturbation == "activity":
    if tangents not in ACTIVITY_TANGENTS:
      raise ValueError(
        f"tangents={tangents!r} does not apply to perturbation='activity' (the tangents are "
        f"activations, not weights); use one of {list(ACTIVITY_TANGENTS)}."
      )
    if normalize:
      raise ValueError("normalize=True applies to weight tangents, not perturbation='activity'.")


def uses_interpreter(perturbation: str, tangents: Any) -> bool:
  """Whether an estimator needs this module (else the dense vmapped jvp does it)."""
  return perturbation == "activity" or (
    isinstance(tangents, str) and tangents in STRUCTURED_TANGENTS
  )
