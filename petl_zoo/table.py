"""The VTAB-1K results table: collect every ``result.json`` below a folder and print one row per method.

Columns: the 19 tasks in VTAB order, then any other task found (custom tasks), the three group means
(Natural, Specialized, Structured), the mean of the group means (what most papers print), the 19-task
mean and the method's trainable parameters in millions (head excluded, mean over the row's runs).

Rules: accuracies are percentages with one decimal; several seeds of a task give ``mean +- std`` (sample
std, ddof=1); a missing run is a blank cell, never a zero; a group mean with any task of the group
missing is blank (the ``Tasks`` column says how many of the 19 are present), and so are the means built
on it. Best (``test_acc_best``, the papers' convention) and last (``test_acc_last``) are separate tables.

Only runs made the same way are averaged as seeds: a row is one method, model, method config and
**recipe fingerprint** (:func:`petl_zoo.fingerprint.recipe_fingerprint` of the run's ``config.json``
next to its ``result.json``, or the ``fingerprint`` the run recorded). Runs of one method that differ
get rows of their own, labelled with what differs (``lora (recipe.epochs=3)``). A result folder
without ``config.json`` is grouped as before, by method, model and method config.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import vtab

from .fingerprint import identity_diff, recipe_fingerprint, recipe_identity
from .io import atomic_write_text, sha256_file

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


def collect_results(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``result.json`` below ``root`` (sorted by path), each with ``_path``, ``_config`` (the
    run's ``config.json``, weights digest filled in, or None) and ``_recipe`` (its recipe fingerprint
    or None) added.

    A ``result.json`` or ``config.json`` that cannot be read or parsed raises ValueError naming it; a
    JSON file that is not a train.py result (no ``method``/``task``) is skipped with a warning.
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(f"results folder '{root}' does not exist")
    out = []
    for path in sorted(root.rglob("result.json")):
        data = _read_json(path)
        if not isinstance(data, dict) or "task" not in data or "method" not in data:
            warnings.warn(f"skipping {path}: not a train.py result (no 'method'/'task')", stacklevel=2)
            continue
        config = _run_config(path)
        config = _with_weights_digest(config) if config is not None else None
        recipe = _recorded_recipe(data) or _recorded_recipe(config)
        if recipe is None and config is not None:
            recipe = recipe_fingerprint(config)
        data.update(_path=str(path), _config=config, _recipe=recipe)
        out.append(data)
    return out


@dataclass
class Row:
    """One table row: a method with one model, one method config and one recipe; runs[task][seed] = result.

    ``recipe`` is the runs' recipe fingerprint and ``run_config`` the ``config.json`` of one of them
    (both None for result folders without ``config.json``).
    """

    method: str
    model: str
    config: dict[str, Any]
    label: str = ""
    runs: dict[str, dict[Any, dict[str, Any]]] = field(default_factory=dict)
    recipe: str | None = None
    run_config: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.method} ({self.label})" if self.label else self.method


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


@dataclass(frozen=True)
class Cell:
    """A table value in percent (or millions for params); None is a blank cell."""

    mean: float | None = None
    std: float | None = None
    n: int = 0

    def text(self, decimals: int = 1, pm: str = " ± ") -> str:
        if self.mean is None:
            return ""
        s = f"{self.mean:.{decimals}f}"
        if self.std is not None:
            s += f"{pm}{self.std:.{decimals}f}"
        return s


def _mean_std(values: list[float]) -> Cell:
    if not values:
        return Cell()
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Cell(mean, std, n)


def _mean_of_cells(cells: list[Cell], per_seed: list[dict[Any, float]] | None) -> Cell:
    """Mean of the cell means (blank if any is blank); std over seeds when every part has the same seeds."""
    if not cells or any(c.mean is None for c in cells):
        return Cell()
    mean = sum(c.mean for c in cells) / len(cells)
    std = None
    if per_seed and all(len(p) > 1 for p in per_seed):
        seed_sets = {frozenset(p) for p in per_seed}
        if len(seed_sets) == 1:
            seeds = sorted(next(iter(seed_sets)), key=str)
            per = [sum(p[s] for p in per_seed) / len(per_seed) for s in seeds]
            std = _mean_std(per).std
    return Cell(mean, std, min(c.n for c in cells))


Metric = Literal["best", "last"]
_METRIC_KEY = {"best": "test_acc_best", "last": "test_acc_last"}


@dataclass
class Table:
    metric: str
    columns: list[tuple[str, str]]  # (key, header)
    rows: list[tuple[Row, dict[str, Cell]]]


def compute_table(rows: list[Row], metric: Metric = "best", extra_tasks: list[str] | None = None) -> Table:
    """Cells for every row: tasks, group means, mean of group means, 19-task mean, params (M), task count."""
    if metric not in _METRIC_KEY:
        raise ValueError(f"metric '{metric}' is not one of {sorted(_METRIC_KEY)}")
    key = _METRIC_KEY[metric]
    catalog = vtab_catalog()
    known = [e.name for e in catalog]
    if extra_tasks is None:
        extra_tasks = sorted({t for r in rows for t in r.runs if t not in known})
    columns = [(e.name, e.header) for e in catalog] + [(t, t) for t in extra_tasks]
    columns += [(g, g.capitalize()) for g in GROUPS]
    columns += [("mean_groups", "Mean (groups)"), ("mean_19", "Mean (19)"), ("params_m", "Params (M)")]
    columns += [("tasks", "Tasks")]
    out = []
    for row in rows:
        cells: dict[str, Cell] = {}
        per_seed: dict[str, dict[Any, float]] = {}
        for task in known + extra_tasks:
            accs = {s: _as_percent(r.get(key)) for s, r in row.runs.get(task, {}).items()}
            accs = {s: a for s, a in accs.items() if a is not None}
            per_seed[task] = accs
            cells[task] = _mean_std(list(accs.values()))
        group_seed: dict[str, dict[Any, float]] = {}
        for g in GROUPS:
            members = [e.name for e in catalog if e.group == g]
            cells[g] = _mean_of_cells([cells[t] for t in members], [per_seed[t] for t in members])
            seeds = [per_seed[t] for t in members]
            if cells[g].mean is not None and len({frozenset(p) for p in seeds}) == 1:
                group_seed[g] = {s: sum(p[s] for p in seeds) / len(seeds) for s in seeds[0]}
        cells["mean_groups"] = _mean_of_cells(
            [cells[g] for g in GROUPS], [group_seed[g] for g in GROUPS] if len(group_seed) == 3 else None
        )
        cells["mean_19"] = _mean_of_cells([cells[t] for t in known], [per_seed[t] for t in known])
        params = [
            float(r["trainable_params"]["method"]) / 1e6
            for seeds in row.runs.values()
            for r in seeds.values()
            if isinstance(r.get("trainable_params"), dict) and "method" in r["trainable_params"]
        ]
        cells["params_m"] = Cell(sum(params) / len(params), None, len(params)) if params else Cell()
        present = sum(1 for t in known if cells[t].mean is not None)
        cells["tasks"] = Cell(float(present), None, present)
        out.append((row, cells))
    return Table(metric, columns, out)


def _cell_text(key: str, cell: Cell, pm: str = " ± ") -> str:
    if key == "tasks":
        return f"{int(cell.mean)}/19" if cell.mean is not None else ""
    return cell.text(2 if key == "params_m" else 1, pm)


def _latex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#")):
        s = s.replace(a, b)
    return s


def _title(table: Table) -> str:
    what = "best epoch (test_acc_best)" if table.metric == "best" else "last epoch (test_acc_last)"
    return f"VTAB-1K top-1 accuracy (%), {what}"


def _markdown(table: Table, headers: list[str]) -> str:
    lines = [f"**{_title(table)}**", "", "| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * len(table.columns)) + "|")
    for row, cells in table.rows:
        vals = [row.name, row.model] + [_cell_text(k, cells[k]) for k, _ in table.columns]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _csv_number(key: str, value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if key == "params_m" else f"{value:.2f}"


def _csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    head = ["metric", "method", "label", "model"]
    for k, _ in table.columns:
        head += [k] if k in ("params_m", "tasks") else [k, f"{k}_std", f"{k}_n"]
    writer.writerow(head)
    for row, cells in table.rows:
        vals: list[Any] = [table.metric, row.method, row.label, row.model]
        for k, _ in table.columns:
            c = cells[k]
            if k == "tasks":
                vals.append(int(c.mean) if c.mean is not None else "")
                continue
            vals.append(_csv_number(k, c.mean))
            if k != "params_m":
                vals += [_csv_number(k, c.std), c.n if c.mean is not None else ""]
        writer.writerow(vals)
    return buf.getvalue()


def _latex(table: Table, headers: list[str]) -> str:
    spec = "ll" + "r" * len(table.columns)
    lines = [
        f"% {_title(table)}",
        r"\begin{tabular}{" + spec + "}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in headers) + r" \\",
        r"\midrule",
    ]
    for row, cells in table.rows:
        vals = [_latex_escape(row.name), _latex_escape(row.model)]
        vals += [_cell_text(k, cells[k], pm=r" $\pm$ ") for k, _ in table.columns]
        lines.append(" & ".join(vals) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


FORMATS = ("markdown", "csv", "latex")


def render(table: Table, fmt: Literal["markdown", "csv", "latex"] = "markdown") -> str:
    """The table as Markdown, CSV (numbers, with ``<col>_std`` and ``<col>_n`` columns) or LaTeX (booktabs)."""
    headers = ["Method", "Model"] + [h for _, h in table.columns]
    if fmt == "markdown":
        return _markdown(table, headers)
    if fmt == "csv":
        return _csv(table)
    if fmt == "latex":
        return _latex(table, headers)
    raise ValueError(f"format '{fmt}' is not one of {sorted(FORMATS)}")


def vtab_table(root: str | os.PathLike, fmt: Literal["markdown", "csv", "latex"] = "markdown") -> str:
    """Best and last tables for every result below ``root``, rendered one after the other."""
    rows = build_rows(collect_results(root))
    if not rows:
        raise ValueError(f"no result.json found below '{root}'")
    tables = [render(compute_table(rows, m), fmt) for m in ("best", "last")]
    if fmt == "csv":
        return tables[0] + "".join(tables[1].splitlines(keepends=True)[1:])
    return "\n".join(tables)


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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The table's command line: print (or ``--out``: write atomically) the best and last tables."""
    prog = prog or os.path.basename(sys.argv[0])
    p = _Parser(
        prog=prog,
        description=(
            "Aggregate every result.json below a folder into the VTAB-1K table (best and last, separately).\n\n"
            f"    {prog} runs/ [--format markdown|csv|latex] [--out FILE]\n\n"
            "Blank cells are missing runs; a group mean with a missing task is blank (see the Tasks column).\n"
            "Runs with different recipes (config.json next to result.json) are separate, labelled rows."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", help="folder searched recursively for result.json")
    p.add_argument("--format", choices=list(FORMATS), default="markdown")
    p.add_argument("--out", default=None, help="write here (atomically) instead of stdout")
    args = p.parse_args(argv)

    def body() -> int:
        text = vtab_table(args.root, args.format)
        if args.out:
            _write_out(args.out, text)
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
        return 0

    return _guarded(body)


if __name__ == "__main__":
    sys.exit(main(prog="python -m petl_zoo.table"))
