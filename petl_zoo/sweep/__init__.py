"""The VTAB-1K sweep (``petl-zoo sweep``, ``tools/sweep.py``, ``python -m petl_zoo.sweep``): one trainer
run per (method, task, seed), or a tuning per (method, task): a grid scored on val200, the winner
retrained over seeds. See docs/sweep.md.

Modules: ``plan`` (run folders, statuses, trainer commands), ``execute`` (running them: progress,
report, local executors), ``launch`` (Slurm jobs through submitit), ``tuning`` (grids, default lr
grids, the selection rule), ``stages`` (points, then selection and retraining), ``cli``.
"""

from .cli import main
from .execute import SweepReport, run_sweep
from .plan import (
    TRAIN_MODULE,
    SweepRun,
    Unchecked,
    check_writable,
    classify,
    command_line,
    plan_sweep,
    recipe_differences,
    resolve_tasks,
)

__all__ = [
    "TRAIN_MODULE",
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
