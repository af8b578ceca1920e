"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort & Asano, ICLR 2024).

Torch layout, a frozen Linear ``y = x W0^T + b`` with ``W0`` of shape ``[out, in]``. One pair of frozen
random matrices is shared by every adapted layer of the model; each layer trains two vectors::

    delta_W = diag(b) B diag(d) A
    y       = x W0^T + b0 + b * ((d * (dropout(x) A^T)) B^T)

- ``A`` (``[r, in_max]``) and ``B`` (``[out_max, r]``): frozen, shared, kaiming-uniform (gain
  ``sqrt(2)``, fan-in: ``in_max`` for ``A``, ``r`` for ``B``, bound ``sqrt(6 / fan_in)``), drawn in that
  order from one CPU ``torch.Generator`` seeded with ``seed``: peft's ``projection_prng_key`` recipe, so
  the same seed gives peft's matrices. ``in_max``/``out_max`` are the largest input and output widths of
  the adapted sites; a site of width ``(out, in)`` uses ``A[:, :in]`` and ``B[:out]`` (peft's slicing).
- ``d`` (``[r]``): trainable, every entry ``d_initial`` (0.1, peft's default); ``b`` (``[out]``):
  trainable, zeros, so the model is unchanged at initialisation.

Storage: ``A`` and ``B`` are persistent buffers of one :class:`VeraProjections` module registered in
every delta, so ``save_adapter`` writes them (once) next to the trained vectors and a reload is exact
whatever the RNG of the loading torch build; ``seed`` only decides what ``create`` draws. On
``vit_base_patch16_224`` with ``q``, ``v`` at ``r = 256`` the file holds 24,576 trained and 393,216
frozen values.

Defaults: rank 256 (peft's) on the query and value projections (``q``, ``v`` slices of the fused
``qkv``): 24,576 trainable parameters on ViT-B/16 (head excluded), our reading of the paper's ViT-B row
(24.6K; see docs/vera.md); peft's
``target_modules=["qkv"]`` at the same rank is ``targets=("qkv",)``: 30,720. The paper reports no
VTAB-1K numbers. Mergeable: ``delta_W`` is folded into the weight, unmerged from the cached ``W0``.

Compared with peft 0.21 (``VeraConfig(r, target_modules=["qkv"])``) on a tiny timm ViT: the same seed
gives the same ``A`` and ``B``, and with the same ``d`` and ``b`` the outputs and gradients agree to 1e-5
in float32 (``tests/test_vera.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, fraction, non_negative, nonzero, positive
from ..layers import Delta, LowRank, PetlModule, adapt_linear, dropped_linear
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, check_targets, linear_sites

__all__ = ["VeraConfig", "VeraProjections", "VeraDelta", "Vera", "kaiming_uniform"]


@dataclass
class VeraConfig(MethodConfig):
    """VeRA options: ``rank`` = ``r`` (the shared matrices' inner width), ``d_initial`` = the start value
    of every ``d``, ``dropout`` on the layer input, ``seed`` of the shared random matrices (peft's
    ``projection_prng_key``)."""

    rank: int = positive(256)
    targets: tuple[str, ...] = ("q", "v")
    d_initial: float = nonzero(0.1)
    dropout: float = fraction(0.0)
    seed: int = non_negative(0)

    def validate(self) -> None:
        check_targets(self.targets, LINEAR_TARGETS, "vera")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """``U(-bound, bound)`` with ``bound = sqrt(6 / shape[1])`` (kaiming-uniform, gain ``sqrt(2)``, fan-in
    the second dim), drawn from ``generator`` on the CPU in float32."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(PetlModule):
    """The frozen shared pair: ``vera_A`` (``[r, in_max]``) and ``vera_B`` (``[out_max, r]``), persistent
    buffers drawn from ``seed`` (``A`` first, then ``B``: see the module docstring)."""

    def __init__(self, rank: int, in_max: int, out_max: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((rank, in_max), generator))
        self.register_buffer("vera_B", kaiming_uniform((out_max, rank), generator))

    def extra_repr(self) -> str:
        return f"rank={self.vera_A.shape[0]}, in_max={self.vera_A.shape[1]}, out_max={self.vera_B.shape[0]}"


class VeraDelta(Delta):
    """``delta(x) = b * ((d * (dropout(x) A^T)) B^T)`` with ``A = vera_A[:, :in]``, ``B = vera_B[:out]``
    from the shared :class:`VeraProjections`; ``delta_W = diag(b) B diag(d) A``."""

    mergeable = True

    def __init__(
        self,
        projections: VeraProjections,
        in_features: int,
        out_features: int,
        d_initial: float,
        dropout: float,
    ) -> None:
        super().__init__()
        rank, in_max = projections.vera_A.shape
        if in_features > in_max or out_features > projections.vera_B.shape[0]:
            raise ValueError(
                f"a VeRA site of {out_features}x{in_features} does not fit the shared matrices "
                f"({projections.vera_B.shape[0]}x{in_max})"
            )
        self.projections = projections
        self.in_features = in_features
        self.out_features = out_features
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), float(d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def matrices(self) -> tuple[Tensor, Tensor]:
        """This site's ``(A, B)``: ``vera_A[:, :in]`` and ``vera_B[:out]``."""
        return self.projections.vera_A[:, : self.in_features], self.projections.vera_B[: self.out_features]

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        a, b = self.matrices()
        h = dropped_linear(x, a, None, self.dropout) * self.vera_lambda_d
        return F.linear(h, b) * self.vera_lambda_b

    def low_rank(self, weight: Tensor) -> LowRank | None:
        """``(diag(d) A, diag(b) B)``: the layer computes the update in its one pass, which keeps only its
        input for the backward (not the per-token ``d * (x A^T)`` and ``B (...)``, which the scaling
        vectors' gradients would need here: 0.91x full fine-tuning's activations instead of LoRA's 0.69x
        on the proxy ViT); None while the dropout is active (its mask is on ``x``)."""
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None
        a, b = self.matrices()
        return LowRank(self.vera_lambda_d[:, None] * a, self.vera_lambda_b[:, None] * b)

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``diag(b) B diag(d) A`` (``[out, in]``)."""
        a, b = self.matrices()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@register_method(
    "vera", "VeRA: frozen random B, A shared by all layers, trained per-layer scaling vectors; mergeable"
)
class Vera(Method):
    config_class = VeraConfig
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        cfg: VeraConfig = self.config
        sites = [site for target in cfg.targets for site in linear_sites(model, target)]
        in_max = max(site.in_features for site in sites)
        out_max = max(site.out_features for site in sites)
        projections = VeraProjections(cfg.rank, in_max, out_max, cfg.seed)
        for site in sites:
            layer = adapt_linear(site)
            delta = VeraDelta(projections, site.in_features, site.out_features, cfg.d_initial, cfg.dropout)
            layer.add_delta(f"vera_{site.target}", delta, site.start, site.stop)
