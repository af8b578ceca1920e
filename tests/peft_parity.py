"""Shared pieces of the Hugging Face peft parity tests: an fp64 pair of tiny ViTs with the same weights,
a copy whose fused ``qkv`` is split into three Linears (so peft can target ``q`` and ``v``, which it
cannot on timm's fused layer: peft#691), and the comparison of outputs and gradients.

    ours, theirs = fp64_pair()                       # same weights, float64, eval mode
    theirs = split_qkv(theirs)                        # blocks[i].attn.qkv.{q,k,v}: nn.Linear
    peft_model = peft.get_peft_model(theirs, peft.XConfig(target_modules=["q", "v"], ...))
    ...copy the trainable tensors one way...
    assert_same_outputs_and_grads(ours, peft_model, images, pairs)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from conftest import tiny_vit
from torch import nn


class SplitQKV(nn.Module):
    """timm's fused ``qkv`` Linear as three Linears ``q``, ``k``, ``v`` with the same weights and biases;
    ``forward`` concatenates their outputs in timm's order, so the block computes what it did."""

    def __init__(self, qkv: nn.Linear) -> None:
        super().__init__()
        dim = qkv.out_features // 3
        bias = qkv.bias is not None
        for i, name in enumerate(("q", "k", "v")):
            linear = nn.Linear(qkv.in_features, dim, bias=bias, dtype=qkv.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(qkv.weight[i * dim : (i + 1) * dim])
                if bias:
                    linear.bias.copy_(qkv.bias[i * dim : (i + 1) * dim])
            setattr(self, name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_qkv(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``blocks[i].attn.qkv`` replaced by :class:`SplitQKV`."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.attn.qkv = SplitQKV(block.attn.qkv)
    return model


def peft_targets(targets: Iterable[str]) -> list[str]:
    """peft's ``target_modules`` for our targets on a :func:`split_qkv` copy: ``proj`` is ``attn.proj``
    (peft matches a suffix, and ``patch_embed.proj`` is a Conv2d), the rest by name."""
    return ["attn.proj" if t == "proj" else t for t in targets]


def fp64_pair(seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    """Two tiny timm ViTs (``conftest.tiny_vit(**kwargs)``) with the same weights, in float64, eval mode."""
    torch.manual_seed(seed)
    ours = tiny_vit(**kwargs).double().eval()
    theirs = tiny_vit(**kwargs).double().eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def images64(n: int = 3, seed: int = 1) -> torch.Tensor:
    """``n`` random 32x32 images in float64 (the tiny hosts' input size)."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_same_outputs_and_grads(
    ours: nn.Module,
    theirs: nn.Module,
    images: torch.Tensor,
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    atol: float = 1e-10,
) -> None:
    """The two models' outputs agree, and so do the gradients of every ``(ours, theirs)`` tensor pair
    after the same scalar loss (a fixed random projection of the outputs) is back-propagated."""
    pairs = list(pairs)
    out_ours, out_theirs = ours(images), theirs(images)
    torch.testing.assert_close(out_ours, out_theirs, atol=atol, rtol=0)
    weights = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(7), dtype=out_ours.dtype)
    (out_ours * weights).sum().backward()
    (out_theirs * weights).sum().backward()
    assert pairs, "no tensor pairs to compare"
    for mine, peft_tensor in pairs:
        assert mine.grad is not None and peft_tensor.grad is not None
        torch.testing.assert_close(mine.grad, peft_tensor.grad, atol=atol, rtol=0)
