"""VTAB-1K datasets and DataLoaders: the torch side of the package (see vtab.layout for the folders)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .layout import (
    SPLITS,
    TRAIN_SPLITS,
    PathLike,
    check_num_classes,
    infer_num_classes,
    list_file_missing_message,
    load_image,
    read_list,
    split_file,
    task_dir,
)
from .tasks import find_task
from .transforms import build_transform


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
            raise FileNotFoundError(
                list_file_missing_message(self.task, self.root, self.split, info is not None)
            )
        entries = read_list(self.list_file)
        if not entries:
            raise ValueError(f"{self.list_file} lists no images.")
        if num_classes is None:
            num_classes = info.num_classes if info is not None else infer_num_classes(self.root)
        else:
            check_num_classes(num_classes)
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
