"""Run integrity: shared file modes, no orphaned trainer after a killed sweep, writes that fail, damaged
inputs, the run folder's lock, a sweep that checks the recipe of what it skips."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from petl_zoo.io import atomic_write_json, atomic_write_text

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
    [("", "is empty"), ('{"a": 1, "b": [1, 2', "ends early"), ('{"a": 1}\n}x', "line 2 column 1")],
)
def test_damaged_json_is_one_line_naming_the_file(tmp_path, text, needle):
    from petl_zoo.io import read_json

    path = tmp_path / "result.json"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        read_json(path, "run result")
    message = str(info.value)
    assert message.startswith(f"run result {path}") and needle in message and "\n" not in message
