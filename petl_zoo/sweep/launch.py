"""``sweep --launcher submitit``: each run as a Slurm job through ``submitit`` (``pip install
petl_zoo[cluster]``).

The sweep plans every folder's status on the submitting machine as it does for local runs (finished
runs skipped, killed ones resumed with ``--resume``, busy and refused ones left alone), submits one job
per run to start, each job running the same ``python -P -m petl_zoo.train ...`` command a local sweep
would (the job calls ``subprocess.call``), and waits for the jobs (polling), filing each one's outcome
as it ends. Interrupted while submitting or waiting (Ctrl-C; SIGTERM, which ``petl_zoo.sweep.cli``
turns into ``execute.Terminated``), it cancels the jobs it submitted that have not ended; a rerun plans
again and submits what is still missing. ``cluster="local"`` (submitit's LocalExecutor: jobs as local
processes) and ``"debug"`` (in this process) run the same path without Slurm.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runfolder import RunFolder
from .execute import Sweep
from .plan import SweepRun

__all__ = ["CLUSTERS", "SlurmOptions", "SubmititExecutor", "default_folder"]

CLUSTERS = ("slurm", "local", "debug")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlurmOptions:
    """Per-job resources: ``time_min`` (wall-clock limit), ``gpus`` and ``cpus`` per job, the Slurm
    ``partition`` (None: the cluster's default), submitit's ``cluster`` (see CLUSTERS) and the
    ``folder`` for its job scripts and logs."""

    folder: Path
    partition: str | None = None
    time_min: int = 240
    gpus: int = 1
    cpus: int | None = None
    cluster: str = "slurm"

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"submitit cluster {self.cluster!r} is invalid; valid: {', '.join(CLUSTERS)}")
        if self.time_min < 1:
            raise ValueError(f"--slurm-time {self.time_min} is invalid; valid: minutes >= 1")
        if self.gpus < 0 or (self.cpus is not None and self.cpus < 1):
            raise ValueError(
                f"--slurm-gpus {self.gpus} / --slurm-cpus {self.cpus}: need gpus >= 0, cpus >= 1"
            )

    def parameters(self) -> dict[str, Any]:
        """submitit's ``update_parameters`` keywords (cluster-specific ones prefixed ``slurm_``)."""
        params: dict[str, Any] = {"timeout_min": self.time_min, "gpus_per_node": self.gpus, "nodes": 1}
        params["tasks_per_node"] = 1
        if self.cpus is not None:
            params["cpus_per_task"] = self.cpus
        if self.partition:
            params["slurm_partition"] = self.partition
        return params


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ValueError(
            "--launcher submitit needs the submitit package: pip install 'petl_zoo[cluster]' (or submitit)"
        ) from None
    return submitit


class SubmititExecutor:
    """Submits each run to start as one job, then waits for them all (``poll_s`` between checks)."""

    def __init__(self, options: SlurmOptions, poll_s: float = 10.0) -> None:
        self.options, self.poll_s = options, poll_s
        _import_submitit()  # fail before planning anything

    def _executor(self) -> Any:
        submitit = _import_submitit()
        executor = submitit.AutoExecutor(folder=str(self.options.folder), cluster=self.options.cluster)
        executor.update_parameters(**self.options.parameters())
        return executor

    def execute(self, runs: Sequence[SweepRun], sweep: Sweep) -> None:
        executor = self._executor()
        jobs: list[tuple[SweepRun, Any]] = []
        try:
            for run in runs:
                if not sweep.ready(run, verb="submit"):
                    continue
                executor.update_parameters(name=f"petl-{run.out.parent.name}-{run.out.name}")
                try:  # a stdlib function: the job unpickles it without importing petl_zoo (and torch)
                    job = executor.submit(subprocess.call, run.argv)
                except Exception as err:  # noqa: BLE001 - sbatch errors come in many types
                    sweep.ended(run, None, 0.0, f"could not submit: {' '.join(str(err).split())[:300]}")
                    continue
                sweep.log(f"  job {job.job_id}")
                jobs.append((run, job))
                sweep.doing = f"the submission of jobs ({len(jobs)} submitted)"
            self._wait(jobs, sweep)
        except BaseException:  # Ctrl-C, Terminated (SIGTERM), an error: no job left running for nothing
            pending = [job for run, job in jobs if not _ended(job)]
            cancelled = sum(_cancel(job) for job in pending)
            done = f"{cancelled} of {len(pending)} unfinished jobs cancelled"
            sweep.doing = f"{sweep.doing or 'the submission of jobs'} ({done})"
            raise
        sweep.doing = ""

    def _wait(self, jobs: list[tuple[SweepRun, Any]], sweep: Sweep) -> None:
        """File each job's outcome as it ends (``execute`` cancels the others if interrupted)."""
        pending = list(jobs)
        while pending:
            sweep.doing = f"the wait for {len(pending)} submitit jobs"
            for item in [j for j in pending if j[1].done()]:
                pending.remove(item)
                self._collect(*item, sweep)
            if pending:
                time.sleep(self.poll_s)

    @staticmethod
    def _collect(run: SweepRun, job: Any, sweep: Sweep) -> None:
        try:
            rc = job.result()
        except Exception as err:  # noqa: BLE001 - a job that died (timeout, node failure, cancelled)
            reason = " ".join(str(err).split())[:300]
            sweep.ended(run, None, 0.0, f"job {job.job_id} failed: {reason}; log in {job.paths.folder}")
            return
        sweep.ended(run, rc, _run_seconds(run))


def _ended(job: Any) -> bool:
    try:
        return bool(job.done())
    except Exception:  # noqa: BLE001 - its state cannot be read (sacct down): cancel it to be sure
        return False


def _cancel(job: Any) -> bool:
    """``job.cancel`` (scancel); False, with a warning naming the job, when that fails."""
    try:
        job.cancel(check=False)
    except Exception as err:  # noqa: BLE001 - scancel missing or refused
        logger.warning(f"could not cancel job {job.job_id}: {' '.join(str(err).split())[:200]}")
        return False
    return True


def _run_seconds(run: SweepRun) -> float:
    """How long a finished run took: its result.json's ``wall_time_s`` (0 when there is none)."""
    try:
        return float((RunFolder(run.out).read_result() or {}).get("wall_time_s") or 0.0)
    except (OSError, ValueError, TypeError):
        return 0.0


def default_folder(out_root: str | os.PathLike) -> Path:
    """Where submitit keeps job scripts, pickles and logs: ``<out_root>/.submitit``."""
    return Path(out_root) / ".submitit"
