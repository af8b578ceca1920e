"""The run folder: the one module that knows a run's file names, their formats and how to read them.

A run folder (``tools/train.py --out``, one per method, task and seed) holds::

    config.json          the resolved settings and their fingerprints, written when the run starts
    metrics.jsonl        one JSON record per epoch (rewritten from last.pt on --resume)
    last.pt              the resumable training state (petl_zoo.train.checkpoint writes its content)
    run.lock             who trains in the folder now (petl_zoo.train.lock)
    adapter.safetensors  the method's tensors and the head (petl_zoo.save_adapter)
    adapter_config.json  the adapter's method, options and base model record
    result.json          written last: its presence means the run finished

and a tuning sweep writes, per method and task, ``tune-<grid fingerprint>/selection.json`` (the
tuning record: every grid point's val accuracy, the winner and the retrained seeds). A card folder
(petl_zoo.cards) and a Hub repo keep the config under ``train_config.json``.

JSON files are written atomically (petl_zoo.io) and read with one message per damage: a file that
cannot be read, is empty, truncated or not valid JSON, or does not hold a JSON object is one
ValueError line naming the file and what to do. Nothing else in the package spells these names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fingerprint import recipe_fingerprint, run_fingerprint
from .io import append_text, atomic_write_json, atomic_write_text, read_json, sha256_file

__all__ = [
    "CONFIG",
    "METRICS",
    "RESULT",
    "CHECKPOINT",
    "LOCK",
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "SELECTION",
    "CARD_CONFIG",
    "RUN_FILES",
    "BUSY_EXIT_STATUS",
    "TUNE_PREFIX",
    "OPT_PREFIX",
    "SELECTION_VERSION",
    "Fingerprints",
    "read_record",
    "with_weights_digest",
    "RunFolder",
    "GridPoint",
    "Selection",
    "read_selection",
    "read_selections",
    "in_tuning",
    "tune_folders",
    "selection_path",
    "read_selection_data",
    "write_selection",
    "parse_selection",
    "finished_runs",
]

log = logging.getLogger(__name__)

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
CHECKPOINT = "last.pt"
LOCK = "run.lock"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SELECTION = "selection.json"
#: The run config's name in a card folder and a Hub repo (the Hub reads ``config.json`` as a model config).
CARD_CONFIG = "train_config.json"
#: What ``--overwrite`` deletes: the files one training run writes (the lock is its holder's to remove).
RUN_FILES = (CONFIG, METRICS, RESULT, ADAPTER_WEIGHTS, ADAPTER_CONFIG, CHECKPOINT)
#: The trainer's exit status when another live process holds the folder's lock (EX_TEMPFAIL: busy, try
#: again later); the sweep counts such a run as busy, not failed.
BUSY_EXIT_STATUS = 75
#: The folder name prefix of a tuning record (``tune-<grid fingerprint>``).
TUNE_PREFIX = "tune-"
SELECTION_VERSION = 1

_WHAT = {
    CONFIG: "run config",
    RESULT: "run result",
    ADAPTER_CONFIG: "adapter config",
    SELECTION: "selection record",
}


def read_record(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; a damaged file or one that does not hold an object is one ValueError
    line naming it (``what``: e.g. "run config")."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(
            f"{what} {path} does not hold a JSON object (found {type(data).__name__}): repair it or "
            "remove the run folder"
        )
    return data


@dataclass(frozen=True)
class Fingerprints:
    """A run's recipe fingerprint (how it was made: a table row) and run fingerprint (the recipe plus
    the data: the same run), as recorded, else computed from its config; None when neither can be had."""

    recipe: str | None
    run: str | None


def _recorded(record: dict[str, Any] | None, key: str) -> str | None:
    fp = (record or {}).get("fingerprint")
    value = fp.get(key) if isinstance(fp, dict) else None
    return value if isinstance(value, str) and value else None


def with_weights_digest(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``pretrained_file_sha256`` filled in from the weights file when it lacks one
    (hashed once per file: :func:`petl_zoo.io.sha256_file` remembers it)."""
    file = config.get("pretrained_file")
    if not file or config.get("pretrained_file_sha256") or not Path(file).is_file():
        return config
    return {**config, "pretrained_file_sha256": sha256_file(file)}


@dataclass(frozen=True)
class RunFolder:
    """One run folder: where each of its files lies, whether the run started, finished or is killed,
    and its records read (damaged files are one ValueError line) and written (atomically)."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ where the files lie
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def result_path(self) -> Path:
        return self.path / RESULT

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    @property
    def adapter_config_path(self) -> Path:
        return self.path / ADAPTER_CONFIG

    @property
    def adapter_weights_path(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    # ------------------------------------------------------------------ what state the run is in
    @property
    def finished(self) -> bool:
        """result.json is written last: the run ended."""
        return self.result_path.is_file()

    @property
    def has_config(self) -> bool:
        return self.config_path.is_file()

    @property
    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    @property
    def holds_run(self) -> bool:
        """A run started here (config.json) or ended here (result.json)."""
        return self.has_config or self.finished

    @property
    def killed(self) -> bool:
        """Started but not finished: a ``last.pt``, or config.json alone (killed before its first epoch)."""
        return not self.finished and (self.has_checkpoint or self.has_config)

    @property
    def has_adapter(self) -> bool:
        return self.adapter_config_path.is_file() and self.adapter_weights_path.is_file()

    def missing(self, names: tuple[str, ...]) -> list[str]:
        """Which of the files ``names`` the folder lacks."""
        return [n for n in names if not (self.path / n).is_file()]

    # ------------------------------------------------------------------ reading
    def read_config(self) -> dict[str, Any] | None:
        """config.json (None when there is none)."""
        return read_record(self.config_path, _WHAT[CONFIG]) if self.has_config else None

    def read_result(self) -> dict[str, Any] | None:
        """result.json (None while the run has not finished)."""
        return read_record(self.result_path, _WHAT[RESULT]) if self.finished else None

    def read_metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records (empty when there is none); a damaged line is a ValueError naming it."""
        if not self.metrics_path.is_file():
            return []
        records = []
        for i, line in enumerate(self.metrics_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"metrics {self.metrics_path} line {i} is not valid JSON ({err.msg})"
                ) from None
        return records

    def fingerprints(
        self, config: dict[str, Any] | None = None, result: dict[str, Any] | None = None
    ) -> Fingerprints:
        """The fingerprints the run recorded (result.json, then config.json), else computed from its
        config; pass the records already read to read nothing again."""
        config = self.read_config() if config is None else config
        result = (self.read_result() if self.finished else None) if result is None else result
        recipe = _recorded(result, "recipe") or _recorded(config, "recipe")
        run = _recorded(result, "run") or _recorded(config, "run")
        if config and config.get("method"):  # the weights file is hashed when config lacks its digest
            recipe = recipe or recipe_fingerprint(config)
            run = run or run_fingerprint(config)
        return Fingerprints(recipe, run)

    # ------------------------------------------------------------------ writing
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config_path, config)

    def write_result(self, result: dict[str, Any]) -> None:
        """result.json, written last: from now on the run counts as finished."""
        atomic_write_json(self.result_path, result)

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """metrics.jsonl with exactly ``records`` (a fresh start: none; a resume: those of last.pt)."""
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_text(self.metrics_path, json.dumps(record) + "\n")

    def clear(self) -> None:
        """Delete the run files (and leftover temporary files of atomic writes), nothing else."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for tmp in self.path.glob(".*.tmp"):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


# ---------------------------------------------------------------------- tuning records
@dataclass(frozen=True)
class GridPoint:
    setting: dict[str, Any]
    folder: Path
    val_accuracy: float | None


@dataclass(frozen=True)
class Selection:
    """One (method, task) tuning record (``selection.json``, version 1)::

        {"version": 1, "method": "lora", "task": "digits", "grid_fingerprint": "<16 hex>",
         "grid": {"lr": [0.001, 0.005], "opt.rank": [4, 8]}, "rule": "<how the winner was chosen>",
         "points": [{"setting": {"lr": 0.001, "opt.rank": 4}, "folder": "<relative path>",
                     "val_accuracy": 91.2}, ...],
         "winner": {"lr": ..., "opt.rank": ...},
         "retrained": [{"seed": 0, "folder": "<relative path>"}, ...]}

    Folders are relative to the record's folder and resolved against it here; grid-point and retrained
    folders are ordinary run folders."""

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

    def retrained_mismatch(self, config: dict[str, Any] | None, seed: Any) -> str | None:
        """Why the run of ``config`` is not this record's winner retrained with ``seed`` (None when it
        is): the record names folders, the run's own config says what was trained there."""
        if not config:
            return "it has no run config to check against the winner"
        recipe, options = config.get("recipe") or {}, config.get("method_options") or {}
        if config.get("method") != self.method:
            return f"it is a {config.get('method')} run, not {self.method}"
        if recipe.get("seed") != seed:
            return f"it was trained with seed {recipe.get('seed')}, the record says {seed}"
        for key, value in self.winner.items():
            option = key[len(OPT_PREFIX) :] if key.startswith(OPT_PREFIX) else None
            found = options.get(option) if option else recipe.get(key)
            if not _same_setting(found, value):
                return f"it was trained with {key}={found!r}, the winner is {key}={value!r}"
        return None


#: A grid key naming a method option (``opt.rank``); other keys are recipe settings (``lr``).
OPT_PREFIX = "opt."


def _same_setting(found: Any, wanted: Any) -> bool:
    """Whether a run's recorded setting is a grid value: numbers by value, lists as ``a,b`` text."""
    if isinstance(found, (int, float)) and isinstance(wanted, (int, float)):
        return float(found) == float(wanted)
    if isinstance(found, (list, tuple)):
        found = ",".join(map(str, found))
    if isinstance(wanted, (list, tuple)):
        wanted = ",".join(map(str, wanted))
    return str(found) == str(wanted)


_SELECTION_KEYS = ("method", "task", "grid_fingerprint", "grid", "points", "winner", "retrained")


def _folder(base: Path, value: Any, what: str) -> Path:
    """A folder the record names, resolved against the record's folder; it must lie inside it (the
    record is data: an absolute path or ``..`` cannot point the table at another run)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} folder is not a path")
    folder = Path(os.path.normpath(base / value))
    if Path(value).is_absolute() or folder == base or base not in folder.parents:
        raise ValueError(f"{what} folder {value!r} is not a folder inside {base}")
    return folder


def _point(base: Path, raw: Any, i: int) -> GridPoint:
    if not isinstance(raw, dict) or not isinstance(raw.get("setting"), dict):
        raise ValueError(f"points[{i}] has no 'setting' mapping")
    val = raw.get("val_accuracy")
    if val is not None and not isinstance(val, (int, float)):
        raise ValueError(f"points[{i}].val_accuracy {val!r} is not a number")
    return GridPoint(dict(raw["setting"]), _folder(base, raw.get("folder"), f"points[{i}]"), val)


def parse_selection(path: Path, data: Any) -> Selection:
    """The record ``data`` read from ``path``; ValueError saying what is malformed."""
    if not isinstance(data, dict) or data.get("version") != SELECTION_VERSION:
        raise ValueError(f"not a version-{SELECTION_VERSION} selection record")
    missing = [k for k in _SELECTION_KEYS if k not in data]
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
        return parse_selection(path, json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as e:
        log.warning("skipping %s: cannot read it (%s)", path, getattr(e, "strerror", None) or e)
    except json.JSONDecodeError as e:
        log.warning("skipping %s: not valid JSON (%s at line %d)", path, e.msg, e.lineno)
    except (ValueError, TypeError) as e:
        log.warning("skipping %s: %s", path, e)
    return None


def selection_path(tune_folder: str | os.PathLike) -> Path:
    """Where a tuning folder keeps its record."""
    return Path(tune_folder) / SELECTION


def read_selection_data(tune_folder: str | os.PathLike) -> dict[str, Any] | None:
    """The raw record a tuning folder holds (None when absent or damaged: the sweep rewrites it)."""
    try:
        return read_record(selection_path(tune_folder), _WHAT[SELECTION])
    except (OSError, ValueError):
        return None


def write_selection(tune_folder: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write the record atomically, only when its content changes (a rerun writes nothing)."""
    if read_selection_data(tune_folder) != record:
        atomic_write_json(selection_path(tune_folder), record)


def tune_folders(root: str | os.PathLike) -> list[Path]:
    """Every ``tune-*`` folder below ``root`` (sorted)."""
    return sorted(p for p in Path(root).rglob(f"{TUNE_PREFIX}*") if p.is_dir())


def read_selections(root: str | os.PathLike) -> list[Selection]:
    """Every readable ``tune-*/selection.json`` below ``root`` (sorted); a ``tune-*`` folder without a
    readable record is warned about (its runs are still left out of the ordinary rows)."""
    out = []
    for folder in tune_folders(root):
        path = selection_path(folder)
        if not path.is_file():
            log.warning("skipping %s: no %s (tuning not finished?)", folder, SELECTION)
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


def finished_runs(root: str | os.PathLike) -> list[RunFolder]:
    """Every finished run folder below ``root`` (a result.json), sorted by path."""
    return [RunFolder(p.parent) for p in sorted(Path(root).rglob(RESULT))]
