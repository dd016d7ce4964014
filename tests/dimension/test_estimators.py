"""Estimators from a model against dense ``torch.func.hessian`` ground truth (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sdopt import estimate_sharpness_dimension, sharpness_dimension
from sdopt.dimension import kaplan_yorke_dimension, lyapunov_exponents, sd_from_spectrum

LOSS = nn.functional.mse_loss  # generic spectrum: no exactly repeated eigenvalues


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)
    ).double()
    x = torch.randn(64, 4, dtype=torch.float64) * 2
    y = torch.randn(64, 3, dtype=torch.float64)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    return model, batches


def dense_spectra(model: nn.Module, batches) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rows = []
    for x, y in batches:

        def loss(t: torch.Tensor, x=x, y=y) -> torch.Tensor:
            parts = dict(zip(names, [c.view(s) for c, s in zip(t.split(sizes), shapes)]))
            return LOSS(functional_call(model, parts, (x,)), y)

        rows.append(torch.linalg.eigvalsh(hessian(loss)(theta)))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def problem():
    model, batches = setup()
    spectra = dense_spectra(model, batches)
    lr = 2.5 / float(spectra.max())  # the sharpest batch beyond the edge of stability
    return model, batches, spectra, lr


def test_exact_matches_dense_ground_truth(problem) -> None:
    model, batches, spectra, lr = problem
    before = [p.detach().clone() for p in model.parameters()]
    est = estimate_sharpness_dimension(model, LOSS, batches, lr, "exact")
    assert est.value == pytest.approx(sharpness_dimension(spectra, lr), abs=1e-8)
    assert torch.allclose(est.eigenvalues, spectra, atol=1e-10)
    assert est.num_products == 42 * 4 and est.dim == 42
    assert est.protocol == "minibatch" and est.uncertainty >= 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    # prediction at another learning rate needs no products
    assert est.predict(2 * lr)[0] == pytest.approx(sharpness_dimension(spectra, 2 * lr))
    assert sd_from_spectrum(est, lr)[0] == pytest.approx(est.value)


def test_full_batch_protocol(problem) -> None:
    model, batches, _, lr = problem
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    full = dense_spectra(model, [(x, y)])[0]
    est = estimate_sharpness_dimension(model, LOSS, batches, lr, "exact", protocol="full-batch")
    assert est.value == pytest.approx(sharpness_dimension(full, lr), abs=1e-8)
    assert est.protocol == "full-batch"


def test_deflated_with_every_eigenpair_is_exact(problem) -> None:
    model, batches, spectra, lr = problem
    est = estimate_sharpness_dimension(
        model, LOSS, batches, lr, "deflated", k=40, k_bottom=2, tol=1e-10,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert est.value == pytest.approx(sharpness_dimension(spectra, lr), abs=1e-6)
    assert est.eigenvectors.shape == (42, 40)


def test_deflated_with_a_bulk_is_close(problem) -> None:
    model, batches, spectra, lr = problem
    batches = batches[:2]
    exact = sharpness_dimension(spectra[:2], lr)
    est = estimate_sharpness_dimension(
        model, LOSS, batches, lr, "deflated", k=8, k_bottom=2, num_probes=30, num_steps=30, allow_dense=False,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert est.value == pytest.approx(exact, rel=0.03)
    assert est.eigenvalues.shape == (2, 10)
    # a warm start from the cached vectors needs fewer products for the same answer
    again = estimate_sharpness_dimension(
        model, LOSS, batches, lr, "deflated", k=8, k_bottom=2, num_probes=30, num_steps=30, allow_dense=False,
        init=est.eigenvectors, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert again.value == pytest.approx(exact, rel=0.03)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("ps", {"num_quantiles": 42}),
        ("slq", {"bins": 400}),
        ("kde", {"bandwidth": 0.005}),  # default grid: 1,500 cells
    ],
)
def test_paper_estimators_converge_on_a_full_spectrum(problem, method, options) -> None:
    model, batches, _, lr = problem
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    full = dense_spectra(model, [(x, y)])[0]
    exact = sharpness_dimension(full, lr)
    est = estimate_sharpness_dimension(
        model, LOSS, (x, y), lr, method, num_probes=12, num_steps=42,
        generator=torch.Generator().manual_seed(0), **options,
    )  # fmt: skip
    assert est.value == pytest.approx(exact, rel=0.1), (est.value, exact)
    assert est.num_products == 12 * 42
    assert est.density is not None and est.uncertainty > 0


def test_momentum_map_matches_dense(problem) -> None:
    model, batches, spectra, lr = problem
    est = estimate_sharpness_dimension(
        model, LOSS, batches[:1], lr, "exact", exponent_map="momentum", momentum=0.9
    )
    z = lyapunov_exponents(spectra[0], lr, map="momentum", momentum=0.9)
    assert est.value == pytest.approx(kaplan_yorke_dimension(z), abs=1e-8)


def test_adam_map_uses_preconditioned_spectrum(problem) -> None:
    model, batches, _, lr = problem
    p = torch.linspace(0.5, 2.0, 42, dtype=torch.float64)
    est = estimate_sharpness_dimension(
        model, LOSS, batches[:1], lr, "exact", exponent_map="adam", preconditioner=p
    )
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    sizes = [q.numel() for q in model.parameters()]
    shapes = [q.shape for q in model.parameters()]
    x, y = batches[0]

    def loss(t):
        parts = dict(zip(names, [c.view(s) for c, s in zip(t.split(sizes), shapes)]))
        return LOSS(functional_call(model, parts, (x,)), y)

    h = hessian(loss)(theta)
    d = p.rsqrt()
    ev = torch.linalg.eigvalsh(d[:, None] * h * d[None, :])
    assert est.value == pytest.approx(sharpness_dimension(ev, lr), abs=1e-8)
    deflated = estimate_sharpness_dimension(
        model, LOSS, batches[:1], lr, "deflated", k=40, k_bottom=2, tol=1e-10,
        exponent_map="adam", preconditioner=p,
    )  # fmt: skip
    assert deflated.value == pytest.approx(est.value, abs=1e-6)


def test_exact_size_guard(problem) -> None:
    model, batches, _, lr = problem
    with pytest.raises(ValueError, match=r"Invalid method: 'exact' \(needs dense 42 × 42"):
        estimate_sharpness_dimension(model, LOSS, batches, lr, "exact", max_dim=10)


def test_invalid_method(problem) -> None:
    model, batches, _, lr = problem
    with pytest.raises(ValueError, match="Invalid method: 'lanczos'"):
        estimate_sharpness_dimension(model, LOSS, batches, lr, "lanczos")


def test_invalid_protocol(problem) -> None:
    model, batches, _, lr = problem
    with pytest.raises(ValueError, match="Invalid protocol: 'batch'"):
        estimate_sharpness_dimension(model, LOSS, batches, lr, protocol="batch")


def test_adam_needs_preconditioner(problem) -> None:
    model, batches, _, lr = problem
    with pytest.raises(ValueError, match="Invalid preconditioner: None"):
        estimate_sharpness_dimension(model, LOSS, batches, lr, exponent_map="adam")


def test_gd_map_rejects_momentum(problem) -> None:
    model, batches, _, lr = problem
    with pytest.raises(ValueError, match=r"Invalid momentum: 0\.5"):
        estimate_sharpness_dimension(model, LOSS, batches, lr, momentum=0.5)


def test_deflated_too_many_pairs(problem) -> None:
    model, batches, _, lr = problem
    dim = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=f"Invalid k: {dim + 1} "):
        estimate_sharpness_dimension(model, LOSS, batches, lr, "deflated", k=dim + 1, k_bottom=0)
    with pytest.raises(ValueError, match=f"Invalid k_bottom: 2 .*= {dim - 1} \\+ 2 "):
        estimate_sharpness_dimension(model, LOSS, batches, lr, "deflated", k=dim - 1, k_bottom=2)


def test_invalid_lr(problem) -> None:
    model, batches, _, _ = problem
    with pytest.raises(ValueError, match="Invalid lr: -1"):
        estimate_sharpness_dimension(model, LOSS, batches, -1)


def test_decomposition_matches_the_dense_spectrum(problem) -> None:
    from sdopt.dimension import edge_of_stability
    from sdopt.dimension.estimators import NEGATIVE_RESOLUTION

    model, batches, spectra, lr = problem
    sharpest = int(spectra.max(dim=1).values.argmax())  # beyond the edge by construction
    full = spectra[sharpest]
    batch = batches[sharpest : sharpest + 1]
    est = estimate_sharpness_dimension(model, LOSS, batch, lr)  # d = 42: dense route
    assert est.settings["dense"] and est.uncertainty == 0.0 and est.low == est.high == est.value
    assert est.value == pytest.approx(sharpness_dimension(full, lr), abs=1e-6)
    radius = float(full.abs().max())
    assert est.n_neg == int((full < -NEGATIVE_RESOLUTION * radius).sum())
    assert est.n_edge == int((full > edge_of_stability("gd") / lr).sum()) >= 1
    assert est.total_exponent == pytest.approx(float(torch.log((1 - lr * full).abs()).sum()))
    assert est.j_star == int(est.value)
    assert est.lambda_max == pytest.approx(float(full.max()))
    assert est.lambda_min == pytest.approx(float(full.min()))
    # the same measurement at another learning rate, no products
    other = est.at_lr(0.5 * lr)
    assert other.num_products == est.num_products and other.lr == 0.5 * lr
    assert other.value == pytest.approx(sharpness_dimension(full, 0.5 * lr), abs=1e-6)
    assert other.n_edge == int((full > 2 / (0.5 * lr)).sum())


def test_deflated_sees_the_bulk_the_trace_only_model_misses(problem) -> None:
    model, batches, spectra, lr = problem
    exact = sharpness_dimension(spectra[:2], lr)
    options = {"k": 8, "k_bottom": 2, "num_probes": 4, "num_steps": 5, "allow_dense": False}
    deflated = estimate_sharpness_dimension(
        model, LOSS, batches[:2], lr, generator=torch.Generator().manual_seed(0), **options
    )
    topk = estimate_sharpness_dimension(
        model, LOSS, batches[:2], lr, "topk", generator=torch.Generator().manual_seed(0),
        **options,
    )  # fmt: skip
    assert abs(deflated.value - exact) < abs(topk.value - exact)
    assert deflated.uncertainty > 0 and deflated.low <= deflated.value <= deflated.high


@pytest.mark.parametrize("method", ["deflated", "exact", "slq", "topk"])
def test_non_finite_loss_raises(problem, method) -> None:
    from sdopt.dimension.estimators import NonFiniteLossError

    model, batches, _, lr = problem
    bad = [(batches[0][0] * float("nan"), batches[0][1]), *batches[1:]]
    with pytest.raises(NonFiniteLossError):
        estimate_sharpness_dimension(model, LOSS, bad, lr, method)


def test_model_loss_batches_reach_fn_as_they_are(problem) -> None:
    """A ModelLoss gets each batch unchanged (a 3-tuple with sample weights here), and
    weights of one give the plain loss's estimate."""
    from sdopt.curvature import ModelLoss

    model, batches, _, lr = problem
    weighted = [(x, y, torch.ones(len(y), dtype=x.dtype)) for x, y in batches]
    seen = []

    def fn(m, batch):
        seen.append(type(batch))
        x, y, w = batch
        return (w * LOSS(m(x), y, reduction="none").reshape(len(y), -1).mean(1)).mean()

    options = {"generator": torch.Generator().manual_seed(0)}
    by_pairs = estimate_sharpness_dimension(model, LOSS, batches, lr, "exact", **options)
    by_fn = estimate_sharpness_dimension(model, ModelLoss(fn), weighted, lr, "exact", **options)
    assert tuple in seen
    assert by_fn.value == pytest.approx(by_pairs.value, abs=1e-8)
