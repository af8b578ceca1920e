"""The table's command line (``petl-zoo table``, ``python -m petl_zoo.results``, tools/vtab_table.py):
our rows as last-epoch and best-of-test tables, the published rows, the tuning records and the plot.

A user error (a damaged run file, an unknown method after ``--published``, an unwritable ``--out``) is
one ``error: ...`` line and exit status 1 (``PETL_ZOO_DEBUG=1``: the traceback). Details: docs/table.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NoReturn

from ..io import atomic_write_text
from ..runfolder import RESULT, SELECTION, Selection
from .aggregate import METRIC_KEY, Table, columns, compute_table
from .benchmarks import VTAB_1K, Benchmark
from .collect import Row, collect_rows
from .plot import PLOT_MEANS, write_plot
from .published import PublishedRow
from .published_table import published_csv, render_published, select_published
from .render import FORMATS, csv_head, csv_rows, render
from .selection import render_selection

__all__ = ["results_table", "main"]


def results_table(
    root: str | os.PathLike | None,
    fmt: Literal["markdown", "csv", "latex"] = "markdown",
    published: str | None = None,
    selection: bool = False,
    benchmark: Benchmark = VTAB_1K,
) -> str:
    """Our last-epoch table, then our best-of-test table, for every run below ``root``; with
    ``published`` (``same``, ``all`` or methods) the published rows; with ``selection`` the tuning records."""
    rows, selections = _rows_below(root, benchmark)
    lit = select_published(rows, published, benchmark) if published is not None else None
    return _render_all(rows, selections, fmt, lit, selection, benchmark)


def _rows_below(root: str | os.PathLike | None, benchmark: Benchmark) -> tuple[list[Row], list[Selection]]:
    if root is None:
        return [], []
    rows, selections = collect_rows(root, benchmark)
    if not rows:
        raise ValueError(f"no {RESULT} found below '{root}'")
    return rows, selections


def _render_all(
    rows: list[Row],
    selections: list[Selection],
    fmt: str,
    published: list[PublishedRow] | None,
    selection: bool,
    benchmark: Benchmark,
) -> str:
    if selection and fmt == "csv":
        raise ValueError(f"--selection is shown in markdown or latex (the records are JSON: {SELECTION})")
    tables = [compute_table(rows, m, benchmark=benchmark) for m in ("last", "best")] if rows else []
    if fmt == "csv":
        return _csv_all(tables, published, benchmark)
    if fmt not in FORMATS:
        raise ValueError(f"format '{fmt}' is not one of {sorted(FORMATS)}")
    parts = [render(t, fmt) for t in tables]
    if published is not None:
        parts.append(render_published(published, fmt, benchmark))
    if selection:
        parts += [render_selection(sel, fmt) for sel in selections] or ["(no tuning records found)\n"]
    return "\n".join(parts)


def _csv_all(tables: list[Table], published: list[PublishedRow] | None, benchmark: Benchmark) -> str:
    """One CSV: a header, our rows (``metric`` last, best), then published rows (``metric`` published).
    Our tables' columns are used when there are any (custom tasks included), else the benchmark's."""
    cols = tables[0].columns if tables else columns(benchmark.task_names, list(benchmark.groups), benchmark)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(csv_head(cols))
    text = buf.getvalue() + "".join(csv_rows(t, header=False) for t in tables)
    return text + (published_csv(published, cols, benchmark) if published else "")


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
Aggregate every result.json below a folder into the {title} table: our rows as last-epoch test accuracy
(mean +- std over seeds), then best-of-test as a second table; tuned rows from tune-*/selection.json.

    {prog} runs/ [--format markdown|csv|latex] [--out FILE]
    {prog} runs/ --published [all|METHOD,...] --selection --plot figs/vtab
    {prog} --published all --plot figs/literature          (the published rows alone)

Both averages are always shown and labelled: Mean of groups (of the {groups}
means) and Mean of tasks (the plain mean; the {n}-task mean at {n}/{n}), over the tasks present.
Runs with different recipes, protocols or presets are separate, labelled rows."""


def _description(prog: str, benchmark: Benchmark) -> str:
    groups = ", ".join(g.capitalize() for g in benchmark.groups)
    return _DESCRIPTION.format(prog=prog, title=benchmark.title, groups=groups, n=len(benchmark.tasks))


def _parser(prog: str, benchmark: Benchmark = VTAB_1K) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description=_description(prog, benchmark),
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
    p.add_argument("--plot-metric", choices=sorted(METRIC_KEY), default="last", help="our rows on the plot")
    return p


def _parse(argv: list[str] | None, prog: str) -> argparse.Namespace:
    p = _parser(prog)
    args = p.parse_args(argv)
    if args.root is None and args.published not in (None, "same", "all") and Path(args.published).is_dir():
        args.root, args.published = args.published, "same"  # `--published runs/`: the folder, not methods
    if args.root is None and args.published == "same":
        args.published = "all"  # no rows of ours to match: every published row
    if args.root is None and args.published is None:
        p.error("give a results folder (or --published to show the published rows alone)")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The table's command line: print (or ``--out``: write atomically) the tables; ``--plot``: the plot."""
    args = _parse(argv, prog or os.path.basename(sys.argv[0]))
    bench = VTAB_1K

    def body() -> int:
        rows, selections = _rows_below(args.root, bench)
        lit = select_published(rows, args.published, bench) if args.published is not None else None
        text = _render_all(rows, selections, args.format, lit, args.selection, bench)
        if args.plot:
            for path in write_plot(rows, lit or [], args.plot, args.plot_metric, args.plot_mean, bench):
                sys.stderr.write(f"wrote {path}\n")
        if args.out:
            _write_out(args.out, text)
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
        return 0

    return _guarded(body)


if __name__ == "__main__":
    sys.exit(main(prog="python -m petl_zoo.results"))
