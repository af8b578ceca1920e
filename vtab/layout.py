"""The VTAB-1K folder layout on disk, without torch: root resolution, task folders, list files,
image decoding. ``python -m vtab.prepare`` needs only this part."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from .images import to_rgb
from .tasks import find_task, normalize_name, tasks, unknown_task_message

ENV_VAR = "VTAB_ROOT"
DEFAULT_ROOT = Path("data") / "vtab-1k"

# split name -> list file, as the field's vtab-1k folders spell them
SPLITS: dict[str, str] = {
    "train": "train800.txt",
    "val": "val200.txt",
    "trainval": "train800val200.txt",
    "test": "test.txt",
}
LIST_FILES: tuple[str, ...] = tuple(SPLITS.values())
TRAIN_SPLITS = ("train", "trainval")

PathLike = str | os.PathLike


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: what a plain ``open(path, "w")`` (0o666) or ``mkdir`` (0o777) gets.

    ``mkstemp``/``mkdtemp`` create private (0600/0700) entries; files the tools write are meant to be
    shared like any other (a run folder on a cluster), so they are given this mode before the rename.
    """
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def resolve_root(data_root: PathLike | None = None) -> Path:
    """The VTAB-1K root: ``data_root`` (``--data-root``), else ``$VTAB_ROOT``, else ``./data/vtab-1k``
    (absolute, relative to the current directory)."""
    if data_root is not None and str(data_root) != "":
        root = Path(data_root)
    elif os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR])
    else:
        root = DEFAULT_ROOT
    return root.expanduser().absolute()


def prepare_command(task: str, root: Path) -> str:
    """The shell command that writes ``task`` under ``root``."""
    return f"python -m vtab.prepare --task {task} --out {root}"


def _root_origin(data_root: PathLike | None) -> str:
    if data_root is not None and str(data_root) != "":
        return "--data-root / data_root"
    if os.environ.get(ENV_VAR):
        return f"${ENV_VAR}"
    return f"the default ./{DEFAULT_ROOT.as_posix()} (set --data-root or ${ENV_VAR})"


def _custom_folders(root: Path) -> list[str]:
    """Folders under ``root`` holding at least one list file (hidden folders excluded)."""
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any((p / f).is_file() for f in LIST_FILES)
    )


def available_tasks(data_root: PathLike | None = None) -> list[str]:
    """Task folders present under the root: canonical names of registry tasks (found under any alias
    folder name) in registry order, then custom folders holding list files."""
    root = resolve_root(data_root)
    found: list[str] = []
    for name in _custom_folders(root):
        info = find_task(name)
        found.append(info.name if info else name)
    registry = [t.name for t in tasks(include_extra=True) if t.name in found]
    return registry + [n for n in found if find_task(n) is None]


def task_dir(task: str, data_root: PathLike | None = None) -> Path:
    """The folder of ``task`` under the root. Registry tasks are found under their canonical name or
    any alias (``cifar100`` for ``cifar``, ``oxford_pet`` for ``oxford_iiit_pet``, case-insensitive);
    any other folder under the root is a custom task."""
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"Task name must be a non-empty string, got {task!r}.")
    root = resolve_root(data_root)
    info = find_task(task)
    if info is None:
        if (root / task).is_dir():
            return root / task
        where = f"no folder {root / task} either" if root.is_dir() else f"the root {root} does not exist"
        raise ValueError(
            unknown_task_message(task, _custom_folders(root))
            + f" A custom task is a folder under the root holding {', '.join(LIST_FILES)} ({where})."
        )
    if not root.is_dir():
        raise FileNotFoundError(
            f"VTAB root {root} does not exist (from {_root_origin(data_root)}). "
            f"Prepare the task with: {prepare_command(info.name, root)}"
        )
    names = (info.name, *info.aliases)
    for name in names:
        if (root / name).is_dir():
            return root / name
    wanted = {normalize_name(n) for n in names}
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and normalize_name(entry.name) in wanted:
            return entry
    raise FileNotFoundError(
        f"No folder for task {info.name!r} under {root} (looked for {', '.join(names)}). "
        f"Prepare it with: {prepare_command(info.name, root)}"
    )


def split_file(split: str) -> str:
    """The list file of a split: train -> train800.txt, val -> val200.txt,
    trainval -> train800val200.txt, test -> test.txt (the file stems are accepted too)."""
    if split in SPLITS:
        return SPLITS[split]
    for name, file in SPLITS.items():
        if split == file or split == file[: -len(".txt")]:
            return SPLITS[name]
    raise ValueError(f"Unknown split {split!r}; valid: {', '.join(SPLITS)} (or {', '.join(LIST_FILES)}).")


def read_list(path: PathLike) -> list[tuple[str, int, int]]:
    """Parse a list file into ``(relative path, label, line number)``; blank lines are skipped.
    A line that does not parse, or a negative label, is a ValueError naming ``file:line``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is dropped
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text list file ({err}).") from None
    entries = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        label_text = parts[1] if len(parts) == 2 else ""
        try:
            label = int(label_text)
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: cannot parse {line!r}: expected '<image path relative to the task "
                f"folder> <integer label>'."
            ) from None
        if label < 0:
            raise ValueError(f"{path}:{lineno}: label {label} is negative; labels are 0..num_classes-1.")
        entries.append((parts[0], label, lineno))
    return entries


def infer_num_classes(folder: PathLike) -> int:
    """Largest label + 1 over the list files present in a task folder."""
    folder = Path(folder)
    files = [folder / f for f in LIST_FILES if (folder / f).is_file()]
    if not files:
        raise FileNotFoundError(f"{folder} holds none of the list files {', '.join(LIST_FILES)}.")
    labels = [label for f in files for _, label, _ in read_list(f)]
    if not labels:
        raise ValueError(f"The list files in {folder} hold no entries; cannot infer the class count.")
    return max(labels) + 1


def num_classes(task: str, data_root: PathLike | None = None) -> int:
    """The registry's class count, or for a custom folder the largest label + 1 over its list files."""
    info = find_task(task) if isinstance(task, str) else None
    if info is not None:
        return info.num_classes
    return infer_num_classes(task_dir(task, data_root))


def load_image(path: Path, where: str = "") -> Image.Image:
    """Decode an image file with Pillow (Pillow-SIMD where installed) as RGB; missing or corrupt files
    raise FileNotFoundError / ValueError naming the path and ``where`` (the list file line)."""
    listed = f" (listed at {where})" if where else ""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image {path}{listed} does not exist.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"Image {path}{listed} cannot be decoded: {err}") from None
