"""The benchmark's files: the ``--out`` folder checked before any timing, rows appended as they are
measured, and the final report files written atomically.

A benchmark runs for minutes; nothing it measured may be lost to an unwritable ``--out``. So
:class:`ProgressLog` first makes sure the folder can be written (failing in one line before anything is
timed), then appends one JSON line per timing round (``rounds.jsonl``) and per finished row
(``rows.jsonl``) as the run goes: a crash keeps what was done. :func:`write_outputs` writes the report
files at the end, each atomically.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, umask_mode
from .runner import BenchRow

__all__ = [
    "OutputError",
    "ProgressLog",
    "ROUNDS_FILE",
    "ROWS_FILE",
    "prepare_out",
    "row_record",
    "write_outputs",
]

logger = logging.getLogger(__name__)

ROWS_FILE = "rows.jsonl"
ROUNDS_FILE = "rounds.jsonl"
_TIMING_LISTS = ("train_times", "infer_times", "merged_times")


class OutputError(ValueError):
    """``--out`` or one of its files cannot be written: one line naming the path and the cause."""


def _cause(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def prepare_out(out: str | os.PathLike) -> Path:
    """Create ``out`` (and its parents) and make sure a file can be written in it; else :class:`OutputError`."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"--out {out}: {blocker} is a file, not a folder")
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"--out {out} is not writable: {_cause(err)}") from err
    return out


def row_record(row: BenchRow, timings: bool = True) -> dict[str, Any]:
    """A row as a JSON-ready dict; ``timings`` keeps the per-round seconds per step (``*_times``)."""
    record = asdict(row)
    return record if timings else {k: v for k, v in record.items() if k not in _TIMING_LISTS}


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line in one write, synced; a short write is cut back off the file."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, umask_mode(0o666))
    try:
        size = os.fstat(fd).st_size
        written = os.write(fd, data)
        if written != len(data):
            os.ftruncate(fd, size)
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


class ProgressLog:
    """``rounds.jsonl`` and ``rows.jsonl`` in ``out``, started empty, appended one JSON line at a time.

    Creating it checks ``out`` (:func:`prepare_out`) and starts both files empty, so an unwritable
    folder fails before anything is timed. A later append that fails (a full disk) is logged once and
    the run goes on: the table still reaches stdout.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = prepare_out(out)
        self.failed = False
        for name in (ROUNDS_FILE, ROWS_FILE):
            try:
                atomic_write_text(self.out / name, "")
            except OSError as err:
                raise OutputError(f"cannot write {self.out / name}: {_cause(err)}") from err

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            _append_line(self.out / name, record)
        except OSError as err:
            self.failed = True
            logger.warning(
                "cannot append to %s (%s); the rest goes to stdout only", self.out / name, _cause(err)
            )

    def round(self, index: int, times: dict[str, dict[str, float]]) -> None:
        """One timing round: ``{method: {'train'|'infer'|'merged': seconds per step}}``."""
        self._append(ROUNDS_FILE, {"round": index, "times": times})

    def row(self, row: BenchRow) -> None:
        """A finished row (timings summarised, memory measured), with its per-round times."""
        self._append(ROWS_FILE, row_record(row))


def _write(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {_cause(err)}") from err


def write_outputs(
    rows: Sequence[BenchRow], checks: Sequence[dict], out: str | os.PathLike, meta: dict
) -> Path:
    """Write ``benchmark.json`` (rows with their per-round times), ``benchmark.csv`` (rows without them)
    and ``checks.json`` (``meta`` and the checks) to ``out``, each atomically; :class:`OutputError` names
    a file that cannot be written."""
    out = prepare_out(out)
    records = [row_record(r) for r in rows]
    _write(out / "benchmark.json", json.dumps(records, indent=2) + "\n")
    _write(out / "checks.json", json.dumps({"meta": meta, "checks": list(checks)}, indent=2) + "\n")
    flat = [row_record(r, timings=False) for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    _write(out / "benchmark.csv", buf.getvalue())
    return out
