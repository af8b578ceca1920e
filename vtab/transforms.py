"""Image transforms resolved from a timm model: the model's own config, or unnormalised inputs (``vtab``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

#: ``default``: the backbone's own mean/std (timm's pretrained config); ``vtab``: unnormalised [0, 1]
#: inputs (Lily, Binary Adapter, OSU's study); ``imagenet``: ImageNet mean/std whatever the backbone (the
#: VPT, FacT, Convpass, RepAdapter and NOAH code, which feed it to in21k ViTs pretrained at 0.5/0.5).
PROTOCOLS = ("default", "vtab", "imagenet")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Train-time augmentation behind augment=True (off by default, as in the papers).
AUGMENT_SCALE = (0.8, 1.0)

#: How an image becomes the model's input size, per benchmark recipe:
#: ``none``: resize to exactly (H, W) (VTAB-1K's images, the field's practice); with ``augment`` a
#: RandomResizedCrop(scale 0.8-1) + flip instead.
#: ``center``: VPT's FGVC transform (``src/data/transforms.py``): the shorter side to 256/224 of the input
#: (256 for 224), then a random crop of (H, W) + flip for training, the center crop for evaluation.
#: ``random_resized``: the NEAT / FourierFT suite's (their ``main.py``/``exec.py``): RandomResizedCrop
#: (torchvision's default scale 0.08-1) + flip for training, the shorter side to the input size then its
#: center crop for evaluation.
#: The two crop forms interpolate bilinearly, torchvision's default that both codebases use.
CROPS = ("none", "center", "random_resized")
CROP_RESIZE = 256 / 224  # VPT: Resize(256) before a 224 crop (438 for 384, 512 for 448)

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


def _resolve_data_config(module: torch.nn.Module) -> dict[str, Any]:
    import timm.data  # imported on use: timm is slow to import and vtab.prepare does not need it

    return timm.data.resolve_model_data_config(module)


def _timm_module(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, or the first submodule that looks like a timm model (has ``patch_embed`` or
    ``pretrained_cfg``), so wrappers (DDP, torch.compile, a user's ``nn.Module`` holding the
    backbone) resolve to the backbone's config."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"Expected a torch.nn.Module (e.g. a timm ViT or Swin), got {type(model).__name__}.")
    for module in model.modules():
        if hasattr(module, "patch_embed") or getattr(module, "pretrained_cfg", None):
            return module
    return model


def input_size(model: torch.nn.Module) -> tuple[int, int]:
    """The model's real input size (H, W): ``patch_embed.img_size`` for ViT and Swin (timm's data
    config keeps 224 for a ViT built with ``img_size=32``), else timm's resolved config."""
    module = _timm_module(model)
    patch_embed = getattr(module, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        size = _resolve_data_config(module)["input_size"][-2:]
    if isinstance(size, int):
        size = (size, size)
    return int(size[0]), int(size[1])


def transform_config(model: torch.nn.Module, protocol: str = "default") -> dict[str, Any]:
    """What :func:`build_transform` uses: ``input_size`` (H, W), ``interpolation`` and ``mean``/``std``
    (None for the unnormalised ``vtab`` protocol)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; valid: {', '.join(map(repr, PROTOCOLS))}.")
    size = input_size(model)
    if protocol == "vtab":
        return {"input_size": size, "interpolation": "bicubic", "mean": None, "std": None}
    cfg = _resolve_data_config(_timm_module(model))
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"Model config asks for interpolation {interpolation!r}; supported: {', '.join(_INTERPOLATIONS)}."
        )
    mean, std = (_IMAGENET_MEAN, _IMAGENET_STD) if protocol == "imagenet" else (cfg["mean"], cfg["std"])
    return {
        "input_size": size,
        "interpolation": interpolation,
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
    }


def build_transform(
    model: torch.nn.Module, protocol: str = "default", augment: bool = False, crop: str = "none"
) -> Callable:
    """PIL RGB image -> float tensor (3, H, W) at the model's real input size.

    ``default``: resize to exactly (H, W) with the model config's interpolation, ToTensor,
    Normalize(mean, std) from ``timm.data.resolve_model_data_config``.
    ``imagenet``: as ``default`` with ImageNet's mean/std instead of the model config's.
    ``vtab``: unnormalised inputs, the Lily / Binary-Adapter convention: bicubic resize to (H, W),
    ToTensor, no normalisation (VPT, SSF, FacT, Convpass, RepAdapter and NOAH normalise).
    ``augment=True`` (train time only; it changes the meaning of position/orientation labels) makes the
    ``crop`` form's random version: with ``crop="none"`` a RandomResizedCrop(scale 0.8-1.0) plus a
    random horizontal flip replaces the resize; ``center`` and ``random_resized`` see :data:`CROPS`.
    """
    if crop not in CROPS:
        raise ValueError(f"Unknown crop {crop!r}; valid: {', '.join(map(repr, CROPS))}.")
    cfg = transform_config(model, protocol)
    size = cfg["input_size"]
    ops = _geometry(size, _INTERPOLATIONS[cfg["interpolation"]], augment, crop)
    ops.append(T.ToTensor())
    if cfg["mean"] is not None:
        ops.append(T.Normalize(cfg["mean"], cfg["std"]))
    return T.Compose(ops)


def _geometry(size: tuple[int, int], interpolation: InterpolationMode, augment: bool, crop: str) -> list:
    """The resize / crop / flip steps of :func:`build_transform`."""
    bilinear = InterpolationMode.BILINEAR
    if crop == "center":
        shorter = int(min(size) * CROP_RESIZE)
        picked = T.RandomCrop(size) if augment else T.CenterCrop(size)
        return [T.Resize(shorter, interpolation=bilinear), picked] + (
            [T.RandomHorizontalFlip()] if augment else []
        )
    if crop == "random_resized":
        if augment:
            return [T.RandomResizedCrop(size, interpolation=bilinear), T.RandomHorizontalFlip()]
        return [T.Resize(min(size), interpolation=bilinear), T.CenterCrop(size)]
    if augment:
        return [
            T.RandomResizedCrop(size, scale=AUGMENT_SCALE, interpolation=interpolation),
            T.RandomHorizontalFlip(),
        ]
    return [T.Resize(size, interpolation=interpolation)]
