"""Shared tiny models and helpers for the test suite (depth 2, small widths, 32x32 inputs)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import petl_zoo

if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite runs on 2 workers (pyproject addopts): one thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: a tiny model's ops gain nothing from more, and on a busy
    machine their synchronisation costs seconds a test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(num_classes: int = 5, **kwargs) -> torch.nn.Module:
    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=num_classes)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args)


def tiny_swin(num_classes: int = 5, **kwargs) -> torch.nn.Module:
    args = dict(
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=num_classes,
        drop_path_rate=0.0,
    )
    args.update(kwargs)
    return timm.create_model("swin_tiny_patch4_window7_224", **args)


BUILDERS = {"vit": tiny_vit, "swin": tiny_swin}

_V = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
_S = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))
#: A tiny instance of every supported host family and ViT variant: name -> (timm model, kwargs).
HOSTS: dict[str, tuple[str, dict]] = {
    "vit": ("vit_tiny_patch16_224", _V),
    "clip": ("vit_base_patch16_clip_224", _V),  # pre-norm, QuickGELU-free CLIP ViT
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(_V, init_values=0.1)),  # registers, layer scale
    "deit3": ("deit3_small_patch16_224", dict(_V, init_values=0.1)),  # layer scale (not ~0: a visible signal)
    "siglip": ("vit_base_patch16_siglip_224", _V),  # attention-pool head
    "gap": ("vit_medium_patch16_gap_256", _V),  # average pool, fc_norm
    "flexivit": ("flexivit_small", _V),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", _V),  # two heads
    "relpos": ("vit_relpos_small_patch16_224", _V),
    "eva02": ("eva02_tiny_patch14_224", dict(_V, patch_size=8)),  # q/v biases outside qkv, rope, GluMlp
    "eva_sep": ("eva02_tiny_patch14_224", dict(_V, patch_size=8, qkv_fused=False)),  # q_proj/k_proj/v_proj
    "beit": ("beit_base_patch16_224", _V),  # q/v biases outside qkv, relative position bias
    "swin": ("swin_tiny_patch4_window7_224", _S),
    "swinv2": ("swinv2_tiny_window8_256", _S),  # res-post-norm, q/v biases outside qkv
    "swinv2_cr": ("swinv2_cr_tiny_224", _S),
}


def tiny_host(name: str, num_classes: int = 5, **kwargs) -> torch.nn.Module:
    """A tiny random instance of host ``name`` (see :data:`HOSTS`), awake: timm starts some families with
    their blocks switched off (layer scale 1e-6, SwinV2's res-post-norm weights at 0), which pretrained
    weights never are; a method's signal through such a block would be invisible to the tests."""
    model_name, args = HOSTS[name]
    model = timm.create_model(model_name, num_classes=num_classes, drop_path_rate=0.0, **{**args, **kwargs})
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if p.is_meta:
                break
            if p.dim() == 1 and not param_name.endswith("bias") and float(p.abs().max()) < 1e-3:
                p.fill_(0.5 if "gamma" in param_name else 1.0)
    return model


@pytest.fixture(params=["vit", "swin"])
def family(request) -> str:
    return request.param


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def perturb_(
    model: torch.nn.Module, seed: int = 1, std: float = 0.05, params: Iterable[torch.Tensor] | None = None
) -> None:
    """Add N(0, std^2) noise to every trainable tensor of ``model`` (or to ``params``), so that round trips
    and merges are not trivially at the zero initialisation."""
    g = torch.Generator().manual_seed(seed)
    chosen = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    with torch.no_grad():
        for p in chosen:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def pre_hook_count(model: torch.nn.Module) -> int:
    """Forward pre-hooks registered anywhere in ``model``."""
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def isolated_registry():
    """Methods that the test registers are unregistered when it ends (pass or fail)."""
    before = set(petl_zoo.method_names())
    yield
    for name in set(petl_zoo.method_names()) - before:
        petl_zoo.unregister_method(name)


class ShapeRecorder(TorchDispatchMode):
    """Records ``(op, shape)`` of every tensor an op creates (views excluded): tests that a training
    step never materialises an ``[out, in]`` weight-sized tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not func.is_view:  # views of W0 (its q/v slice) are fine
                self.shapes.append((str(func), tuple(t.shape)))
        return out
