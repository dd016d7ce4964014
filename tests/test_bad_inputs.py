"""Every public entry point's invalid inputs in one table (issue 11).

Each case must raise ``ValueError`` (STYLE.md: invalid arguments are ``ValueError``) whose message
names the argument: ``Invalid <name>: <value> (...)``. None may be silently accepted, crash
inside torch with an unrelated error, or hang. The objects are tiny (a 4-parameter linear model,
5 × 5 dense matrices), so the whole table runs in a few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdopt.curvature import GGNOperator, HessianOperator, hvp, make_functional_loss
from sdopt.dimension import (
    adam_preconditioner,
    edge_of_stability,
    estimate_sharpness_dimension,
    kaplan_yorke_dimension,
    lyapunov_exponents,
    preconditioned_operator,
    sd_from_spectrum,
    sharpness_dimension,
    weighted_kaplan_yorke,
)
from sdopt.loggers import ConsoleLogger, CSVLogger, JSONLLogger, WandbLogger
from sdopt.measures import (
    adaptive_sharpness,
    compute_measures,
    epsilon_sharpness,
    frobenius_norm,
    gradient_noise_scale,
    mst_energy,
    ph_dimension,
    rds_sharpness,
)
from sdopt.spectrum import (
    LinearOperator,
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

DT = torch.float64
_G = torch.Generator().manual_seed(0)
X = torch.randn(8, 3, dtype=DT, generator=_G)
Y = torch.randn(8, 1, dtype=DT, generator=_G)
DATA = (X, Y)
DIM = 4  # nn.Linear(3, 1): 3 weights and a bias
A = torch.diag(torch.arange(1.0, 6.0, dtype=DT))  # dense 5 x 5, eigenvalues 1..5


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 1, dtype=DT)


def op(**kwargs: Any) -> HessianOperator:
    return HessianOperator(model(), F.mse_loss, DATA, **kwargs)


def vec(n: int = DIM, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.ones(n, dtype=dtype)


def density():
    return stochastic_lanczos_quadrature(A, 2, 3)


class DuckOperator:
    """A duck-typed operator (``dim``, ``dtype``, ``matmat``), given bad attributes."""

    def __init__(self, dim: Any, dtype: torch.dtype = DT) -> None:
        self.dim = dim
        self.dtype = dtype

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return V


def sgd_without_state() -> torch.optim.Optimizer:
    return torch.optim.SGD(model().parameters(), lr=0.1)


def loss_none(outputs, targets):
    return F.mse_loss(outputs, targets, reduction="none")


def a_file(tmp_path) -> Any:
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


# (id, call taking tmp_path, regex the message must match). Each regex starts with the
# argument's name as the message states it: "Invalid <name>".
# fmt: off
CASES: list[tuple[str, Callable[[Any], Any], str]] = [
    # ---------------------------------------------------------------- HessianOperator
    ("hessian-model-not-module", lambda t: HessianOperator("net", F.mse_loss, DATA), "Invalid model"),
    ("hessian-loss-not-callable", lambda t: HessianOperator(model(), "mse", DATA), "Invalid loss_fn"),
    ("hessian-data-none", lambda t: HessianOperator(model(), F.mse_loss, None), "Invalid data"),
    ("hessian-data-bare-tensor", lambda t: HessianOperator(model(), F.mse_loss, X), "Invalid data"),
    ("hessian-data-empty-list", lambda t: HessianOperator(model(), F.mse_loss, []), "Invalid data"),
    ("hessian-data-not-pairs", lambda t: HessianOperator(model(), F.mse_loss, [X, Y, X]), r"Invalid data\[0\]"),
    ("hessian-data-int", lambda t: HessianOperator(model(), F.mse_loss, 3), "Invalid data"),
    ("hessian-empty-batch", lambda t: HessianOperator(model(), F.mse_loss, (X[:0], Y[:0])), "Invalid data: an empty batch"),
    ("hessian-empty-batch-in-list", lambda t: HessianOperator(model(), F.mse_loss, [DATA, (X[:0], Y[:0])]), r"Invalid data\[1\]: an empty batch"),
    ("hessian-empty-targets", lambda t: HessianOperator(model(), F.mse_loss, (X, Y[:0])), "Invalid data: an empty batch"),
    ("hessian-empty-tuple-inputs", lambda t: HessianOperator(model(), F.mse_loss, ((X[:0], X[:0]), Y[:0])), "Invalid data: an empty batch"),
    ("hessian-empty-mapping-inputs", lambda t: HessianOperator(model(), F.mse_loss, ({"input": X[:0]}, Y)), "Invalid data: an empty batch"),
    ("hessian-mode", lambda t: op(mode="exact"), "Invalid mode"),
    ("hessian-chunk-size-zero", lambda t: op(chunk_size=0), "Invalid chunk_size"),
    ("hessian-chunk-size-float", lambda t: op(chunk_size=2.5), "Invalid chunk_size"),
    ("hessian-vectorize-str", lambda t: op(vectorize="yes"), "Invalid vectorize"),
    ("hessian-fallback-int", lambda t: op(fallback=1), "Invalid fallback"),
    ("hessian-check-finite-none", lambda t: op(check_finite=None), "Invalid check_finite"),
    ("hessian-dropout", lambda t: op(dropout="on"), "Invalid dropout"),
    ("hessian-dropout-seed", lambda t: op(dropout_seed=1.5), "Invalid dropout_seed"),
    ("hessian-dropout-seed-bool", lambda t: op(dropout_seed=True), "Invalid dropout_seed"),
    ("hessian-distributed-str", lambda t: op(distributed="yes"), "Invalid distributed"),
    ("hessian-distributed-uninitialised", lambda t: op(distributed=True), "Invalid distributed"),
    ("hessian-no-trainable-params", lambda t: HessianOperator(model().requires_grad_(False), F.mse_loss, DATA), "Invalid model"),
    ("hessian-complex-params", lambda t: HessianOperator(nn.Linear(3, 1, dtype=torch.complex128), F.mse_loss, DATA), "Invalid model: parameter 'weight' has dtype torch.complex128"),
    ("hessian-matvec-list", lambda t: op().matvec([1.0] * DIM), "Invalid v"),
    ("hessian-matvec-shape", lambda t: op().matvec(vec(DIM + 1)), "Invalid v"),
    ("hessian-matvec-dtype", lambda t: op().matvec(vec(dtype=torch.float32)), "Invalid v"),
    ("hessian-matvec-nan", lambda t: op().matvec(vec() * math.nan), "Invalid v"),
    ("hessian-matmat-no-columns", lambda t: op().matmat(torch.ones(DIM, 0, dtype=DT)), "Invalid V"),
    ("hessian-matmat-1d", lambda t: op().matmat(vec()), "Invalid V"),
    ("hessian-unflatten-shape", lambda t: op().unflatten(vec(3)), "Invalid vec"),
    ("hessian-loss-reduction-none", lambda t: op_with_loss(loss_none).matvec(vec()), "Invalid loss_fn"),
    ("hessian-to-dense-max-dim", lambda t: op().to_dense(max_dim=2), "Invalid max_dim"),
    ("hessian-to-dense-chunk", lambda t: op().to_dense(chunk=0), "Invalid chunk"),
    ("hvp-bad-vector", lambda t: hvp(model(), F.mse_loss, DATA, vec(7)), "Invalid v"),
    ("functional-dropout", lambda t: make_functional_loss(model(), F.mse_loss, DATA, dropout="x"), "Invalid dropout"),
    # ---------------------------------------------------------------- GGNOperator
    ("ggn-loss", lambda t: GGNOperator(model(), F.mse_loss, DATA, loss="huber"), "Invalid loss"),
    ("ggn-mode", lambda t: GGNOperator(model(), F.mse_loss, DATA, mode="rev-rev"), "Invalid mode"),
    ("ggn-vectorize", lambda t: GGNOperator(model(), F.mse_loss, DATA, vectorize=True), "Invalid vectorize"),
    ("ggn-chunk-size", lambda t: GGNOperator(model(), F.mse_loss, DATA, chunk_size=2), "Invalid chunk_size"),
    ("ggn-loss-fn-not-callable", lambda t: GGNOperator(model(), None, DATA), "Invalid loss_fn"),
    ("ggn-empty-batch", lambda t: GGNOperator(model(), F.mse_loss, (X[:0], Y[:0])), "Invalid data"),
    # ---------------------------------------------------------------- top_eigenpairs
    ("top-k-zero", lambda t: top_eigenpairs(A, 0), "Invalid k"),
    ("top-k-negative", lambda t: top_eigenpairs(A, -1), "Invalid k"),
    ("top-k-float", lambda t: top_eigenpairs(A, 1.5), "Invalid k"),
    ("top-k-bool", lambda t: top_eigenpairs(A, True), "Invalid k"),
    ("top-k-above-dim", lambda t: top_eigenpairs(A, 6), "Invalid k"),
    ("top-k-above-operator-dim", lambda t: top_eigenpairs(op(), DIM + 1), "Invalid k"),
    ("top-which", lambda t: top_eigenpairs(A, 1, which="LR"), "Invalid which"),
    ("top-tol-zero", lambda t: top_eigenpairs(A, 1, tol=0), "Invalid tol"),
    ("top-tol-nan", lambda t: top_eigenpairs(A, 1, tol=math.nan), "Invalid tol"),
    ("top-criterion", lambda t: top_eigenpairs(A, 1, criterion="norm"), "Invalid criterion"),
    ("top-max-iters-zero", lambda t: top_eigenpairs(A, 1, max_iters=0), "Invalid max_iters"),
    ("top-max-basis-zero", lambda t: top_eigenpairs(A, 1, max_basis=0), "Invalid max_basis"),
    ("top-max-basis-above-dim", lambda t: top_eigenpairs(A, 1, max_basis=9), "Invalid max_basis"),
    ("top-max-basis-not-above-k", lambda t: top_eigenpairs(A, 2, max_basis=2), "Invalid max_basis"),
    ("top-init-shape", lambda t: top_eigenpairs(A, 1, init=torch.ones(4, 1, dtype=DT)), "Invalid init"),
    ("top-init-list", lambda t: top_eigenpairs(A, 1, init=[1.0] * 5), "Invalid init"),
    ("top-init-nan", lambda t: top_eigenpairs(A, 1, init=torch.full((5,), math.nan)), "Invalid init"),
    ("top-init-int", lambda t: top_eigenpairs(A, 1, init=torch.ones(5, dtype=torch.int64)), "Invalid init"),
    ("top-init-noise-negative", lambda t: top_eigenpairs(A, 1, init_noise=-0.1), "Invalid init_noise"),
    ("top-generator", lambda t: top_eigenpairs(A, 1, generator=0), "Invalid generator"),
    ("top-op-string", lambda t: top_eigenpairs("A", 1), "Invalid op"),
    ("top-op-not-square", lambda t: top_eigenpairs(torch.ones(3, 4, dtype=DT), 1), "Invalid op"),
    ("top-op-3d", lambda t: top_eigenpairs(torch.ones(2, 2, 2, dtype=DT), 1), "Invalid op"),
    ("top-op-empty", lambda t: top_eigenpairs(torch.ones(0, 0, dtype=DT), 1), "Invalid op"),
    ("top-op-not-symmetric", lambda t: top_eigenpairs(torch.triu(torch.ones(3, 3, dtype=DT)), 1), "Invalid op"),
    ("top-op-nan", lambda t: top_eigenpairs(A * math.nan, 1), "Invalid op"),
    ("top-op-int", lambda t: top_eigenpairs(torch.eye(3, dtype=torch.int64), 1), "Invalid op"),
    ("top-op-complex", lambda t: top_eigenpairs(torch.eye(3, dtype=torch.complex128), 1), "Invalid op"),
    ("top-op-numpy", lambda t: top_eigenpairs(np.eye(3), 1), "Invalid op"),
    ("top-op-duck-without-int-dim", lambda t: top_eigenpairs(DuckOperator(dim="4"), 1), "Invalid op"),
    ("top-op-duck-complex", lambda t: top_eigenpairs(DuckOperator(dim=3, dtype=torch.complex64), 1), "Invalid op"),
    # ---------------------------------------------------------------- operators of sdopt.spectrum
    ("linop-dim-zero", lambda t: LinearOperator(0, lambda V: V), "Invalid dim"),
    ("linop-dim-float", lambda t: LinearOperator(2.0, lambda V: V), "Invalid dim"),
    ("linop-matmat-not-callable", lambda t: LinearOperator(2, "A"), "Invalid matmat"),
    ("linop-dtype-complex", lambda t: LinearOperator(2, lambda V: V, dtype=torch.complex128), "Invalid dtype"),
    ("linop-dtype-int", lambda t: LinearOperator(2, lambda V: V, dtype=torch.int64), "Invalid dtype"),
    ("linop-matmat-shape", lambda t: LinearOperator(2, lambda V: V).matmat(torch.ones(3, 1)), "Invalid V"),
    ("linop-matvec-shape", lambda t: LinearOperator(2, lambda V: V).matvec(torch.ones(3)), "Invalid v"),
    ("shifted-sigma-str", lambda t: shifted(A, "one"), "Invalid sigma"),
    ("shifted-sigma-nan", lambda t: shifted(A, math.nan), "Invalid sigma"),
    ("scaled-c-inf", lambda t: scaled(A, math.inf), "Invalid c"),
    ("gd-map-lr-zero", lambda t: gd_map_squared(A, 0.0), "Invalid lr"),
    ("deflated-vectors-shape", lambda t: deflated(A, torch.ones(4, 1, dtype=DT)), "Invalid vectors"),
    ("deflated-vectors-nan", lambda t: deflated(A, torch.full((5, 1), math.nan, dtype=DT)), "Invalid vectors"),
    ("deflated-vectors-list", lambda t: deflated(A, [[1.0]] * 5), "Invalid vectors"),
    ("preconditioned-shape", lambda t: preconditioned(A, torch.ones(4, dtype=DT)), "Invalid preconditioner"),
    ("preconditioned-negative", lambda t: preconditioned(A, -torch.ones(5, dtype=DT)), "Invalid preconditioner"),
    # ---------------------------------------------------------------- trace and density
    ("hutchinson-num-probes-zero", lambda t: hutchinson_trace(A, 0), "Invalid num_probes"),
    ("hutchinson-distribution", lambda t: hutchinson_trace(A, 2, distribution="normal"), "Invalid distribution"),
    ("hutchinson-block-size-zero", lambda t: hutchinson_trace(A, 2, block_size=0), "Invalid block_size"),
    ("hutchinson-generator", lambda t: hutchinson_trace(A, 2, generator="seed"), "Invalid generator"),
    ("hutchinson-op", lambda t: hutchinson_trace(None, 2), "Invalid op"),
    ("hutchpp-num-products", lambda t: hutchpp_trace(A, 2), "Invalid num_products"),
    ("hutchpp-distribution", lambda t: hutchpp_trace(A, 6, distribution="sphere"), "Invalid distribution"),
    ("slq-num-probes-zero", lambda t: stochastic_lanczos_quadrature(A, 0), "Invalid num_probes"),
    ("slq-num-steps-zero", lambda t: stochastic_lanczos_quadrature(A, 2, 0), "Invalid num_steps"),
    ("slq-distribution", lambda t: stochastic_lanczos_quadrature(A, 2, 3, distribution="x"), "Invalid distribution"),
    ("slq-deflate-type", lambda t: stochastic_lanczos_quadrature(A, 2, 3, deflate=torch.ones(5)), "Invalid deflate"),
    ("slq-deflate-dim", lambda t: stochastic_lanczos_quadrature(A, 2, 3, deflate=top_eigenpairs(torch.eye(3, dtype=DT), 1)), "Invalid deflate"),
    ("slq-ops-empty", lambda t: stochastic_lanczos_quadrature([], 2, 3), "Invalid op_or_ops"),
    ("slq-ops-int", lambda t: stochastic_lanczos_quadrature(5, 2, 3), "Invalid op_or_ops"),
    ("slq-ops-mixed-dims", lambda t: stochastic_lanczos_quadrature([A, torch.eye(3, dtype=DT)], 2, 3), "Invalid op_or_ops"),
    ("slq-ops-callable-returning-junk", lambda t: stochastic_lanczos_quadrature(lambda r: "A", 2, 3), "Invalid op"),
    ("density-moment-p", lambda t: density().moment(-1), "Invalid p"),
    ("density-sigma-zero", lambda t: density().density(torch.zeros(3), sigma=0.0), "Invalid sigma"),
    ("density-sigma-negative", lambda t: density().density(torch.zeros(3), sigma=-1.0), "Invalid sigma"),
    ("density-quantiles-num", lambda t: density().quantiles(0), "Invalid num"),
    ("density-histogram-bins", lambda t: density().histogram(0), "Invalid bins"),
    ("density-histogram-edges", lambda t: density().histogram(torch.tensor([1.0, 0.0])), "Invalid bins"),
    ("density-integrate-f", lambda t: density().integrate(lambda x: 1.0), "Invalid f"),
    # ---------------------------------------------------------------- sharpness_dimension
    ("sd-lr-zero", lambda t: sharpness_dimension([1.0], 0.0), "Invalid lr"),
    ("sd-lr-negative", lambda t: sharpness_dimension([1.0], -0.1), "Invalid lr"),
    ("sd-lr-nan", lambda t: sharpness_dimension([1.0], math.nan), "Invalid lr"),
    ("sd-lr-str", lambda t: sharpness_dimension([1.0], "fast"), "Invalid lr"),
    ("sd-eps-negative", lambda t: sharpness_dimension([1.0], 0.1, eps=-1e-3), "Invalid eps"),
    ("sd-eigenvalues-3d", lambda t: sharpness_dimension(torch.ones(2, 2, 2), 0.1), "Invalid eigenvalues"),
    ("sd-eigenvalues-empty", lambda t: sharpness_dimension([], 0.1), "Invalid eigenvalues"),
    ("sd-eigenvalues-nan", lambda t: sharpness_dimension([1.0, math.nan], 0.1), "Invalid eigenvalues"),
    ("sd-eigenvalues-inf", lambda t: sharpness_dimension([math.inf], 0.1), "Invalid eigenvalues"),
    ("sd-eigenvalues-str", lambda t: sharpness_dimension("1 2 3", 0.1), "Invalid eigenvalues"),
    ("sd-eigenvalues-ragged", lambda t: sharpness_dimension([[1.0], [1.0, 2.0]], 0.1), "Invalid eigenvalues"),
    ("sd-eigenvalues-complex-tensor", lambda t: sharpness_dimension(torch.tensor([30.0 + 1j, 0.5]), 0.1), "Invalid eigenvalues"),
    ("sd-eigenvalues-complex-array", lambda t: sharpness_dimension(np.array([30.0 + 1j, 0.5]), 0.1), "Invalid eigenvalues"),
    # ---------------------------------------------------------------- kaplan_yorke_dimension
    ("ky-2d", lambda t: kaplan_yorke_dimension(torch.ones(2, 2)), "Invalid exponents"),
    ("ky-empty", lambda t: kaplan_yorke_dimension([]), "Invalid exponents"),
    ("ky-nan", lambda t: kaplan_yorke_dimension([0.1, math.nan]), "Invalid exponents"),
    ("ky-plus-inf", lambda t: kaplan_yorke_dimension([math.inf, -1.0]), "Invalid exponents"),
    ("ky-none", lambda t: kaplan_yorke_dimension(None), "Invalid exponents"),
    ("ky-complex-tensor", lambda t: kaplan_yorke_dimension(torch.tensor([1.0 + 2j, -0.5])), "Invalid exponents"),
    ("ky-complex-array", lambda t: kaplan_yorke_dimension(np.array([1.0 + 2j, -0.5])), "Invalid exponents"),
    ("ky-complex-list", lambda t: kaplan_yorke_dimension([1.0 + 2j, -0.5]), "Invalid exponents"),
    ("ky-str", lambda t: kaplan_yorke_dimension("abc"), "Invalid exponents"),
    ("weighted-ky-lengths", lambda t: weighted_kaplan_yorke(torch.ones(3), torch.ones(2)), "Invalid weights"),
    ("weighted-ky-negative-weights", lambda t: weighted_kaplan_yorke(torch.ones(2), -torch.ones(2)), "Invalid weights"),
    ("weighted-ky-list", lambda t: weighted_kaplan_yorke([0.5, -1.0], [1.0, math.nan]), "Invalid weights"),
    ("weighted-ky-complex", lambda t: weighted_kaplan_yorke(torch.tensor([1.0 + 1j]), torch.ones(1)), "Invalid exponents"),
    # ---------------------------------------------------------------- exponents
    ("lyap-map", lambda t: lyapunov_exponents([1.0], 0.1, map="sgd"), "Invalid map"),
    ("lyap-momentum-one", lambda t: lyapunov_exponents([1.0], 0.1, map="momentum", momentum=1.0), "Invalid momentum"),
    ("lyap-momentum-negative", lambda t: lyapunov_exponents([1.0], 0.1, map="momentum", momentum=-0.1), "Invalid momentum"),
    ("lyap-momentum-with-gd", lambda t: lyapunov_exponents([1.0], 0.1, momentum=0.9), "Invalid momentum"),
    ("lyap-lr-zero", lambda t: lyapunov_exponents([1.0], 0.0), "Invalid lr"),
    ("lyap-eps-negative", lambda t: lyapunov_exponents([1.0], 0.1, eps=-1.0), "Invalid eps"),
    ("lyap-complex", lambda t: lyapunov_exponents(torch.tensor([1.0 + 1j]), 0.1, map="momentum", momentum=0.5), "Invalid eigenvalues"),
    ("lyap-empty-rows", lambda t: lyapunov_exponents(torch.ones(2, 0), 0.1), "Invalid eigenvalues"),
    ("edge-map", lambda t: edge_of_stability("newton"), "Invalid map"),
    ("edge-momentum", lambda t: edge_of_stability("momentum", 1.5), "Invalid momentum"),
    ("adam-precond-missing", lambda t: adam_preconditioner(torch.optim.Adam(model().parameters()), missing="zero"), "Invalid missing"),
    ("adam-precond-no-state", lambda t: adam_preconditioner(sgd_without_state()), "Invalid optimizer"),
    ("adam-precond-not-optimizer", lambda t: adam_preconditioner("adam"), "Invalid optimizer"),
    ("precond-op-dense-negative", lambda t: preconditioned_operator(A, -torch.ones(5, dtype=DT)), "Invalid preconditioner"),
    ("precond-op-dense-shape", lambda t: preconditioned_operator(A, torch.ones(3, dtype=DT)), "Invalid preconditioner"),
    ("sd-from-spectrum-lr", lambda t: sd_from_spectrum([1.0, 2.0], 0.0), "Invalid lr"),
    ("sd-from-spectrum-map", lambda t: sd_from_spectrum([1.0, 2.0], 0.1, exponent_map="x"), "Invalid exponent_map"),
    ("sd-from-spectrum-spectrum", lambda t: sd_from_spectrum("spectrum", 0.1), "Invalid spectrum"),
    ("sd-from-spectrum-complex", lambda t: sd_from_spectrum(torch.tensor([1.0 + 1j]), 0.1), "Invalid spectrum"),
    ("sd-from-spectrum-momentum", lambda t: sd_from_spectrum([1.0, 2.0], 0.1, exponent_map="momentum", momentum=1.0), "Invalid momentum"),
    # ---------------------------------------------------------------- estimate_sharpness_dimension
    ("esd-lr-zero", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.0), "Invalid lr"),
    ("esd-method", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, "magic"), "Invalid method"),
    ("esd-protocol", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, protocol="x"), "Invalid protocol"),
    ("esd-exponent-map", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, exponent_map="sgd"), "Invalid exponent_map"),
    ("esd-momentum-gd", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, momentum=0.9), "Invalid momentum"),
    ("esd-momentum-one", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, exponent_map="momentum", momentum=1.0), "Invalid momentum"),
    ("esd-eps", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, eps=-1.0), "Invalid eps"),
    ("esd-k-zero", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, k=0), "Invalid k"),
    ("esd-k-bottom", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, k_bottom=-1), "Invalid k_bottom"),
    ("esd-tol", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, tol=0.0), "Invalid tol"),
    ("esd-bins", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, "slq", bins=0), "Invalid bins"),
    ("esd-num-quantiles", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, "ps", num_quantiles=0), "Invalid num_quantiles"),
    ("esd-max-dim", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, "exact", max_dim=0), "Invalid max_dim"),
    ("esd-exact-too-big", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, "exact", max_dim=2), "Invalid method"),
    ("esd-bandwidth", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, "kde", bandwidth=0.0), "Invalid bandwidth"),
    ("esd-adam-no-preconditioner", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, exponent_map="adam"), "Invalid preconditioner"),
    ("esd-preconditioner-shape", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, exponent_map="adam", preconditioner=torch.ones(3, dtype=DT)), "Invalid preconditioner"),
    ("esd-solver-options", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, solver_options=[1]), "Invalid solver_options"),
    ("esd-operator-options", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, operator_options={"mode": "x"}), "Invalid mode"),
    ("esd-num-probes", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, num_probes=1), "Invalid num_probes"),
    ("esd-num-steps", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, num_steps=0), "Invalid num_steps"),
    ("esd-data-none", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, None, 0.1), "Invalid data"),
    ("esd-empty-batch", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, (X[:0], Y[:0]), 0.1), "Invalid data"),
    ("esd-init-shape", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, k=1, k_bottom=0, allow_dense=False, num_probes=2, num_steps=1, init=torch.ones(3, 1, dtype=DT)), "Invalid init"),
    ("esd-generator", lambda t: estimate_sharpness_dimension(model(), F.mse_loss, DATA, 0.1, generator="seed"), "Invalid generator"),
    ("esd-model", lambda t: estimate_sharpness_dimension("net", F.mse_loss, DATA, 0.1), "Invalid model"),
    ("esd-loss-reduction-none", lambda t: estimate_sharpness_dimension(model(), loss_none, DATA, 0.1), "Invalid loss_fn"),
    # ---------------------------------------------------------------- measures
    ("measures-lr", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.0), "Invalid lr"),
    ("measures-which", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["sharpest"]), "Invalid which"),
    ("measures-which-empty", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, []), "Invalid which"),
    ("measures-loss-fn", lambda t: compute_measures(model(), "mse", DATA, 0.1, ["trace"]), "Invalid loss_fn"),
    ("measures-option", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["trace"], probes=3), "Invalid option"),
    ("measures-num-probes-zero", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["trace"], num_probes=0), "Invalid num_probes"),
    ("measures-num-probes-float", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["trace"], num_probes=2.5), "Invalid num_probes"),
    ("measures-lanczos-tol", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["lambda_max"], lanczos_tol=0.0), "Invalid lanczos_tol"),
    ("measures-epsilon", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["eps_sharpness"], epsilon=-1.0), "Invalid epsilon"),
    ("measures-rho", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["adaptive_sharpness_max"], rho=0.0), "Invalid rho"),
    ("measures-p", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["adaptive_sharpness_max"], p=3), "Invalid p"),
    ("measures-ascent-steps", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["eps_sharpness"], ascent_steps=0), "Invalid ascent_steps"),
    ("measures-num-samples", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["adaptive_sharpness_avg"], num_samples=0), "Invalid num_samples"),
    ("measures-trajectory-missing", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["mst_energy"]), "Invalid trajectory"),
    ("measures-trajectory-1d", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["mst_energy"], trajectory=torch.ones(5)), "Invalid trajectory"),
    ("measures-ph-alpha", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["mst_energy"], trajectory=torch.randn(5, 2), ph_alpha=0.0), "Invalid ph_alpha"),
    ("measures-min-points", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["ph_dimension"], trajectory=torch.randn(5, 2), min_points=1), "Invalid min_points"),
    ("measures-dataset-size", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["gradient_noise_scale"], dataset_size=0), "Invalid dataset_size"),
    ("measures-batch-size", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["gradient_noise_scale"], batch_size=100, dataset_size=10), "Invalid batch_size"),
    ("measures-simple-noise-one-batch", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["simple_noise_scale"]), "Invalid data"),
    ("measures-sd-method", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["sharpness_dimension"], sd_method="magic"), "Invalid sd_method"),
    ("measures-sd-options", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["sharpness_dimension"], sd_options="k=2"), "Invalid sd_options"),
    ("measures-eps", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["rds_sharpness"], eps=-1.0), "Invalid eps"),
    ("measures-generator", lambda t: compute_measures(model(), F.mse_loss, DATA, 0.1, ["trace"], generator=1), "Invalid generator"),
    ("measures-model", lambda t: compute_measures("net", F.mse_loss, DATA, 0.1, ["weight_norm"]), "Invalid model"),
    ("measures-data-none", lambda t: compute_measures(model(), F.mse_loss, None, 0.1, ["trace"]), "Invalid data"),
    ("measures-empty-batch", lambda t: compute_measures(model(), F.mse_loss, (X[:0], Y[:0]), 0.1, ["trace"]), "Invalid data"),
    ("frobenius-num-probes", lambda t: frobenius_norm(A, 0), "Invalid num_probes"),
    ("frobenius-op", lambda t: frobenius_norm("A", 2), "Invalid op"),
    ("eps-sharpness-epsilon", lambda t: epsilon_sharpness(make_functional_loss(model(), F.mse_loss, DATA), epsilon=0.0), "Invalid epsilon"),
    ("eps-sharpness-step-size", lambda t: epsilon_sharpness(make_functional_loss(model(), F.mse_loss, DATA), step_size=-1.0), "Invalid step_size"),
    ("adaptive-kind", lambda t: adaptive_sharpness(make_functional_loss(model(), F.mse_loss, DATA), kind="min"), "Invalid kind"),
    ("noise-scale-batch", lambda t: gradient_noise_scale(0.1, 10, 0), "Invalid batch_size"),
    ("rds-sharpness-lr", lambda t: rds_sharpness(1.0, 0.0, 0.0), "Invalid lr"),
    ("rds-sharpness-eps", lambda t: rds_sharpness(1.0, 0.0, 0.1, eps=-1.0), "Invalid eps"),
    ("mst-alpha", lambda t: mst_energy(torch.randn(4, 2), alpha=-1.0), "Invalid alpha"),
    ("ph-num-sizes", lambda t: ph_dimension(torch.randn(8, 2), num_sizes=1), "Invalid num_sizes"),
    ("ph-trajectory-nan", lambda t: ph_dimension(torch.full((8, 2), math.nan)), "Invalid trajectory"),
    # ---------------------------------------------------------------- loggers
    ("csv-path-none", lambda t: CSVLogger(None), "Invalid path"),
    ("csv-path-empty", lambda t: CSVLogger(""), "Invalid path"),
    ("csv-path-directory", lambda t: CSVLogger(t), "Invalid path"),
    ("csv-append-str", lambda t: CSVLogger(t / "a.csv", append="yes"), "Invalid append"),
    ("csv-path-under-file", lambda t: CSVLogger(a_file(t) / "log.csv"), "Invalid path"),
    ("csv-prefix", lambda t: CSVLogger(t / "log.csv", prefix=3), "Invalid prefix"),
    ("jsonl-path-none", lambda t: JSONLLogger(None), "Invalid path"),
    ("jsonl-path-int", lambda t: JSONLLogger(5), "Invalid path"),
    ("jsonl-path-directory", lambda t: JSONLLogger(t), "Invalid path"),
    ("jsonl-path-under-file", lambda t: JSONLLogger(a_file(t) / "sub" / "log.jsonl"), "Invalid path"),
    ("jsonl-prefix", lambda t: JSONLLogger(t / "log.jsonl", prefix=None), "Invalid prefix"),
    ("jsonl-append", lambda t: JSONLLogger(t / "log.jsonl", append="yes"), "Invalid append"),
    ("console-every-zero", lambda t: ConsoleLogger(every=0), "Invalid every"),
    ("console-every-float", lambda t: ConsoleLogger(every=1.5), "Invalid every"),
    ("console-stream", lambda t: ConsoleLogger(stream="stderr"), "Invalid stream"),
    ("console-stream-int", lambda t: ConsoleLogger(stream=1), "Invalid stream"),
    ("wandb-prefix-empty", lambda t: WandbLogger(prefix=""), "Invalid prefix"),
    ("wandb-prefix-no-slash", lambda t: WandbLogger(prefix="sdopt"), "Invalid prefix"),
    ("wandb-prefix-slash", lambda t: WandbLogger(prefix="/"), "Invalid prefix"),
    ("wandb-prefix-int", lambda t: WandbLogger(prefix=5), "Invalid prefix"),
    ("wandb-commit", lambda t: WandbLogger(commit="no"), "Invalid commit"),
]
# fmt: on


def op_with_loss(loss_fn: Callable[..., Any]) -> HessianOperator:
    return HessianOperator(model(), loss_fn, DATA)


def _lightning_callback(**kwargs: Any) -> Any:
    from sdopt.integrations.lightning import SharpnessDimensionCallback

    return SharpnessDimensionCallback(**kwargs)


def _trainer_callback(*args: Any, **kwargs: Any) -> Any:
    from sdopt.integrations.huggingface import SharpnessDimensionTrainerCallback

    return SharpnessDimensionTrainerCallback(*args, **kwargs)


# (id, framework, call, regex): skipped where the framework is not installed
# fmt: off
INTEGRATION_CASES: list[tuple[str, str, Callable[[Any], Any], str]] = [
    ("lightning-prefix", "lightning", lambda t: _lightning_callback(prefix=None), "Invalid prefix"),
    ("lightning-log-skipped", "lightning", lambda t: _lightning_callback(log_skipped="no"), "Invalid log_skipped"),
    ("lightning-prefix-int", "lightning", lambda t: _lightning_callback(prefix=0), "Invalid prefix"),
    ("hf-loggers-not-iterable", "transformers", lambda t: _trainer_callback(loggers=5), "Invalid loggers"),
    ("hf-logger-without-log", "transformers", lambda t: _trainer_callback(loggers=[object()]), r"Invalid loggers\[0\]"),
    ("hf-logger-string", "transformers", lambda t: _trainer_callback(loggers="wandb"), "Invalid loggers"),
    ("hf-loggers-none", "transformers", lambda t: _trainer_callback(loggers=None), "Invalid loggers"),
    ("hf-prefix", "transformers", lambda t: _trainer_callback(prefix=1), "Invalid prefix"),
    ("hf-optimizer", "transformers", lambda t: _trainer_callback(optimizer=sgd_without_state()), "Invalid optimizer"),
]
# fmt: on


def test_table_is_large_and_ids_are_unique() -> None:
    ids = [case[0] for case in CASES + INTEGRATION_CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 70


@pytest.mark.parametrize(("call", "match"), [pytest.param(c, m, id=i) for i, c, m in CASES])
def test_invalid_input_raises_value_error_naming_the_argument(call, match, tmp_path) -> None:
    with pytest.raises(ValueError, match=match):
        call(tmp_path)


@pytest.mark.parametrize(
    ("framework", "call", "match"),
    [pytest.param(f, c, m, id=i) for i, f, c, m in INTEGRATION_CASES],
)
def test_invalid_callback_argument_raises_value_error(framework, call, match, tmp_path) -> None:
    pytest.importorskip(framework)
    with pytest.raises(ValueError, match=match):
        call(tmp_path)
