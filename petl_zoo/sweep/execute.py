"""Running a planned sweep: each run to start goes to an executor, each outcome to the report.

``Sweep`` files every run (started, skipped, busy, refused, failed) in a ``SweepReport`` and logs one
line per run start and end with the overall progress (runs done of the sweep's total, and an ETA from
the mean duration of the runs finished in this sweep). Executors start the runs:

- ``LocalExecutor``: subprocesses, one after the other (a crash in one does not stop the others); each
  child gets SIGTERM when the sweep dies (Linux), so no orphaned trainer keeps writing, and when the
  sweep is interrupted (Ctrl-C, SIGTERM: ``Terminated``) the running child is stopped (SIGTERM, then
  SIGKILL after ``STOP_GRACE_S``) before the interruption goes on;
- ``InProcessExecutor``: ``petl_zoo.train.main`` in this process (a testing aid: fast, no isolation);
- ``petl_zoo.sweep.launch.SubmititExecutor``: one Slurm job per run through submitit.

Each status is checked again right before its run starts (or is submitted): another worker may have
finished, started or killed it since planning. ``Sweep.doing`` says what the sweep is busy with (the
run in progress, the jobs waited for), for the line that reports an interruption.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..runfolder import RESULT, RunFolder
from .plan import BUSY_EXIT_STATUS, ExpectedConfig, SweepRun, _expected_config, classify, command_line

__all__ = [
    "SweepReport",
    "StopSweep",
    "Terminated",
    "Sweep",
    "LocalExecutor",
    "InProcessExecutor",
    "run_sweep",
    "format_seconds",
]

logger = logging.getLogger(__name__)

#: Seconds an interrupted sweep gives its running child to stop after SIGTERM (it releases its run
#: folder's lock) before killing it.
STOP_GRACE_S = 10.0


class Terminated(BaseException):
    """SIGTERM to the sweep as an exception (``petl_zoo.sweep.cli`` raises it), so that the running
    child is stopped and submitted jobs are cancelled on the way out, as for Ctrl-C."""


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
    notes: list[str] = field(default_factory=list)  # e.g. a tuning whose grid is incomplete

    @property
    def ok(self) -> bool:
        return not self.failed and not self.refused

    @property
    def settled(self) -> int:
        """Runs that need nothing more: finished in this sweep or found finished."""
        return len(self.done) + len(self.skipped)

    @property
    def accounted(self) -> int:
        return self.settled + len(self.busy) + len(self.refused) + len(self.failed)

    def summary(self) -> str:
        lines = [
            f"sweep: {len(self.done)} ran, {len(self.skipped)} skipped ({RESULT}), {len(self.busy)} busy, "
            f"{len(self.refused)} refused, {len(self.failed)} failed"
        ]
        for run in self.busy:
            lines.append(f"  BUSY {run.out}: {run.why}")
        for run in self.refused:
            lines.append(f"  REFUSED {run.out}: {run.why}; --overwrite replaces it")
        for run, why in self.failed:
            lines.append(f"  FAILED {run.out}: {why}")
            lines.append(f"    rerun: {command_line(run)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


class StopSweep(Exception):
    """Raised after ``stop_after`` started runs (a testing aid: a sweep stopped mid-way, as if killed)."""


def format_seconds(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Sweep:
    """Files runs in ``report`` and logs progress; executors call ``ready`` before they start a run and
    ``ended`` when it ends. ``total``: the runs of the whole sweep (``add_total`` adds planned ones)."""

    def __init__(
        self,
        executor: LocalExecutor | None = None,
        log: Callable[[str], None] = logger.info,
        overwrite: bool = False,
        expected: ExpectedConfig = _expected_config,
        total: int = 0,
        stop_after: int | None = None,
    ) -> None:
        self.executor = executor or LocalExecutor()
        self.log, self.overwrite, self.expected = log, overwrite, expected
        self.total, self.stop_after = total, stop_after
        self.report = SweepReport()
        self.durations: list[float] = []
        self.started = 0
        self.doing = ""  # what is in progress: "run runs/lora/dtd", "3 submitit jobs"; "" between runs
        self._on_done: dict[str, Callable[[SweepRun], None]] = {}

    def add_total(self, n: int) -> None:
        self.total += n

    def interrupted(self, how: str) -> str:
        """One line for an interruption (``how``: ``interrupted (Ctrl-C)``): what was in progress, how many
        runs are done and left, and that a rerun resumes."""
        total = max(self.total, self.report.accounted)
        left = total - self.report.settled
        doing = f"during {self.doing}" if self.doing else "between runs"
        return (
            f"sweep {how} {doing}; {self.report.settled} of {total} runs done, {left} left; rerun the same "
            "command to resume (finished runs are skipped, killed ones resumed)"
        )

    def progress(self) -> str:
        """``5/36 runs done, ETA 12 min`` (the ETA once a run has finished in this sweep)."""
        line = f"{self.report.settled}/{max(self.total, self.report.accounted)} runs done"
        left = self.total - self.report.accounted
        if self.durations and left > 0:
            line += f", ETA {format_seconds(left * sum(self.durations) / len(self.durations))}"
        return line

    def run(self, runs: Sequence[SweepRun], on_done: Callable[[SweepRun], None] | None = None) -> None:
        """Set aside the runs not to start (done, busy, differs), hand the others to the executor.
        ``on_done(run)`` is called for every run that is done (found finished or finished now)."""
        todo = []
        for run in runs:
            if on_done is not None:
                self._on_done[str(run.out)] = on_done
            if not self._set_aside(run):
                todo.append(run)
        if todo:
            self.executor.execute(todo, self)

    def _set_aside(self, run: SweepRun, when: str = "") -> bool:
        """File a run that is not to be started (done, busy, differs); False for the others."""
        report = self.report
        if run.status == "done":
            report.skipped.append(run)
            self.log(f"[skip] {run.out} ({RESULT} {'appeared' if when else 'present'})")
            self._done(run)
        elif run.status == "busy":
            report.busy.append(run)
            self.log(f"[busy] {run.out} ({run.why}{when})")
        elif run.status == "differs":
            report.refused.append(run)
            self.log(f"[refused] {run.out}: {run.why}; --overwrite replaces it")
        else:
            return False
        return True

    def _done(self, run: SweepRun) -> None:
        callback = self._on_done.get(str(run.out))
        if callback is not None:
            callback(run)

    def ready(self, run: SweepRun, verb: str = "start") -> bool:
        """Re-check the run's status; True (and a ``[start]`` line) when it is still to be started."""
        run.set_status(*classify(run.out, run.train_args, self.overwrite, self.expected))
        if self._set_aside(run, when=" since planning"):
            return False
        self.log(f"[{verb}] {run.status} {run.out} ({self.progress()})\n  $ {command_line(run)}")
        return True

    def ended(self, run: SweepRun, rc: int | None, took: float, error: str = "") -> None:
        """File the outcome of a started run (``rc`` None: it could not start, ``error`` says why)."""
        report, why = self.report, ""
        if rc is None:
            why = error or "could not start"
        elif rc == BUSY_EXIT_STATUS:  # another process took the folder between the check and the start
            run.set_status("busy", "taken by another process as this run started")
            report.busy.append(run)
        elif rc != 0:
            why = f"exit status {rc} after {took:.0f} s"
        elif not RunFolder(run.out).finished:
            why = f"exit status 0 but no {RESULT} after {took:.0f} s"
        else:
            report.done.append(run)
            self.durations.append(took)
        if why:
            report.failed.append((run, why))
            self.log(f"[failed] {run.out}: {why} ({self.progress()})")
        elif run.status == "busy":
            self.log(f"[busy] {run.out}: {run.why} ({self.progress()})")
        else:
            self.log(f"[done] {run.out} in {format_seconds(took)} ({self.progress()})")
            self._done(run)
        self.started += 1
        if self.stop_after is not None and self.started >= self.stop_after:
            raise StopSweep(f"stopped after {self.started} runs (--stop-after-runs)")


class LocalExecutor:
    """Each run as a subprocess, one after the other (``env``: the children's environment)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env

    def start(self, run: SweepRun) -> int:
        child = subprocess.Popen(run.argv, env=self.env, preexec_fn=_die_with_parent)
        try:
            return child.wait()
        except BaseException:  # Ctrl-C, Terminated: stop the child before going on
            _stop(child)
            raise

    def execute(self, runs: Sequence[SweepRun], sweep: Sweep) -> None:
        for run in runs:
            if not sweep.ready(run):
                continue
            start = time.time()
            sweep.doing = f"run {run.out}"
            try:
                rc = self.start(run)
            except OSError as err:
                sweep.doing = ""
                sweep.ended(run, None, time.time() - start, f"could not start: {err}")
                continue
            except BaseException:
                sweep.doing = f"run {run.out} (stopped)"
                raise
            sweep.doing = ""
            sweep.ended(run, rc, time.time() - start)


def _stop(child: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to a running child (the trainer releases its lock and exits 143), SIGKILL when it has not
    ended within ``grace_s`` seconds or a second interruption comes while waiting."""
    if child.poll() is not None:
        return
    try:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=grace_s)
    except BaseException:  # noqa: BLE001 - the timeout, or a second Ctrl-C: kill it
        child.kill()
        child.wait()


class InProcessExecutor(LocalExecutor):
    """``petl_zoo.train.main`` in this process, one run after the other: a testing aid (no torch
    import per run), without the isolation of a subprocess."""

    def start(self, run: SweepRun) -> int:
        from ..train import main

        return main(run.argv[len(run.prefix) :])


def run_sweep(
    runs: Sequence[SweepRun],
    log: Callable[[str], None] = logger.info,
    env: dict[str, str] | None = None,
    overwrite: bool = False,
    expected: ExpectedConfig = _expected_config,
) -> SweepReport:
    """Run every run to start (fresh, resume, overwrite) as a subprocess, one after the other; never
    raises for a failed run. Busy and refused runs are reported, not started."""
    sweep = Sweep(LocalExecutor(env), log, overwrite, expected, total=len(runs))
    sweep.run(runs)
    return sweep.report
