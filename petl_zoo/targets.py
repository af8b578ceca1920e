"""Map logical target names (``q``, ``v``, ``fc1``, ``mlp`` ...) to places in a timm ViT or Swin model.

Every supported timm model class has a registered :class:`HostFamily`: a small declarative entry saying
where its blocks are (one sequence, or one per stage for hierarchical models), what its blocks call
their attention, MLP and norms, and what is special about it. The attention's and MLP's layout is read
from the modules themselves: a fused ``qkv`` Linear (``q``/``k``/``v`` are output slices of it) or
separate ``q_proj``/``k_proj``/``v_proj`` (Eva with ``qkv_fused=False``); ``fc1``/``fc2``, or SwiGLU's
``fc1_g``/``fc1_x``/``fc2`` (``fc1`` then names both input projections). Third parties register a
family the way they register a method (:func:`register_family`).

Linear targets name an ``nn.Linear`` and an output slice of it; module targets name a whole sub-module
(``mlp``, ``attn``, ``block``). Methods attach to these places through :mod:`petl_zoo.layers` without
rewriting timm's forwards.

Attentions that bypass ``qkv.forward``: Eva, BEiT and SwinV2 keep separate ``q_bias``/``v_bias`` and
compute ``F.linear(x, qkv.weight, cat(q_bias, 0, v_bias))`` themselves, so a wrapper on ``qkv`` would
never run. Their :class:`LinearSite` carries a ``before_adapt`` step that moves those biases into
``qkv``'s own (frozen) bias and sets the separate ones to None, which makes the forward call
``self.qkv(x)``: the same ``F.linear`` with the same values, so the output is bit-identical.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "LINEAR_TARGETS",
    "MODULE_TARGETS",
    "ALL_TARGETS",
    "HostFamily",
    "BlockInfo",
    "LinearSite",
    "ModuleSite",
    "register_family",
    "list_families",
    "family_of",
    "model_family",
    "iter_blocks",
    "linear_sites",
    "module_sites",
    "check_targets",
    "classifier_modules",
    "fold_qkv_bias",
    "unfold_qkv_bias",
]

LINEAR_TARGETS = ("q", "k", "v", "qkv", "proj", "fc1", "fc2")
MODULE_TARGETS = ("mlp", "attn", "block")
ALL_TARGETS = LINEAR_TARGETS + MODULE_TARGETS


@dataclass(frozen=True)
class HostFamily:
    """How petl_zoo finds its way around one family of timm models.

    ``classes`` are ``"module:ClassName"`` strings of timm model classes, matched with ``isinstance``
    (imported on first use). ``stages`` gives the dotted paths of the block containers (one for plain
    ViTs, one per stage for hierarchical models). ``windowed`` marks window attention (a Swin block's
    attention sees windows, not images).
    """

    name: str
    classes: tuple[str, ...]
    stages: Callable[[nn.Module], list[str]]
    examples: tuple[str, ...] = ()
    notes: str = ""
    hierarchical: bool = False
    windowed: bool = False
    attn: str = "attn"
    mlp: str = "mlp"
    norms: tuple[str, str] = ("norm1", "norm2")
    post_norm: bool = False  # the norms follow the sub-layer (SwinV2's res-post-norm) instead of preceding it
    block_types: tuple[str, ...] = field(default=())  # block class names this entry was written for

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_classes())

    def model_classes(self) -> tuple[type, ...]:
        found = []
        for spec in self.classes:
            module, _, name = spec.partition(":")
            try:
                found.append(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError):  # an older timm without this family
                continue
        return tuple(found)


_FAMILIES: dict[str, HostFamily] = {}


def register_family(family: HostFamily) -> HostFamily:
    """Add a host family (the first registered entry that matches a model wins; built-ins come last)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"a host family named {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def list_families() -> list[HostFamily]:
    """Registered families, third-party ones first (the order :func:`family_of` tries them)."""
    builtin = [f for f in _FAMILIES.values() if f.name in _BUILTIN]
    return [f for f in _FAMILIES.values() if f.name not in _BUILTIN] + builtin


def family_of(model: nn.Module) -> HostFamily:
    """The model's host family; a ValueError naming its class and the supported families otherwise."""
    for family in list_families():
        if family.matches(model):
            _check_blocks(model, family)
            return family
    supported = ", ".join(
        f"{f.name} ({', '.join(c.rpartition(':')[2] for c in f.classes)})" for f in list_families()
    )
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: petl_zoo supports the timm families {supported}"
    )


def model_family(model: nn.Module) -> str:
    """The name of the model's host family (``'vit'``, ``'eva'``, ``'swin'`` ...)."""
    return family_of(model).name


def _blocks_at(model: nn.Module, path: str) -> list[nn.Module]:
    return list(model.get_submodule(path))


def _check_blocks(model: nn.Module, family: HostFamily) -> None:
    for path in family.stages(model):
        for block in _blocks_at(model, path):
            block = _unwrap(block)
            if not (hasattr(block, family.attn) and hasattr(block, family.mlp)):
                raise ValueError(
                    f"unsupported block {type(block).__name__} in {type(model).__name__} ({path}): petl_zoo "
                    f"supports blocks with one '{family.attn}' and one '{family.mlp}' (e.g. "
                    f"{', '.join(family.block_types) or 'timm Block'}), not parallel or other block types"
                )


def _unwrap(module: nn.Module) -> nn.Module:
    """The timm module inside a petl_zoo wrapper (wrappers keep the original as ``base``)."""
    while getattr(module, "_petl_wrapper", False):
        module = module.base
    return module


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block: its global index, stage (0 for ViT) and attention geometry."""

    index: int  # global index over the whole model, 0..num_blocks-1
    stage: int  # stage of a hierarchical model (ViT: 0)
    index_in_stage: int
    path: str  # dotted module path, e.g. 'blocks.3' or 'layers.1.blocks.0'
    module: nn.Module
    dim: int  # width of the residual stream
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class LinearSite:
    """An output slice ``[start, stop)`` of a Linear layer inside one block.

    ``before_adapt`` (when set) must run before a wrapper replaces the Linear: it makes the host's
    forward call the Linear's own forward (see the module docstring)."""

    block: BlockInfo
    target: str
    path: str  # dotted path of the Linear, e.g. 'blocks.3.attn.qkv'
    parent: nn.Module
    attr: str
    start: int
    stop: int
    before_adapt: Callable[[], None] | None = None

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


def _query_linear(attn: nn.Module) -> nn.Linear:
    """The Linear giving the queries: fused ``qkv`` or ``q_proj``."""
    for name in ("qkv", "q_proj"):
        layer = getattr(attn, name, None)
        if layer is not None:
            return _unwrap(layer)
    raise ValueError(
        f"attention {type(attn).__name__} has neither a fused 'qkv' nor 'q_proj'/'k_proj'/'v_proj'"
    )


def iter_blocks(model: nn.Module) -> list[BlockInfo]:
    """All transformer blocks of a supported model, in forward order."""
    family = family_of(model)
    infos: list[BlockInfo] = []
    for stage, prefix in enumerate(family.stages(model)):
        for j, block in enumerate(_blocks_at(model, prefix)):
            block = _unwrap(block)
            attn = _unwrap(getattr(block, family.attn))
            query = _query_linear(attn)
            num_heads = int(attn.num_heads)
            width = query.out_features // (3 if getattr(attn, "qkv", None) is not None else 1)
            infos.append(
                BlockInfo(
                    index=len(infos),
                    stage=stage,
                    index_in_stage=j,
                    path=f"{prefix}.{j}",
                    module=block,
                    dim=query.in_features,
                    num_heads=num_heads,
                    head_dim=width // num_heads,
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
            close = difflib.get_close_matches(str(t), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown target {t!r}{label}{hint}; valid targets: {', '.join(allowed)}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"duplicate targets {targets}{label}")
    return targets


@torch.no_grad()
def fold_qkv_bias(attn: nn.Module) -> None:
    """Move an attention's separate ``q_bias``/``k_bias``/``v_bias`` into its fused ``qkv`` Linear's bias.

    Eva, BEiT and SwinV2 compute ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))`` when
    ``q_bias`` is set, bypassing ``qkv.forward``; with the biases in ``qkv.bias`` and ``q_bias`` None
    they call ``self.qkv(x)``, the same ``F.linear`` on the same values. A no-op when there is nothing
    to fold (or the model adds the bias after calling ``qkv`` anyway: ``qkv_bias_separate``).
    """
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is None or getattr(attn, "qkv_bias_separate", False):
        return
    qkv = _unwrap(attn.qkv)
    if qkv.bias is not None:
        raise ValueError(f"{type(attn).__name__} has both qkv.bias and q_bias: cannot fold")
    v_bias = attn.v_bias
    k_bias = getattr(attn, "k_bias", None)
    if "k_bias" in attn._parameters:
        k_kind = "parameter"
    elif "k_bias" in attn._buffers:
        k_kind = "buffer" if "k_bias" not in attn._non_persistent_buffers_set else "non-persistent buffer"
    else:
        k_kind = "none"
    k_bias = torch.zeros_like(q_bias) if k_bias is None else k_bias
    bias = torch.cat((q_bias.detach(), k_bias.detach().to(q_bias), v_bias.detach()))
    qkv.bias = nn.Parameter(bias, requires_grad=q_bias.requires_grad)
    attn.q_bias = None
    attn.v_bias = None
    if k_kind != "none":
        attn.k_bias = None
    attn._petl_folded_k_bias = k_kind  # how to give the biases back (unfold_qkv_bias)


@torch.no_grad()
def unfold_qkv_bias(attn: nn.Module) -> None:
    """Undo :func:`fold_qkv_bias` (the biases are never trained there, so exactly): ``q_bias``,
    ``k_bias`` and ``v_bias`` as the host had them, ``qkv.bias`` None. A no-op for other modules."""
    k_kind = vars(attn).pop("_petl_folded_k_bias", None)
    if k_kind is None:
        return
    qkv = _unwrap(attn.qkv)
    q_bias, k_bias, v_bias = (t.clone() for t in qkv.bias.detach().chunk(3))
    grad = qkv.bias.requires_grad
    qkv.register_parameter("bias", None)
    attn.q_bias = nn.Parameter(q_bias, requires_grad=grad)
    attn.v_bias = nn.Parameter(v_bias, requires_grad=grad)
    if k_kind == "parameter":
        attn.k_bias = nn.Parameter(k_bias, requires_grad=grad)
    elif k_kind != "none":
        attn.register_buffer("k_bias", k_bias, persistent=k_kind == "buffer")


def _attention_linear(attn: nn.Module, target: str, info: BlockInfo) -> tuple[str, int, int]:
    """(attribute, start, stop) of a q/k/v/qkv/proj target in this attention."""
    if target == "proj":
        return "proj", 0, _unwrap(attn.proj).out_features
    if getattr(attn, "qkv", None) is not None:
        width = _unwrap(attn.qkv).out_features
        if target == "qkv":
            return "qkv", 0, width
        part = width // 3
        start = "qkv".index(target) * part
        return "qkv", start, start + part
    if target == "qkv":
        raise ValueError(
            f"target 'qkv' needs a fused qkv Linear; {type(attn).__name__} of block {info.path} has separate "
            "q_proj/k_proj/v_proj: use the targets q, k, v"
        )
    name = f"{target}_proj"
    return name, 0, _unwrap(getattr(attn, name)).out_features


def _mlp_linears(mlp: nn.Module, target: str, info: BlockInfo) -> list[str]:
    """The MLP's Linear attribute(s) for fc1/fc2: SwiGLU's ``fc1_g`` and ``fc1_x`` are both ``fc1``."""
    if target == "fc1" and not hasattr(mlp, "fc1") and hasattr(mlp, "fc1_g"):
        return ["fc1_g", "fc1_x"]
    if not hasattr(mlp, target):
        raise ValueError(f"target {target!r} is missing in {type(mlp).__name__} of block {info.path}")
    return [target]


def linear_sites(model: nn.Module, target: str, blocks: Iterable[int] | None = None) -> list[LinearSite]:
    """The Linear output slices named by ``target`` in every block (or the given block indices)."""
    check_targets([target], LINEAR_TARGETS)
    family = family_of(model)
    chosen = None if blocks is None else set(blocks)
    sites = []
    for info in iter_blocks(model):
        if chosen is not None and info.index not in chosen:
            continue
        block = info.module
        if target in ("q", "k", "v", "qkv", "proj"):
            parent = _unwrap(getattr(block, family.attn))
            attr, start, stop = _attention_linear(parent, target, info)
            found = [(parent, attr, f"{info.path}.{family.attn}", start, stop)]
        else:
            parent = _unwrap(getattr(block, family.mlp))
            found = [
                (parent, attr, f"{info.path}.{family.mlp}", 0, _unwrap(getattr(parent, attr)).out_features)
                for attr in _mlp_linears(parent, target, info)
            ]
        for parent, attr, parent_path, start, stop in found:
            linear = _unwrap(getattr(parent, attr))
            if not isinstance(linear, nn.Linear):
                raise ValueError(
                    f"target {target!r} of block {info.path} is a {type(linear).__name__}, not an nn.Linear"
                )
            prepare = (
                (lambda a=parent: fold_qkv_bias(a))
                if attr == "qkv" and getattr(parent, "q_bias", None) is not None
                else None
            )
            sites.append(
                LinearSite(info, target, f"{parent_path}.{attr}", parent, attr, start, stop, prepare)
            )
    return sites


def module_sites(model: nn.Module, target: str, blocks: Iterable[int] | None = None) -> list[ModuleSite]:
    """The sub-modules named by ``target`` (``mlp``, ``attn`` or ``block``) in every block."""
    check_targets([target], MODULE_TARGETS)
    family = family_of(model)
    stage_paths = family.stages(model)
    chosen = None if blocks is None else set(blocks)
    sites = []
    for info in iter_blocks(model):
        if chosen is not None and info.index not in chosen:
            continue
        if target == "block":
            parent, attr, path = (
                model.get_submodule(stage_paths[info.stage]),
                str(info.index_in_stage),
                info.path,
            )
        else:
            attr = family.attn if target == "attn" else family.mlp
            parent, path = info.module, f"{info.path}.{attr}"
        sites.append(ModuleSite(info, target, path, parent, attr, info.dim, info.dim))
    return sites


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """Every classifier head of the model: ``head``, and ``head_dist`` for distilled DeiT (whose forward
    averages the two heads, in training as in evaluation)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, nn.Module)]


# --------------------------------------------------------------------------------------- the families
def _one(path: str) -> Callable[[nn.Module], list[str]]:
    return lambda model: [path]


def _per_stage(container: str) -> Callable[[nn.Module], list[str]]:
    return lambda model: [f"{container}.{i}.blocks" for i in range(len(model.get_submodule(container)))]


_VIT = "timm.models.vision_transformer"
_BUILTIN_FAMILIES = (
    HostFamily(
        "vit",
        (f"{_VIT}:VisionTransformer",),
        _one("blocks"),
        examples=(
            "vit_base_patch16_224",
            "vit_base_patch16_clip_224",
            "vit_small_patch14_reg4_dinov2",
            "deit3_base_patch16_224",
            "deit_base_distilled_patch16_224",
            "vit_base_patch16_siglip_224",
            "flexivit_base",
        ),
        notes="plain ViT, CLIP, DINOv2 (+ registers), DeiT(-III, layer scale), SigLIP (attention-pool head: "
        "frozen backbone), gap/fc_norm, FlexiViT; distilled DeiT trains and stores both heads",
        block_types=("Block", "ResPostBlock"),
    ),
    HostFamily(
        "vit_relpos",
        ("timm.models.vision_transformer_relpos:VisionTransformerRelPos",),
        _one("blocks"),
        examples=("vit_relpos_base_patch16_224", "vit_srelpos_medium_patch16_224"),
        notes="relative-position ViT",
        block_types=("RelPosBlock", "ResPostRelPosBlock"),
    ),
    HostFamily(
        "eva",
        ("timm.models.eva:Eva",),
        _one("blocks"),
        examples=("eva02_base_patch14_224", "eva02_tiny_patch14_224", "vit_base_patch16_rope_reg1_gap_256"),
        notes="EVA-02 and the vit_*_rope_* models: separate q/v biases folded into qkv on attach; "
        "qkv_fused=False gives q_proj/k_proj/v_proj; SwiGLU fc1 = fc1_g and fc1_x",
        block_types=("EvaBlock", "EvaBlockPostNorm"),
    ),
    HostFamily(
        "beit",
        ("timm.models.beit:Beit",),
        _one("blocks"),
        examples=("beit_base_patch16_224", "beitv2_base_patch16_224"),
        notes="BEiT / BEiT v2: separate q/v biases folded into qkv on attach",
        block_types=("Block",),
    ),
    HostFamily(
        "swin",
        ("timm.models.swin_transformer:SwinTransformer",),
        _per_stage("layers"),
        examples=("swin_base_patch4_window7_224", "swin_tiny_patch4_window7_224"),
        notes="hierarchical: stages of different width and head count",
        hierarchical=True,
        windowed=True,
        block_types=("SwinTransformerBlock",),
    ),
    HostFamily(
        "swinv2",
        ("timm.models.swin_transformer_v2:SwinTransformerV2",),
        _per_stage("layers"),
        examples=("swinv2_tiny_window8_256", "swinv2_base_window12_192"),
        notes="res-post-norm, cosine attention; separate q/v biases folded into qkv on attach",
        hierarchical=True,
        windowed=True,
        post_norm=True,
        block_types=("SwinTransformerV2Block",),
    ),
    HostFamily(
        "swinv2_cr",
        ("timm.models.swin_transformer_v2_cr:SwinTransformerV2Cr",),
        _per_stage("stages"),
        examples=("swinv2_cr_tiny_224", "swinv2_cr_small_ns_224"),
        notes="SwinV2 (Christoph Reich's implementation): res-post-norm, fused qkv with bias",
        hierarchical=True,
        windowed=True,
        post_norm=True,
        block_types=("SwinTransformerV2CrBlock",),
    ),
)
_BUILTIN = {f.name for f in _BUILTIN_FAMILIES}
for _family in _BUILTIN_FAMILIES:
    register_family(_family)
