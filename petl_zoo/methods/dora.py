"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024).

Torch layout, a frozen Linear ``y = x W0^T + b`` with ``W0`` of shape ``[out, in]``. DoRA splits the
adapted weight into a magnitude per output row and a direction, and lets LoRA move the direction::

    W' = m * (W0 + s B A) / ||W0 + s B A||_row          (one norm, one m value per output row)
    y  = x W'^T + b

with LoRA's ``A`` (``[r, in]``, kaiming-uniform ``a = sqrt(5)``) and ``B`` (``[out, r]``, zeros),
``s = alpha / r``, and the trainable magnitude ``m`` (``[out]``) initialised to ``||W0||_row``, so the
model is unchanged at initialisation. The norm is over each output row (``torch.linalg.norm(W, dim=1)``),
peft's convention; on an output slice (``q``, ``v`` of the fused ``qkv``) the norm and ``m`` are those of
the slice's rows. The bias is not scaled.

As in the paper's section 4.3 and in peft (``peft/tuners/lora/dora.py``), the norm
``||W0 + s B A||_row`` is treated as a constant in backward (detached): it follows ``A`` and ``B`` in
the forward, but gradients reach ``A``, ``B`` and ``m`` only through ``m / norm`` times the
directions. The layer adds to the frozen output::

    g     = m / ||W0 + s B A||_row                       (detached norm, [out])
    delta = (g - 1) * (x' W0^T) + g * s * (x' A^T) B^T   (x' = dropout(x), peft's dropout placement)

Training never builds ``B A`` nor ``W'``: the squared row norm is expanded as
``||W0||^2 + 2 s rowsum((W0 A^T) * B) + s^2 rowsum((B (A A^T)) * B)``, which needs ``[out, r]`` and
``[r, r]`` products only (a half-precision ``W0`` is read once as one float32 ``[out, in]`` copy). The
price against LoRA is the ``x' W0^T`` term: one more product of the slice's width, forward and backward
(see docs/dora.md). Merging folds ``W' - W0`` into the slice, computed from the wrapper's cached ``W0``.

Defaults are LoRA's VTAB-1K setting (rank 8 on ``q``, ``v``, ``alpha = rank``): 313,344 trainable
parameters on ViT-B/16 (LoRA's 294,912 plus ``m``: 18,432), 322,560 on the fused ``qkv``. The options
are LoRA's (``rank``, ``alpha``, ``dropout``, ``targets``). The DoRA paper reports no VTAB-1K numbers.

Compared with peft 0.21 (``LoraConfig(use_dora=True, target_modules=["qkv"])``) on a tiny timm ViT with
the same ``A``, ``B`` and ``m``: outputs and the gradients of ``A``, ``B``, ``m`` agree to 1e-5 in float32,
with and without dropout (``tests/test_dora.py``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import Delta, LowRank, adapt_linear
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, check_targets, linear_sites
from .lora import LoraConfig, LoraDelta

__all__ = ["DoraConfig", "DoraDelta", "Dora", "dora_row_norm"]


@dataclass
class DoraConfig(LoraConfig):
    """DoRA options, LoRA's names and defaults: ``rank``, ``alpha`` (None: ``alpha = rank``),
    ``dropout`` (on the input of both terms), ``targets``."""

    def validate(self) -> None:
        check_targets(self.targets, LINEAR_TARGETS, "dora")


@torch.no_grad()
def dora_row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``||W0 + s B A||`` per output row (``[out]``, float32 or wider), without forming ``B A``:
    ``||W0||^2 + 2 s rowsum((W0 A^T) * B) + s^2 rowsum((B (A A^T)) * B)``. No gradient (DoRA's
    detached norm), in full precision also inside an autocast region. The only ``[out, in]`` temporary
    is a float32 copy of a half-precision ``W0``."""
    work = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(work)
    a, b = (t.detach().to(device=w.device, dtype=work) for t in (lora_A, lora_B))
    kind = w.device.type  # an autocast region would run the products in half precision
    exact = torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext()
    with exact:
        squared = torch.linalg.vector_norm(w, dim=1).square()
        cross = (F.linear(w, a) * b).sum(dim=1)
        quad = ((b @ (a @ a.T)) * b).sum(dim=1)
    return (squared + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0).sqrt()


class DoraDelta(Delta):
    """DoRA on one output slice: ``delta = (g - 1) * x' W0^T + g * s x' A^T B^T``, ``g = m / ||W0 + s B A||``
    (see the module docstring). The low-rank pair is a :class:`~petl_zoo.methods.lora.LoraDelta`
    (``self.lora``: ``lora_A``, ``lora_B``, ``scaling``); ``magnitude`` is ``m``, one value per row."""

    mergeable = True

    def __init__(self, weight: Tensor, rank: int, scaling: float, dropout: float) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.lora = LoraDelta(in_features, out_features, rank, scaling, 0.0)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # B = 0, so this is ||W0||_row by the very computation forward() divides by: g = 1 exactly at init
        self.magnitude = nn.Parameter(self.row_norm(weight))

    def row_norm(self, weight: Tensor) -> Tensor:
        """``||W0 + s B A||`` per row of this slice (detached, float32 or wider)."""
        return dora_row_norm(weight, self.lora.lora_A, self.lora.lora_B, self.lora.scaling)

    def scale(self, weight: Tensor) -> Tensor:
        """``g = m / ||W0 + s B A||`` (``[out]``), the norm rounded to ``m``'s dtype first (so that a bf16
        model is unchanged at init too) and detached."""
        return self.magnitude / self.row_norm(weight).to(self.magnitude.dtype)

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        x = self.dropout(x)
        g = self.scale(weight)
        return (g - 1) * F.linear(x, weight) + g * self.lora(x, None)

    def low_rank(self, weight: Tensor) -> LowRank | None:
        """``(A, g s B)`` with ``base_scale = g - 1``: the layer adds this slice's update in its one pass
        and reuses the frozen output ``x W0^T`` it has already computed for the ``(g - 1)`` term, instead
        of a second product with ``W0``. None while the dropout is active (the frozen output is that of
        the undropped input)."""
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None
        g = self.scale(weight)
        return LowRank(self.lora.lora_A, (g * self.lora.scaling)[:, None] * self.lora.lora_B, g - 1)

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``W' - W0 = g * (W0 + s B A) - W0`` (``[out, in]``, in float32 for half-precision weights)."""
        work = torch.promote_types(weight.dtype, torch.float32)
        w = weight.detach().to(work)
        g = self.scale(weight).detach().to(work)
        return g[:, None] * (w + self.lora.delta_weight(w).to(work)) - w

    def extra_repr(self) -> str:
        return f"rows={self.magnitude.shape[0]}"


@register_method(
    "dora", "DoRA: LoRA on the direction of each weight row plus a trained row magnitude; mergeable"
)
class Dora(Method):
    config_class = DoraConfig
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        cfg: DoraConfig = self.config
        sites = [site for target in cfg.targets for site in linear_sites(model, target)]
        for site in sites:
            layer = adapt_linear(site)
            weight = layer.base.weight[site.start : site.stop]
            delta = DoraDelta(weight, cfg.rank, cfg.scaling, cfg.dropout)
            layer.add_delta(f"dora_{site.target}", delta, site.start, site.stop)
