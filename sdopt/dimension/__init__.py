"""The sharpness dimension: exponent maps, Kaplan–Yorke, estimators and a smooth surrogate.

Implements the sharpness dimension of Tuci, Korkmaz, Şimşekli and Birdal, "Generalization at the
Edge of Stability" (arXiv:2604.19740, Def. 4.1/4.2) and the project's extensions (optimizer-aware
exponent maps, a top-k + bulk estimator, a differentiable surrogate). Submodules:

* :mod:`sdopt.dimension.kaplan_yorke` — exact formulas
* :mod:`sdopt.dimension.exponents` — exponent maps (gd, heavy ball, Adam)
"""

from __future__ import annotations

from sdopt.dimension.exponents import (
    adam_preconditioner,
    lyapunov_exponents,
    preconditioned_operator,
)
from sdopt.dimension.kaplan_yorke import (
    kaplan_yorke_dimension,
    sharpness_dimension,
    weighted_kaplan_yorke,
)

__all__ = [
    "adam_preconditioner",
    "kaplan_yorke_dimension",
    "lyapunov_exponents",
    "preconditioned_operator",
    "sharpness_dimension",
    "weighted_kaplan_yorke",
]
