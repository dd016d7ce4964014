"""Curvature under real torch.distributed: gloo, 2 processes on the CPU.

Each rank holds an equal-sized shard of a batch; with a mean loss the Hessian of the whole
batch is the mean of the shard Hessians, so the distributed product (all_reduce, then divide
by the world size) must equal the single-process product on the concatenated batch, on every
rank, for every mode; likewise the loss and the gradient, and the GGN.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from _gloo import free_port, process_group
from torch import nn
from torch.nn import functional as F

pytestmark = pytest.mark.distributed

WORLD = 2
MODES = ("reuse", "fwd-rev", "rev-rev", "double-backward", "finite-difference")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (24,), generator=g)


def _vectors(dim: int) -> torch.Tensor:
    return torch.randn(dim, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _worker(rank: int, port: int, results) -> None:
    with process_group(rank, WORLD, port):
        from sdopt.curvature import GGNOperator, HessianOperator

        model = _model()
        x, y = _data()
        shard = (x[rank::WORLD], y[rank::WORLD])  # 12 samples per rank
        out = {}
        for mode in MODES:
            op = HessianOperator(model, F.cross_entropy, shard, mode=mode)
            assert op.distributed
            V = _vectors(op.dim)
            out[mode] = (op.matmat(V), op.matvec(V[:, 0]))
        out["loss_grad"] = HessianOperator(model, F.cross_entropy, shard).loss_and_gradient()
        out["ggn"] = GGNOperator(model, F.cross_entropy, shard).matmat(_vectors(op.dim))
        ddp = nn.parallel.DistributedDataParallel(model)  # unwrapped by the operator
        out["ddp"] = HessianOperator(ddp, F.cross_entropy, shard).matmat(_vectors(op.dim))
        local = HessianOperator(model, F.cross_entropy, shard, distributed=False)
        out["local"] = local.matmat(_vectors(op.dim))
        results[rank] = out


@pytest.mark.timeout(120)
def test_distributed_hvp_equals_single_process_on_concatenated_batch():
    from sdopt.curvature import GGNOperator, HessianOperator

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _worker, args=(free_port(), results), nprocs=WORLD, join=True, start_method="spawn"
        )
        results = dict(results)

    model = _model()
    data = _data()
    op = HessianOperator(model, F.cross_entropy, data)
    V = _vectors(op.dim)
    expected = op.matmat(V)
    for rank in range(WORLD):
        for mode in MODES:
            block, single = results[rank][mode]
            tol = 1e-6 if mode == "finite-difference" else 1e-10
            torch.testing.assert_close(block, expected, atol=tol, rtol=0)
            torch.testing.assert_close(single, expected[:, 0], atol=tol, rtol=0)
        loss, grad = results[rank]["loss_grad"]
        expected_loss, expected_grad = op.loss_and_gradient()
        torch.testing.assert_close(loss, expected_loss, atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)
        torch.testing.assert_close(results[rank]["ddp"], expected, atol=1e-10, rtol=0)
        ggn = GGNOperator(model, F.cross_entropy, data).matmat(V)
        torch.testing.assert_close(results[rank]["ggn"], ggn, atol=1e-10, rtol=0)
    # the shards really differ: without averaging each rank has its own Hessian
    assert (results[0]["local"] - results[1]["local"]).abs().max() > 1e-3
    torch.testing.assert_close((results[0]["local"] + results[1]["local"]) / 2, expected)
