"""The VTAB-1K results table: collect every ``result.json`` below a folder and print one row per method.

Columns: method, model, input protocol (recipe ``protocol``: ``vtab`` = unnormalised [0, 1] inputs,
``default`` = the backbone's own normalisation) and preset (config.json ``preset``, ``-`` for none);
the 19 tasks in VTAB order, then any other task found (custom tasks); the three group means (Natural,
Specialized, Structured, then the groups of other tasks: ``demo`` for digits, ``other``); the two
averaging conventions, always labelled: ``Mean of groups`` (the mean of the group means, what most
papers print) and ``Mean of tasks`` (the plain mean; the 19-task mean at 19/19); the method's
trainable parameters in millions (head excluded, mean over the row's runs) and ``Tasks`` (VTAB tasks
present of 19, ``+k`` other tasks).

Rules: accuracies are percentages with one decimal; several seeds of a task give ``mean +- std`` (sample
std, ddof=1); a missing run is a blank cell, never a zero. Means are over the tasks present: a group
over part of its tasks prints ``(present/all)``, and the notes under the table say which tasks the
means of an incomplete row cover. Last epoch (``test_acc_last``, no selection on test) is the first
table, best-of-test (``test_acc_best``, most papers' number) the second.

Only runs made the same way are averaged as seeds: a row is one method, model, method config and
**recipe fingerprint** (:func:`petl_zoo.fingerprint.recipe_fingerprint` of the run's ``config.json``
next to its ``result.json``, or the ``fingerprint`` the run recorded; it covers the protocol and the
preset). Runs of one method that differ get rows of their own, labelled with what differs
(``lora (recipe.epochs=3)``). A result folder without ``config.json`` is grouped as before, by method,
model and method config. A tuning sweep's runs (below ``tune-*`` folders, :mod:`petl_zoo.tuned`) are
left out of this grouping: the retrained runs of one grid make one *tuned* row per method over tasks.

``--published`` adds the published rows (:mod:`petl_zoo.published`) as a table of their own, with
source, selection rule, weights and input normalisation; ``--plot`` draws accuracy against trainable
parameters (:mod:`petl_zoo.plot`). Details: docs/table.md.

A ``result.json`` or ``config.json`` that cannot be read or is not valid JSON is an error naming the
file (a run folder is damaged: nothing is averaged over what is left); the command line reports it as
one ``error: ...`` line (``PETL_ZOO_DEBUG=1``: the traceback).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NoReturn

import vtab

from .fingerprint import identity_diff, recipe_fingerprint, recipe_identity
from .io import atomic_write_text, sha256_file
from .published import PublishedRow, load_published, recompute
from .tuned import Selection, in_tuning, read_selections

__all__ = [
    "GROUPS",
    "HEADERS",
    "TaskEntry",
    "vtab_catalog",
    "canonical_task",
    "collect_results",
    "Row",
    "build_rows",
    "Cell",
    "compute_table",
    "render",
    "render_published",
    "render_selection",
    "select_published",
    "collect_rows",
    "tuned_rows",
    "task_group",
    "plot_points",
    "write_plot",
    "vtab_table",
    "main",
]

GROUPS = vtab.GROUPS

# The short column header of each VTAB-1K task (the names, groups and order are vtab's: vtab.tasks()).
HEADERS: dict[str, str] = {
    "cifar": "CIFAR-100",
    "caltech101": "Caltech101",
    "dtd": "DTD",
    "oxford_flowers102": "Flowers102",
    "oxford_iiit_pet": "Pets",
    "svhn": "SVHN",
    "sun397": "Sun397",
    "patch_camelyon": "Camelyon",
    "eurosat": "EuroSAT",
    "resisc45": "Resisc45",
    "diabetic_retinopathy": "Retinopathy",
    "clevr_count": "Clevr-Count",
    "clevr_dist": "Clevr-Dist",
    "dmlab": "DMLab",
    "kitti": "KITTI-Dist",
    "dsprites_loc": "dSpr-Loc",
    "dsprites_ori": "dSpr-Ori",
    "smallnorb_azi": "sNORB-Azim",
    "smallnorb_ele": "sNORB-Elev",
}


@dataclass(frozen=True)
class TaskEntry:
    name: str
    group: str
    header: str


def vtab_catalog() -> list[TaskEntry]:
    """The 19 VTAB-1K tasks in table order: names, groups and order from ``vtab.tasks()``, with headers."""
    return [TaskEntry(t.name, t.group, HEADERS.get(t.name, t.name)) for t in vtab.tasks()]


def canonical_task(name: str) -> str:
    """The catalog name of a task given a name or alias (``vtab.find_task``); unknown (custom) names
    come back unchanged."""
    info = vtab.find_task(name)
    return info.name if info is not None else name


def _as_percent(value: Any) -> float | None:
    """Accuracy as a percentage: result.json stores fractions in [0, 1]; values above 1 are taken as percents."""
    if value is None:
        return None
    v = float(value)
    if math.isnan(v):
        return None
    return v * 100.0 if v <= 1.0 else v


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; a file that cannot be read or parsed is a ValueError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = (
            "is empty"
            if not text.strip()
            else f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        )
        raise ValueError(f"{path} {what}: repair it or remove the run folder") from e


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _with_weights_digest(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``pretrained_file_sha256`` filled in once per weights file (not once per run)."""
    file = config.get("pretrained_file")
    if not file or config.get("pretrained_file_sha256") or not Path(file).is_file():
        return config
    stat = Path(file).stat()
    return {**config, "pretrained_file_sha256": _file_sha256(str(file), stat.st_size, stat.st_mtime_ns)}


def _recorded_recipe(data: Any) -> str | None:
    """The recipe fingerprint a run recorded (``"fingerprint": {"recipe": ...}``), if any."""
    fp = data.get("fingerprint") if isinstance(data, dict) else None
    recipe = fp.get("recipe") if isinstance(fp, dict) else None
    return recipe if isinstance(recipe, str) and recipe else None


def _run_config(result_path: Path) -> dict[str, Any] | None:
    """The ``config.json`` next to a ``result.json`` (None when there is none)."""
    path = result_path.parent / "config.json"
    if not path.is_file():
        return None
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a run's config (a JSON object): repair it or remove the run folder")
    return config


def _load_result(path: Path) -> dict[str, Any] | None:
    """One ``result.json`` with ``_path``, ``_config`` and ``_recipe`` added (see :func:`collect_results`);
    None (with a warning) for a JSON file that is not a train.py result."""
    data = _read_json(path)
    if not isinstance(data, dict) or "task" not in data or "method" not in data:
        warnings.warn(f"skipping {path}: not a train.py result (no 'method'/'task')", stacklevel=3)
        return None
    config = _run_config(path)
    config = _with_weights_digest(config) if config is not None else None
    recipe = _recorded_recipe(data) or _recorded_recipe(config)
    if recipe is None and config is not None:
        recipe = recipe_fingerprint(config)
    data.update(_path=str(path), _config=config, _recipe=recipe)
    return data


def collect_results(
    root: str | os.PathLike, exclude: Collection[str | os.PathLike] = ()
) -> list[dict[str, Any]]:
    """Every ``result.json`` below ``root`` (sorted by path), each with ``_path``, ``_config`` (the
    run's ``config.json``, weights digest filled in, or None) and ``_recipe`` (its recipe fingerprint
    or None) added. Runs of a tuning sweep (below a ``tune-*`` folder, or a folder in ``exclude``) are
    left out: they make the tuned rows (:func:`tuned_rows`).

    A ``result.json`` or ``config.json`` that cannot be read or parsed raises ValueError naming it; a
    JSON file that is not a train.py result (no ``method``/``task``) is skipped with a warning.
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(f"results folder '{root}' does not exist")
    skip = {os.path.normpath(p) for p in exclude}
    out = []
    for path in sorted(root.rglob("result.json")):
        if in_tuning(path, root) or os.path.normpath(path.parent) in skip:
            continue
        data = _load_result(path)
        if data is not None:
            out.append(data)
    return out


@dataclass
class Row:
    """One table row: a method with one model, one method config and one recipe; runs[task][seed] = result.

    ``recipe`` is the runs' recipe fingerprint and ``run_config`` the ``config.json`` of one of them
    (both None for result folders without ``config.json``). A *tuned* row (``selections`` set) holds the
    retrained runs of one tuning grid over tasks: each task's runs use that task's winning setting.
    """

    method: str
    model: str
    config: dict[str, Any]
    label: str = ""
    runs: dict[str, dict[Any, dict[str, Any]]] = field(default_factory=dict)
    recipe: str | None = None
    run_config: dict[str, Any] | None = None
    selections: list[Selection] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.method} ({self.label})" if self.label else self.method

    def _settings(self, get: Callable[[dict[str, Any]], Any]) -> str:
        """The distinct values of one config.json setting over the row's runs ('' without config.json)."""
        configs = [r["_config"] for seeds in self.runs.values() for r in seeds.values() if r.get("_config")]
        return ", ".join(sorted({str(get(c)) for c in configs}))

    @property
    def protocol(self) -> str:
        """The input protocol of the runs (recipe ``protocol``: ``vtab`` = [0, 1] inputs, ``default`` =
        the backbone's normalisation); '?' for a config without one, '' without config.json."""
        return self._settings(lambda c: (c.get("recipe") or {}).get("protocol") or "?")

    @property
    def preset(self) -> str:
        """The preset the runs were made with (config.json ``preset``), '-' for none."""
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
    neutral = {"task": None, "data_root": None}  # a row spans tasks: only the recipe is compared
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
            parts.append("no config.json" if r.recipe is None else f"recipe {r.recipe[:8]}")
        r.label = ", ".join(parts)
    labels = [r.label for r in same]
    for r in same:  # recipes the keys above cannot tell apart (e.g. only a recorded fingerprint)
        if r.recipe is not None and labels.count(r.label) > 1:
            r.label = ", ".join(filter(None, [r.label, f"recipe {r.recipe[:8]}"]))


def build_rows(results: list[dict[str, Any]]) -> list[Row]:
    """Group results by (method, model, method_config, recipe fingerprint); label rows of one method
    that differ. Results without a recipe fingerprint (no ``config.json``) group as one recipe."""
    rows: dict[tuple[str, str, str, str], Row] = {}
    for r in results:
        config = r.get("method_config") or {}
        recipe = r.get("_recipe")
        key = (str(r["method"]), str(r.get("model", "")), _freeze(config), recipe or "")
        row = rows.setdefault(key, Row(key[0], key[1], dict(config), recipe=recipe))
        if row.run_config is None:
            row.run_config = r.get("_config")
        task = canonical_task(str(r["task"]))
        seed = r.get("seed", 0)
        seeds = row.runs.setdefault(task, {})
        if seed in seeds:
            warnings.warn(
                f"two results for {row.name}/{task} seed {seed}: keeping {seeds[seed]['_path']}, "
                f"ignoring {r['_path']}",
                stacklevel=2,
            )
            continue
        seeds[seed] = r
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


def _add_retrained(row: Row, selection: Selection) -> None:
    """The retrained runs of one record into ``row`` (a missing or foreign result is warned about)."""
    task = canonical_task(selection.task)
    for seed, folder in selection.retrained:
        path = folder / "result.json"
        if not path.is_file():
            warnings.warn(f"{selection.path}: retrained seed {seed} has no {path} yet", stacklevel=3)
            continue
        result = _load_result(path)
        if result is None:
            continue
        if result["method"] != selection.method or canonical_task(str(result["task"])) != task:
            warnings.warn(
                f"{selection.path}: {path} is a {result['method']}/{result['task']} run", stacklevel=3
            )
            continue
        row.model = row.model or str(result.get("model", ""))
        row.run_config = row.run_config or result.get("_config")
        row.runs.setdefault(task, {})[result.get("seed", seed)] = result


def tuned_rows(selections: list[Selection]) -> list[Row]:
    """One row per (method, grid fingerprint) over the tasks of its records, from the retrained runs."""
    groups: dict[tuple[str, str], list[Selection]] = {}
    for sel in selections:
        groups.setdefault((sel.method, sel.grid_fingerprint), []).append(sel)
    per_method = [m for m, _ in groups]
    rows = []
    for (method, _), same in sorted(groups.items()):
        row = Row(method, "", {}, label=_tuned_label(same, per_method.count(method) > 1), selections=same)
        for sel in sorted(same, key=lambda s: s.task):
            _add_retrained(row, sel)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Cell:
    """A table value in percent (or millions for params); None is a blank cell. A mean over part of its
    tasks carries ``part`` = (tasks present, tasks of the column) and prints it: ``55.7 (7/8)``."""

    mean: float | None = None
    std: float | None = None
    n: int = 0
    part: tuple[int, int] | None = None

    def text(self, decimals: int = 1, pm: str = " ± ") -> str:
        if self.mean is None:
            return ""
        s = f"{self.mean:.{decimals}f}"
        if self.std is not None:
            s += f"{pm}{self.std:.{decimals}f}"
        if self.part is not None and self.part[0] < self.part[1]:
            s += f" ({self.part[0]}/{self.part[1]})"
        return s


def _mean_std(values: list[float]) -> Cell:
    if not values:
        return Cell()
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Cell(mean, std, n)


def _per_seed_mean(per_seed: list[dict[Any, float]]) -> dict[Any, float] | None:
    """The per-seed mean over parts that all have the same seeds (None otherwise)."""
    if not per_seed or len({frozenset(p) for p in per_seed}) != 1:
        return None
    return {s: sum(p[s] for p in per_seed) / len(per_seed) for s in per_seed[0]}


def _mean_present(cells: list[Cell], per_seed: list[dict[Any, float] | None]) -> tuple[Cell, dict | None]:
    """The mean of the cells that have a value (blank if none), marked with how many of them; its std is
    over seeds when every part has the same seeds (two or more). Also the per-seed means, if any."""
    present = [(c, p) for c, p in zip(cells, per_seed) if c.mean is not None]
    if not present:
        return Cell(), None
    mean = sum(c.mean for c, _ in present) / len(present)
    parts = [p for _, p in present]
    seeds = _per_seed_mean(parts) if all(p is not None for p in parts) else None
    std = _mean_std(list(seeds.values())).std if seeds and len(seeds) > 1 else None
    cell = Cell(mean, std, min(c.n for c, _ in present), (len(present), len(cells)))
    return cell, seeds


Metric = Literal["best", "last"]
_METRIC_KEY = {"best": "test_acc_best", "last": "test_acc_last"}
#: Column headers of the two averaging conventions (docs/table.md).
MEAN_GROUPS, MEAN_TASKS = "Mean of groups", "Mean of tasks"


def task_group(task: str) -> str:
    """A task's group: its vtab group (natural, specialized, structured; ``demo`` for digits), ``other``
    for a custom task."""
    info = vtab.find_task(task)
    return info.group if info is not None else "other"


@dataclass
class Table:
    metric: str
    columns: list[tuple[str, str]]  # (key, header)
    rows: list[tuple[Row, dict[str, Cell]]]


def _columns(tasks: list[str], groups: list[str]) -> list[tuple[str, str]]:
    headers = {e.name: e.header for e in vtab_catalog()}
    columns = [(t, headers.get(t, t)) for t in tasks] + [(g, g.capitalize()) for g in groups]
    columns += [("mean_groups", MEAN_GROUPS), ("mean_tasks", MEAN_TASKS), ("params_m", "Params (M)")]
    return columns + [("tasks", "Tasks")]


def _params_cell(row: Row) -> Cell:
    params = [
        float(r["trainable_params"]["method"]) / 1e6
        for seeds in row.runs.values()
        for r in seeds.values()
        if isinstance(r.get("trainable_params"), dict) and "method" in r["trainable_params"]
    ]
    return Cell(sum(params) / len(params), None, len(params)) if params else Cell()


def _row_cells(row: Row, key: str, tasks: list[str], groups: list[str]) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    per_seed: dict[str, dict[Any, float]] = {}
    for task in tasks:
        accs = {s: _as_percent(r.get(key)) for s, r in row.runs.get(task, {}).items()}
        per_seed[task] = {s: a for s, a in accs.items() if a is not None}
        cells[task] = _mean_std(list(per_seed[task].values()))
    group_seed: dict[str, dict | None] = {}
    for g in groups:
        members = [t for t in tasks if task_group(t) == g]
        cells[g], group_seed[g] = _mean_present([cells[t] for t in members], [per_seed[t] for t in members])
    mean_groups, _ = _mean_present([cells[g] for g in groups], [group_seed[g] for g in groups])
    mean_tasks, _ = _mean_present([cells[t] for t in tasks], [per_seed[t] for t in tasks])
    # how many tasks the means cover is the Tasks column's job (and the notes under the table)
    cells["mean_groups"], cells["mean_tasks"] = (
        replace(mean_groups, part=None),
        replace(mean_tasks, part=None),
    )
    cells["params_m"] = _params_cell(row)
    known = {e.name for e in vtab_catalog()}
    present = [t for t in tasks if cells[t].mean is not None]
    in_vtab = sum(1 for t in present if t in known)
    cells["tasks"] = Cell(float(in_vtab), None, len(present) - in_vtab)
    return cells


def compute_table(rows: list[Row], metric: Metric = "best", extra_tasks: list[str] | None = None) -> Table:
    """Cells for every row: tasks, group means, both averages (over the tasks present), params (M), task
    count (``tasks``: ``mean`` = VTAB tasks present, ``n`` = other tasks present).

    Columns: the 19 VTAB tasks, then other tasks found (custom tasks); the three VTAB groups, then the
    groups of the other tasks (``demo``, ``other``). ``mean_groups`` is the mean of the group means over
    the groups present, ``mean_tasks`` the plain mean over the tasks present (at 19/19: the 19-task mean);
    a group or mean over part of its tasks says so (:attr:`Cell.part`)."""
    if metric not in _METRIC_KEY:
        raise ValueError(f"metric '{metric}' is not one of {sorted(_METRIC_KEY)}")
    known = [e.name for e in vtab_catalog()]
    if extra_tasks is None:
        extra_tasks = sorted({t for r in rows for t in r.runs if t not in known})
    tasks = known + extra_tasks
    groups = list(GROUPS) + sorted({task_group(t) for t in extra_tasks} - set(GROUPS))
    out = [(row, _row_cells(row, _METRIC_KEY[metric], tasks, groups)) for row in rows]
    return Table(metric, _columns(tasks, groups), out)


def _cell_text(key: str, cell: Cell, pm: str = " ± ") -> str:
    if key == "tasks":
        if cell.mean is None:
            return ""
        return f"{int(cell.mean)}/19" + (f" +{cell.n}" if cell.n else "")
    return cell.text(2 if key == "params_m" else 1, pm)


def _latex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#")):
        s = s.replace(a, b)
    return s


_WHAT = {
    "last": "last epoch (test_acc_last: the test accuracy after the final epoch, no selection on test)",
    "best": "best-of-test (test_acc_best: the highest test accuracy over the run's evaluations)",
}
_LEAD = ["Method", "Model", "Protocol", "Preset"]
CONVENTIONS_NOTE = (
    f"{MEAN_GROUPS}: the mean of the group means (Natural, Specialized, Structured; the papers' usual "
    f"average). {MEAN_TASKS}: the plain mean of the tasks (the 19-task mean at 19/19). Both over the "
    "tasks present; a group over part of its tasks shows (present/all)."
)


def _title(table: Table) -> str:
    return f"VTAB-1K top-1 accuracy (%), ours, {_WHAT[table.metric]}"


def _coverage_note(row: Row, cells: dict[str, Cell], columns: list[tuple[str, str]]) -> str | None:
    """Which tasks a row's means are over, when it is not exactly the 19 VTAB tasks."""
    if cells["tasks"].mean == 19 and not cells["tasks"].n:
        return None
    known = [e.name for e in vtab_catalog()]
    present = [k for k, _ in columns if k in row.runs and cells[k].mean is not None]
    if len(present) <= 8:
        where = ", ".join(f"{t} ({task_group(t)})" for t in present)
    else:
        missing = [t for t in known if t not in present]
        where = f"the VTAB tasks but {', '.join(missing)}" if missing else "the 19 VTAB tasks"
        where += "".join(f", {t} ({task_group(t)})" for t in present if t not in known)
    return f"{row.name}: means over {len(present)} task(s): {where}"


def _notes(table: Table) -> list[str]:
    notes = [CONVENTIONS_NOTE]
    notes += [n for row, cells in table.rows if (n := _coverage_note(row, cells, table.columns))]
    return notes


def _body(table: Table, pm: str) -> list[list[str]]:
    return [
        [row.name, row.model, row.protocol, row.preset]
        + [_cell_text(k, cells[k], pm) for k, _ in table.columns]
        for row, cells in table.rows
    ]


def _grid_markdown(title: str, headers: list[str], body: list[list[str]], notes: list[str], left: int) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join(["---"] * left + ["---:"] * (len(headers) - left)) + "|")
    lines += ["| " + " | ".join(vals) + " |" for vals in body]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _grid_latex(title: str, headers: list[str], body: list[list[str]], notes: list[str], left: int) -> str:
    lines = [f"% {title}"] + [f"% {n}" for n in notes]
    lines += [r"\begin{tabular}{" + "l" * left + "r" * (len(headers) - left) + "}", r"\toprule"]
    lines += [" & ".join(_latex_escape(h) for h in headers) + r" \\", r"\midrule"]
    lines += [
        " & ".join(_latex_escape(v) if i < left else v for i, v in enumerate(vals)) + r" \\" for vals in body
    ]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _csv_number(key: str, value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if key == "params_m" else f"{value:.2f}"


_CSV_TAIL = ["source", "selection", "weights", "input_norm", "printed_average", "printed_convention"]


def _csv_head(columns: list[tuple[str, str]]) -> list[str]:
    head = ["metric", "method", "label", "model", "protocol", "preset"]
    for k, _ in columns:
        head += [k] if k in ("params_m", "tasks") else [k, f"{k}_std", f"{k}_n"]
    return head + _CSV_TAIL


def _csv_cells(columns: list[tuple[str, str]], cells: dict[str, Cell]) -> list[Any]:
    vals: list[Any] = []
    for k, _ in columns:
        c = cells[k]
        if k == "tasks":
            vals.append(int(c.mean) if c.mean is not None else "")
            continue
        vals.append(_csv_number(k, c.mean))
        if k != "params_m":
            vals += [_csv_number(k, c.std), c.n if c.mean is not None else ""]
    return vals


def _csv(table: Table, header: bool = True) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(_csv_head(table.columns))
    for row, cells in table.rows:
        lead = [table.metric, row.method, row.label, row.model, row.protocol, row.preset]
        writer.writerow(lead + _csv_cells(table.columns, cells) + ["ours", table.metric, "", "", "", ""])
    return buf.getvalue()


FORMATS = ("markdown", "csv", "latex")


def render(table: Table, fmt: Literal["markdown", "csv", "latex"] = "markdown") -> str:
    """The table as Markdown, CSV (numbers, with ``<col>_std`` and ``<col>_n`` columns) or LaTeX (booktabs);
    Markdown and LaTeX carry the averaging conventions and each partial row's tasks as notes."""
    headers = _LEAD + [h for _, h in table.columns]
    if fmt == "markdown":
        return _grid_markdown(_title(table), headers, _body(table, " ± "), _notes(table), len(_LEAD))
    if fmt == "csv":
        return _csv(table)
    if fmt == "latex":
        return _grid_latex(_title(table), headers, _body(table, r" $\pm$ "), _notes(table), len(_LEAD))
    raise ValueError(f"format '{fmt}' is not one of {sorted(FORMATS)}")


# ---------------------------------------------------------------- published rows and tuning records
_CONVENTION_SHORT = {"mean_of_group_means": "groups", "mean_of_19": "19 tasks"}
_PUBLISHED_LEAD = ["Method", "Source", "Selection", "Weights", "Input norm"]


def select_published(rows: list[Row], spec: str) -> list[PublishedRow]:
    """The published rows for ``spec``: ``same`` (the methods of ``rows``), ``all``, or a comma list of
    method names."""
    published = load_published()
    if spec == "all":
        return published
    methods = {r.method for r in rows} if spec == "same" else {m.strip() for m in spec.split(",") if m}
    known = {p.method for p in published if p.method}
    unknown = sorted(methods - known) if spec != "same" else []
    if unknown:
        raise ValueError(f"--published {spec}: no published rows for {unknown}; there are {sorted(known)}")
    return [p for p in published if p.method in methods]


def _published_values(row: PublishedRow) -> list[str]:
    means = recompute(row.accuracy)
    d = row.source.decimals
    vals = [f"{row.accuracy[e.name]:.{d}f}" for e in vtab_catalog()]
    vals += [f"{means[g]:.2f}" for g in GROUPS]
    vals += [f"{means['mean_of_group_means']:.2f}", f"{means['mean_of_19']:.2f}"]
    printed = f"{row.average:.{row.source.average_decimals}f} ({_CONVENTION_SHORT[row.source.average]})"
    vals.append(printed + (" *" if row.discrepancy else ""))
    return vals + ["" if row.params_m is None else f"{row.params_m:g}"]


def _published_notes(rows: list[PublishedRow]) -> list[str]:
    notes = [
        f"As printed by each source (ViT-B/16, ImageNet-21k). {MEAN_GROUPS} and {MEAN_TASKS}: recomputed "
        "here from the per-task values; Printed: the source's own average and its convention.",
        "Selection: last = test accuracy after the final epoch, best = the highest test accuracy over the "
        "run's evaluations (best-of-test), unstated = the source does not say. Weights: orig_in21k "
        "(ViT-B_16.npz) or augreg_in21k. Input norm: imagenet (ImageNet mean/std), inception (0.5/0.5, our "
        "protocol default on these backbones), none ([0, 1], our protocol vtab).",
    ]
    for key in dict.fromkeys(r.source.key for r in rows):
        src = next(r.source for r in rows if r.source.key == key)
        notes.append(f"{key}: {src.title}; {src.cite}")
    notes += [f"* {r.name} ({r.source.key}): {r.discrepancy}" for r in rows if r.discrepancy]
    return notes


def render_published(rows: list[PublishedRow], fmt: str = "markdown") -> str:
    """The published rows as their own table (Markdown or LaTeX) with their sources as notes; CSV rows in
    the columns of :func:`render` (``metric`` = ``published``)."""
    if fmt == "csv":
        return _published_csv(rows, _columns([e.name for e in vtab_catalog()], list(GROUPS)))
    headers = _PUBLISHED_LEAD + [e.header for e in vtab_catalog()] + [g.capitalize() for g in GROUPS]
    headers += [MEAN_GROUPS, MEAN_TASKS, "Printed", "Params (M)"]
    body = [[r.name, r.source.key, r.selection, r.weights, r.input_norm] + _published_values(r) for r in rows]
    title = "VTAB-1K top-1 accuracy (%), published"
    grid = _grid_markdown if fmt == "markdown" else _grid_latex
    return grid(title, headers, body, _published_notes(rows), len(_PUBLISHED_LEAD))


def _published_csv(rows: list[PublishedRow], columns: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in rows:
        means = recompute(r.accuracy)
        values = {**r.accuracy, **{g: means[g] for g in GROUPS}}
        values.update(mean_groups=means["mean_of_group_means"], mean_tasks=means["mean_of_19"])
        cells = {k: Cell(values.get(k), None, r.seeds or 0) if k in values else Cell() for k, _ in columns}
        cells["params_m"], cells["tasks"] = Cell(r.params_m), Cell(19.0)
        lead = ["published", r.method or "", r.name, "vit_base_patch16_224", "", ""]
        tail = [r.source.key, r.selection, r.weights, r.input_norm, r.average, r.source.average]
        writer.writerow(lead + _csv_cells(columns, cells) + tail)
    return buf.getvalue()


def _point_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def render_selection(sel: Selection, fmt: str = "markdown") -> str:
    """One tuning record: every grid point's setting and val accuracy, the winner marked, the rule."""
    keys = list(sel.grid)
    headers = keys + ["Val acc (%)", "Winner"]
    body = []
    for point in sel.points:
        val = _as_percent(point.val_accuracy)
        body.append(
            [_point_text(point.setting.get(k, "")) for k in keys]
            + ["" if val is None else f"{val:.1f}", "winner" if sel.is_winner(point) else ""]
        )
    seeds = ", ".join(str(seed) for seed, _ in sel.retrained) or "none yet"
    title = f"Selection: {sel.method} on {sel.task} (grid {sel.grid_fingerprint[:8]}: {' x '.join(keys)})"
    notes = [f"rule: {sel.rule or 'not recorded'}", f"winner retrained with seeds {seeds} ({sel.path})"]
    grid = _grid_latex if fmt == "latex" else _grid_markdown
    return grid(title, headers, body, notes, len(keys))


def collect_rows(root: str | os.PathLike) -> tuple[list[Row], list[Selection]]:
    """The table rows below ``root``: ordinary rows (grouped by recipe) then tuned rows, and the records."""
    selections = read_selections(root)
    exclude = {str(f) for sel in selections for f in sel.folders}
    rows = build_rows(collect_results(root, exclude=exclude)) + tuned_rows(selections)
    return rows, selections


def vtab_table(
    root: str | os.PathLike | None,
    fmt: Literal["markdown", "csv", "latex"] = "markdown",
    published: str | None = None,
    selection: bool = False,
) -> str:
    """Our last-epoch table, then our best-of-test table, for every result below ``root``; with
    ``published`` (``same``, ``all`` or methods) the published rows; with ``selection`` the tuning records."""
    rows, selections = _rows_below(root)
    lit = select_published(rows, published) if published is not None else None
    return _render_all(rows, selections, fmt, lit, selection)


def _rows_below(root: str | os.PathLike | None) -> tuple[list[Row], list[Selection]]:
    if root is None:
        return [], []
    rows, selections = collect_rows(root)
    if not rows:
        raise ValueError(f"no result.json found below '{root}'")
    return rows, selections


def _render_all(
    rows: list[Row],
    selections: list[Selection],
    fmt: str,
    published: list[PublishedRow] | None,
    selection: bool,
) -> str:
    if selection and fmt == "csv":
        raise ValueError("--selection is shown in markdown or latex (the records are JSON: selection.json)")
    tables = [compute_table(rows, m) for m in ("last", "best")] if rows else []
    if fmt == "csv":
        return _csv_all(tables, published)
    if fmt not in FORMATS:
        raise ValueError(f"format '{fmt}' is not one of {sorted(FORMATS)}")
    parts = [render(t, fmt) for t in tables]
    if published is not None:
        parts.append(render_published(published, fmt))
    if selection:
        parts += [render_selection(sel, fmt) for sel in selections] or ["(no tuning records found)\n"]
    return "\n".join(parts)


PLOT_MEANS = {"groups": ("mean_groups", "mean_of_group_means"), "tasks": ("mean_tasks", "mean_of_19")}


def plot_points(
    rows: list[Row], published: list[PublishedRow], metric: Metric = "last", mean: str = "groups"
) -> list[Any]:
    """One :class:`petl_zoo.plot.PlotPoint` per row with a mean and a parameter count: ours from the
    ``metric`` table, published rows with their means recomputed under the same convention."""
    from .plot import PlotPoint

    ours_key, lit_key = PLOT_MEANS[mean]
    points = []
    for row, cells in compute_table(rows, metric).rows if rows else []:
        acc, params = cells[ours_key].mean, cells["params_m"].mean
        if acc is not None and params is not None:
            points.append(PlotPoint(row.name, params, acc, "ours"))
    for r in published:
        if r.params_m is not None:
            points.append(PlotPoint(r.name, r.params_m, recompute(r.accuracy)[lit_key], r.selection))
    return points


def write_plot(
    rows: list[Row], published: list[PublishedRow], path: str, metric: Metric = "last", mean: str = "groups"
) -> list[Path]:
    """The accuracy-vs-parameters plot of these rows as PATH.png and PATH.svg (:mod:`petl_zoo.plot`)."""
    from .plot import plot_accuracy_vs_params

    label = "Mean of group means" if mean == "groups" else "Mean of tasks"
    rule = _WHAT[metric].split(" (")[0]
    return plot_accuracy_vs_params(plot_points(rows, published, metric, mean), path, label, rule)


def _csv_all(tables: list[Table], published: list[PublishedRow] | None) -> str:
    """One CSV: a header, our rows (``metric`` last, best), then published rows (``metric`` published).
    Our tables' columns are used when there are any (custom tasks included), else the 19 tasks."""
    columns = tables[0].columns if tables else _columns([e.name for e in vtab_catalog()], list(GROUPS))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(_csv_head(columns))
    text = buf.getvalue() + "".join(_csv(t, header=False) for t in tables)
    return text + (_published_csv(published, columns) if published else "")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line ``error: ...`` message (the usage is on ``--help``)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _guarded(body: Callable[[], int]) -> int:
    """``body()``, with a user error (ValueError) reported as one ``error: ...`` line, exit status 1."""
    try:
        return body()
    except ValueError as e:
        if os.environ.get("PETL_ZOO_DEBUG"):
            raise
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 1


def _write_out(path: str, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise ValueError(f"cannot write --out {path}: {e.strerror or e}") from e


_DESCRIPTION = """\
Aggregate every result.json below a folder into the VTAB-1K table: our rows as last-epoch test accuracy
(mean +- std over seeds), then best-of-test as a second table; tuned rows from tune-*/selection.json.

    {prog} runs/ [--format markdown|csv|latex] [--out FILE]
    {prog} runs/ --published [all|METHOD,...] --selection --plot figs/vtab
    {prog} --published all --plot figs/literature          (the published rows alone)

Both averages are always shown and labelled: Mean of groups (of the Natural, Specialized, Structured
means) and Mean of tasks (the plain mean; the 19-task mean at 19/19), over the tasks present.
Runs with different recipes, protocols or presets are separate, labelled rows."""


def _parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description=_DESCRIPTION.format(prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", nargs="?", help="folder searched recursively for result.json")
    p.add_argument("--format", choices=list(FORMATS), default="markdown")
    p.add_argument("--out", default=None, help="write here (atomically) instead of stdout")
    p.add_argument(
        "--published",
        nargs="?",
        const="same",
        default=None,
        metavar="all|METHOD,...",
        help="add the published rows (shipped with the package) for our rows' methods; 'all': every row",
    )
    p.add_argument(
        "--selection", action="store_true", help="show each tuning record: grid, val accuracy, winner"
    )
    p.add_argument(
        "--plot", default=None, metavar="PATH", help="write PATH.png and PATH.svg (needs matplotlib)"
    )
    p.add_argument("--plot-mean", choices=sorted(PLOT_MEANS), default="groups", help="y of the plot")
    p.add_argument("--plot-metric", choices=sorted(_METRIC_KEY), default="last", help="our rows on the plot")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The table's command line: print (or ``--out``: write atomically) the tables; ``--plot``: the plot."""
    prog = prog or os.path.basename(sys.argv[0])
    p = _parser(prog)
    args = p.parse_args(argv)
    if args.root is None and args.published not in (None, "same", "all") and Path(args.published).is_dir():
        args.root, args.published = args.published, "same"  # `--published runs/`: the folder, not methods
    if args.root is None and args.published == "same":
        args.published = "all"  # no rows of ours to match: every published row
    if args.root is None and args.published is None:
        p.error("give a results folder (or --published to show the published rows alone)")

    def body() -> int:
        rows, selections = _rows_below(args.root)
        lit = select_published(rows, args.published) if args.published is not None else None
        text = _render_all(rows, selections, args.format, lit, args.selection)
        if args.plot:
            for path in write_plot(rows, lit or [], args.plot, args.plot_metric, args.plot_mean):
                sys.stderr.write(f"wrote {path}\n")
        if args.out:
            _write_out(args.out, text)
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
        return 0

    return _guarded(body)


if __name__ == "__main__":
    sys.exit(main(prog="python -m petl_zoo.table"))
