"""Tuning records for the table: the ``selection.json`` files the tuning sweep writes.

Per method and task the sweep writes ``<out_root>/<method>/<task>/tune-<grid_fp>/selection.json``
(version 1)::

    {"version": 1, "method": "lora", "task": "digits", "grid_fingerprint": "<16 hex>",
     "grid": {"lr": [0.001, 0.005], "opt.rank": [4, 8]}, "rule": "<how the winner was chosen>",
     "points": [{"setting": {"lr": 0.001, "opt.rank": 4}, "folder": "<relative path>",
                 "val_accuracy": 91.2}, ...],
     "winner": {"lr": ..., "opt.rank": ...},
     "retrained": [{"seed": 0, "folder": "<relative path>"}, ...]}

Folders are relative to the ``selection.json``'s folder; grid-point and retrained folders are ordinary
run folders (``config.json``, ``result.json``). The table builds one *tuned* row per (method, grid
fingerprint) from the retrained runs, and leaves every folder below a ``tune-*`` folder (and every
folder a selection names) out of its ordinary grouping. A missing or damaged ``selection.json`` is
skipped with a one-line warning.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SELECTION_VERSION",
    "TUNE_PREFIX",
    "GridPoint",
    "Selection",
    "read_selection",
    "read_selections",
    "in_tuning",
]

log = logging.getLogger(__name__)

SELECTION_VERSION = 1
#: The folder name prefix of a tuning record (``tune-<grid fingerprint>``).
TUNE_PREFIX = "tune-"
_REQUIRED = ("method", "task", "grid_fingerprint", "grid", "points", "winner", "retrained")


@dataclass(frozen=True)
class GridPoint:
    setting: dict[str, Any]
    folder: Path
    val_accuracy: float | None


@dataclass(frozen=True)
class Selection:
    """One (method, task) tuning record; folders are resolved against the record's folder."""

    path: Path
    method: str
    task: str
    grid_fingerprint: str
    grid: dict[str, list[Any]]
    rule: str
    points: tuple[GridPoint, ...]
    winner: dict[str, Any]
    retrained: tuple[tuple[Any, Path], ...]  # (seed, folder)

    @property
    def folders(self) -> set[Path]:
        """Every run folder the record names (grid points and retrained runs)."""
        return {p.folder for p in self.points} | {f for _, f in self.retrained}

    def is_winner(self, point: GridPoint) -> bool:
        return all(point.setting.get(k) == v for k, v in self.winner.items())


def _folder(base: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} folder is not a path")
    return Path(os.path.normpath(base / value))


def _point(base: Path, raw: Any, i: int) -> GridPoint:
    if not isinstance(raw, dict) or not isinstance(raw.get("setting"), dict):
        raise ValueError(f"points[{i}] has no 'setting' mapping")
    val = raw.get("val_accuracy")
    if val is not None and not isinstance(val, (int, float)):
        raise ValueError(f"points[{i}].val_accuracy {val!r} is not a number")
    return GridPoint(dict(raw["setting"]), _folder(base, raw.get("folder"), f"points[{i}]"), val)


def _parse(path: Path, data: Any) -> Selection:
    if not isinstance(data, dict) or data.get("version") != SELECTION_VERSION:
        raise ValueError(f"not a version-{SELECTION_VERSION} selection record")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    if not isinstance(data["grid"], dict) or not isinstance(data["winner"], dict):
        raise ValueError("'grid' and 'winner' must be mappings")
    base = path.parent
    points = tuple(_point(base, raw, i) for i, raw in enumerate(data["points"] or []))
    retrained = []
    for i, raw in enumerate(data["retrained"] or []):
        if not isinstance(raw, dict) or "seed" not in raw:
            raise ValueError(f"retrained[{i}] has no 'seed'")
        retrained.append((raw["seed"], _folder(base, raw.get("folder"), f"retrained[{i}]")))
    return Selection(
        path=path,
        method=str(data["method"]),
        task=str(data["task"]),
        grid_fingerprint=str(data["grid_fingerprint"]),
        grid={str(k): list(v) if isinstance(v, list) else [v] for k, v in data["grid"].items()},
        rule=str(data.get("rule", "")),
        points=points,
        winner=dict(data["winner"]),
        retrained=tuple(retrained),
    )


def read_selection(path: str | os.PathLike) -> Selection | None:
    """The record in ``path``; None (with a one-line warning) when it cannot be read or is malformed."""
    path = Path(path)
    try:
        return _parse(path, json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as e:
        log.warning("skipping %s: cannot read it (%s)", path, getattr(e, "strerror", None) or e)
    except json.JSONDecodeError as e:
        log.warning("skipping %s: not valid JSON (%s at line %d)", path, e.msg, e.lineno)
    except (ValueError, TypeError) as e:
        log.warning("skipping %s: %s", path, e)
    return None


def _tune_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f"{TUNE_PREFIX}*") if p.is_dir())


def read_selections(root: str | os.PathLike) -> list[Selection]:
    """Every readable ``tune-*/selection.json`` below ``root`` (sorted); a ``tune-*`` folder without a
    readable record is warned about (its runs are still left out of the ordinary rows)."""
    out = []
    for folder in _tune_folders(Path(root)):
        path = folder / "selection.json"
        if not path.is_file():
            log.warning("skipping %s: no selection.json (tuning not finished?)", folder)
            continue
        record = read_selection(path)
        if record is not None:
            out.append(record)
    return out


def in_tuning(path: Path, root: Path) -> bool:
    """Whether ``path`` lies below a ``tune-*`` folder under ``root``."""
    try:
        parts = path.relative_to(root).parts[:-1]
    except ValueError:
        return False
    return any(p.startswith(TUNE_PREFIX) for p in parts)
