"""SDOptimizer takes curvature data as frameworks give it, exactly as ``sdopt.curvature`` does.

A mapping batch is ``model(**batch)`` with ``loss_fn(outputs, batch)``; ``loss_fn=None`` is the
model's own ``outputs.loss`` (Hugging Face models given ``labels``); ``ModelLoss(fn)`` is
``fn(model, batch)``. The model is a tiny Hugging Face GPT-2 built from a config (random init,
nothing downloaded). Each record must be what ``estimate_sharpness_dimension`` gives at its
defaults on the same parameters and batch (CONTRACT.md, Optimizer).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sdopt
from sdopt.curvature import ModelLoss
from sdopt.optim import SDOptimizer

transformers = pytest.importorskip("transformers")

LR = 0.01


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double().train()  # d = 1,080, dropout 0.1


def _ids(seed: int, rows: int = 4) -> torch.Tensor:
    return torch.randint(0, 16, (rows, 8), generator=torch.Generator().manual_seed(seed))


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = _ids(seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _train_step(opt: SDOptimizer, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    opt.zero_grad()
    model(**batch).loss.backward()
    opt.step()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*loss_type=None.*")
        return fn(*args, **kwargs)


def _same_record(rec, by_hand) -> None:
    assert rec.ok, rec.reason
    assert rec.sharpness_dimension == by_hand.value
    assert 0 < rec.sharpness_dimension < by_hand.dim  # not a saturated, trivial SD
    assert rec.uncertainty == by_hand.uncertainty
    assert rec.lambda_max == by_hand.lambda_max and rec.lambda_min == by_hand.lambda_min
    assert rec.num_products == by_hand.num_products


def test_dict_batch_with_labels_and_loss_fn_none_records_the_estimator() -> None:
    model, batch = _gpt2(), _batch()
    base = torch.optim.SGD(model.parameters(), lr=LR)
    opt = _quiet(SDOptimizer, base, model=model, loss_fn=None, data=batch, every=1)
    by_hand = _quiet(sdopt.estimate_sharpness_dimension, model, None, batch, LR)
    _quiet(_train_step, opt, model, _batch(2))
    _same_record(opt.last_estimate, by_hand)
    assert opt.last_estimate.protocol == "full-batch"
    assert opt.failures["estimate"] == 0


def test_dataloader_of_dict_batches_draws_one_per_estimate() -> None:
    model = _gpt2()
    rows = [{"input_ids": r, "labels": r} for r in _ids(3, rows=8)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)  # dicts of stacked tensors
    first, second = list(loader)
    base = torch.optim.SGD(model.parameters(), lr=LR)
    opt = _quiet(SDOptimizer, base, model=model, loss_fn=None, data=loader, every=1)
    by_hand = _quiet(sdopt.estimate_sharpness_dimension, model, None, first, LR)
    _quiet(_train_step, opt, model, _batch(2))
    _same_record(opt.last_estimate, by_hand)
    assert opt.last_estimate.protocol == "minibatch"
    # the next estimate draws the loader's second batch, at the parameters after one step
    model.eval()
    with torch.no_grad():
        loss_first, loss_second = (float(_quiet(model, **b).loss) for b in (first, second))
    model.train()
    _quiet(_train_step, opt, model, _batch(2))
    assert opt.last_estimate.ok and len(opt.history) == 2
    assert opt.last_estimate.loss == pytest.approx(loss_second, rel=1e-10)
    assert abs(loss_first - loss_second) > 1e-6


def test_mapping_batch_with_an_explicit_loss_fn_of_outputs_and_batch() -> None:
    model, batch = _gpt2(), _batch()

    def lm_loss(outputs, b):
        logits = outputs.logits[:, :-1].reshape(-1, 16)
        return F.cross_entropy(logits, b["labels"][:, 1:].reshape(-1))

    base = torch.optim.SGD(model.parameters(), lr=LR)
    inputs = {"input_ids": batch["input_ids"]}  # no labels: the loss is ours
    opt = _quiet(SDOptimizer, base, model=model, loss_fn=lm_loss, data={**inputs, "labels": batch["labels"]}, every=1)  # fmt: skip
    by_hand = _quiet(sdopt.estimate_sharpness_dimension, model, None, batch, LR)
    _quiet(_train_step, opt, model, _batch(2))
    # the same loss as GPT-2's own (shifted cross-entropy): the same record
    assert opt.last_estimate.sharpness_dimension == pytest.approx(by_hand.value, rel=1e-6)
    assert opt.last_estimate.lambda_max == pytest.approx(by_hand.lambda_max, rel=1e-6)


def test_model_loss_on_a_pair_batch_records_the_estimator() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g)
    batch = (x, y.double())
    loss = ModelLoss(lambda m, b: F.mse_loss(m(b[0]), b[1]))
    opt = SDOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model=model, loss_fn=loss,
                      data=batch, every=1, k=2)  # fmt: skip
    by_hand = sdopt.estimate_sharpness_dimension(model, loss, batch, 0.5, k=2)
    reference = sdopt.estimate_sharpness_dimension(model, F.mse_loss, batch, 0.5, k=2)
    opt.zero_grad()
    F.mse_loss(model(x), batch[1]).backward()
    opt.step()
    rec = opt.last_estimate
    assert rec.ok and rec.sharpness_dimension == by_hand.value
    assert rec.lambda_max == pytest.approx(reference.lambda_max, rel=1e-10)


def test_model_loss_errors_name_loss_fn_at_construction() -> None:
    model, batch = _gpt2(), _batch()

    def broken(m, b):
        raise KeyError("input_ids")

    with pytest.raises(ValueError, match=r"Invalid data or loss_fn: loss_fn\(model, batch\)"):
        _quiet(SDOptimizer, torch.optim.SGD(model.parameters(), lr=LR), model=model,
               loss_fn=ModelLoss(broken), data=batch)  # fmt: skip


def test_mapping_batch_without_labels_and_loss_fn_none_is_refused() -> None:
    model = _gpt2()
    with pytest.raises(ValueError, match="Invalid loss_fn: None means the model's own"):
        _quiet(SDOptimizer, torch.optim.SGD(model.parameters(), lr=LR), model=model,
               loss_fn=None, data={"input_ids": _ids(1)})  # fmt: skip


def test_a_loader_of_strings_is_skipped_with_a_message_naming_the_forms() -> None:
    model = _gpt2()
    opt = _quiet(SDOptimizer, torch.optim.SGD(model.parameters(), lr=LR), model=model,
                 loss_fn=None, data=iter(["a", "b", "c"]), every=1)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="mapping of the model's keyword arguments"):
        _quiet(_train_step, opt, model, _batch(2))
    assert opt.last_estimate.status == "skipped"


def test_model_loss_on_a_mapping_batch_records_the_estimator() -> None:
    model, batch = _gpt2(), _batch()
    loss = ModelLoss(lambda m, b: m(**b).loss)
    opt = _quiet(SDOptimizer, torch.optim.SGD(model.parameters(), lr=LR), model=model,
                 loss_fn=loss, data=batch, every=1)  # fmt: skip
    by_hand = _quiet(sdopt.estimate_sharpness_dimension, model, None, batch, LR)
    _quiet(_train_step, opt, model, _batch(2))
    assert opt.last_estimate.ok and opt.last_estimate.sharpness_dimension == pytest.approx(
        by_hand.value, rel=1e-9
    )
