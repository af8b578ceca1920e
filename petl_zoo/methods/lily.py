"""Lily: low-rank interconnected adaptation across layers (Zhong et al., 2024, arXiv:2407.09946).

Per adapted target ``t`` (default ``k``, ``v`` and ``mlp``), with input ``x`` of that target::

    h     = act(LP(x))                         # LP: Linear(d_in, r_t, bias=False), shared by a group of blocks
    p     = mean_tokens softmax(router(h))     # router: Linear(r_t, ne, bias=False), one per block
    HP_mix = sum_e p_e HP_e                    # HP: [ne, r_t, d_out] zeros, shared by ALL blocks
    delta = s * h @ HP_mix

- ``r_t = rank`` for ``q``/``k``/``v`` (identity ``act``) and ``2 * rank`` for ``mlp`` (``act = ReLU``).
- ``q``/``k``/``v``: added to that slice of the fused ``attn.qkv`` output (input ``norm1(x)``);
  ``mlp``: parallel to the ``Mlp`` module (input ``norm2(x)``), added to its output.
- LPs ("low-dim projectors"): a new one starts at every block index divisible by ``stride_lp``
  (default ``depth // num_experts`` as in the authors' code, at least 1), so consecutive blocks share it.
- HPs ("high-dim projectors", the experts): one zero-initialised tensor per target, registered (tied) in
  every block's module, so it is counted and saved once. The model is unchanged at initialisation.
- Router probabilities are averaged over all tokens (class token included), and with
  ``mixing='batch'`` (authors' default) also over the batch: one mixing vector per forward pass, so a
  prediction depends on the other images of its batch (the authors evaluate in batches of 256). With
  ``mixing='sample'`` each image gets its own mixing vector (``HP_mix`` is ``[B, r_t, d_out]``, applied
  with a batched matmul): predictions do not depend on batch composition.
- Swin: stages differ in width, so each stage has its own experts and LP groups (stride relative to
  the stage: ``max(1, stage_depth // num_experts)`` by default); routers are per block. Window
  attention sees ``[B * windows, N, C]``: ``sample`` mixing regroups the windows of each image (a
  forward pre-hook on the block records the image count), so it still averages over the whole image.
- Not mergeable: the mixing depends on the input.

VTAB-1K setting (authors' ViT code): ``rank=32, num_experts=4, scale=1`` on ``k, v, mlp``, trained with the
shared VTAB recipe (AdamW lr 1e-3, wd 1e-4, 100 epochs, 10 warmup, drop_path 0.1: no overrides), test
batches of 256 in order. Trainable parameters on ViT-B/16 (head excluded)::

    4*ne*r*768 (experts) + 4*n_LP*768*r (LPs) + 12*4*r*ne (routers),  n_LP = ceil(12 / stride_lp)

i.e. 792,576 for r=32, ne=4; 198,144 for r=8, ne=4; 272,256 for r=8, ne=5 (stride 2).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, positive
from ..layers import Delta, adapt_linear, adapt_module
from ..registry import Method, register_method
from ..targets import BlockInfo, check_targets, family_of, iter_blocks, linear_sites, module_sites

__all__ = ["LilyConfig", "LilyDelta", "Lily", "LILY_TARGETS", "lp_strides"]

LILY_TARGETS = ("q", "k", "v", "mlp")
ATTN_TARGETS = ("q", "k", "v")


@dataclass
class LilyConfig(MethodConfig):
    """Lily options. ``stride_lp=None`` means ``max(1, depth // num_experts)`` (per stage on Swin).

    ``rank`` is ``r`` (the mlp path uses ``2 * rank``), ``num_experts`` is ``ne``, ``scale`` is ``s``.
    """

    rank: int = positive(32)
    num_experts: int = positive(4)
    stride_lp: int | None = positive(None, hint="1..depth", none="depth // num_experts")
    scale: float = 1.0
    mixing: Literal["batch", "sample"] = "batch"
    targets: tuple[str, ...] = ("k", "v", "mlp")

    def validate(self) -> None:
        check_targets(self.targets, LILY_TARGETS, "lily")


class _ImageCount:
    """The batch size of the images entering a Swin block (its window attention sees B * windows)."""

    def __init__(self) -> None:
        self.value: int | None = None

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = int(args[0].shape[0])


class LilyDelta(Delta):
    """One block's Lily path: ``delta = s * h @ sum_e p_e HP_e`` with ``h = act(LP(x))`` and
    ``p = mean softmax(router(h))`` over tokens (``sample``) or over tokens and batch (``batch``).

    ``lp`` and ``experts`` are shared with other blocks (the same module / Parameter object); the router
    is this block's own. Attached to a qkv slice and in parallel with the Mlp; the frozen weight is
    unused. Input-dependent: not mergeable.
    """

    def __init__(
        self,
        lp: nn.Linear,
        experts: nn.Parameter,
        scale: float,
        mixing: str,
        relu: bool,
        images: _ImageCount | None = None,
    ) -> None:
        super().__init__()
        num_experts, rank, _ = experts.shape
        if lp.out_features != rank:
            raise ValueError(f"LP width {lp.out_features} does not match the experts' rank {rank}")
        self.lp = lp
        self.experts = experts
        self.router = nn.Linear(rank, num_experts, bias=False, device=experts.device)
        self.act = nn.ReLU() if relu else nn.Identity()
        self.scale = scale
        self.mixing = mixing
        self._images = images  # plain attribute: not a module, not saved

    def extra_repr(self) -> str:
        ne, rank, out = self.experts.shape
        return f"experts=[{ne}, {rank}, {out}] (shared), scale={self.scale}, mixing={self.mixing!r}"

    def mixing_weights(self, h: Tensor) -> Tensor:
        """Expert weights ``p``: ``[ne]`` (batch mixing) or ``[G, ne]`` (one row per image)."""
        probs = F.softmax(self.router(h), dim=-1)
        ne = probs.shape[-1]
        if self.mixing == "batch":
            return probs.reshape(-1, ne).mean(0)
        return probs.reshape(self._groups(h), -1, ne).mean(1)

    def _groups(self, h: Tensor) -> int:
        """Number of images in ``h``: its leading dim, or the recorded image count for Swin windows."""
        if h.dim() < 3:
            return 1
        leading = h.shape[0]
        images = self._images.value if self._images is not None else None
        if images and leading % images == 0:
            return images  # Swin [B * windows, N, r]: the windows of one image are contiguous
        return leading

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        h = self.act(self.lp(x))
        p = self.mixing_weights(h)
        if p.dim() == 1:
            mixed = torch.einsum("e,erd->rd", p, self.experts)
            out = torch.matmul(h, mixed)
        else:
            groups, rank = p.shape[0], h.shape[-1]
            mixed = torch.einsum("ge,erd->grd", p, self.experts)
            out = torch.bmm(h.reshape(groups, -1, rank), mixed).reshape(*h.shape[:-1], mixed.shape[-1])
        return out * self.scale


def lp_strides(model: nn.Module, num_experts: int, stride_lp: int | None) -> dict[int, int]:
    """LP stride per stage (ViT: one stage). Default ``max(1, depth // num_experts)`` per stage; an
    explicit stride must lie in ``1..depth`` (Swin: the deepest stage) and applies within each stage."""
    depths: dict[int, int] = defaultdict(int)
    for info in iter_blocks(model):
        depths[info.stage] += 1
    if stride_lp is None:
        return {stage: max(1, depth // num_experts) for stage, depth in depths.items()}
    deepest = max(depths.values())
    if not 1 <= stride_lp <= deepest:
        where = "blocks" if len(depths) == 1 else "blocks in its deepest stage"
        raise ValueError(
            f"stride_lp must be in 1..{deepest} (the model has {deepest} {where}), got {stride_lp}"
        )
    return dict.fromkeys(depths, stride_lp)


@register_method(
    "lily",
    "Lily: per-group low-dim projectors, model-wide expert projectors mixed by per-block routers (k, v, mlp)",
)
class Lily(Method):
    config_class = LilyConfig
    identity_at_init = True
    recipe: dict[str, Any] = {}  # the authors train with the shared VTAB recipe

    def apply(self, model: nn.Module) -> None:
        cfg: LilyConfig = self.config
        strides = lp_strides(model, cfg.num_experts, cfg.stride_lp)
        swin_windows = family_of(model).windowed and cfg.mixing == "sample"
        counters: dict[int, _ImageCount] = {}
        if swin_windows and any(t in ATTN_TARGETS for t in cfg.targets):
            for info in iter_blocks(model):
                counters[info.index] = counter = _ImageCount()
                self.hooks.add_forward_pre_hook(info.module, counter.hook)
        for target in cfg.targets:
            is_mlp = target == "mlp"
            rank = 2 * cfg.rank if is_mlp else cfg.rank
            sites = module_sites(model, "mlp") if is_mlp else linear_sites(model, target)
            experts: dict[int, nn.Parameter] = {}
            lp: nn.Linear | None = None
            for site in sites:
                info: BlockInfo = site.block
                device = _device_of(site.module if is_mlp else site.linear)
                if info.stage not in experts:
                    experts[info.stage] = nn.Parameter(
                        torch.zeros(cfg.num_experts, rank, site.out_features, device=device)
                    )
                if info.index_in_stage % strides[info.stage] == 0:
                    lp = nn.Linear(site.in_features, rank, bias=False, device=device)
                assert lp is not None  # index_in_stage 0 always starts a group
                images = None if is_mlp else counters.get(info.index)
                delta = LilyDelta(lp, experts[info.stage], cfg.scale, cfg.mixing, relu=is_mlp, images=images)
                if is_mlp:
                    adapt_module(site).parallel["lily"] = delta
                else:
                    adapt_linear(site).add_delta(f"lily_{target}", delta, site.start, site.stop)


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
