"""One frozen backbone, many adapters: each adapter gets its own *shell*, a structural copy of the model
whose module objects are new but whose backbone tensors are the very tensors of the model.

:func:`share_backbone` makes the shell (``copy.deepcopy`` with every backbone parameter and buffer
pre-entered in the memo, so that they are reused, not copied; the classifier head is copied, it is the
task's). :func:`attach_shared` then loads a saved adapter onto a fresh shell exactly as
:func:`petl_zoo.load_adapter` loads it onto a model, so the shell *is* the single-adapter model: memory
grows by the adapter's tensors and its head only. A method that would write into the shared tensors
(``full``, ``bitfit``: they train the backbone's own tensors) is refused before anything is written, and
a method that changed them anyway while attaching is caught by the tensors' version counters.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..api import (
    _model_signature,
    adapter_state_dict,
    attach_saved_method,
    check_adapter_fits,
    keep_base_model_record,
    load_adapter_weights,
    verify_weights,
)
from ..targets import classifier_modules

__all__ = [
    "backbone_tensors",
    "tensor_versions",
    "share_backbone",
    "backbone_record",
    "check_same_backbone",
    "attach_shared",
]


def backbone_tensors(model: nn.Module, include_head: bool = False) -> dict[int, Tensor]:
    """The model's parameters and buffers by ``id``: what shells share (the heads' only with
    ``include_head``)."""
    head = set() if include_head else {id(t) for m in classifier_modules(model) for t in _tensors(m)}
    return {id(t): t for t in _tensors(model) if id(t) not in head}


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def tensor_versions(tensors: dict[int, Tensor]) -> tuple[int, ...]:
    """The in-place version counter of every tensor (any in-place write bumps it)."""
    return tuple(t._version for t in tensors.values())


def share_backbone(model: nn.Module, include_head: bool = False) -> nn.Module:
    """A structural copy of ``model`` that shares its backbone tensors (and its heads' with
    ``include_head``); every module object, and the head's tensors otherwise, are new."""
    memo: dict[int, Any] = dict(backbone_tensors(model, include_head))
    return copy.deepcopy(model, memo)


def backbone_record(config: dict[str, Any]) -> dict[str, Any]:
    """What must agree between adapters that share a backbone: the timm architecture, pretrained tag and
    creation keywords of the saved base-model record, and the saved model signature (class, blocks,
    widths). The class count is the head's, per task, and not part of it."""
    record = config.get("base_model") if isinstance(config.get("base_model"), dict) else {}
    signature = config.get("model") if isinstance(config.get("model"), dict) else {}
    return {
        "architecture": record.get("architecture"),
        "tag": record.get("tag"),
        "model_kwargs": json.loads(json.dumps(record.get("model_kwargs") or {})),
        "model_class": signature.get("model_class"),
        "num_blocks": signature.get("num_blocks"),
        "dims": signature.get("dims"),
    }


def check_same_backbone(
    model: nn.Module, name: str, config: dict[str, Any], others: dict[str, dict[str, Any]]
) -> None:
    """One ValueError line when adapter ``name`` (its saved ``config``) was saved for another backbone
    than ``model`` (architecture, class, blocks, widths) or than the adapters already loaded
    (``others``: name -> config; their records must agree on every field of :func:`backbone_record`)."""
    mine = backbone_record(config)
    here = _model_signature(model)
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    host = {"architecture": architecture, **{k: here[k] for k in ("model_class", "num_blocks", "dims")}}
    for key, value in host.items():
        saved = mine.get(key)
        if saved is not None and value is not None and saved != value:
            raise ValueError(
                f"adapter {name!r} was saved for another backbone: its {key} is {saved}, this model's is {value}"
            )
    for other, other_config in others.items():
        theirs = backbone_record(other_config)
        for key, value in mine.items():
            if value is not None and theirs.get(key) is not None and value != theirs[key]:
                raise ValueError(
                    f"adapter {name!r} was saved for another backbone than adapter {other!r}: its {key} "
                    f"is {value}, {other!r}'s is {theirs[key]}; adapters on one model must share its backbone"
                )


def _resize_heads(shell: nn.Module, num_classes: Any) -> None:
    """Give the shell a head of the adapter's class count (timm's ``reset_classifier``), on the old
    head's device and in its dtype."""
    if not isinstance(num_classes, int) or num_classes == getattr(shell, "num_classes", num_classes):
        return
    old = next((p for m in classifier_modules(shell) for p in m.parameters()), None)
    shell.reset_classifier(num_classes)
    if old is not None:
        for head in classifier_modules(shell):
            head.to(device=old.device, dtype=old.dtype)


def attach_shared(
    model: nn.Module,
    folder: str | os.PathLike,
    config: dict[str, Any],
    *,
    verify: bool = True,
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The adapter saved in ``folder`` (its ``config`` read) on a shell of the unpatched ``model``
    (:func:`share_backbone`), loaded as :func:`petl_zoo.load_adapter` loads it, in eval mode. As
    :func:`petl_zoo.create` does, this freezes the backbone (``requires_grad=False``), the model's own
    tensors included."""
    folder = Path(folder)
    weights = verify_weights(folder, config, verify)
    shared = backbone_tensors(model)
    before = tensor_versions(shared)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:  # create() freezes the shared backbone (and stays so); a refused adapter leaves its flags as they were
        shell = _loaded_shell(model, folder, config, weights, shared, adapter_dtype)
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    if tensor_versions(shared) != before:
        raise ValueError(
            f"method '{config['method']}' of adapter {folder} changed the shared backbone's tensors in "
            "place while attaching; it cannot share a backbone (load it alone with petl_zoo.load_adapter)"
        )
    keep_base_model_record(shell, folder, config)
    return shell.eval()


def _loaded_shell(
    model: nn.Module,
    folder: Path,
    config: dict[str, Any],
    weights: Path,
    shared: dict[int, Tensor],
    adapter_dtype: torch.dtype | None,
) -> nn.Module:
    shell = share_backbone(model)
    _resize_heads(shell, config.get("num_classes"))
    check_adapter_fits(shell, folder, config)
    attach_saved_method(shell, config, adapter_dtype)
    written = [k for k, t in adapter_state_dict(shell).items() if id(t) in shared]
    if written:
        raise ValueError(
            f"method '{config['method']}' of adapter {folder} cannot be combined with other adapters on one "
            f"backbone: it trains the backbone's own tensors (e.g. {written[0]!r}); load it alone with "
            "petl_zoo.load_adapter"
        )
    load_adapter_weights(shell, load_file(str(weights)), strict=True, source=str(folder))
    return shell
