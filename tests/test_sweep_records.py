"""Sweep records you can trust: Ctrl-C and SIGTERM end in one line and stop children / cancel jobs, grid
values that cannot train are refused before anything runs, argument errors are one line, --help shows
the defaults, grid points never touch test, and runs do not import from the working directory."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from test_sweep import FAKE_TRAIN, calls, sweep

from petl_zoo.sweep import cli
from petl_zoo.sweep.plan import PACKAGE_ROOT, plan_sweep, python_module, safe_path, train_prefix
from petl_zoo.sweep.stages import point_accuracy, retrain_runs
from petl_zoo.sweep.tuning import POINT_FLAGS, check_grid, parse_grid, plan_tuning

ROOT = Path(__file__).resolve().parents[1]
RESUME = "rerun the same command to resume (finished runs are skipped, killed ones resumed)"


def run_main(*args: str) -> subprocess.CompletedProcess:
    """The sweep's main in this process; a KeyboardInterrupt that escapes it fails the test (rather than
    stopping the test session)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(args), prog="tools/sweep.py")
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt escaped the sweep (a traceback for the user)")
    return subprocess.CompletedProcess(["sweep", *args], rc, out.getvalue(), err.getvalue())


@pytest.fixture
def sigterm_recorded():
    """A SIGTERM handler that only records, so that a sweep that does not handle SIGTERM itself fails
    its test instead of killing the test session. Restored afterwards."""
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------- Ctrl-C, SIGTERM
# A trainer that interrupts its sweep (as a terminal's Ctrl-C or a scheduler's SIGTERM would), then
# waits to be stopped: it records the SIGTERM the sweep sends it.
SIGNALLING_TRAIN = textwrap.dedent(
    """
    import json, os, signal, sys, time
    with open(os.environ["SWEEP_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    def stopped(signum, frame):
        open(os.environ["STOPPED"], "w").write("SIGTERM")
        sys.exit(143)
    signal.signal(signal.SIGTERM, stopped)
    os.kill(os.getppid(), int(os.environ["PARENT_SIGNAL"]))
    time.sleep(3)
    """
)

SIGNALS = [(signal.SIGINT, "interrupted (Ctrl-C)", 130), (signal.SIGTERM, "terminated (SIGTERM)", 143)]


@pytest.mark.parametrize("signum, how, status", SIGNALS, ids=["ctrl-c", "sigterm"])
def test_an_interrupted_local_sweep_stops_its_run_and_says_so_in_one_line(
    tmp_path, monkeypatch, sigterm_recorded, signum, how, status
):
    script = tmp_path / "train.py"
    script.write_text(SIGNALLING_TRAIN)
    log, stopped = tmp_path / "calls.jsonl", tmp_path / "stopped"
    monkeypatch.setenv("SWEEP_LOG", str(log))
    monkeypatch.setenv("STOPPED", str(stopped))
    monkeypatch.setenv("PARENT_SIGNAL", str(int(signum)))
    runs = tmp_path / "runs"
    proc = run_main(
        "--method", "lora", "--tasks", "syn_a,syn_b", "--out-root", str(runs), "--train-script", str(script)
    )  # fmt: skip
    first = runs / "lora" / "syn_a"
    assert (
        proc.stderr
        == f"error: sweep {how} during run {first} (stopped); 0 of 2 runs done, 2 left; {RESUME}\n"
    )
    assert proc.returncode == status and "Traceback" not in proc.stdout
    assert stopped.read_text() == "SIGTERM"  # the running trainer was stopped (it releases its lock)
    assert len(calls(log)) == 1 and not sigterm_recorded  # nothing started after it
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the caller's handler is back


class FakeJob:
    """A submitit Job that never ends by itself within the test (``done()`` after ``polls`` polls)."""

    def __init__(self, job_id: int, on_first_poll, polls: int = 6) -> None:
        self.job_id, self.on_first_poll, self.polls = str(job_id), on_first_poll, polls
        self.paths = types.SimpleNamespace(folder="jobs")
        self.cancelled = False
        self.polled = 0

    def done(self) -> bool:
        self.polled += 1
        if self.on_first_poll is not None:
            fire, self.on_first_poll = self.on_first_poll, None
            fire()
        return self.cancelled or self.polled > self.polls

    def result(self) -> int:
        return 0

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True


def fake_submitit(monkeypatch, on_first_poll) -> list[FakeJob]:
    """Install a stand-in ``submitit`` module; returns the jobs it will have submitted."""
    jobs: list[FakeJob] = []

    class AutoExecutor:
        def __init__(self, folder: str, cluster: str) -> None:
            self.params: dict = {}

        def update_parameters(self, **params) -> None:
            self.params.update(params)

        def submit(self, fn, argv):
            jobs.append(FakeJob(len(jobs) + 1, on_first_poll if not jobs else None))
            return jobs[-1]

    module = types.ModuleType("submitit")
    module.AutoExecutor = AutoExecutor
    monkeypatch.setitem(sys.modules, "submitit", module)
    return jobs


@pytest.mark.parametrize("signum, how, status", SIGNALS, ids=["ctrl-c", "sigterm"])
def test_an_interrupted_submitit_sweep_cancels_its_unfinished_jobs(
    tmp_path, monkeypatch, sigterm_recorded, signum, how, status
):
    jobs = fake_submitit(monkeypatch, lambda: os.kill(os.getpid(), signum))
    runs = tmp_path / "runs"
    proc = run_main(
        "--method", "lora", "--tasks", "syn_a,syn_b", "--out-root", str(runs), "--train-script",
        str(tmp_path / "never_run.py"), "--launcher", "submitit", "--submitit-cluster", "local",
    )  # fmt: skip
    assert proc.stdout.count("  job ") == 2 and len(jobs) == 2
    assert all(job.cancelled for job in jobs) and not sigterm_recorded
    assert proc.stderr == (
        f"error: sweep {how} during the wait for 2 submitit jobs (2 of 2 unfinished jobs cancelled); "
        f"0 of 2 runs done, 2 left; {RESUME}\n"
    )
    assert proc.returncode == status


# ------------------------------------------------------------------------------ bad grids, bad flags
BAD_GRIDS = [
    (["--grid", "lr=nan"], "--grid lr=nan cannot train lora: lr nan is invalid; valid: a number > 0"),
    (["--grid", "lr=1e-3,-1e-3"], "--grid lr=-0.001 cannot train lora: lr -0.001 is invalid; valid: a number > 0"),
    (["--grid-opt", "rank=0,4"], "--grid-opt rank=0 cannot train lora: rank must be a positive integer, got 0"),
    (["--grid-opt", "ranks=4"], "--grid-opt ranks=4 cannot train lora: unknown option 'ranks' for method 'lora'; valid options: alpha, dropout, rank, targets"),
    (["--grid-opt", "targets=q,x"], "--grid-opt targets=x cannot train lora: unknown target 'x' for method 'lora'; valid targets: q, k, v, qkv, proj, fc1, fc2"),
    (["--grid", "drop_path=0.1,1.5"], "--grid drop_path=1.5 cannot train lora: drop-path 1.5 is invalid; valid: a rate in [0, 1)"),
    (["--grid", "protocol=vtab,nope"], "--grid protocol=nope cannot train lora: trainer arguments: argument --protocol: invalid choice: 'nope'"),
    (["--grid", "epochs=5", "warmup_epochs=0,20"], "grid point lr=0.001, epochs=5, warmup_epochs=20 cannot train lora: warmup-epochs 20 is invalid; valid: 0..epochs (5)"),
    (["--grid-opt", "rank=4,4.0"], "--grid-opt 'rank=4,4.0' repeats a value (4 and 4.0 are the same); give distinct values"),
    (["--grid", "lr=1e-3,0.001"], "--grid 'lr=1e-3,0.001' repeats a value (1e-3 and 0.001 are the same); give distinct values"),
    (["--seeds", "-1"], "--seeds -1 is invalid; valid: integers >= 0, e.g. --seeds 0 1 2"),
    (["--grid", "lr=1e-3", "--", "--no-test"], "--no-test in the trainer flags after --: a tuning sets it itself"),
    (["--grid", "lr=1e-3", "--", "--opt", "rank=0"], "the trainer flags after -- cannot train lora: rank must be a positive integer, got 0"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", BAD_GRIDS, ids=[" ".join(a) for a, _ in BAD_GRIDS])
def test_grid_values_that_cannot_train_are_refused_before_anything_runs(tmp_path, monkeypatch, args, message):
    script, log = tmp_path / "fake_train.py", tmp_path / "calls.jsonl"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setenv("SWEEP_LOG", str(log))
    proc = run_main(
        "--method", "lora", "--tasks", "syn_a", "--out-root", str(tmp_path / "runs"), "--train-script",
        str(script), *args,
    )  # fmt: skip
    assert proc.returncode == 2 and calls(log) == [] and not (tmp_path / "runs").exists()
    assert proc.stderr.startswith(f"error: {message}") and proc.stderr.endswith(
        " (see tools/sweep.py --help)\n"
    )
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_grid_values_are_checked_per_method_and_in_combination():
    check_grid("lora", {"lr": [1e-3, 1e-2], "opt.rank": [4, 8], "opt.targets": ["q,v", "qkv"]}, [])
    check_grid("lora", {"epochs": [5], "warmup_epochs": [0, 2]}, [])  # epochs=5 alone would not fit warmup 10
    check_grid("vpt", {"lr": [1e-3]}, ["--opt", "num_prompts=5"])
    with pytest.raises(ValueError, match=r"^--grid-opt rank=4 cannot train vpt: unknown option 'rank'"):
        check_grid("vpt", {"opt.rank": [4]}, [])  # --methods lora,vpt --grid-opt rank=4: vpt has no rank
    check_grid("no_such_method", {"lr": [float("nan")]}, [])  # --no-method-check: the trainer reports it
    with pytest.raises(ValueError, match=r"^--grid-opt 'rank=4,4.0' repeats a value"):
        parse_grid([], ["rank=4,4.0"])
    assert parse_grid([], ["rank=4,8"]) == {"opt.rank": [4, 8]}


def test_argument_errors_are_one_line():
    for args, message in [
        (["--tasks", "dtd"], "error: one of the arguments --method --methods is required"),
        (["--method", "lora", "--bogus"], "error: unrecognized arguments: --bogus"),
        (["--method", "lora", "--slurm-time", "x"], "error: argument --slurm-time: invalid int value: 'x'"),
        (["--method", "lora", "--tasks", " , ", "--print-commands"], "error: no task in ' , '"),
    ]:
        proc = run_main(*args)
        assert proc.returncode == 2 and proc.stdout == "", args
        assert proc.stderr.startswith(message) and proc.stderr.endswith(" (see tools/sweep.py --help)\n"), (
            args
        )
        assert proc.stderr.count("\n") == 1 and "usage:" not in proc.stderr, args


def test_help_shows_every_options_default():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["--help"], prog="tools/sweep.py")
    text = out.getvalue()
    for action in cli._parser("tools/sweep.py")._actions:
        if not action.option_strings or action.help in (None, "==SUPPRESS==") or action.nargs == 0:
            continue  # flags (store_true), hidden testing aids, --help
        if action.dest in ("method", "methods"):
            continue  # one of them is required
        block = text.split("\n  " + action.option_strings[-1], 1)[1].split("\n  -", 1)[0].split("\n\n")[0]
        assert "default" in block, (action.dest, block)
    assert "(default: vit_base_patch16_224)" in text and "(default: 240)" in text
    assert "default: <out-root>/.submitit" in text
    # the description and the epilog as written (RawDescription), not re-wrapped
    assert (
        "Exit status: 1 if any run failed or was refused, 2 for a bad argument, 130 on Ctrl-C and 143 on\n"
        in text
    )


# ------------------------------------------------------------------------------------- no test
def test_grid_points_are_scored_on_val_only_and_the_retrained_runs_are_tested(tmp_path):
    runs = tmp_path / "runs"
    proc = sweep(
        "--method", "lora", "--tasks", "syn_a", "--out-root", str(runs), "--grid", "lr=1e-3,3e-2", "--seeds",
        "3", "4", "--print-commands", "--", "--epochs", "1",
    )  # fmt: skip
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr
    assert all(line[-3:] == ["--select-on", "val", "--no-test"] for line in lines)
    assert POINT_FLAGS == ("--select-on", "val", "--no-test")
    prefix = train_prefix(safe=False)
    (tuning,) = plan_tuning("lora", "m", ["syn_a"], {"lr": [1e-3]}, [3, 4], runs, None, [], prefix)
    retrained = retrain_runs(tuning, {"lr": 1e-3})
    assert [r.seed for r in retrained] == [3, 4]
    assert not any("--no-test" in r.argv or "--select-on" in r.argv for r in retrained)  # tested
    # a point's score is its val accuracy; a point that recorded no test accuracy is read as usual
    _, point = tuning.points[0]
    point.out.mkdir(parents=True)
    result = {"val_acc_last": 0.5, "test_acc_last": None, "test_acc_best": None}
    (point.out / "result.json").write_text(json.dumps(result))
    assert point_accuracy(point) == 50.0


# ------------------------------------------------------------------------- the working directory
SHADOW = 'raise ImportError("the vtab folder in the working directory was imported")\n'


@pytest.fixture
def shadowing_cwd(tmp_path, monkeypatch) -> Path:
    """A working directory holding a folder named ``vtab`` (e.g. data) that is not the package."""
    cwd = tmp_path / "work"
    (cwd / "vtab").mkdir(parents=True)
    (cwd / "vtab" / "__init__.py").write_text(SHADOW)
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("safe_path_flag", [True, False], ids=["-P", "-c (python 3.10)"])
def test_runs_do_not_import_from_the_working_directory(tmp_path, shadowing_cwd, safe_path_flag):
    if safe_path_flag and sys.version_info < (3, 11):
        pytest.skip("python -P needs Python 3.11")
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "vtab_probe.py").write_text("import sys, vtab\nprint(vtab.__file__, sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(probe), str(ROOT)]))
    command = python_module(sys.executable, "vtab_probe", safe_path_flag)
    child = subprocess.run([*command, "--task", "x"], capture_output=True, text=True, env=env, check=False)
    assert child.returncode == 0, child.stderr[-500:]
    assert str(shadowing_cwd) not in child.stdout and "['--task', 'x']" in child.stdout
    plain = subprocess.run([sys.executable, "-m", "vtab_probe"], capture_output=True, text=True, env=env)
    assert "the vtab folder in the working directory was imported" in plain.stderr  # what -P prevents


def test_planned_runs_leave_the_working_directory_off_sys_path(tmp_path, shadowing_cwd):
    assert safe_path() and not safe_path(PACKAGE_ROOT)  # a checkout's root holds the real vtab package
    (run,) = plan_sweep("lora", "m", ["dtd"], out_root=tmp_path / "runs")
    assert run.argv[:4] == (
        [sys.executable, "-P", "-m", "petl_zoo.train"]
        if sys.version_info >= (3, 11)
        else [sys.executable, "-c", run.argv[2], "--method"]
    )
    (torchrun,) = plan_sweep(
        "lora", "m", ["dtd"], out_root=tmp_path / "runs", launcher="torchrun --nproc_per_node 2"
    )
    assert torchrun.argv[:6] == ["env", "PYTHONSAFEPATH=1", "torchrun", "--nproc_per_node", "2", "-m"]
    printed = sweep(
        "--method", "lora", "--tasks", "dtd", "--out-root", str(tmp_path / "runs"), "--print-commands"
    )
    assert shlex.split(printed.stdout)[:2] == [sys.executable, "-P" if sys.version_info >= (3, 11) else "-c"]


@pytest.mark.slow  # one trainer import in a subprocess (torch): a few seconds
def test_a_planned_trainer_run_ignores_a_vtab_folder_in_the_working_directory(tmp_path, shadowing_cwd):
    (run,) = plan_sweep("lora", "m", ["dtd"], out_root=tmp_path / "runs")
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's petl_zoo, wherever it is installed
    child = subprocess.run([*run.prefix, "--help"], capture_output=True, text=True, env=env, check=False)
    assert child.returncode == 0, child.stderr[-1000:]
    assert "--method" in child.stdout
    plain = subprocess.run(
        [sys.executable, "-m", "petl_zoo.train", "--help"], capture_output=True, text=True, env=env
    )
    assert plain.returncode != 0 and "the vtab folder in the working directory was imported" in plain.stderr
