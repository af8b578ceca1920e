"""RepAdapter: linear, re-parameterisable adapters before attention and the MLP (Luo et al., 2023).

On the pre-norm LayerNorm output ``z`` that feeds attention (``norm1``) and the MLP (``norm2``)::

    A(z) = z + s * (W_B dropout(W_A z + a) + b)

``W_A``: ``D -> dim`` (xavier-uniform, bias ``a`` = 0), ``W_B``: ``dim -> D`` **grouped** (``groups``
blocks: output channels ``[i D/g, (i+1) D/g)`` read hidden channels ``[i dim/g, (i+1) dim/g)``; weight
and bias ``b`` zero, so the model is unchanged at initialisation), dropout 0.1, no non-linearity; the
scale ``s`` multiplies ``W_B``'s bias too. ``placement='block'`` (the authors' ``repblock``, the
VTAB method) puts one adapter before attention and one before the MLP of every block; ``'attn'``
(``repattn``) only the first.

Where it attaches: attention reads ``norm1``'s output only through its input Linears (the fused ``qkv``,
or ``q_proj``/``k_proj``/``v_proj``, and EVA's ``gate`` when there is one) and the MLP through ``fc1``
(SwiGLU: ``fc1_g`` and ``fc1_x``), so the adapter is an *input delta* of those Linears
(:meth:`~petl_zoo.layers.AdaptedLinear.add_input_delta`): they read ``A(z)`` instead of ``z``, which is
the authors' placement. One adapter serves all input Linears of its attention / MLP (one module,
shared); with separate ``q_proj``/``k_proj``/``v_proj`` each Linear draws its own dropout mask in
training. On Swin, ``qkv`` reads the window-partitioned ``norm1`` output: identical to the authors'
adapter before the partition except on the zero padding of a grid not divisible by the window (no
standard 224 configuration pads), where it is what the authors' own re-parameterised model computes.

Mergeable, as the authors re-parameterise it (``set_RepWeight``): with dropout off, ``A`` is the affine
map ``z -> M z + c``, ``M = I + s W_B W_A`` (``W_B`` as a dense block-diagonal ``D x dim`` matrix),
``c = s (W_B a + b)``, folded into each consumer ``y = W z + b0``: ``W' = W M``, ``b0' = b0 + W c``. The
wrapper keeps the originals while merged; unmerging is exact. (The authors' ``test.py`` folds with
``--scale`` 1 whatever the trained scale was; this fold uses the adapter's own ``s``.) A consumer
without a bias blocks the merge (EVA's ``k_proj`` with ``qkv_fused=False``).

Not defined on res-post-norm blocks (SwinV2, SwinV2-Cr, timm's ``ResPostBlock`` variants): there the
norms follow attention and the MLP, which read the un-normalised residual stream, so there is no
LayerNorm output before them; ``create`` refuses those hosts.

Trainable parameters per adapter: ``dim * D + dim + D * dim / groups + D``. ViT-B/16 (head excluded):
``24 * 9,992`` = 239,808 (dim 8); 461,184 (dim 16); ``placement='attn'`` 119,904 (dim 8).

Compared with the authors' code (``luogen1996/RepAdapter`` @ 360992f, ``repadapter.py``: ``RepAdapter``
L147-172, ``forward_vit_block_adapter`` L21-24, ``forward_swin_block_adapter`` L32-69,
``reparameterize`` / ``sparse2dense`` / ``set_RepWeight`` L201-329): their adapter modules and block
forwards, re-hosted on a tiny timm ViT and Swin with our weights copied in, give the same logits in
fp64, and their re-parameterisation (with the trained scale) gives the same folded ``qkv``/``fc1``
weights as ``petl_zoo.merge`` (``tests/test_repadapter.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..config import MethodConfig, fraction, nonzero, positive
from ..layers import Affine, Delta, adapt_linear
from ..registry import Method, register_method
from ..targets import LinearSite, family_of, iter_blocks, linear_sites

__all__ = ["RepAdapterConfig", "RepAdapterDelta", "RepAdapter", "POST_NORM_BLOCKS"]

#: timm block classes whose norms follow the sub-layer (res-post-norm): no LayerNorm output feeds it.
POST_NORM_BLOCKS = ("ResPostBlock", "ResPostRelPosBlock", "EvaBlockPostNorm")
_POST_NORM_REASON = (
    "RepAdapter sits on the LayerNorm output that feeds attention and the MLP; res-post-norm blocks "
    "normalise after them and feed them the un-normalised residual stream, so that placement does not exist"
)


@dataclass
class RepAdapterConfig(MethodConfig):
    """RepAdapter options: hidden ``dim``, ``groups`` of the up projection, ``scale`` ``s`` (the authors
    tune it per task: presets), ``dropout`` between the projections, ``placement`` ``'block'``
    (repblock: before attention and the MLP) or ``'attn'`` (repattn: before attention only)."""

    dim: int = positive(8)
    groups: int = positive(2)
    scale: float = nonzero(1.0)
    dropout: float = fraction(0.1)
    placement: Literal["block", "attn"] = "block"

    def validate(self) -> None:
        if self.dim % self.groups:
            raise ValueError(
                f"dim must be a multiple of groups ({self.groups}) for the grouped up projection, got {self.dim}"
            )


class RepAdapterDelta(Delta):
    """The update ``s * (W_B dropout(W_A z + a) + b)`` of one RepAdapter (``W_B`` grouped); an input
    delta of the Linears that read ``z``. ``affine()`` is ``(s W_B W_A, s (W_B a + b))`` (dropout off)."""

    mergeable = True

    def __init__(self, features: int, dim: int, groups: int, scale: float, dropout: float) -> None:
        super().__init__()
        if features % groups or dim % groups:
            raise ValueError(
                f"RepAdapter with {groups} groups needs features ({features}) and dim ({dim}) divisible by it"
            )
        self.groups = groups
        self.scale = float(scale)
        self.down = nn.Linear(features, dim)  # the authors' conv_A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up_weight = nn.Parameter(torch.zeros(features, dim // groups))  # conv_B.weight[..., 0]
        self.up_bias = nn.Parameter(torch.zeros(features))  # conv_B.bias
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def up(self, h: Tensor) -> Tensor:
        """The grouped up projection ``W_B h + b`` (``h``: ``[..., dim]``)."""
        g = self.groups
        features, per_group = self.up_weight.shape
        blocks = self.up_weight.view(g, features // g, per_group)
        out = torch.einsum("...gk,gok->...go", h.unflatten(-1, (g, per_group)), blocks)
        return out.flatten(-2) + self.up_bias

    def dense_up(self) -> Tensor:
        """``W_B`` as a dense block-diagonal ``[features, dim]`` matrix."""
        features, per_group = self.up_weight.shape
        return torch.block_diag(*self.up_weight.view(self.groups, features // self.groups, per_group))

    def forward(self, z: Tensor, weight: Tensor | None) -> Tensor:
        return self.up(self.dropout(self.down(z))) * self.scale

    def affine(self) -> Affine:
        up = self.dense_up()
        return (up @ self.down.weight) * self.scale, (up @ self.down.bias + self.up_bias) * self.scale


def _check_pre_norm(model: nn.Module) -> None:
    for info in iter_blocks(model):
        kind = type(info.module).__name__
        if kind in POST_NORM_BLOCKS:
            raise ValueError(
                f"method 'repadapter' does not support the {kind} of {info.path}: {_POST_NORM_REASON}"
            )


def _by_block(sites: list[LinearSite]) -> dict[int, list[LinearSite]]:
    grouped: dict[int, list[LinearSite]] = {}
    for site in sites:
        grouped.setdefault(site.block.index, []).append(site)
    return grouped


def _attention_inputs(model: nn.Module) -> dict[int, list[LinearSite]]:
    """Per block, the Linears that read the attention's input: ``qkv`` (or ``q_proj``/``k_proj``/
    ``v_proj``) and EVA's ``gate`` when the attention has one."""
    family = family_of(model)
    blocks = iter_blocks(model)
    fused = getattr(getattr(blocks[0].module, family.attn), "qkv", None) is not None
    sites = [s for t in (("qkv",) if fused else ("q", "k", "v")) for s in linear_sites(model, t)]
    grouped = _by_block(sites)
    for info in blocks:
        attn = getattr(info.module, family.attn)
        gate = getattr(attn, "gate", None)
        if isinstance(gate, nn.Linear):
            path = f"{info.path}.{family.attn}.gate"
            grouped[info.index].append(LinearSite(info, "gate", path, attn, "gate", 0, gate.out_features))
    return grouped


@register_method(
    "repadapter",
    "RepAdapter: linear grouped adapters on the LayerNorm outputs before attention and the MLP, folded "
    "into qkv and fc1; mergeable",
)
class RepAdapter(Method):
    """RepAdapter (see the module docstring)."""

    config_class = RepAdapterConfig
    identity_at_init = True
    recipe: dict = {}  # the authors train with the shared VTAB recipe (AdamW 1e-3, wd 1e-4, 100 epochs ...)
    families = ("vit", "vit_relpos", "eva", "beit", "swin")
    unsupported_reason = _POST_NORM_REASON

    def apply(self, model: nn.Module) -> None:
        cfg: RepAdapterConfig = self.config
        _check_pre_norm(model)
        places = {"attn": _attention_inputs(model)}
        if cfg.placement == "block":
            places["mlp"] = _by_block(linear_sites(model, "fc1"))
        for info in iter_blocks(model):
            for kind, grouped in places.items():
                delta = RepAdapterDelta(info.dim, cfg.dim, cfg.groups, cfg.scale, cfg.dropout)
                for site in grouped[info.index]:
                    adapt_linear(site).add_input_delta(f"repadapter_{kind}", delta)
