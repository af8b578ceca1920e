"""The results table: collect finished runs below a folder and print one row per method, beside the
published rows (``petl-zoo table``; details: docs/table.md).

Modules, one job each:

- :mod:`.benchmarks`: what a benchmark is (tasks, groups, headers, averaging conventions, its published
  rows) and the registry (:data:`VTAB_1K`, :func:`get_benchmark`);
- :mod:`.collect`: runs to rows (run folders read through :mod:`petl_zoo.runfolder`, grouped by method,
  model, method config and recipe fingerprint, labelled; tuned rows from tuning records);
- :mod:`.aggregate`: rows to cells (means over seeds, group means, both averages);
- :mod:`.render`: cells to Markdown, CSV and LaTeX, with the notes;
- :mod:`.published`: the published rows shipped with the package (loading, checking, recomputing);
- :mod:`.published_table`: which published rows to show, and their table;
- :mod:`.selection`: a tuning record as a table;
- :mod:`.plot`: accuracy against trainable parameters (PNG and SVG);
- :mod:`.cli`: the command line (``python -m petl_zoo.results``).

Columns: method, model, input protocol (recipe ``protocol``: ``vtab`` = unnormalised [0, 1] inputs,
``default`` = the backbone's own normalisation) and preset (``-`` for none); the benchmark's tasks in
its order, then any other task found (custom tasks); the group means (VTAB-1K: Natural, Specialized,
Structured, then the groups of other tasks: ``demo`` for digits, ``other``); the two averaging
conventions, always labelled: ``Mean of groups`` (the mean of the group means, what most papers print)
and ``Mean of tasks`` (the plain mean); the method's trainable parameters in millions (head excluded,
mean over the row's runs) and ``Tasks`` (the benchmark's tasks present, ``+k`` other tasks). Last epoch
(``test_acc_last``, no selection on test) is the first table, best-of-test (``test_acc_best``, most
papers' number) the second.
"""

from __future__ import annotations

from .aggregate import MEAN_GROUPS, MEAN_TASKS, Cell, Metric, Table, compute_table
from .benchmarks import BENCHMARKS, VTAB_1K, Benchmark, TaskEntry, canonical_task, get_benchmark, task_group
from .cli import main, results_table
from .collect import Row, RunRecord, build_rows, collect_results, collect_rows, read_run, tuned_rows
from .plot import PlotPoint, plot_points, write_plot
from .published import PublishedRow, check_row, load_published, recompute
from .published_table import render_published, select_published
from .render import FORMATS, render
from .selection import render_selection

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "Cell",
    "FORMATS",
    "MEAN_GROUPS",
    "MEAN_TASKS",
    "Metric",
    "PlotPoint",
    "PublishedRow",
    "Row",
    "RunRecord",
    "Table",
    "TaskEntry",
    "VTAB_1K",
    "build_rows",
    "canonical_task",
    "check_row",
    "collect_results",
    "collect_rows",
    "compute_table",
    "get_benchmark",
    "load_published",
    "main",
    "plot_points",
    "read_run",
    "recompute",
    "render",
    "render_published",
    "render_selection",
    "results_table",
    "select_published",
    "task_group",
    "tuned_rows",
    "write_plot",
]
