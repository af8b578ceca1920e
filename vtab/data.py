"""VTAB-1K folders on disk: root resolution, task folders, list files, the Dataset and DataLoaders."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .tasks import find_task, normalize_name, unknown_task_message
from .transforms import build_transform

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
    folder name), then custom folders holding list files."""
    root = resolve_root(data_root)
    found: list[str] = []
    for name in _custom_folders(root):
        info = find_task(name)
        found.append(info.name if info else name)
    registry = [n for n in found if find_task(n)]
    custom = [n for n in found if not find_task(n)]
    return sorted(set(registry)) + custom


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
        text = path.read_text(encoding="utf-8")
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
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"Image {path}{listed} does not exist.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"Image {path}{listed} cannot be decoded: {err}") from None


class VtabDataset(Dataset):
    """One split of a task folder: items are ``(transform(image), label)`` with the image an RGB PIL
    image. The list file is parsed (and every label range-checked) on construction; images are
    decoded in ``__getitem__``.

    Attributes: ``task`` (canonical name, or the folder name for custom data), ``split``,
    ``root`` (the task folder), ``list_file``, ``num_classes``, ``samples`` (list of
    ``(Path, label)``) and ``targets`` (the labels).
    """

    def __init__(
        self,
        task: str,
        split: str,
        transform: Callable | None = None,
        data_root: PathLike | None = None,
        num_classes: int | None = None,
    ) -> None:
        file = split_file(split)
        self.split = next(name for name, f in SPLITS.items() if f == file)
        self.root = task_dir(task, data_root)
        info = find_task(task)
        self.task = info.name if info is not None else self.root.name
        self.list_file = self.root / file
        self.transform = transform
        if not self.list_file.is_file():
            hint = (
                f" Re-create it with: {prepare_command(self.task, self.root.parent)}"
                if info is not None
                else f" A task folder holds {', '.join(LIST_FILES)}."
            )
            raise FileNotFoundError(
                f"Task {self.task!r} has no list file {self.list_file} for split {self.split!r}.{hint}"
            )
        entries = read_list(self.list_file)
        if not entries:
            raise ValueError(f"{self.list_file} lists no images.")
        if num_classes is None:
            num_classes = info.num_classes if info is not None else infer_num_classes(self.root)
        elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
        self.num_classes = num_classes
        for _, label, lineno in entries:
            if label >= num_classes:
                raise ValueError(
                    f"{self.list_file}:{lineno}: label {label} is outside 0..{num_classes - 1} "
                    f"(task {self.task!r} has {num_classes} classes)."
                )
        self.samples: list[tuple[Path, int]] = [(self.root / rel, label) for rel, label, _ in entries]
        self.targets: list[int] = [label for _, label, _ in entries]
        self._lines: list[int] = [lineno for _, _, lineno in entries]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_image(path, f"{self.list_file}:{self._lines[index]}")
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return (
            f"VtabDataset(task={self.task!r}, split={self.split!r}, n={len(self)}, "
            f"num_classes={self.num_classes}, root={str(self.root)!r})"
        )


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's RNGs from the worker's torch seed
    (which the loader derives from its seeded generator and the worker id)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int = 2,
    sampler: Sampler | Iterable | None = None,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader that is deterministic given ``seed``: shuffling uses a seeded ``torch.Generator``
    and each worker's RNGs are seeded from it. Workers are persistent when ``workers > 0``;
    ``pin_memory`` defaults to ``torch.cuda.is_available()``."""
    _check_int("batch_size", batch_size, 1)
    _check_int("workers", workers, 0)
    _check_int("seed", seed, 0)
    if sampler is not None and shuffle:
        raise ValueError(
            "shuffle=True conflicts with a sampler (the sampler sets the order); pass shuffle=False."
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    extra = (
        {"persistent_workers": True, "worker_init_fn": seed_worker, "prefetch_factor": 4} if workers else {}
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=bool(shuffle),
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
        drop_last=drop_last,
        generator=generator,
        **extra,
    )


def make_loaders(
    task: str,
    model: torch.nn.Module,
    batch_size: int,
    *,
    splits: Sequence[str] = ("trainval", "test"),
    protocol: str = "default",
    augment: bool = False,
    data_root: PathLike | None = None,
    workers: int = 2,
    seed: int = 0,
    pin_memory: bool | None = None,
    num_classes: int | None = None,
) -> dict[str, DataLoader]:
    """Loaders for several splits of one task, keyed by split: ``train``/``trainval`` are shuffled
    (and augmented when ``augment``), the others are read in order with the eval transform."""
    eval_tf = build_transform(model, protocol)
    train_tf = build_transform(model, protocol, augment=True) if augment else eval_tf
    loaders = {}
    for split in splits:
        name = next(n for n, f in SPLITS.items() if f == split_file(split))
        is_train = name in TRAIN_SPLITS
        dataset = VtabDataset(task, name, train_tf if is_train else eval_tf, data_root, num_classes)
        loaders[name] = make_loader(
            dataset, batch_size, shuffle=is_train, workers=workers, seed=seed, pin_memory=pin_memory
        )
    return loaders
