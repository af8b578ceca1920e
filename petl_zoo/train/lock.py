"""The run folder's lock, ``run.lock`` (``RunFolder.lock_path``): one trainer per folder, also across
hosts on a shared filesystem.

The lock file is created atomically (``O_CREAT | O_EXCL``) and holds ``{pid, host, since, token}``; the
holder also keeps an ``flock`` on it where the filesystem supports one, and refreshes its modification
time (the heartbeat) every ``HEARTBEAT_S`` seconds from a background thread and after every epoch. It is
removed when the holder exits, also on an error, Ctrl-C or SIGTERM.

Whether an existing lock is live:

- held on this host: live while its pid is alive and (where ``flock`` works) still holds the lock;
  a dead process (a ``kill -9``, a crash) leaves a stale lock, which the next trainer takes over with a
  one-line note;
- held on another host: the process table cannot tell, so the lock is live unless its heartbeat is
  older than ``stale_after_s()`` (``$PETL_ZOO_LOCK_TIMEOUT_S``, default 900 s; the hosts' clocks are
  assumed to agree to within a few minutes).

A taken-over lock is noticed by its old holder at its next epoch, which then stops rather than write
into the folder that another process now owns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import io as pio
from ..io import WriteError, make_dir
from ..runfolder import BUSY_EXIT_STATUS, RunFolder
from .errors import TrainingError, UserError

try:
    import fcntl
except ImportError:  # Windows: the lock file and the heartbeat only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "HEARTBEAT_S",
    "BUSY_EXIT_STATUS",
    "RunBusyError",
    "LockInfo",
    "RunLock",
    "live_holder",
    "stale_after_s",
]

logger = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
_DEFAULT_STALE_S = 900.0
_YOUNG_S = 10.0  # a lock file this young may still be being written (no content, no flock yet)


def stale_after_s() -> float:
    """After how many seconds without a heartbeat another host's lock counts as stale."""
    text = os.environ.get("PETL_ZOO_LOCK_TIMEOUT_S", "")
    try:
        value = float(text) if text else _DEFAULT_STALE_S
    except ValueError:
        raise UserError(
            f"PETL_ZOO_LOCK_TIMEOUT_S={text!r} is invalid; valid: a number of seconds > 0"
        ) from None
    if value <= 0:
        raise UserError(f"PETL_ZOO_LOCK_TIMEOUT_S={text!r} is invalid; valid: a number of seconds > 0")
    return value


class RunBusyError(UserError):
    """Another live process holds the run folder (exit status ``BUSY_EXIT_STATUS``)."""


@dataclass(frozen=True)
class LockInfo:
    """What ``run.lock`` says (``pid`` -1 when unreadable) and its heartbeat (modification time)."""

    pid: int
    host: str
    since: str
    token: str
    heartbeat: float

    def describe(self) -> str:
        if self.pid < 0:
            return "an unknown process (unreadable lock file)"
        return f"pid {self.pid} on host {self.host} since {self.since}"


def _host() -> str:
    return socket.gethostname()


def _now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


def read_lock(path: Path) -> LockInfo | None:
    """The lock file's content, None when there is none."""
    try:
        heartbeat = path.stat().st_mtime
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockInfo(
            int(data["pid"]), str(data["host"]), str(data["since"]), str(data["token"]), heartbeat
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        try:
            heartbeat = path.stat().st_mtime
        except FileNotFoundError:
            return None
        return LockInfo(-1, "?", "?", "", heartbeat)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return True


def _flock_free(path: Path) -> bool | None:
    """Whether nobody holds an ``flock`` on ``path`` (None: flock is not supported there)."""
    if fcntl is None:
        return None
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return True
    except OSError:
        return None


def stale_reason(path: Path, info: LockInfo) -> str | None:
    """Why the lock ``info`` at ``path`` is stale, or None while it is live (see the module docstring)."""
    age = time.time() - info.heartbeat
    if info.pid < 0:
        return None if age < _YOUNG_S else "its content is unreadable"
    if info.host == _host():
        if not _pid_alive(info.pid):
            return "the process is gone"
        if age >= _YOUNG_S and _flock_free(path):
            return f"pid {info.pid} is another process now (it does not hold the lock)"
        return None
    timeout = stale_after_s()
    if age > timeout:
        return (
            f"no heartbeat for {age / 60:.0f} min (another host's lock is stale after {timeout / 60:.0f} min)"
        )
    return None


def live_holder(folder: str | os.PathLike) -> LockInfo | None:
    """Who holds ``folder`` now (a live lock), else None; reads only, takes nothing over."""
    path = RunFolder(folder).lock_path
    info = read_lock(path)
    if info is None or stale_reason(path, info) is not None:
        return None
    return info


class RunLock:
    """``with RunLock(folder):`` holds ``folder/run.lock`` (see the module docstring); raises
    RunBusyError when another live process holds it."""

    def __init__(self, folder: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.folder = Path(folder)
        self.path = RunFolder(folder).lock_path
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self._file = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the lock file, taking over a stale one (a one-line warning); RunBusyError otherwise."""
        make_dir(self.folder)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            info = read_lock(self.path)
            if info is None:
                continue  # released meanwhile
            reason = stale_reason(self.path, info)
            if reason is None:
                raise RunBusyError(
                    f"output folder {self.folder} is in use by {info.describe()} ({self.path}); wait for "
                    "it to finish or stop it, or give another --out"
                )
            if self._take_over(info):
                logger.warning(f"taking over the stale lock {self.path} of {info.describe()}: {reason}")
        raise RunBusyError(
            f"output folder {self.folder}: another process keeps taking {self.path}; try again"
        )

    def _create(self) -> bool:
        try:
            f = pio.open_for_write(self.path, "x")
        except FileExistsError:
            return False
        except OSError as err:
            raise WriteError.of(err, self.path) from None
        try:
            data = {"pid": os.getpid(), "host": _host(), "since": _now_text(), "token": self.token}
            f.write(json.dumps(data) + "\n")
            f.flush()
        except OSError as err:
            f.close()
            self.path.unlink(missing_ok=True)
            raise WriteError.of(err, self.path) from None
        if fcntl is not None:
            with contextlib.suppress(OSError):  # not every shared filesystem supports flock
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file = f
        return True

    def _take_over(self, info: LockInfo) -> bool:
        """Move the stale lock aside, unless it changed meanwhile (then it is put back)."""
        aside = self.folder / f".{self.path.name}.{self.token}.stale"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return True  # someone else removed it: try to create ours
        moved = read_lock(aside)
        if moved is not None and moved.token != info.token:  # a fresh lock of a third process
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # put it back unless yet another one appeared
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="petl_zoo-run-lock", daemon=True)
        self._thread.start()

    def owned(self) -> bool:
        info = read_lock(self.path)
        return info is not None and info.token == self.token

    def refresh(self) -> None:
        """The per-epoch heartbeat; stops the run (TrainingError) when another process took the lock."""
        info = read_lock(self.path)
        if info is None or info.token != self.token:
            holder = info.describe() if info is not None else "nobody (the lock file was removed)"
            raise TrainingError(
                f"the lock {self.path} is now held by {holder}: stopping, so that two processes do not "
                "write one run"
            )
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        """Remove the lock file if it is still ours; stop the heartbeat."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            if self.owned():
                self.path.unlink()
        with contextlib.suppress(OSError):
            self._file.close()
        self._file = None
