"""LoRA: low-rank updates of frozen Linear weights (Hu et al., 2021).

For a frozen ``W0`` (``[out, in]``) and input ``x``: ``y = x W0^T + b + (alpha / r) * (dropout(x) A^T) B^T``
with trainable ``A`` (``[r, in]``, kaiming-uniform) and ``B`` (``[out, r]``, zeros), so the model is
unchanged at initialisation. In weight space ``delta_W = (alpha / r) B A``, hence mergeable.

The deltas of one Linear (the ``q`` and ``v`` slices of a fused ``qkv``) are computed in one pass
(:class:`~petl_zoo.layers.LowRank`): ``F.linear(x, W0 + s B_blocks A_stacked, b)``, with the gradients
of ``A`` and ``B`` from thin products (never the ``[out, in]`` weight gradient), except while a dropout
is active (then each slice adds ``s * (dropout(x) A^T) B^T`` on its own).

VTAB-1K setting: rank 8 on the query and value slices of the fused ``qkv`` (``targets=('q', 'v')``),
scaling 1 (``alpha = rank``): 294,912 trainable parameters on ViT-B/16 (head excluded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import MethodConfig, fraction, positive
from ..layers import Delta, LowRank, adapt_linear, dropped_low_rank
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, check_targets, linear_sites

__all__ = ["LoraConfig", "LoraDelta", "Lora"]


@dataclass
class LoraConfig(MethodConfig):
    """LoRA options. ``alpha=None`` means ``alpha = rank`` (scaling 1)."""

    rank: int = positive(8)
    alpha: float | None = None
    dropout: float = fraction(0.0)
    targets: tuple[str, ...] = ("q", "v")

    def validate(self) -> None:
        check_targets(self.targets, LINEAR_TARGETS, "lora")

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class LoraDelta(Delta):
    """``delta(x) = s * (dropout(x) A^T) B^T`` for one output slice; ``delta_W = s * B A``."""

    mergeable = True

    def __init__(
        self, in_features: int, out_features: int, rank: int, scaling: float, dropout: float
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return dropped_low_rank(x, self.lora_A, self.lora_B, self.dropout) * self.scaling

    def delta_weight(self, weight: Tensor) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def low_rank(self, weight: Tensor) -> LowRank | None:
        """``(A, s B)``, so that the layer batches this slice with its others; None while the dropout
        is active (each delta draws its own mask) or in a subclass that changes :meth:`forward`."""
        if type(self).forward is not LoraDelta.forward or (
            self.training and isinstance(self.dropout, nn.Dropout)
        ):
            return None
        return LowRank(self.lora_A, self.lora_B if self.scaling == 1 else self.lora_B * self.scaling)


@register_method("lora", "LoRA: low-rank weight updates (B A) on Linear slices such as q and v; mergeable")
class Lora(Method):
    config_class = LoraConfig
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        cfg: LoraConfig = self.config
        sites = [site for target in cfg.targets for site in linear_sites(model, target)]
        for site in sites:
            layer = adapt_linear(site)
            delta = LoraDelta(site.in_features, site.out_features, cfg.rank, cfg.scaling, cfg.dropout)
            layer.add_delta(f"lora_{site.target}", delta, site.start, site.stop)
