"""Modular-arithmetic grokking tasks and the models used on them.

Datasets: all pairs ``(a, b)`` with ``a, b in [0, p)`` (``b != 0`` for division), labelled by
``a op b mod p``, split into train/validation by a seeded permutation. Every tensor lives on the
requested device, so full-batch training never copies.

Models:

- :class:`GrokkingTransformer` — the one-layer transformer of Nanda et al. (2023), "Progress
  measures for grokking via mechanistic interpretability": token + position embeddings,
  multi-head attention without biases, a ReLU MLP, an unembedding read at the last position, no
  LayerNorm. With ``p = 97`` and the defaults it has 222,592 parameters.
- :class:`GrokkingMLP` — the MLP of the sharpness-dimension grokking experiment (Tuci, Korkmaz,
  Şimşekli, Birdal, "Generalization at the Edge of Stability", arXiv:2604.19740, §5): the one-hot
  codes of ``a`` and ``b`` concatenated (``2p`` inputs), then ``num_layers`` linear layers of
  width 32 with GELU between them. With ``p = 97`` and the defaults it has 9,441 parameters.
- :class:`PowerTransformer` — the decoder-only transformer of Power et al. (2022), "Grokking:
  generalization beyond overfitting on small algorithmic datasets": two causal pre-LayerNorm
  blocks, d_model 128, 4 heads, MLP 512 (GELU), a final LayerNorm. With ``p = 97`` it has
  422,144 parameters.

All three models take the ``(batch, 3)`` token tensors ``[a, b, "="]`` of
:func:`modular_arithmetic` and return ``(batch, p)`` logits, so any of them trains on the same
data.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdopt._checks import check_bool, check_choice, check_in_range, check_int, check_positive

OPERATIONS = ("add", "sub", "mul", "div")
_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % f for f in range(2, math.isqrt(n) + 1))


@dataclass(frozen=True)
class ModularArithmetic:
    """A split modular-arithmetic dataset.

    Inputs are token sequences ``[a, b, "="]`` (the ``"="`` token has id ``p``); targets are the
    class ``a op b mod p``. ``train`` and ``val`` are ``(inputs, targets)`` pairs.
    """

    p: int
    operation: str
    train_fraction: float
    seed: int
    train_inputs: Tensor
    train_targets: Tensor
    val_inputs: Tensor
    val_targets: Tensor

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.train_inputs, self.train_targets

    @property
    def val(self) -> tuple[Tensor, Tensor]:
        return self.val_inputs, self.val_targets

    @property
    def vocab_size(self) -> int:
        """Number of input tokens: the residues plus the ``"="`` token."""
        return self.p + 1

    @property
    def num_classes(self) -> int:
        return self.p

    def describe(self) -> str:
        return (
            f"(a {_SYMBOLS[self.operation]} b) mod {self.p}: "
            f"{len(self.train_targets)} train / {len(self.val_targets)} validation pairs"
        )


def modular_arithmetic(
    p: int = 97,
    operation: str = "add",
    train_fraction: float = 0.3,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ModularArithmetic:
    """Generate all equations ``a op b = c (mod p)`` and split them.

    Args:
        p: a prime modulus (division needs a field; the others are kept prime for uniformity).
        operation: ``"add"``, ``"sub"``, ``"mul"`` or ``"div"``.
        train_fraction: fraction of all pairs used for training, in ``(0, 1)``.
        seed: seeds the split permutation (its own generator; the global RNG is untouched).
        device: where the tensors live.
    """
    check_int("p", p, minimum=2)
    if not _is_prime(p):
        raise ValueError(f"Invalid p: {p!r} (must be a prime)")
    check_choice("operation", operation, OPERATIONS)
    check_in_range("train_fraction", train_fraction, 0.0, 1.0, low_open=True, high_open=True)
    check_int("seed", seed)

    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    if operation == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
    if operation == "add":
        c = (a + b) % p
    elif operation == "sub":
        c = (a - b) % p
    elif operation == "mul":
        c = (a * b) % p
    else:
        inverse = torch.tensor([pow(int(x), p - 2, p) if x else 0 for x in range(p)])
        c = (a * inverse[b]) % p
    inputs = torch.stack([a, b, torch.full_like(a, p)], dim=1)

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(c), generator=generator)
    n_train = max(1, min(len(c) - 1, round(train_fraction * len(c))))
    train_idx, val_idx = order[:n_train], order[n_train:]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return ModularArithmetic(
        p=p,
        operation=operation,
        train_fraction=float(train_fraction),
        seed=seed,
        train_inputs=inputs[train_idx].to(dev),
        train_targets=c[train_idx].to(dev),
        val_inputs=inputs[val_idx].to(dev),
        val_targets=c[val_idx].to(dev),
    )


class GrokkingTransformer(nn.Module):
    """One-layer attention-plus-MLP transformer without LayerNorm (Nanda et al., 2023).

    Attention is written out with ``einsum`` (no fused kernels), so every curvature mode of
    :mod:`sdopt.curvature` applies to it. Logits are read at the last (``"="``) position.
    """

    def __init__(
        self,
        vocab_size: int = 98,
        num_classes: int = 97,
        d_model: int = 128,
        num_heads: int = 4,
        d_mlp: int = 512,
        seq_len: int = 3,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_int("d_model", d_model, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        check_int("d_mlp", d_mlp, minimum=1)
        if d_model % num_heads:
            raise ValueError(f"Invalid num_heads: {num_heads!r} (must divide d_model={d_model})")
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Parameter(torch.empty(seq_len, d_model))
        self.W_Q = nn.Linear(d_model, d_model, bias=False)
        self.W_K = nn.Linear(d_model, d_model, bias=False)
        self.W_V = nn.Linear(d_model, d_model, bias=False)
        self.W_O = nn.Linear(d_model, d_model, bias=False)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, num_classes, bias=False)
        self.register_buffer(
            "causal_mask",
            torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool)),
            persistent=False,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d_model = self.embed.embedding_dim
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.pos_embed, std=1.0 / math.sqrt(d_model))
        for lin in (
            self.W_Q,
            self.W_K,
            self.W_V,
            self.W_O,
            self.mlp_in,
            self.mlp_out,
            self.unembed,
        ):
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        batch, length = tokens.shape
        x = self.embed(tokens) + self.pos_embed[:length]
        h, dh = self.num_heads, self.d_head
        q = self.W_Q(x).view(batch, length, h, dh)
        k = self.W_K(x).view(batch, length, h, dh)
        v = self.W_V(x).view(batch, length, h, dh)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        scores = scores.masked_fill(~self.causal_mask[:length, :length], float("-inf"))
        attn = scores.softmax(dim=-1)
        z = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(batch, length, h * dh)
        x = x + self.W_O(z)
        x = x + self.mlp_out(torch.relu(self.mlp_in(x)))
        return self.unembed(x[:, -1])


class GrokkingMLP(nn.Module):
    """MLP on one-hot operands: ``[onehot(a), onehot(b)] -> Linear -> GELU -> ... -> Linear``.

    The input is the concatenation of the one-hot codes of ``a`` and ``b`` (length ``2 p``; the
    ``"="`` token is ignored). ``num_layers`` counts linear layers, as in "3-layer MLP" of the
    paper's MNIST experiment, so the default ``num_layers=2`` is ``2p -> width -> p``:
    ``(2p + 1) * width + (width + 1) * p`` parameters (9,441 at ``p = 97``).

    Args:
        p: the modulus (number of residues and of output classes).
        width: hidden width.
        num_layers: number of linear layers (``>= 2``).
        bias: whether the linear layers have biases.
        init_scale: factor on every parameter after PyTorch's default initialisation (the
            paper's grokking MLP uses 3: a large initial norm that weight decay must shrink).
    """

    def __init__(
        self,
        p: int = 97,
        width: int = 32,
        num_layers: int = 2,
        *,
        bias: bool = True,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.p = check_int("p", p, minimum=2)
        check_int("width", width, minimum=1)
        check_int("num_layers", num_layers, minimum=2)
        check_bool("bias", bias)
        check_positive("init_scale", init_scale)
        sizes = [2 * p] + [width] * (num_layers - 1) + [p]
        self.layers = nn.ModuleList(
            nn.Linear(i, o, bias=bias) for i, o in itertools.pairwise(sizes)
        )
        if init_scale != 1.0:
            with torch.no_grad():
                for param in self.parameters():
                    param.mul_(init_scale)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"Invalid tokens shape: {tuple(tokens.shape)} (must be (batch, >= 2))")
        dtype = self.layers[0].weight.dtype
        x = torch.cat(
            [
                nn.functional.one_hot(tokens[:, 0], self.p).to(dtype),
                nn.functional.one_hot(tokens[:, 1], self.p).to(dtype),
            ],
            dim=1,
        )
        for i, layer in enumerate(self.layers):
            if i:
                x = nn.functional.gelu(x)
            x = layer(x)
        return x


class _PreLNBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.ln_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        h, dh = self.num_heads, self.d_head
        q, k, v = self.qkv(self.ln_attn(x)).view(batch, length, 3, h, dh).unbind(dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        scores = scores.masked_fill(~mask, float("-inf"))
        z = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
        x = x + self.proj(z.reshape(batch, length, d_model))
        return x + self.mlp_out(nn.functional.gelu(self.mlp_in(self.ln_mlp(x))))


class PowerTransformer(nn.Module):
    """Two-layer causal decoder-only transformer with LayerNorm (Power et al., 2022).

    Token and learned position embeddings, ``num_layers`` pre-LayerNorm blocks (causal
    multi-head attention with biases, GELU MLP of width ``d_mlp``), a final LayerNorm and an
    unembedding read at the last (``"="``) position. Attention is written with ``einsum`` so
    every curvature mode applies.

    Args:
        vocab_size: number of input tokens (``p + 1``).
        num_classes: number of output classes (``p``).
        d_model: residual width.
        num_heads: attention heads (must divide ``d_model``).
        num_layers: number of blocks.
        d_mlp: hidden width of each block's MLP.
        seq_len: maximum sequence length.
    """

    def __init__(
        self,
        vocab_size: int = 98,
        num_classes: int = 97,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 2,
        d_mlp: int = 512,
        seq_len: int = 3,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_int("d_model", d_model, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        check_int("num_layers", num_layers, minimum=1)
        check_int("d_mlp", d_mlp, minimum=1)
        check_int("seq_len", seq_len, minimum=1)
        if d_model % num_heads:
            raise ValueError(f"Invalid num_heads: {num_heads!r} (must divide d_model={d_model})")
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Parameter(torch.empty(seq_len, d_model))
        self.blocks = nn.ModuleList(
            _PreLNBlock(d_model, num_heads, d_mlp) for _ in range(num_layers)
        )
        self.ln_final = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, num_classes, bias=False)
        mask = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.in_features))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.pos_embed.shape[0]:
            raise ValueError(
                f"Invalid tokens shape: {tuple(tokens.shape)} (length must be <= {self.pos_embed.shape[0]})"
            )
        x = self.embed(tokens) + self.pos_embed[:length]
        mask = self.causal_mask[:length, :length]
        for block in self.blocks:
            x = block(x, mask)
        return self.unembed(self.ln_final(x[:, -1]))


MODELS = ("mlp", "transformer", "power")


def build_model(name: str, p: int, **kwargs: object) -> nn.Module:
    """Build a grokking model by name for modulus ``p``.

    Args:
        name: ``"mlp"`` (:class:`GrokkingMLP`), ``"transformer"`` (:class:`GrokkingTransformer`,
            Nanda et al.) or ``"power"`` (:class:`PowerTransformer`, Power et al.).
        p: the modulus; sets input vocabulary (``p + 1`` tokens) and output classes (``p``).
        **kwargs: passed to the model's constructor.
    """
    check_choice("model", name, MODELS)
    if name == "mlp":
        return GrokkingMLP(p, **kwargs)  # type: ignore[arg-type]
    if name == "transformer":
        return GrokkingTransformer(p + 1, p, **kwargs)  # type: ignore[arg-type]
    return PowerTransformer(p + 1, p, **kwargs)  # type: ignore[arg-type]
