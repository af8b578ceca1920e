"""Run (or print) one trainer command per (task, seed): the VTAB-1K sweep (``petl-zoo sweep``).

Each run is ``python -m petl_zoo.train ...`` (or ``<launcher> -m petl_zoo.train ...``, e.g. torchrun), so
the sweep works from an installed package as well as from a checkout.

Run folders: ``<out_root>/<method>/<task>/`` for a single seed, ``<out_root>/<method>/<task>/seed<k>/``
when several seeds are given. Each folder gets a status before anything runs (and again right before
its run starts):

- ``busy``: another live process holds its ``run.lock`` (``petl_zoo.train.lock``): skipped, not failed;
- ``done``: ``result.json`` of the same run (the run fingerprint of ``petl_zoo.fingerprint`` and the
  seed match what this command's trainer would record, resolved in this process by
  ``petl_zoo.train.spec.expected_config``): skipped;
- ``differs``: a run (finished, or killed with a ``config.json``) made with other settings: refused,
  naming the keys that differ, unless ``--overwrite`` (then ``overwrite``: the trainer gets
  ``--overwrite``);
- ``resume``: killed (``last.pt``, or ``config.json`` alone when killed before its first checkpoint):
  the trainer gets ``--resume`` (and checks the settings against ``last.pt`` itself);
- ``fresh``: anything else.

Runs are subprocesses, one after the other, so a crash in one does not stop the others; refused and
failed runs are listed at the end (exit status 1).
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

__all__ = [
    "resolve_tasks",
    "SweepRun",
    "Unchecked",
    "classify",
    "recipe_differences",
    "plan_sweep",
    "command_line",
    "run_sweep",
    "check_writable",
    "SweepReport",
    "main",
]

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


#: What a status adds to the trainer's command line.
_STATUS_FLAGS = {"resume": ["--resume"], "overwrite": ["--overwrite"]}
_LOCK_FILE = "run.lock"  # petl_zoo.train.lock.LOCK_FILE (not imported: it loads torch)
_BUSY_EXIT_STATUS = 75  # petl_zoo.train.lock.BUSY_EXIT_STATUS


@dataclass
class SweepRun:
    """One (task, seed): its folder, ``status`` (see the module docstring), why (for busy / differs /
    overwrite), the trainer's arguments and the full command (``prefix + train_args + status flag``)."""

    task: str
    seed: int | None
    out: Path
    status: str  # "done" | "resume" | "fresh" | "busy" | "differs" | "overwrite"
    argv: list[str] = field(default_factory=list)
    train_args: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)
    why: str = ""

    def set_status(self, status: str, why: str = "") -> None:
        self.status, self.why = status, why
        self.argv = self.prefix + self.train_args + _STATUS_FLAGS.get(status, [])


ExpectedConfig = Callable[[list[str]], dict]


def _expected_config(train_args: list[str]) -> dict:
    from .train.spec import expected_config

    return expected_config(train_args)


def _read_dict(path: Path, what: str) -> dict:
    from .io import read_json

    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} does not hold a dict")
    return data


def _recorded(out: Path, finished: bool) -> tuple[dict | None, str | None, int | None]:
    """The folder's config.json (or None), its recorded run fingerprint and seed (damaged files raise
    ValueError naming them)."""
    config = _read_dict(out / "config.json", "run config") if (out / "config.json").is_file() else None
    result = _read_dict(out / "result.json", "run result") if finished else {}
    recorded = (result.get("fingerprint") or {}).get("run") or ((config or {}).get("fingerprint") or {}).get(
        "run"
    )
    if recorded is None and config and config.get("method"):
        from .fingerprint import run_fingerprint

        recorded = run_fingerprint(config)
    seed = ((config or {}).get("recipe") or {}).get("seed", result.get("seed"))
    return config, recorded, seed


class Unchecked(Exception):
    """A finished run whose settings cannot be compared (no recorded settings, damaged files,
    arguments that do not resolve): refused like one of other settings."""


def recipe_differences(
    out: Path, train_args: list[str], finished: bool, expected: ExpectedConfig = _expected_config
) -> list[str] | None:
    """How the run in ``out`` differs from what ``train_args`` would train (``[]``: the same run), as
    ``key: old -> new``. A finished run that cannot be checked raises Unchecked with the reason; a
    killed one returns None (its trainer checks ``--resume`` against ``last.pt``)."""
    try:
        config, recorded, seed = _recorded(out, finished)
        if recorded is None:
            raise Unchecked("no config.json nor recorded fingerprint: cannot tell which settings made it")
        try:
            new = expected(train_args)
        except (ValueError, OSError, RuntimeError) as err:
            raise Unchecked(f"cannot resolve this command's settings: {' '.join(str(err).split())}") from None
    except (Unchecked, ValueError, OSError) as err:
        if finished:
            raise Unchecked(str(err)) from None
        return None
    from .train.spec import run_differences

    new_seed = (new.get("recipe") or {}).get("seed")
    if recorded == (new.get("fingerprint") or {}).get("run") and seed == new_seed:
        return []
    if config:
        diff = run_differences(config, new)  # fingerprint.identity_diff and the seed
    else:
        diff = [f"recipe.seed: {seed} -> {new_seed}"] if seed != new_seed else []
    return diff or [f"run fingerprint {recorded} -> {new['fingerprint']['run']}"]


def classify(
    out: Path, train_args: list[str], overwrite: bool = False, expected: ExpectedConfig = _expected_config
) -> tuple[str, str]:
    """``(status, why)`` of the folder ``out`` for a trainer run of ``train_args`` (module docstring)."""
    if (out / _LOCK_FILE).exists():
        from .train.lock import live_holder

        holder = live_holder(out)
        if holder is not None:
            return "busy", f"in use by {holder.describe()}"
    finished = (out / "result.json").is_file()
    # A killed run: last.pt, or config.json alone when killed before its first checkpoint (train.py
    # refuses such a folder without --resume and restarts it under --resume).
    started = (out / "last.pt").is_file() or (out / "config.json").is_file()
    if not finished and not started:
        return "fresh", ""
    try:
        diff = recipe_differences(out, train_args, finished, expected)
    except Unchecked as err:
        return ("overwrite" if overwrite else "differs"), f"cannot check its settings: {err}"
    if diff:
        from .train.spec import format_differences

        return ("overwrite" if overwrite else "differs"), f"other settings: {format_differences(diff)}"
    return ("done" if finished else "resume"), ""


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
    overwrite: bool = False,
    expected: ExpectedConfig = _expected_config,
) -> list[SweepRun]:
    """One SweepRun per (task, seed) with its status and full argv.

    The command is ``<launcher or python> -m petl_zoo.train ...``; ``train_script`` replaces
    ``-m petl_zoo.train`` by a script path (a stand-in trainer, e.g. in tests). ``overwrite``: runs
    made with other settings are replaced (``--overwrite``) rather than refused; ``expected`` turns
    trainer arguments into the config.json they would produce (the default resolves the trainer's
    spec in this process).
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
            train_args = ["--method", method, "--model", model, "--task", task]
            if data_root:
                train_args += ["--data-root", str(data_root)]
            if seed is not None:
                train_args += ["--seed", str(seed)]
            train_args += ["--out", str(out), *extra_args]
            run = SweepRun(task, seed, out, "fresh", train_args=train_args, prefix=list(prefix))
            run.set_status(*classify(out, train_args, overwrite, expected))
            runs.append(run)
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
    busy: list[SweepRun] = field(default_factory=list)
    refused: list[SweepRun] = field(default_factory=list)
    failed: list[tuple[SweepRun, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.refused

    def summary(self) -> str:
        lines = [
            f"sweep: {len(self.done)} ran, {len(self.skipped)} skipped (result.json), {len(self.busy)} busy, "
            f"{len(self.refused)} refused, {len(self.failed)} failed"
        ]
        for run in self.busy:
            lines.append(f"  BUSY {run.out}: {run.why}")
        for run in self.refused:
            lines.append(f"  REFUSED {run.out}: {run.why}; --overwrite replaces it")
        for run, why in self.failed:
            lines.append(f"  FAILED {run.out}: {why}")
            lines.append(f"    rerun: {command_line(run)}")
        return "\n".join(lines)


def _set_aside(run: SweepRun, report: SweepReport, log: Callable[[str], None], when: str = "") -> bool:
    """File a run that is not to be started (done, busy, differs) in the report; False for the others."""
    if run.status == "done":
        report.skipped.append(run)
        log(f"[skip] {run.out} (result.json {'appeared' if when else 'present'})")
    elif run.status == "busy":
        report.busy.append(run)
        log(f"[busy] {run.out} ({run.why}{when})")
    elif run.status == "differs":
        report.refused.append(run)
        log(f"[refused] {run.out}: {run.why}; --overwrite replaces it")
    else:
        return False
    return True


def run_sweep(
    runs: Sequence[SweepRun],
    log: Callable[[str], None] = logger.info,
    env: dict[str, str] | None = None,
    overwrite: bool = False,
    expected: ExpectedConfig = _expected_config,
) -> SweepReport:
    """Run every run to start (fresh, resume, overwrite) as a subprocess, one after the other; never
    raises for a failed run. Busy and refused runs are reported, not started."""
    report = SweepReport()
    todo = [r for r in runs if not _set_aside(r, report, log)]
    for i, run in enumerate(todo, 1):
        # Re-check right before starting: another worker may have finished, started or killed it.
        run.set_status(*classify(run.out, run.train_args, overwrite, expected))
        if _set_aside(run, report, log, when=" since planning"):
            continue
        log(f"[{i}/{len(todo)}] {run.status} {run.out}\n  $ {command_line(run)}")
        start = time.time()
        try:
            proc = subprocess.run(run.argv, env=env, check=False, preexec_fn=_die_with_parent)
            rc = proc.returncode
        except OSError as e:
            report.failed.append((run, f"could not start: {e}"))
            continue
        took = time.time() - start
        if rc == _BUSY_EXIT_STATUS:  # another process took the folder between the check and the start
            run.set_status("busy", "taken by another process as this run started")
            report.busy.append(run)
        elif rc != 0:
            report.failed.append((run, f"exit status {rc} after {took:.0f} s"))
        elif not (run.out / "result.json").is_file():
            report.failed.append((run, f"exit status 0 but no result.json after {took:.0f} s"))
        else:
            report.done.append(run)
            log(f"  done in {took:.0f} s")
    return report


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` and a file in it (removed again): a WriteError line before any run starts
    when the output root cannot be written (a parent that is a file, read-only, full)."""
    from .io import WriteError, make_dir, open_for_write

    folder = make_dir(folder)
    probe = folder / f".sweep-write-check.{os.getpid()}.tmp"
    try:
        with open_for_write(probe, "x") as f:
            f.write("ok\n")
    except OSError as err:
        raise WriteError.of(err, probe) from None
    finally:
        probe.unlink(missing_ok=True)


def _parser(prog: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run every VTAB-1K task (x seeds) for one method, or print one command per run.",
        epilog="Flags after '--' go to every trainer run, e.g. -- --opt rank=8 --epochs 100. Runs land in "
        "<out-root>/<method>/<task>/ (one seed) or .../<task>/seed<k>/ (several); finished runs of the "
        "same settings are skipped, killed ones resumed, runs in use by another process left alone, and "
        "runs made with other settings refused (--overwrite replaces them). Exit status 1 if any run "
        "failed or was refused.",
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace runs made with other settings (the trainer gets --overwrite) instead of refusing them",
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
            overwrite=args.overwrite,
        )
    except ValueError as e:
        p.error(str(e))
    if args.print_commands:
        return _print_commands(runs, args.all)
    try:
        check_writable(args.out_root)
    except OSError as err:
        why = getattr(err, "reason", None) or err.strerror or str(err)
        sys.stderr.write(f"error: cannot write the output root {args.out_root}: {why}; nothing was run\n")
        return 1
    report = run_sweep(runs, log=lambda s: print(s, flush=True), overwrite=args.overwrite)
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


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


if __name__ == "__main__":
    sys.exit(main())
