"""Baselines: ``linear`` (head only), ``full`` (every parameter) and ``bitfit`` (biases + head).

BitFit (Ben Zaken et al., 2022) trains every bias of the backbone, LayerNorm biases included. None of
them attaches a delta: the trained tensors are the model's own, so they merge trivially (nothing to fold).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import MethodConfig
from ..registry import Method, register_method

__all__ = ["LinearProbe", "Full", "BitFit"]


@dataclass
class _NoOptions(MethodConfig):
    """This method has no options."""


@register_method("linear", "Linear probe: only the classifier head is trained")
class LinearProbe(Method):
    config_class = _NoOptions
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        """Nothing beyond the head (``create`` makes the head trainable)."""


@register_method("full", "Full fine-tuning: every parameter is trained")
class Full(Method):
    config_class = _NoOptions
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)


@register_method("bitfit", "BitFit: every bias of the backbone (LayerNorm included) plus the head")
class BitFit(Method):
    config_class = _NoOptions
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
