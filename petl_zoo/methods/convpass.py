"""Convpass: convolutional bypasses parallel to attention and MLP (Jie & Deng, 2022).

In every pre-norm block, next to each sub-layer ``F`` (attention, MLP) with norm ``N``::

    x <- x + DropPath(LS(F(N(x)))) + s * DropPath(C(N(x)))

``C`` reads the same norm output as the frozen sub-layer and is added straight to the residual stream
(outside the host's layer scale ``LS``, with its own drop-path mask, ``s`` after the drop-path: the
authors' ``forward_block``). ``C`` on tokens ``u`` (``[B, N, D]``)::

    t = QuickGELU(W_down u + b_down)                           D -> d (d = 8)
    t = Conv3x3(t) on the patch tokens as a 2-D grid (zero padding); each prefix token (class,
        register, distillation) through the same conv as a 1 x 1 image (centre tap and bias only)
    C(u) = W_up Dropout(QuickGELU(t)) + b_up                   d -> D

``QuickGELU(x) = x * sigmoid(1.702 x)``. Inits (the authors'): ``W_down`` xavier-uniform, ``W_up`` and
both biases zero (so the model is unchanged at init), the conv either identity-centred (zero except
``W[:, :, 1, 1] = I_d``; ``xavier_init=False``, the default) or xavier-uniform, bias zero.

The patch grid comes from the model: ``patch_embed.grid_size``, or for ``dynamic_img_size`` models the
grid of each input image (a forward pre-hook on ``patch_embed``); prefix tokens are
``model.num_prefix_tokens``. Swin: the tokens are already a ``[B, H, W, C]`` map before the window
partition, so the bypass convolves the whole un-shifted stage grid (the authors' ``Convpass_swin``).

VTAB-1K setting: ``dim=8``, both bypasses (``placement='block'``), dropout 0.1, ``s`` and the conv init
per task (``petl_zoo/presets/convpass.yaml``): ``24 * (6,152 + 584 + 6,912) = 327,552`` trainable
parameters on ViT-B/16 (head excluded); ``placement='attn'`` (Convpass-attn) 163,776. Not mergeable:
the update depends on the input.

Parity (``tests/test_convpass.py``): the authors' ``Convpass`` module and ``forward_block`` /
``forward_swin_block`` (JieShibo/PETL-ViT ``convpass/vtab/convpass.py`` @ 026e4f1), re-hosted with their
hard-coded 14 x 14 grid and width 768 made parameters, carry the same weights and give the same outputs
(fp64, 1e-10) on a tiny ViT (eval, and train mode with drop-path 0.1 and dropout 0.1 from the same seed)
and a tiny Swin (eval).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..config import MethodConfig, fraction, nonzero, positive
from ..layers import AdaptedModule, Delta, Wrapper
from ..registry import Method, register_method
from ..targets import BlockInfo, family_of, iter_blocks

__all__ = ["ConvpassConfig", "ConvpassBypass", "ConvpassTap", "ConvpassInject", "Convpass", "quick_gelu"]

#: The pre-norm block classes Convpass attaches to ("module:ClassName"): x + drop_path(F(norm(x))).
PRE_NORM_BLOCKS = (
    "timm.models.vision_transformer:Block",
    "timm.models.vision_transformer_relpos:RelPosBlock",
    "timm.models.eva:EvaBlock",
    "timm.models.beit:Block",
    "timm.models.swin_transformer:SwinTransformerBlock",
)
#: (norm, drop-path) attribute pairs of the bypassed sub-layers, per placement.
SUBLAYERS = {"attn": (("norm1", "drop_path1"),), "block": (("norm1", "drop_path1"), ("norm2", "drop_path2"))}


def quick_gelu(x: Tensor) -> Tensor:
    """``x * sigmoid(1.702 x)`` (the authors' activation)."""
    return x * torch.sigmoid(1.702 * x)


@dataclass
class ConvpassConfig(MethodConfig):
    """Convpass options: ``dim`` (bottleneck ``d``), ``scale`` (``s``), ``xavier_init`` (conv init:
    identity-centred when False), ``dropout`` (before the up projection) and ``placement``
    (``'block'``: attention and MLP; ``'attn'``: attention only, the authors' Convpass-attn)."""

    dim: int = positive(8)
    scale: float = nonzero(1.0)
    xavier_init: bool = False
    dropout: float = fraction(0.1)
    placement: Literal["block", "attn"] = "block"


class ConvpassBypass(Delta):
    """``C(u)`` of one bypass (module docstring). ``forward(u, None, grid)``: ``u`` is ``[B, H, W, D]``
    (Swin's map) or ``[B, prefix + H*W, D]`` with ``grid = (H, W)``."""

    def __init__(
        self, features: int, dim: int, xavier_init: bool, dropout: float, prefix_tokens: int
    ) -> None:
        super().__init__()
        self.down = nn.Linear(features, dim)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.up = nn.Linear(dim, features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.prefix_tokens = prefix_tokens
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            if xavier_init:
                nn.init.xavier_uniform_(self.conv.weight)
            else:
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(dim)
            nn.init.zeros_(self.conv.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def _conv(self, t: Tensor) -> Tensor:
        """The 3x3 conv on a ``[B, H, W, d]`` map."""
        return self.conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def _conv_tokens(self, t: Tensor, grid: tuple[int, int]) -> Tensor:
        """The conv on ``[B, prefix + H*W, d]`` tokens: the patches as a grid, each prefix token alone."""
        batch, count, dim = t.shape
        n, (h, w) = self.prefix_tokens, grid
        if count - n != h * w:
            raise ValueError(
                f"convpass: {count} tokens do not fit {n} prefix token(s) and a {h}x{w} patch grid"
            )
        patches = self._conv(t[:, n:].reshape(batch, h, w, dim)).reshape(batch, h * w, dim)
        if not n:
            return patches
        prefix = self._conv(t[:, :n].reshape(batch * n, 1, 1, dim)).reshape(batch, n, dim)
        return torch.cat([prefix, patches], dim=1)

    def forward(self, x: Tensor, weight: Tensor | None, grid: tuple[int, int] | None = None) -> Tensor:
        t = quick_gelu(self.down(x))
        if t.dim() == 4:
            t = self._conv(t)
        else:
            if grid is None:
                raise ValueError("convpass: token input needs the patch grid (H, W)")
            t = self._conv_tokens(t, grid)
        return self.up(self.dropout(quick_gelu(t)))


class _TokenGrid:
    """The patch grid of the tokens the bypasses of one model see.

    ViT-like models: ``patch_embed.grid_size``, or with a dynamic image size the grid of the last image
    (:meth:`record_image`, a forward pre-hook on ``patch_embed``). Swin: the ``[B, H, W, C]`` map that
    the block's first norm tap saw last (the MLP bypass of the same block reads it).
    """

    def __init__(self, patch_embed: nn.Module | None) -> None:
        self.patch_embed = patch_embed
        self.size: tuple[int, int] | None = None

    @property
    def dynamic(self) -> bool:
        return self.patch_embed is not None and not getattr(self.patch_embed, "strict_img_size", True)

    def record_image(self, module: nn.Module, args: tuple) -> None:
        self.size = tuple(int(s) for s in module.dynamic_feat_size(tuple(args[0].shape[-2:])))

    def current(self) -> tuple[int, int]:
        if self.patch_embed is not None and not self.dynamic:
            return tuple(int(s) for s in self.patch_embed.grid_size)
        if self.size is None:
            raise RuntimeError("convpass: the patch grid is unknown (the blocks ran without patch_embed)")
        return self.size


class ConvpassTap(AdaptedModule):
    """Wraps a block's norm (``norm1``/``norm2``): returns its output unchanged and keeps it for the
    :class:`ConvpassInject` after the sub-layer, which computes the bypass from it.

    An :class:`~petl_zoo.layers.AdaptedModule` holding the bypass in ``sequential`` (the bypass reads
    the norm's output), so placement, saving and the merge check see it as an input-dependent update.
    """

    def __init__(self, norm: nn.Module, bypass: ConvpassBypass, grid: _TokenGrid) -> None:
        super().__init__(norm)
        self.sequential["convpass"] = bypass
        self.grid = grid
        self.pending: Tensor | None = None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        h = self.base(x, *args, **kwargs)
        if h.dim() == 4:
            self.grid.size = (int(h.shape[1]), int(h.shape[2]))
        self.pending = h
        return h

    def bypass(self) -> Tensor:
        """``C(N(x))`` for the norm output this tap saw last (consumed)."""
        h, self.pending = self.pending, None
        if h is None:
            raise RuntimeError("convpass: the bypass ran before its norm (the block's forward changed)")
        grid = None if h.dim() == 4 else self.grid.current()
        return self.sequential["convpass"](h, None, grid)


class ConvpassInject(Wrapper):
    """Wraps a block's drop-path after a sub-layer: ``DropPath(y) + DropPath(C(N(x))) * s``, two
    independent drop-path masks (the authors' ``forward_block``); the bypass skips the layer scale."""

    def __init__(self, drop_path: nn.Module, tap: ConvpassTap, scale: float) -> None:
        super().__init__()
        self.base = drop_path
        object.__setattr__(self, "tap", tap)  # not a child: the tap lives at the norm
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        return out + self.base(self.tap.bypass()) * self.scale


def _check_block(info: BlockInfo) -> None:
    classes = []
    for spec in PRE_NORM_BLOCKS:
        module, _, name = spec.partition(":")
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    if not isinstance(info.module, tuple(classes)):
        raise ValueError(
            f"convpass needs pre-norm blocks (x + drop_path(F(norm(x)))): block {info.path} is a "
            f"{type(info.module).__name__}; supported: {', '.join(s.rpartition(':')[2] for s in PRE_NORM_BLOCKS)}"
        )


def _check_tokens(model: nn.Module) -> None:
    drop = getattr(model, "patch_drop", None)
    if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
        raise ValueError(
            "convpass needs the full patch grid, but this model drops patch tokens (patch_drop_rate > 0); "
            "create it with patch_drop_rate=0"
        )


@register_method("convpass", "Convpass: 3x3-conv bypasses parallel to attention and MLP (not mergeable)")
class Convpass(Method):
    """Convpass (module docstring): ViT, RelPos, EVA, BEiT and Swin (pre-norm blocks)."""

    config_class = ConvpassConfig
    identity_at_init = True
    families = ("vit", "vit_relpos", "eva", "beit", "swin")
    unsupported_reason = (
        "its res-post-norm blocks normalise after the sub-layer, so there is no norm(x) input for the "
        "bypass to share with attention and MLP"
    )

    def apply(self, model: nn.Module) -> None:
        cfg: ConvpassConfig = self.config
        family = family_of(model)
        _check_tokens(model)
        patch_embed = None if family.hierarchical else model.patch_embed
        prefix = 0 if family.hierarchical else int(getattr(model, "num_prefix_tokens", 0))
        grid = _TokenGrid(patch_embed)
        blocks = iter_blocks(model)
        for info in blocks:
            _check_block(info)
        for info in blocks:
            for norm_name, drop_name in SUBLAYERS[cfg.placement]:
                bypass = ConvpassBypass(info.dim, cfg.dim, cfg.xavier_init, cfg.dropout, prefix)
                bypass.train(info.module.training)  # an eval-mode model gets an eval-mode dropout
                tap = ConvpassTap(getattr(info.module, norm_name), bypass, grid)
                setattr(info.module, norm_name, tap)
                setattr(
                    info.module, drop_name, ConvpassInject(getattr(info.module, drop_name), tap, cfg.scale)
                )
        if grid.dynamic:
            self.hooks.add_forward_pre_hook(patch_embed, grid.record_image)
