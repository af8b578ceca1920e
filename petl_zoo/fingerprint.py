"""Fingerprints: what defines a run, as a short hash, so that runs are never mixed up.

Two runs with the same **recipe fingerprint** were made the same way (method and options, model and
creation keywords, base weights, training recipe, preset, input protocol): their results may be
averaged as seeds and compared as one table row. The **run fingerprint** adds the data (task and data
root): a finished run folder whose run fingerprint matches a new command is the same run and may be
skipped. Neither covers the seed (a row averages over seeds, a folder is per seed anyway) nor where
the run writes (``--out``), nor how it ran (workers, device count, compile, progress bars).

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
    "recipe_identity",
    "recipe_fingerprint",
    "run_fingerprint",
    "fingerprints",
    "identity_diff",
]

FINGERPRINT_VERSION = 1
#: Recipe keys that do not change what a run is (the seed varies within a row).
_NOT_IN_RECIPE = ("seed",)


def _weights_identity(config: dict[str, Any]) -> dict[str, Any]:
    file = config.get("pretrained_file")
    if file:
        digest = config.get("pretrained_file_sha256")
        if not digest and Path(file).is_file():
            from .io import sha256_file

            digest = sha256_file(file)
        return {"file_sha256": digest or Path(file).name}
    return {"pretrained": bool(config.get("pretrained", True))}


def recipe_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a run's ``config.json`` that define how it was made (see the module docstring)."""
    recipe = {k: v for k, v in (config.get("recipe") or {}).items() if k not in _NOT_IN_RECIPE}
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


def run_fingerprint(config: dict[str, Any]) -> str:
    """16 hex digits naming the run: the recipe plus the task and the data root."""
    return _digest(
        {"recipe": recipe_identity(config), "task": config.get("task"), "data_root": config.get("data_root")}
    )


def fingerprints(config: dict[str, Any]) -> dict[str, str]:
    """``{"recipe": ..., "run": ...}``: what ``config.json`` and ``result.json`` record."""
    return {"recipe": recipe_fingerprint(config), "run": run_fingerprint(config)}


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings that differ between two runs' configs, as ``key: old -> new`` (flattened one level:
    ``recipe.lr: 0.001 -> 0.003``), task and data root included; empty when they are the same run."""
    a = {**recipe_identity(old), "task": old.get("task"), "data_root": old.get("data_root")}
    b = {**recipe_identity(new), "task": new.get("task"), "data_root": new.get("data_root")}
    out = []
    for key in a:
        va, vb = a[key], b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            for sub in sorted(set(va) | set(vb)):
                if json.dumps(va.get(sub), sort_keys=True) != json.dumps(vb.get(sub), sort_keys=True):
                    out.append(f"{key}.{sub}: {json.dumps(va.get(sub))} -> {json.dumps(vb.get(sub))}")
        elif json.dumps(va, sort_keys=True) != json.dumps(vb, sort_keys=True):
            out.append(f"{key}: {json.dumps(va)} -> {json.dumps(vb)}")
    return out
