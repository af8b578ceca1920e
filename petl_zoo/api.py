"""The public API: create a method on a model, count, save, load, merge."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .io import atomic_write, atomic_write_json, sha256_file
from .layers import (
    PetlModule,
    adapted_wrappers,
    adapter_dtype_for,
    merge_blockers,
    place_like_host,
    unload_wrappers,
)
from .registry import Method, get_method
from .runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .targets import classifier_modules, model_family

__all__ = [
    "create",
    "method_of",
    "classifier_parameters",
    "trainable_parameters",
    "adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "merge",
    "unmerge",
    "is_merged",
    "is_mergeable",
    "read_adapter_config",
    "load_adapter_weights",
    "base_model_record",
    "checked_model_kwargs",
    "require_weights_hash",
    "verify_weights",
    "DENIED_MODEL_KWARGS",
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
]

FORMAT_VERSION = 1

logger = logging.getLogger(__name__)

#: ``timm.create_model`` keywords that a saved record (``base_model.model_kwargs``) may never set, with
#: why. Besides these, :func:`checked_model_kwargs` refuses every key that names a file, folder or address
#: (ending in ``_path``, ``_file``, ``_dir``, ``_url``, ``_uri``), starts with ``hf_hub``, ``pretrained``
#: or ``checkpoint``, or starts with ``_``: only architecture keywords (``img_size``, ``depth`` ...) pass.
DENIED_MODEL_KWARGS: dict[str, str] = {
    **dict.fromkeys(
        ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "cache_dir"),
        "it loads a file or reaches the network in place of the base weights",
    ),
    **dict.fromkeys(
        ("pretrained", "num_classes", "drop_path_rate"), "it is set by the loader, not by the record"
    ),
    **dict.fromkeys(
        ("features_only", "feature_cfg", "feature_cls", "out_indices"),
        "it makes timm.create_model return a feature extractor, not the classifier that was saved",
    ),
}
_DENIED_SUFFIXES = ("_path", "_file", "_dir", "_url", "_uri")
_DENIED_PREFIXES = ("hf_hub", "pretrained", "checkpoint")


def method_of(model: nn.Module) -> Method | None:
    """The method ``create`` attached to ``model`` (None for an unpatched model)."""
    return getattr(model, "petl_method", None)


def _require_method(model: nn.Module) -> Method:
    method = method_of(model)
    if method is None:
        raise ValueError("model has no petl_zoo method: call petl_zoo.create(name, model, ...) first")
    return method


def create(
    method: str,
    model: nn.Module,
    *,
    train_attn_pool: bool = False,
    adapter_dtype: torch.dtype | None = None,
    **options: Any,
) -> nn.Module:
    """Patch ``model`` in place with PETL ``method`` and return it.

    The backbone is frozen; the method's parameters and the classifier head(s) stay trainable (both heads
    of a distilled DeiT). An attention-pool head (SigLIP's ``attn_pool``) is pretrained backbone and stays
    frozen unless ``train_attn_pool``. Options are the fields of the method's config dataclass (unknown
    names and bad values raise ValueError). ``create`` is atomic: when it raises, the model is exactly as
    it was.

    The method's tensors are put on the device of the weights they adapt, in ``adapter_dtype``: None
    (the default) keeps them in float32 on a float16/bfloat16 model (half precision cannot resolve small
    updates: training would stall) and in the weights' dtype otherwise; ``torch.float32``,
    ``torch.bfloat16``, ``torch.float16`` or ``torch.float64`` chooses (``torch.bfloat16`` on a bf16
    model gives the all-bf16 method tensors of earlier versions). Tensors kept in another dtype than the
    model's are cast to the activations' dtype inside the method's forward, so outputs keep the model's
    dtype, and :func:`merge` computes the merged weights in float32 and stores them in the model's
    dtype. Methods that train the model's own tensors (``full``, ``bitfit``, ``linear``: the head) have
    no tensors of their own and are exempt: what they train keeps the model's dtype.
    """
    cls = get_method(method)
    existing = method_of(model)
    if existing is not None:
        raise ValueError(f"model already carries method '{existing.name}'; create() takes an unpatched model")
    cls.check_family(model_family(model))
    adapter_dtype_for(torch.float32, adapter_dtype)  # one ValueError line for a bad adapter_dtype
    config = cls.config_class.from_options(cls.name, **options)
    instance = cls(config)
    instance.adapter_dtype = adapter_dtype
    snapshot = _ModelSnapshot(model)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        instance.apply(model)
        place_like_host(model, adapter_dtype)
        _match_training_mode(model, snapshot)
        for p in classifier_parameters(model, include_attn_pool=train_attn_pool):
            p.requires_grad_(True)
    except BaseException:
        instance.hooks.remove()
        snapshot.restore()
        raise
    model.petl_method = instance
    return model


def _match_training_mode(model: nn.Module, snapshot: _ModelSnapshot) -> None:
    """Modules the method added take the model's train/eval mode (a fresh module is in train mode, so a
    prompt or adapter dropout would otherwise run on a model the user had put in eval mode); the
    model's own modules keep theirs."""
    known = {id(m) for m, _, _ in snapshot.modules}
    for module in model.modules():
        if id(module) not in known:
            module.training = model.training


class _ModelSnapshot:
    """Enough of a model's state to undo a failed ``create``: every module's attributes, its parameter,
    buffer, sub-module and hook tables, and every parameter's ``requires_grad``."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, dict(vars(m)), self._tables(m)) for m in model.modules()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]

    @staticmethod
    def _tables(module: nn.Module) -> dict[str, Any]:
        """Copies of the module's mutable tables (dicts and sets held in its attributes)."""
        return {k: type(v)(v) for k, v in vars(module).items() if isinstance(v, (dict, set))}

    def restore(self) -> None:
        for module, attributes, tables in self.modules:
            vars(module).clear()
            vars(module).update(attributes)
            for name, table in tables.items():
                current = getattr(module, name)
                current.clear()
                current.update(table)
        for p, flag in self.flags:
            p.requires_grad_(flag)


def classifier_parameters(model: nn.Module, include_attn_pool: bool = False) -> list[nn.Parameter]:
    """The parameters of every classifier head (``head``, and ``head_dist`` of distilled models); with
    ``include_attn_pool`` also those of an attention-pool head (``attn_pool``, SigLIP)."""
    modules = classifier_modules(model)
    pool = getattr(model, "attn_pool", None)
    if include_attn_pool and isinstance(pool, nn.Module):
        modules.append(pool)
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _numel_unique(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def _method_tensor_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, PetlModule):
            ids.update(id(p) for p in module.parameters())
            for sub in module.modules():
                ids.update(
                    id(b)
                    for name, b in sub._buffers.items()
                    if b is not None and name not in sub._non_persistent_buffers_set
                )
    return ids


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What ``save_adapter`` stores: every tensor below a PetlModule (trainable or frozen), every other
    trainable parameter (BitFit biases, full fine-tuning) and the classifier head. Tied tensors once."""
    method_ids = _method_tensor_ids(model)
    head_ids = {id(p) for p in classifier_parameters(model)}
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in named:
        if id(tensor) in seen:
            continue
        if (
            id(tensor) in method_ids
            or id(tensor) in head_ids
            or (isinstance(tensor, nn.Parameter) and tensor.requires_grad)
        ):
            seen.add(id(tensor))
            state[name] = tensor
    return state


def trainable_parameters(model: nn.Module) -> dict[str, float]:
    """Parameter counts of a patched model.

    Keys: ``method`` (trainable, head excluded), ``head`` (classifier), ``total`` (method + head),
    ``stored`` (tensor elements ``save_adapter`` writes, head excluded: frozen method state included),
    ``backbone`` (pretrained parameters, head and method modules excluded) and ``percent`` (method as
    a percentage of the backbone).
    """
    method_ids = _method_tensor_ids(model)
    head = classifier_parameters(model)
    head_ids = {id(p) for p in head}
    params = dict(model.named_parameters())  # unique by default
    method_count = _numel_unique(p for p in params.values() if p.requires_grad and id(p) not in head_ids)
    backbone = _numel_unique(p for p in params.values() if id(p) not in method_ids and id(p) not in head_ids)
    stored = _numel_unique(t for t in adapter_state_dict(model).values() if id(t) not in head_ids)
    head_count = _numel_unique(head)
    return {
        "method": method_count,
        "head": head_count,
        "total": method_count + head_count,
        "stored": stored,
        "backbone": backbone,
        "percent": 100.0 * method_count / backbone if backbone else 0.0,
    }


def _model_signature(model: nn.Module) -> dict[str, Any]:
    from .targets import iter_blocks

    blocks = iter_blocks(model)
    return {
        "model_class": type(model).__name__,
        "family": model_family(model),
        "num_blocks": len(blocks),
        "dims": sorted({b.dim for b in blocks}),
    }


def checked_model_kwargs(kwargs: Any, source: str, field: str = "base_model.model_kwargs") -> dict[str, Any]:
    """``kwargs`` (a saved record's ``field``, read from file ``source``) as a dict of
    ``timm.create_model`` architecture keywords; one ValueError line naming the first key that may not
    come from a file (:data:`DENIED_MODEL_KWARGS`, and the rule written above it). Every place where
    keywords read from a file reach timm passes them through here."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(
            f"{source}: {field} is a {type(kwargs).__name__}, not an object of "
            'timm.create_model keywords ({"img_size": 32, ...})'
        )
    for key in kwargs:
        why = DENIED_MODEL_KWARGS.get(key)
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            why = "it is not a public keyword name"
        elif why is None and (key.startswith(_DENIED_PREFIXES) or key.endswith(_DENIED_SUFFIXES)):
            why = (
                "keys ending in "
                + "/".join(_DENIED_SUFFIXES)
                + " or starting with "
                + "/".join(_DENIED_PREFIXES)
                + " load files or reach the network"
            )
        if why is not None:
            raise ValueError(
                f"{source}: {field} sets {key!r}, which a saved record may not set ({why}); "
                "only timm architecture keywords pass (img_size, patch_size, depth, embed_dim, num_heads, ...)"
            )
    return dict(kwargs)


def _attached_model_kwargs(model: nn.Module) -> dict[str, Any] | None:
    """The ``model_kwargs`` of the base-model record that :func:`load_adapter` attached to ``model``
    (``petl_base_model``), when it names the model's own architecture; else None."""
    record = getattr(model, "petl_base_model", None)
    if not isinstance(record, dict):
        return None
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if record.get("architecture") != architecture:
        logger.warning(
            "the base-model record attached to this model names %s, the model is a %s: not reused",
            record.get("architecture"),
            architecture,
        )
        return None
    return dict(record.get("model_kwargs") or {})


def base_model_record(model: nn.Module, model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What :func:`petl_zoo.from_pretrained` needs to rebuild the base model: timm's architecture and
    pretrained tag (``name`` = ``architecture.tag``), the Hub id of those weights when timm knows one, the
    class count and the extra ``timm.create_model`` keyword arguments (``img_size=32`` ...).

    Without ``model_kwargs``, those of the record that :func:`load_adapter` (and so
    :func:`petl_zoo.from_pretrained`) attached to the model are reused, else none."""
    if model_kwargs is None:
        model_kwargs = _attached_model_kwargs(model)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = cfg.get("architecture")
    tag = cfg.get("tag") or None
    name = f"{architecture}.{tag}" if architecture and tag else architecture
    return {
        "name": name,
        "architecture": architecture,
        "tag": tag,
        "hf_hub_id": cfg.get("hf_hub_id") or None,
        "num_classes": getattr(model, "num_classes", None),
        "model_kwargs": json.loads(json.dumps(dict(model_kwargs or {}))),
    }


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, model_kwargs: dict[str, Any] | None = None
) -> Path:
    """Write ``adapter.safetensors`` (method tensors + head, in the method's stored form: see
    :meth:`~petl_zoo.registry.Method.stored_tensors`) and ``adapter_config.json`` to ``directory``.

    ``adapter_config.json`` records the base model (:func:`base_model_record`; pass the ``model_kwargs``
    the model was created with so that :func:`petl_zoo.from_pretrained` can rebuild it; a model that
    :func:`load_adapter` or ``from_pretrained`` loaded carries its record, reused when none are given)
    and the SHA-256 of the weights file, checked by :func:`load_adapter`. Both files are written
    atomically (temporary file, then rename).
    """
    method = _require_method(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    state = method.stored_tensors(model, state)
    config = {
        "format_version": FORMAT_VERSION,
        "method": method.name,
        "config": method.config.to_dict(),
        "state": method.get_state(),
        "model": _model_signature(model),
        "base_model": base_model_record(model, model_kwargs),
        "num_classes": getattr(model, "num_classes", None),
        "tensors": {k: list(v.shape) for k, v in state.items()},
        "trainable_parameters": trainable_parameters(model),
        "mergeable": is_mergeable(model),
        "timm_version": _timm_version(),
    }
    atomic_write(
        directory / ADAPTER_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"method": method.name})
    )
    config["weights_sha256"] = sha256_file(directory / ADAPTER_WEIGHTS)
    atomic_write_json(directory / ADAPTER_CONFIG, config)
    return directory


def _timm_version() -> str:
    import timm

    return timm.__version__


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not an adapter folder written by petl_zoo.save_adapter")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def saved_options(config: dict[str, Any]) -> dict[str, Any]:
    """The method options of an ``adapter_config.json`` (its ``config``), completed by the method's
    :meth:`~petl_zoo.registry.Method.upgrade_options` for folders saved by an older petl_zoo."""
    return get_method(config["method"]).upgrade_options(dict(config.get("config", {})))


def require_weights_hash(directory: str | os.PathLike, config: dict[str, Any]) -> str:
    """The SHA-256 that ``adapter_config.json`` records for the weights; one ValueError line when it is
    missing or empty (a deleted hash must not turn the check off)."""
    expected = config.get("weights_sha256")
    if not isinstance(expected, str) or not expected.strip():
        got = "no weights_sha256" if expected in (None, "") else f"weights_sha256 {expected!r}, not a hash"
        raise ValueError(
            f"{Path(directory) / ADAPTER_CONFIG} records {got}, so {ADAPTER_WEIGHTS} cannot be checked; "
            "pass verify=False to load it unchecked"
        )
    return expected


def verify_weights(directory: str | os.PathLike, config: dict[str, Any], verify: bool = True) -> Path:
    """The adapter's weights file, checked against the SHA-256 in ``config`` (with ``verify``: a missing
    hash or another file is one ValueError line; without it the check is skipped, with a warning)."""
    directory = Path(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    if not verify:
        logger.warning("loading %s without checking its SHA-256 (verify=False)", weights)
        return weights
    if sha256_file(weights) != require_weights_hash(directory, config):
        raise ValueError(
            f"{weights} does not match the SHA-256 recorded in {ADAPTER_CONFIG} (a corrupt or replaced file)"
        )
    return weights


def check_adapter_fits(model: nn.Module, directory: str | os.PathLike, config: dict[str, Any]) -> None:
    """One ValueError line when the adapter saved in ``directory`` (its ``config``) cannot go on the
    unpatched ``model``: the model carries a method, or is another class or block count."""
    existing = method_of(model)
    if existing is not None:
        raise ValueError(
            f"adapter in {directory} was saved for method '{config['method']}' but the model already "
            f"carries method '{existing.name}'; pass an unpatched model"
        )
    saved_model = config.get("model", {})
    signature = _model_signature(model)
    if saved_model.get("model_class") not in (None, signature["model_class"]):
        raise ValueError(
            f"adapter in {directory} was saved for a {saved_model['model_class']}, "
            f"not for this {signature['model_class']}"
        )
    if saved_model.get("num_blocks") not in (None, signature["num_blocks"]):
        raise ValueError(
            f"adapter in {directory} was saved for a model with {saved_model['num_blocks']} blocks, "
            f"this one has {signature['num_blocks']}"
        )


def attach_saved_method(
    model: nn.Module, config: dict[str, Any], adapter_dtype: torch.dtype | None = None
) -> Method:
    """Create the method recorded in ``config`` on ``model`` (its tensors in ``adapter_dtype``, see
    :func:`create`) and restore its saved structure state."""
    create(config["method"], model, adapter_dtype=adapter_dtype, **saved_options(config))
    method = _require_method(model)
    method.set_state(model, config.get("state", {}))
    place_like_host(model, adapter_dtype)
    return method


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    strict: bool = True,
    *,
    verify: bool = True,
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Rebuild the saved method on an unpatched ``model`` and load its tensors; returns the model.

    The weights must match the SHA-256 that ``adapter_config.json`` records; a folder that records none
    is refused unless ``verify=False`` (which skips the check). Raises ValueError when the folder was
    saved for another architecture or tensor shapes differ. The folder's base-model record is attached
    to the model (``petl_base_model``), so that :func:`save_adapter` and
    :func:`petl_zoo.push_to_hub` record the same creation keywords when given none. The method's
    tensors take ``adapter_dtype`` by :func:`create`'s rule (float32 on a float16/bfloat16 model by
    default), whatever dtype the folder stored them in.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = verify_weights(directory, config, verify)
    check_adapter_fits(model, directory, config)
    attach_saved_method(model, config, adapter_dtype)
    load_adapter_weights(model, load_file(str(weights)), strict=strict, source=str(directory))
    keep_base_model_record(model, directory, config)
    return model


def keep_base_model_record(model: nn.Module, directory: str | os.PathLike, config: dict[str, Any]) -> None:
    """Attach the folder's base-model record to ``model`` (``petl_base_model``, a copy) when its
    ``model_kwargs`` pass :func:`checked_model_kwargs`; otherwise log why it is not kept."""
    record = config.get("base_model")
    if not isinstance(record, dict):
        return
    try:
        checked_model_kwargs(record.get("model_kwargs"), str(Path(directory) / ADAPTER_CONFIG))
    except ValueError as err:
        logger.warning("base-model record not kept with the model: %s", err)
    else:
        model.petl_base_model = json.loads(json.dumps(record))


def load_adapter_weights(
    model: nn.Module, tensors: dict[str, Tensor], strict: bool = True, source: str = "adapter"
) -> None:
    """Copy saved adapter tensors into a patched model, checking names and shapes (a method's stored form,
    :meth:`~petl_zoo.registry.Method.stored_tensors`, is read back first)."""
    method = _require_method(model)
    tensors = method.loaded_tensors(model, tensors)
    expected = adapter_state_dict(model)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[0]!r}")
        raise ValueError(f"{source} does not fit this model with method '{method.name}': " + "; ".join(parts))
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in expected:
                continue
            target = expected[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))


def is_mergeable(model: nn.Module) -> bool:
    """Whether :func:`merge` can fold the method attached to ``model`` into its weights.

    Derived from what is attached: every delta has a weight-space form (a ``delta_weight`` on a Linear's
    output slice, an ``affine`` map sequential on a Linear / Conv / LayerNorm or on a Linear's input) and
    the host has a place for it (a bias for a shift); no delta sits in parallel on a module (those depend
    on the input). A method that attaches nothing (``linear``, ``full``, ``bitfit``) merges trivially.
    """
    _require_method(model)
    dependent, unfoldable = merge_blockers(model)
    return not dependent and not unfoldable


def _raise_if_blocked(model: nn.Module, method: Method) -> None:
    """One ValueError naming the first delta that keeps ``model`` from merging (and how many more)."""
    dependent, unfoldable = merge_blockers(model)
    blockers = dependent or unfoldable
    if not blockers:
        return
    more = f" and {len(blockers) - 1} more" if len(blockers) > 1 else ""
    if dependent:
        why = "its update depends on the input, not only on the weights, so it has no weight-space form"
    else:
        why = "its weight-space form has no exact place in this host's layers"
    raise ValueError(f"method '{method.name}' cannot be merged: {why} ({blockers[0]}{more})")


def merge(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold weight-space updates into the frozen base weights (zero inference overhead).

    With ``unload=True`` the wrappers are also replaced by the plain timm layers and the method's hooks
    are folded or removed (irreversible: the model no longer carries the method). A model that is not
    :func:`is_mergeable` and a second merge of a merged model are ValueErrors. A merge that fails part
    way leaves the model unmerged.
    """
    method = _require_method(model)
    _raise_if_blocked(model, method)
    if getattr(model, "petl_merged", False):
        raise ValueError("model is already merged; call petl_zoo.unmerge(model) first")
    done = []
    try:
        for _, layer in adapted_wrappers(model):
            layer.merge()
            done.append(layer)
    except BaseException:
        for layer in done:
            layer.unmerge()
        raise
    model.petl_merged = True
    if unload:
        unload_wrappers(model)
        method.unload(model)
        model.petl_method = None
        model.petl_merged = False
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the exact original base weights (and biases) after :func:`merge`."""
    _require_method(model)
    if not getattr(model, "petl_merged", False):
        raise ValueError("model is not merged")
    for _, layer in adapted_wrappers(model):
        layer.unmerge()
    model.petl_merged = False
    return model


def is_merged(model: nn.Module) -> bool:
    return bool(getattr(model, "petl_merged", False))
