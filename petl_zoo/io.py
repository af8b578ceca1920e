"""Files the tools write: atomically (a temporary file in the same folder, then a rename over the
target), with a failed write reported as one ``WriteError`` line naming the file and the reason (no
space left, permission denied, read-only, a parent that is a file), the target left as it was.

Text files are opened for writing in one place, ``open_for_write`` (the tests simulate a full or read-only disk
there); torch and safetensors write their own files, and their failures are classified the same way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

from vtab.layout import umask_mode

__all__ = [
    "WriteError",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_torch_save",
    "append_text",
    "make_dir",
    "open_for_write",
    "read_json",
    "sha256_file",
    "umask_mode",
]

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


class WriteError(OSError):
    """A file or folder could not be written; ``str()`` is one line naming it and why, ``reason`` the
    why alone (``no space left on device``, ``permission denied``, ``X is a file, not a folder``)."""

    def __init__(self, code: int | None, path: str | os.PathLike, detail: str = "") -> None:
        super().__init__(code, detail or os.strerror(code or errno.EIO))
        self.filename = str(path)
        self.reason, self.message = _describe(code, Path(path), detail)

    def __str__(self) -> str:
        return self.message

    @classmethod
    def of(cls, err: BaseException, path: str | os.PathLike) -> WriteError:
        """``err`` (an OSError, or torch's RuntimeError for a failed write) as a WriteError on ``path``."""
        if isinstance(err, WriteError):
            return err
        if isinstance(err, OSError):
            return cls(err.errno, path, err.strerror or str(err))
        found = re.search(r"os error (\d+)", str(err))  # safetensors: "I/O error: ... (os error 28)"
        code = int(found.group(1)) if found else _guess_errno(Path(path))
        return cls(code, path, " ".join(str(err).split())[:160])


def _file_parent(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a folder (a file in the way), else None."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _describe(code: int | None, path: Path, detail: str) -> tuple[str, str]:
    """``(reason, message)``: why, and the one line naming ``path``."""
    if code == errno.EEXIST and path.exists() and not path.is_dir():
        reason = f"{path} is a file, not a folder"
        return reason, f"cannot create folder {path}: it is a file"
    blocker = _file_parent(path) if code in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT) else None
    if blocker is not None:
        reason = f"{blocker} is a file, not a folder"
        return reason, f"cannot write {path}: {reason}"
    if code in _REASONS:
        return _REASONS[code], f"{_REASONS[code]} writing {path}"
    reason = detail or os.strerror(code or errno.EIO)
    return reason, f"cannot write {path}: {reason}"


def _guess_errno(path: Path) -> int:
    """Why a writer that reports no errno (torch's zip writer) failed: ENOSPC when the folder's file
    system has (almost) no space left, else EIO."""
    folder = next((p for p in (path, *path.parents) if p.is_dir()), None)
    try:
        st = os.statvfs(folder) if folder is not None else None
    except OSError:
        st = None
    if st is not None and st.f_bavail * st.f_frsize < 1 << 20:
        return errno.ENOSPC
    return errno.EIO


def _is_write_failure(err: BaseException) -> bool:
    """torch.save reports a failed write as a RuntimeError from its zip writer, safetensors as a
    SafetensorError with an I/O error."""
    text = str(err)
    if type(err).__name__ == "SafetensorError":
        return "I/O error" in text or "os error" in text
    return isinstance(err, RuntimeError) and (
        "inline_container" in text or "file write failed" in text or "unexpected pos" in text
    )


def open_for_write(path: str | os.PathLike, mode: str) -> IO[str]:
    """The one place text files are opened for writing (``w``, ``a`` or ``x``: create, never replace)."""
    return open(path, mode, encoding="utf-8")


def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p``; a failure (a parent that is a file, no permission) is a WriteError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError.of(err, path) from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``; nothing half-written remains,
    and a failure leaves ``path`` as it was (a WriteError naming it)."""
    path = Path(path)
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise WriteError.of(err, path) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) or _is_write_failure(err):
            raise WriteError.of(err, path) from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open_for_write(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (a log such as metrics.jsonl); a failure is a WriteError."""
    try:
        with open_for_write(path, "a") as f:
            f.write(text)
    except OSError as err:
        raise WriteError.of(err, path) from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """A JSON file's value; a missing, unreadable, truncated or invalid file is one ValueError line that
    names it (``what``: e.g. "run config") rather than json's bare "Expecting value: line 1 column 5"."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None
    if not text.strip():
        raise ValueError(f"{what} {path} is empty (a truncated write?); delete it or restore it")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        ends_early = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated")
        where = f"{err.msg.removesuffix(' at')} at line {err.lineno} column {err.colno}"
        hint = "; the file ends early: truncated?" if ends_early else ""
        raise ValueError(f"{what} {path} is not valid JSON ({where}{hint})") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks). Remembered while the file stays the same
    (inode, size, mtime, ctime): a sweep hashes one pretrained file once, not once per task."""
    st = os.stat(path)
    return _sha256(os.path.realpath(path), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@lru_cache(maxsize=64)
def _sha256(path: str, stamp: tuple[int, int, int, int]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
