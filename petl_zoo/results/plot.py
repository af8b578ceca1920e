"""The accuracy-vs-parameters plot of the results table (``petl-zoo table --plot PATH``).

One point per table row: mean accuracy (y) against trainable parameters in millions (x, log scale), our
rows and published rows told apart by marker and colour (published rows also by their selection rule),
written as PNG and SVG. matplotlib is an optional extra (``pip install petl-zoo[plot]``); the figure is
drawn with the Agg canvas, never through pyplot, so no global backend is touched.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .aggregate import Metric, compute_table
from .benchmarks import VTAB_1K, Benchmark
from .collect import Row
from .published import PublishedRow, recompute
from .render import METRIC_TEXT

__all__ = ["PLOT_MEANS", "PlotPoint", "output_paths", "plot_accuracy_vs_params", "plot_points", "write_plot"]

log = logging.getLogger(__name__)

#: (marker, colour, legend) per kind of point: ours, then published by selection rule.
STYLES: dict[str, tuple[str, str, str]] = {
    "ours": ("o", "tab:blue", "ours"),
    "ours_partial": ("x", "tab:cyan", "ours, over part of the tasks (k/N in the label)"),
    "last": ("s", "tab:orange", "published, last epoch"),
    "best": ("^", "tab:red", "published, best-of-test"),
    "best_val": ("v", "tab:green", "published, best-val epoch"),
    "unstated": ("D", "tab:gray", "published, selection unstated"),
}


@dataclass(frozen=True)
class PlotPoint:
    """A row on the plot; ``style`` is ``ours`` or a published row's selection rule."""

    label: str
    params_m: float
    accuracy: float
    style: str = "ours"


def output_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(PATH.png, PATH.svg)``; a given ``.png`` or ``.svg`` suffix is taken as the stem's."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".svg") else path
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install petl-zoo[plot]") from e
    return Figure, FigureCanvasAgg


def _x_values(points: list[PlotPoint]) -> list[float]:
    """x per point; zero-parameter rows (a linear probe) are drawn at a floor left of every other point."""
    positive = [p.params_m for p in points if p.params_m > 0]
    floor = min(positive) / 3 if positive else 1e-3
    return [p.params_m if p.params_m > 0 else floor for p in points]


def _draw(ax: Any, points: list[PlotPoint], selection_label: str) -> None:
    xs = _x_values(points)
    for style, (marker, colour, legend) in STYLES.items():
        mine = [(x, p) for x, p in zip(xs, points) if p.style == style]
        if not mine:
            continue
        legend = f"{legend}, {selection_label}" if style.startswith("ours") else legend
        ax.scatter([x for x, _ in mine], [p.accuracy for _, p in mine], marker=marker, c=colour, label=legend)
    # labels above and below in turn (by accuracy), so that close points do not write over each other
    order = sorted(range(len(points)), key=lambda i: points[i].accuracy)
    for rank, i in enumerate(order):
        p = points[i]
        text = p.label + (" (0 params)" if p.params_m <= 0 else "")
        offset = (4, 3) if rank % 2 == 0 else (4, -8)
        ax.annotate(text, (xs[i], p.accuracy), textcoords="offset points", xytext=offset, fontsize=6)


def plot_accuracy_vs_params(
    points: list[PlotPoint],
    path: str | os.PathLike,
    mean_label: str,
    selection_label: str,
    title: str = VTAB_1K.title,
) -> list[Path]:
    """Write the plot as PNG and SVG (see :func:`output_paths`); returns the two paths.

    ``mean_label`` names the averaging convention of the y values and ``selection_label`` the selection
    rule of our rows (both go into the y-axis label); ``title`` names the benchmark. A point without a
    finite accuracy or parameter count is left out with a warning; nothing left to draw is a ValueError.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    usable = [
        p for p in points if math.isfinite(p.accuracy) and math.isfinite(p.params_m) and p.params_m >= 0
    ]
    for p in points:
        if p not in usable:
            log.warning("not plotted: %s (no accuracy or parameter count)", p.label)
    if not usable:
        raise ValueError("--plot: no row has both a mean accuracy and a trainable-parameter count")
    bad = sorted({p.style for p in usable} - set(STYLES))
    if bad:
        raise ValueError(f"plot styles {bad} are not among {sorted(STYLES)}")
    fig = Figure(figsize=(8, 5.5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    _draw(ax, usable, selection_label)
    ax.set_xscale("log")
    ax.set_xlabel("Trainable parameters (M, classifier head excluded, log scale)")
    rules = [f"ours: {selection_label}"] if any(p.style.startswith("ours") for p in usable) else []
    rules += ["published: the source's rule"] if any(not p.style.startswith("ours") for p in usable) else []
    ax.set_ylabel(f"{mean_label}, top-1 (%)\n{'; '.join(rules)}")
    ax.set_title(f"{title}: accuracy vs trainable parameters", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png, svg = output_paths(path)
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(png, format="png")
        fig.savefig(svg, format="svg")
    except OSError as e:
        raise ValueError(f"cannot write --plot {png} / {svg}: {e.strerror or e}") from e
    return [png, svg]


#: The ``--plot-mean`` choices: our table's column of each averaging convention.
PLOT_MEANS = {"groups": "mean_groups", "tasks": "mean_tasks"}


def plot_points(
    rows: list[Row],
    published: list[PublishedRow],
    metric: Metric = "last",
    mean: str = "groups",
    benchmark: Benchmark = VTAB_1K,
) -> list[PlotPoint]:
    """One point per row with a mean and a parameter count: ours from the ``metric`` table, published
    rows with their means recomputed under the same convention. Beside published rows (means over the
    benchmark's tasks), a row over all of them is drawn with its mean over those tasks only; any other
    row is drawn as partial, its own marker and its coverage in its label (``(3/19 tasks, +1 other)``),
    never as a full row."""
    ours_key = PLOT_MEANS[mean]
    of_tasks, of_groups = benchmark.conventions
    lit_key = of_groups if mean == "groups" else of_tasks
    points, total = [], len(benchmark.tasks)
    if rows:
        every = compute_table(rows, metric, None, benchmark).rows  # custom tasks included
        own = compute_table(rows, metric, [], benchmark).rows  # the benchmark's tasks only
        for (row, cells), (_, bench) in zip(every, own):
            present, other = int(cells["tasks"].mean or 0), cells["tasks"].n
            label, style, acc = row.name, "ours", cells[ours_key].mean
            if published and present == total:  # a full row: its mean over the benchmark's tasks
                acc = bench[ours_key].mean
            elif published:
                coverage = f"{present}/{total} tasks" + (f", +{other} other" if other else "")
                label, style = f"{row.name} ({coverage})", "ours_partial"
            if acc is not None and cells["params_m"].mean is not None:
                points.append(PlotPoint(label, cells["params_m"].mean, acc, style))
    default_model = benchmark.published.model if benchmark.published else None
    for r in published:
        if r.params_m is not None:
            name = r.name if r.model == default_model else f"{r.name} ({r.model})"  # the suite's ViT-L rows
            points.append(PlotPoint(name, r.params_m, recompute(r.accuracy, benchmark)[lit_key], r.selection))
    return points


def write_plot(
    rows: list[Row],
    published: list[PublishedRow],
    path: str,
    metric: Metric = "last",
    mean: str = "groups",
    benchmark: Benchmark = VTAB_1K,
) -> list[Path]:
    """The accuracy-vs-parameters plot of these rows as PATH.png and PATH.svg."""
    label = "Mean of group means" if mean == "groups" else "Mean of tasks"
    rule = METRIC_TEXT[metric].split(" (")[0]
    points = plot_points(rows, published, metric, mean, benchmark)
    return plot_accuracy_vs_params(points, path, label, rule, benchmark.title)
