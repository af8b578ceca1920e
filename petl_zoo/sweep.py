"""Run (or print) one ``tools/train.py`` command per (task, seed): the VTAB-1K sweep.

Run folders: ``<out_root>/<method>/<task>/`` for a single seed, ``<out_root>/<method>/<task>/seed<k>/``
when several seeds are given. A run with ``result.json`` is skipped; one with ``last.pt`` and no
``result.json`` (killed; also ``config.json`` alone, killed before its first checkpoint) gets
``--resume``; anything else starts fresh. Runs are subprocesses, one after the other, so a crash in one
does not stop the others; failures are listed at the end.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .table import GROUPS, canonical_task, vtab_catalog

__all__ = ["resolve_tasks", "SweepRun", "plan_sweep", "command_line", "run_sweep", "SweepReport"]

DEFAULT_TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "train.py"


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names for ``all``, a group name (natural|specialized|structured) or a comma list of either.

    Known names and aliases become catalog names; other names (custom tasks: folders with list files)
    pass through unchanged for train.py to resolve. Duplicates are dropped, first occurrence kept.
    """
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise ValueError(f"no task in '{spec}': give all, {', '.join(GROUPS)} or a comma list of task names")
    catalog = vtab_catalog()
    out: list[str] = []
    for item in items:
        key = item.lower()
        if key == "all":
            names = [e.name for e in catalog]
        elif key in GROUPS:
            names = [e.name for e in catalog if e.group == key]
        else:
            names = [canonical_task(item)]
        out += [n for n in names if n not in out]
    return out


def _task_dirname(task: str) -> str:
    """Folder name for a task: a custom task given as a path uses its last component."""
    return Path(task).name if ("/" in task or os.sep in task) else task


@dataclass
class SweepRun:
    task: str
    seed: int | None
    out: Path
    status: str  # "done" | "resume" | "fresh"
    argv: list[str] = field(default_factory=list)


def _status(out: Path) -> str:
    if (out / "result.json").is_file():
        return "done"
    # A killed run: last.pt, or config.json alone when killed before its first checkpoint (train.py
    # refuses such a folder without --resume and restarts it under --resume).
    if (out / "last.pt").is_file() or (out / "config.json").is_file():
        return "resume"
    return "fresh"


def plan_sweep(
    method: str,
    model: str,
    tasks: Sequence[str],
    seeds: Sequence[int] | None = None,
    out_root: str | os.PathLike = "runs",
    data_root: str | None = None,
    extra_args: Sequence[str] = (),
    launcher: str | None = None,
    train_script: str | os.PathLike = DEFAULT_TRAIN_SCRIPT,
    python: str = sys.executable,
) -> list[SweepRun]:
    """One SweepRun per (task, seed) with its status and full argv (launcher prefix or ``python``)."""
    if not method:
        raise ValueError("method '' is empty: give a registered method name, e.g. lora")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeat a value: give distinct seeds")
    prefix = shlex.split(launcher) if launcher else [python]
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    runs = []
    for task in tasks:
        for seed in seed_list:
            out = Path(out_root) / method / _task_dirname(task)
            if len(seed_list) > 1:
                out = out / f"seed{seed}"
            status = _status(out)
            argv = prefix + [str(train_script), "--method", method, "--model", model, "--task", task]
            if data_root:
                argv += ["--data-root", str(data_root)]
            if seed is not None:
                argv += ["--seed", str(seed)]
            argv += ["--out", str(out), *extra_args]
            if status == "resume":
                argv.append("--resume")
            runs.append(SweepRun(task, seed, out, status, argv))
    return runs


def command_line(run: SweepRun) -> str:
    """The run's argv as one shell-quoted line."""
    return shlex.join(run.argv)


@dataclass
class SweepReport:
    done: list[SweepRun] = field(default_factory=list)
    skipped: list[SweepRun] = field(default_factory=list)
    failed: list[tuple[SweepRun, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [
            f"sweep: {len(self.done)} ran, {len(self.skipped)} skipped (result.json), {len(self.failed)} failed"
        ]
        for run, why in self.failed:
            lines.append(f"  FAILED {run.out}: {why}")
            lines.append(f"    rerun: {command_line(run)}")
        return "\n".join(lines)


def run_sweep(runs: Sequence[SweepRun], log=print, env: dict[str, str] | None = None) -> SweepReport:
    """Run every non-done run as a subprocess, one after the other; never raises for a failed run."""
    report = SweepReport()
    todo = [r for r in runs if r.status != "done"]
    for r in runs:
        if r.status == "done":
            report.skipped.append(r)
            log(f"[skip] {r.out} (result.json present)")
    for i, run in enumerate(todo, 1):
        # Re-check right before starting: another worker may have finished or started it meanwhile.
        if _status(run.out) == "done":
            report.skipped.append(run)
            log(f"[skip] {run.out} (result.json appeared)")
            continue
        if _status(run.out) == "resume" and "--resume" not in run.argv:
            run.status = "resume"  # killed since planning (another worker): continue it
            run.argv.append("--resume")
        log(f"[{i}/{len(todo)}] {run.status} {run.out}\n  $ {command_line(run)}")
        start = time.time()
        try:
            proc = subprocess.run(run.argv, env=env, check=False)
            rc = proc.returncode
        except OSError as e:
            report.failed.append((run, f"could not start: {e}"))
            continue
        took = time.time() - start
        if rc != 0:
            report.failed.append((run, f"exit status {rc} after {took:.0f} s"))
        elif not (run.out / "result.json").is_file():
            report.failed.append((run, f"exit status 0 but no result.json after {took:.0f} s"))
        else:
            report.done.append(run)
            log(f"  done in {took:.0f} s")
    return report
