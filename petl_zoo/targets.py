"""Map logical target names (``q``, ``v``, ``fc1``, ``mlp`` ...) to places in a timm ViT or Swin model.

Linear targets name an ``nn.Linear`` and an output slice of it (``q``/``k``/``v`` are slices of the
fused ``attn.qkv``); module targets name a whole sub-module (``mlp``, ``attn``, ``block``). Methods
attach to these places through :mod:`petl_zoo.layers` without rewriting timm's forwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "LINEAR_TARGETS",
    "MODULE_TARGETS",
    "ALL_TARGETS",
    "BlockInfo",
    "LinearSite",
    "ModuleSite",
    "model_family",
    "iter_blocks",
    "linear_sites",
    "module_sites",
    "check_targets",
]

LINEAR_TARGETS = ("q", "k", "v", "qkv", "proj", "fc1", "fc2")
MODULE_TARGETS = ("mlp", "attn", "block")
ALL_TARGETS = LINEAR_TARGETS + MODULE_TARGETS


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block: its global index, stage (0 for ViT) and attention geometry."""

    index: int  # global index over the whole model, 0..num_blocks-1
    stage: int  # Swin stage (ViT: 0)
    index_in_stage: int
    path: str  # dotted module path, e.g. 'blocks.3' or 'layers.1.blocks.0'
    module: nn.Module
    dim: int  # width of the residual stream
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class LinearSite:
    """An output slice ``[start, stop)`` of a Linear layer inside one block."""

    block: BlockInfo
    target: str
    path: str  # dotted path of the Linear, e.g. 'blocks.3.attn.qkv'
    parent: nn.Module
    attr: str
    start: int
    stop: int

    @property
    def linear(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        """Width of the slice (not of the whole Linear)."""
        return self.stop - self.start


@dataclass(frozen=True)
class ModuleSite:
    """A whole sub-module of a block (``mlp``, ``attn`` or the block itself)."""

    block: BlockInfo
    target: str
    path: str
    parent: nn.Module
    attr: str
    in_features: int
    out_features: int

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)


def model_family(model: nn.Module) -> str:
    """'vit' for timm VisionTransformer-like models, 'swin' for SwinTransformer; else a ValueError."""
    name = type(model).__name__
    if hasattr(model, "layers") and name.startswith("SwinTransformer") and "V2" not in name:
        return "swin"
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks) and _has_attn_mlp(blocks[0]):
        return "vit"
    raise ValueError(
        f"unsupported architecture {name}: petl_zoo supports timm VisionTransformer "
        "(vit_*) and SwinTransformer (swin_*_patch4_window7_224 etc.)"
    )


def _has_attn_mlp(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return attn is not None and hasattr(attn, "qkv") and hasattr(block, "mlp")


def _unwrap(module: nn.Module) -> nn.Module:
    """The timm module inside a petl_zoo wrapper (wrappers keep the original as ``base``)."""
    while getattr(module, "_petl_wrapper", False):
        module = module.base
    return module


def iter_blocks(model: nn.Module) -> list[BlockInfo]:
    """All transformer blocks of a supported model, in forward order."""
    family = model_family(model)
    if family == "vit":
        groups = [("blocks", list(model.blocks))]
    else:
        groups = [(f"layers.{s}.blocks", list(stage.blocks)) for s, stage in enumerate(model.layers)]
    infos = []
    for stage, (prefix, blocks) in enumerate(groups):
        for j, block in enumerate(blocks):
            block = _unwrap(block)
            attn = _unwrap(block.attn)
            qkv = _unwrap(attn.qkv)
            num_heads = int(attn.num_heads)
            head_dim = qkv.out_features // 3 // num_heads
            infos.append(
                BlockInfo(
                    index=len(infos),
                    stage=stage,
                    index_in_stage=j,
                    path=f"{prefix}.{j}",
                    module=block,
                    dim=qkv.in_features,
                    num_heads=num_heads,
                    head_dim=head_dim,
                )
            )
    return infos


def check_targets(targets: Iterable[str], allowed: Iterable[str], method: str = "") -> tuple[str, ...]:
    """Validate target names; a ValueError names the bad one and the valid ones."""
    allowed = tuple(allowed)
    targets = tuple(targets)
    label = f" for method '{method}'" if method else ""
    if not targets:
        raise ValueError(f"no targets given{label}; valid targets: {', '.join(allowed)}")
    for t in targets:
        if t not in allowed:
            raise ValueError(f"unknown target {t!r}{label}; valid targets: {', '.join(allowed)}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"duplicate targets {targets}{label}")
    return targets


def linear_sites(model: nn.Module, target: str, blocks: Iterable[int] | None = None) -> list[LinearSite]:
    """The Linear output slices named by ``target`` in every block (or the given block indices)."""
    check_targets([target], LINEAR_TARGETS)
    chosen = None if blocks is None else set(blocks)
    sites = []
    for info in iter_blocks(model):
        if chosen is not None and info.index not in chosen:
            continue
        block = info.module
        attn = _unwrap(block.attn)
        if target in ("q", "k", "v", "qkv", "proj"):
            parent, attr, parent_path = attn, ("proj" if target == "proj" else "qkv"), f"{info.path}.attn"
        else:
            mlp = _unwrap(block.mlp)
            parent, attr, parent_path = mlp, target, f"{info.path}.mlp"
            if not hasattr(mlp, attr):
                raise ValueError(
                    f"target {target!r} is missing in {type(mlp).__name__} of block {info.path} "
                    f"(model {type(model).__name__})"
                )
        linear = _unwrap(getattr(parent, attr))
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"target {target!r} of block {info.path} is a {type(linear).__name__}, not an nn.Linear"
            )
        width = linear.out_features
        if target in ("q", "k", "v"):
            part = width // 3
            start = "qkv".index(target) * part
            stop = start + part
        else:
            start, stop = 0, width
        sites.append(LinearSite(info, target, f"{parent_path}.{attr}", parent, attr, start, stop))
    return sites


def module_sites(model: nn.Module, target: str, blocks: Iterable[int] | None = None) -> list[ModuleSite]:
    """The sub-modules named by ``target`` (``mlp``, ``attn`` or ``block``) in every block."""
    check_targets([target], MODULE_TARGETS)
    chosen = None if blocks is None else set(blocks)
    family = model_family(model)
    sites = []
    for info in iter_blocks(model):
        if chosen is not None and info.index not in chosen:
            continue
        if target == "block":
            stage_parent = model.blocks if family == "vit" else model.layers[info.stage].blocks
            parent, attr, path = stage_parent, str(info.index_in_stage), info.path
            dim = info.dim
        else:
            parent, attr, path = info.module, target, f"{info.path}.{target}"
            dim = info.dim
        sites.append(ModuleSite(info, target, path, parent, attr, dim, dim))
    return sites
