"""Fast, side-effect-free curvature of a PyTorch model's training loss.

The Hessian ``H = ∇²L(θ)`` of the mean loss over the data is the object from which the
sharpness dimension of Tuci, Korkmaz, Şimşekli and Birdal ("Generalization at the Edge of
Stability", arXiv:2604.19740) is computed. This package provides it as a linear operator:

- :class:`HessianOperator` — products ``H v`` / ``H V`` in six modes (``"reuse"``,
  ``"fwd-rev"``, ``"rev-rev"``, ``"double-backward"``, ``"linearize"``,
  ``"finite-difference"``), the default chosen by measurement per device, with automatic
  fallback; :func:`hvp` is its one-shot form;
- :class:`GGNOperator` — the positive semi-definite generalised Gauss–Newton matrix;
- :class:`FunctionalLoss` / :func:`make_functional_loss` — the loss as a pure function of the
  trainable parameters (differentiable to any order), with buffers, dropout, flags and RNG
  left untouched.
"""

from sdopt.curvature.functional import (
    CurvatureRandomnessWarning,
    FunctionalLoss,
    ModelLoss,
    make_functional_loss,
)
from sdopt.curvature.ggn import GGNOperator
from sdopt.curvature.operators import (
    MODES,
    CurvatureFallbackWarning,
    CurvatureOperator,
    HessianOperator,
    default_mode,
    hvp,
)
from sdopt.curvature.products import CurvatureApproximationWarning

__all__ = [
    "MODES",
    "CurvatureApproximationWarning",
    "CurvatureFallbackWarning",
    "CurvatureOperator",
    "CurvatureRandomnessWarning",
    "FunctionalLoss",
    "GGNOperator",
    "HessianOperator",
    "ModelLoss",
    "default_mode",
    "hvp",
    "make_functional_loss",
]
