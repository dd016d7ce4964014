"""sdopt: measure, log and steer the sharpness dimension of training dynamics.

The sharpness dimension (SD) is the Kaplan–Yorke (Lyapunov) dimension of the gradient-descent
map ``w -> w - lr * grad L(w)`` computed from the Hessian spectrum and the learning rate
(Tuci, Korkmaz, Şimşekli, Birdal, "Generalization at the Edge of Stability", arXiv:2604.19740).

Public names are imported lazily (PEP 562) so that ``import sdopt`` stays fast and optional
dependencies are only touched when used. The grouped ``__all__`` below is the public API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> submodule that defines it, grouped by concept (data flows top to bottom).
_EXPORTS: dict[str, str] = {
    # curvature: Hessian-vector products and operators
    "HessianOperator": "curvature",
    "GGNOperator": "curvature",
    "hvp": "curvature",
    # spectrum: eigenpairs, trace, spectral density
    "EigenResult": "spectrum",
    "top_eigenpairs": "spectrum",
    "TraceEstimate": "spectrum",
    "hutchinson_trace": "spectrum",
    "hutchpp_trace": "spectrum",
    "SpectralDensity": "spectrum",
    "stochastic_lanczos_quadrature": "spectrum",
    # dimension: exponent maps, Kaplan–Yorke, estimators, differentiable surrogate
    "kaplan_yorke_dimension": "dimension",
    "sharpness_dimension": "dimension",
    "lyapunov_exponents": "dimension",
    "SharpnessDimensionEstimate": "dimension",
    "estimate_sharpness_dimension": "dimension",
    "smooth_sharpness_dimension": "dimension",
    "sharpness_dimension_penalty": "dimension",
    "penalty_gradient": "dimension",
    "sd_from_spectrum": "dimension",
    # measures: neighbouring sharpness and complexity measures
    "compute_measures": "measures",
    # optimizer, records and loggers
    "SDOptimizer": "optim",
    "EstimateRecord": "records",
    "WandbLogger": "loggers",
    "CSVLogger": "loggers",
    "JSONLLogger": "loggers",
    "ConsoleLogger": "loggers",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'sdopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sdopt.{module_name}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - static analysers see the eager imports
    from sdopt.curvature import GGNOperator, HessianOperator, hvp
    from sdopt.dimension import (
        SharpnessDimensionEstimate,
        estimate_sharpness_dimension,
        kaplan_yorke_dimension,
        lyapunov_exponents,
        penalty_gradient,
        sd_from_spectrum,
        sharpness_dimension,
        sharpness_dimension_penalty,
        smooth_sharpness_dimension,
    )
    from sdopt.loggers import ConsoleLogger, CSVLogger, JSONLLogger, WandbLogger
    from sdopt.measures import compute_measures
    from sdopt.optim import SDOptimizer
    from sdopt.records import EstimateRecord
    from sdopt.spectrum import (
        EigenResult,
        SpectralDensity,
        TraceEstimate,
        hutchinson_trace,
        hutchpp_trace,
        stochastic_lanczos_quadrature,
        top_eigenpairs,
    )
