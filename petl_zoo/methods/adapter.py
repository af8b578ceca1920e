"""Bottleneck adapters: AdaptFormer's parallel adapter and Houlsby's sequential adapter.

- ``style='parallel'`` (AdaptFormer, Chen et al., 2022): ``mlp_out = Mlp(h) + s * up(ReLU(down(h)))`` where
  ``h`` is the MLP input (``norm2(x)``); ``down``: ``Linear(d, dim)``, ``up``: ``Linear(dim, d)``, both with
  bias, ``up`` zero-initialised so the model is unchanged at init; ``s = 0.1`` (AdaptFormer's VTAB value).
- ``style='sequential'`` (Houlsby et al., 2019): ``out = m + s * up(ReLU(down(m)))`` applied to the
  sub-layer's output ``m`` before the residual add, ``s = 1``.

VTAB-1K setting: dim 8 on the MLP of every block: ``12 * (768*8 + 8 + 8*768 + 768) = 156,768``
trainable parameters on ViT-B/16 (head excluded). Not mergeable: the update depends on the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from ..config import MethodConfig, fraction, positive
from ..layers import Delta, adapt_module
from ..registry import Method, register_method
from ..targets import check_targets, module_sites

__all__ = ["AdapterConfig", "BottleneckAdapter", "Adapter", "ACTIVATIONS"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
ADAPTER_TARGETS = ("mlp", "attn")


@dataclass
class AdapterConfig(MethodConfig):
    """Adapter options. ``scale=None`` means 0.1 for ``parallel`` and 1.0 for ``sequential``."""

    dim: int = positive(8)
    scale: float | None = None
    style: Literal["parallel", "sequential"] = "parallel"
    targets: tuple[str, ...] = ("mlp",)
    act: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = fraction(0.0)

    def validate(self) -> None:
        check_targets(self.targets, ADAPTER_TARGETS, "adapter")

    @property
    def resolved_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        return 0.1 if self.style == "parallel" else 1.0


class BottleneckAdapter(Delta):
    """The update ``s * up(act(down(h)))`` of a bottleneck adapter; ``up`` starts at zero.

    Attached in parallel (``h`` is the module's input) or sequentially (``h`` is its output, and the
    wrapper adds ``h`` back: ``out = h + s * up(act(down(h)))``). Input-dependent: not mergeable.
    """

    def __init__(
        self, features: int, dim: int, scale: float, act: str = "relu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.down = nn.Linear(features, dim)
        self.act = ACTIVATIONS[act]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(dim, features)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor, weight: Tensor | None) -> Tensor:
        return self.up(self.dropout(self.act(self.down(h)))) * self.scale


@register_method("adapter", "Bottleneck adapters: AdaptFormer parallel (default) or Houlsby sequential")
class Adapter(Method):
    config_class = AdapterConfig
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        cfg: AdapterConfig = self.config
        sites = [site for target in cfg.targets for site in module_sites(model, target)]
        for site in sites:
            wrapper = adapt_module(site)
            sequential = cfg.style == "sequential"
            adapter = BottleneckAdapter(site.in_features, cfg.dim, cfg.resolved_scale, cfg.act, cfg.dropout)
            (wrapper.sequential if sequential else wrapper.parallel)["adapter"] = adapter
