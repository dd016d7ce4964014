"""Modular-arithmetic datasets and the three grokking models."""

from __future__ import annotations

import pytest
import torch

from sdopt.tasks.grokking import (
    MODELS,
    GrokkingMLP,
    GrokkingTransformer,
    PowerTransformer,
    build_model,
    modular_arithmetic,
)


def _all_pairs(ds):
    x = torch.cat([ds.train_inputs, ds.val_inputs])
    y = torch.cat([ds.train_targets, ds.val_targets])
    return x, y


@pytest.mark.parametrize("operation", ["add", "sub", "mul", "div"])
def test_labels_are_correct_for_every_pair(operation: str) -> None:
    p = 11
    ds = modular_arithmetic(p, operation, 0.5, seed=3)
    x, y = _all_pairs(ds)
    expected_count = p * (p - 1) if operation == "div" else p * p
    assert len(y) == expected_count
    pairs = {(int(a), int(b)) for a, b, _ in x.tolist()}
    assert len(pairs) == expected_count  # every pair exactly once across the split
    assert torch.all(x[:, 2] == p)  # the "=" token
    for (a, b, _), c in zip(x.tolist(), y.tolist()):
        if operation == "add":
            assert c == (a + b) % p
        elif operation == "sub":
            assert c == (a - b) % p
        elif operation == "mul":
            assert c == (a * b) % p
        else:
            assert b != 0
            assert (c * b) % p == a % p  # c = a * b^{-1}: multiplying back by b gives a


def test_division_uses_the_modular_inverse() -> None:
    ds = modular_arithmetic(7, "div", 0.5, seed=0)
    x, y = _all_pairs(ds)
    lookup = {(int(a), int(b)): int(c) for (a, b, _), c in zip(x.tolist(), y.tolist())}
    assert lookup[(1, 3)] == 5  # 3 * 5 = 15 = 1 mod 7
    assert lookup[(2, 4)] == 4  # 4 * 4 = 16 = 2 mod 7
    assert lookup[(0, 6)] == 0


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.9])
def test_split_sizes(fraction: float) -> None:
    ds = modular_arithmetic(13, "add", fraction, seed=0)
    assert len(ds.train_targets) == round(fraction * 169)
    assert len(ds.train_targets) + len(ds.val_targets) == 169
    assert ds.train_inputs.shape == (len(ds.train_targets), 3)
    assert ds.vocab_size == 14 and ds.num_classes == 13
    assert "mod 13" in ds.describe()


def test_split_is_determined_by_the_seed_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = modular_arithmetic(11, "mul", 0.4, seed=5)
    b = modular_arithmetic(11, "mul", 0.4, seed=5)
    c = modular_arithmetic(11, "mul", 0.4, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.train_inputs, b.train_inputs) and torch.equal(a.val_targets, b.val_targets)
    assert not torch.equal(a.train_inputs, c.train_inputs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 12}, "Invalid p: 12"),
        ({"p": 1}, "Invalid p: 1"),
        ({"operation": "pow"}, "Invalid operation: 'pow'"),
        ({"train_fraction": 1.0}, "Invalid train_fraction: 1.0"),
        ({"train_fraction": 0.0}, "Invalid train_fraction: 0.0"),
        ({"seed": 1.5}, "Invalid seed: 1.5"),
    ],
)
def test_dataset_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"p": 7, "operation": "add", "train_fraction": 0.5} | kwargs
    seed = args.pop("seed", 0)
    with pytest.raises(ValueError, match=match):
        modular_arithmetic(**args, seed=seed)


@pytest.mark.parametrize(
    ("name", "p", "count"),
    [
        ("transformer", 97, 222_592),
        # (2p + 1) * 32 + (32 + 1) * p
        ("mlp", 97, 195 * 32 + 33 * 97),
        ("mlp", 11, 23 * 32 + 33 * 11),
        # embeddings + 2 blocks (2 LayerNorms, qkv, proj, MLP) + final LayerNorm + unembedding
        (
            "power",
            97,
            98 * 128
            + 3 * 128
            + 2 * (4 * 128 + 128 * 384 + 384 + 128 * 128 + 128 + 128 * 512 + 512 + 512 * 128 + 128)
            + 2 * 128
            + 128 * 97,
        ),
    ],
)
def test_parameter_counts(name: str, p: int, count: int) -> None:
    model = build_model(name, p)
    assert sum(t.numel() for t in model.parameters()) == count


@pytest.mark.parametrize("name", MODELS)
def test_models_map_tokens_to_logits(name: str) -> None:
    torch.manual_seed(0)
    ds = modular_arithmetic(11, "add", 0.5, seed=0)
    model = build_model(name, 11).double()
    logits = model(ds.train_inputs)
    assert logits.shape == (len(ds.train_targets), 11)
    assert logits.dtype == torch.float64
    assert torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits, ds.train_targets)
    loss.backward()
    assert all(t.grad is not None for t in model.parameters())


def test_mlp_is_a_function_of_the_one_hot_operands() -> None:
    torch.manual_seed(0)
    model = GrokkingMLP(7, width=5).double()
    tokens = torch.tensor([[2, 3, 7], [2, 3, 0]])  # the "=" slot is ignored
    out = model(tokens)
    torch.testing.assert_close(out[0], out[1])
    x = torch.zeros(14, dtype=torch.float64)
    x[2] = 1
    x[7 + 3] = 1
    l1, l2 = model.layers
    manual = l2(torch.nn.functional.gelu(l1(x)))
    torch.testing.assert_close(out[0], manual)
    deeper = GrokkingMLP(7, width=5, num_layers=3)
    assert len(deeper.layers) == 3


def test_transformers_are_causal() -> None:
    torch.manual_seed(0)
    for model in (PowerTransformer(12, 11), GrokkingTransformer(12, 11)):
        model = model.double()
        # the last position sees everything: changing the first token changes the logits
        a = model(torch.tensor([[1, 2, 11]]))
        b = model(torch.tensor([[3, 2, 11]]))
        assert not torch.allclose(a, b)
    power = PowerTransformer(12, 11).double()
    hidden = []
    power.blocks[0].register_forward_hook(lambda m, i, o: hidden.append(o))
    power(torch.tensor([[1, 2, 11]]))
    power(torch.tensor([[1, 2, 5]]))
    # positions 0 and 1 of block 0 cannot see the changed last token
    torch.testing.assert_close(hidden[0][:, :2], hidden[1][:, :2])
    assert not torch.allclose(hidden[0][:, 2], hidden[1][:, 2])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: GrokkingMLP(7, width=0), "Invalid width: 0"),
        (lambda: GrokkingMLP(7, num_layers=1), "Invalid num_layers: 1"),
        (lambda: PowerTransformer(8, 7, d_model=10, num_heads=4), "Invalid num_heads: 4"),
        (lambda: PowerTransformer(8, 7, num_layers=0), "Invalid num_layers: 0"),
        (lambda: GrokkingTransformer(8, 7, d_model=10, num_heads=3), "Invalid num_heads: 3"),
        (lambda: build_model("rnn", 7), "Invalid model: 'rnn'"),
    ],
)
def test_models_reject_bad_arguments(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_models_reject_bad_token_shapes() -> None:
    with pytest.raises(ValueError, match="Invalid tokens shape"):
        GrokkingMLP(7)(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="Invalid tokens shape"):
        PowerTransformer(8, 7)(torch.zeros(2, 5, dtype=torch.long))


def test_mlp_init_scale_multiplies_the_default_initialisation() -> None:
    torch.manual_seed(0)
    plain = GrokkingMLP(7, 4, 3, bias=False)
    torch.manual_seed(0)
    scaled = GrokkingMLP(7, 4, 3, bias=False, init_scale=3.0)
    assert all(torch.equal(3.0 * a, b) for a, b in zip(plain.parameters(), scaled.parameters()))
    assert sum(p.numel() for p in scaled.parameters()) == 14 * 4 + 4 * 4 + 4 * 7
    with pytest.raises(ValueError, match="Invalid init_scale: 0"):
        GrokkingMLP(7, init_scale=0.0)
    with pytest.raises(ValueError, match="Invalid bias"):
        GrokkingMLP(7, bias="no")
