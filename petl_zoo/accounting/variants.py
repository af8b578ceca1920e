"""What a benchmark compares: the backbone factory, the method list and each patched variant.

Besides the registered methods there are three extra rows: ``base`` (the un-patched model, the
inference reference), ``lora_qkv`` (our LoRA on the fused ``qkv``) and ``peft_lora`` (Hugging Face
peft's LoRA on the same Linear, same rank) for the apples-to-apples LoRA comparison. Any row name may
carry modifiers after ``@`` (:data:`MODIFIERS`): ``lora@gc`` trains with gradient checkpointing,
``lora@compile`` runs through ``torch.compile``, ``lora@gc@compile`` both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..api import classifier_parameters, create, method_of
from ..config import parse_cli_value, split_key_value
from ..registry import Method, TrainContext, get_method, method_names
from .flops import example_batch

__all__ = [
    "BASE",
    "PEFT_LORA",
    "LORA_QKV",
    "model_factory",
    "parse_method_options",
    "default_methods",
    "build_variant",
    "MODIFIERS",
    "split_variant",
    "is_compiled",
    "runnable",
    "reference_base",
]

PEFT_LORA = "peft_lora"
BASE = "base"  # the un-patched model: inference reference only
LORA_QKV = "lora_qkv"
DEFAULT_QKV_RANK = 8
GRAD_CHECKPOINTING = "gc"
COMPILED = "compile"
#: Row-name modifiers (``NAME@MODIFIER``) and what they change.
MODIFIERS: dict[str, str] = {
    GRAD_CHECKPOINTING: "gradient checkpointing (timm's set_grad_checkpointing)",
    COMPILED: "torch.compile of the training forward and of inference",
}


def split_variant(name: str) -> tuple[str, tuple[str, ...]]:
    """``'lora@gc@compile'`` -> ``('lora', ('gc', 'compile'))``; an unknown modifier is a ValueError."""
    base, *modifiers = name.split("@")
    for modifier in modifiers:
        if modifier not in MODIFIERS:
            raise ValueError(
                f"unknown modifier {modifier!r} in {name!r}; valid: {', '.join('@' + m for m in MODIFIERS)}"
            )
    return base, tuple(modifiers)


def is_compiled(name: str) -> bool:
    """Whether row ``name`` runs through ``torch.compile`` (``@compile``)."""
    return COMPILED in split_variant(name)[1]


def runnable(name: str, module: nn.Module) -> Callable[..., Any]:
    """What row ``name`` calls for ``module`` (its model or its merged copy): compiled for ``@compile``
    (as the trainer's ``--compile``, with ``@gc`` too)."""
    if not is_compiled(name):
        return module
    from ..train.backbone import compile_forward  # imports timm's models: only when compiling

    return compile_forward(module, grad_checkpointing=GRAD_CHECKPOINTING in split_variant(name)[1])


def reference_base(name: str) -> str:
    """The inference reference of row ``name``: ``base``, or ``base@compile`` for a compiled row."""
    return BASE + "@" + COMPILED if is_compiled(name) else BASE


def model_factory(
    model_name: str,
    num_classes: int,
    model_kwargs: dict[str, Any] | None = None,
    pretrained_file: str | os.PathLike | None = None,
) -> Callable[[], nn.Module]:
    """A zero-argument callable that builds the backbone, with the same weights on every call.

    The weights come from ``pretrained_file`` (through :func:`petl_zoo.train.backbone.build_backbone`)
    or, without one, from a random initialisation under seed 0.
    """
    from ..train.backbone import build_backbone  # imports all of timm's models: only when building

    kwargs = dict(model_kwargs or {})
    torch.manual_seed(0)
    reference = build_backbone(
        model_name, num_classes, pretrained_file, pretrained=pretrained_file is not None, model_kwargs=kwargs
    )
    state = reference.state_dict()

    def build() -> nn.Module:
        model = build_backbone(model_name, num_classes, pretrained=False, model_kwargs=kwargs)
        model.load_state_dict(state)
        return model

    return build


def parse_method_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``['neat:rank=8', 'lora:targets=q,v']`` -> ``{'neat': {'rank': 8}, 'lora': {'targets': 'q,v'}}``.

    Values are parsed like the train tool's ``--opt`` (JSON when it parses, else the string); the
    method's config dataclass coerces and validates them.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, value = split_key_value(item, "--opt (METHOD:KEY=VALUE, e.g. neat:rank=8)")
        method, colon, key = head.partition(":")
        if not colon or not method.strip() or not key.strip():
            raise ValueError(f"bad --opt {item!r}: expected METHOD:KEY=VALUE, e.g. neat:rank=8")
        out.setdefault(method.strip(), {})[key.strip()] = parse_cli_value(value)
    return out


def default_methods(requested: str) -> list[str]:
    """``'all'`` -> every registered method plus ``lora_qkv`` and ``peft_lora``; else the comma list, in
    which ``all`` expands the same way (``'all,lora@gc'``)."""
    names: list[str] = []
    for token in (n.strip() for n in requested.split(",")):
        if token == "all":
            names += [n for n in _all_methods() if n not in names]
        elif token and token not in names:
            names.append(token)
    valid = set(method_names()) | {BASE, PEFT_LORA, LORA_QKV}
    for n in names:
        if split_variant(n)[0] not in valid:
            raise ValueError(
                f"unknown method {n!r}; valid: all, {', '.join(sorted(valid))} (each may end in @gc, @compile)"
            )
    return names


def _all_methods() -> list[str]:
    """Every registered method, ``lora_qkv``, and ``peft_lora`` when peft is installed."""
    names = list(method_names()) + [LORA_QKV]
    try:
        import peft  # noqa: F401

        names.append(PEFT_LORA)
    except ImportError:
        pass
    return names


def _selects_at_start(cls: type[Method]) -> bool:
    return cls.on_train_start is not Method.on_train_start


def _note(cls: type[Method]) -> str:
    """What the row measures of a method that decides its structure during training."""
    notes = []
    if _selects_at_start(cls):
        notes.append("on_train_start run on random images (2 batches of 4)")
    if cls.on_epoch_end is not Method.on_epoch_end:
        notes.append("structure decided at epoch ends not applied (initial, unpruned)")
    return "; ".join(notes)


def _select_structure(model: nn.Module) -> None:
    """Run a structure-selecting method's ``on_train_start`` on two batches of four random images, so
    that its row has the size and shape of a selected model (what it selects is not meaningful)."""
    method = method_of(model)
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    batches = [example_batch(model, 4, device, generator) for _ in range(2)]
    method.on_train_start(
        model, batches, TrainContext(device=device, epochs=1000, steps_per_epoch=len(batches))
    )
    model.zero_grad(set_to_none=True)


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _qkv_rank(options: dict[str, dict[str, Any]]) -> int:
    """The rank of both fused-``qkv`` LoRA rows (``--opt peft_lora:rank=R``)."""
    return int(options.get(PEFT_LORA, {}).get("rank", DEFAULT_QKV_RANK))


def _peft_lora(model: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv"], lora_dropout=0.0)
    model = inject_adapter_in_model(config, _freeze(model))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    for p in classifier_parameters(model):
        p.requires_grad_(True)
    return model


def build_variant(
    name: str, factory: Callable[[], nn.Module], options: dict[str, dict[str, Any]] | None = None
) -> tuple[nn.Module, str]:
    """A fresh backbone from ``factory`` patched as ``name``; returns ``(model, note)``.

    ``name`` is a registered method, ``base`` (un-patched), ``peft_lora`` (HF peft LoRA on the fused
    ``qkv``, rank from ``--opt peft_lora:rank=R``, default 8) or ``lora_qkv`` (our LoRA on the fused
    ``qkv``, same rank: the apples-to-apples row against peft), optionally with modifiers
    (:func:`split_variant`): ``@gc`` turns on the model's gradient checkpointing here; ``@compile`` is
    applied by the caller (:func:`is_compiled`). Options are those of the unmodified name.
    """
    options = options or {}
    method, modifiers = split_variant(name)
    model, note = _build_plain(method, factory(), options)
    if GRAD_CHECKPOINTING in modifiers:
        from ..train.backbone import enable_grad_checkpointing  # as the trainer's --grad-checkpointing

        enable_grad_checkpointing(model, type(model).__name__)
    extra = [MODIFIERS[m] for m in modifiers]
    return model, "; ".join(t for t in (note, *extra) if t)


def _build_plain(name: str, model: nn.Module, options: dict[str, dict[str, Any]]) -> tuple[nn.Module, str]:
    if name == BASE:
        return _freeze(model), "un-patched model (inference reference)"
    if name == PEFT_LORA:
        rank = _qkv_rank(options)
        return _peft_lora(model, rank), f"HF peft LoRA r={rank} on fused qkv"
    if name == LORA_QKV:
        rank = _qkv_rank(options)
        return create("lora", model, rank=rank, targets=("qkv",)), f"petl_zoo lora r={rank} on fused qkv"
    cls = get_method(name)
    model = create(name, model, **options.get(name, {}))
    if _selects_at_start(cls):
        _select_structure(model)
    return model, _note(cls)
