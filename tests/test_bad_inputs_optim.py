"""Every invalid input of ``SDOptimizer`` in one table: constructor arguments, estimate_kwargs,
step/closure misuse and foreign or mismatched checkpoints. Each case asserts the exception
type and that the message names the argument (and, where there is one, the value)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdopt.optim import SDOptimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()  # d = 43


def _batch(n: int = 8, width: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, width, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _build(model: nn.Module | None = None, base: Any = None, **kw: Any) -> SDOptimizer:
    model = _model() if model is None else model
    if base is None:
        base = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("loss_fn", F.cross_entropy)
    kw.setdefault("data", _batch())
    kw.setdefault("every", 2)
    kw.setdefault("k", 2)
    return SDOptimizer(base, model=model, **kw)


def _frozen() -> nn.Module:
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _foreign_base() -> SDOptimizer:
    model = _model()
    return _build(model, base=torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1))


def _wrapped() -> SDOptimizer:
    model = _model()
    inner = _build(model)
    return _build(model, base=inner)


def _base(cls: Callable[..., torch.optim.Optimizer], **kw: Any) -> Callable[[], SDOptimizer]:
    def make() -> SDOptimizer:
        model = _model()
        extra = {k: v for k, v in kw.items() if k in ("exponent_map", "mode")}
        opt_kw = {k: v for k, v in kw.items() if k not in extra}
        return _build(model, base=cls(model.parameters(), **opt_kw), **extra)

    return make


def _lr_negative_second_group() -> SDOptimizer:
    model = _model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    base = torch.optim.SGD([{"params": first}, {"params": second, "lr": 0.0}], lr=0.1)
    base.param_groups[1]["lr"] = -0.1  # torch checks at construction only
    return _build(model, base=base)


def _lr_zero_every_group() -> SDOptimizer:
    model = _model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    base = torch.optim.SGD([{"params": first}, {"params": second}], lr=0.0)
    return _build(model, base=base)


def _step(closure: Any) -> Callable[[], Any]:
    def run() -> Any:
        opt = _build()
        return opt.step(closure)

    return run


def _load(mutate: Callable[[dict], Any], **kw: Any) -> Callable[[], Any]:
    """Save a checkpoint after 2 steps (an estimate made), mutate it, load it into a fresh one."""

    def run() -> Any:
        model = _model()
        opt = _build(model, mode="penalty")
        x, y = _batch()
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        state = mutate(opt.state_dict())
        fresh = _build(kw.pop("model", None) or _model(), **{"mode": "penalty", **kw})
        fresh.load_state_dict(state)

    return run


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict], dict]:
    def mutate(state: dict) -> dict:
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return state

    return mutate


def _add_group() -> None:
    opt = _build()
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def _none_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _sum_outputs(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs.sum(dim=0)  # a vector: not a mean loss


def _raising_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("broken loss")


x8, y8 = _batch()
CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # --- constructor: the base optimizer and the model
    ("base_object", lambda: _build(base=object()), ValueError, "base_optimizer: object"),
    ("base_wrapped", _wrapped, ValueError, "base_optimizer: SDOptimizer"),
    ("base_foreign", _foreign_base, ValueError, "base_optimizer"),
    ("model_str", lambda: SDOptimizer(
        torch.optim.SGD(_model().parameters(), lr=0.1), model="net", loss_fn=F.cross_entropy,
        data=_batch()), ValueError, "model: str"),
    ("model_frozen", lambda: _build(_frozen(), base=torch.optim.SGD(
        [nn.Parameter(torch.zeros(1))], lr=0.1)), ValueError, "model"),
    ("lr_zero", _base(torch.optim.SGD, lr=0.0), ValueError, "lr: 0.0"),
    ("lr_negative_in_a_group", _lr_negative_second_group, ValueError,
     "lr: -0.1 in param group 1"),
    ("lr_zero_in_every_group", _lr_zero_every_group, ValueError, "lr: [0.0, 0.0]"),
    ("adam_map_over_sgd", _base(torch.optim.SGD, lr=0.1, exponent_map="adam"), ValueError,
     "exponent_map: 'adam' over a SGD"),
    ("adam_map_over_momentum_sgd", _base(torch.optim.SGD, lr=0.1, momentum=0.9,
     exponent_map="adam"), ValueError, "exponent_map: 'adam'"),
    ("adam_map_over_adamax", _base(torch.optim.Adamax, lr=0.1, exponent_map="adam"), ValueError,
     "exponent_map: 'adam' over a Adamax"),
    ("adam_map_over_rmsprop", _base(torch.optim.RMSprop, lr=0.1, exponent_map="adam"),
     ValueError, "exponent_map: 'adam' over a RMSprop"),
    # --- loss_fn
    ("loss_fn_not_callable", lambda: _build(loss_fn="mse"), ValueError, "loss_fn: 'mse'"),
    ("loss_fn_reduction_none", lambda: _build(loss_fn=_none_loss), ValueError,
     "loss_fn: '_none_loss' returned (8,)"),
    ("loss_fn_vector", lambda: _build(loss_fn=_sum_outputs), ValueError,
     "loss_fn: '_sum_outputs' returned (3,)"),
    ("loss_fn_raises", lambda: _build(loss_fn=_raising_loss), ValueError,
     "data or loss_fn: loss_fn(outputs, targets) raised"),
    # --- data
    ("data_none", lambda: _build(data=None), ValueError, "data: None"),
    ("data_bare_tensor", lambda: _build(data=x8), ValueError, "data: a bare tensor of shape (8, 4)"),
    ("data_empty_batch", lambda: _build(data=_batch(0)), ValueError, "data: an empty batch"),
    ("data_mismatched_sizes", lambda: _build(data=(x8, y8[:5])), ValueError,
     "data: inputs of shape (8, 4) and targets of shape (5,)"),
    ("data_wrong_features", lambda: _build(data=_batch(8, width=7)), ValueError,
     "data: the model cannot evaluate inputs of shape (8, 7)"),
    ("data_empty_list", lambda: _build(data=[]), ValueError, "data: a list of length 0"),
    ("data_list_with_junk", lambda: _build(data=[(x8, y8), "junk"]), ValueError,
     "data: a list of length 2"),
    ("data_list_mismatched", lambda: _build(data=[(x8, y8), (x8[:3], y8)]), ValueError,
     "data[1]: inputs of shape (3, 4)"),
    ("data_list_wrong_features", lambda: _build(data=[(x8, y8), _batch(8, width=2)]),
     ValueError, "data[1]: the model cannot evaluate"),
    ("data_int", lambda: _build(data=42), ValueError, "data: int"),
    ("data_str", lambda: _build(data="train.csv"), ValueError, "data: a str"),
    ("data_dict_model_cannot_take", lambda: _build(data={"x": x8}), ValueError,
     "data: the model cannot evaluate a dict with keys ['x']"),
    ("data_loader_of_str", lambda: _build(data=["a", "b"]), ValueError, "data: a list of length 2"),
    ("loss_fn_none_without_outputs_loss", lambda: _build(loss_fn=None), ValueError,
     "loss_fn: None means the model's own outputs.loss"),
    # --- scalar options
    ("mode_unknown", lambda: _build(mode="fast"), ValueError, "mode: 'fast'"),
    ("mode_none", lambda: _build(mode=None), ValueError, "mode: None"),
    ("every_zero", lambda: _build(every=0), ValueError, "every: 0"),
    ("every_float", lambda: _build(every=1.5), ValueError, "every: 1.5"),
    ("k_zero", lambda: _build(k=0), ValueError, "k: 0"),
    ("k_above_d", lambda: _build(k=44), ValueError, "k: 44"),
    ("k_str", lambda: _build(k="3"), ValueError, "k: '3'"),
    ("estimator_unknown", lambda: _build(estimator="dense"), ValueError, "estimator: 'dense'"),
    ("exponent_map_unknown", lambda: _build(exponent_map="rmsprop"), ValueError,
     "exponent_map: 'rmsprop'"),
    ("controller_str", lambda: _build(controller="fast"), ValueError, "controller: 'fast'"),
    ("controller_unknown_key", lambda: _build(controller={"gain": 2}), ValueError,
     "controller: unknown key(s) ['gain']"),
    ("controller_bad_value", lambda: _build(controller={"max_scale": -1.0}), ValueError,
     "max_scale: -1.0"),
    ("target_sd_negative", lambda: _build(target_sd=-1.0), ValueError, "target_sd: -1.0"),
    ("penalty_strength_negative", lambda: _build(penalty_strength=-0.1), ValueError,
     "penalty_strength: -0.1"),
    ("penalty_temperature_zero", lambda: _build(penalty_temperature=0.0), ValueError,
     "penalty_temperature: 0.0"),
    ("penalty_every_zero", lambda: _build(penalty_every=0), ValueError, "penalty_every: 0"),
    ("penalty_warmup_negative", lambda: _build(penalty_warmup=-1), ValueError,
     "penalty_warmup: -1"),
    ("loggers_without_log", lambda: _build(loggers=[object()]), ValueError, "loggers"),
    ("loggers_str", lambda: _build(loggers="wandb"), ValueError, "loggers: 'wandb'"),
    ("seed_negative", lambda: _build(seed=-1), ValueError, "seed: -1"),
    ("tol_zero", lambda: _build(tol=0.0), ValueError, "tol: 0.0"),
    ("dropout_unknown", lambda: _build(dropout="on"), ValueError, "dropout: 'on'"),
    ("max_history_zero", lambda: _build(max_history=0), ValueError, "max_history: 0"),
    # --- estimate_kwargs
    ("estimate_kwargs_list", lambda: _build(estimate_kwargs=["k"]), ValueError,
     "estimate_kwargs: ['k']"),
    ("estimate_kwargs_unknown", lambda: _build(estimate_kwargs={"num_prbes": 4}), ValueError,
     "estimate_kwargs: unknown key 'num_prbes'"),
    ("estimate_kwargs_k_twice", lambda: _build(estimate_kwargs={"k": 3}), ValueError,
     "estimate_kwargs: unknown key 'k'"),
    ("estimate_kwargs_operator_options", lambda: _build(estimate_kwargs={
        "operator_options": 3}), ValueError, "estimate_kwargs['operator_options']: 3"),
    ("estimate_kwargs_solver_options", lambda: _build(estimate_kwargs={
        "solver_options": "fast"}), ValueError, "estimate_kwargs['solver_options']: 'fast'"),
    # --- step / closure / param groups
    ("closure_not_callable", _step(5), ValueError, "closure: 5"),
    ("closure_returns_str", _step(lambda: "loss"), ValueError, "closure: it returned a str"),
    ("add_param_group_foreign", _add_group, ValueError, "param_group"),
    # --- load_state_dict
    ("state_dict_empty", _load(lambda s: {}), ValueError, "state_dict: keys []"),
    ("state_dict_str", _load(lambda s: "checkpoint.pt"), ValueError, "state_dict: keys str"),
    ("state_dict_plain_base", _load(lambda s: {"state": s["state"], "param_groups": [
        {k: v for k, v in g.items() if k != "sdopt"} for g in s["param_groups"]]}), ValueError,
     "state_dict: keys ['param_groups', 'state']"),
    ("state_dict_old_layout_plain_base", _load(lambda s: {"base": s}), ValueError,
     "state_dict: keys ['base']"),
    ("state_dict_version", _load(_set(("sdopt", "version"), 99)), ValueError,
     "state_dict: version 99"),
    ("state_dict_sdopt_not_dict", _load(_set(("sdopt",), [1, 2])), ValueError,
     "state_dict: 'sdopt' entry is a list"),
    ("state_dict_other_mode", _load(lambda s: s, mode="lr"), ValueError,
     "state_dict: mode 'penalty' (this optimizer has mode='lr'"),
    ("state_dict_eigenvectors_size", _load(_set(("sdopt", "eigenvectors"),
     torch.zeros(10, 2, dtype=torch.float64))), ValueError,
     "state_dict: eigenvectors of size 10"),
    ("state_dict_penalty_grad_size", _load(_set(("sdopt", "penalty_grad"),
     torch.zeros(5, dtype=torch.float64))), ValueError, "state_dict: penalty_grad of size 5"),
    ("state_dict_eigenvectors_not_tensor", _load(_set(("sdopt", "eigenvectors"), [0.0])),
     ValueError, "state_dict: eigenvectors is a list"),
    ("state_dict_eigenvectors_of_another_model", _load(lambda s: s, model=nn.Sequential(
        nn.Linear(4, 2), nn.Linear(2, 3)).double()), ValueError,
     "state_dict: eigenvectors of size 43 (this model has 19"),
    ("state_dict_base_of_another_optimizer", _load(lambda s: {
        **s, "param_groups": s["param_groups"] * 2}), ValueError,
     "state_dict: its base-optimizer part ('state', 'param_groups') does not fit"),
    ("state_dict_old_layout_base_of_another_optimizer", _load(lambda s: {"sdopt": s["sdopt"],
     "base": {"state": s["state"], "param_groups": s["param_groups"] * 2}}), ValueError,
     "state_dict: its base-optimizer part"),
]  # fmt: skip


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 35
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("name", "build", "error", "message"), CASES, ids=[name for name, *_ in CASES]
)
def test_invalid_input_is_refused(
    name: str, build: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        build()
    text = str(info.value)
    assert message in text, text
    assert text.startswith("Invalid "), text
