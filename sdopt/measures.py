"""Sharpness and complexity measures beside the sharpness dimension (THEORY.md §6).

The baselines that Tuci, Korkmaz, Şimşekli and Birdal ("Generalization at the Edge of Stability",
arXiv:2604.19740) compare the sharpness dimension against, computed side-effect free (the model's
parameters, buffers, ``.grad`` fields, flags and the global RNG are untouched: every loss is a
pure function of perturbed copies of the parameters through
:class:`sdopt.curvature.FunctionalLoss`):

* ``lambda_max`` — largest Hessian eigenvalue (Lanczos); ``trace`` — ``tr H`` (Hutchinson);
  ``frobenius`` — ``‖H‖_F = sqrt(E‖Hz‖²)`` (Hutchinson on ``H²``, Rademacher ``z``);
* ``rds_sharpness`` — ``λ_1 = log σ_1(I − ηH) = max(log|1 − ηα_max|, log|1 − ηα_min|)``;
* ``eps_sharpness`` — Keskar et al.: ``[max_{y∈C_ε} L(w+y) − L(w)]/(1 + L(w))·100`` with
  ``C_ε = {|y_i| ≤ ε(|w_i| + 1)}`` (projected sign-gradient ascent in the box);
* ``adaptive_sharpness_max`` / ``_avg`` — Kwon et al. 2021, Andriushchenko et al. 2023:
  ``max_{‖δ/c‖_p ≤ ρ} L(w+δ) − L(w)`` (projected gradient ascent, ``p ∈ {2, inf}``) and
  ``E_{δ∼N(0, ρ² diag c²)} L(w+δ) − L(w)``, ``c = |w|``;
* ``ph_dimension`` / ``mst_energy`` — Birdal et al. 2021 on a trajectory of weight vectors;
* ``gradient_noise_scale`` — Smith & Le 2018, ``η(N/B − 1)``; ``simple_noise_scale`` —
  McCandlish et al. 2018, ``B·tr Σ_B/‖G‖²`` from the per-batch gradients;
* ``weight_norm`` — ``‖θ‖₂``; ``sharpness_dimension`` — via
  :func:`sdopt.dimension.estimate_sharpness_dimension`.

All losses are means over ``data`` (one batch or a sequence of batches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from sdopt._checks import check_choice, check_int, check_positive
from sdopt.spectrum.operators import as_operator

__all__ = [
    "ALL_MEASURES",
    "adaptive_sharpness",
    "compute_measures",
    "epsilon_sharpness",
    "frobenius_norm",
    "gradient_noise_scale",
    "mst_energy",
    "ph_dimension",
    "rds_sharpness",
]

ALL_MEASURES = (
    "lambda_max",
    "trace",
    "frobenius",
    "rds_sharpness",
    "eps_sharpness",
    "adaptive_sharpness_avg",
    "adaptive_sharpness_max",
    "ph_dimension",
    "mst_energy",
    "gradient_noise_scale",
    "simple_noise_scale",
    "weight_norm",
    "sharpness_dimension",
)
DEFAULT_MEASURES = (
    "lambda_max",
    "trace",
    "rds_sharpness",
    "eps_sharpness",
    "adaptive_sharpness_avg",
    "adaptive_sharpness_max",
    "weight_norm",
)


def _functional(model: Any, loss_fn: Callable[..., Any], data: Any) -> Any:
    from sdopt.curvature import make_functional_loss

    return make_functional_loss(model, loss_fn, data)


def _loss_at(f: Any, flat: torch.Tensor) -> float:
    with torch.no_grad():
        return float(f(tuple(f.unflatten(flat))))


def _grad_at(f: Any, flat: torch.Tensor) -> tuple[float, torch.Tensor]:
    loss, grad = f.value_and_gradient(tuple(f.unflatten(flat)))
    return float(loss), grad


def _rademacher(n: int, d: int, generator: torch.Generator | None, like: torch.Tensor):
    bits = torch.randint(0, 2, (d, n), generator=generator, dtype=torch.int64)
    return (2 * bits - 1).to(like)


# --------------------------------------------------------------------------- curvature measures
def frobenius_norm(
    op: Any, num_probes: int = 20, *, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """``‖H‖_F`` from Hutchinson's estimator of ``tr H² = E_z ‖Hz‖²`` (Rademacher ``z``).

    Returns:
        ``(estimate, standard error)`` (the error propagated through the square root).
    """
    num_probes = check_int("num_probes", num_probes, minimum=1)
    op = as_operator(op)
    z = _rademacher(num_probes, op.dim, generator, torch.empty(0, dtype=op.dtype, device=op.device))
    hz = op.matmat(z)
    samples = (hz.to(torch.float64) ** 2).sum(0)
    est = float(samples.mean())
    se = float(samples.std()) / math.sqrt(num_probes) if num_probes > 1 else math.nan
    root = math.sqrt(max(est, 0.0))
    return root, (se / (2 * root) if root > 0 else math.nan)


def rds_sharpness(lambda_max: float, lambda_min: float, lr: float, *, eps: float = 0.0) -> float:
    """``λ_1 = log σ_1(I − ηH)``: the largest of ``log(|1 − ηα| + ε)`` over the spectrum ends
    (``-inf`` when both are exactly 0)."""
    lr = check_positive("lr", lr)
    eps = check_positive("eps", eps, allow_zero=True)

    def exponent(alpha: float) -> float:
        x = abs(1 - lr * alpha) + eps
        return math.log(x) if x > 0 else -math.inf

    return max(exponent(lambda_max), exponent(lambda_min))


# --------------------------------------------------------------------------- perturbation measures
def epsilon_sharpness(
    f: Any, *, epsilon: float = 1e-3, steps: int = 20, step_size: float | None = None
) -> float:
    """Keskar et al.'s ε-sharpness: ``[max_{y∈C_ε} L(w+y) − L(w)]/(1 + L(w))·100``.

    ``C_ε = {y : |y_i| ≤ ε(|w_i| + 1)}``; the maximum is approached by projected sign-gradient
    ascent (``steps`` steps of ``step_size`` times the box half-widths, default ``2.5/steps``)
    from ``y = 0``; the best loss seen is used.

    Args:
        f: a :class:`sdopt.curvature.FunctionalLoss`.
    """
    epsilon = check_positive("epsilon", epsilon)
    steps = check_int("steps", steps, minimum=1)
    w = f.flatten(f.params).detach()
    box = epsilon * (w.abs() + 1)
    if step_size is not None:
        step_size = check_positive("step_size", step_size)
    step = (step_size if step_size is not None else 2.5 / steps) * box
    base, grad = _grad_at(f, w)
    best = base
    y = torch.zeros_like(w)
    for _ in range(steps):
        y = torch.maximum(torch.minimum(y + step * torch.sign(grad), box), -box)
        value, grad = _grad_at(f, w + y)
        best = max(best, value)
    return (best - base) / (1 + base) * 100


def adaptive_sharpness(
    f: Any,
    *,
    rho: float = 0.05,
    p: float | str = 2,
    kind: str = "max",
    steps: int = 20,
    num_samples: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    """Adaptive sharpness with ``c = |w|`` (Kwon et al. 2021; Andriushchenko et al. 2023).

    ``kind="max"``: ``max_{‖δ ⊙ c⁻¹‖_p ≤ ρ} L(w+δ) − L(w)`` by projected gradient ascent in
    ``γ = δ/c`` (``p = 2``: normalised steps of ``2.5ρ/steps`` then projection on the ball;
    ``p = inf``: sign steps and clipping), keeping the best value seen.
    ``kind="avg"``: ``E_{δ∼N(0, ρ² diag(c²))} L(w+δ) − L(w)`` by ``num_samples`` antithetic
    pairs ``±δ`` (unbiased; the first-order term cancels).

    Args:
        f: a :class:`sdopt.curvature.FunctionalLoss`.
    """
    rho = check_positive("rho", rho)
    check_choice("kind", kind, ("max", "avg"))
    if p not in (2, "inf", math.inf):
        raise ValueError(f"Invalid p: {p!r} (must be 2 or 'inf')")
    w = f.flatten(f.params).detach()
    c = w.abs()
    base = _loss_at(f, w)
    if kind == "avg":
        num_samples = check_int("num_samples", num_samples, minimum=1)
        total = 0.0
        for _ in range(num_samples):
            noise = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w)
            # antithetic pair: the first-order term cancels exactly
            delta = rho * c * noise
            total += 0.5 * (_loss_at(f, w + delta) + _loss_at(f, w - delta)) - base
        return total / num_samples
    steps = check_int("steps", steps, minimum=1)
    gamma = torch.zeros_like(w)
    best = base
    _, grad = _grad_at(f, w)
    for _ in range(steps):
        g = c * grad
        if p == 2:
            norm = g.norm()
            if norm == 0:
                break
            gamma = gamma + (2.5 * rho / steps) * g / norm
            gnorm = gamma.norm()
            if gnorm > rho:
                gamma = gamma * (rho / gnorm)
        else:
            gamma = (gamma + (2.5 * rho / steps) * torch.sign(g)).clamp(-rho, rho)
        value, grad = _grad_at(f, w + c * gamma)
        best = max(best, value)
    return best - base


# --------------------------------------------------------------------------- trajectory measures
def _as_points(points: Any) -> torch.Tensor:
    x = torch.as_tensor(points.detach() if isinstance(points, torch.Tensor) else points)
    x = x.to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"Invalid trajectory: shape {tuple(x.shape)} (must be (num_points >= 2, dim))"
        )
    if not torch.isfinite(x).all():
        raise ValueError("Invalid trajectory: contains NaN or inf")
    return x


def mst_energy(points: Any, alpha: float = 1.0) -> float:
    """``E_α = Σ_{e ∈ MST} |e|^α`` of the Euclidean minimum spanning tree of the points.

    Requires scipy (``pip install "sdopt[science]"``).
    """
    alpha = check_positive("alpha", alpha)
    try:
        from scipy.sparse.csgraph import minimum_spanning_tree
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'mst_energy and ph_dimension need scipy: pip install "sdopt[science]"'
        ) from exc
    x = _as_points(points)
    dist = torch.cdist(x, x).numpy()
    # scipy treats 0 as "no edge": give duplicate points a negligible positive distance
    dist[dist == 0] = 1e-300
    tree = minimum_spanning_tree(dist)
    lengths = tree.data
    lengths[lengths <= 1e-300] = 0.0
    return float((lengths**alpha).sum())


def ph_dimension(
    trajectory: Any,
    *,
    min_points: int = 200,
    max_points: int = 1000,
    num_sizes: int = 8,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
) -> float:
    """Persistent-homology dimension of a point cloud (Birdal et al. 2021).

    For ``num_sizes`` subset sizes ``n`` from ``min_points`` to ``max_points`` (capped at the
    number of points), ``E_α(n)`` of a random subset is computed; ``log E_α ≈ m log n + b`` is
    fitted by least squares and ``dim_PH = α / (1 − m)``.

    Args:
        trajectory: ``(T, d)`` weight vectors (tensor or array).
    """
    x = _as_points(trajectory)
    min_points = check_int("min_points", min_points, minimum=2)
    max_points = check_int("max_points", max_points, minimum=min_points)
    num_sizes = check_int("num_sizes", num_sizes, minimum=2)
    top = min(max_points, x.shape[0])
    low = min(min_points, top // 2)
    if low < 2 or top <= low:
        raise ValueError(
            f"Invalid trajectory: {x.shape[0]} points (need at least {2 * max(2, min_points // 2)})"
        )
    sizes = torch.unique(torch.linspace(low, top, num_sizes).round().long())
    logs_n, logs_e = [], []
    for n in sizes.tolist():
        idx = torch.randperm(x.shape[0], generator=generator)[:n]
        logs_n.append(math.log(n))
        logs_e.append(math.log(mst_energy(x[idx], alpha)))
    a = torch.tensor([[ln, 1.0] for ln in logs_n], dtype=torch.float64)
    slope = float(torch.linalg.lstsq(a, torch.tensor(logs_e, dtype=torch.float64)[:, None])[0][0])
    return alpha / (1 - slope)


# --------------------------------------------------------------------------- noise scales
def gradient_noise_scale(lr: float, dataset_size: int, batch_size: int) -> float:
    """Smith & Le's noise scale ``g = η (N/B − 1)``."""
    lr = check_positive("lr", lr)
    dataset_size = check_int("dataset_size", dataset_size, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1, maximum=dataset_size)
    return lr * (dataset_size / batch_size - 1)


def _batch_size(batch: Any) -> int:
    targets = batch[1]
    if isinstance(targets, torch.Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    inputs = batch[0]
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    raise ValueError("Invalid data: cannot infer the batch size (pass batch_size=...)")


# --------------------------------------------------------------------------- one call
def compute_measures(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any],
    data: Any,
    lr: float,
    which: Iterable[str] = DEFAULT_MEASURES,
    *,
    generator: torch.Generator | None = None,
    **options: Any,
) -> dict[str, float]:
    """Compute a chosen set of measures and return a flat ``{name: float}`` record to log.

    Args:
        model: the ``nn.Module`` (never modified).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        data: one ``(inputs, targets)`` batch or a sequence of them (losses are means over
            the batches).
        lr: the learning rate ``η`` (for ``rds_sharpness``, ``gradient_noise_scale`` and
            ``sharpness_dimension``).
        which: names from :data:`ALL_MEASURES` (a single name may be given as a string).
        generator: random source for probes, starts and samples (the global RNG is untouched).
        **options: ``num_probes`` (20), ``lanczos_tol`` (1e-4), ``epsilon`` (1e-3, ε-sharpness),
            ``rho`` (0.05), ``p`` (2 or ``"inf"``), ``ascent_steps`` (20), ``num_samples`` (20),
            ``trajectory`` (``(T, d)`` points for ``ph_dimension``/``mst_energy``),
            ``ph_alpha`` (1.0), ``min_points`` (200), ``max_points`` (1000),
            ``dataset_size`` / ``batch_size`` (noise scales), ``sd_method`` (``"deflated"``),
            ``sd_options`` (dict passed to the estimator), ``eps`` (0.0, inside the logarithm).

    Returns:
        ``{name: value}``; extra diagnostic keys carry ``_se`` (standard error) suffixes.

    Raises:
        ValueError: for an invalid argument, an unknown measure name or option, or an
            option's invalid value (named as the option), before any computation.
    """
    lr = check_positive("lr", lr)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"Invalid model: {type(model).__name__} (must be a torch.nn.Module)")
    if not callable(loss_fn):
        raise ValueError(f"Invalid loss_fn: {loss_fn!r} (must be callable)")
    from sdopt.curvature.functional import normalize_batches

    batches = normalize_batches(data)
    names = [which] if isinstance(which, str) else list(which)
    if not names:
        raise ValueError("Invalid which: [] (must name at least one measure)")
    for name in names:
        check_choice("which", name, ALL_MEASURES)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"Invalid generator: {generator!r} (must be a torch.Generator or None)")
    known = {
        "num_probes", "lanczos_tol", "epsilon", "rho", "p", "ascent_steps", "num_samples",
        "trajectory", "ph_alpha", "min_points", "max_points", "dataset_size", "batch_size",
        "sd_method", "sd_options", "eps",
    }  # fmt: skip
    for key in options:
        if key not in known:
            raise ValueError(f"Invalid option: {key!r} (must be one of {sorted(known)})")
    # every option checked under its own name before any work (a bad one must not surface
    # later as another function's argument, or be silently rounded by int())
    num_probes = check_int("num_probes", options.get("num_probes", 20), minimum=1)
    tol = check_positive("lanczos_tol", options.get("lanczos_tol", 1e-4))
    epsilon = check_positive("epsilon", options.get("epsilon", 1e-3))
    rho = check_positive("rho", options.get("rho", 0.05))
    p = options.get("p", 2)
    if p not in (2, "inf", math.inf):
        raise ValueError(f"Invalid p: {p!r} (must be 2 or 'inf')")
    steps = check_int("ascent_steps", options.get("ascent_steps", 20), minimum=1)
    num_samples = check_int("num_samples", options.get("num_samples", 20), minimum=1)
    alpha = check_positive("ph_alpha", options.get("ph_alpha", 1.0))
    min_points = check_int("min_points", options.get("min_points", 200), minimum=2)
    max_points = check_int("max_points", options.get("max_points", 1000), minimum=min_points)
    for key in ("dataset_size", "batch_size"):
        if options.get(key) is not None:
            check_int(key, options[key], minimum=1)
    from sdopt.dimension.estimators import METHODS

    sd_method = check_choice("sd_method", options.get("sd_method", "deflated"), METHODS)
    sd_options = options.get("sd_options", {})
    if not isinstance(sd_options, dict):
        raise ValueError(f"Invalid sd_options: {sd_options!r} (must be a dict)")
    eps = check_positive("eps", options.get("eps", 0.0), allow_zero=True)
    out: dict[str, float] = {}
    f = None
    op = None

    def functional() -> Any:
        nonlocal f
        if f is None:
            f = _functional(model, loss_fn, data)
        return f

    def operator() -> Any:
        nonlocal op
        if op is None:
            from sdopt.curvature import HessianOperator

            op = HessianOperator(model, loss_fn, data)
        return op

    if "lambda_max" in names or "rds_sharpness" in names:
        from sdopt.spectrum import top_eigenpairs

        top = top_eigenpairs(operator(), 1, which="LA", tol=tol, generator=generator)
        lam_max = float(top.eigenvalues[0])
        if "lambda_max" in names:
            out["lambda_max"] = lam_max
        if "rds_sharpness" in names:
            bottom = top_eigenpairs(operator(), 1, which="SA", tol=tol, generator=generator)
            out["rds_sharpness"] = rds_sharpness(lam_max, float(bottom.eigenvalues[0]), lr, eps=eps)
    if "trace" in names:
        from sdopt.spectrum import hutchinson_trace

        est = hutchinson_trace(operator(), num_probes, generator=generator)
        out["trace"] = float(est.value)
        out["trace_se"] = float(est.std_error)
    if "frobenius" in names:
        out["frobenius"], out["frobenius_se"] = frobenius_norm(
            operator(), num_probes, generator=generator
        )
    if "eps_sharpness" in names:
        out["eps_sharpness"] = epsilon_sharpness(functional(), epsilon=epsilon, steps=steps)
    for kind in ("avg", "max"):
        if f"adaptive_sharpness_{kind}" in names:
            out[f"adaptive_sharpness_{kind}"] = adaptive_sharpness(
                functional(),
                rho=rho,
                p=p,
                kind=kind,
                steps=steps,
                num_samples=num_samples,
                generator=generator,
            )
    if "ph_dimension" in names or "mst_energy" in names:
        traj = options.get("trajectory")
        if traj is None:
            raise ValueError("Invalid trajectory: None (ph_dimension and mst_energy need one)")
        if "mst_energy" in names:
            out["mst_energy"] = mst_energy(traj, alpha)
        if "ph_dimension" in names:
            out["ph_dimension"] = ph_dimension(
                traj,
                alpha=alpha,
                min_points=min_points,
                max_points=max_points,
                generator=generator,
            )
    if "gradient_noise_scale" in names or "simple_noise_scale" in names:
        bsz = int(options.get("batch_size") or _batch_size(batches[0]))
        n = int(options.get("dataset_size") or bsz * len(batches))
        if "gradient_noise_scale" in names:
            out["gradient_noise_scale"] = gradient_noise_scale(lr, n, bsz)
        if "simple_noise_scale" in names:
            if len(batches) < 2:
                raise ValueError("Invalid data: simple_noise_scale needs at least 2 batches")
            grads = torch.stack(
                [_functional(model, loss_fn, b).value_and_gradient()[1] for b in batches]
            ).to(torch.float64)
            mean = grads.mean(0)
            var = ((grads - mean) ** 2).sum(1).sum() / (len(batches) - 1)
            out["simple_noise_scale"] = float(bsz * var / (mean.norm() ** 2))
    if "weight_norm" in names:
        params = [p for p in model.parameters() if p.requires_grad]
        out["weight_norm"] = float(
            torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))
        )
    if "sharpness_dimension" in names:
        from sdopt.dimension import estimate_sharpness_dimension

        est = estimate_sharpness_dimension(
            model,
            loss_fn,
            data,
            lr,
            method=sd_method,
            generator=generator,
            eps=eps,
            **sd_options,
        )
        out["sharpness_dimension"] = est.value
        out["sharpness_dimension_se"] = est.uncertainty
        out["sharpness_dimension_products"] = float(est.num_products)
    return out
