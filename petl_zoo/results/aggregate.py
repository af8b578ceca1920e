"""Rows to numbers: per-task means over seeds, group means and the two averages, as :class:`Cell` s.

Accuracies are percentages (result.json stores fractions in [0, 1]); several seeds give ``mean +- std``
(sample std, ddof=1); a missing run is a blank cell, never a zero. Means are over the tasks present: a
group over part of its tasks carries ``(present/all)``. ``Mean of groups`` is the mean of the group
means, ``Mean of tasks`` the plain mean of the tasks (the benchmark's all-task mean when complete).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from .benchmarks import VTAB_1K, Benchmark, task_group
from .collect import Row

__all__ = [
    "Cell",
    "Metric",
    "METRIC_KEY",
    "MEAN_GROUPS",
    "MEAN_TASKS",
    "Table",
    "as_percent",
    "columns",
    "compute_table",
]

Metric = Literal["best", "last"]
#: The result.json key of each metric: last epoch, best-of-test.
METRIC_KEY = {"best": "test_acc_best", "last": "test_acc_last"}
#: Column headers of the two averaging conventions (docs/table.md).
MEAN_GROUPS, MEAN_TASKS = "Mean of groups", "Mean of tasks"


def as_percent(value: Any) -> float | None:
    """Accuracy as a percentage: result.json stores fractions in [0, 1]; values above 1 are taken as percents."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # not an accuracy: collect warned about it, naming the file and field
    v = float(value)
    if not math.isfinite(v) or not 0 <= v <= 100:
        return None
    return v * 100.0 if v <= 1.0 else v


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


@dataclass
class Table:
    """The cells of every row under one metric; ``columns`` are (key, header) pairs."""

    metric: str
    columns: list[tuple[str, str]]
    rows: list[tuple[Row, dict[str, Cell]]]
    benchmark: Benchmark = VTAB_1K


def columns(tasks: list[str], groups: list[str], benchmark: Benchmark = VTAB_1K) -> list[tuple[str, str]]:
    """(key, header) of every column: the tasks, the groups, both averages, params and the task count."""
    headers = benchmark.headers
    out = [(t, headers.get(t, t)) for t in tasks] + [(g, g.capitalize()) for g in groups]
    out += [("mean_groups", MEAN_GROUPS), ("mean_tasks", MEAN_TASKS), ("params_m", "Params (M)")]
    return out + [("tasks", "Tasks")]


def _params_cell(row: Row) -> Cell:
    params = [
        float(r.result["trainable_params"]["method"]) / 1e6
        for r in row.records()
        if isinstance(r.result.get("trainable_params"), dict) and "method" in r.result["trainable_params"]
    ]
    return Cell(sum(params) / len(params), None, len(params)) if params else Cell()


def _row_cells(
    row: Row, key: str, tasks: list[str], groups: list[str], benchmark: Benchmark
) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    per_seed: dict[str, dict[Any, float]] = {}
    for task in tasks:
        accs = {s: as_percent(r.result.get(key)) for s, r in row.runs.get(task, {}).items()}
        per_seed[task] = {s: a for s, a in accs.items() if a is not None}
        cells[task] = _mean_std(list(per_seed[task].values()))
    group_seed: dict[str, dict | None] = {}
    for g in groups:
        members = [t for t in tasks if task_group(t, benchmark) == g]
        cells[g], group_seed[g] = _mean_present([cells[t] for t in members], [per_seed[t] for t in members])
    mean_groups, _ = _mean_present([cells[g] for g in groups], [group_seed[g] for g in groups])
    mean_tasks, _ = _mean_present([cells[t] for t in tasks], [per_seed[t] for t in tasks])
    # how many tasks the means cover is the Tasks column's job (and the notes under the table)
    cells["mean_groups"], cells["mean_tasks"] = (
        replace(mean_groups, part=None),
        replace(mean_tasks, part=None),
    )
    cells["params_m"] = _params_cell(row)
    known = set(benchmark.task_names)
    present = [t for t in tasks if cells[t].mean is not None]
    in_benchmark = sum(1 for t in present if t in known)
    cells["tasks"] = Cell(float(in_benchmark), None, len(present) - in_benchmark)
    return cells


def compute_table(
    rows: list[Row],
    metric: Metric = "best",
    extra_tasks: list[str] | None = None,
    benchmark: Benchmark = VTAB_1K,
) -> Table:
    """Cells for every row: tasks, group means, both averages (over the tasks present), params (M), task
    count (``tasks``: ``mean`` = the benchmark's tasks present, ``n`` = other tasks present).

    Columns: the benchmark's tasks in its order, then other tasks found (custom tasks); its groups, then
    the groups of the other tasks (``demo``, ``other``). ``mean_groups`` is the mean of the group means
    over the groups present, ``mean_tasks`` the plain mean over the tasks present (all tasks present:
    the benchmark's all-task mean); a group or mean over part of its tasks says so (:attr:`Cell.part`)."""
    if metric not in METRIC_KEY:
        raise ValueError(f"metric '{metric}' is not one of {sorted(METRIC_KEY)}")
    known = benchmark.task_names
    if extra_tasks is None:
        extra_tasks = sorted({t for r in rows for t in r.runs if t not in known})
    tasks = known + extra_tasks
    groups = list(benchmark.groups)
    groups += sorted({task_group(t, benchmark) for t in extra_tasks} - set(benchmark.groups))
    out = [(row, _row_cells(row, METRIC_KEY[metric], tasks, groups, benchmark)) for row in rows]
    return Table(metric, columns(tasks, groups, benchmark), out, benchmark)
