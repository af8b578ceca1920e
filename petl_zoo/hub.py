"""Adapters on the Hugging Face Hub, the way peft users expect: ``from_pretrained`` and ``push_to_hub``.

An adapter folder (written by :func:`petl_zoo.save_adapter`, by ``tools/train.py`` in every run folder,
or by ``tools/model_card.py`` in a card folder) holds ``adapter.safetensors`` and
``adapter_config.json``; the config records the base model's timm name and pretrained tag (and the Hub
id of those weights), its class count and creation keywords, and the weights' SHA-256. So::

    model = petl_zoo.from_pretrained("runs/lora/dtd")          # a local folder
    model = petl_zoo.from_pretrained("user/lora-vit-b-dtd")    # a Hub repo (needs network)

builds the timm base model from that record, attaches the method and loads its tensors.
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

from .api import load_adapter, read_adapter_config, save_adapter
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


def _model_kwargs(record: dict[str, Any]) -> dict[str, Any]:
    # JSON turned tuples (img_size=(32, 32), depths=(2, 2)) into lists; timm expects tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (record.get("model_kwargs") or {}).items()}


def from_pretrained(
    source: str | os.PathLike,
    *,
    pretrained: bool = True,
    pretrained_file: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The base model named in the adapter's config with the adapter attached and loaded, in eval mode.

    ``source`` is an adapter folder or a Hub repo id. The backbone gets timm's pretrained weights for the
    recorded ``architecture.tag`` (``pretrained=True``, from the Hub cache or the network), the weights in
    ``pretrained_file`` (a local ``.safetensors``/``.npz``/``.pth``: what a run trained with
    ``--pretrained-file`` needs), or none (``pretrained=False``: only useful when the adapter holds every
    weight, e.g. ``full``). The adapter's SHA-256 is checked before loading.
    """
    from .train.backbone import build_backbone

    folder = resolve_adapter_folder(source, revision=revision, token=token)
    config = read_adapter_config(folder)
    record = config.get("base_model") or {}
    if not record.get("name") or record.get("num_classes") is None:
        raise ValueError(
            f"{folder / ADAPTER_CONFIG} has no base_model record (saved by an older petl_zoo): build the "
            "timm model yourself and call petl_zoo.load_adapter(model, folder)"
        )
    model = build_backbone(
        record["name"],
        int(record["num_classes"]),
        pretrained_file=pretrained_file,
        pretrained=pretrained and pretrained_file is None,
        model_kwargs=_model_kwargs(record),
    )
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    load_adapter(model, folder)
    logger.info("loaded %s adapter from %s onto %s", config.get("method"), folder, record["name"])
    return model.eval()


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

    ``source`` is a patched model (saved first with :func:`save_adapter`) or a folder: an adapter folder,
    a run folder or a card folder from ``tools/model_card.py``, of which the adapter files, the card
    (``README.md``) and the run records in :data:`HUB_FILES` are uploaded.
    """
    from huggingface_hub import create_repo, upload_folder

    if isinstance(source, nn.Module):
        with tempfile.TemporaryDirectory(prefix="petl_zoo_push_") as tmp:
            save_adapter(source, tmp, model_kwargs=model_kwargs)
            return push_to_hub(tmp, repo_id, token=token, private=private, commit_message=commit_message)
    folder = Path(source)
    missing = [name for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: not an adapter, run or card folder")
    create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    info = upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        token=token,
        repo_type="model",
        allow_patterns=[name for name in HUB_FILES if (folder / name).is_file()],
        commit_message=commit_message,
    )
    return str(getattr(info, "commit_url", info))
