"""NEAT (later PEANuT): nonlinear weight-update networks on frozen Linear weights (Zhong et al., 2024).

For a frozen ``W0`` (``[out, in]``, torch layout ``y = x W0^T + b``) the update is a small network of
``W0`` itself::

    delta_W = s * B @ act(A @ W0)                    (depth 0, the paper's vanilla form)

with trainable ``A`` (``[r, out]``, PyTorch Linear default init: kaiming-uniform ``a=sqrt(5)``,
fan-in ``out``) and ``B`` (``[out, r]``, zeros), so the model is unchanged at initialisation. The network
reads the columns of ``W0`` across its ``out`` features: ``2 * out * r`` trainable values per matrix
(not LoRA's ``r * (in + out)``).

``depth = p`` adds ``p`` pairs of bias-free ``r x r`` layers ``E_i`` (down path) and ``D_i`` (up path)
with U-Net residuals, in ``[in, r]`` layout::

    h = act(W0^T A^T)
    for i < p:  push(h);  h = act(h E_i^T)
    for i < p:  h = act(h D_i^T) + pop()
    delta_W^T = s * h B^T

The authors' ``depth`` counts every linear of the network (``A``, the ``E_i``, the ``D_i``, ``B``):
their depth ``2 + 2p`` is our ``depth=p`` (their depth 6 = ``depth=2``).

Training never builds a per-token weight nor the ``[out, in]`` weight gradient: ``H = act(A W0)``
(``[r, in]``, plus the hidden layers) is computed once per forward, independent of the batch, and the
update of the layer is ``s * (x H^T) B^T`` on its output slice. The slices of one Linear (``q``,
``v``) share one pass (:class:`~petl_zoo.layers.LowRank`): the layer computes
``F.linear(x, W0 + B_blocks H_stacked, b)`` (one transient ``[out, in]`` sum, ``out * r * in`` MACs) and
the gradients of ``H`` and ``B`` from thin products, so the cost is the frozen layer's plus
``r x out x in`` products and LoRA's thin backward products.
Merging folds ``delta_W(W0)`` into the weight, computed from the wrapper's cached copy of ``W0``.

Defaults are the authors' vision setting: rank 7 on the query and value slices of the fused ``qkv``
(ReLU, ``s = 1``): 258,048 trainable parameters on ViT-B/16 (head excluded); ``mlp=True`` adds ``fc1``
and ``fc2`` with ``mlp_rank`` 16 (1,732,608 in all). The NEAT/PEANuT papers report no VTAB-1K numbers,
so petl_zoo's NEAT VTAB-1K row is our own measurement with the shared VTAB recipe at the authors' learning
rate, 5e-3 (``Neat.recipe``, with its source).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, non_negative, nonzero, positive
from ..layers import Delta, LowRank, adapt_linear
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, check_targets, linear_sites

__all__ = ["NeatConfig", "NeatDelta", "Neat", "ACTIVATIONS", "MLP_TARGETS"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sin": torch.sin,
}
#: Targets that ``mlp=True`` adds and that use ``mlp_rank``.
MLP_TARGETS = ("fc1", "fc2")


@dataclass
class NeatConfig(MethodConfig):
    """NEAT options: ``rank`` for attention targets, ``mlp_rank`` for ``fc1``/``fc2``, ``depth`` = number
    of ``r x r`` hidden-layer pairs (the authors' depth ``2 + 2 * depth``), ``scale`` = ``s``."""

    rank: int = positive(7)
    mlp_rank: int = positive(16)
    targets: tuple[str, ...] = ("q", "v")
    mlp: bool = False
    act: Literal["relu", "gelu", "silu", "tanh", "sin"] = "relu"
    scale: float = nonzero(1.0)
    depth: int = non_negative(0, hint="0 = vanilla NEAT")

    def validate(self) -> None:
        check_targets(self.targets, LINEAR_TARGETS, "neat")

    @property
    def resolved_targets(self) -> tuple[str, ...]:
        """``targets`` plus ``fc1``/``fc2`` when ``mlp`` (each once)."""
        extra = tuple(t for t in MLP_TARGETS if self.mlp and t not in self.targets)
        return tuple(self.targets) + extra

    def rank_for(self, target: str) -> int:
        return self.mlp_rank if target in MLP_TARGETS else self.rank


class NeatDelta(Delta):
    """NEAT update of one output slice: ``delta(x) = s * (x H^T) B^T`` with ``H = act(A W0)`` (+ hidden
    pairs), so that ``delta_W = s * B H`` (``= s * B act(A W0)`` at depth 0)."""

    mergeable = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        act: str = "relu",
        scale: float = 1.0,
        depth: int = 0,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown act {act!r}; valid activations: {', '.join(ACTIVATIONS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.act_name = act
        self.act = ACTIVATIONS[act]
        self.scale = float(scale)
        self.A = nn.Parameter(torch.empty(rank, out_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        # kaiming_uniform_ on a [r, out] tensor uses fan_in = out: nn.Linear(out, r)'s default init
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        self.encoders = nn.ModuleList(nn.Linear(rank, rank, bias=False) for _ in range(depth))
        self.decoders = nn.ModuleList(nn.Linear(rank, rank, bias=False) for _ in range(depth))

    @property
    def depth(self) -> int:
        return len(self.encoders)

    def hidden(self, weight: Tensor) -> Tensor:
        """``s * h^T`` (``[r, in]``) for the frozen slice ``weight`` (``[out, in]``).

        Same computation as the ``[in, r]`` form in the module docstring, transposed:
        ``h^T = act(A W0)``, ``h^T <- act(E_i h^T)``, ``h^T <- act(D_i h^T) + pop()``.
        """
        act = self.act
        h = act(self.A @ weight)
        stack = []
        for encoder in self.encoders:
            stack.append(h)
            h = act(encoder.weight @ h)
        for decoder in self.decoders:
            h = act(decoder.weight @ h) + stack.pop()
        if self.scale != 1.0:
            h = h * self.scale
        return h

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        if weight is None:
            raise ValueError(
                "NeatDelta is a function of the frozen weight: attach it to a Linear (adapt_linear)"
            )
        # cost independent of the batch: one [r, out] x [out, in] product (+ r x r layers) per forward
        h = self.hidden(weight)
        return F.linear(F.linear(x, h), self.B)

    def low_rank(self, weight: Tensor) -> LowRank | None:
        """``(H, B)`` with ``H = s act(A W0)`` (+ hidden pairs): the layer batches this slice with its
        others (None in a subclass that changes :meth:`forward`)."""
        if type(self).forward is not NeatDelta.forward:
            return None
        return LowRank(self.hidden(weight), self.B)

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``delta_W = s * B act(A W0)`` (``[out, in]``) from the original frozen slice ``W0``."""
        return self.B @ self.hidden(weight)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, act={self.act_name}, "
            f"scale={self.scale}, depth={self.depth}"
        )


@register_method(
    "neat",
    "NEAT/PEANuT: nonlinear weight-update network delta_W = B act(A W0) on Linear slices (q, v); mergeable",
)
class Neat(Method):
    """NEAT: ``delta_W = s * B act(A W0)`` per adapted matrix (see the module docstring).

    The NEAT/PEANuT papers report no VTAB-1K numbers: petl_zoo's NEAT VTAB-1K row is our own
    measurement with the shared VTAB recipe and the authors' learning rate.
    """

    config_class = NeatConfig
    identity_at_init = True
    #: The authors' learning rate: every vision run of yibozhong/neat (image-classification/run.sh @
    #: ff91fa2) trains at 5e-3 (cifar10, cifar100, eurosat, pets; resisc's backbone) or 1e-2 (cars,
    #: fgvc; resisc's head): 5e-3, their most common value. The per-dataset values belong to the
    #: full-dataset suite's preset.
    recipe: dict = {"lr": 5e-3}

    def apply(self, model: nn.Module) -> None:
        cfg: NeatConfig = self.config
        sites = [site for target in cfg.resolved_targets for site in linear_sites(model, target)]
        for site in sites:
            layer = adapt_linear(site)
            delta = NeatDelta(
                site.in_features,
                site.out_features,
                cfg.rank_for(site.target),
                act=cfg.act,
                scale=cfg.scale,
                depth=cfg.depth,
            )
            weight = layer.base.weight
            delta.to(device=weight.device, dtype=weight.dtype)
            layer.add_delta(f"neat_{site.target}", delta, site.start, site.stop)
