"""Tests for sdopt.spectrum: Lanczos eigenpairs, trace estimators, SLQ, operators (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from sdopt.spectrum import (
    EigenResult,
    LinearOperator,
    SpectralDensity,
    TraceEstimate,
    as_operator,
    deflated,
    gd_map_squared,
    hutchinson_trace,
    hutchpp_trace,
    preconditioned,
    scaled,
    shifted,
    stochastic_lanczos_quadrature,
    top_eigenpairs,
)

D = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Dense references (eigvalsh, QR) on one thread: LAPACK's pool crawls on a busy small CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def known_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A = (Q * eigenvalues.to(D)) @ Q.T
    return (A + A.T) / 2


def spectra() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = 300
    outliers = torch.tensor([50.0, 30.0, 20.0, 12.0, 8.0, 6.0], dtype=D)
    bulk = torch.randn(n - 6, generator=g, dtype=D).abs() * 0.5
    return {
        "psd_outliers": torch.cat([outliers, bulk]),
        "indefinite": torch.cat(
            [outliers, -outliers * 0.7, torch.randn(n - 12, generator=g, dtype=D)]
        ),
        # degenerate: a triple and a double eigenvalue at the top, clustered bottom
        "degenerate": torch.cat(
            [
                torch.tensor([10.0, 10.0, 10.0, 7.0, 7.0, 5.0], dtype=D),
                torch.linspace(-3.0, 2.0, n - 10, dtype=D),
                torch.tensor([-4.0, -4.0, -4.0 + 1e-3, -4.0 - 1e-3], dtype=D),
            ]
        ),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


# ------------------------------------------------------------------------------- top_eigenpairs
@pytest.mark.parametrize("name", list(spectra()))
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_top_eigenpairs_match_eigvalsh(name: str, which: str) -> None:
    A = known_spectrum(spectra()[name])
    k = 6
    # the bottom of the half-normal bulk is a dense cluster: Lanczos needs many steps there
    res = top_eigenpairs(A, k, which=which, tol=1e-10, criterion="residual", max_iters=3000)
    true = torch.linalg.eigvalsh(A)
    if which == "LA":
        expected = true.flip(0)[:k]
    elif which == "SA":
        expected = true[:k]
    else:
        expected = true[true.abs().argsort(descending=True)][:k]
    assert res.converged and res.which == which
    assert res.eigenvalues.shape == (k,) and res.eigenvectors.shape == (A.shape[0], k)
    assert rel_err(res.eigenvalues, expected) < 1e-6
    X = res.eigenvectors
    assert torch.allclose(X.T @ X, torch.eye(k, dtype=D), atol=1e-10)
    true_res = (A @ X - X * res.eigenvalues).norm(dim=0)
    assert float(true_res.max()) < 1e-8 * float(true.abs().max())
    assert torch.allclose(res.residuals, true_res, atol=1e-8)
    if which == "LA":
        assert bool((res.eigenvalues.diff() <= 0).all())
    if which == "SA":
        assert bool((res.eigenvalues.diff() >= 0).all())


def test_eigenvalue_criterion_reaches_stated_accuracy() -> None:
    A = known_spectrum(spectra()["psd_outliers"])
    true = torch.linalg.eigvalsh(A).flip(0)
    for tol in (1e-3, 1e-6):
        res = top_eigenpairs(A, 5, tol=tol)
        assert res.converged
        assert rel_err(res.eigenvalues, true[:5]) < tol


def test_thick_restart_bounded_basis() -> None:
    A = known_spectrum(spectra()["degenerate"], seed=3)
    res = top_eigenpairs(A, 6, tol=1e-10, criterion="residual", max_basis=12, max_iters=2000)
    assert res.converged
    assert rel_err(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:6]) < 1e-6
    assert res.iterations == res.num_products > 12


def test_full_space_and_tiny_dims() -> None:
    A = known_spectrum(torch.tensor([3.0, -1.0, 2.0], dtype=D))
    res = top_eigenpairs(A, 3, which="SA")
    assert res.converged
    assert torch.allclose(res.eigenvalues, torch.tensor([-1.0, 2.0, 3.0], dtype=D), atol=1e-12)
    one = top_eigenpairs(torch.tensor([[2.0]], dtype=D), 1)
    assert float(one.eigenvalues[0]) == 2.0 and one.converged


def test_warm_start_uses_fewer_products() -> None:
    base = spectra()["psd_outliers"]
    A = known_spectrum(base)
    g = torch.Generator().manual_seed(5)
    E = torch.randn(A.shape, generator=g, dtype=D)
    B = A + 0.02 * (E + E.T) / 2 / math.sqrt(A.shape[0])  # "a few training steps later"
    for k in (1, 5):
        old = top_eigenpairs(A, k, tol=1e-8)
        cold = top_eigenpairs(B, k, tol=1e-8)
        warm = top_eigenpairs(B, k, tol=1e-8, init=old.eigenvectors)
        assert warm.converged and cold.converged
        assert warm.num_products < cold.num_products
        assert rel_err(warm.eigenvalues, cold.eigenvalues) < 1e-7
    # exact eigenvectors: the Krylov space is invariant after k products
    exact = top_eigenpairs(A, 5, tol=1e-8)
    again = top_eigenpairs(A, 5, tol=1e-8, init=exact.eigenvectors, init_noise=0.0)
    assert again.num_products <= 6 and again.converged


def _in_fresh_process(test):
    """Run ``test`` in a new Python process (its own pytest run of this node).

    Resident memory is only a faithful measure in a process that has not yet run hundreds of
    other tests: late in a full run, freed pages already resident are reused and the peak reads
    0 vectors. The child has only this module imported."""
    import functools
    import os
    import subprocess
    import sys

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if os.environ.get("SDOPT_FRESH_PROCESS") == test.__name__:
            return test(*args, **kwargs)
        node = f"{__file__}::{test.__name__}"
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
            env={**os.environ, "SDOPT_FRESH_PROCESS": test.__name__, "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if "skipped" in result.stdout and "passed" not in result.stdout:
            pytest.skip(result.stdout.strip().splitlines()[-1])
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    return wrapper


def _peak_vectors(fn, vector_bytes: int):
    """``fn()`` and the peak of the resident memory it added, in vectors of ``vector_bytes``.

    Linux: the high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` before the
    call, so every transient counts; blocks of 64 KiB and more are mmapped (glibc's
    ``mallopt``), so that freed memory leaves the count at once.
    """
    import ctypes
    import ctypes.util

    def status(key: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = status("VmRSS")
    except (OSError, AttributeError, KeyError):
        pytest.skip("needs Linux /proc and glibc to measure peak memory")
    out = fn()
    return out, (status("VmHWM") - base) / vector_bytes


class _Diagonal:
    """``diag(d)`` with ``matvec`` only (one new vector per product)."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.dim, self.dtype, self.device = d, d.numel(), d.dtype, d.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.d * v


@_in_fresh_process
def test_memory_budget_of_top_eigenpairs() -> None:
    for which in ("LA", "SA"):
        _check_memory_budget_of_top_eigenpairs(which)


def _check_memory_budget_of_top_eigenpairs(which: str) -> None:
    """Peak memory: the ``max_basis + 1`` basis rows and one product (measured by RSS on a
    4 MiB-per-vector operator); the old solver (k + 40 rows, a restart copy of ~k + 20 rows
    and a returned copy of k) went past 70 vectors here."""
    n, k = 1 << 19, 4
    g = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=g, dtype=D)
    d[:k] += 1.0 + torch.arange(k, dtype=D)  # separated outliers on top, a dense bottom
    vector = n * d.element_size()
    res, peak = _peak_vectors(
        lambda: top_eigenpairs(_Diagonal(d), k, which=which, tol=1e-2, max_iters=150), vector
    )
    budget = {"LA": k + 10, "SA": k + 30}[which] + 2  # default max_basis + 2
    assert peak <= budget + 0.5  # + pages and the bool of the finiteness check
    # the measurement sees the basis (rows never written are not resident)
    assert peak >= min(budget, res.num_products + 2) - 2.0
    # the eigenvectors do not keep the basis alive: their storage is k vectors
    assert res.eigenvectors.untyped_storage().nbytes() == k * vector
    if which == "LA":
        assert res.converged
        assert rel_err(res.eigenvalues, d.sort(descending=True).values[:k]) < 1e-2


def test_default_max_basis_and_restarts_across_column_chunks() -> None:
    from sdopt.spectrum.lanczos import default_max_basis

    assert default_max_basis(8, 10_000) == 18 and default_max_basis(8, 10_000, "SA") == 38
    assert default_max_basis(8, 12) == 12 and default_max_basis(3, 3, "LM") == 3
    # restarts rotate the basis in place in column chunks (2048+ columns each): many here
    n = 20_000
    g = torch.Generator().manual_seed(2)
    lam = torch.cat(
        [torch.linspace(10.0, 5.0, 12, dtype=D), torch.rand(n - 12, generator=g, dtype=D)]
    )
    Q = torch.randperm(n, generator=g)
    A = LinearOperator(n, lambda V: lam[:, None] * V[Q][Q.argsort()], dtype=D)
    res = top_eigenpairs(A, 6, tol=1e-10, criterion="residual", max_basis=9, max_iters=3000)
    assert res.converged and res.num_products > 9
    assert rel_err(res.eigenvalues, lam[:6]) < 1e-9
    X = res.eigenvectors
    assert torch.allclose(X.T @ X, torch.eye(6, dtype=D), atol=1e-10)
    assert float((lam[:, None] * X - X * res.eigenvalues).norm(dim=0).max()) < 1e-8


def test_identity_like_operator_returning_its_input() -> None:
    """An operator that returns its argument (a view of the basis row) must not be corrupted
    by the in-place Gram–Schmidt."""
    lam = spectra()["psd_outliers"]
    A = known_spectrum(lam)
    shifted_by_identity = LinearOperator(300, lambda V: V, dtype=D)
    res = top_eigenpairs(shifted_by_identity, 2, tol=1e-8)
    assert torch.allclose(res.eigenvalues, torch.ones(2, dtype=D), atol=1e-12)
    res2 = top_eigenpairs(A, 3, tol=1e-10, criterion="residual")
    assert rel_err(res2.eigenvalues, lam.sort(descending=True).values[:3]) < 1e-9


def test_operator_inputs_and_product_count() -> None:
    A = known_spectrum(spectra()["indefinite"])

    class Duck:  # duck-typed operator with matvec only
        dim = A.shape[0]
        dtype = D
        device = torch.device("cpu")
        num_products = 0

        def matvec(self, v: torch.Tensor) -> torch.Tensor:
            self.num_products += 1
            return A @ v

    duck = Duck()
    res = top_eigenpairs(duck, 3, tol=1e-8)
    assert res.num_products == duck.num_products
    op = LinearOperator(A.shape[0], lambda V: A @ V)
    res2 = top_eigenpairs(op, 3, tol=1e-8)
    assert op.num_products == res2.num_products
    assert rel_err(res.eigenvalues, res2.eigenvalues) < 1e-10


def test_float32_operator() -> None:
    A = known_spectrum(spectra()["psd_outliers"]).float()
    res = top_eigenpairs(A, 3, tol=1e-4)
    assert res.eigenvectors.dtype == torch.float32 and res.eigenvalues.dtype == torch.float32
    true = torch.linalg.eigvalsh(A.double()).flip(0)[:3]
    assert rel_err(res.eigenvalues.double(), true) < 1e-4


def test_generator_determinism_and_global_rng_untouched() -> None:
    A = known_spectrum(spectra()["indefinite"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    r1 = top_eigenpairs(A, 3, generator=torch.Generator().manual_seed(7))
    r2 = top_eigenpairs(A, 3, generator=torch.Generator().manual_seed(7))
    hutchinson_trace(A, 5)
    hutchpp_trace(A, 9)
    stochastic_lanczos_quadrature(A, 2, 5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r1.eigenvectors, r2.eigenvectors) and r1.num_products == r2.num_products


def test_eigen_result_is_frozen() -> None:
    res = top_eigenpairs(torch.eye(3, dtype=D) * 2, 1)
    assert isinstance(res, EigenResult) and res.k == 1
    with pytest.raises(AttributeError):
        res.converged = False  # type: ignore[misc]


# ------------------------------------------------------------------------------- errors
A_ERR = known_spectrum(torch.arange(1.0, 11.0, dtype=D))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 11}, r"Invalid k: 11 \(must be <= dim = 10\)"),
        ({"k": 0}, r"Invalid k: 0 \(must be >= 1\)"),
        ({"k": 2.5}, r"Invalid k: 2.5 \(must be an integer\)"),
        ({"which": "BE"}, r"Invalid which: 'BE'"),
        ({"tol": 0.0}, r"Invalid tol: 0.0"),
        ({"criterion": "x"}, r"Invalid criterion: 'x'"),
        ({"max_iters": 0}, r"Invalid max_iters: 0"),
        ({"max_basis": 2, "k": 2}, r"Invalid max_basis: 2 \(must be > k = 2"),
        ({"max_basis": 11}, r"Invalid max_basis: 11 \(must be <= dim = 10\)"),
        ({"init": torch.ones(9, 2, dtype=D)}, r"Invalid init: shape \(9, 2\)"),
        ({"init": torch.ones(10, 0, dtype=D)}, r"Invalid init: shape \(10, 0\)"),
        ({"init": torch.full((10, 1), math.nan, dtype=D)}, r"Invalid init: must be floating"),
        ({"init": [1.0]}, r"Invalid init: list"),
        ({"init_noise": -1.0}, r"Invalid init_noise: -1.0"),
        ({"generator": 3}, r"Invalid generator: 3"),
    ],
)
def test_top_eigenpairs_errors(kwargs: dict, match: str) -> None:
    kwargs = {"k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        top_eigenpairs(A_ERR, **kwargs)


@pytest.mark.parametrize(
    ("op", "match"),
    [
        (torch.ones(3, 4, dtype=D), r"Invalid op: tensor of shape \(3, 4\)"),
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=D), r"Invalid op: tensor is not symmetric"),
        (torch.tensor([[math.nan]], dtype=D), r"Invalid op: tensor contains NaN"),
        (torch.eye(2, dtype=torch.int64), r"Invalid op: tensor of dtype torch.int64"),
        ("matrix", r"Invalid op: str"),
    ],
)
def test_bad_operator(op: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        top_eigenpairs(op, 1)


def test_nan_product_raises() -> None:
    calls = {"n": 0}

    def matmat(V: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = A_ERR @ V
        return out * math.nan if calls["n"] >= 3 else out

    op = LinearOperator(10, matmat)
    with pytest.raises(FloatingPointError, match="product is not finite"):
        top_eigenpairs(op, 2, tol=1e-12)
    with pytest.raises(FloatingPointError, match="product is not finite"):
        hutchinson_trace(LinearOperator(10, lambda V: V * math.inf), 2)
    with pytest.raises(FloatingPointError, match="product is not finite"):
        stochastic_lanczos_quadrature(LinearOperator(10, lambda V: V * math.nan), 1, 3)


# ------------------------------------------------------------------------------- operators
def test_composed_operators() -> None:
    lam = torch.tensor([4.0, 2.0, 1.0, -1.0, 0.5], dtype=D)
    A = known_spectrum(lam)
    eye = torch.eye(5, dtype=D)
    assert torch.allclose(shifted(A, 2.0).to_dense(), A + 2 * eye)
    assert torch.allclose(scaled(A, -3.0).to_dense(), -3 * A)
    assert torch.allclose(as_operator(A).shift(1.0).scale(2.0).to_dense(), 2 * (A + eye))
    assert torch.allclose(gd_map_squared(A, 0.1).to_dense(), (eye - 0.1 * A) @ (eye - 0.1 * A))
    p = torch.tensor([1.0, 2.0, 4.0, 0.5, 1.5], dtype=D)
    Pm = torch.diag(p.rsqrt())
    assert torch.allclose(preconditioned(A, p).to_dense(), Pm @ A @ Pm)
    top = top_eigenpairs(A, 2, tol=1e-12)
    Dm = deflated(A, top.eigenvectors).to_dense()
    ev = torch.linalg.eigvalsh(Dm)
    assert torch.allclose(ev, torch.tensor([-1.0, 0.0, 0.0, 0.5, 1.0], dtype=D), atol=1e-10)
    with pytest.raises(ValueError, match=r"Invalid lr: -1\.0"):
        gd_map_squared(A, -1.0)
    with pytest.raises(ValueError, match=r"Invalid preconditioner: shape \(4,\)"):
        preconditioned(A, torch.ones(4, dtype=D))
    with pytest.raises(ValueError, match=r"Invalid vectors: shape \(4, 1\)"):
        deflated(A, torch.ones(4, 1, dtype=D))
    with pytest.raises(ValueError, match=r"Invalid dim: 0"):
        LinearOperator(0, lambda V: V)
    with pytest.raises(ValueError, match=r"Invalid V: shape \(4, 1\)"):
        as_operator(A).matmat(torch.ones(4, 1, dtype=D))


def test_hessian_operator_input() -> None:
    curvature = pytest.importorskip("sdopt.curvature")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    x = torch.randn(32, 4, dtype=D)
    y = torch.randint(0, 3, (32,))
    op = curvature.HessianOperator(model, torch.nn.functional.cross_entropy, (x, y))
    H = op.to_dense()
    before = op.num_products
    res = top_eigenpairs(op, 4, tol=1e-10, criterion="residual")
    assert op.num_products - before == res.num_products
    assert rel_err(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:4]) < 1e-6
    bottom = top_eigenpairs(op, 2, which="SA", tol=1e-10, criterion="residual")
    assert rel_err(bottom.eigenvalues, torch.linalg.eigvalsh(H)[:2]) < 1e-6


# ------------------------------------------------------------------------------- trace
def test_hutchinson_converges() -> None:
    A = known_spectrum(spectra()["indefinite"])
    true = float(torch.trace(A))
    for dist in ("rademacher", "gaussian"):
        est = hutchinson_trace(
            A, 2000, distribution=dist, block_size=500, generator=torch.Generator().manual_seed(0)
        )
        assert isinstance(est, TraceEstimate) and est.num_products == 2000
        assert est.samples.shape == (2000,)
        assert abs(est.value - true) < 4 * est.std_error
        # the standard error is right: per-probe variance 2 sum_{i!=j} A_ij^2 (Rademacher)
        if dist == "rademacher":
            var = 2 * float((A**2).sum() - (torch.diagonal(A) ** 2).sum())
            assert est.std_error == pytest.approx(math.sqrt(var / 2000), rel=0.1)
    diag = torch.diag(torch.arange(1.0, 6.0, dtype=D))
    assert hutchinson_trace(diag, 3).value == 15.0  # Rademacher on a diagonal matrix is exact


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise() -> None:
    A = known_spectrum(spectra()["psd_outliers"])
    true = float(torch.trace(A))
    errs_h, errs_pp = [], []
    for seed in range(10):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        errs_h.append(abs(hutchinson_trace(A, 60, generator=g1).value - true))
        pp = hutchpp_trace(A, 60, generator=g2)
        assert pp.num_products == 60
        errs_pp.append(abs(pp.value - true))
    assert sum(errs_pp) < 0.5 * sum(errs_h)
    big = hutchpp_trace(A, 600, generator=torch.Generator().manual_seed(0))
    assert abs(big.value - true) < 0.005 * true and abs(big.value - true) < 4 * big.std_error
    exact = hutchpp_trace(A_ERR, 30)  # dim 10: the sketch holds the whole space
    assert exact.value == pytest.approx(55.0, rel=1e-10)


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (hutchinson_trace, {"num_probes": 0}, r"Invalid num_probes: 0"),
        (hutchinson_trace, {"distribution": "x"}, r"Invalid distribution: 'x'"),
        (hutchinson_trace, {"block_size": 0}, r"Invalid block_size: 0"),
        (hutchpp_trace, {"num_products": 2}, r"Invalid num_products: 2"),
        (hutchpp_trace, {"distribution": "x"}, r"Invalid distribution: 'x'"),
    ],
)
def test_trace_errors(fn, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(A_ERR, **kwargs)


# ------------------------------------------------------------------------------- SLQ
def test_slq_moments_converge() -> None:
    lam = spectra()["indefinite"]
    A = known_spectrum(lam)
    dens = stochastic_lanczos_quadrature(A, 200, 30, generator=torch.Generator().manual_seed(0))
    assert isinstance(dens, SpectralDensity) and dens.num_products == 200 * 30
    assert torch.allclose(dens.weights.sum(dim=1), torch.ones(200, dtype=D))
    for f in (
        lambda x: x,
        lambda x: x**2,
        lambda x: torch.exp(x / 50),
        lambda x: torch.log1p(x**2),
    ):
        truth = float(f(lam).sum())
        value, err = dens.integrate(f)
        assert abs(value - truth) < 4 * err + 1e-8 * abs(truth)
        assert err < 0.1 * float(f(lam).abs().sum())
    assert dens.moment(0)[0] == pytest.approx(300.0)
    # a degree-<2m polynomial is integrated exactly per probe: equal to the Hutchinson samples
    g = torch.Generator().manual_seed(4)
    d2 = stochastic_lanczos_quadrature(A, 5, 10, generator=g)
    z = torch.randint(0, 2, (300,), generator=torch.Generator().manual_seed(4)).to(D) * 2 - 1
    assert float(d2.per_probe(lambda x: x**3)[0]) == pytest.approx(
        float(z @ A @ A @ A @ z), rel=1e-9
    )


def test_slq_without_reorthogonalisation_keeps_smooth_quadratures() -> None:
    """Three-term recurrence: the same low moments per probe (exact for degree < 2m in exact
    arithmetic), the same mass, and integrals within the probe error of the truth."""
    lam = spectra()["indefinite"]
    A = known_spectrum(lam)
    full = stochastic_lanczos_quadrature(A, 50, 60, generator=torch.Generator().manual_seed(3))
    lean = stochastic_lanczos_quadrature(
        A, 50, 60, generator=torch.Generator().manual_seed(3), reorthogonalize=False
    )
    assert torch.allclose(lean.weights.sum(dim=1), torch.ones(50, dtype=D))
    for p in (1, 2, 3, 4):
        assert torch.allclose(
            lean.per_probe(lambda x, p=p: x**p), full.per_probe(lambda x, p=p: x**p), rtol=1e-8
        )
    # ghosts: 60 steps on a 300-dim matrix duplicate the top outlier without reorthogonalisation
    for f in (lambda x: torch.log1p(x**2), lambda x: torch.exp(x / 50)):
        truth = float(f(lam).sum())
        value, err = lean.integrate(f)
        assert abs(value - truth) < 4 * err + 1e-8 * abs(truth)
    with pytest.raises(ValueError, match="Invalid reorthogonalize"):
        stochastic_lanczos_quadrature(A, 2, 5, reorthogonalize="no")


@_in_fresh_process
def test_memory_budget_of_slq() -> None:
    n = 1 << 19
    d = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=D)
    for reorthogonalize, steps, budget in ((True, 20, 22), (False, 40, 5)):
        dens, peak = _peak_vectors(
            lambda r=reorthogonalize, s=steps: stochastic_lanczos_quadrature(
                _Diagonal(d), 1, s, generator=torch.Generator().manual_seed(0), reorthogonalize=r
            ),
            n * d.element_size(),
        )
        assert dens.num_products == steps
        assert budget - 2.0 <= peak <= budget + 1.5  # + the probe and allocator pages
        assert float(dens.integrate(lambda x: x)[0]) == pytest.approx(float(d.sum()), rel=0.05)


def test_slq_density_quantiles_histogram() -> None:
    lam = spectra()["psd_outliers"]
    A = known_spectrum(lam)
    dens = stochastic_lanczos_quadrature(A, 20, 40, generator=torch.Generator().manual_seed(1))
    grid = torch.linspace(-10, 70, 8001, dtype=D)
    mass = float(torch.trapezoid(dens.density(grid), grid))
    assert mass == pytest.approx(300.0, rel=1e-3)
    assert float(torch.trapezoid(dens.density(grid, sigma=0.5), grid)) == pytest.approx(
        300.0, rel=1e-3
    )
    q = dens.quantiles(300)
    assert q.shape == (300,) and bool((q.diff() >= 0).all())
    assert float(q[-1]) == pytest.approx(50.0, rel=1e-3)  # the top outlier is a resolved atom
    assert float(q.median()) == pytest.approx(float(lam.median()), abs=0.1)
    counts, edges = dens.histogram(20)
    assert float(counts.sum()) == pytest.approx(300.0) and edges.numel() == 21
    counts2, _ = dens.histogram(torch.tensor([-1.0, 1.0, 100.0], dtype=D))
    assert float(counts2[1]) == pytest.approx(float((lam > 1).sum()), abs=3)


def test_slq_deflation() -> None:
    lam = spectra()["psd_outliers"]
    A = known_spectrum(lam)
    top = top_eigenpairs(A, 6, tol=1e-10, criterion="residual")
    dens = stochastic_lanczos_quadrature(
        A, 30, 20, deflate=top, generator=torch.Generator().manual_seed(0)
    )
    assert dens.deflated is not None and dens.bulk_dim == 294
    assert bool((dens.nodes < 6.0 - 1e-6).all())  # the outliers are gone from the bulk nodes
    f = lambda x: x**2  # noqa: E731
    truth = float((lam**2).sum())
    value, err = dens.integrate(f)
    _, plain_err = stochastic_lanczos_quadrature(
        A, 30, 20, generator=torch.Generator().manual_seed(0)
    ).integrate(f)
    assert abs(value - truth) < 4 * err + 1e-8 and err < 0.2 * plain_err
    assert float(
        torch.trapezoid(
            dens.density(torch.linspace(-5, 60, 20001, dtype=D)),
            torch.linspace(-5, 60, 20001, dtype=D),
        )
    ) == pytest.approx(300.0, rel=1e-3)


def test_slq_operator_sequences_and_callables() -> None:
    A = known_spectrum(spectra()["indefinite"])
    B = 2 * A
    seq = stochastic_lanczos_quadrature([A, B], 4, 10, generator=torch.Generator().manual_seed(0))
    fn = stochastic_lanczos_quadrature(
        lambda r: [A, B][r % 2], 4, 10, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(seq.nodes, fn.nodes)
    assert float(seq.nodes[1].max()) == pytest.approx(2 * float(seq.nodes[0].max()), rel=0.2)
    small = stochastic_lanczos_quadrature(torch.diag(torch.tensor([1.0, 2.0], dtype=D)), 3, 5)
    assert small.nodes.shape == (3, 5) and torch.allclose(
        small.weights.sum(1), torch.ones(3, dtype=D)
    )
    assert small.integrate(lambda x: x)[0] == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 5), {}, r"Invalid num_probes: 0"),
        ((2, 0), {}, r"Invalid num_steps: 0"),
        ((2, 3), {"distribution": "x"}, r"Invalid distribution: 'x'"),
        ((2, 3), {"deflate": "x"}, r"Invalid deflate: str"),
    ],
)
def test_slq_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stochastic_lanczos_quadrature(A_ERR, *args, **kwargs)


def test_slq_bad_inputs() -> None:
    with pytest.raises(ValueError, match="Invalid op_or_ops: empty sequence"):
        stochastic_lanczos_quadrature([], 2, 3)
    with pytest.raises(ValueError, match="Invalid op_or_ops: int"):
        stochastic_lanczos_quadrature(3, 2, 3)
    with pytest.raises(ValueError, match=r"Invalid op_or_ops: operator 1 has dim 3"):
        stochastic_lanczos_quadrature([A_ERR, torch.eye(3, dtype=D)], 2, 3)
    top = top_eigenpairs(torch.eye(3, dtype=D), 1)
    with pytest.raises(ValueError, match=r"Invalid deflate: eigenvectors of shape \(3, 1\)"):
        stochastic_lanczos_quadrature(A_ERR, 2, 3, deflate=top)
    dens = stochastic_lanczos_quadrature(A_ERR, 2, 3)
    with pytest.raises(ValueError, match=r"Invalid sigma: -1\.0"):
        dens.density(torch.zeros(3), sigma=-1.0)
    with pytest.raises(ValueError, match="Invalid num: 0"):
        dens.quantiles(0)
    with pytest.raises(ValueError, match="Invalid bins: edges"):
        dens.histogram(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="Invalid f"):
        dens.integrate(lambda x: x.sum())
