"""One record per curvature estimate made by :class:`sdopt.SDOptimizer`.

A record carries what a user wants to plot or log about the sharpness dimension (SD) of
training at one step: the top Hessian eigenvalues, the SD estimate and its uncertainty, λ_max,
the trace, the learning rate and the LR scale in force, the penalty value, what it cost
(Hessian-vector products, seconds, fraction of wall time) and whether the estimate was skipped
and why. Definitions follow Tuci, Korkmaz, Şimşekli, Birdal, "Generalization at the Edge of
Stability", arXiv:2604.19740.

:meth:`EstimateRecord.to_dict` flattens a record into ``{"sdopt/<name>": number}`` so that every
logger (W&B, CSV, JSONL, console) writes the same keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["EstimateRecord"]

STATUSES = ("ok", "skipped")


@dataclass
class EstimateRecord:
    """The outcome of one estimate (or of one skipped estimate).

    Attributes:
        step: Optimizer step at which the estimate was made (0-based count of ``step()`` calls
            before this one: the estimate describes the parameters the step starts from).
        mode: ``"monitor"``, ``"lr"`` or ``"penalty"``.
        status: ``"ok"`` or ``"skipped"``.
        reason: Why the estimate was skipped (``None`` when ``status == "ok"``).
        sharpness_dimension: SD estimate at the learning rate in force, ``lr``.
        uncertainty: Its uncertainty (standard error from the estimator, ``nan`` if unknown).
        sd_low, sd_high: The plausible range of SD: the point value ± 2 standard errors,
            widened to every value the spectrum's uncertain extremes allow (an eigenvalue whose
            residual bound straddles ``0`` or the edge moves SD across a jump). A wide range
            next to a point value says the estimate straddles a jump.
        n_edge: Number of eigenvalues beyond the exponent map's edge of stability (``α >
            edge/η``): the directions a smaller learning rate would stabilise.
        n_neg: Number of negative eigenvalues (below −1 % of the spectral radius, see
            :data:`sdopt.dimension.estimators.NEGATIVE_RESOLUTION`): expanding at every
            learning rate.
        total_exponent: ``T = Σ_i z_i``, the sum of all exponents (``log|det|`` of the step
            Jacobian). ``T ≥ 0`` gives ``SD = d``.
        j_star: ``⌊SD⌋``, the number of whole directions in the leading block of exponents
            whose sum is still ``≥ 0`` (``j*`` of the Kaplan–Yorke formula).
        lambda_min: Smallest Hessian eigenvalue found (bottom of the spectrum).
        lambda_max: Largest Hessian eigenvalue found.
        trace: Estimate of ``tr H`` (``nan`` when the estimator does not compute one).
        eigenvalues: The top-``k`` Hessian eigenvalues, decreasing.
        lr: Effective learning rate used for the SD (base LR of the reference group x LR scale).
        base_lr: The user's learning rate (reference group, without the scale).
        lr_scale: LR scale in force after this estimate (1.0 outside ``mode="lr"``).
        predicted_sharpness_dimension: In ``mode="lr"``, SD predicted from the stored spectrum at
            the new scale (no extra products); ``nan`` otherwise.
        edge_ratio: ``lr * lambda_max / edge``, where ``edge`` is the exponent map's edge of
            stability (:func:`sdopt.dimension.edge_of_stability`: 2 for ``"gd"``); above 1 the
            step is beyond the edge of stability. (For ``exponent_map="adam"``, ``lambda_max``
            and ``eigenvalues`` are those of the preconditioned ``P^{-1/2} H P^{-1/2}``.)
        edge_ratio_in_force: The same ratio at the learning rate in force *before* this
            estimate (``mode="lr"``: the scale the controller had set at the previous estimate,
            under which training reached these parameters); ``edge_ratio`` is at the new
            scale. Equal to ``edge_ratio`` in the other modes. How far the run went past the
            edge between two estimates shows here, not in ``edge_ratio``.
        penalty: Value of ``strength x`` smooth SD surrogate (``mode="penalty"``), else ``nan``.
        loss: Training loss on the curvature batch at the estimate.
        num_products: Hessian-vector products (and equivalent gradient evaluations) used.
        seconds: Wall time of the estimate.
        overhead_fraction: Over the interval from the previous estimate's start to this one's,
            the time spent inside sdopt (the previous estimate, penalty gradients) divided by
            the wall time of the interval (``nan`` for the first estimate).
        method: Estimator name (``"deflated"`` by default, see :class:`sdopt.SDOptimizer`).
        protocol: ``"full-batch"`` or ``"minibatch"``.
        converged: Whether the eigen-solver met its tolerance.
    """

    step: int
    mode: str = "monitor"
    status: str = "ok"
    reason: str | None = None
    sharpness_dimension: float = math.nan
    uncertainty: float = math.nan
    sd_low: float = math.nan
    sd_high: float = math.nan
    n_edge: float = math.nan
    n_neg: float = math.nan
    total_exponent: float = math.nan
    j_star: float = math.nan
    lambda_max: float = math.nan
    lambda_min: float = math.nan
    trace: float = math.nan
    eigenvalues: list[float] = field(default_factory=list)
    lr: float = math.nan
    base_lr: float = math.nan
    lr_scale: float = 1.0
    predicted_sharpness_dimension: float = math.nan
    edge_ratio: float = math.nan
    edge_ratio_in_force: float = math.nan
    penalty: float = math.nan
    loss: float = math.nan
    num_products: int = 0
    seconds: float = 0.0
    overhead_fraction: float = math.nan
    method: str = ""
    protocol: str = ""
    converged: bool = True

    @property
    def ok(self) -> bool:
        """``True`` when the estimate was made (not skipped)."""
        return self.status == "ok"

    def to_dict(self, prefix: str = "sdopt/", *, include_text: bool = False) -> dict[str, Any]:
        """Flatten to ``{prefix + name: number}``.

        Eigenvalues become ``eigenvalue_1 .. eigenvalue_k`` (1 = largest); ``status`` becomes the
        0/1 flag ``skipped``; booleans become 0/1. With ``include_text=True`` the strings
        ``mode``, ``status``, ``reason``, ``method`` and ``protocol`` are included too (CSV/JSONL
        use this; W&B and other metric stores get numbers only).

        Args:
            prefix: Prepended to every key (``"sdopt/"`` by default, ``""`` for none).
            include_text: Whether to include the string fields.

        Returns:
            A flat ``dict`` of ``int``/``float`` (and strings with ``include_text``).
        """
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():
            if name == "eigenvalues":
                for i, ev in enumerate(value, start=1):
                    out[f"{prefix}eigenvalue_{i}"] = float(ev)
            elif name in ("mode", "status", "reason", "method", "protocol"):
                if include_text:
                    out[f"{prefix}{name}"] = "" if value is None else str(value)
            elif isinstance(value, bool):
                out[f"{prefix}{name}"] = int(value)
            elif isinstance(value, int):
                out[f"{prefix}{name}"] = value
            else:
                out[f"{prefix}{name}"] = float(value)
        out[f"{prefix}skipped"] = int(self.status != "ok")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EstimateRecord:
        """Inverse of ``asdict`` (used when an optimizer's history is restored from a checkpoint)."""
        kwargs = dict(data)
        kwargs["eigenvalues"] = [float(x) for x in kwargs.get("eigenvalues", [])]
        return cls(**kwargs)
