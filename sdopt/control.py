"""Pure control rules used by :class:`sdopt.SDOptimizer`: learning-rate scale and penalty weight.

Everything here is a pure function of (estimate, state, config) returning (new value, new
state); the optimizer only stores the state and applies the value. This keeps the rules easy to
test in isolation and makes checkpoints trivial (the states are small frozen dataclasses).

Learning-rate control by prediction (THEORY.md §7–§8, the project's own design on top of Tuci,
Korkmaz, Şimşekli, Birdal, "Generalization at the Edge of Stability", arXiv:2604.19740).
A learning rate can change only one part of the sharpness dimension: the directions beyond the
edge of stability (``α > edge/η``), which a smaller step stabilises. Negative eigenvalues
expand at every η (THEORY.md §8), so an SD they cause cannot be lowered by the learning rate,
and a rule that tried would shrink the step to nothing. One update of the rule is:

1. **Edge scale.** ``s_edge = target_edge_ratio · edge / (η · λ̂_max)``, where ``λ̂_max`` is the
   largest Ritz value plus its residual bound (an interval that holds an eigenvalue, so a loose
   eigen-solver tolerance cannot push the step past the edge) and ``edge`` the exponent map's
   edge of stability (2 for GD). With ``λ̂_max ≤ 0`` nothing is beyond any edge:
   ``s_edge = ∞``. With ``anticipate`` (default) a sharpness that grew since the previous
   update, by ``g = λ̂_t / λ̂_{t-1} > 1``, is assumed to grow by as much again before the next
   one: ``s_edge`` is divided by ``g``; one that fell is taken at the larger of the last two
   (at the edge λ_max oscillates between estimates); the first update (no growth measured
   yet) divides it by ``max_growth`` and may lower the scale but not raise it. Progressive
   sharpening otherwise carries ``η·λ_max`` past the edge between two estimates (measured on
   the grokking MLP: 1.48 times the edge with the reactive rule, up to 1.98 from a raised
   first step; docs/results/steering.md).
2. **Optional SD target.** With ``target_sd`` set, ``s_sd = sup{ s ∈ [s_min, s_max] :
   predict(s') ≤ target for all s_min ≤ s' ≤ s }`` (geometric scan of ``grid`` points, then
   bisection in log-scale to relative tolerance ``rtol``), where ``predict(s) = SD(s·η)`` comes
   from the stored spectrum with no new products. The raw scale is ``min(s_sd, s_edge)``. If
   even ``s_min`` violates the target — the SD comes from directions no learning rate
   stabilises — the target is *not met* (``feasible=False``): the rule falls back to
   ``s_edge`` instead of collapsing the scale, and the optimizer warns once.
3. **Asymmetric smoothing.** A *decrease* (``s* < s``) is applied at once: safety first, the
   step never stays beyond the edge waiting for an average to catch up. An *increase* goes
   through an exponential moving average in log-scale, ``m ← β m + (1 - β) log s*``, is capped
   at ``s*`` and at ``max_growth · s`` per update, and is applied only when it exceeds the
   current scale by more than the relative ``hysteresis`` band (no chattering).
4. **Clamps.** The result is clamped to ``[min_scale, max_scale]`` (default ``[1e-3, 100]``:
   the rule raises as well as lowers the user's learning rate, toward the edge and never past
   it).

Penalty schedule: :func:`penalty_weight` ramps the penalty strength linearly over ``warmup``
steps (0 disables the ramp).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from sdopt._checks import check_in_range, check_int, check_positive

__all__ = [
    "LRControllerConfig",
    "LRControllerState",
    "admissible_scale",
    "penalty_weight",
    "update_lr_scale",
]


@dataclass(frozen=True)
class LRControllerConfig:
    """Settings of the learning-rate controller (see the module docstring for the rule).

    Attributes:
        target_sd: Largest allowed predicted sharpness dimension (``>= 0``), or ``None``
            (default): ride the edge of stability only (step 1 of the rule).
        target_edge_ratio: The edge ratio ``η·λ̂_max/edge`` the rule steers to (``> 0``; default
            0.95: just below the edge).
        smoothing: EMA coefficient ``β ∈ [0, 1)`` applied to increases (0: no smoothing).
        hysteresis: Relative dead band ``≥ 0``: an increase smaller than ``hysteresis · s`` is
            ignored.
        min_scale: Smallest LR scale (``> 0``).
        max_scale: Largest LR scale (``≥ min_scale``).
        max_growth: Largest factor (``≥ 1``) by which one update may raise the scale.
        grid: Number of points (``≥ 2``) of the geometric scan over ``[min_scale, max_scale]``.
        rtol: Relative tolerance (``> 0``) of the bisection.
        anticipate: Divide the edge scale by the sharpness's growth since the previous update
            (step 1 of the rule; ``False``: the purely reactive rule).
    """

    target_sd: float | None = None
    target_edge_ratio: float = 0.95
    smoothing: float = 0.0
    hysteresis: float = 0.05
    min_scale: float = 1e-3
    max_scale: float = 100.0
    max_growth: float = 2.0
    grid: int = 24
    rtol: float = 1e-3
    anticipate: bool = True

    def __post_init__(self) -> None:
        if self.target_sd is not None:
            check_positive("target_sd", self.target_sd, allow_zero=True)
        check_positive("target_edge_ratio", self.target_edge_ratio)
        check_in_range("smoothing", self.smoothing, 0.0, 1.0, high_open=True)
        check_positive("hysteresis", self.hysteresis, allow_zero=True)
        check_positive("min_scale", self.min_scale)
        check_positive("max_scale", self.max_scale)
        if self.max_scale < self.min_scale:
            raise ValueError(
                f"Invalid max_scale: {self.max_scale!r} (must be >= min_scale={self.min_scale!r})"
            )
        check_in_range("max_growth", self.max_growth, 1.0, math.inf, high_open=True)
        check_int("grid", self.grid, minimum=2)
        check_in_range("rtol", self.rtol, 0.0, 1.0, low_open=True, high_open=True)
        if not isinstance(self.anticipate, bool):
            raise ValueError(f"Invalid anticipate: {self.anticipate!r} (must be True or False)")


@dataclass(frozen=True)
class LRControllerState:
    """State of the learning-rate controller.

    Attributes:
        scale: LR scale in force.
        log_ema: EMA of ``log s*`` (``nan`` before the first update).
        admissible: The last admissible scale ``s*`` (``nan`` before the first update).
        predicted_sd: Predicted SD at the new scale.
        feasible: ``False`` when the target had to be relaxed (see module docstring).
        updates: Number of updates so far.
        sharpness: The sharpness ``λ̂_max`` the last update saw (``nan`` before the first, or
            when the optimizer gave none); ``anticipate`` compares the next one with it.
    """

    scale: float = 1.0
    log_ema: float = math.nan
    admissible: float = math.nan
    predicted_sd: float = math.nan
    feasible: bool = True
    updates: int = 0
    sharpness: float = math.nan

    def to_dict(self) -> dict[str, float | int | bool]:
        """Plain dict for checkpoints."""
        return {
            "scale": self.scale,
            "log_ema": self.log_ema,
            "admissible": self.admissible,
            "predicted_sd": self.predicted_sd,
            "feasible": self.feasible,
            "updates": self.updates,
            "sharpness": self.sharpness,
        }

    @classmethod
    def from_dict(cls, data: dict[str, float | int | bool]) -> LRControllerState:
        """Inverse of :meth:`to_dict`."""
        return cls(
            scale=float(data["scale"]),
            log_ema=float(data["log_ema"]),
            admissible=float(data["admissible"]),
            predicted_sd=float(data["predicted_sd"]),
            feasible=bool(data["feasible"]),
            updates=int(data["updates"]),
            sharpness=float(data.get("sharpness", math.nan)),  # absent before version 4
        )


def admissible_scale(
    predict: Callable[[float], float],
    target: float,
    low: float,
    high: float,
    *,
    grid: int = 24,
    rtol: float = 1e-3,
) -> tuple[float, bool]:
    """Largest ``s`` in ``[low, high]`` with ``predict(s') <= target`` for all ``low <= s' <= s``.

    A geometric scan of ``grid`` points locates the first violation; bisection in log-scale
    then narrows it to relative width ``rtol``. The returned scale is always on the admissible
    side of the bracket. If ``predict(low) > target`` the target is relaxed to ``predict(low)``
    and ``feasible`` is ``False``.

    Args:
        predict: Predicted sharpness dimension as a function of the LR scale.
        target: Largest allowed value.
        low: Smallest scale (``> 0``).
        high: Largest scale (``>= low``).
        grid: Scan points (``>= 2``).
        rtol: Relative bisection tolerance.

    Returns:
        ``(scale, feasible)``.
    """
    first = float(predict(low))
    feasible = math.isfinite(first) and first <= target
    bound = target if feasible else (first if math.isfinite(first) else math.inf)
    if high <= low:
        return low, feasible
    ratio = (high / low) ** (1.0 / (grid - 1))
    prev = low
    for i in range(1, grid):
        s = high if i == grid - 1 else low * ratio**i
        value = float(predict(s))
        if not (value <= bound):  # also catches nan
            lo, hi = prev, s
            while hi / lo > 1.0 + rtol:
                mid = math.sqrt(lo * hi)
                v = float(predict(mid))
                if v <= bound:
                    lo = mid
                else:
                    hi = mid
            return lo, feasible
        prev = s
    return high, feasible


def update_lr_scale(
    predict: Callable[[float], float] | None,
    state: LRControllerState,
    config: LRControllerConfig,
    *,
    edge_scale: float = math.inf,
    sharpness: float = math.nan,
) -> tuple[float, LRControllerState]:
    """One update of the learning-rate scale (the rule in the module docstring).

    Args:
        predict: ``s -> SD(s · η)`` from the latest spectrum estimate (no Hessian products);
            used only when ``config.target_sd`` is set (may be ``None`` otherwise).
        state: The controller state before the update.
        config: Controller settings.
        edge_scale: ``s_edge`` of step 1 (``inf`` when nothing can cross an edge).
        sharpness: The ``λ̂_max`` behind ``edge_scale``, for ``anticipate`` (``nan``: none; the
            edge scale is then used as given).

    Returns:
        ``(new_scale, new_state)``. ``new_state.feasible`` is ``False`` when ``target_sd``
        could not be met by any scale in range.
    """
    edge_scale = math.inf if math.isnan(edge_scale) else float(edge_scale)
    sharpness = float(sharpness)
    previous = state.sharpness
    hold = False  # anticipate: no increase before a growth rate can be measured
    if config.anticipate and sharpness > 0:
        if previous > 0:  # growing: extrapolated; oscillating: the larger of the last two
            predicted = max(sharpness * max(1.0, sharpness / previous), previous)
            edge_scale *= sharpness / predicted
        else:  # no growth rate yet: assume the largest one the rule allows itself
            edge_scale /= config.max_growth
            hold = True
    raw = min(max(edge_scale, config.min_scale), config.max_scale)
    feasible = True
    if config.target_sd is not None:
        if predict is None:
            raise ValueError("Invalid predict: None (config.target_sd needs an SD predictor)")
        s_sd, feasible = admissible_scale(
            predict,
            config.target_sd,
            config.min_scale,
            config.max_scale,
            grid=config.grid,
            rtol=config.rtol,
        )
        if feasible:
            raw = min(raw, s_sd)
    current = min(max(state.scale, config.min_scale), config.max_scale)
    if raw <= current:
        new = raw
        log_ema = math.log(raw)
    elif hold:
        new = current
        log_ema = math.log(current)
    else:
        prev = state.log_ema if math.isfinite(state.log_ema) else math.log(current)
        log_ema = config.smoothing * prev + (1.0 - config.smoothing) * math.log(raw)
        candidate = min(math.exp(log_ema), raw, current * config.max_growth)
        new = candidate if candidate > current * (1.0 + config.hysteresis) else current
    new = min(max(new, config.min_scale), config.max_scale)
    predicted = float(predict(new)) if predict is not None else math.nan
    new_state = replace(
        state,
        scale=new,
        log_ema=log_ema,
        admissible=raw,
        predicted_sd=predicted,
        feasible=feasible,
        updates=state.updates + 1,
        sharpness=sharpness if math.isfinite(sharpness) else math.nan,
    )
    return new, new_state


def penalty_weight(step: int, strength: float, warmup: int = 0) -> float:
    """Penalty strength at ``step``: ``strength · min(1, (step + 1) / warmup)`` (constant if ``warmup == 0``).

    Args:
        step: Optimizer step (0-based).
        strength: Full strength (``>= 0``).
        warmup: Length of the linear ramp in steps (``>= 0``).

    Returns:
        The weight multiplying the penalty gradient at this step.
    """
    if warmup <= 0:
        return float(strength)
    return float(strength) * min(1.0, (step + 1) / warmup)
