"""A differentiable surrogate of the sharpness dimension and its gradient in the eigenvalues.

The sharpness dimension (Tuci, Korkmaz, Şimşekli, Birdal, arXiv:2604.19740, Def. 4.2) is a
piecewise function of the Lyapunov exponents. It has a sort-free form: with ``(x)_+ = max(x, 0)``
and exponents ``z_i`` of weights ``w_i`` (total finite mass ``D = Σ w_i``; ``D = d`` for the GD
map, ``2d`` for the heavy ball),

    SD = min( D, inf_{t<0} F(t) ),     F(t) = Σ_i w_i (z_i − t)_+ / (−t),

because the sum of the ``x`` largest exponents is ``min_t [t·x + Σ_i w_i (z_i − t)_+]`` (the
piecewise-linear partial sums of Kaplan–Yorke) and SD is the largest ``x`` where it is ``≥ 0``.
At the minimiser ``t* = λ_{j*+1}`` (the exponent at the crossing) this is ``j* + S_{j*}/|t*|``.

The surrogate replaces ``(x)_+`` by ``τ·softplus(x/τ)`` (temperature ``τ > 0``, in exponent
units) and keeps the exact minimum over ``t``, found by bisection on the monotone function
``h(t) = N(t) + (−t)N'(t)`` (``F_τ`` is quasi-convex, ``N(t) = Σ w_i τ softplus((z_i − t)/τ)``).
By the envelope theorem ``∂S_τ/∂z_i = w_i σ((z_i − t_τ)/τ)/(−t_τ) ≥ 0``; as ``τ → 0`` this tends
to the exact ``∂SD/∂z_i``: ``w_i/|t*|`` above the crossing, ``0`` below, the fractional part
over ``|t*|`` at it.

**Bias, and the default temperature.** ``τ softplus(x/τ) − (x)_+ = τ softplus(−|x|/τ)``, so for
any ``t₀ < 0`` with ``F(t₀) = SD``

    0 ≤ S_τ − SD ≤ B(τ) = Σ_i w_i τ softplus(−|z_i − t₀|/τ) / |t₀|   (≤ τ D log 2 / |t₀|).

A fixed absolute ``τ`` can be useless: with a near-zero bulk the exponents sit within ``τ`` of
``t* ≈ 0⁻`` and ``B`` is of order ``D`` (a PSD Hessian below the edge, exact SD 0, gives
``S_{0.1} ≈ d``). ``temperature=None`` (the default) therefore solves exactly first (``τ → 0``:
the weighted Kaplan–Yorke number of the same measure, SD and the crossing exponent ``t*``) and
then picks ``τ`` by bisection in ``log τ`` (to a factor 1.0005), with ``ρ = 1 %``:

* ``0 < SD < D``: the largest ``τ ≤ |t*|`` with ``B(τ) ≤ ρ · min(SD, D − SD)`` (``t₀ = t*``;
  ``B`` is increasing in ``τ``). Hence ``0 ≤ S_τ − SD ≤ 1 %`` of ``min(SD, D − SD)``.
* ``SD = 0`` (every exponent negative, e.g. a PSD Hessian below the edge): the largest
  ``τ ≤ |z_max|/2`` at which the surrogate, evaluated exactly, has ``S_τ ≤ ρ`` and is flat,
  ``‖∂S_τ/∂z‖₁ ≤ ρ`` (at the minimiser ``Σ_i ∂S_τ/∂z_i = S_τ/|t_τ|``, since ``h(t_τ) = 0``).
  Without the flatness condition a ``τ`` relative to ``|z_max|`` leaves ``S_τ`` small but its
  gradient of order ``S_τ/τ``, huge when the bottom eigenvalues are near 0.
* ``T = Σ w_i z_i ≥ 0``: saturated, ``S_τ = D`` for every ``τ`` (gradient 0).

The chosen ``τ`` depends on the spectrum but is held fixed in the autograd graph (the gradient
is ``∂S_τ/∂α`` at that ``τ``); :func:`surrogate_temperature` returns it. A small ``τ`` makes
``S_τ`` close to SD and its gradient close to SD's (which jumps where the crossing moves to
another exponent); an explicit ``temperature`` trades bias for smoothness.

**Exponent maps** (see :mod:`sdopt.dimension.exponents`). ``"gd"``: ``z = ½ log((1 − ηα)² + ε²)``
(``log|1 − ηα|`` at ``ε = 0``, smooth for ``ε > 0``). ``"momentum"`` (heavy ball ``β``): two
exponents per eigenvalue, ``log(|r_±| + ε)`` of the roots of ``r² − (1 + β − ηα) r + β = 0``;
in the complex region ``(1 − √β)² < ηα < (1 + √β)²`` both moduli are ``√β`` (constant, zero
derivative), on the real side the derivative is computed without ``0·∞`` (NaN-free); at the two
boundary points each root has a square-root kink, but ``z₊ + z₋ = log β`` so the kinks cancel
whenever both roots get the same weight. ``"adam"`` (eigenvalues of ``P^{-1/2} H P^{-1/2}``):
the GD map for ``β₁ = 0``, else the heavy ball with step ``η(1 − β₁)`` and momentum ``β₁``.

**What it pushes.** ``∂z/∂α = η/(ηα − 1)`` for GD, so ``∂S/∂α_i > 0`` for ``α_i > 1/η`` and
``< 0`` for ``α_i < 1/η``: descent on ``S`` moves every eigenvalue whose exponent lies above the
crossing (eigenvalues beyond the edge ``2/η``, negative ones, and the near-neutral ones that SD
counts) toward ``1/η`` — the top ones down, the negative and near-zero ones up — with force
``η w_i σ_i/(|t_τ| |1 − ηα_i|)``; exponents below the crossing (the most contracting ones) get
an exponentially small weight. **Where it is flat.** Below the edge with a PSD Hessian (every
exponent negative) SD = 0; at the default ``τ``, ``S_τ ≤ 0.01`` and ``‖∂S_τ/∂z‖₁ ≤ 0.01``;
saturated (``T ≥ 0``) it is constant ``D``; bulk nodes (``bulk_nodes``, ``bulk_trace``) enter the value but
carry no gradient, so only the exact eigenvalues passed in are pushed. Minimising it can also be
achieved by shrinking ``η``; that is not the point of the penalty.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from sdopt._checks import check_choice, check_in_range, check_int, check_positive

__all__ = [
    "RELATIVE_BIAS",
    "smooth_sharpness_dimension",
    "smooth_sharpness_dimension_from_estimate",
    "surrogate_temperature",
    "surrogate_weights",
]

EXPONENT_MAPS = ("gd", "momentum", "adam")
RELATIVE_BIAS = 0.01
"""ρ of the default temperature rule: ``S_τ − SD ≤ ρ · min(SD, D − SD)`` (SD = 0: ``S_τ ≤ ρ``)."""

_BISECTION_STEPS = 200
_TEMPERATURE_STEPS = 16  # τ to a factor (10^15)^(2^-16) ≈ 1.0005


# --------------------------------------------------------------------------- exponents
def _log_modulus(m: torch.Tensor, eps: float) -> torch.Tensor:
    """``log(m + ε)`` with ``-inf`` (and a zero, not NaN, gradient) where ``m + ε = 0``."""
    if eps > 0.0:
        return torch.log(m + eps)
    pos = m > 0
    return torch.where(pos, torch.log(torch.where(pos, m, torch.ones_like(m))), -math.inf)


def _gd_exponents(alpha: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    u = 1.0 - lr * alpha
    if eps == 0.0:
        return _log_modulus(u.abs(), 0.0)
    return 0.5 * torch.log(u * u + eps * eps)


def _heavy_ball_exponents(alpha: torch.Tensor, lr: float, beta: float, eps: float) -> torch.Tensor:
    """Differentiable log-moduli of both roots of ``r² − (1 + β − ηα) r + β = 0``, ``(2n,)``.

    The same values as :func:`sdopt.dimension.exponents.heavy_ball_exponents`; every branch is
    evaluated on safe inputs so that autograd never forms ``0·∞``.
    """
    b = 1.0 + beta - lr * alpha
    disc = b * b - 4.0 * beta
    real = disc > 0
    sq = torch.sqrt(torch.where(real, disc, torch.ones_like(disc)))
    big = 0.5 * (b + torch.where(b >= 0, sq, -sq))
    abs_big = torch.where(real, big.abs(), torch.ones_like(big))  # > 0 on the real side
    root_beta = torch.full_like(b, math.sqrt(beta))
    mod_big = torch.where(real, abs_big, root_beta)
    mod_small = torch.where(real, beta / abs_big, root_beta)
    return torch.cat([_log_modulus(mod_big, eps), _log_modulus(mod_small, eps)])


def _multiplicity(exponent_map: str, momentum: float) -> int:
    return 1 if exponent_map == "gd" or (exponent_map == "adam" and momentum == 0.0) else 2


def _exponents(
    alpha: torch.Tensor, lr: float, exponent_map: str, momentum: float, eps: float
) -> torch.Tensor:
    if exponent_map == "gd":
        return _gd_exponents(alpha, lr, eps)
    if exponent_map == "momentum":
        return _heavy_ball_exponents(alpha, lr, momentum, eps)
    if momentum == 0.0:  # adam with β₁ = 0: I − η P⁻¹H
        return _gd_exponents(alpha, lr, eps)
    return _heavy_ball_exponents(alpha, lr * (1.0 - momentum), momentum, eps)


# --------------------------------------------------------------------------- the measure
def _as_values(values: Any, name: str, like: torch.Tensor) -> torch.Tensor:
    out = torch.as_tensor(values).detach().to(dtype=torch.float64, device=like.device)
    if out.ndim != 1:
        raise ValueError(f"Invalid {name}: shape {tuple(out.shape)} (must be 1-D)")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"Invalid {name}: contains NaN or inf (must be finite)")
    return out


def _measure(
    eigenvalues: Any,
    lr: float,
    weights: Any,
    bulk_nodes: Any,
    bulk_weights: Any,
    bulk_dim: float,
    bulk_trace: Any,
    exponent_map: str,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """Checked inputs → ``(alpha, z, w)`` (exponents with graph to ``alpha``) and the floats."""
    lr = check_positive("lr", lr)
    eps = check_positive("eps", eps, allow_zero=True)
    check_choice("exponent_map", exponent_map, EXPONENT_MAPS)
    momentum = check_in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    if exponent_map == "gd" and momentum > 0:
        raise ValueError(
            f"Invalid momentum: {momentum!r} (the 'gd' map has no momentum; use "
            "exponent_map='momentum')"
        )
    bulk_dim = check_positive("bulk_dim", bulk_dim, allow_zero=True)
    if not isinstance(eigenvalues, torch.Tensor):
        eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    if eigenvalues.ndim != 1 or eigenvalues.numel() == 0:
        raise ValueError(
            f"Invalid eigenvalues: shape {tuple(eigenvalues.shape)} (must be 1-D and non-empty)"
        )
    if eigenvalues.is_complex() or not bool(torch.isfinite(eigenvalues.detach()).all()):
        raise ValueError("Invalid eigenvalues: contains NaN or inf (must be finite)")
    alpha = eigenvalues.to(torch.float64)
    if weights is None:
        w = torch.ones_like(alpha)
    else:
        w = torch.as_tensor(weights).detach().to(alpha)
        if w.shape != alpha.shape or not bool((w >= 0).all()) or not bool(w.isfinite().all()):
            raise ValueError(
                f"Invalid weights: shape {tuple(w.shape)} (must match eigenvalues "
                f"{tuple(alpha.shape)} and be finite and >= 0)"
            )
    parts_a, parts_w = [alpha], [w]
    if bulk_nodes is not None or bulk_weights is not None:
        if bulk_nodes is None or bulk_weights is None:
            raise ValueError(
                "Invalid bulk_nodes/bulk_weights: give both or neither "
                f"(got bulk_nodes={'None' if bulk_nodes is None else 'a tensor'}, "
                f"bulk_weights={'None' if bulk_weights is None else 'a tensor'})"
            )
        bn = _as_values(bulk_nodes, "bulk_nodes", alpha)
        bw = _as_values(bulk_weights, "bulk_weights", alpha)
        if bw.shape != bn.shape or not bool((bw >= 0).all()):
            raise ValueError(
                f"Invalid bulk_weights: shape {tuple(bw.shape)} (must match bulk_nodes "
                f"{tuple(bn.shape)} and be >= 0)"
            )
        parts_a.append(bn)
        parts_w.append(bw)
    if bulk_dim > 0:  # the trace-only bulk model: bulk_dim eigenvalues at their mean
        bt = torch.as_tensor(bulk_trace).to(alpha)
        parts_a.append((bt / bulk_dim).reshape(1))
        parts_w.append(w.new_tensor([bulk_dim]))
    alpha_all = torch.cat(parts_a) if len(parts_a) > 1 else alpha
    w_all = torch.cat(parts_w) if len(parts_w) > 1 else w
    z = _exponents(alpha_all, lr, exponent_map, momentum, eps)
    wz = torch.cat([w_all] * _multiplicity(exponent_map, momentum))
    return alpha, z, wz, lr, momentum


def _exact_solve(z: torch.Tensor, w: torch.Tensor) -> tuple[float, float, float | None]:
    """``(SD, D, t₀)`` of the measure ``Σ w δ_z`` at ``τ = 0``: ``F(t₀) = SD``.

    ``t₀`` is the exponent at the crossing; ``z_max/2`` when every exponent is negative
    (SD = 0); ``None`` when saturated (``T ≥ 0``) or there is no finite exponent.
    """
    zf, wf = _finite_part(z, w)
    mass = float(wf.sum())
    if zf.numel() == 0:
        return 0.0, mass, None
    order = torch.argsort(zf, descending=True)
    zf, wf = zf[order], wf[order]
    if float(zf[0]) < 0:
        return 0.0, mass, 0.5 * float(zf[0])
    partial = torch.cumsum(wf * zf, 0)
    if float(partial[-1]) >= 0:
        return mass, mass, None
    j = int(torch.nonzero(partial >= 0).flatten()[-1])  # exponents 0..j in the partial sum
    t0 = float(zf[j + 1])
    sd = float(wf[: j + 1].sum()) + min(float(partial[j]) / abs(t0), float(wf[j + 1]))
    return sd, mass, t0


_CUTOFF = 600.0  # softplus(−x), σ(−x) < e^{−600} beyond: dropped (no denormal arithmetic)


def _softplus_sum(x: torch.Tensor, w: torch.Tensor) -> float:
    """``Σ w softplus(x)``, terms with ``x < −600`` (each ``< e^{−600} w``) dropped."""
    live = x > -_CUTOFF
    return float((w * torch.where(live, F.softplus(x.clamp(min=-_CUTOFF)), 0.0)).sum())


def _finite_part(z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isfinite(z) & (w > 0)
    return z[keep].detach(), w[keep].detach()


def _slack(gap: torch.Tensor, w: torch.Tensor, t0: float, tau: float) -> float:
    """``B(τ) = Σ w τ softplus(−|z − t₀|/τ) / |t₀|`` (``gap = |z − t₀|``), the bias bound."""
    return tau / abs(t0) * _softplus_sum(-gap / tau, w)


def _optimal_threshold(z: torch.Tensor, w: torch.Tensor, tau: float) -> float | None:
    """The minimiser ``t_τ < 0`` of ``F_τ``, or ``None`` when the infimum is at ``t → −∞``.

    ``z``, ``w``: finite exponents and positive weights (detached).
    """

    def h(t: float) -> float:
        x = (z - t) / tau
        live = x > -_CUTOFF
        xc = x.clamp(min=-_CUTOFF)
        n = tau * float((w * torch.where(live, F.softplus(xc), 0.0)).sum())
        dn = -float((w * torch.where(live, torch.sigmoid(xc), 0.0)).sum())
        return n + (-t) * dn

    # h is increasing in t, h(0-) = N(0) > 0; h(-inf) -> Σ w z (+ softplus slack)
    lo = -1.0
    while h(lo) > 0:
        lo *= 2.0
        if lo < -1e12:
            return None
    hi = 0.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid == lo or mid == hi:
            break
        if h(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def _default_temperature(
    z: torch.Tensor, w: torch.Tensor, relative_bias: float
) -> tuple[float, float, float]:
    """``(τ, bias bound, SD)`` of the default rule (module docstring).

    Inside ``(0, D)``: the largest ``τ ≤ |t*|`` with ``B(τ) ≤ ρ·min(SD, D − SD)``. At SD = 0:
    the largest ``τ ≤ |z_max|/2`` whose surrogate, evaluated exactly, has ``S_τ ≤ ρ`` and
    ``‖∂S_τ/∂z‖₁ = S_τ/|t_τ| ≤ ρ`` (flat).
    """
    zf, wf = _finite_part(z, w)
    sd, mass, t0 = _exact_solve(zf, wf)
    if t0 is None:  # saturated or empty: the surrogate does not depend on τ
        return 1.0, 0.0, sd
    if sd > 0:
        target = relative_bias * min(sd, mass - sd)
        gap = (zf - t0).abs()

        def bias(tau: float) -> float:
            return _slack(gap, wf, t0, tau)

        def ok(tau: float, b: float) -> bool:
            return b <= target

    else:

        def bias(tau: float) -> float:
            t = _optimal_threshold(zf, wf, tau)
            assert t is not None  # every exponent < 0: T < 0
            value = tau * _softplus_sum((zf - t) / tau, wf) / (-t)
            return value if value <= relative_bias * abs(t) else math.inf

        def ok(tau: float, b: float) -> bool:
            return b <= relative_bias

    hi = abs(t0)
    b_hi = bias(hi)
    if ok(hi, b_hi):
        return hi, b_hi, sd
    lo = hi * 1e-15
    b_lo = bias(lo)
    for _ in range(_TEMPERATURE_STEPS):
        mid = math.sqrt(lo * hi)
        b_mid = bias(mid)
        if ok(mid, b_mid):
            lo, b_lo = mid, b_mid
        else:
            hi = mid
    return lo, b_lo, sd


def _surrogate(z: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, tau: float) -> torch.Tensor:
    finite = torch.isfinite(z.detach()) & (w > 0)
    total = w[finite].sum().detach()
    if not bool(finite.any()):
        return total + 0.0 * alpha.sum()
    t = _optimal_threshold(*_finite_part(z, w), tau)
    if t is None:  # saturated at D (total exponent >= 0): constant, zero gradient, graph kept
        return total + 0.0 * alpha.sum()
    zs = torch.where(finite, z, torch.zeros_like(z))
    x = (zs - t) / tau
    n = torch.where(finite, w * F.softplus(x), torch.zeros_like(z)).sum()
    return torch.minimum(n * (tau / (-t)), total)


# --------------------------------------------------------------------------- public API
def surrogate_temperature(
    eigenvalues: Any,
    lr: float,
    *,
    weights: Any = None,
    bulk_nodes: Any = None,
    bulk_weights: Any = None,
    bulk_dim: float = 0.0,
    bulk_trace: Any = 0.0,
    exponent_map: str = "gd",
    momentum: float = 0.0,
    eps: float = 0.0,
    relative_bias: float = RELATIVE_BIAS,
) -> float:
    """The default temperature of :func:`smooth_sharpness_dimension` for this spectrum.

    Solves exactly first (``τ → 0``; SD, the crossing exponent ``t*``), then returns the largest
    ``τ ≤ |t*|`` with ``B(τ) = Σ w_i τ softplus(−|z_i − t*|/τ)/|t*| ≤ ρ · min(SD, D − SD)``,
    which guarantees ``0 ≤ S_τ − SD ≤ B(τ)``; when SD = 0, the largest ``τ ≤ |z_max|/2`` with
    ``S_τ ≤ ρ`` and ``‖∂S_τ/∂z‖₁ ≤ ρ`` (evaluated exactly). Module docstring; SD is Def. 4.2 of
    Tuci et al., arXiv:2604.19740. Returns ``1.0`` when the surrogate does not depend on ``τ``
    (saturated, ``T ≥ 0``).

    Args:
        eigenvalues: 1-D exact eigenvalues (as in :func:`smooth_sharpness_dimension`).
        lr: learning rate ``η > 0``.
        weights: their multiplicities (default ones).
        bulk_nodes: bulk eigenvalue nodes.
        bulk_weights: their weights.
        bulk_dim: trace-only bulk size.
        bulk_trace: trace-only bulk sum.
        exponent_map: ``"gd"``, ``"momentum"`` or ``"adam"``.
        momentum: heavy-ball ``β`` or Adam's ``β₁``.
        eps: ``ε ≥ 0`` inside the logarithm.
        relative_bias: ``ρ ∈ (0, 1)`` (default :data:`RELATIVE_BIAS` = 0.01).

    Returns:
        ``τ > 0`` in exponent units.
    """
    rho = check_in_range("relative_bias", relative_bias, 0.0, 1.0, low_open=True, high_open=True)
    _, z, w, _, _ = _measure(
        eigenvalues, lr, weights, bulk_nodes, bulk_weights, bulk_dim, bulk_trace,
        exponent_map, momentum, eps,
    )  # fmt: skip
    return _default_temperature(z, w, rho)[0]


def smooth_sharpness_dimension(
    eigenvalues: torch.Tensor,
    lr: float,
    *,
    temperature: float | None = None,
    weights: torch.Tensor | None = None,
    bulk_nodes: torch.Tensor | None = None,
    bulk_weights: torch.Tensor | None = None,
    exponent_map: str = "gd",
    momentum: float = 0.0,
    eps: float = 0.0,
    bulk_dim: float = 0.0,
    bulk_trace: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Smooth sharpness dimension ``S_τ``, differentiable in the exact ``eigenvalues``.

    ``S_τ = min(D, min_{t<0} Σ_i w_i τ softplus((z_i − t)/τ)/(−t))`` over the exponents ``z_i``
    of the exact eigenvalues and of the bulk (Tuci, Korkmaz, Şimşekli, Birdal,
    arXiv:2604.19740, Def. 4.2, in its sort-free form; module docstring). Tends to the
    Kaplan–Yorke number of the same measure as ``τ → 0``; at the default temperature
    ``0 ≤ S_τ − SD ≤ 1 %`` of ``min(SD, D − SD)`` (when SD = 0: ``S_τ ≤ 0.01`` and
    ``‖∂S_τ/∂z‖₁ ≤ 0.01``).

    Args:
        eigenvalues: 1-D tensor of exact Hessian eigenvalues ``α_i`` (e.g. top-``k`` and
            bottom-``k_bottom`` Ritz values); the gradient flows to these only.
        lr: learning rate ``η > 0``.
        temperature: ``τ > 0`` in exponent units (absolute), or ``None`` (default) for the
            rule of :func:`surrogate_temperature` (relative to the crossing exponent, bias
            ``≤ 1 %`` of ``min(SD, D − SD)``), held fixed in the graph.
        weights: optional multiplicities ``w_i ≥ 0`` of ``eigenvalues``; default ones.
        bulk_nodes: 1-D eigenvalue nodes of the rest of the spectrum (e.g. Ritz values of SLQ on
            the deflated Hessian); they enter the value with ``bulk_weights`` but carry no
            gradient.
        bulk_weights: their weights (eigenvalue counts, summing to ``d − k − k_bottom``).
        exponent_map: ``"gd"`` (paper), ``"momentum"`` (heavy ball, two exponents per
            eigenvalue) or ``"adam"`` (eigenvalues of ``P^{-1/2} H P^{-1/2}``).
        momentum: heavy-ball ``β`` or Adam's ``β₁``, in ``[0, 1)``; 0 for ``"gd"``.
        eps: ``ε ≥ 0`` inside the logarithm.
        bulk_dim: trace-only bulk model (kept for backward compatibility): ``bulk_dim`` further
            eigenvalues all equal to ``bulk_trace / bulk_dim``. Blind to the bulk's spread;
            prefer ``bulk_nodes``/``bulk_weights``.
        bulk_trace: their sum (differentiable if it is a tensor with a graph).

    Returns:
        0-d float64 tensor in ``[0, D]`` (``D`` the finite exponent mass), with a graph back to
        ``eigenvalues``.

    Raises:
        ValueError: for invalid ``lr``, ``temperature``, ``eps``, ``exponent_map``,
            ``momentum``, ``bulk_dim``, shapes, weights or non-finite eigenvalues.

    Example:
        >>> import torch
        >>> ev = torch.tensor([3.0, 0.5, 0.01, 0.0], dtype=torch.float64)
        >>> round(float(smooth_sharpness_dimension(ev, 1.0)), 3)  # exact SD: 3.986
        3.986
    """
    if temperature is not None:
        temperature = check_positive("temperature", temperature)
    alpha, z, w, _, _ = _measure(
        eigenvalues, lr, weights, bulk_nodes, bulk_weights, bulk_dim, bulk_trace,
        exponent_map, momentum, eps,
    )  # fmt: skip
    tau = temperature if temperature is not None else _default_temperature(z, w, RELATIVE_BIAS)[0]
    return _surrogate(z, w, alpha, tau)


def surrogate_weights(
    eigenvalues: torch.Tensor,
    lr: float,
    *,
    temperature: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The surrogate value and ``w_i = ∂S_τ/∂α_i`` for detached exact eigenvalues (no graph).

    These ``w_i`` are the weights of the penalty gradient ``∇_θ S = Σ_i w_i ∇_θ α_i``
    (:func:`~sdopt.dimension.penalty_gradient`).

    Args:
        eigenvalues: 1-D exact eigenvalues (top-``k``, then bottom-``k_bottom``).
        lr: learning rate ``η > 0``.
        temperature: ``τ`` or ``None`` (the default rule; see :func:`surrogate_temperature`).
        **kwargs: the other keywords of :func:`smooth_sharpness_dimension` (``weights``,
            ``bulk_nodes``, ``bulk_weights``, ``exponent_map``, ``momentum``, ``eps``,
            ``bulk_dim``, ``bulk_trace``).

    Returns:
        ``(value, grad)``: 0-d and ``eigenvalues``-shaped float64 tensors.
    """
    alpha = torch.as_tensor(eigenvalues).detach().to(torch.float64).clone().requires_grad_(True)
    with torch.enable_grad():
        value = smooth_sharpness_dimension(alpha, lr, temperature=temperature, **kwargs)
        (grad,) = torch.autograd.grad(value, alpha, allow_unused=True, materialize_grads=True)
    return value.detach(), grad


def smooth_sharpness_dimension_from_estimate(
    estimate: Any,
    *,
    temperature: float | None = None,
    lr: float | None = None,
    num_exact: int | None = None,
    exponent_map: str | None = None,
    momentum: float | None = None,
    eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_τ`` and ``∂S_τ/∂α`` of the exact eigenvalues of a stored spectrum estimate.

    The sketch's first ``num_exact`` columns of each row are the exact eigenvalues (top ``k``
    decreasing, then bottom ``k_bottom`` increasing, as a ``SharpnessDimensionEstimate`` of the
    ``"topk"``-style estimators stores them; all ``d`` for ``"exact"``), the rest bulk nodes with
    their weights (no gradient). Several groups (minibatches) are pooled as a *mixture*
    ``(1/G) Σ_g μ_g`` — not the position-by-position average of sorted exponents that the
    estimate's ``value`` uses, so with ``G > 1`` the two differ; with one group they are the same
    measure.

    Args:
        estimate: a :class:`~sdopt.dimension.estimators.SharpnessDimensionEstimate` (its
            ``lr``, exponent map, ``momentum``, ``eps`` and ``eigenvalues.shape[1]`` are the
            defaults below) or a :class:`~sdopt.dimension.sketch.SpectrumSketch` of kind
            ``"points"`` (then ``lr`` and ``num_exact`` are required).
        temperature: ``τ``, or ``None`` for the default rule (:func:`surrogate_temperature`).
        lr: learning rate ``η`` (default: the estimate's).
        num_exact: exact columns per row (default: the estimate's ``k + k_bottom``, or ``d``).
        exponent_map: default the estimate's (``"gd"`` for a sketch).
        momentum: default the estimate's (``0`` for a sketch).
        eps: default the estimate's (``0`` for a sketch).

    Returns:
        ``(value, grad)``: 0-d tensor, and ``(G, num_exact)`` float64 ``∂S_τ/∂α_{g,i}``.

    Raises:
        ValueError: for a spectrum that is not point masses (histogram/KDE/quantile readings),
            a missing ``lr``/``num_exact`` for a bare sketch, or ``num_exact`` out of range.
    """
    from sdopt.dimension.sketch import SpectrumSketch

    sketch = (
        estimate if isinstance(estimate, SpectrumSketch) else getattr(estimate, "spectrum", None)
    )
    if not isinstance(sketch, SpectrumSketch):
        raise ValueError(
            f"Invalid estimate: {type(estimate).__name__} (must be a SharpnessDimensionEstimate "
            "or a SpectrumSketch)"
        )
    if sketch.kind != "points":
        raise ValueError(
            f"Invalid estimate: spectrum kind {sketch.kind!r} (the surrogate reads point masses; "
            "use a 'deflated', 'topk' or 'exact' estimate, whose spectrum kind is 'points')"
        )
    is_estimate = sketch is not estimate
    if lr is None:
        if not is_estimate:
            raise ValueError("Invalid lr: None (required with a bare SpectrumSketch)")
        lr = float(estimate.lr)
    if num_exact is None:
        ev = getattr(estimate, "eigenvalues", None) if is_estimate else None
        if not is_estimate:
            raise ValueError("Invalid num_exact: None (required with a bare SpectrumSketch)")
        num_exact = 0 if ev is None else int(ev.shape[-1])
    num_exact = check_int("num_exact", num_exact, minimum=0, maximum=int(sketch.nodes.shape[1]))
    if exponent_map is None:
        exponent_map = str(getattr(estimate, "exponent_map", "gd")) if is_estimate else "gd"
    if momentum is None:
        momentum = float(getattr(estimate, "momentum", 0.0)) if is_estimate else 0.0
    if eps is None:
        eps = float(getattr(estimate, "eps", 0.0)) if is_estimate else 0.0
    groups = sketch.num_groups
    nodes = sketch.nodes.detach().to(torch.float64)
    weights = sketch.weights.detach().to(torch.float64) / groups
    exact = nodes[:, :num_exact].reshape(-1)
    exact_w = weights[:, :num_exact].reshape(-1)
    bulk_n = nodes[:, num_exact:].reshape(-1)
    bulk_w = weights[:, num_exact:].reshape(-1)
    keep = bulk_w > 0
    if exact.numel() == 0:  # no exact eigenvalue: value only (a dummy with zero weight)
        exact = nodes.new_zeros(1)
        exact_w = nodes.new_zeros(1)
    value, grad = surrogate_weights(
        exact, lr, temperature=temperature, weights=exact_w, bulk_nodes=bulk_n[keep],
        bulk_weights=bulk_w[keep], exponent_map=exponent_map, momentum=momentum, eps=eps,
    )  # fmt: skip
    return value, grad[: groups * num_exact].reshape(groups, num_exact)
