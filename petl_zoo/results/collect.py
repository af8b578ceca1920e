"""Runs to rows: read every finished run folder below a folder and group the runs into table rows.

A row is one method, model, method config and **recipe fingerprint** (:meth:`RunFolder.fingerprints`:
the fingerprint the run recorded, else computed from its config; it covers the protocol and the preset),
so only runs made the same way are averaged as seeds. Rows of one method that differ are labelled with
what differs (``lora (recipe.epochs=3)``). A finished run without a config is grouped by method, model
and method config. A tuning sweep's runs (below ``tune-*`` folders) are left out of this grouping: the
retrained runs of one grid make one *tuned* row per method over tasks (:func:`tuned_rows`).

A result or config that cannot be read or is not valid JSON is an error naming the file (a run folder is
damaged: nothing is averaged over what is left); a result without ``method``/``task`` is skipped with a
warning.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fingerprint import identity_diff, recipe_identity
from ..runfolder import (
    CONFIG,
    RunFolder,
    Selection,
    finished_runs,
    in_tuning,
    read_selections,
    with_weights_digest,
)
from .benchmarks import VTAB_1K, Benchmark, canonical_task

__all__ = ["RunRecord", "read_run", "collect_results", "Row", "build_rows", "tuned_rows", "collect_rows"]


@dataclass(frozen=True)
class RunRecord:
    """One finished run: its folder, its result, its config (the weights digest filled in; None without
    one) and its recipe fingerprint (None when neither recorded nor computable)."""

    folder: RunFolder
    result: dict[str, Any]
    config: dict[str, Any] | None
    recipe: str | None

    @property
    def path(self) -> Path:
        """The run's result file."""
        return self.folder.result_path

    @property
    def method(self) -> str:
        return str(self.result["method"])

    @property
    def task(self) -> str:
        return str(self.result["task"])


def read_run(folder: RunFolder) -> RunRecord | None:
    """The finished run in ``folder``; None (with a warning) for a result that is not a train.py result.
    A damaged result or config raises ValueError naming the file."""
    result = folder.read_result()
    if result is None or "task" not in result or "method" not in result:
        warnings.warn(
            f"skipping {folder.result_path}: not a train.py result (no 'method'/'task')", stacklevel=3
        )
        return None
    _check_accuracies(folder, result)
    config = folder.read_config()
    config = with_weights_digest(config) if config is not None else None
    return RunRecord(folder, result, config, folder.fingerprints(config, result).recipe)


#: The accuracies a table cell shows (None is a run that recorded none: a ``--no-test`` run).
ACCURACY_FIELDS = ("test_acc_best", "test_acc_last")


def _check_accuracies(folder: RunFolder, result: dict[str, Any]) -> None:
    """One warning line per accuracy the result lacks or holds as something other than a number in
    [0, 1] or a percentage (NaN, text): its cell is left blank, never filled with a wrong number."""
    for field_name in ACCURACY_FIELDS:
        if field_name not in result:
            why = "is missing"
        else:
            value = result[field_name]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is None or (number and math.isfinite(value) and 0 <= value <= 100):
                continue
            why = f"is {value!r}, not an accuracy"
        warnings.warn(f"{folder.result_path}: {field_name} {why}; its cell is blank", stacklevel=4)


def collect_results(root: str | os.PathLike, exclude: Collection[str | os.PathLike] = ()) -> list[RunRecord]:
    """Every finished run below ``root`` (sorted by result path). Runs of a tuning sweep (below a
    ``tune-*`` folder, or a folder in ``exclude``) are left out: they make the tuned rows.

    A result or config that cannot be read or parsed raises ValueError naming it; a result that is not a
    train.py result (no ``method``/``task``) is skipped with a warning."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"results folder '{root}' does not exist")
    skip = {os.path.normpath(p) for p in exclude}
    out = []
    for folder in finished_runs(root):
        if in_tuning(folder.result_path, root) or os.path.normpath(folder.path) in skip:
            continue
        record = read_run(folder)
        if record is not None:
            out.append(record)
    return out


@dataclass
class Row:
    """One table row: a method with one model, one method config and one recipe; runs[task][seed] = run.

    ``recipe`` is the runs' recipe fingerprint and ``run_config`` the config of one of them (both None
    for runs without a config). A *tuned* row (``selections`` set) holds the retrained runs of one tuning
    grid over tasks: each task's runs use that task's winning setting."""

    method: str
    model: str
    config: dict[str, Any]
    label: str = ""
    runs: dict[str, dict[Any, RunRecord]] = field(default_factory=dict)
    recipe: str | None = None
    run_config: dict[str, Any] | None = None
    selections: list[Selection] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.method} ({self.label})" if self.label else self.method

    def records(self) -> Iterator[RunRecord]:
        """Every run of the row, task by task."""
        for seeds in self.runs.values():
            yield from seeds.values()

    def _settings(self, get: Callable[[dict[str, Any]], Any]) -> str:
        """The distinct values of one config setting over the row's runs ('' without configs)."""
        configs = [r.config for r in self.records() if r.config]
        return ", ".join(sorted({str(get(c)) for c in configs}))

    @property
    def protocol(self) -> str:
        """The input protocol of the runs (recipe ``protocol``: ``vtab`` = [0, 1] inputs, ``default`` =
        the backbone's normalisation); '?' for a config without one, '' without a config."""
        return self._settings(lambda c: (c.get("recipe") or {}).get("protocol") or "?")

    @property
    def preset(self) -> str:
        """The preset the runs were made with (config ``preset``), '-' for none."""
        return self._settings(lambda c: c.get("preset") or "-")


def _freeze(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _flat_identity(config: dict[str, Any]) -> dict[str, Any]:
    """A run's recipe identity flattened one level (``recipe.epochs``), as ``identity_diff`` names keys."""
    flat: dict[str, Any] = {}
    for key, value in recipe_identity(config).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


def _recipe_keys(same: list[Row]) -> list[str]:
    """The recipe settings that differ between rows of one method (``identity_diff`` key names)."""
    configs = [r.run_config for r in same if r.run_config is not None]
    if len(configs) < 2:
        return []
    # a row spans tasks: only the recipe is compared, not the task and its data
    neutral = {"task": None, "num_classes": None, "data_root": None, "data_identity": None}
    ref = {**configs[0], **neutral}
    keys: list[str] = []
    for other in configs[1:]:
        for line in identity_diff(ref, {**other, **neutral}):
            key = line.split(": ", 1)[0]
            if key not in keys:
                keys.append(key)
    return keys


def _already_shown(key: str, shown: set[str]) -> bool:
    """A recipe key the label names anyway: the method, the model, an option shown from method_config."""
    option = key.removeprefix("method_options.")
    return key in ("method", "model") or (option != key and option in shown)


def _label_text(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return value[:12] if key.endswith("sha256") else value
    return json.dumps(value, sort_keys=True)


def _label_rows(same: list[Row]) -> None:
    """Label the rows of one method by what differs: model, method config, then recipe settings."""
    models = {r.model for r in same}
    keys = sorted({k for r in same for k in r.config})
    varying = [k for k in keys if len({_freeze(r.config.get(k)) for r in same}) > 1]
    shown = set(varying) | ({"model"} if len(models) > 1 else set())
    recipe_keys = [k for k in _recipe_keys(same) if not _already_shown(k, shown)]
    recipes = {r.recipe for r in same}
    for r in same:
        parts = [r.model] if len(models) > 1 else []
        parts += [f"{k}={r.config.get(k)}" for k in varying]
        if r.run_config is not None:
            flat = _flat_identity(r.run_config)
            parts += [f"{k}={_label_text(k, flat.get(k))}" for k in recipe_keys]
        elif len(recipes) > 1:
            parts.append(f"no {CONFIG}" if r.recipe is None else f"recipe {r.recipe[:8]}")
        r.label = ", ".join(parts)
    labels = [r.label for r in same]
    for r in same:  # recipes the keys above cannot tell apart (e.g. only a recorded fingerprint)
        if r.recipe is not None and labels.count(r.label) > 1:
            r.label = ", ".join(filter(None, [r.label, f"recipe {r.recipe[:8]}"]))


def _add_run(row: Row, record: RunRecord, benchmark: Benchmark) -> None:
    """``record`` into ``row`` under its task and seed (a second run of one seed is warned about)."""
    task = canonical_task(record.task, benchmark)
    seed = record.result.get("seed", 0)
    seeds = row.runs.setdefault(task, {})
    if seed in seeds:
        warnings.warn(
            f"two results for {row.name}/{task} seed {seed}: keeping {seeds[seed].path}, ignoring {record.path}",
            stacklevel=3,
        )
        return
    seeds[seed] = record


def build_rows(results: list[RunRecord], benchmark: Benchmark = VTAB_1K) -> list[Row]:
    """Group runs by (method, model, method_config, recipe fingerprint); label rows of one method that
    differ. Runs without a recipe fingerprint (no config) group as one recipe."""
    rows: dict[tuple[str, str, str, str], Row] = {}
    for r in results:
        config = r.result.get("method_config") or {}
        key = (r.method, str(r.result.get("model", "")), _freeze(config), r.recipe or "")
        row = rows.setdefault(key, Row(key[0], key[1], dict(config), recipe=r.recipe))
        if row.run_config is None:
            row.run_config = r.config
        _add_run(row, r, benchmark)
    by_method: dict[str, list[Row]] = {}
    for row in rows.values():
        by_method.setdefault(row.method, []).append(row)
    for same in by_method.values():
        if len(same) > 1:
            _label_rows(same)
    return sorted(rows.values(), key=lambda r: (r.method, r.model, r.label))


def _tuned_label(selections: list[Selection], several: bool) -> str:
    keys = list(dict.fromkeys(k for sel in selections for k in sel.grid))
    label = f"tuned on val200 ({' x '.join(keys)})"
    return f"{label}, grid {selections[0].grid_fingerprint[:8]}" if several else label


def _add_retrained(row: Row, selection: Selection, benchmark: Benchmark) -> None:
    """The retrained runs of one record into ``row`` (a missing or foreign result is warned about)."""
    task = canonical_task(selection.task, benchmark)
    for seed, path in selection.retrained:
        folder = RunFolder(path)
        if not folder.finished:
            warnings.warn(
                f"{selection.path}: retrained seed {seed} has no {folder.result_path} yet", stacklevel=3
            )
            continue
        record = read_run(folder)
        if record is None:
            continue
        if record.method != selection.method or canonical_task(record.task, benchmark) != task:
            warnings.warn(
                f"{selection.path}: {record.path} is a {record.result['method']}/{record.result['task']} run",
                stacklevel=3,
            )
            continue
        why = selection.retrained_mismatch(record.config, seed)
        if why is not None:
            warnings.warn(f"{selection.path}: retrained seed {seed} left out: {why}", stacklevel=3)
            continue
        row.model = row.model or str(record.result.get("model", ""))
        row.run_config = row.run_config or record.config
        row.runs.setdefault(task, {})[record.result.get("seed", seed)] = record


def tuned_rows(selections: list[Selection], benchmark: Benchmark = VTAB_1K) -> list[Row]:
    """One row per (method, grid fingerprint) over the tasks of its records, from the retrained runs."""
    groups: dict[tuple[str, str], list[Selection]] = {}
    for sel in selections:
        groups.setdefault((sel.method, sel.grid_fingerprint), []).append(sel)
    per_method = [m for m, _ in groups]
    rows = []
    for (method, _), same in sorted(groups.items()):
        row = Row(method, "", {}, label=_tuned_label(same, per_method.count(method) > 1), selections=same)
        for sel in sorted(same, key=lambda s: s.task):
            _add_retrained(row, sel, benchmark)
        rows.append(row)
    return rows


def collect_rows(
    root: str | os.PathLike, benchmark: Benchmark = VTAB_1K
) -> tuple[list[Row], list[Selection]]:
    """The table rows below ``root``: ordinary rows (grouped by recipe) then tuned rows, and the records."""
    selections = read_selections(root)
    exclude = {str(f) for sel in selections for f in sel.folders}
    rows = build_rows(collect_results(root, exclude=exclude), benchmark) + tuned_rows(selections, benchmark)
    return rows, selections
