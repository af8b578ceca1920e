"""Run integrity: shared file modes, no orphaned trainer after a killed sweep, writes that fail, damaged
inputs, the run folder's lock, a sweep that checks the recipe of what it skips."""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import (
    ACC_KEYS,
    TINY_KW,
    adapter_tensors,
    assert_same_tensors,
    base_args,
    read,
    toy_args,
    write_task,
)

from petl_zoo.io import atomic_write_json, atomic_write_text
from petl_zoo.train import eval_main, main

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == 0o644
        assert _mode(atomic_write_json(tmp_path / "b.json", {"a": 1})) == 0o644
        os.umask(0o002)
        assert _mode(atomic_write_text(tmp_path / "c.txt", "x")) == 0o664
    finally:
        os.umask(old)


def test_prepared_task_folder_follows_the_umask(tmp_path):
    from vtab.prepare import main

    old = os.umask(0o022)
    try:
        assert main(["--task", "digits", "--out", str(tmp_path)]) == 0
    finally:
        os.umask(old)
    folder = tmp_path / "digits"
    assert _mode(folder) == 0o755 and _mode(folder / "train800.txt") == 0o644


SLOW_TRAIN = textwrap.dedent(
    """
    import os, sys, time
    out = sys.argv[sys.argv.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split()[2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_killed_sweep_leaves_no_orphan_trainer(tmp_path):
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)
    runs = tmp_path / "runs"
    sweep = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "petl_zoo.sweep",
            "--method",
            "lora",
            "--tasks",
            "syn_a",
            "--out-root",
            str(runs),
            "--train-script",
            str(script),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid_file = runs / "lora" / "syn_a" / "pid"
    deadline = time.time() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.time() < deadline and sweep.poll() is None, "the trainer never started"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the trainer outlived the killed sweep"


def test_unreachable_source_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision.datasets as tvd

    from vtab.prepare import main

    class Unreachable:
        def __init__(self, root, download=False, **_):
            (Path(root) / "dtd").mkdir(parents=True)
            (Path(root) / "dtd" / "dtd-r1.0.1.tar.gz").write_bytes(b"partial")
            raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(tvd, "DTD", Unreachable)
    downloads = tmp_path / "downloads"
    code = main(["--task", "dtd", "--out", str(tmp_path / "vtab"), "--download-root", str(downloads)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "source is unreachable" in err[0] and "Traceback" not in err[0]
    assert not downloads.exists() and not (tmp_path / "vtab" / "dtd").exists()


# ------------------------------------------------------------------ writes that fail, JSON that is damaged
def _raise_on_open(code: int):
    """A stand-in for ``petl_zoo.io.open_for_write`` on a full / read-only disk."""

    def fail(path, mode):
        raise OSError(code, os.strerror(code), str(path))

    return fail


@pytest.mark.parametrize(
    "code, needle",
    [
        (errno.ENOSPC, "no space left on device writing"),
        (errno.EACCES, "permission denied writing"),
        (errno.EROFS, "read-only file system writing"),
    ],
)
def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, code, needle):
    import petl_zoo.io as pio

    target = tmp_path / "config.json"
    atomic_write_json(target, {"old": True})
    monkeypatch.setattr(pio, "open_for_write", _raise_on_open(code))
    with pytest.raises(pio.WriteError) as info:
        atomic_write_json(target, {"new": True})
    assert str(info.value) == f"{needle} {target}" and info.value.errno == code
    with pytest.raises(pio.WriteError, match=needle):
        pio.append_text(tmp_path / "metrics.jsonl", "{}\n")
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary file left


def test_a_torch_or_safetensors_write_failure_is_classified(tmp_path, monkeypatch):
    import petl_zoo.io as pio

    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 100, 0, 0, 10, 0, 0, 0, 255)))
    assert str(pio.WriteError.of(torch_error, tmp_path / "last.pt")).startswith("no space left on device")
    st_error = type("SafetensorError", (Exception,), {})(
        'Error while serializing: I/O error: Permission denied (os error 13) at path "x"'
    )
    assert str(pio.WriteError.of(st_error, tmp_path / "a.safetensors")).startswith("permission denied")


def test_a_parent_that_is_a_file_is_named(tmp_path):
    import petl_zoo.io as pio

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(pio.WriteError, match="notes.txt is a file, not a folder"):
        atomic_write_text(tmp_path / "notes.txt" / "run" / "config.json", "{}")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "is empty"),
        ('{"a": 1, "b": [1, 2', "the file ends early: truncated?"),
        ('{"a": "tru', "Unterminated string starting at line 1 column 7; the file ends early"),
        ('{"a": 1}\n}x', "is not valid JSON (Extra data at line 2 column 1)"),
    ],
)
def test_damaged_json_is_one_line_naming_the_file(tmp_path, text, needle):
    from petl_zoo.io import read_json

    path = tmp_path / "result.json"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        read_json(path, "run result")
    message = str(info.value)
    assert message.startswith(f"run result {path}") and needle in message and "\n" not in message


# --------------------------------------------------------------------------- the trainer on tiny data


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("vtab"))


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run (the reference of a resumed one)."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(base_args(data_root, out)) == 0
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def no_temporary_files(folder: Path) -> bool:
    return not list(folder.glob(".*.tmp"))


# ------------------------------------------------------------------------------------- run folder lock
def _hold(folder: str, ready, release) -> None:
    from petl_zoo.train.lock import RunLock

    with RunLock(folder):
        ready.send("held")
        release.poll(120)


@contextlib.contextmanager
def holder(folder: Path):
    """Another process (forked: no second torch import) holding ``folder``'s lock while inside. Pipes,
    not multiprocessing Events: an Event's notify waits for a sleeper that a test may have killed."""
    ctx = multiprocessing.get_context("fork")
    ready_r, ready_w = ctx.Pipe(duplex=False)
    release_r, release_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_hold, args=(str(folder), ready_w, release_r), daemon=True)
    proc.start()
    try:
        assert ready_r.poll(60) and ready_r.recv() == "held", "the holder never took the lock"
        yield proc
    finally:
        with contextlib.suppress(OSError):
            release_w.send("done")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def test_a_held_folder_is_refused_naming_the_holder_then_runs(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    with holder(out) as proc:
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert main(base_args(data_root, out, "--epochs", "1", *extra)) == 75
            err = one_line_error(capsys)
            assert err.startswith(f"error: output folder {out} is in use by pid {proc.pid} on host ")
            assert f"on host {socket.gethostname()} since {time.strftime('%Y-%m-%d')}" in err
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing of the live run touched
    assert not (out / "run.lock").exists()  # released by its holder on exit
    assert main(base_args(data_root, out, "--epochs", "1")) == 0
    assert not (out / "run.lock").exists() and (out / "result.json").is_file()


def test_a_stale_lock_of_a_dead_process_is_taken_over(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    with holder(out) as proc:
        proc.kill()  # kill -9: no chance to release
        proc.join()
    assert (out / "run.lock").is_file()
    capsys.readouterr()
    assert main(base_args(data_root, out, "--epochs", "1")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"taking over the stale lock {out / 'run.lock'} of pid {proc.pid}"
    )
    assert err[0].endswith(": the process is gone")
    assert not (out / "run.lock").exists()


def test_another_hosts_lock_is_live_until_its_heartbeat_is_old(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PETL_ZOO_LOCK_TIMEOUT_S", "600")
    out = tmp_path / "run"
    out.mkdir()
    lock = out / "run.lock"
    lock.write_text(json.dumps({"pid": 4242, "host": "node-b", "since": "2026-01-01 10:00:00", "token": "t"}))
    assert main(base_args(data_root, out, "--epochs", "1")) == 75
    assert "in use by pid 4242 on host node-b since 2026-01-01 10:00:00" in one_line_error(capsys)
    old = time.time() - 1800
    os.utime(lock, (old, old))  # no heartbeat for 30 min
    assert main(base_args(data_root, out, "--epochs", "1")) == 0
    note = capsys.readouterr().err.strip()
    assert "taking over the stale lock" in note and "no heartbeat for 30 min" in note and "\n" not in note


def _interrupt(how: str):
    def epoch(run, epoch):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once
        raise AssertionError("SIGTERM did not stop the run")

    return epoch


@pytest.mark.parametrize("how, status", [("nan", 1), ("ctrl-c", 130), ("sigterm", 143)])
def test_the_lock_is_released_on_error_interrupt_and_sigterm(
    data_root, tmp_path, monkeypatch, capsys, how, status
):
    out = tmp_path / "run"
    if how == "nan":
        argv = toy_args(data_root, out, "--opt", "nan_at_epoch=0")
    else:
        if how == "sigterm" and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            pytest.skip("a SIGTERM handler is installed in this process")
        monkeypatch.setattr("petl_zoo.train.loop.train_one_epoch", _interrupt(how))
        argv = base_args(data_root, out, "--epochs", "1")
    assert main(argv) == status
    assert not (out / "run.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handler is gone again


def test_a_run_whose_lock_was_taken_over_stops(data_root, tmp_path, monkeypatch, capsys):
    from petl_zoo.train import loop

    out = tmp_path / "run"
    real = loop.train_one_epoch

    def taken_during_epoch_2(run, epoch):
        if epoch == 1:  # another host judged the lock stale and took it
            (out / "run.lock").write_text(
                json.dumps({"pid": 7, "host": "node-c", "since": "x", "token": "u"})
            )
        return real(run, epoch)

    monkeypatch.setattr(loop, "train_one_epoch", taken_during_epoch_2)
    assert main(base_args(data_root, out)) == 1
    err = one_line_error(capsys)
    assert f"the lock {out / 'run.lock'} is now held by pid 7 on host node-c" in err and "stopping" in err
    assert json.loads((out / "run.lock").read_text())["token"] == "u"  # the new holder's lock is left alone
    assert not (out / "result.json").exists()


def test_the_sweep_leaves_a_busy_run_alone(tmp_path, monkeypatch):
    from test_sweep import FAKE_TRAIN, calls, sweep

    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setenv("SWEEP_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.delenv("FAIL_TASK", raising=False)
    runs = tmp_path / "runs"
    (runs / "lora" / "syn_c").mkdir(parents=True)
    (runs / "lora" / "syn_c" / "last.pt").write_bytes(b"")  # killed, and being resumed by someone else
    args = ["--method", "lora", "--tasks", "syn_a,syn_b,syn_c", "--out-root", str(runs), "--train-script"]
    with holder(runs / "lora" / "syn_b") as b, holder(runs / "lora" / "syn_c") as c:
        proc = sweep(*args, str(script))
        printed = sweep(*args, str(script), "--print-commands")
    assert proc.returncode == 0, proc.stdout
    assert [call[call.index("--task") + 1] for call in calls(tmp_path / "calls.jsonl")] == ["syn_a"]
    assert "1 ran, 0 skipped (result.json), 2 busy, 0 refused, 0 failed" in proc.stdout
    assert f"BUSY {runs / 'lora' / 'syn_b'}: in use by pid {b.pid} on host" in proc.stdout
    assert f"BUSY {runs / 'lora' / 'syn_c'}: in use by pid {c.pid} on host" in proc.stdout
    assert printed.stdout.count("--task") == 0 and printed.stderr.count("in use by pid") == 2  # syn_a done
    # a trainer that finds the folder taken as it starts (exit status 75) is busy, not failed
    busy_script = tmp_path / "busy_train.py"
    busy_script.write_text("import sys\nsys.exit(75)\n")
    late = sweep(
        "--method", "lora", "--tasks", "syn_d", "--out-root", str(runs), "--train-script", str(busy_script)
    )
    assert late.returncode == 0 and "0 ran, 0 skipped (result.json), 1 busy" in late.stdout


# ------------------------------------------------------------------------ runs of other settings
def test_a_finished_run_of_other_settings_is_refused_naming_the_keys(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(data_root, out, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(base_args(data_root, out, "--epochs", "2", "--lr", "1e-2", "--opt", "rank=4")) == 1
    err = one_line_error(capsys)
    assert err == (
        f"error: output folder {out} holds a finished run (result.json) with other settings "
        "(method_options.rank: 8 -> 4, recipe.epochs: 1 -> 2, recipe.lr: 0.003 -> 0.01); pass --overwrite "
        "to replace it, or another --out"
    )
    assert main(base_args(data_root, out, "--epochs", "1")) == 1
    assert "holds a finished run (result.json) with these settings; pass --overwrite" in one_line_error(
        capsys
    )
    assert main(base_args(data_root, out, "--epochs", "1", "--resume", "--seed", "2")) == 1
    assert "already finished (result.json) with other settings (recipe.seed: 0 -> 2)" in one_line_error(
        capsys
    )


def test_resume_with_other_settings_names_only_the_keys_that_differ(data_root, tmp_path, capsys):
    out = tmp_path / "killed"
    assert main(base_args(data_root, out, "--stop-after-epoch", "1")) == 137
    capsys.readouterr()
    assert main(base_args(data_root, out, "--resume", "--lr", "1e-2", "--drop-path", "0.2")) == 1
    err = one_line_error(capsys)
    assert err == (
        f"error: --resume: the run in {out} was started with other settings (recipe.drop_path: 0.1 -> 0.2, "
        "recipe.lr: 0.003 -> 0.01); repeat the original options or use --overwrite"
    )
    assert (
        main(base_args(data_root, out, "--lr", "1e-2")) == 1
    )  # without --resume: what differs, and what to do
    assert "already holds an unfinished run with other settings (recipe.lr: 0.003 -> 0.01)" in one_line_error(
        capsys
    )


# ------------------------------------------------------------------------------------ damaged inputs
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "truncated": _truncate,
    "random": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_eval_of_a_damaged_adapter_is_one_line(finished, tmp_path, capsys, how):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    CORRUPTIONS[how](run / "adapter.safetensors")
    assert eval_main(["--adapter", str(run), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert err.startswith(
        f"error: cannot read adapter weights {run / 'adapter.safetensors'}: truncated or not"
    )


@pytest.mark.parametrize(
    "name, what",
    [("config.json", "run config"), ("result.json", "run result"), ("adapter_config.json", "adapter config")],
)
def test_eval_of_a_run_with_a_truncated_json_file_names_it(finished, tmp_path, capsys, name, what):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    _truncate(run / name)
    assert eval_main(["--adapter", str(run), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert err.startswith(f"error: {what} {run / name} is not valid JSON (") and "the file ends early" in err


def test_a_damaged_checkpoint_is_called_damaged_not_code(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"garbage")
    assert main(base_args(data_root, out, "--resume")) == 1
    err = one_line_error(capsys)
    assert err.startswith(f"error: cannot read checkpoint {out / 'last.pt'}: truncated or corrupt (")
    assert "weights_only" not in err and "--overwrite" in err


def test_a_truncated_method_config_is_named(data_root, tmp_path, capsys):
    cfg = tmp_path / "opts.json"
    cfg.write_text('{"rank": 2, "targets": ["q", ')
    assert main(base_args(data_root, tmp_path / "run", "--method-config", str(cfg))) == 1
    assert one_line_error(capsys).startswith(f"error: method config file {cfg} is not valid JSON (")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _weights(tmp_path: Path, how: str) -> Path:
    """A pretrained file (or folder) gone wrong."""
    import timm
    from safetensors.torch import save_file

    if how == "folder":
        folder = tmp_path / "vit_tiny"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        return folder
    if how == "garbage":
        path = tmp_path / "w.pth"
        path.write_bytes(b"garbage, not a torch file")
        return path
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY_KW)
    if how == "code":
        path = tmp_path / "w.pth"
        torch.save({"state_dict": model.state_dict(), "x": _RunsCode(tmp_path / "code_ran")}, path)
        return path
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _truncate(path)
    return path


@pytest.mark.parametrize(
    "how, needle",
    [
        ("truncated", "cannot read pretrained file {path}: truncated or not a .safetensors file"),
        ("code", "refusing pretrained file {path}: it holds objects other than tensors and plain values"),
        ("garbage", "cannot read pretrained file {path}: truncated or not a .pth file"),
        (
            "folder",
            "pretrained file {path} is a folder (it holds model.safetensors); give the weights file itself",
        ),
    ],
)
def test_a_bad_pretrained_file_is_one_line(data_root, tmp_path, capsys, how, needle):
    path = _weights(tmp_path, how)
    args = base_args(data_root, tmp_path / "run", "--epochs", "1", "--pretrained-file", str(path))
    args.remove("--no-pretrained")
    assert main(args) == 1
    err = one_line_error(capsys)
    assert needle.format(path=path) in err, err
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert not (tmp_path / "code_ran").exists()


def test_unsafe_advice_is_never_passed_on(capsys):
    from petl_zoo.train.cli import _guarded

    def body() -> int:
        raise ValueError(
            "cannot load x.pth: Weights only load failed. Re-running `torch.load` with `weights_only` set to "
            "`False` will likely succeed, but it can result in arbitrary code execution. If this checkpoint "
            "is trusted, retry with weights_only=False. Unsupported operand 103."
        )

    assert _guarded(body) == 1
    assert (
        one_line_error(capsys)
        == "error: cannot load x.pth: Weights only load failed. Unsupported operand 103."
    )


# ------------------------------------------------------------------------- folders that cannot be written
def test_an_output_folder_under_a_file_is_one_line(data_root, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "run"
    assert main(base_args(data_root, out, "--epochs", "1")) == 1
    assert one_line_error(capsys) == (
        f"error: cannot create output folder {out}: {tmp_path / 'notes.txt'} is a file, not a folder"
    )


@pytest.mark.parametrize(
    "code, fails_on, needle",
    [
        (errno.EACCES, "x", "permission denied writing {out}/run.lock"),  # read-only: the lock is first
        (errno.ENOSPC, "w", "no space left on device writing {out}/config.json"),
        (
            errno.EROFS,
            "a",
            "read-only file system writing {out}/metrics.jsonl; no checkpoint was written yet",
        ),
    ],
)
def test_a_folder_that_cannot_be_written_is_one_line(
    data_root, tmp_path, monkeypatch, capsys, code, fails_on, needle
):
    import petl_zoo.io as pio

    real = pio.open_for_write

    def failing(path, mode):
        if mode == fails_on:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, mode)

    monkeypatch.setattr(pio, "open_for_write", failing)
    out = tmp_path / "run"
    assert main(base_args(data_root, out, "--epochs", "1")) == 1
    assert needle.format(out=out) in one_line_error(capsys)
    assert not (out / "run.lock").exists() and no_temporary_files(out)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
    finished, data_root, tmp_path, monkeypatch, capsys
):
    from petl_zoo.train.checkpoint import load_checkpoint

    real_save = torch.save

    def full_at_epoch_2(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_at_epoch_2)
    assert main(base_args(data_root, out)) == 1
    assert one_line_error(capsys) == (
        f"error: no space left on device writing {out / 'last.pt'}; the previous checkpoint after epoch 1 is "
        f"kept ({out / 'last.pt'}; --resume)"
    )
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and no_temporary_files(out)
    assert not (out / "run.lock").exists()
    monkeypatch.setattr(torch, "save", real_save)  # space freed: resume, nothing lost
    assert main(base_args(data_root, out, "--resume")) == 0
    assert [read(out, "result.json")[k] for k in ACC_KEYS] == [
        read(finished, "result.json")[k] for k in ACC_KEYS
    ]
    assert_same_tensors(adapter_tensors(finished), adapter_tensors(out))

    def strip(run):
        return [
            {k: v for k, v in m.items() if k not in ("img_per_s", "time_s")}
            for m in read(run, "metrics.jsonl")
        ]

    assert strip(out) == strip(finished)


# ----------------------------------------------------------------------------------- helpful messages
def test_a_diverging_run_is_warned_about_once(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(data_root, out, "--lr", "1e4")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the run is diverging: try a lower --lr (this run: 1e+04)" in err[0], err
    assert err[0].startswith("warning: epoch 1: training loss ")
    assert main(base_args(data_root, tmp_path / "calm", "--epochs", "2")) == 0
    assert "diverging" not in capsys.readouterr().err


def test_eval_check_compares_val_for_runs_selected_on_val_and_refuses_otherwise(
    finished, data_root, tmp_path, capsys
):
    out = tmp_path / "val"
    assert main(base_args(data_root, out, "--select-on", "val", "--epochs", "2")) == 0
    capsys.readouterr()
    assert eval_main(["--adapter", str(out), "--split", "val", "--check", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert "val: accuracy" in line and "result.json val_acc_best" in line and line.endswith("matches")
    result = read(out, "result.json")
    assert f"({round(result['val_acc_best'] * 8)}/8)" in line  # 8 val images
    for split in ("val", "train"):
        assert eval_main(["--adapter", str(finished), "--split", split, "--check", "--no-progress"]) == 1
        err = one_line_error(capsys)
        assert err.startswith(f"error: --check --split {split}: ") and "--check compares test" in err
    assert eval_main(["--adapter", str(finished), "--split", "val", "--no-progress"]) == 0  # no --check: fine
    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished, unfinished)
    (unfinished / "result.json").unlink()
    assert eval_main(["--adapter", str(unfinished), "--check", "--no-progress"]) == 1
    assert "has no result.json to compare with" in one_line_error(capsys)


# ------------------------------------------------------------------------------------ first-run friction
def test_a_short_run_scales_the_recipe_warmup_down(data_root, tmp_path, capsys):
    from petl_zoo.train import resolve_recipe

    args = base_args(data_root, tmp_path / "short", "--epochs", "3")
    i = args.index("--warmup-epochs")
    del args[i : i + 2]
    assert main(args) == 0
    config = read(tmp_path / "short", "config.json")
    assert (
        config["recipe"]["warmup_epochs"] == 0
        and config["recipe_sources"]["warmup_epochs"] == "scaled:epochs"
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "warmup: 10 epochs (recipe:vtab, of 100) do not fit 3 epochs; scaled to 0 (the same share of the run); "
        "choose with --warmup-epochs N"
    )
    assert resolve_recipe("vtab", None, {"epochs": 30})[0]["warmup_epochs"] == 10  # fits: unchanged
    assert resolve_recipe("vtab", None, {"epochs": 10})[0]["warmup_epochs"] == 10
    recipe, sources = resolve_recipe("vtab", {"epochs": 50, "warmup_epochs": 20}, {"epochs": 10}, "m")
    assert recipe["warmup_epochs"] == 4 and sources["warmup_epochs"] == "scaled:epochs"
    with pytest.raises(ValueError, match="warmup-epochs 9 is invalid"):
        resolve_recipe("vtab", None, {"epochs": 3, "warmup_epochs": 9})  # a flag is never changed


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no route"])
def test_offline_without_weights_fails_at_once_saying_how(data_root, tmp_path, monkeypatch, capsys, offline):
    import huggingface_hub.constants as hf

    from petl_zoo.train import backbone

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(
            backbone, "hub_reachable", lambda *a: pytest.fail("no network check when offline")
        )
        reason = "offline (HF_HUB_OFFLINE=1) and not in the local cache"
    else:
        monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(
            backbone, "hub_reachable", lambda *a: False
        )  # what a machine without a route sees
        reason = "offline (huggingface.co unreachable within 3 s) and not in the local cache"
    args = base_args(data_root, tmp_path / "run", "--epochs", "1")
    args.remove("--no-pretrained")
    start = time.time()
    assert main(args) == 1
    assert time.time() - start < 30  # not the hub's ~50 s of retries
    err = one_line_error(capsys)
    assert reason in err and "--pretrained-file PATH" in err and "--no-pretrained" in err, err
    assert hf.HF_HUB_OFFLINE is (offline == "HF_HUB_OFFLINE")  # offline mode only while loading


def test_progress_bars_only_on_a_terminal(data_root, tmp_path, capsys):
    args = base_args(data_root, tmp_path / "run", "--epochs", "2", "--eval-every", "2")
    args.remove("--no-progress")
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert any(line.startswith("epoch 1/2  loss ") for line in captured.out.splitlines())
