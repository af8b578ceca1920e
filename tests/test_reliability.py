"""Run integrity: shared file modes, no orphaned trainer after a killed sweep."""

from __future__ import annotations

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
