"""Run (or print) one trainer command per (task, seed): the VTAB-1K sweep (``petl-zoo sweep``).

Each run is ``python -m petl_zoo.train ...`` (or ``<launcher> -m petl_zoo.train ...``, e.g. torchrun), so
the sweep works from an installed package as well as from a checkout.

Run folders: ``<out_root>/<method>/<task>/`` for a single seed, ``<out_root>/<method>/<task>/seed<k>/``
when several seeds are given. A run with ``result.json`` is skipped; one with ``last.pt`` and no
``result.json`` (killed; also ``config.json`` alone, killed before its first checkpoint) gets
``--resume``; anything else starts fresh. Runs are subprocesses, one after the other, so a crash in one
does not stop the others; failures are listed at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .table import GROUPS, canonical_task, vtab_catalog

__all__ = ["resolve_tasks", "SweepRun", "plan_sweep", "command_line", "run_sweep", "SweepReport", "main"]

logger = logging.getLogger(__name__)

#: The trainer as a module, runnable by ``python -m`` and by ``torchrun -m`` alike.
TRAIN_MODULE = "petl_zoo.train"


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
    train_script: str | os.PathLike | None = None,
    python: str = sys.executable,
) -> list[SweepRun]:
    """One SweepRun per (task, seed) with its status and full argv.

    The command is ``<launcher or python> -m petl_zoo.train ...``; ``train_script`` replaces
    ``-m petl_zoo.train`` by a script path (a stand-in trainer, e.g. in tests).
    """
    if not method:
        raise ValueError("method '' is empty: give a registered method name, e.g. lora")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeat a value: give distinct seeds")
    prefix = shlex.split(launcher) if launcher else [python]
    prefix += [str(train_script)] if train_script is not None else ["-m", TRAIN_MODULE]
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    runs = []
    for task in tasks:
        for seed in seed_list:
            out = Path(out_root) / method / _task_dirname(task)
            if len(seed_list) > 1:
                out = out / f"seed{seed}"
            status = _status(out)
            argv = prefix + ["--method", method, "--model", model, "--task", task]
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


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the sweep dies (even by ``kill -9``), so
    that no orphaned trainer keeps writing into a run folder. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() == 1:  # the sweep died between fork and prctl
        os._exit(1)


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


def run_sweep(
    runs: Sequence[SweepRun], log: Callable[[str], None] = logger.info, env: dict[str, str] | None = None
) -> SweepReport:
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
            proc = subprocess.run(run.argv, env=env, check=False, preexec_fn=_die_with_parent)
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


def _parser(prog: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run every VTAB-1K task (x seeds) for one method, or print one command per run.",
        epilog="Flags after '--' go to every trainer run, e.g. -- --opt rank=8 --epochs 100. Runs land in "
        "<out-root>/<method>/<task>/ (one seed) or .../<task>/seed<k>/ (several); finished runs are "
        "skipped, killed ones resumed. Exit status 1 if any run failed.",
    )
    p.add_argument("--method", required=True)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--tasks", default="all", help="all | natural | specialized | structured | comma list")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="one folder per seed when several")
    p.add_argument("--out-root", default="runs")
    p.add_argument("--data-root", default=None)
    p.add_argument(
        "--print-commands", action="store_true", help="print one shell command per run, run nothing"
    )
    p.add_argument("--all", action="store_true", help="with --print-commands: also print finished runs")
    p.add_argument(
        "--launcher", default=None, help="command prefix replacing python, e.g. 'torchrun --nproc_per_node 8'"
    )
    p.add_argument("--train-script", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-method-check", action="store_true", help="do not check --method against the registry"
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``petl-zoo sweep`` / ``tools/sweep.py``: returns the exit status."""
    from .registry import get_method

    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = _parser(prog)
    args = p.parse_args(argv)
    try:
        if not args.no_method_check:
            get_method(args.method)  # fail once, here, rather than once per run
        runs = plan_sweep(
            args.method,
            args.model,
            resolve_tasks(args.tasks),
            seeds=args.seeds,
            out_root=args.out_root,
            data_root=args.data_root,
            extra_args=extra,
            launcher=args.launcher,
            train_script=args.train_script,
        )
    except ValueError as e:
        p.error(str(e))
    if args.print_commands:
        try:
            for run in runs:
                if run.status != "done" or args.all:
                    print(command_line(run), flush=True)
        except BrokenPipeError:  # `... --print-commands | head` closed the pipe: not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # silence the flush at exit
        return 0
    report = run_sweep(runs, log=lambda s: print(s, flush=True))
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
