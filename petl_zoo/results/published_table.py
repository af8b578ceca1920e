"""The published rows beside ours: which rows ``--published`` picks, and their table (Markdown, LaTeX or
CSV rows in the columns of ours), the group means and both averages recomputed from the per-task values.
"""

from __future__ import annotations

import csv
import io

from .aggregate import MEAN_GROUPS, MEAN_TASKS, Cell, columns
from .benchmarks import VTAB_1K, Benchmark
from .collect import Row
from .published import PublishedRow, load_published, recompute
from .render import csv_cells, grid_latex, grid_markdown

__all__ = ["select_published", "render_published", "published_csv"]

_PUBLISHED_LEAD = ["Method", "Source", "Selection", "Weights", "Input norm"]


def select_published(rows: list[Row], spec: str, benchmark: Benchmark = VTAB_1K) -> list[PublishedRow]:
    """The published rows for ``spec``: ``same`` (the methods of ``rows``), ``all``, or a comma list of
    method names."""
    published = load_published(benchmark=benchmark)
    if spec == "all":
        return published
    methods = {r.method for r in rows} if spec == "same" else {m.strip() for m in spec.split(",") if m}
    known = {p.method for p in published if p.method}
    unknown = sorted(methods - known) if spec != "same" else []
    if unknown:
        raise ValueError(f"--published {spec}: no published rows for {unknown}; there are {sorted(known)}")
    return [p for p in published if p.method in methods]


def _convention_short(benchmark: Benchmark) -> dict[str, str]:
    of_tasks, of_groups = benchmark.conventions
    return {of_groups: "groups", of_tasks: f"{len(benchmark.tasks)} tasks"}


def _published_values(row: PublishedRow, benchmark: Benchmark) -> list[str]:
    means = recompute(row.accuracy, benchmark)
    of_tasks, of_groups = benchmark.conventions
    d = row.source.decimals
    vals = [f"{row.accuracy[t]:.{d}f}" for t in benchmark.task_names]
    vals += [f"{means[g]:.2f}" for g in benchmark.groups]
    vals += [f"{means[of_groups]:.2f}", f"{means[of_tasks]:.2f}"]
    short = _convention_short(benchmark)[row.source.average]
    printed = f"{row.average:.{row.source.average_decimals}f} ({short})"
    vals.append(printed + (" *" if row.discrepancy else ""))
    return vals + ["" if row.params_m is None else f"{row.params_m:g}"]


def _published_notes(rows: list[PublishedRow], benchmark: Benchmark) -> list[str]:
    ref = benchmark.published
    about = f"{ref.about} " if ref else ""
    notes = [
        f"{about}{MEAN_GROUPS} and {MEAN_TASKS}: recomputed here from the per-task values; Printed: the "
        "source's own average and its convention."
    ]
    notes += [ref.legend] if ref else []
    for key in dict.fromkeys(r.source.key for r in rows):
        src = next(r.source for r in rows if r.source.key == key)
        notes.append(f"{key}: {src.title}; {src.cite}")
    notes += [f"* {r.name} ({r.source.key}): {r.discrepancy}" for r in rows if r.discrepancy]
    return notes


def _lead(rows: list[PublishedRow]) -> list[str]:
    """The lead columns: a Model column after Method where the rows span more than one backbone."""
    return (
        _PUBLISHED_LEAD[:1] + ["Model"] + _PUBLISHED_LEAD[1:]
        if len({r.model for r in rows}) > 1
        else _PUBLISHED_LEAD
    )


def _lead_cells(row: PublishedRow, lead: list[str]) -> list[str]:
    model = [row.model] if "Model" in lead else []
    return [row.name, *model, row.source.key, row.selection, row.weights, row.input_norm]


def render_published(rows: list[PublishedRow], fmt: str = "markdown", benchmark: Benchmark = VTAB_1K) -> str:
    """The published rows as their own table (Markdown or LaTeX) with their sources as notes; CSV rows in
    the columns of :func:`petl_zoo.results.render.render` (``metric`` = ``published``). Rows of more than
    one backbone (the suite's ViT-B and ViT-L) get a Model column."""
    if fmt == "csv":
        return published_csv(
            rows, columns(benchmark.task_names, list(benchmark.groups), benchmark), benchmark
        )
    lead = _lead(rows)
    headers = lead + [t.header for t in benchmark.tasks] + [g.capitalize() for g in benchmark.groups]
    headers += [MEAN_GROUPS, MEAN_TASKS, "Printed", "Params (M)"]
    body = [_lead_cells(r, lead) + _published_values(r, benchmark) for r in rows]
    title = f"{benchmark.title} top-1 accuracy (%), published"
    grid = grid_markdown if fmt == "markdown" else grid_latex
    return grid(title, headers, body, _published_notes(rows, benchmark), len(lead))


def published_csv(
    rows: list[PublishedRow], cols: list[tuple[str, str]], benchmark: Benchmark = VTAB_1K
) -> str:
    """CSV rows (no header) of the published rows in the columns ``cols`` (``metric`` = ``published``)."""
    of_tasks, of_groups = benchmark.conventions
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in rows:
        means = recompute(r.accuracy, benchmark)
        values = {**r.accuracy, **{g: means[g] for g in benchmark.groups}}
        values.update(mean_groups=means[of_groups], mean_tasks=means[of_tasks])
        cells = {k: Cell(values.get(k), None, r.seeds or 0) if k in values else Cell() for k, _ in cols}
        cells["params_m"], cells["tasks"] = Cell(r.params_m), Cell(float(len(benchmark.tasks)))
        lead = ["published", r.method or "", r.name, r.model, "", ""]
        tail = [r.source.key, r.selection, r.weights, r.input_norm, r.average, r.source.average]
        writer.writerow(lead + csv_cells(cols, cells) + tail)
    return buf.getvalue()
