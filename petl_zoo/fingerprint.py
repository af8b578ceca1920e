"""Fingerprints: what defines a run, as a short hash, so that runs are never mixed up.

Two runs with the same **recipe fingerprint** were made the same way (method and options, model and
creation keywords, base weights, training recipe, preset, input protocol): their results may be
averaged as seeds and compared as one table row. The **run fingerprint** adds the data: the task, its
class count and the data's identity by content (``vtab.data_identity``: each split's list file and its
images' names and sizes), not where it lies, so moved data is the same run and changed data is
another. A finished run folder whose run fingerprint matches a new command is the same run and may be
skipped. Neither covers the seed (a row averages over seeds, a folder is per seed anyway) nor where
the run writes (``--out``), nor how it ran (workers, device count, compile and its backend, gradient
checkpointing, progress bars). Runs recorded before the data identity existed are compared by their
data root's path, as they were then.
A recipe key added later (``NEUTRAL_RECIPE_VALUES``) is left out of the identity at the value that
reproduces the behaviour before it existed, so runs recorded without it keep their fingerprints.

Base weights are identified by the file's SHA-256 when a local file was used (its path may differ
between machines), else by the timm model name with ``pretrained`` on or off.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = [
    "FINGERPRINT_VERSION",
    "NEUTRAL_RECIPE_VALUES",
    "recipe_identity",
    "recipe_fingerprint",
    "run_fingerprint",
    "data_identity",
    "split_text",
    "fingerprints",
    "identity_diff",
]

FINGERPRINT_VERSION = 1
#: Recipe keys that do not change what a run is (the seed varies within a row).
_NOT_IN_RECIPE = ("seed",)
#: Recipe keys added after runs were recorded -> the value that reproduces the behaviour before the key
#: existed (no gradient accumulation, the head at the lr, the cosine schedule, the exact resize, the
#: training split implied by ``select_on``, no gradient clipping). A run at that value is
#: the run recorded without the key, so the key is left out of its identity. The one home of these
#: values: the ``vtab`` recipe (``petl_zoo.train.recipe``) takes its defaults from here.
NEUTRAL_RECIPE_VALUES: dict[str, Any] = {
    "accumulate": 1,
    "head_lr": None,
    "schedule": "cosine",
    "crop": "none",
    "train_split": None,
    "clip_grad": None,
}


def _weights_identity(config: dict[str, Any]) -> dict[str, Any]:
    file = config.get("pretrained_file")
    if file:
        digest = config.get("pretrained_file_sha256")
        if not digest and Path(file).is_file():
            from .io import sha256_file

            digest = sha256_file(file)
        return {"file_sha256": digest or Path(file).name}
    return {"pretrained": bool(config.get("pretrained", True))}


def _is_neutral(key: str, value: Any) -> bool:
    """``value`` of recipe ``key`` is the behaviour before the key existed (``NEUTRAL_RECIPE_VALUES``)."""
    if key not in NEUTRAL_RECIPE_VALUES or isinstance(value, bool):
        return False
    neutral = NEUTRAL_RECIPE_VALUES[key]
    return value is None if neutral is None else value == neutral


def recipe_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a run's ``config.json`` that define how it was made (see the module docstring)."""
    recipe = {
        k: v
        for k, v in (config.get("recipe") or {}).items()
        if k not in _NOT_IN_RECIPE and not _is_neutral(k, v)
    }
    return {
        "version": FINGERPRINT_VERSION,
        "method": config.get("method"),
        "method_options": config.get("method_options") or {},
        "model": config.get("model"),
        "model_kwargs": config.get("model_kwargs") or {},
        "weights": _weights_identity(config),
        "recipe": recipe,
        "preset": config.get("preset"),
    }


def _digest(data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def recipe_fingerprint(config: dict[str, Any]) -> str:
    """16 hex digits naming how a run was made (the same for every task and seed of a table row)."""
    return _digest(recipe_identity(config))


def data_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What a run trained and was tested on: the task, its class count and the data's identity by
    content (``{"data_root": path}`` for runs recorded before the identity was)."""
    data = config.get("data_identity")
    return {
        "task": config.get("task"),
        "num_classes": config.get("num_classes"),
        "data": data if data else {"data_root": config.get("data_root")},
    }


def run_fingerprint(config: dict[str, Any]) -> str:
    """16 hex digits naming the run: the recipe plus the data (:func:`data_identity`)."""
    return _digest({"recipe": recipe_identity(config), **data_identity(config)})


def fingerprints(config: dict[str, Any]) -> dict[str, str]:
    """``{"recipe": ..., "run": ...}``: what ``config.json`` and ``result.json`` record."""
    return {"recipe": recipe_fingerprint(config), "run": run_fingerprint(config)}


def _data_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How two runs' data differ, split by split (``data.test: 797 images 1a2b3c4d -> 400 images ...``);
    a run recorded without a data identity is compared by its data root's path."""
    a, b = old.get("data_identity"), new.get("data_identity")
    if not a or not b:
        ra, rb = old.get("data_root"), new.get("data_root")
        return [] if ra == rb else [f"data_root: {json.dumps(ra)} -> {json.dumps(rb)}"]
    splits_a, splits_b = a.get("splits") or {}, b.get("splits") or {}
    out = []
    for split in sorted(set(splits_a) | set(splits_b), key=lambda k: (k not in splits_a, k)):
        sa, sb = splits_a.get(split), splits_b.get(split)
        if sa != sb:
            out.append(f"data.{split}: {split_text(sa)} -> {split_text(sb)}")
    return out


def split_text(split: dict[str, Any] | None) -> str:
    """One split's identity in a line: ``797 images, list 1a2b3c4d, files 5e6f7a8b``."""
    if not split:
        return "none"
    return f"{split.get('count')} images, list {str(split.get('list_sha256'))[:8]}, files {str(split.get('images_sha256'))[:8]}"


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings that differ between two runs' configs, as ``key: old -> new`` (flattened one level:
    ``recipe.lr: 0.001 -> 0.003``), the task, class count and data included (``data.train: ...``, by
    content); empty when they are the same run."""
    a = {**recipe_identity(old), "task": old.get("task"), "num_classes": old.get("num_classes")}
    b = {**recipe_identity(new), "task": new.get("task"), "num_classes": new.get("num_classes")}
    out = []
    for key in a:
        va, vb = a[key], b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            for sub in sorted(set(va) | set(vb)):
                if json.dumps(va.get(sub), sort_keys=True) != json.dumps(vb.get(sub), sort_keys=True):
                    out.append(f"{key}.{sub}: {json.dumps(va.get(sub))} -> {json.dumps(vb.get(sub))}")
        elif json.dumps(va, sort_keys=True) != json.dumps(vb, sort_keys=True):
            out.append(f"{key}: {json.dumps(va)} -> {json.dumps(vb)}")
    return out + _data_diff(old, new)
