"""Running tunings stage by stage: every grid point first; then, for each tuning whose points are all
done, the selection record (``selection.json``) and the winner retrained for each seed.

The retrain stage needs every point's val accuracy, so it starts only once the points have ended: a
local sweep runs them one after the other; ``--launcher submitit`` submits all points of all tunings,
waits for them, then submits the retrained seeds and waits again. A tuning with a point that did not
finish (failed, refused, busy) gets no selection in this sweep; its record is written by a rerun once
the point is done. ``selection.json`` is rewritten only when its content changes (a rerun of a
finished sweep writes nothing) and lists the retrained seeds whose run is done, updated as each ends.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..runfolder import SELECTION_VERSION, RunFolder, read_selection_data, write_selection
from .execute import Sweep
from .plan import ExpectedConfig, SweepRun, _expected_config, classify, make_run
from .tuning import RULE, Tuning, choose_winner, edge_axes

__all__ = ["point_accuracy", "selection_record", "retrain_runs", "planned_runs", "run_tunings"]


def point_accuracy(run: SweepRun) -> float:
    """A finished point's last-epoch val accuracy in percent (result.json's ``val_acc_last`` x 100)."""
    folder = RunFolder(run.out)
    value = (folder.read_result() or {}).get("val_acc_last")
    if not isinstance(value, (int, float)):
        raise ValueError(
            f"run result {folder.result_path} records no val_acc_last (trained without --select-on val?)"
        )
    return round(100.0 * value, 4)


def _done(run: SweepRun, expected: ExpectedConfig) -> bool:
    return classify(run.out, run.train_args, False, expected)[0] == "done"


def selection_record(tuning: Tuning, expected: ExpectedConfig = _expected_config) -> dict[str, Any] | None:
    """The selection record (``retrained`` empty) when every point is done, else None."""
    points = []
    for setting, run in tuning.points:
        if not _done(run, expected):
            return None
        folder = os.path.relpath(run.out, tuning.folder)
        points.append({"setting": setting, "folder": folder, "val_accuracy": point_accuracy(run)})
    return {
        "version": SELECTION_VERSION,
        "method": tuning.method,
        "task": Path(tuning.task).name,
        "grid_fingerprint": tuning.fingerprint,
        "grid": tuning.grid,
        "rule": RULE,
        "points": points,
        "winner": choose_winner(points),
        "retrained": [],
    }


def retrain_runs(
    tuning: Tuning,
    winner: dict[str, Any],
    overwrite: bool = False,
    expected: ExpectedConfig = _expected_config,
    seeds: Sequence[int] | None = None,
) -> list[SweepRun]:
    """The winner's run for each seed (``seeds``, default the tuning's) in ``seed<k>/``, classified."""
    runs = []
    for seed in tuning.seeds if seeds is None else seeds:
        out = tuning.folder / f"seed{seed}"
        args = tuning.train_args(winner, seed, out, select_val=False)
        runs.append(make_run(tuning.task, seed, out, args, tuning.prefix, overwrite, expected))
    return runs


def _with_retrained(tuning: Tuning, record: dict[str, Any], expected: ExpectedConfig) -> dict:
    """``record`` with ``retrained`` = the seeds whose winner run is done: this sweep's seeds and those
    an earlier sweep of the same winner recorded."""
    old = read_selection_data(tuning.folder) or {}
    seeds = list(tuning.seeds)
    if old.get("winner") == record["winner"]:
        seeds += [
            e["seed"] for e in old.get("retrained", []) if isinstance(e, dict) and e.get("seed") not in seeds
        ]
    runs = retrain_runs(tuning, record["winner"], expected=expected, seeds=seeds)
    done = sorted(run.seed for run in runs if run.status == "done")
    return {**record, "retrained": [{"seed": s, "folder": f"seed{s}"} for s in done]}


def planned_runs(
    tunings: Sequence[Tuning], overwrite: bool = False, expected: ExpectedConfig = _expected_config
) -> list[SweepRun]:
    """Every point, and the retrained runs of the tunings whose points are all done (for
    ``--print-commands``: writes nothing)."""
    runs = [run for t in tunings for _, run in t.points]
    for tuning in tunings:
        record = selection_record(tuning, expected)
        if record is not None:
            runs += retrain_runs(tuning, record["winner"], overwrite, expected)
    return runs


def run_tunings(
    tunings: Sequence[Tuning],
    sweep: Sweep,
    overwrite: bool = False,
    expected: ExpectedConfig = _expected_config,
) -> None:
    """Stage 1: every point of every tuning; stage 2: each complete tuning's record and retrained seeds."""
    sweep.add_total(sum(len(t.points) + len(t.seeds) for t in tunings))
    sweep.run([run for t in tunings for _, run in t.points])
    retrains, by_folder = [], {}
    for tuning in tunings:
        record = selection_record(tuning, expected)
        if record is None:
            done = sum(_done(run, expected) for _, run in tuning.points)
            sweep.report.notes.append(
                f"TUNING {tuning.folder}: {done} of {len(tuning.points)} grid points done, no selection "
                "yet; rerun the sweep once they are"
            )
            sweep.add_total(-len(tuning.seeds))
            continue
        write_selection(tuning.folder, _with_retrained(tuning, record, expected))
        edges = edge_axes(tuning.grid, record["winner"])
        edge = f"; at the grid's edge: {', '.join(edges)}" if edges else ""
        sweep.log(f"[selected] {tuning.folder}: {record['winner']} (val {_best(record):.2f}{edge})")
        by_folder[str(tuning.folder)] = (tuning, record)
        retrains += retrain_runs(tuning, record["winner"], overwrite, expected)

    def update(run: SweepRun) -> None:
        tuning, record = by_folder[str(run.out.parent)]
        write_selection(tuning.folder, _with_retrained(tuning, record, expected))

    sweep.run(retrains, on_done=update)


def _best(record: dict[str, Any]) -> float:
    return next(p["val_accuracy"] for p in record["points"] if p["setting"] == record["winner"])
