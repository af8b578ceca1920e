"""Adapters on the Hugging Face Hub, the way peft users expect: ``from_pretrained`` and ``push_to_hub``.

An adapter folder (written by :func:`petl_zoo.save_adapter`, by ``tools/train.py`` in every run folder,
or by ``tools/model_card.py`` in a card folder) holds ``adapter.safetensors`` and
``adapter_config.json``; the config records the base model's timm name and pretrained tag (and the Hub
id of those weights), its class count and creation keywords, and the weights' SHA-256. So::

    model = petl_zoo.from_pretrained("runs/lora/dtd")          # a local folder
    model = petl_zoo.from_pretrained("user/lora-vit-b-dtd")    # a Hub repo (needs network)

builds the timm base model from that record, attaches the method and loads its tensors. The record is
data: its creation keywords pass :func:`petl_zoo.api.checked_model_kwargs` (architecture keywords only,
never a file, address or weights switch), and the weights must match the recorded SHA-256.
:func:`push_to_hub` uploads only what ``from_pretrained`` would load back.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import (
    _model_signature,
    attach_saved_method,
    check_adapter_fits,
    checked_model_kwargs,
    load_adapter,
    load_adapter_weights,
    read_adapter_config,
    require_weights_hash,
    save_adapter,
    verify_weights,
)
from .runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD_CONFIG, METRICS, RESULT

__all__ = ["from_pretrained", "push_to_hub", "resolve_adapter_folder", "HUB_FILES"]

logger = logging.getLogger(__name__)

#: What an adapter repo holds: the adapter itself, then the card and the run's records when present.
HUB_FILES = (
    ADAPTER_WEIGHTS,
    ADAPTER_CONFIG,
    "README.md",
    CARD_CONFIG,
    RESULT,
    METRICS,
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_adapter_folder(
    source: str | os.PathLike, revision: str | None = None, token: str | None = None
) -> Path:
    """A local folder holding the adapter files: ``source`` itself, or the Hub snapshot of repo ``source``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if not _REPO_ID.match(text) or path.exists():
        raise FileNotFoundError(f"'{text}' is neither an adapter folder nor a Hub repo id (OWNER/NAME)")
    from huggingface_hub import hf_hub_download

    files = [
        hf_hub_download(text, name, revision=revision, token=token)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    ]
    folders = {Path(f).parent for f in files}
    if len(folders) != 1:  # hf_hub_download puts one revision's files in one snapshot folder
        raise ValueError(
            f"Hub repo {text}: adapter files came back in different folders {sorted(map(str, folders))}"
        )
    return folders.pop()


def _base_record(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    record = config.get("base_model") or {}
    if not isinstance(record, dict) or not record.get("name") or record.get("num_classes") is None:
        raise ValueError(
            f"{folder / ADAPTER_CONFIG} has no base_model record (saved by an older petl_zoo): build the "
            "timm model yourself and call petl_zoo.load_adapter(model, folder)"
        )
    return record


def _model_kwargs(record: dict[str, Any], source: str) -> dict[str, Any]:
    kwargs = checked_model_kwargs(record.get("model_kwargs"), source)
    # JSON turned tuples (img_size=(32, 32), depths=(2, 2)) into lists; timm expects tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def from_pretrained(
    source: str | os.PathLike,
    *,
    pretrained: bool = True,
    pretrained_file: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The base model named in the adapter's config with the adapter attached and loaded, in eval mode.

    ``source`` is an adapter folder or a Hub repo id. The backbone gets timm's pretrained weights for the
    recorded ``architecture.tag`` (``pretrained=True``, from the Hub cache or the network), the weights in
    ``pretrained_file`` (a local ``.safetensors``/``.npz``/``.pth``: what a run trained with
    ``--pretrained-file`` needs), or none (``pretrained=False``: only useful when the adapter holds every
    weight, e.g. ``full``). The recorded creation keywords must be architecture keywords
    (:func:`petl_zoo.api.checked_model_kwargs`). The adapter's SHA-256 is checked before loading; a
    config that records none is refused unless ``verify=False``. The model carries the record, so
    :func:`push_to_hub` and :func:`petl_zoo.save_adapter` write it again. The model is moved to
    ``device``/``dtype`` before the adapter is attached; the adapter's tensors then take ``adapter_dtype``
    as in :func:`petl_zoo.create` (None: float32 on a float16/bfloat16 model, else the model's dtype).
    """
    from .train.backbone import build_backbone

    folder = resolve_adapter_folder(source, revision=revision, token=token)
    config = read_adapter_config(folder)
    record = _base_record(folder, config)
    if verify:
        require_weights_hash(folder, config)  # before building (and maybe downloading) the backbone
    model = build_backbone(
        record["name"],
        int(record["num_classes"]),
        pretrained_file=pretrained_file,
        pretrained=pretrained and pretrained_file is None,
        model_kwargs=_model_kwargs(record, str(folder / ADAPTER_CONFIG)),
    )
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    load_adapter(model, folder, verify=verify, adapter_dtype=adapter_dtype)
    logger.info("loaded %s adapter from %s onto %s", config.get("method"), folder, record["name"])
    return model.eval()


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _first_difference(there: dict[str, Any], here: dict[str, Any]) -> str | None:
    """``'key' is A there, B here`` for the first key where two tables differ (None when equal)."""
    for key in [*there, *(k for k in here if k not in there)]:
        a, b = there.get(key, "absent"), here.get(key, "absent")
        if a != b:
            return f"{key!r} is {a} there, {b} here"
    return None


def _rebuild_on_meta(folder: Path, model: nn.Module | None) -> str | None:
    """Why :func:`from_pretrained` could not load ``folder`` back (None when it could), found without
    weights: the base model is built from the record on the meta device (shapes only), the saved method
    attached, and the weights file's tensor names and shapes checked against it, as ``load_adapter``
    checks them. With ``model`` (what is pushed), the rebuilt model must also have its every shape."""
    from safetensors import safe_open

    from .train.backbone import build_backbone

    config = read_adapter_config(folder)
    record = _base_record(folder, config)
    kwargs = _model_kwargs(record, str(folder / ADAPTER_CONFIG))
    if not isinstance(config.get("weights_sha256"), str) or not config["weights_sha256"].strip():
        return (
            f"{folder / ADAPTER_CONFIG} records no weights_sha256, which from_pretrained requires; "
            "write the folder again with petl_zoo.save_adapter"
        )
    weights = verify_weights(folder, config)
    built = f"{record['name']} with model_kwargs {record.get('model_kwargs') or {}}"
    hint = "; pass model_kwargs= with the timm.create_model keywords this model was built with"
    try:
        with torch.device("meta"):
            rebuilt = build_backbone(
                record["name"], int(record["num_classes"]), pretrained=False, model_kwargs=kwargs
            )
        if model is not None:
            differs = _first_difference(_model_signature(rebuilt), _model_signature(model))
            if differs:
                return f"from_pretrained would build {built}, another model than this one ({differs}){hint}"
        check_adapter_fits(rebuilt, folder, config)
        with torch.device("meta"):
            attach_saved_method(rebuilt, config)
        with safe_open(str(weights), "pt") as f:
            saved = {k: _meta_tensor(f.get_slice(k)) for k in f.keys()}
        load_adapter_weights(rebuilt, saved, strict=True, source=str(folder))
    except Exception as err:  # noqa: BLE001 - any failure to rebuild is a reason not to push
        reason = " ".join(str(err).split()) or type(err).__name__
        return f"from_pretrained could not load it back on {built} ({reason})" + (
            hint if model is not None else ""
        )
    if model is not None:
        differs = _first_difference(_shapes(rebuilt), _shapes(model))
        if differs:
            return f"from_pretrained would build {built}, another model than this one ({differs}){hint}"
    return None


#: safetensors' dtype names (``get_dtype()`` of a slice) as torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _meta_tensor(tensor_slice: Any) -> torch.Tensor:
    """A meta tensor with the shape and dtype of a stored one (no data read)."""
    dtype = SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), torch.float32)
    return torch.empty(tensor_slice.get_shape(), dtype=dtype, device="meta")


def push_to_hub(
    source: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "petl_zoo adapter",
    model_kwargs: dict[str, Any] | None = None,
) -> str:
    """Upload an adapter to Hub repo ``repo_id`` (created if missing); returns the commit URL.

    ``source`` is a patched model (saved first with :func:`save_adapter`; without ``model_kwargs``, those
    of the record it was loaded from, if any) or a folder: an adapter folder, a run folder or a card folder
    from ``tools/model_card.py``, of which the adapter files, the card (``README.md``) and the run records
    in :data:`HUB_FILES` are uploaded. Nothing is uploaded (one ValueError line) unless
    :func:`from_pretrained` would load the adapter back: its record names a timm model that rebuilds
    (checked on the meta device: no weights, no download) with every tensor of the adapter in its shape,
    the weights match their recorded SHA-256, and a pushed model is what the record rebuilds.
    """
    if isinstance(source, nn.Module):
        with tempfile.TemporaryDirectory(prefix="petl_zoo_push_") as tmp:
            save_adapter(source, tmp, model_kwargs=model_kwargs)
            return _upload(Path(tmp), repo_id, "this model", source, token, private, commit_message)
    folder = Path(source)
    missing = [name for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: not an adapter, run or card folder")
    return _upload(folder, repo_id, str(folder), None, token, private, commit_message)


def _upload(
    folder: Path,
    repo_id: str,
    what: str,
    model: nn.Module | None,
    token: str | None,
    private: bool,
    commit_message: str,
) -> str:
    from huggingface_hub import create_repo, upload_folder

    try:
        why = _rebuild_on_meta(folder, model)
    except (ValueError, FileNotFoundError) as err:
        why = " ".join(str(err).split())
    if why is not None:
        raise ValueError(f"refusing to push {what} to {repo_id}: {why}; nothing was uploaded")
    create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    info = upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        token=token,
        repo_type="model",
        allow_patterns=[name for name in HUB_FILES if (folder / name).is_file()],
        commit_message=commit_message,
    )
    logger.info("pushed %s to %s", what, repo_id)
    return str(getattr(info, "commit_url", info))
