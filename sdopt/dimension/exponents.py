"""Lyapunov exponents of optimizer maps from Hessian eigenvalues.

``map="gd"`` is the definition of Tuci, Korkmaz, Şimşekli and Birdal, "Generalization at the Edge
of Stability" (arXiv:2604.19740), which the paper uses for every optimizer: the singular values of
the step Jacobian ``I − ηH`` are ``|1 − ηα|``. The other maps go beyond the paper (THEORY.md §4):

* ``"momentum"`` — heavy ball ``w⁺ = w − η∇L(w) + β(w − w⁻)`` (``torch.optim.SGD`` with
  ``momentum=β``, ``dampening=0``, ``nesterov=False``). Its Jacobian on ``(w, w⁻)`` acts on each
  Hessian eigendirection as a 2×2 block whose eigenvalues are the roots of
  ``z² − (1 + β − ηα) z + β = 0``; the exponents are the log-moduli of both roots, ``2d`` in all.
  (For a non-normal 2×2 block these are the Lyapunov exponents of the linear recursion, i.e. the
  log-moduli of its eigenvalues, not its one-step singular values.)
* ``"adam"`` — Adam/AdamW with its preconditioner frozen, ``P = sqrt(v̂) + ε_adam``: the update
  is ``w⁺ = w − η P⁻¹ m̂``. The eigenvalues passed in must be those of ``P^{-1/2} H P^{-1/2}``
  (build that operator with :func:`preconditioned_operator` and :func:`adam_preconditioner`).
  With ``momentum=β₁ = 0`` the map is ``I − η P⁻¹H`` (same spectrum as ``I − η P^{-1/2}HP^{-1/2}``);
  with ``β₁ > 0`` the first moment is an exponential average, which is heavy ball with step
  ``η(1 − β₁)`` and momentum ``β₁`` (its edge of stability is ``(2 + 2β₁)/((1 − β₁)η)``, Cohen et
  al.). Bias corrections and decoupled weight decay are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from sdopt._checks import check_choice, check_in_range, check_positive
from sdopt.dimension.kaplan_yorke import check_eigenvalues, gd_exponents

__all__ = [
    "EXPONENT_MAPS",
    "adam_preconditioner",
    "edge_of_stability",
    "heavy_ball_exponents",
    "lyapunov_exponents",
    "preconditioned_operator",
]

EXPONENT_MAPS = ("gd", "momentum", "adam")


def edge_of_stability(map: str = "gd", momentum: float = 0.0) -> float:
    """The value of ``η·λ_max`` at which the top exponent of ``map`` turns positive.

    ``"gd"``: 2. ``"momentum"`` (heavy ball ``β``): ``2(1 + β)``. ``"adam"`` (frozen
    preconditioner, ``λ_max`` of ``P^{-1/2} H P^{-1/2}``, first-moment EMA ``β₁``):
    ``2(1 + β₁)/(1 − β₁)`` — 38 for ``β₁ = 0.9`` (Cohen et al., *Adaptive gradient methods at
    the edge of stability*). Above it the attractor has a positive exponent and SD > 0.

    Example:
        >>> edge_of_stability("gd"), edge_of_stability("momentum", 0.9)
        (2.0, 3.8)
    """
    check_choice("map", map, EXPONENT_MAPS)
    check_in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    if map == "gd":
        return 2.0
    if map == "momentum":
        return 2.0 * (1.0 + momentum)
    return 2.0 * (1.0 + momentum) / (1.0 - momentum)


def heavy_ball_exponents(
    eigenvalues: torch.Tensor, lr: float, momentum: float, eps: float = 0.0
) -> torch.Tensor:
    """Log-moduli ``log(|z| + ε)`` of both roots of ``z² − (1 + β − ηα) z + β = 0``.

    Args:
        eigenvalues: float64 tensor ``(..., d)``.
        lr: step size ``η``.
        momentum: ``β ∈ [0, 1)``.
        eps: ``ε ≥ 0`` inside the logarithm.

    Returns:
        Tensor ``(..., 2d)``: the larger-modulus root's exponent for every eigenvalue, then the
        smaller one's. For ``β = 0`` the roots are ``1 − ηα`` and ``0``.
    """
    b = 1.0 + momentum - lr * eigenvalues
    disc = b * b - 4.0 * momentum
    real = disc >= 0
    sq = torch.sqrt(torch.clamp(disc, min=0.0))
    # stable real roots: big = (b + sign(b) sqrt(disc)) / 2, small = β / big
    big = 0.5 * (b + torch.where(b >= 0, sq, -sq))
    safe_big = torch.where(big == 0, torch.ones_like(big), big)
    small = torch.where(big == 0, torch.zeros_like(big), momentum / safe_big)
    mod_big = torch.where(real, big.abs(), torch.full_like(b, momentum**0.5))
    mod_small = torch.where(real, small.abs(), torch.full_like(b, momentum**0.5))
    return torch.cat([torch.log(mod_big + eps), torch.log(mod_small + eps)], dim=-1)


def lyapunov_exponents(
    eigenvalues: Any,
    lr: float,
    *,
    map: str = "gd",
    momentum: float = 0.0,
    eps: float = 0.0,
) -> torch.Tensor:
    """Lyapunov exponents of one optimizer step from (minibatch) Hessian eigenvalues.

    ``"gd"`` (default, the paper's): ``λ_i = log(|1 − ηα_i| + ε)``, ``d`` exponents.
    ``"momentum"``: heavy ball, ``2d`` exponents ``log(|z_±(α_i)| + ε)`` of the roots of
    ``z² − (1 + β − ηα_i) z + β = 0``. ``"adam"``: the eigenvalues are those of
    ``P^{-1/2} H P^{-1/2}`` for Adam's frozen preconditioner ``P``; the GD map (``β₁ = 0``) or the
    heavy-ball map with step ``η(1 − β₁)`` and momentum ``β₁`` is applied. The last two go beyond
    the paper (see the module docstring).

    Args:
        eigenvalues: 1-D ``(d,)`` or 2-D ``(batches, d)`` eigenvalues (tensor, array, list).
        lr: learning rate ``η > 0``.
        map: ``"gd"``, ``"momentum"`` or ``"adam"``.
        momentum: heavy-ball ``β`` (``"momentum"``) or Adam's ``β₁`` (``"adam"``), in ``[0, 1)``.
        eps: ``ε ≥ 0`` inside the logarithm.

    Returns:
        float64 tensor of exponents, unsorted, with the last dimension ``d`` or ``2d``.

    Raises:
        ValueError: for a bad shape, non-finite eigenvalues or an invalid argument.
    """
    lr = check_positive("lr", lr)
    eps = check_positive("eps", eps, allow_zero=True)
    check_choice("map", map, EXPONENT_MAPS)
    momentum = check_in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    ev = check_eigenvalues(eigenvalues)
    return exponents_unchecked(ev, lr, map=map, momentum=momentum, eps=eps)


def exponents_unchecked(
    ev: torch.Tensor, lr: float, *, map: str, momentum: float, eps: float
) -> torch.Tensor:
    """:func:`lyapunov_exponents` without argument checks (for internal hot loops)."""
    if map == "gd":
        if momentum > 0:
            raise ValueError(
                f"Invalid momentum: {momentum!r} (the 'gd' map has no momentum; use map='momentum')"
            )
        return gd_exponents(ev, lr, eps)
    if map == "momentum":
        return heavy_ball_exponents(ev, lr, momentum, eps)
    # adam: eigenvalues of P^{-1/2} H P^{-1/2}
    if momentum == 0.0:
        return gd_exponents(ev, lr, eps)
    return heavy_ball_exponents(ev, lr * (1.0 - momentum), momentum, eps)


def exponent_multiplicity(map: str, momentum: float) -> int:
    """How many exponents each eigenvalue produces (1 for GD, 2 for heavy ball)."""
    return 1 if map == "gd" or (map == "adam" and momentum == 0.0) else 2


def adam_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor] | None = None,
    *,
    missing: str = "raise",
) -> torch.Tensor:
    """Frozen Adam/AdamW preconditioner ``P = sqrt(v̂) + ε`` as one flat vector.

    ``v̂ = exp_avg_sq / (1 − β₂^t)`` is read from the optimizer's state (bias-corrected, as in
    ``torch.optim.Adam``); ``ε`` and ``β₂`` come from each parameter's group.

    Args:
        optimizer: a ``torch.optim.Adam`` or ``AdamW`` (or any optimizer whose state holds
            ``exp_avg_sq`` and ``step`` and whose groups hold ``betas`` and ``eps``) that has
            taken at least one step.
        params: the parameters, in the order of the flat vectors used by the Hessian operator
            (default: the optimizer's parameters in group order).
        missing: what a parameter without Adam state (one that never had a gradient, so
            Adam has never moved it) gets: ``"raise"`` a ``ValueError``; ``"frozen"``
            ``P = inf``, i.e. ``P^{-1/2} = 0``: the map leaves it where it is (exponent 0).

    Returns:
        float64 tensor ``(d,)`` with ``P > 0`` (``inf`` for frozen parameters).

    Raises:
        ValueError: if a parameter has no Adam state and ``missing="raise"``, or if the
            optimizer has no Adam state at all.
    """
    check_choice("missing", missing, ("raise", "frozen"))
    if not isinstance(getattr(optimizer, "param_groups", None), list) or not hasattr(
        optimizer, "state"
    ):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} (must be a torch.optim.Adam or AdamW, "
            "or an optimizer with param_groups and state)"
        )
    group_of: dict[int, dict[str, Any]] = {}
    ordered: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group
            ordered.append(p)
    plist = list(params) if params is not None else ordered
    pieces = []
    found = False
    for p in plist:
        group = group_of.get(id(p))
        state = optimizer.state.get(p, {})
        if group is None or "exp_avg_sq" not in state:
            if missing == "frozen" and group is not None:
                pieces.append(
                    torch.full((p.numel(),), math.inf, dtype=torch.float64, device=p.device)
                )
                continue
            raise ValueError(
                "Invalid optimizer: a parameter has no Adam state 'exp_avg_sq' "
                "(take at least one optimizer step first)"
            )
        found = True
        beta2 = float(group["betas"][1])
        step = float(state.get("step", 1))
        v_hat = state["exp_avg_sq"].detach().to(torch.float64) / (1.0 - beta2**step)
        pieces.append((v_hat.sqrt() + float(group["eps"])).reshape(-1))
    if not found:
        raise ValueError(
            "Invalid optimizer: no parameter has Adam state 'exp_avg_sq' "
            "(take at least one optimizer step first)"
        )
    return torch.cat(pieces)


def preconditioned_operator(op: Any, preconditioner: torch.Tensor) -> Any:
    """The symmetric operator ``P^{-1/2} H P^{-1/2}`` for a diagonal preconditioner ``P``.

    Its spectrum equals that of ``P⁻¹H`` (similar matrices), the curvature Adam's frozen
    preconditioner sees. Each product costs one product of ``op``.

    Args:
        op: a Hessian operator (``.dim``, ``.matmat``, ``.dtype``, ``.device``) or a dense
            symmetric tensor.
        preconditioner: positive tensor ``(dim,)`` (e.g. :func:`adam_preconditioner`).

    Returns:
        A :class:`sdopt.spectrum.LinearOperator` (or a dense tensor for a dense input).
    """
    if isinstance(op, torch.Tensor):
        from sdopt.spectrum.operators import check_preconditioner

        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(
                f"Invalid op: tensor of shape {tuple(op.shape)} (must be square (n, n))"
            )
        check_preconditioner(preconditioner, op.shape[0])
        d = preconditioner.to(op) ** -0.5
        return d[:, None] * op * d[None, :]
    from sdopt.spectrum import preconditioned

    return preconditioned(op, preconditioner)
