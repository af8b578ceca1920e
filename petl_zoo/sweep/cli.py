"""``petl-zoo sweep`` / ``tools/sweep.py`` / ``python -m petl_zoo.sweep``: the command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import vtab

from .execute import InProcessExecutor, LocalExecutor, StopSweep, Sweep, Terminated
from .launch import CLUSTERS, SlurmOptions, SubmititExecutor, default_folder
from .plan import (
    SweepRun,
    check_method_and_seeds,
    check_writable,
    command_line,
    plan_sweep,
    resolve_tasks,
    train_prefix,
)
from .stages import planned_runs, run_tunings
from .tuning import GRID_KEYS, parse_grid, plan_tuning

__all__ = ["main", "INTERRUPTED_EXIT_STATUS", "TERMINATED_EXIT_STATUS"]

SUBMITIT = "submitit"
INTERRUPTED_EXIT_STATUS = 130  # Ctrl-C, as the trainer (128 + SIGINT)
TERMINATED_EXIT_STATUS = 143  # SIGTERM, as the trainer (128 + SIGTERM)

DESCRIPTION = """\
Run every VTAB-1K task (x seeds) for one or more methods, tuned on val200 or not, or print one
command per run."""

EPILOG = """\
Flags after '--' go to every trainer run, e.g. -- --opt rank=8 --epochs 100.
Runs land in <out-root>/<method>/<task>/ (one seed) or .../<task>/seed<k>/ (several); tuned runs in
.../<task>/tune-<fingerprint>/ (points/<setting>/, seed<k>/, selection.json).
Finished runs of the same settings are skipped, killed ones resumed, runs in use by another process
left alone, and runs made with other settings refused (--overwrite replaces them).
Exit status: 1 if any run failed or was refused, 2 for a bad argument, 130 on Ctrl-C and 143 on
SIGTERM (the running trainer stopped, submitted jobs cancelled; a rerun resumes). See docs/sweep.md."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description and epilog as written, each option's default after its help; an option whose
    default is None or an empty list (or a flag, default False) says what that means in its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line ``error: ... (see PROG --help)`` (the usage is on ``--help``)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {' '.join(message.split())} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _parser(prog: str | None) -> _Parser:
    p = _Parser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--method", help="one registered method")
    which.add_argument("--methods", help="a comma list of methods, e.g. lora,neat")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    p.add_argument(
        "--benchmark",
        default="vtab",
        choices=vtab.BENCHMARK_NAMES,
        help="whose tasks --tasks names (all = its tasks; its recipe is the trainer's default for them)",
    )
    p.add_argument(
        "--tasks", default="all", help="all | a group (natural | specialized | structured) | comma list"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="integers >= 0, one folder per seed when several "
        "(tuning: the retrained seeds, the first also trains the grid points); default: the trainer's "
        "seed (0) in <task>/"
    )  # fmt: skip
    p.add_argument("--out-root", default="runs", help="where the run folders go")
    p.add_argument(
        "--data-root", default=None, help="VTAB-1K root; default: the trainer's ($VTAB_ROOT, else ./data/vtab-1k)"
    )  # fmt: skip
    p.add_argument(
        "--preset", default=None, help="a paper preset for every run (the trainer's --preset); default: none"
    )
    t = p.add_argument_group("tuning (grid on train800 -> val200, winner retrained on train800val200)")
    t.add_argument(
        "--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
        help=f"recipe values to tune: {', '.join(GRID_KEYS)} (wd = weight_decay); without lr, each method's "
        "default lr grid (petl_zoo.sweep.tuning.LR_GRIDS) unless -- --lr fixes it; default: no tuning",
    )  # fmt: skip
    t.add_argument(
        "--grid-opt", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
        help="method options to tune (values holding commas separated by |: targets=q,v|qkv); default: none",
    )  # fmt: skip
    t.add_argument("--tune", action="store_true", help="tune with the default grid (each method's lr grid)")
    p.add_argument(
        "--print-commands", action="store_true", help="print one shell command per run, run nothing"
    )
    p.add_argument("--all", action="store_true", help="with --print-commands: also print finished runs")
    p.add_argument(
        "--launcher", default=None,
        help="command prefix replacing python, e.g. 'torchrun --nproc_per_node 8'; or 'submitit': one Slurm "
        "job per run; default: python -P -m petl_zoo.train, one run after the other",
    )  # fmt: skip
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace runs made with other settings (the trainer gets --overwrite) instead of refusing them",
    )
    s = p.add_argument_group("--launcher submitit (pip install 'petl_zoo[cluster]')")
    s.add_argument("--slurm-partition", default=None, help="Slurm partition; default: the cluster's")
    s.add_argument("--slurm-time", type=int, default=240, help="minutes per job")
    s.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per job")
    s.add_argument("--slurm-cpus", type=int, default=None, help="CPUs per job; default: Slurm's")
    s.add_argument(
        "--submitit-cluster", default="slurm", choices=CLUSTERS, help="local: jobs as local processes"
    )
    s.add_argument(
        "--submitit-folder", default=None, help="job scripts and logs; default: <out-root>/.submitit"
    )
    p.add_argument("--train-script", default=None, help=argparse.SUPPRESS)
    # Testing aids: the trainer in this process; stop after N started runs, as if the sweep were killed.
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stop-after-runs", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-method-check", action="store_true", help="do not check --method against the registry"
    )
    return p


def _methods(args: argparse.Namespace) -> list[str]:
    names = [args.method] if args.method is not None else [m.strip() for m in args.methods.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"methods {names} hold an empty or repeated name: give a comma list, e.g. lora,neat")
    if not args.no_method_check:
        from ..registry import get_method

        for name in names:
            get_method(name)  # fail once, here, rather than once per run
    return names


def _extra_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The trainer flags of every run: ``--preset`` (a sweep flag), then those after ``--``; on Slurm
    GPUs ``--device cuda`` unless given, so that the statuses planned here (where there may be no GPU)
    resolve the device defaults the jobs will use."""
    out = (["--preset", args.preset] if args.preset else []) + extra
    gpu_jobs = args.launcher == SUBMITIT and args.slurm_gpus > 0 and args.submitit_cluster == "slurm"
    if gpu_jobs and not any(a == "--device" or a.startswith("--device=") for a in out):
        out += ["--device", "cuda"]
    return out


def _executor(args: argparse.Namespace) -> LocalExecutor | SubmititExecutor:
    if args.launcher == SUBMITIT:
        folder = args.submitit_folder or default_folder(args.out_root)
        options = SlurmOptions(
            folder,
            args.slurm_partition,
            args.slurm_time,
            args.slurm_gpus,
            args.slurm_cpus,
            args.submitit_cluster,
        )
        return SubmititExecutor(options, poll_s=10.0 if args.submitit_cluster == "slurm" else 0.2)
    return InProcessExecutor() if args.in_process else LocalExecutor()


def _plan(args: argparse.Namespace, extra: list[str]) -> tuple[list[SweepRun], list]:
    """``(plain runs, tunings)``: a tuning per method and task when tuning, else plain runs."""
    methods, tasks = _methods(args), resolve_tasks(args.tasks, args.benchmark)
    launcher = None if args.launcher == SUBMITIT else args.launcher
    prefix = train_prefix(launcher, args.train_script)
    tuning = bool(args.grid or args.grid_opt or args.tune)
    grid = parse_grid(args.grid, args.grid_opt) if tuning else {}
    runs, tunings = [], []
    for method in methods:
        check_method_and_seeds(method, args.seeds)
        if tuning:
            tunings += plan_tuning(
                method, args.model, tasks, grid, args.seeds, args.out_root, args.data_root, extra, prefix,
                args.overwrite,
            )  # fmt: skip
        else:
            runs += plan_sweep(
                method, args.model, tasks, seeds=args.seeds, out_root=args.out_root, data_root=args.data_root,
                extra_args=extra, launcher=launcher, train_script=args.train_script, overwrite=args.overwrite,
            )  # fmt: skip
    return runs, tunings


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` in the main thread (unless SIGTERM is ignored), so
    that the running child is stopped and submitted jobs are cancelled as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``petl-zoo sweep`` / ``tools/sweep.py``: returns the exit status (130 on Ctrl-C, 143 on SIGTERM,
    each reported in one line saying what was interrupted and what is left)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = _parser(prog)
    args = p.parse_args(argv)
    state: dict[str, Sweep] = {}
    try:
        with _sigterm_raises():
            return _run(p, args, extra, state)
    except KeyboardInterrupt:
        how, status = "interrupted (Ctrl-C)", INTERRUPTED_EXIT_STATUS
    except Terminated:
        how, status = "terminated (SIGTERM)", TERMINATED_EXIT_STATUS
    sweep = state.get("sweep")
    line = sweep.interrupted(how) if sweep is not None else f"sweep {how} while planning; nothing was run"
    sys.stderr.write(f"error: {line}\n")
    return status


def _run(p: _Parser, args: argparse.Namespace, extra: list[str], state: dict[str, Sweep]) -> int:
    """Plan, then run (or print) the sweep; ``state["sweep"]`` once it runs (for the interrupted line)."""
    try:
        if args.in_process and (args.launcher or args.train_script):
            raise ValueError("--in-process runs the trainer in this process: no --launcher / --train-script")
        extra = _extra_args(args, extra)
        executor = None if args.print_commands else _executor(args)
        runs, tunings = _plan(args, extra)
    except ValueError as e:
        p.error(str(e))
    if args.print_commands:
        return _print_commands(runs + planned_runs(tunings, args.overwrite), args.all)
    try:
        check_writable(args.out_root)
    except OSError as err:
        why = getattr(err, "reason", None) or err.strerror or str(err)
        sys.stderr.write(f"error: cannot write the output root {args.out_root}: {why}; nothing was run\n")
        return 1
    sweep = Sweep(executor, log=lambda s: print(s, flush=True), overwrite=args.overwrite,
                  total=len(runs), stop_after=args.stop_after_runs)  # fmt: skip
    state["sweep"] = sweep
    try:
        sweep.run(runs)
        if tunings:
            run_tunings(tunings, sweep, args.overwrite)
    except StopSweep as stop:
        sweep.report.notes.append(f"STOPPED: {stop}")
        print(sweep.report.summary(), flush=True)
        return 1
    except ValueError as err:  # a damaged point result or selection record: one line, nothing more run
        print(sweep.report.summary(), flush=True)
        sys.stderr.write(f"error: {err}\n")
        return 1
    print(sweep.report.summary(), flush=True)
    return 0 if sweep.report.ok else 1


def _print_commands(runs: Sequence[SweepRun], everything: bool) -> int:
    """One shell line per run to start (``everything``: finished ones too); busy and refused runs are
    left out, with a ``#`` line on stderr saying why."""
    try:
        for run in runs:
            if run.status in ("busy", "differs"):
                replace = "; --overwrite replaces it" if run.status == "differs" else ""
                sys.stderr.write(f"# left out {run.out}: {run.why}{replace}\n")
            elif run.status != "done" or everything:
                print(command_line(run), flush=True)
    except BrokenPipeError:  # `... --print-commands | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # silence the flush at exit
    return 0
