"""Spectrum of a symmetric operator: extreme eigenpairs, trace and spectral density.

Everything here sees only an operator with ``matmat``/``matvec`` (a
:class:`~sdopt.curvature.HessianOperator`, a :class:`LinearOperator` or a dense symmetric tensor):

- :func:`top_eigenpairs`: thick-restart Lanczos with full reorthogonalisation and warm start;
- :func:`hutchinson_trace`, :func:`hutchpp_trace`: stochastic trace estimates;
- :func:`stochastic_lanczos_quadrature`: the spectral density as a :class:`SpectralDensity`
  that integrates functions of the spectrum (what the sharpness dimension of Tuci, Korkmaz,
  Şimşekli and Birdal, "Generalization at the Edge of Stability", arXiv:2604.19740, needs for the
  bulk of the spectrum).
"""

from sdopt.spectrum.density import SpectralDensity, stochastic_lanczos_quadrature
from sdopt.spectrum.lanczos import EigenResult, top_eigenpairs
from sdopt.spectrum.operators import (
    LinearOperator,
    as_operator,
    deflated,
    gd_map_squared,
    preconditioned,
    scaled,
    shifted,
)
from sdopt.spectrum.trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = [
    "EigenResult",
    "LinearOperator",
    "SpectralDensity",
    "TraceEstimate",
    "as_operator",
    "deflated",
    "gd_map_squared",
    "hutchinson_trace",
    "hutchpp_trace",
    "preconditioned",
    "scaled",
    "shifted",
    "stochastic_lanczos_quadrature",
    "top_eigenpairs",
]
