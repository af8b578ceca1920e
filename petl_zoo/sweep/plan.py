"""Planning a sweep: the trainer command of each run folder and its status (``petl-zoo sweep``).

Each run is ``python -P -m petl_zoo.train ...`` (or ``env PYTHONSAFEPATH=1 <launcher> -m petl_zoo.train
...``, e.g. torchrun), so the sweep works from an installed package as well as from a checkout, and no
run imports from the working directory: ``python -m`` puts the working directory first on ``sys.path``,
where a folder named ``vtab`` (a data folder, say) would shadow the ``vtab`` package. ``-P`` (Python
>= 3.11) and ``PYTHONSAFEPATH=1`` (which 3.11+ honours, also in the processes a launcher starts) leave
it out; on Python 3.10 the python prefix is ``python -c SAFE_RUN_CODE`` (``petl_zoo.train`` run as
``__main__`` once the working directory is off ``sys.path``), and a launcher's children are not
covered. When the sweep's own ``petl_zoo`` comes from the working directory (a checkout run from its
root, whose ``vtab/`` is the package itself), the runs keep the plain ``python -m petl_zoo.train``:
they need that directory on their path (``safe_path``).

Run folders: ``<out_root>/<method>/<task>/`` for a single seed, ``<out_root>/<method>/<task>/seed<k>/``
when several seeds are given (tuned runs: ``petl_zoo.sweep.tuning``). Each folder gets a status before
anything runs (and again right before its run starts):

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
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import vtab

from ..results.benchmarks import get_benchmark
from ..runfolder import BUSY_EXIT_STATUS, CONFIG, RunFolder

__all__ = [
    "TRAIN_MODULE",
    "SAFE_RUN_CODE",
    "BUSY_EXIT_STATUS",
    "resolve_tasks",
    "SweepRun",
    "ExpectedConfig",
    "Unchecked",
    "classify",
    "recipe_differences",
    "task_dirname",
    "PACKAGE_ROOT",
    "safe_path",
    "python_module",
    "train_prefix",
    "make_run",
    "base_train_args",
    "check_method_and_seeds",
    "plan_sweep",
    "command_line",
    "check_writable",
]

#: The trainer as a module, runnable by ``python -m`` and by ``torchrun -m`` alike.
TRAIN_MODULE = "petl_zoo.train"

#: ``python -c`` code running a module as ``python -m`` does but without the working directory (the
#: ``''`` entries) on ``sys.path``: the Python 3.10 stand-in for ``python -P -m MODULE``.
SAFE_RUN_CODE = (
    "import sys; sys.path[:] = [p for p in sys.path if p]; import runpy; "
    "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
)


def resolve_tasks(spec: str | Sequence[str], benchmark: str = "vtab") -> list[str]:
    """Task names for ``all`` (the benchmark's tasks), a group name of the benchmark (VTAB-1K:
    natural|specialized|structured) or a comma list of either.

    Known names and aliases (inside ``benchmark``: ``dtd`` is the suite's with ``suite``) become canonical
    names; other names (custom tasks: folders with list files) pass through unchanged for train.py to
    resolve, with VTAB-1K only. Duplicates are dropped, first occurrence kept.
    """
    bench = get_benchmark(benchmark)
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        groups = ", ".join(bench.groups)
        raise ValueError(f"no task in '{spec}': give all, {groups} or a comma list of task names")
    out: list[str] = []
    for item in items:
        key = item.lower()
        if key == "all":
            names = bench.task_names
        elif key in bench.groups:
            names = bench.members(key)
        else:
            names = [vtab.task_folder_name(item, benchmark)]
        out += [n for n in names if n not in out]
    return out


def task_dirname(task: str) -> str:
    """Folder name for a task: a custom task given as a path uses its last component."""
    return Path(task).name if ("/" in task or os.sep in task) else task


#: What a status adds to the trainer's command line.
_STATUS_FLAGS = {"resume": ["--resume"], "overwrite": ["--overwrite"]}


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
    from ..train.spec import expected_config

    return expected_config(train_args)


def _recorded(folder: RunFolder) -> tuple[dict | None, str | None, int | None]:
    """The folder's config (or None), its run fingerprint and seed (damaged files raise ValueError
    naming them)."""
    config = folder.read_config()
    result = folder.read_result() or {}
    recorded = folder.fingerprints(config or {}, result).run
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
        config, recorded, seed = _recorded(RunFolder(out))
        if recorded is None:
            raise Unchecked(f"no {CONFIG} nor recorded fingerprint: cannot tell which settings made it")
        try:
            new = expected(train_args)
        except (ValueError, OSError, RuntimeError) as err:
            raise Unchecked(f"cannot resolve this command's settings: {' '.join(str(err).split())}") from None
    except (Unchecked, ValueError, OSError) as err:
        if finished:
            raise Unchecked(str(err)) from None
        return None
    from ..train.spec import run_differences

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
    folder = RunFolder(out)
    if folder.lock_path.exists():
        from ..train.lock import live_holder

        holder = live_holder(out)
        if holder is not None:
            return "busy", f"in use by {holder.describe()}"
    finished = folder.finished
    # A killed run: a checkpoint, or its config alone when killed before its first checkpoint (train.py
    # refuses such a folder without --resume and restarts it under --resume).
    if not finished and not folder.killed:
        return "fresh", ""
    try:
        diff = recipe_differences(out, train_args, finished, expected)
    except Unchecked as err:
        return ("overwrite" if overwrite else "differs"), f"cannot check its settings: {err}"
    if diff:
        from ..train.spec import format_differences

        return ("overwrite" if overwrite else "differs"), f"other settings: {format_differences(diff)}"
    return ("done" if finished else "resume"), ""


#: The folder holding this ``petl_zoo`` package (a checkout's root, or site-packages).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def safe_path(cwd: str | os.PathLike | None = None) -> bool:
    """Whether the runs leave the working directory (``cwd``, default this process's) off ``sys.path``:
    yes, unless it is where this ``petl_zoo`` was imported from (a checkout's root)."""
    return Path(cwd if cwd is not None else os.getcwd()).resolve() != PACKAGE_ROOT


def python_module(python: str, module: str, safe_path_flag: bool | None = None) -> list[str]:
    """``[python, -P, -m, module]``: the module run with the working directory left off ``sys.path``
    (``safe_path_flag`` None: ``-P`` on Python >= 3.11, the version of ``python`` taken to be this
    process's; False: ``-c SAFE_RUN_CODE``, which every version runs)."""
    if safe_path_flag is None:
        safe_path_flag = sys.version_info >= (3, 11)
    if safe_path_flag:
        return [python, "-P", "-m", module]
    return [python, "-c", SAFE_RUN_CODE.format(module=module)]


def train_prefix(
    launcher: str | None = None,
    train_script: str | os.PathLike | None = None,
    python: str = sys.executable,
    safe: bool | None = None,
) -> list[str]:
    """What precedes the trainer's arguments: ``python -P -m petl_zoo.train`` (``python_module``),
    ``env PYTHONSAFEPATH=1 <launcher> -m petl_zoo.train`` with a launcher (so that the processes it starts
    leave the working directory off ``sys.path`` too), or ``python <train_script>`` (a stand-in trainer,
    e.g. in tests). ``safe`` False (default: ``safe_path()``): ``<launcher or python> -m petl_zoo.train``."""
    start = shlex.split(launcher) if launcher else [python]
    if train_script is not None:
        return [*start, str(train_script)]
    if not (safe_path() if safe is None else safe):
        return [*start, "-m", TRAIN_MODULE]
    if launcher:
        return ["env", "PYTHONSAFEPATH=1", *start, "-m", TRAIN_MODULE]
    return python_module(python, TRAIN_MODULE)


def make_run(
    task: str,
    seed: int | None,
    out: Path,
    train_args: list[str],
    prefix: Sequence[str],
    overwrite: bool = False,
    expected: ExpectedConfig = _expected_config,
) -> SweepRun:
    """A SweepRun of ``train_args`` (which name ``--out out``) with its status, classified now."""
    run = SweepRun(task, seed, out, "fresh", train_args=list(train_args), prefix=list(prefix))
    run.set_status(*classify(out, run.train_args, overwrite, expected))
    return run


def base_train_args(method: str, model: str, task: str, data_root: str | None) -> list[str]:
    """``--method M --model X --task T [--data-root R]``: what every run of a sweep starts with."""
    args = ["--method", method, "--model", model, "--task", task]
    return args + (["--data-root", str(data_root)] if data_root else [])


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

    The command is ``<launcher or python> -m petl_zoo.train ...`` (``train_prefix``); ``overwrite``:
    runs made with other settings are replaced (``--overwrite``) rather than refused; ``expected``
    turns trainer arguments into the config.json they would produce (the default resolves the
    trainer's spec in this process).
    """
    check_method_and_seeds(method, seeds)
    prefix = train_prefix(launcher, train_script, python)
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    runs = []
    for task in tasks:
        for seed in seed_list:
            out = Path(out_root) / method / task_dirname(task)
            if len(seed_list) > 1:
                out = out / f"seed{seed}"
            train_args = base_train_args(method, model, task, data_root)
            if seed is not None:
                train_args += ["--seed", str(seed)]
            train_args += ["--out", str(out), *extra_args]
            runs.append(make_run(task, seed, out, train_args, prefix, overwrite, expected))
    return runs


def check_method_and_seeds(method: str, seeds: Sequence[int] | None) -> None:
    """A ValueError line for an empty method name, a negative seed or repeated seeds."""
    if not method:
        raise ValueError("method '' is empty: give a registered method name, e.g. lora")
    if seeds is not None and any(s < 0 for s in seeds):
        bad = next(s for s in seeds if s < 0)
        raise ValueError(f"--seeds {bad} is invalid; valid: integers >= 0, e.g. --seeds 0 1 2")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeat a value: give distinct seeds")


def command_line(run: SweepRun) -> str:
    """The run's argv as one shell-quoted line."""
    return shlex.join(run.argv)


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` and a file in it (removed again): a WriteError line before any run starts
    when the output root cannot be written (a parent that is a file, read-only, full)."""
    from ..io import WriteError, make_dir, open_for_write

    folder = make_dir(folder)
    probe = folder / f".sweep-write-check.{os.getpid()}.tmp"
    try:
        with open_for_write(probe, "x") as f:
            f.write("ok\n")
    except OSError as err:
        raise WriteError.of(err, probe) from None
    finally:
        probe.unlink(missing_ok=True)
