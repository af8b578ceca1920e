"""Tables to text: Markdown and LaTeX (booktabs) grids with their notes, and CSV.

Markdown and LaTeX carry the averaging conventions and, per row whose means are not over exactly the
benchmark's tasks, which tasks they cover; CSV has numbers only, with ``<col>_std`` and ``<col>_n``
columns, and the published rows' columns at the end (``ours`` for our rows).
"""

from __future__ import annotations

import csv
import io
from typing import Any, Literal

from .aggregate import MEAN_GROUPS, MEAN_TASKS, Cell, Table
from .benchmarks import Benchmark, task_group
from .collect import Row

__all__ = [
    "FORMATS",
    "Format",
    "METRIC_TEXT",
    "conventions_note",
    "grid_markdown",
    "grid_latex",
    "csv_head",
    "csv_cells",
    "csv_rows",
    "render",
]

Format = Literal["markdown", "csv", "latex"]
FORMATS = ("markdown", "csv", "latex")
#: What each metric is, as the titles say it.
METRIC_TEXT = {
    "last": "last epoch (test_acc_last: the test accuracy after the final epoch, no selection on test)",
    "best": "best-of-test (test_acc_best: the highest test accuracy over the run's evaluations)",
}
_LEAD = ["Method", "Model", "Protocol", "Preset"]
_CSV_TAIL = ["source", "selection", "weights", "input_norm", "printed_average", "printed_convention"]


def conventions_note(benchmark: Benchmark) -> str:
    """The note that says what the two averages are."""
    groups = ", ".join(g.capitalize() for g in benchmark.groups)
    remark = f"; {benchmark.groups_remark}" if benchmark.groups_remark else ""
    n = len(benchmark.tasks)
    return (
        f"{MEAN_GROUPS}: the mean of the group means ({groups}{remark}). {MEAN_TASKS}: the plain mean of "
        f"the tasks (the {n}-task mean at {n}/{n}). Both over the tasks present; a group over part of its "
        "tasks shows (present/all)."
    )


def _cell_text(key: str, cell: Cell, n_tasks: int, pm: str = " ± ") -> str:
    if key == "tasks":
        if cell.mean is None:
            return ""
        return f"{int(cell.mean)}/{n_tasks}" + (f" +{cell.n}" if cell.n else "")
    return cell.text(2 if key == "params_m" else 1, pm)


def _latex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#")):
        s = s.replace(a, b)
    return s


def _title(table: Table) -> str:
    return f"{table.benchmark.title} top-1 accuracy (%), ours, {METRIC_TEXT[table.metric]}"


def _coverage_note(row: Row, cells: dict[str, Cell], table: Table) -> str | None:
    """Which tasks a row's means are over, when it is not exactly the benchmark's tasks."""
    bench = table.benchmark
    known = bench.task_names
    if cells["tasks"].mean == len(known) and not cells["tasks"].n:
        return None
    present = [k for k, _ in table.columns if k in row.runs and cells[k].mean is not None]
    if len(present) <= 8:
        where = ", ".join(f"{t} ({task_group(t, bench)})" for t in present)
    else:
        missing = [t for t in known if t not in present]
        where = (
            f"the {bench.task_noun} tasks but {', '.join(missing)}"
            if missing
            else f"the {len(known)} {bench.task_noun} tasks"
        )
        where += "".join(f", {t} ({task_group(t, bench)})" for t in present if t not in known)
    return f"{row.name}: means over {len(present)} task(s): {where}"


def _notes(table: Table) -> list[str]:
    notes = [conventions_note(table.benchmark)]
    notes += [n for row, cells in table.rows if (n := _coverage_note(row, cells, table))]
    return notes


def _body(table: Table, pm: str) -> list[list[str]]:
    n = len(table.benchmark.tasks)
    return [
        [row.name, row.model, row.protocol, row.preset]
        + [_cell_text(k, cells[k], n, pm) for k, _ in table.columns]
        for row, cells in table.rows
    ]


def grid_markdown(title: str, headers: list[str], body: list[list[str]], notes: list[str], left: int) -> str:
    """A bold title, a Markdown grid (the first ``left`` columns left-aligned, the rest right) and notes."""
    lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join(["---"] * left + ["---:"] * (len(headers) - left)) + "|")
    lines += ["| " + " | ".join(vals) + " |" for vals in body]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def grid_latex(title: str, headers: list[str], body: list[list[str]], notes: list[str], left: int) -> str:
    """The title and notes as comments, then a booktabs tabular (the first ``left`` columns are text)."""
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


def csv_head(columns: list[tuple[str, str]]) -> list[str]:
    """The CSV header: lead columns, per column its value (and ``_std``, ``_n``), the published tail."""
    head = ["metric", "method", "label", "model", "protocol", "preset"]
    for k, _ in columns:
        head += [k] if k in ("params_m", "tasks") else [k, f"{k}_std", f"{k}_n"]
    return head + _CSV_TAIL


def csv_cells(columns: list[tuple[str, str]], cells: dict[str, Cell]) -> list[Any]:
    """One CSV row's values for ``columns`` (see :func:`csv_head`)."""
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


def csv_rows(table: Table, header: bool = True) -> str:
    """The table as CSV rows (``metric`` = the table's metric), with the header unless ``header`` is off."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(csv_head(table.columns))
    for row, cells in table.rows:
        lead = [table.metric, row.method, row.label, row.model, row.protocol, row.preset]
        writer.writerow(lead + csv_cells(table.columns, cells) + ["ours", table.metric, "", "", "", ""])
    return buf.getvalue()


def render(table: Table, fmt: Format = "markdown") -> str:
    """The table as Markdown, CSV (numbers, with ``<col>_std`` and ``<col>_n`` columns) or LaTeX (booktabs);
    Markdown and LaTeX carry the averaging conventions and each partial row's tasks as notes."""
    headers = _LEAD + [h for _, h in table.columns]
    if fmt == "markdown":
        return grid_markdown(_title(table), headers, _body(table, " ± "), _notes(table), len(_LEAD))
    if fmt == "csv":
        return csv_rows(table)
    if fmt == "latex":
        return grid_latex(_title(table), headers, _body(table, r" $\pm$ "), _notes(table), len(_LEAD))
    raise ValueError(f"format '{fmt}' is not one of {sorted(FORMATS)}")
