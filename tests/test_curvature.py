"""sdopt.curvature against independent ground truth, in float64.

Ground truth: dense ``torch.func.hessian`` of the functional loss, closed forms (least squares,
logistic regression), ``Jᵀ H J`` from dense Jacobians, third derivatives from nested ``jacfwd``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacfwd, jacrev

from sdopt import GGNOperator, HessianOperator, hvp
from sdopt.curvature import (
    MODES,
    CurvatureApproximationWarning,
    CurvatureFallbackWarning,
    CurvatureRandomnessWarning,
    default_mode,
    make_functional_loss,
)
from sdopt.tasks.grokking import GrokkingTransformer

DT = torch.float64
EXACT_MODES = ["reuse", "fwd-rev", "rev-rev", "double-backward", "linearize", "auto", "autotune"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_hessian(f) -> torch.Tensor:
    """Dense Hessian of a FunctionalLoss over its flat parameter vector (torch.func.hessian)."""
    params = f.params

    def flat_loss(theta):
        return f(tuple(f.unflatten(theta)))

    return hessian(flat_loss)(f.flatten(params))


# --------------------------------------------------------------------------- models
def make_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    x = torch.randn(16, 4, generator=_gen(1), dtype=DT)
    y = torch.randint(0, 3, (16,), generator=_gen(2))
    return model, F.cross_entropy, (x, y)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def make_cnn(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN().to(DT).train()
    x = torch.randn(8, 1, 5, 5, generator=_gen(3), dtype=DT)
    y = torch.randint(0, 3, (8,), generator=_gen(4))
    return model, F.cross_entropy, (x, y)


def make_transformer(seed=0):
    torch.manual_seed(seed)
    model = GrokkingTransformer(vocab_size=6, num_classes=5, d_model=8, num_heads=2, d_mlp=8).to(DT)
    x = torch.randint(0, 5, (10, 3), generator=_gen(5))
    x[:, -1] = 5
    y = torch.randint(0, 5, (10,), generator=_gen(6))
    return model, F.cross_entropy, (x, y)


class TinyAttention(nn.Module):
    """Causal self-attention classifier; ``sdpa=True`` uses the fused kernel."""

    def __init__(self, sdpa: bool, d=4, heads=2):
        super().__init__()
        self.sdpa, self.heads = sdpa, heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            z = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return self.out(z.transpose(1, 2).reshape(b, t, d)[:, -1])


MODELS = {"mlp": make_mlp, "cnn_batchnorm": make_cnn, "transformer": make_transformer}


def cnn_reference_loss(model, data):
    """The CNN's loss written out by hand (BatchNorm with batch statistics), θ flat.

    Used as ground truth because ``torch.func.hessian`` (and ``jacrev(jacrev)``,
    ``jacfwd(jacfwd)``) return a wrong, non-symmetric Hessian through training-mode
    ``batch_norm`` in torch 2.13, whereas every sdopt mode agrees with this and with
    finite differences.
    """
    x, y = data
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss(theta):
        cw, cb, gamma, beta, fw, fb = (t.view(s) for t, s in zip(theta.split(sizes), shapes))
        h = F.conv2d(x, cw, cb)
        mu = h.mean((0, 2, 3), keepdim=True)
        var = h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        return F.cross_entropy(torch.tanh(h).flatten(1) @ fw.T + fb, y)

    return loss


@pytest.fixture(scope="module", params=sorted(MODELS))
def problem(request):
    model, loss_fn, data = MODELS[request.param]()
    f = make_functional_loss(model, loss_fn, data)
    if request.param == "cnn_batchnorm":
        H = hessian(cnn_reference_loss(model, data))(f.flatten(f.params))
    else:
        H = dense_hessian(f)
    V = torch.randn(f.dim, 2, generator=_gen(7), dtype=DT)
    return request.param, model, loss_fn, data, H, V


# --------------------------------------------------------------------------- every mode vs dense
@pytest.mark.parametrize(
    ("mode", "vectorize"),
    [(mode, False) for mode in EXACT_MODES]
    + [(mode, True) for mode in ("reuse", "fwd-rev", "rev-rev", "double-backward")],
)
def test_exact_modes_match_dense_hessian(problem, mode, vectorize):
    _, model, loss_fn, data, H, V = problem
    op = HessianOperator(model, loss_fn, data, mode=mode, vectorize=vectorize, chunk_size=2)
    scale = H.abs().max()
    torch.testing.assert_close(op.matmat(V), H @ V, atol=1e-8 * scale, rtol=0)
    torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0], atol=1e-8 * scale, rtol=0)
    assert op.num_products == V.shape[1] + 1
    tuning = {"autotune"} if mode == "autotune" else set()
    assert op.mode in {"reuse", "fwd-rev", "rev-rev", "double-backward", "linearize"} | tuning


def test_finite_difference_matches_dense_hessian(problem):
    """Central differences: error O(ε^{2/3}) relative; stated tolerance 1e-6 of ‖H‖."""
    _, model, loss_fn, data, H, V = problem
    op = HessianOperator(model, loss_fn, data, mode="finite-difference")
    assert op.mode == "finite-difference"
    err = (op.matmat(V) - H @ V).abs().max()
    assert err <= 1e-6 * H.abs().max() * V.abs().max()


def test_to_dense_and_matmul_operator(problem):
    name, model, loss_fn, data, H, _ = problem
    if name != "mlp":
        pytest.skip("dense matrix checked on the smallest model (products cover the others)")
    op = HessianOperator(model, loss_fn, data)
    torch.testing.assert_close(op.to_dense(), H, atol=1e-10, rtol=0)
    assert op.shape == H.shape and op.num_products == H.shape[0]
    v = torch.ones(op.dim, dtype=DT)
    torch.testing.assert_close(op @ v, H @ v, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- closed forms
def test_least_squares_closed_form():
    """F.mse_loss (mean over N samples, one output): H = 2/N XᵀX; with reduction='sum', 2XᵀX."""
    x = torch.randn(40, 5, generator=_gen(8), dtype=DT)
    y = torch.randn(40, 1, generator=_gen(9), dtype=DT)
    model = nn.Linear(5, 1, bias=False).to(DT)
    op = HessianOperator(model, F.mse_loss, (x, y))
    torch.testing.assert_close(op.to_dense(), 2 / 40 * x.T @ x, atol=1e-12, rtol=1e-12)
    op_sum = HessianOperator(model, lambda o, t: F.mse_loss(o, t, reduction="sum"), (x, y))
    torch.testing.assert_close(op_sum.to_dense(), 2 * x.T @ x, atol=1e-10, rtol=1e-12)


def test_logistic_regression_closed_form():
    """Binary cross-entropy with logits, mean: H = 1/N Xᵀ diag(s(1−s)) X, s = σ(Xw)."""
    x = torch.randn(50, 4, generator=_gen(10), dtype=DT)
    y = torch.randint(0, 2, (50, 1), generator=_gen(11)).to(DT)
    model = nn.Linear(4, 1, bias=False).to(DT)
    s = torch.sigmoid(x @ model.weight.detach().T).squeeze(1)
    expected = x.T @ torch.diag(s * (1 - s)) @ x / 50
    for mode in ("reuse", "fwd-rev", "rev-rev", "linearize"):
        op = HessianOperator(model, F.binary_cross_entropy_with_logits, (x, y), mode=mode)
        torch.testing.assert_close(op.to_dense(), expected, atol=1e-12, rtol=1e-12)


def test_multiple_batches_average():
    model, loss_fn, (x, y) = make_mlp()
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    V = torch.randn(
        make_functional_loss(model, loss_fn, (x, y)).dim, 2, generator=_gen(12), dtype=DT
    )
    parts = [HessianOperator(model, loss_fn, b).matmat(V) for b in batches]
    whole = HessianOperator(model, loss_fn, (x, y)).matmat(V)  # equal halves, mean loss
    for mode in ("reuse", "fwd-rev", "double-backward", "rev-rev"):
        op = HessianOperator(model, loss_fn, batches, mode=mode)
        torch.testing.assert_close(op.matmat(V), (parts[0] + parts[1]) / 2, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(op.matmat(V), whole, atol=1e-12, rtol=1e-10)
    loss, grad = HessianOperator(model, loss_fn, batches).loss_and_gradient()
    loss_whole, grad_whole = HessianOperator(model, loss_fn, (x, y)).loss_and_gradient()
    torch.testing.assert_close(loss, loss_whole)
    torch.testing.assert_close(grad, grad_whole)


# --------------------------------------------------------------------------- parameters
def test_frozen_parameters_are_excluded():
    model, loss_fn, data = make_mlp()
    full = dense_hessian(make_functional_loss(model, loss_fn, data))
    model[0].weight.requires_grad_(False)
    op = HessianOperator(model, loss_fn, data)
    assert op.names == ["0.bias", "2.weight", "2.bias"]
    assert op.dim == 6 + 18 + 3
    keep = torch.arange(24, full.shape[0])  # drop the 24 entries of 0.weight
    torch.testing.assert_close(op.to_dense(), full[keep][:, keep], atol=1e-10, rtol=0)


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.hidden = nn.Linear(3, 3)
        self.unembed = nn.Linear(3, 5, bias=False)
        self.unembed.weight = self.embed.weight  # tied

    def forward(self, tokens):
        return self.unembed(torch.tanh(self.hidden(self.embed(tokens))))


def test_tied_weights_counted_once():
    torch.manual_seed(0)
    model = TiedModel().to(DT)
    tokens = torch.randint(0, 5, (12,), generator=_gen(13))
    targets = torch.randint(0, 5, (12,), generator=_gen(14))
    op = HessianOperator(model, F.cross_entropy, (tokens, targets))
    assert op.dim == 15 + 9 + 3 and op.names == ["embed.weight", "hidden.weight", "hidden.bias"]

    def loss(theta):  # the shared matrix E enters twice: embedding and unembedding
        E, W, b = theta[:15].view(5, 3), theta[15:24].view(3, 3), theta[24:]
        return F.cross_entropy(torch.tanh(E[tokens] @ W.T + b) @ E.T, targets)

    theta = torch.cat([p.detach().reshape(-1) for p in op.params])
    torch.testing.assert_close(op.to_dense(), hessian(loss)(theta), atol=1e-10, rtol=0)


def test_float32_and_loss_and_gradient():
    model, loss_fn, (x, y) = make_mlp()
    model = model.float()
    op = HessianOperator(model, loss_fn, (x.float(), y))
    assert op.dtype == torch.float32 and op.device == torch.device("cpu")
    out = op.matvec(torch.ones(op.dim))
    assert out.dtype == torch.float32
    loss, grad = op.loss_and_gradient()  # from the reused graph
    expected = torch.autograd.grad(loss_fn(model(x.float()), y), list(model.parameters()))
    torch.testing.assert_close(grad, torch.cat([g.reshape(-1) for g in expected]))
    torch.testing.assert_close(loss, loss_fn(model(x.float()), y).detach())
    assert all(p.grad is None for p in model.parameters())
    assert op.unflatten(grad)[0].shape == model[0].weight.shape
    torch.testing.assert_close(op.flatten(op.unflatten(grad)), grad)


def test_hvp_one_shot():
    model, loss_fn, data = make_mlp()
    H = dense_hessian(make_functional_loss(model, loss_fn, data))
    v = torch.randn(H.shape[0], generator=_gen(15), dtype=DT)
    torch.testing.assert_close(hvp(model, loss_fn, data, v), H @ v, atol=1e-10, rtol=0)
    torch.testing.assert_close(hvp(model, loss_fn, data, v[:, None], mode="fwd-rev")[:, 0], H @ v)


def test_default_mode_rule():
    assert default_mode("cpu") == "reuse"
    assert default_mode("cuda") == "autotune"
    model, loss_fn, data = make_mlp()
    assert HessianOperator(model, loss_fn, data).mode == "reuse"


def test_autotune_keeps_a_measured_mode():
    model, loss_fn, data = make_mlp()
    op = HessianOperator(model, loss_fn, data, mode="autotune")
    H = dense_hessian(op.functional)
    V = torch.randn(op.dim, 8, generator=_gen(16), dtype=DT)
    torch.testing.assert_close(op.matmat(V), H @ V, atol=1e-10, rtol=0)
    engine = op._engine
    assert set(engine.timings) == {"reuse", "fwd-rev", "rev-rev"}
    assert op.mode == min(engine.timings, key=engine.timings.get)


# --------------------------------------------------------------------------- functional loss
def test_functional_loss_third_derivative():
    """D³L[u, u, ·] by double backward through uᵀH(θ)u equals the dense third-derivative tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    x = torch.randn(6, 2, generator=_gen(17), dtype=DT)
    y = torch.randn(6, 1, generator=_gen(18), dtype=DT)
    f = make_functional_loss(model, F.mse_loss, (x, y))
    theta = f.flatten(f.params)

    def flat(t):
        return f(tuple(f.unflatten(t)))

    T = jacfwd(jacfwd(jacrev(flat)))(theta)
    u = torch.randn(f.dim, generator=_gen(19), dtype=DT)
    q = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(flat(q), q, create_graph=True)
    (hu,) = torch.autograd.grad(g, q, u, create_graph=True)
    (third,) = torch.autograd.grad(hu @ u, q)
    torch.testing.assert_close(third, torch.einsum("ijk,i,j->k", T, u, u), atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- state restoration
class Messy(nn.Module):
    """BatchNorm and dropout, both in training mode."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _attention_flags():
    return (
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
    )


@pytest.mark.parametrize("mode", [*MODES, "finite-difference"])
def test_state_is_restored(mode):
    torch.manual_seed(0)
    model = Messy().to(DT).train()
    model.fc2.eval()  # a mixed flag pattern must survive too
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    x = torch.randn(10, 4, generator=_gen(20), dtype=DT)
    y = torch.randint(0, 3, (10,), generator=_gen(21))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    flags = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    backends = _attention_flags()
    for dropout in ("off", "fixed"):
        op = HessianOperator(model, F.cross_entropy, (x, y), mode=mode, dropout=dropout)
        op.matmat(torch.ones(op.dim, 2, dtype=DT))
        op.loss_and_gradient()
    assert torch.equal(torch.get_rng_state(), rng)
    assert _attention_flags() == backends
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert model.bn.track_running_stats
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]) and torch.equal(p.grad, torch.full_like(p, 7.0))
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_dropout_off_is_eval_behaviour_and_fixed_is_deterministic():
    torch.manual_seed(0)
    model = Messy().to(DT)
    model.bn = nn.Identity()
    x = torch.randn(10, 4, generator=_gen(22), dtype=DT)
    y = torch.randint(0, 3, (10,), generator=_gen(23))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=_gen(24), dtype=DT)
    model.train()
    off = HessianOperator(model, F.cross_entropy, (x, y)).matmat(V)
    model.eval()
    evaluated = HessianOperator(model, F.cross_entropy, (x, y)).matmat(V)
    torch.testing.assert_close(off, evaluated, atol=1e-12, rtol=0)
    model.train()
    ops = [
        HessianOperator(model, F.cross_entropy, (x, y), dropout="fixed", dropout_seed=3, mode=m)
        for m in ("reuse", "fwd-rev", "rev-rev")
    ]
    outs = [op.matmat(V) for op in ops]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-12, rtol=0)
    assert (outs[0] - off).abs().max() > 1e-6  # masks really applied
    torch.manual_seed(3)  # the same mask the operator used: dense truth with that fixed mask
    mask = F.dropout(torch.ones(10, 6, dtype=DT), 0.5, training=True)
    f = make_functional_loss(model, F.cross_entropy, (x, y))

    def masked_loss(theta):
        w1, b1, w2, b2 = f.unflatten(theta)
        return F.cross_entropy((torch.tanh(x @ w1.T + b1) * mask) @ w2.T + b2, y)

    H = hessian(masked_loss)(f.flatten(f.params))
    torch.testing.assert_close(outs[0], H @ V, atol=1e-10, rtol=0)


def test_flags_are_restored_exactly_even_when_a_pass_raises():
    """A user's own non-default settings survive: a nested train/eval pattern, the MHA fast
    path switched off, flash attention disabled; also after the model raises mid-pass."""
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Sequential(nn.Dropout(0.2), nn.BatchNorm1d(4)), nn.Linear(4, 3)
    ).to(DT)
    model.train()
    model[1][0].eval()
    model[2].eval()
    flags = [m.training for m in model.modules()]
    x = torch.randn(8, 4, generator=_gen(37), dtype=DT)
    y = torch.randint(0, 3, (8,), generator=_gen(38))
    fastpath, flash = (
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
    )
    torch.backends.mha.set_fastpath_enabled(False)
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        before = _attention_flags()
        op = HessianOperator(model, F.cross_entropy, (x, y))
        op.matvec(torch.ones(op.dim, dtype=DT))
        assert [m.training for m in model.modules()] == flags and _attention_flags() == before

        def failing(outputs, targets):
            assert not model[0].training and model[1][1].training  # inside the pass
            raise ValueError("user error")

        with pytest.raises(ValueError, match="user error"):
            HessianOperator(model, failing, (x, y)).matvec(torch.ones(op.dim, dtype=DT))
        assert [m.training for m in model.modules()] == flags and _attention_flags() == before
        assert model[1][1].track_running_stats
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        torch.backends.cuda.enable_flash_sdp(flash)


def test_instance_norm_tracking_running_stats_uses_instance_statistics_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.InstanceNorm1d(3, track_running_stats=True))
    model = nn.Sequential(*model, nn.Flatten(), nn.Tanh(), nn.Linear(3 * 4, 3)).to(DT).train()
    model[1].running_mean.fill_(0.5)
    x = torch.randn(6, 2, 5, generator=_gen(39), dtype=DT)
    y = torch.randint(0, 3, (6,), generator=_gen(40))
    reference = copy.deepcopy(model)
    reference[1].track_running_stats = False  # instance statistics, no running statistics
    H = dense_hessian(make_functional_loss(reference, F.cross_entropy, (x, y)))
    torch.testing.assert_close(
        HessianOperator(model, F.cross_entropy, (x, y)).to_dense(), H, atol=1e-10, rtol=0
    )
    assert torch.all(model[1].running_mean == 0.5) and int(model[1].num_batches_tracked) == 0
    assert model[1].training and model[1].track_running_stats


def test_batchnorm_uses_batch_statistics_in_training_and_running_in_eval():
    model, loss_fn, data = make_cnn()
    model.bn.running_mean.fill_(0.3)
    V = torch.randn(HessianOperator(model, loss_fn, data).dim, 1, generator=_gen(25), dtype=DT)
    train = HessianOperator(model, loss_fn, data).matmat(V)
    model.eval()
    evaluated = HessianOperator(model, loss_fn, data).matmat(V)
    model.train()
    assert (train - evaluated).abs().max() > 1e-6
    assert torch.all(model.bn.running_mean == 0.3) and int(model.bn.num_batches_tracked) == 0


# --------------------------------------------------------------------------- fallback
class _OnceTanh(torch.autograd.Function):
    """``tanh`` whose backward refuses to be differentiated (as fused kernels do: "derivative
    for ... is not implemented"), with no forward-mode formula and no ``setup_context`` (so no
    ``torch.func`` transform): no exact product mode exists, finite differences are the only
    route. (``@once_differentiable`` would not do: in torch 2.13 its double backward silently
    returns zeros instead of raising.)"""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("_OnceTanh: derivative for its backward is not implemented")
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class OnceMLP(nn.Module):
    """An MLP with a ReLU and a once-differentiable tanh; ``plain=True`` uses ``torch.tanh``."""

    def __init__(self, plain=False):
        super().__init__()
        self.plain = plain
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = self.fc2(h)
        return self.fc3(torch.tanh(h) if self.plain else _OnceTanh.apply(h))


def _once_problem(dtype):
    torch.manual_seed(0)
    once, plain = OnceMLP().to(dtype), OnceMLP(plain=True).to(DT)
    plain.load_state_dict({k: v.to(DT) for k, v in once.state_dict().items()})
    x = torch.randn(32, 4, generator=_gen(26), dtype=dtype)
    y = torch.randint(0, 3, (32,), generator=_gen(27))
    H = dense_hessian(make_functional_loss(plain, F.cross_entropy, (x.to(DT), y)))
    return once, (x, y), H


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fallback_to_finite_differences_warns_approximate_and_stays_accurate(dtype):
    once, data, H = _once_problem(dtype)
    op = HessianOperator(once, F.cross_entropy, data)
    v = torch.randn(op.dim, generator=_gen(28), dtype=DT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = op.matvec(v.to(dtype))
    messages = [str(w.message) for w in caught if w.category is CurvatureFallbackWarning]
    assert (
        "mode 'reuse' is not supported" in messages[0]
        and "falling back to 'fwd-rev'" in (messages[0])
    )
    assert "falling back to 'finite-difference'" in messages[-1]
    assert op.mode == "finite-difference"
    approx = [w for w in caught if w.category is CurvatureApproximationWarning]
    assert len(approx) == 1 and "approximate" in str(approx[0].message)
    discrepancy = op._engine.discrepancy
    assert f"disagree by {discrepancy:.1e} relative" in str(approx[0].message)
    assert op._engine.evaluation_dtype == torch.float64  # float32 models evaluated in float64
    # float64 evaluation with a step for float64: accurate even for a float32 model (the old
    # float32 step ε^{1/3}(1 + ‖θ‖) crossed ReLU kinks: relative errors of 1e-2 and worse)
    rel = float((out.double() - H @ v).norm() / (H @ v).norm())
    assert rel <= (1e-7 if dtype == torch.float64 else 1e-5), rel
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later products: no warning again, same step
        again = op.matvec(v.to(dtype))
    torch.testing.assert_close(again, out, atol=0, rtol=0)


class Float32Only(OnceMLP):
    """Hard-codes float32 (a float64 evaluation raises), so finite differences stay in float32."""

    def forward(self, x):
        return super().forward(x) @ torch.eye(3, dtype=torch.float32)


def test_finite_differences_in_the_models_dtype_self_check_the_step():
    torch.manual_seed(0)
    model = Float32Only()
    plain = OnceMLP(plain=True).to(DT)
    plain.load_state_dict({k: v.to(DT) for k, v in model.state_dict().items()})
    x = torch.randn(32, 4, generator=_gen(26))
    y = torch.randint(0, 3, (32,), generator=_gen(27))
    H = dense_hessian(make_functional_loss(plain, F.cross_entropy, (x.to(DT), y)))
    op = HessianOperator(model, F.cross_entropy, (x, y), mode="finite-difference")
    v = torch.randn(op.dim, generator=_gen(28), dtype=DT)
    with pytest.warns(CurvatureApproximationWarning, match="approximate .* disagree by"):
        out = op.matvec(v.float())
    engine = op._engine
    assert engine.evaluation_dtype == torch.float32
    assert 0 <= engine.discrepancy < 1e-2
    rel = float((out.double() - H @ v).norm() / (H @ v).norm())
    assert rel <= 5e-3, rel  # float32 rounding: about ε^{2/3}, amplified by the conditioning
    # the measured discrepancy is an honest error estimate (same order as the true error)
    assert rel <= 30 * engine.discrepancy + 1e-4


def test_fallback_disabled_raises():
    once, data, _ = _once_problem(DT)
    op = HessianOperator(once, F.cross_entropy, data, fallback=False)
    with pytest.raises(RuntimeError, match="derivative for its backward is not implemented"):
        op.matvec(torch.ones(op.dim, dtype=DT))


# --------------------------------------------------------------------------- exact attention
@pytest.mark.parametrize("mode", EXACT_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_attention_gets_exact_products_on_the_math_kernel(mode, dtype):
    """F.scaled_dot_product_attention routes to a fused CPU kernel without double backward or
    forward AD; curvature passes force the math kernel, so every exact mode works."""
    torch.manual_seed(0)
    fused, einsum = TinyAttention(sdpa=True).to(dtype), TinyAttention(sdpa=False).to(DT)
    einsum.load_state_dict({k: v.to(DT) for k, v in fused.state_dict().items()})
    x = torch.randn(6, 3, 4, generator=_gen(26), dtype=DT)
    y = torch.randint(0, 3, (6,), generator=_gen(27))
    H = dense_hessian(make_functional_loss(einsum, F.cross_entropy, (x, y)))
    op = HessianOperator(fused, F.cross_entropy, (x.to(dtype), y), mode=mode, fallback=False)
    V = torch.randn(op.dim, 2, generator=_gen(28), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)
        out = op.matmat(V.to(dtype)).double()
    tol = 1e-10 if dtype == torch.float64 else 2e-3
    assert float((out - H @ V).norm() / (H @ V).norm()) <= tol


class StockEncoder(nn.Module):
    """A stock ``nn.TransformerEncoder`` (default settings) and a linear head."""

    def __init__(self, dropout=0.1):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def exact_dense_hessian(model, loss_fn, x, y):
    """Independent ground truth: a float64 copy in eval mode (dropout off), attention on the
    math kernel and fast paths off, dense by plain double backward (no sdopt code)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = copy.deepcopy(model).double().eval()
    params = [p for p in m.parameters() if p.requires_grad]
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            g = torch.autograd.grad(loss_fn(m(x.double()), y), params, create_graph=True)
            g = torch.cat([t.reshape(-1) for t in g])
            rows = [
                torch.cat(
                    [t.reshape(-1) for t in torch.autograd.grad(gi, params, retain_graph=True)]
                )
                for gi in g
            ]
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    return torch.stack(rows)


def test_stock_transformer_encoder_in_train_mode_with_dropout_is_exact():
    """Issue 12: HVP relative error 0.71 and λ_max 20.1 against an exact 5.29 before the fix
    (fused attention, then float32 finite differences with too large a step)."""
    torch.manual_seed(0)
    model = StockEncoder().train()
    x = torch.randn(16, 5, 4, generator=_gen(30))
    y = torch.randint(0, 3, (16,), generator=_gen(31))
    H = exact_dense_hessian(model, F.cross_entropy, x, y)
    op = HessianOperator(model, F.cross_entropy, (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)
        dense = op.to_dense().double()
    assert op.mode == "reuse"
    assert float((dense - H).norm() / H.norm()) <= 2e-3
    top, exact_top = torch.linalg.eigvalsh(dense)[-1], torch.linalg.eigvalsh(H)[-1]
    assert abs(float(top - exact_top)) <= 2e-3 * abs(float(exact_top))
    assert model.training and all(m.training for m in model.modules())


class GatedDropout(nn.Module):
    """Functional dropout gated on the module's own flag, as Hugging Face writes it."""

    def __init__(self):
        super().__init__()
        self.p = 0.5
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 2).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        z = F.dropout(z.transpose(1, 2).reshape(b, t, d), self.p, training=self.training)
        return self.out(z[:, -1])


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_dropout_off_turns_off_functional_dropout_gated_on_training_flags(mode):
    torch.manual_seed(0)
    model = GatedDropout().to(DT).train()
    x = torch.randn(6, 3, 4, generator=_gen(32), dtype=DT)
    y = torch.randint(0, 3, (6,), generator=_gen(33))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=_gen(34), dtype=DT)
    H = exact_dense_hessian(model, F.cross_entropy, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = HessianOperator(model, F.cross_entropy, (x, y), mode=mode, fallback=False).matmat(V)
    torch.testing.assert_close(out, H @ V, atol=1e-10, rtol=0)
    assert model.training


class UngatedNoise(nn.Module):
    """Randomness that no training flag gates (``F.dropout``'s default ``training=True``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.dropout(torch.tanh(self.fc1(x)), 0.5))


def test_ungated_randomness_warns_and_is_one_fixed_matrix():
    torch.manual_seed(0)
    model = UngatedNoise().to(DT)
    x = torch.randn(10, 4, generator=_gen(35), dtype=DT)
    y = torch.randint(0, 3, (10,), generator=_gen(36))
    rng = torch.get_rng_state()
    op = HessianOperator(model, F.cross_entropy, (x, y))
    with pytest.warns(CurvatureRandomnessWarning, match="draws random numbers"):
        dense = op.to_dense()
    torch.testing.assert_close(dense, dense.T, atol=1e-12, rtol=0)  # one matrix, symmetric
    again = HessianOperator(model, F.cross_entropy, (x, y), mode="fwd-rev").to_dense()
    torch.testing.assert_close(again, dense, atol=1e-12, rtol=0)
    assert torch.equal(torch.get_rng_state(), rng)


class _RaisingLoss:
    """A user's loss_fn that raises its own RuntimeError, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, outputs, targets):
        self.calls += 1
        raise RuntimeError("boom")


@pytest.mark.parametrize("mode", ["auto", "autotune", "reuse", "fwd-rev", "rev-rev", "linearize"])
def test_error_raised_by_the_users_loss_fn_is_reraised_without_fallback(mode):
    model, _, data = make_mlp()
    loss_fn = _RaisingLoss()
    op = HessianOperator(model, loss_fn, data, mode=mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"^boom$"):
            op.matvec(torch.ones(op.dim, dtype=DT))
    assert not [w for w in caught if w.category is CurvatureFallbackWarning]
    assert op.mode != "finite-difference"
    # the failing product and the plain evaluations that tell the user's error from a mode's
    # limitation (autotune checks once, the operator once more); no finite differences
    assert loss_fn.calls <= 3


def test_error_raised_by_the_users_loss_fn_is_reraised_by_ggn():
    model, _, data = make_mlp()
    op = GGNOperator(model, _RaisingLoss(), data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"^boom$"):
            op.matvec(torch.ones(op.dim, dtype=DT))
    assert not [w for w in caught if w.category is CurvatureFallbackWarning]


def test_error_in_the_models_forward_is_reraised_without_fallback():
    model, loss_fn, (x, y) = make_mlp()
    op = HessianOperator(model, loss_fn, (x[:, :3], y))  # 3 features for a 4-feature layer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            op.matvec(torch.ones(op.dim, dtype=DT))
    assert not [w for w in caught if w.category is CurvatureFallbackWarning]
    assert op.mode == "reuse"


def test_loss_fn_failing_only_under_a_transform_still_falls_back():
    """The user's code is fine on a plain pass but not under torch.func: that is the mode's
    limitation, so the fallback chain still applies."""
    model, _, data = make_mlp()

    def loss_fn(outputs, targets):
        if torch._C._functorch.is_functorch_wrapped_tensor(outputs):
            raise RuntimeError("not under a transform")
        return F.cross_entropy(outputs, targets)

    op = HessianOperator(model, loss_fn, data, mode="fwd-rev")
    H = dense_hessian(make_functional_loss(model, F.cross_entropy, data))
    v = torch.randn(op.dim, generator=_gen(29), dtype=DT)
    with pytest.warns(CurvatureFallbackWarning, match="'fwd-rev' is not supported"):
        out = op.matvec(v)
    assert op.mode == "reuse"
    assert torch.allclose(out, H @ v, atol=1e-10)


# --------------------------------------------------------------------------- GGN
def _dense_ggn(model, loss_fn, x, y):
    f = make_functional_loss(model, loss_fn, (x, y))
    theta = f.flatten(f.params)
    z = model(x).detach()
    J = jacrev(lambda t: f.batch_outputs(tuple(f.unflatten(t)), 0))(theta).reshape(z.numel(), -1)
    Hz = hessian(lambda zz: loss_fn(zz.view_as(z), y))(z.reshape(-1))
    return J.T @ Hz @ J


@pytest.mark.parametrize("mode", ["reuse", "fwd-rev"])
@pytest.mark.parametrize("loss", ["auto", "closed"])
@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_ggn_matches_dense_jt_h_j(kind, loss, mode):
    model, _, (x, y) = make_mlp()
    loss_fn = F.cross_entropy
    if kind == "mse":
        loss_fn, y = F.mse_loss, torch.randn(16, 3, generator=_gen(29), dtype=DT)
    expected = _dense_ggn(model, loss_fn, x, y)
    op = GGNOperator(model, loss_fn, (x, y), loss=kind if loss == "closed" else "auto", mode=mode)
    G = op.to_dense()
    torch.testing.assert_close(G, expected, atol=1e-10, rtol=0)
    assert torch.linalg.eigvalsh(G).min() >= -1e-10  # positive semi-definite


def test_ggn_equals_hessian_for_linear_least_squares():
    x = torch.randn(30, 3, generator=_gen(30), dtype=DT)
    y = torch.randn(30, 2, generator=_gen(31), dtype=DT)
    model = nn.Linear(3, 2).to(DT)
    batches = [(x[:15], y[:15]), (x[15:], y[15:])]
    G = GGNOperator(model, F.mse_loss, batches, loss="mse").to_dense()
    torch.testing.assert_close(
        G, HessianOperator(model, F.mse_loss, batches).to_dense(), atol=1e-12, rtol=0
    )


# --------------------------------------------------------------------------- errors
def _op():
    model, loss_fn, data = make_mlp()
    return HessianOperator(model, loss_fn, data)


def test_error_non_scalar_loss():
    model, _, data = make_mlp()
    op = HessianOperator(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), data)
    with pytest.raises(
        ValueError, match=r"Invalid loss_fn: returned \(16,\) \(must return a scalar"
    ):
        op.matvec(torch.ones(op.dim, dtype=DT))


def test_error_no_trainable_parameters():
    model, loss_fn, data = make_mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        HessianOperator(model, loss_fn, data)


def test_error_wrong_vector_shape():
    op = _op()
    with pytest.raises(ValueError, match=r"Invalid v: shape \(5,\) \(must be \(51,\)\)"):
        op.matvec(torch.ones(5, dtype=DT))
    with pytest.raises(ValueError, match=r"Invalid V: shape \(51,\) \(must be \(51, m\)"):
        op.matmat(torch.ones(51, dtype=DT))
    with pytest.raises(ValueError, match=r"Invalid V: shape \(51, 0\)"):
        op.matmat(torch.ones(51, 0, dtype=DT))
    with pytest.raises(ValueError, match="Invalid v: list"):
        op.matvec([1.0] * 51)


def test_error_wrong_vector_dtype():
    with pytest.raises(
        ValueError, match=r"Invalid v: dtype torch\.float32 \(must be torch\.float64"
    ):
        _op().matvec(torch.ones(51))


def test_error_wrong_vector_device():
    with pytest.raises(ValueError, match="Invalid v: device meta \\(must be cpu"):
        _op().matvec(torch.ones(51, dtype=DT, device="meta"))


def test_error_non_finite_vector():
    v = torch.ones(51, dtype=DT)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="Invalid v: contains NaN or inf"):
        _op().matvec(v)


def test_error_nan_in_product_raises_floating_point_error():
    model, loss_fn, data = make_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    before = model[0].weight.detach().clone()
    for mode in ("reuse", "fwd-rev", "finite-difference"):
        op = HessianOperator(model, loss_fn, data, mode=mode)
        with pytest.raises(FloatingPointError, match="product is not finite"):
            op.matvec(torch.ones(op.dim, dtype=DT))
    torch.testing.assert_close(model[0].weight.detach(), before, rtol=0, atol=0, equal_nan=True)


def test_error_bad_mode_and_options():
    model, loss_fn, data = make_mlp()
    with pytest.raises(ValueError, match="Invalid mode: 'fast'"):
        HessianOperator(model, loss_fn, data, mode="fast")
    with pytest.raises(ValueError, match="Invalid dropout: 'random'"):
        HessianOperator(model, loss_fn, data, dropout="random")
    with pytest.raises(ValueError, match="Invalid chunk_size: 0"):
        HessianOperator(model, loss_fn, data, chunk_size=0)
    with pytest.raises(ValueError, match="Invalid vectorize: 'yes'"):
        HessianOperator(model, loss_fn, data, vectorize="yes")
    with pytest.raises(
        ValueError, match=r"Invalid distributed: True \(torch\.distributed is not initialised"
    ):
        HessianOperator(model, loss_fn, data, distributed=True)
    with pytest.raises(ValueError, match="Invalid loss: 'hinge'"):
        GGNOperator(model, loss_fn, data, loss="hinge")
    with pytest.raises(ValueError, match="Invalid mode: 'rev-rev'"):
        GGNOperator(model, loss_fn, data, mode="rev-rev")
    with pytest.raises(ValueError, match="Invalid model: int"):
        HessianOperator(3, loss_fn, data)


def test_error_empty_or_malformed_data():
    model, loss_fn, _ = make_mlp()
    with pytest.raises(ValueError, match="Invalid data: an empty sequence"):
        HessianOperator(model, loss_fn, [])
    with pytest.raises(ValueError, match="Invalid data: None"):
        HessianOperator(model, loss_fn, None)
    with pytest.raises(ValueError, match=r"Invalid data\[1\]: Tensor \(each batch must be an"):
        pair = (torch.ones(2, 4, dtype=DT), torch.zeros(2, dtype=torch.long))
        HessianOperator(model, loss_fn, [pair, torch.ones(3), pair])


def test_error_dense_size_guard():
    with pytest.raises(ValueError, match="Invalid max_dim: 10 \\(the operator has dim=51"):
        _op().to_dense(max_dim=10)


def test_error_stale_operator_after_in_place_update():
    model, loss_fn, data = make_mlp()
    op = HessianOperator(model, loss_fn, data)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(
        RuntimeError, match="modified in place after the curvature operator was built"
    ):
        op.matvec(torch.ones(op.dim, dtype=DT))


# --------------------------------------------------------------------------- misc
@pytest.mark.parametrize(
    "mode", ["reuse", "fwd-rev", "rev-rev", "double-backward", "finite-difference"]
)
def test_products_work_inside_no_grad(mode):
    model, loss_fn, data = make_mlp()
    H = dense_hessian(make_functional_loss(model, loss_fn, data))
    v = torch.randn(H.shape[0], generator=_gen(40), dtype=DT)
    with torch.no_grad():
        out = HessianOperator(model, loss_fn, data, mode=mode).matvec(v)
    tol = 1e-6 if mode == "finite-difference" else 1e-10
    torch.testing.assert_close(out, H @ v, atol=tol * H.abs().max() * v.abs().max(), rtol=0)


def test_fixed_dropout_vectorised_blocks_use_the_same_masks():
    torch.manual_seed(0)
    model = Messy().to(DT).train()
    model.bn = nn.Identity()
    data = (
        torch.randn(10, 4, generator=_gen(41), dtype=DT),
        torch.randint(0, 3, (10,), generator=_gen(42)),
    )
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=_gen(43), dtype=DT)
    loop = HessianOperator(model, F.cross_entropy, data, dropout="fixed", mode="fwd-rev").matmat(V)
    for mode in ("fwd-rev", "reuse"):
        op = HessianOperator(
            model, F.cross_entropy, data, dropout="fixed", mode=mode, vectorize=True
        )
        torch.testing.assert_close(op.matmat(V), loop, atol=1e-12, rtol=0)


def test_docstring_examples_run():
    import doctest

    import sdopt.curvature.functional as functional
    import sdopt.curvature.operators as operators

    for module in (functional, operators):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_functional_value_and_gradient():
    model, loss_fn, (x, y) = make_mlp()
    f = make_functional_loss(model, loss_fn, (x, y))
    loss, grad = f.value_and_gradient()
    expected = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    torch.testing.assert_close(grad, torch.cat([g.reshape(-1) for g in expected]))
    assert not loss.requires_grad and not grad.requires_grad
    # create_graph: the gradient stays differentiable, giving the Hessian by one more backward
    theta = f.flatten(f.params).requires_grad_(True)
    _, g = f.value_and_gradient(tuple(f.unflatten(theta)), create_graph=True)
    v = torch.randn(f.dim, generator=_gen(44), dtype=DT)
    (hv,) = torch.autograd.grad(g @ v, theta)
    torch.testing.assert_close(hv, dense_hessian(f) @ v, atol=1e-10, rtol=0)
    # central differences of gradients at θ ± εu approximate H u (THEORY §7 building block)
    eps = 1e-5
    plus = tuple(p + eps * t for p, t in zip(f.params, f.unflatten(v)))
    minus = tuple(p - eps * t for p, t in zip(f.params, f.unflatten(v)))
    fd = (f.value_and_gradient(plus)[1] - f.value_and_gradient(minus)[1]) / (2 * eps)
    torch.testing.assert_close(fd, hv.detach(), atol=1e-7, rtol=0)


# --------------------------------------------------------------------------- data as frameworks give it
def _tiny_gpt2(dropout=0.0):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=8,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(DT).train()


def _hf_batches():
    ids = torch.randint(0, 11, (6, 5), generator=_gen(41))
    return [{"input_ids": ids[i : i + 3], "labels": ids[i : i + 3]} for i in (0, 3)]


def _hand_lm_loss(outputs, batch):  # what GPT-2 computes from labels: shifted cross-entropy
    logits = outputs.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, 11), batch["labels"][:, 1:].reshape(-1))


def _plain_hvp(model, losses, V):
    """Independent: mean of the given per-batch loss closures, plain double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):
        loss = sum(fn() for fn in losses) / len(losses)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
        cols = [
            torch.cat(
                [t.reshape(-1) for t in torch.autograd.grad(g @ V[:, j], params, retain_graph=True)]
            )
            for j in range(V.shape[1])
        ]
    return torch.stack(cols, dim=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_hugging_face_dict_batches_with_labels_and_loss_fn_none():
    """Issue 12: an HF dict batch (or a DataLoader of them) was rejected with 'Invalid data[0]:
    str'. Now model(**batch) and loss_fn=None is outputs.loss, exact against plain double
    backward of the dropout-free twin."""
    model, twin = _tiny_gpt2(0.1), _tiny_gpt2(0.0)
    batches = _hf_batches()
    dim = sum(p.numel() for p in model.parameters())
    V = torch.randn(dim, 2, generator=_gen(42), dtype=DT)
    truth = _plain_hvp(twin, [lambda b=b: twin(**b).loss for b in batches], V)
    # HF computes outputs.loss in float32 (it upcasts the logits with .float()), so the
    # hand-written loss has its own float64 truth
    hand_truth = _plain_hvp(twin, [lambda b=b: _hand_lm_loss(twin(**b), b) for b in batches], V)
    loader = torch.utils.data.DataLoader(
        [
            {"input_ids": b["input_ids"][i], "labels": b["labels"][i]}
            for b in batches
            for i in range(3)
        ],
        batch_size=3,
    )
    for data, loss_fn, expected in (
        (batches, None, truth),
        (loader, None, truth),
        (batches, _hand_lm_loss, hand_truth),  # loss_fn(outputs, batch) for mapping batches
    ):
        op = HessianOperator(model, loss_fn, data)
        assert len(op.functional.batches) == 2
        torch.testing.assert_close(op.matmat(V), expected, atol=1e-12, rtol=1e-10)
    one = HessianOperator(model, None, batches[0]).matmat(V)  # a single mapping is one batch
    truth_one = _plain_hvp(twin, [lambda: twin(**batches[0]).loss], V)
    torch.testing.assert_close(one, truth_one, atol=1e-12, rtol=1e-10)
    assert model.training and all(m.training for m in model.modules())


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)))


def test_model_loss_for_any_other_batch_form():
    """ModelLoss(fn): fn(model, batch) for batches that are neither pairs nor mappings (here a
    weighted 3-tuple, and a loss on a submodule's output), one batch, a list or a DataLoader."""
    from sdopt.curvature import ModelLoss

    torch.manual_seed(0)
    model = TwoPart().to(DT)
    x = torch.randn(12, 4, generator=_gen(43), dtype=DT)
    y = torch.randn(12, 2, generator=_gen(44), dtype=DT)
    w = torch.rand(12, 1, generator=_gen(45), dtype=DT)

    def weighted(m, batch):
        xb, yb, wb = batch
        hidden = m.encoder(xb)  # submodules evaluated at the pass's parameters too
        return (wb * (m.head(torch.tanh(hidden)) - yb) ** 2).mean() + 0.1 * hidden.pow(4).mean()

    loss = ModelLoss(weighted)
    f = make_functional_loss(model, loss, (x, y, w))

    def flat_truth(theta, parts):
        w1, b1, w2, b2 = f.unflatten(theta)
        total = 0
        for xb, yb, wb in parts:
            h = xb @ w1.T + b1
            total = (
                total
                + (wb * ((torch.tanh(h) @ w2.T + b2) - yb) ** 2).mean()
                + 0.1 * h.pow(4).mean()
            )
        return total / len(parts)

    theta = f.flatten(f.params)
    halves = [(x[:6], y[:6], w[:6]), (x[6:], y[6:], w[6:])]
    H_one = hessian(lambda t: flat_truth(t, [(x, y, w)]))(theta)
    H_two = hessian(lambda t: flat_truth(t, halves))(theta)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, w), batch_size=6)
    for data, H in (((x, y, w), H_one), (halves, H_two), (loader, H_two)):
        for mode in ("reuse", "fwd-rev", "rev-rev"):
            dense = HessianOperator(model, loss, data, mode=mode, fallback=False).to_dense()
            torch.testing.assert_close(dense, H, atol=1e-10, rtol=0)


def test_batch_forms_give_clear_errors():
    from sdopt.curvature import ModelLoss

    model, _, (x, y) = make_mlp()
    with pytest.raises(ValueError, match=r"Invalid data\[0\]: a tuple of 3 elements .*ModelLoss"):
        HessianOperator(model, F.cross_entropy, [(x, y, y)])
    with pytest.raises(ValueError, match="Invalid data: an empty batch"):
        HessianOperator(model, F.cross_entropy, {"x": x[:0]})
    with pytest.raises(
        ValueError, match=r"Invalid loss_fn: None means the model's own outputs\.loss"
    ):
        op = HessianOperator(model, None, (x, y))
        op.matvec(torch.ones(op.dim, dtype=DT))
    with pytest.raises(ValueError, match=r"Invalid loss_fn: 3 .*ModelLoss"):
        HessianOperator(model, 3, (x, y))
    with pytest.raises(ValueError, match=r"Invalid loss_fn: ModelLoss\(3\)"):
        ModelLoss(3)
    with pytest.raises(ValueError, match=r"Invalid loss_fn: None \(GGNOperator needs"):
        GGNOperator(model, None, (x, y))
    with pytest.raises(ValueError, match=r"Invalid loss_fn: ModelLoss.*GGNOperator needs"):
        GGNOperator(model, ModelLoss(lambda m, b: m(b[0]).sum()), (x, y))
    with pytest.raises(ValueError, match="Invalid data: an empty sequence"):
        HessianOperator(model, ModelLoss(lambda m, b: m(b).sum()), [])
    f = make_functional_loss(model, ModelLoss(lambda m, b: m(b).pow(2).mean()), x)
    with pytest.raises(ValueError, match="ModelLoss calls the model itself"):
        f.batch_outputs(f.params, 0)
