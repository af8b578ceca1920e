"""Inference MACs per image: fvcore (the PETL papers' convention) and torch's own FLOP counter.

fvcore's ``FlopCountAnalysis`` skips ``aten::scaled_dot_product_attention``; :func:`sdpa_flop_jit` counts
its ``q k^T`` and ``attn v`` as ``B * H * N * M * (dk + dv)`` MACs (``2 B H N^2 dh`` for self-attention),
so ViT-B/16 at 224 counts 17.58. :func:`count_gmacs_torch` cross-checks with
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2), with the CPU SDPA kernel's formula added
where the installed torch lacks it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["sdpa_flop_jit", "count_gmacs", "count_gmacs_torch", "example_input", "example_batch"]


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> float:
    """fvcore handle for ``aten::scaled_dot_product_attention``: MACs of ``q k^T`` and ``attn v``.

    ``q``: ``[..., N, dk]``, ``k``: ``[..., M, dk]``, ``v``: ``[..., M, dv]``; MACs ``= prod(...) N M (dk + dv)``.
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch = math.prod(q[:-2])
    n, dk = q[-2], q[-1]
    m, dv = k[-2], v[-1]
    return float(batch * n * m * (dk + dv))


def example_input(
    model: nn.Module,
    batch: int = 1,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random batch at the model's input size (``patch_embed.img_size``, else its pretrained cfg);
    drawn from ``generator`` (a CPU one, then moved to ``device``) when given."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    size = None
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None) is not None:
        size = tuple(patch.img_size)
    if size is None:
        size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    chans = int(cfg.get("input_size", (3,))[0]) if cfg.get("input_size") else 3
    if generator is None:
        return torch.randn(batch, chans, *size, device=device)
    return torch.randn(batch, chans, *size, generator=generator).to(device)


def example_batch(
    model: nn.Module,
    batch: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`example_input` and random labels over the model's ``num_classes`` (a training batch)."""
    x = example_input(model, batch, device, generator)
    classes = max(1, int(getattr(model, "num_classes", 2)))
    if generator is None:
        return x, torch.randint(0, classes, (batch,), device=device)
    return x, torch.randint(0, classes, (batch,), generator=generator).to(device)


def count_gmacs(model: nn.Module, x: torch.Tensor | None = None) -> float:
    """Inference GMACs per image with fvcore (SDPA counted via :func:`sdpa_flop_jit`)."""
    from fvcore.nn import FlopCountAnalysis

    if x is None:
        x = example_input(model, 1, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, x)
            analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            total = analysis.total()
    finally:
        model.train(was_training)
    return total / x.shape[0] / 1e9


def _missing_sdpa_formulas() -> dict:
    """FLOP formulas for SDPA kernels the installed torch's counter does not know.

    torch <= 2.14 counts the CUDA flash/efficient kernels but not the CPU one
    (``aten._scaled_dot_product_flash_attention_for_cpu``), so on the CPU the attention products
    ``Q K^T`` and ``A V`` would silently count as zero. The formula is the counter's own
    ``sdpa_flop_count`` (``4 B H Nq Nk D`` FLOPs)."""
    from torch.utils import flop_counter

    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is None or cpu_op in flop_counter.flop_registry:
        return {}

    def cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    return {cpu_op: cpu_flash_flops}  # FlopCounterMode wraps it with shape_wrapper


def count_gmacs_torch(model: nn.Module, x: torch.Tensor | None = None) -> float:
    """Inference GMACs per image from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    if x is None:
        x = example_input(model, 1, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_missing_sdpa_formulas())
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9
