"""The VTAB-1K folder layout on disk, without torch: root resolution, task folders, list files,
image decoding. ``python -m vtab.prepare`` needs only this part."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path, PureWindowsPath

from PIL import Image

from .images import to_rgb
from .tasks import TaskInfo, all_tasks, find_task, normalize_name, unknown_task_message

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
        info = _folder_task(name)
        found.append(info.name if info else name)
    registry = [t.name for t in all_tasks() if t.name in found]
    return registry + [n for n in found if _folder_task(n) is None]


def _folder_names(info: TaskInfo) -> tuple[str, ...]:
    """The folder names a registry task is found under: VTAB-1K's canonical name or any alias (the
    field's folders are spelled many ways); another benchmark's only its canonical name, so that the
    suite's DTD never reads VTAB-1K's ``dtd`` folder."""
    return (info.name, *info.aliases) if info.benchmark == "vtab" else (info.name,)


def _folder_task(folder: str) -> TaskInfo | None:
    """The registry task a folder under the root holds (by :func:`_folder_names`), or None (custom)."""
    info = find_task(folder)
    wanted = {normalize_name(n) for n in _folder_names(info)} if info is not None else set()
    return info if normalize_name(folder) in wanted else None


def task_dir(task: str, data_root: PathLike | None = None) -> Path:
    """The folder of ``task`` under the root. VTAB-1K's tasks are found under their canonical name or
    any alias (``cifar100`` for ``cifar``, ``oxford_pet`` for ``oxford_iiit_pet``, case-insensitive), the
    other benchmarks' under their canonical name (``fgvc_cub``, ``suite_dtd``); any other folder under
    the root is a custom task."""
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
    names = _folder_names(info)
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


def list_file_missing_message(task: str, folder: Path, split: str, registry: bool) -> str:
    """The message for a task folder without the list file of ``split`` (a split name)."""
    hint = (
        f" Re-create it with: {prepare_command(task, folder.parent)}"
        if registry
        else f" A task folder holds {', '.join(LIST_FILES)}."
    )
    return f"Task {task!r} has no list file {folder / SPLITS[split]} for split {split!r}.{hint}"


def _outside_reason(rel: str) -> str | None:
    """Why a listed image path would be read from outside the task folder, or None."""
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or PureWindowsPath(rel).drive:
        return "an absolute path"
    if ".." in re.split(r"[\\/]", rel):
        return "a '..' component"
    return None


def read_list(path: PathLike) -> list[tuple[str, int, int]]:
    """Parse a list file into ``(relative path, label, line number)``; blank lines are skipped.
    A line that does not parse, a negative label, or an image path that leaves the task folder
    (absolute, or with a ``..`` component) is a ValueError naming ``file:line``."""
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
        reason = _outside_reason(parts[0])
        if reason is not None:
            raise ValueError(
                f"{path}:{lineno}: image path {parts[0]!r} is {reason}, outside the task folder; "
                f"list paths are relative to the task folder (e.g. images/train/0.png)."
            )
        entries.append((parts[0], label, lineno))
    return entries


_MAX_PLACES = 5  # list-file lines named in one message


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """``[3, 10, 11, 12]`` (sorted) -> ``[(3, 3), (10, 12)]``: the runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _ranges(ids: list[int]) -> str:
    """``[3, 10, 11, 12]`` -> ``'3, 10..12'`` (sorted input; at most 8 runs, then a count)."""
    runs = _runs(ids)
    shown = [f"{a}" if a == b else f"{a}..{b}" for a, b in runs[:8]]
    more = f", ... ({len(ids)} ids in all)" if len(runs) > 8 else ""
    return ", ".join(shown) + more


def _places(entries: Iterable[tuple[str, int, int]]) -> str:
    """``label 99 at train800.txt:5, ...`` for (file name, label, line) entries, at most _MAX_PLACES."""
    entries = list(entries)
    shown = ", ".join(f"label {label} at {file}:{line}" for file, label, line in entries[:_MAX_PLACES])
    extra = len(entries) - _MAX_PLACES
    return shown + (f" and {extra} more line{'s' * (extra > 1)}" if extra > 0 else "")


def check_num_classes(value: object, what: str = "num_classes") -> int:
    """``value`` if it is a positive int (not a bool), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}.")
    return value


def infer_num_classes(folder: PathLike, declared: int | None = None) -> int:
    """The class count of a custom task folder, over the list files present.

    Without ``declared`` it is the largest label + 1, and every class below it must have a line:
    empty classes (a typo'd label such as 99 in a 10-class task) are a ValueError naming the empty
    class ids and the ``file:line`` of the labels above the widest gap. With ``declared`` (the
    count you insist on) labels >= ``declared`` are a ValueError naming their lines, empty classes
    are allowed, and ``declared`` is returned."""
    folder = Path(folder)
    if declared is not None:
        check_num_classes(declared)
    files = [f for f in LIST_FILES if (folder / f).is_file()]
    if not files:
        raise FileNotFoundError(f"{folder} holds none of the list files {', '.join(LIST_FILES)}.")
    entries = [(f, label, line) for f in files for _, label, line in read_list(folder / f)]
    if not entries:
        raise ValueError(f"The list files in {folder} hold no entries; cannot infer the class count.")
    if declared is not None:
        over = [e for e in entries if e[1] >= declared]
        if over:
            raise ValueError(
                f"{folder}: {_places(over)} outside 0..{declared - 1} (the declared class count is "
                f"{declared}); fix those lines or declare a larger count."
            )
        return declared
    labels = {label for _, label, _ in entries}
    top = max(labels)
    empty = [c for c in range(top) if c not in labels]
    if not empty:
        return top + 1
    runs = _runs(empty)
    inner = [r for r in runs if r[0] > 0]  # a gap at 0 has nothing below it to stand out from
    if inner:
        gap = max(inner, key=lambda r: (r[1] - r[0], r[0]))
        where = f"above the gap: {_places(e for e in entries if e[1] > gap[1])}"
    else:
        where = f"the smallest label is {min(labels)} (labels count from 0)"
    noun = "class" if len(empty) == 1 else "classes"
    verb = "has" if len(empty) == 1 else "have"
    insist = "declare the class count (num_classes=N; the trainer's --num-classes N) to allow empty classes"
    raise ValueError(
        f"{folder}: {noun} {_ranges(empty)} of 0..{top} {verb} no line in {', '.join(files)} "
        f"(the class count is inferred as the largest label + 1 = {top + 1}); {where}. "
        f"Fix those labels, or {insist}."
    )


def num_classes(task: str, data_root: PathLike | None = None, *, declared: int | None = None) -> int:
    """The registry's class count, or for a custom folder the largest label + 1 over its list files
    (empty classes below it are an error; see ``infer_num_classes``). ``declared`` insists on a
    count: a custom folder's labels must lie below it (empty classes allowed); for a registry task
    it must equal the registry's count."""
    info = find_task(task) if isinstance(task, str) else None
    if info is not None:
        if declared is not None and check_num_classes(declared) != info.num_classes:
            raise ValueError(
                f"Task {info.name!r} has {info.num_classes} classes (the VTAB registry); the declared "
                f"class count {declared} does not match it (omit it, or pass {info.num_classes})."
            )
        return info.num_classes
    return infer_num_classes(task_dir(task, data_root), declared)


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
