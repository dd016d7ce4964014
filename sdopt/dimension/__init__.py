"""The sharpness dimension: exponent maps, Kaplan–Yorke, estimators and a smooth surrogate.

Implements the sharpness dimension of Tuci, Korkmaz, Şimşekli and Birdal, "Generalization at the
Edge of Stability" (arXiv:2604.19740, Def. 4.1/4.2) and the project's extensions (optimizer-aware
exponent maps, a top-k + bulk estimator, a differentiable surrogate). Submodules:

* :mod:`sdopt.dimension.kaplan_yorke` — exact formulas
* :mod:`sdopt.dimension.exponents` — exponent maps (gd, heavy ball, Adam)
* :mod:`sdopt.dimension.sketch` — product-free SD from a stored spectrum, for any learning rate
* :mod:`sdopt.dimension.surrogate` — the differentiable surrogate
* :mod:`sdopt.dimension.penalty` — the surrogate as a penalty, two-gradient estimator
* :mod:`sdopt.dimension.estimators` — exact, SLQ/KDE/PS (the paper's) and top-k estimators
"""

from __future__ import annotations

from sdopt.dimension.estimators import (
    SharpnessDimensionEstimate,
    estimate_sharpness_dimension,
)
from sdopt.dimension.exponents import (
    adam_preconditioner,
    edge_of_stability,
    lyapunov_exponents,
    preconditioned_operator,
)
from sdopt.dimension.kaplan_yorke import (
    kaplan_yorke_dimension,
    sharpness_dimension,
    weighted_kaplan_yorke,
)
from sdopt.dimension.penalty import (
    penalty_gradient,
    rayleigh_quotients,
    sharpness_dimension_penalty,
)
from sdopt.dimension.sketch import SpectrumSketch, sd_from_spectrum
from sdopt.dimension.surrogate import (
    smooth_sharpness_dimension,
    smooth_sharpness_dimension_from_estimate,
    surrogate_temperature,
    surrogate_weights,
)

__all__ = [
    "SharpnessDimensionEstimate",
    "SpectrumSketch",
    "adam_preconditioner",
    "edge_of_stability",
    "estimate_sharpness_dimension",
    "kaplan_yorke_dimension",
    "lyapunov_exponents",
    "penalty_gradient",
    "preconditioned_operator",
    "rayleigh_quotients",
    "sd_from_spectrum",
    "sharpness_dimension",
    "sharpness_dimension_penalty",
    "smooth_sharpness_dimension",
    "smooth_sharpness_dimension_from_estimate",
    "surrogate_temperature",
    "surrogate_weights",
    "weighted_kaplan_yorke",
]
