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
from dataclasses import replace
from pathlib import Path
from typing import Literal, NoReturn

from vtab.tasks import BENCHMARK_NAMES

from ..io import atomic_write_text
from ..runfolder import RESULT, SELECTION, Selection
from .aggregate import METRIC_KEY, Table, columns, compute_table
from .benchmarks import BENCHMARKS, VTAB_1K, Benchmark, benchmark_of, get_benchmark
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
    benchmark: Benchmark | None = None,
) -> str:
    """Our last-epoch table, then our best-of-test table, for every run below ``root``, one section per
    benchmark its runs belong to (``benchmark``: that one only); with ``published`` (``same``, ``all`` or
    methods) the published rows; with ``selection`` the tuning records."""
    return "".join(text for _, text, _, _ in _sections(root, fmt, published, selection, benchmark))


def _sections(
    root: str | os.PathLike | None,
    fmt: str,
    published: str | None,
    selection: bool,
    benchmark: Benchmark | None,
) -> list[tuple[Benchmark, str, list[Row], list[PublishedRow]]]:
    """``(benchmark, its text, its rows, its published rows)`` per section. One benchmark present: its
    table alone, as before benchmarks had sections; several: each under a heading, in registry order."""
    rows, selections = _rows_below(root)
    parts = split_by_benchmark(rows)
    if benchmark is not None:
        key = _key(benchmark)
        parts = {key: parts.get(key, [])}
        if rows and not parts[key]:
            raise ValueError(f"no {benchmark.title} runs below '{root}' (found: {_found(rows)})")
    elif not parts:
        parts = {"vtab": []}  # the published rows alone: VTAB-1K's unless --benchmark says
    if fmt == "csv" and len(parts) > 1:
        raise ValueError(
            f"runs of several benchmarks below '{root}' ({_found(rows)}); a CSV holds one: pass --benchmark"
        )
    out = []
    for name, part in parts.items():
        bench = BENCHMARKS[name]
        lit = select_published(part, published, bench) if published is not None else None
        text = _render_all(part, selections if name == "vtab" else [], fmt, lit, selection, bench)
        out.append((bench, _heading(bench, fmt) + text if len(parts) > 1 else text, part, lit or []))
    return out


def _found(rows: list[Row]) -> str:
    return ", ".join(BENCHMARKS[n].title for n in split_by_benchmark(rows))


def _heading(bench: Benchmark, fmt: str) -> str:
    return f"% {bench.title}\n" if fmt == "latex" else f"## {bench.title}\n\n"


def _key(benchmark: Benchmark) -> str:
    """A benchmark's registry name (``BENCHMARKS``' key: vtab, fgvc, suite)."""
    return next(k for k, b in BENCHMARKS.items() if b is benchmark)


def split_by_benchmark(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows per benchmark (its registry name, in registry order): each row restricted to the runs of
    that benchmark's tasks (``benchmark_of``; custom tasks and the demo task are VTAB-1K's), empty ones
    left out."""
    out: dict[str, list[Row]] = {}
    for key, bench in BENCHMARKS.items():
        for row in rows:
            runs = {t: seeds for t, seeds in row.runs.items() if benchmark_of(t) is bench}
            if runs:
                out.setdefault(key, []).append(replace(row, runs=runs))
    return out


def _rows_below(root: str | os.PathLike | None) -> tuple[list[Row], list[Selection]]:
    if root is None:
        return [], []
    rows, selections = collect_rows(root)
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
    p.add_argument(
        "--benchmark",
        default=None,
        choices=BENCHMARK_NAMES,
        help="only this benchmark's section (default: one section per benchmark found; the published rows "
        "alone: vtab)",
    )
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
    """The table's command line: print (or ``--out``: write atomically) the tables; ``--plot``: the plot
    (one per benchmark section: ``PATH_<benchmark>`` when there are several)."""
    args = _parse(argv, prog or os.path.basename(sys.argv[0]))

    def body() -> int:
        bench = get_benchmark(args.benchmark) if args.benchmark else None
        sections = _sections(args.root, args.format, args.published, args.selection, bench)
        for benchmark, _, rows, lit in sections if args.plot else []:
            path = args.plot if len(sections) == 1 else f"{args.plot}_{_key(benchmark)}"
            for written in write_plot(rows, lit, path, args.plot_metric, args.plot_mean, benchmark):
                sys.stderr.write(f"wrote {written}\n")
        text = "".join(text for _, text, _, _ in sections)
        if args.out:
            _write_out(args.out, text)
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
        return 0

    return _guarded(body)


if __name__ == "__main__":
    sys.exit(main(prog="python -m petl_zoo.results"))
