"""DTL / DTL+: a Compact Side Network beside the frozen blocks (Fu, Zhu & Wu, AAAI 2024).

Blocks ``Blk_0 .. Blk_{L-1}`` with inputs ``z_i``. Each block ``i >= read_from`` gets a low-rank linear map
``A_i`` (``[r, D]``) / ``B_i`` (``[D, r]``) that reads the block's *input*; the side network keeps the
running sum ``h_i`` of their outputs, and from block ``M = add_from`` on its activated sum is added to
every block's *output*::

    h_i     = sum_{read_from <= j <= i} z_j A_j^T B_j^T               (before block i runs)
    z_{i+1} = Blk_i(z_i)                                                  i <  M
    z_{i+1} = Blk_i(z_i) + F(swish_beta(h_i))                             i >= M
    swish_beta(h) = h * sigmoid(beta h)

``F`` is the identity for DTL (``fusion_size=0``) and, for DTL+, a depthwise ``k x k`` convolution
(``D`` groups, no bias, ``padding='same'``: asymmetric for even ``k``) shared by all the added blocks,
on the patch tokens as their 2-D grid; the prefix tokens (class, registers) pass through it unchanged
(the authors' code keeps its one class token and convolves the 196 patches). Inits (the authors'):
``A_i`` kaiming-uniform (``a = sqrt(5)``), ``B_i`` zero, so ``h = 0`` and the model is unchanged at init;
the conv keeps PyTorch's default init.

VTAB-1K setting (``heekhero/DTL @ bf6c51e``, ``train_scripts/vit/vtab/*/train_dtl(+).sh``): ``rank=2``,
``beta=100``, a map before every block (``--lora_before_blocks 0-11``: ``read_from=0``), added after
blocks 6-11 (``--add_after_blocks 6-11``: ``add_from=6``; the default ``None`` is ``depth // 2``, which is
6 on ViT-B), DTL ``fusion_size=0``, DTL+ ``3``/``4``/``5`` per task (``petl_zoo/presets/dtl.yaml``,
DTL's per-task table). Trainable on ViT-B/16 (head excluded): DTL ``12 * 2 * 2 * 768 = 36,864`` (the
paper's 0.04 M); DTL+ adds ``768 k^2``: ``k = 3`` 43,776, ``k = 4`` 49,152, ``k = 5`` 56,064.

Memory: the maps read the frozen blocks' inputs and nothing trainable runs inside a block, so the blocks
before ``M`` run with no autograd graph (their input needs no gradient: no activation of theirs is
kept for backward) and the backbone's own tensors never need gradients. As in the authors' code, the
blocks after ``M`` (``M+1 .. L-1``) process a stream that carries the side output, so backward passes
through them (their activations are kept): that is what the authors' forward computes, and what
``tests/test_dtl.py`` checks against it.

Attachment: every block from ``read_from`` on is wrapped in a :class:`DTLBlock` (an
:class:`~petl_zoo.layers.AdaptedModule`) whose ``parallel['dtl']`` is the block's map (it reads the
block's input) and, from ``M`` on, whose ``sequential['dtl']`` is the :class:`DTLAdd` (it returns
``F(swish(h))``; the block output itself is not read). Hierarchical hosts (Swin) are refused: the side
stream has one width and one token set for the whole model. Not mergeable: the added update depends on
the input of every earlier block.

Parity (``tests/test_dtl.py``): the authors' ``VisionTransformer.forward`` loop and ``LoRALinear``
(``models/vision_transformer.py`` L47-68, L413-450 @ bf6c51e), re-hosted over a tiny timm ViT with the
same weights, gives the same logits and gradients (fp64, within 1e-10) for DTL and DTL+ (k = 3 and 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..config import MethodConfig, non_negative, positive
from ..layers import AdaptedModule, Delta, PetlModule
from ..registry import Method, register_method
from ..targets import iter_blocks, module_sites

__all__ = ["DTLConfig", "DTLMap", "DTLFusion", "DTLAdd", "DTLBlock", "DTL", "swish"]


def swish(x: Tensor, beta: float) -> Tensor:
    """``x * sigmoid(beta x)`` (the authors' ``swish``)."""
    return x * torch.sigmoid(x * beta)


@dataclass
class DTLConfig(MethodConfig):
    """DTL options: ``rank`` (``r`` of each map), ``beta`` (the swish's), ``read_from`` (the first block
    whose input is read; maps on every block from there), ``add_from`` (``M``: the side output is added
    after this block and every later one; None: ``depth // 2``), ``fusion_size`` (0: DTL; ``k > 0``:
    DTL+, a shared depthwise ``k x k`` conv)."""

    rank: int = positive(2)
    beta: float = 100.0
    read_from: int = non_negative(0)
    add_from: int | None = non_negative(None)
    fusion_size: int = non_negative(0)

    def validate(self) -> None:
        if not math.isfinite(self.beta):
            raise ValueError(f"beta must be finite, got {self.beta!r}")
        if self.add_from is not None and self.add_from < self.read_from:
            raise ValueError(
                f"add_from ({self.add_from}) must be >= read_from ({self.read_from}): the side output "
                "is added after blocks whose maps have run"
            )


class DTLMap(Delta):
    """One low-rank map ``z A^T B^T`` (the authors' ``LoRALinear``): ``A`` ``[r, D]`` kaiming-uniform,
    ``B`` ``[D, r]`` zero."""

    def __init__(self, features: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, features))
        self.lora_B = nn.Parameter(torch.zeros(features, rank))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return x @ self.lora_A.T @ self.lora_B.T


class DTLFusion(PetlModule):
    """DTL+'s depthwise ``k x k`` conv on the patch grid (prefix tokens unchanged). ``forward(t, grid)``."""

    def __init__(self, features: int, kernel: int, prefix_tokens: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(features, features, kernel, 1, "same", groups=features, bias=False)
        self.prefix_tokens = prefix_tokens

    def forward(self, t: Tensor, grid: tuple[int, int]) -> Tensor:
        batch, count, dim = t.shape
        n, (h, w) = self.prefix_tokens, grid
        if count - n != h * w:
            raise ValueError(f"dtl: {count} tokens do not fit {n} prefix token(s) and a {h}x{w} patch grid")
        patches = t[:, n:].reshape(batch, h, w, dim).permute(0, 3, 1, 2)
        patches = self.conv(patches).permute(0, 2, 3, 1).reshape(batch, h * w, dim)
        return torch.cat([t[:, :n], patches], dim=1) if n else patches


class _Side:
    """The side network's running state for one forward: ``h`` (the sum of the maps' outputs so far, the
    current block's) and the patch grid of the current image.

    Gradient checkpointing calls a block again during backward, with its original input tensor, after
    the forward has moved ``h`` on. So that it sees the ``h`` of its forward, a block whose ``h`` a later
    block adds (:meth:`carry` with ``needed``) files it under its output tensor while the model's blocks
    are checkpointed, and :meth:`carried` finds it by the next block's input; the entry goes with the
    tensor. Otherwise (no checkpointing, no gradient, or under ``torch.compile``, whose traced graph
    recomputes without calling the Python forward) the running value is used as it is, and nothing is
    kept."""

    def __init__(self, patch_embed: nn.Module | None, owner: nn.Module) -> None:
        self.patch_embed = patch_embed
        self.owner = owner  # the model: whether timm checkpoints its blocks (a plain reference)
        self.h: Tensor | None = None
        self.size: tuple[int, int] | None = None
        self.stream = WeakIdKeyDictionary()  # block output -> h after that block

    def carried(self, x: Tensor) -> Tensor | None:
        """``h`` after the block whose output is ``x`` (None before the first map)."""
        if torch.compiler.is_compiling():
            return self.h
        return self.stream.get(x, self.h)

    def carry(self, out: Tensor, last: bool, needed: bool) -> None:
        """Pass the current ``h`` on with the block output ``out`` (the last block drops it); ``needed``:
        a later block adds it, so a recomputation must find it."""
        if last:
            self.h = None
        elif needed and self._recomputed():
            self.stream[out] = self.h

    def _recomputed(self) -> bool:
        """Whether a block of this forward may run again in backward (timm's gradient checkpointing)."""
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return False
        return bool(getattr(self.owner, "grad_checkpointing", False))

    @property
    def dynamic(self) -> bool:
        return self.patch_embed is not None and not getattr(self.patch_embed, "strict_img_size", True)

    def record_image(self, module: nn.Module, args: tuple) -> None:
        self.size = tuple(int(s) for s in module.dynamic_feat_size(tuple(args[0].shape[-2:])))

    def grid(self) -> tuple[int, int]:
        if self.patch_embed is None:
            raise RuntimeError("dtl: the model has no patch_embed for the patch grid")
        if not self.dynamic:
            return tuple(int(s) for s in self.patch_embed.grid_size)
        if self.size is None:
            raise RuntimeError("dtl: the patch grid is unknown (the blocks ran without patch_embed)")
        return self.size


class DTLAdd(Delta):
    """What one block from ``M`` on adds to its output: ``F(swish_beta(h))``. The first of them owns
    DTL+'s shared conv (``fusion``); the others call it through a plain reference."""

    def __init__(self, side: _Side, beta: float, fusion: DTLFusion | None, owns_fusion: bool) -> None:
        super().__init__()
        object.__setattr__(self, "side", side)
        self.beta = beta
        if owns_fusion:
            self.fusion = fusion
        else:
            object.__setattr__(self, "fusion", fusion)  # shared: saved and counted once, at its owner

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        h = self.side.h
        if h is None:
            raise RuntimeError("dtl: the side output was added before any map ran (the blocks changed)")
        out = swish(h, self.beta)
        if self.fusion is not None:
            out = self.fusion(out, self.side.grid())
        return out


class DTLBlock(AdaptedModule):
    """A block with its side-network parts: ``parallel['dtl']`` (a :class:`DTLMap` of the block's input,
    summed into ``h`` before the block runs) and ``sequential['dtl']`` (a :class:`DTLAdd`, added to the
    block's output). ``first`` restarts ``h``; ``last`` drops it once used; ``feeds_add``: the next block
    adds ``F(h)``, so under gradient checkpointing this block's ``h`` is kept with its output."""

    def __init__(self, base: nn.Module, side: _Side, first: bool, last: bool, feeds_add: bool = True) -> None:
        super().__init__(base)
        object.__setattr__(self, "side", side)
        self.first, self.last = first, last
        self.feeds_add = feeds_add  # the next block adds F(h): a recomputation of it needs this h

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        side = self.side
        if "dtl" in self.parallel:
            update = self.parallel["dtl"](x, None)
            h = None if self.first else side.carried(x)
            side.h = update if h is None else h + update
        out = self.base(x, *args, **kwargs)
        if "dtl" in self.sequential:
            out = out + self.sequential["dtl"](out, None)
        side.carry(out, self.last, self.feeds_add)
        return out


def _check_tokens(model: nn.Module) -> None:
    drop = getattr(model, "patch_drop", None)
    if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
        raise ValueError(
            "dtl+ needs the full patch grid, but this model drops patch tokens (patch_drop_rate > 0); "
            "create it with patch_drop_rate=0"
        )


@register_method(
    "dtl", "DTL: a compact side network of low-rank maps added back to later blocks (not mergeable)"
)
class DTL(Method):
    """DTL / DTL+ (module docstring): ViT, RelPos, EVA and BEiT (one residual stream of one width)."""

    config_class = DTLConfig
    identity_at_init = True
    families = ("vit", "vit_relpos", "eva", "beit")
    unsupported_reason = "its side network is one stream of one width and token set across all blocks"

    def apply(self, model: nn.Module) -> None:
        cfg: DTLConfig = self.config
        blocks = iter_blocks(model)
        depth = len(blocks)
        add_from = depth // 2 if cfg.add_from is None else cfg.add_from
        if cfg.read_from >= depth or add_from >= depth:
            raise ValueError(
                f"dtl: read_from ({cfg.read_from}) and add_from ({add_from}) must be blocks of this "
                f"{depth}-block model (0..{depth - 1})"
            )
        if add_from < cfg.read_from:
            raise ValueError(f"dtl: add_from ({add_from}) must be >= read_from ({cfg.read_from})")
        dims = {info.dim for info in blocks}
        if len(dims) != 1:
            raise ValueError(f"dtl needs one width across the blocks, got {sorted(dims)}")
        (dim,) = dims
        fusion = None
        patch_embed = getattr(model, "patch_embed", None)
        side = _Side(patch_embed, model)
        if cfg.fusion_size:
            _check_tokens(model)
            fusion = DTLFusion(dim, cfg.fusion_size, int(getattr(model, "num_prefix_tokens", 0)))
        for site in module_sites(model, "block"):
            index = site.block.index
            if index < cfg.read_from:
                continue
            training = site.block.module.training
            first, last = index == cfg.read_from, index == depth - 1
            wrapper = DTLBlock(site.block.module, side, first, last, feeds_add=index + 1 >= add_from)
            wrapper.training = training  # not .train(): the block's own modules keep their modes
            wrapper.parallel["dtl"] = DTLMap(dim, cfg.rank)
            if index >= add_from:
                wrapper.sequential["dtl"] = DTLAdd(side, cfg.beta, fusion, owns_fusion=index == add_from)
            wrapper.parallel.train(training)
            wrapper.sequential.train(training)
            setattr(site.parent, site.attr, wrapper)
        if fusion is not None and side.dynamic:
            self.hooks.add_forward_pre_hook(patch_embed, side.record_image)
