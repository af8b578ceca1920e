"""VTAB-1K datasets and DataLoaders: the torch side of the package (see vtab.layout for the folders)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    get_worker_info,
)

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


_SEED_BITS = 2**63 - 1
_INDEX_MIX = 0x9E3779B97F4A7C15  # spreads neighbouring indices over the seed space (golden ratio)


class SeededSampler(Sampler):
    """Yields ``(index, sample_seed)`` for every index of ``sampler``: the seeds of one pass come from
    ``(seed, epoch)`` and the position in the pass, mixed with the index (so the ranks of a sharded
    sampler, which share positions, still draw different seeds). ``epoch`` is the wrapped sampler's
    ``epoch`` attribute when it has one (``DistributedSampler.set_epoch``: a fresh loader built at a
    resumed epoch draws what the uninterrupted run drew), else the number of passes so far. The
    seeds are drawn here, in the main process, so they do not depend on the number of workers."""

    def __init__(self, sampler: Sampler | Iterable, seed: int) -> None:
        self.sampler = sampler
        self.seed = seed
        self.passes = 0

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", None)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            epoch = self.passes
        self.passes += 1
        rng = np.random.default_rng([self.seed, epoch])
        for index in self.sampler:
            index = int(index)
            draw = int(rng.integers(_SEED_BITS, dtype=np.int64))
            yield index, (draw ^ (index * _INDEX_MIX)) & _SEED_BITS


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA streams are not touched
    random.seed(seed)
    np.random.seed(seed % 2**32)


class SeededDataset(Dataset):
    """``dataset`` read with ``(index, sample_seed)`` keys (from :class:`SeededSampler`): the item is
    built with torch's CPU RNG, Python's ``random`` and NumPy's global RNG seeded from
    ``sample_seed``; in the main process (``workers=0``) those RNGs are restored afterwards (its
    RNG streams are left as they were: about 0.1 ms an item, mostly NumPy's state; a worker, whose
    every item reseeds, restores nothing). A random transform thus draws the same augmentation for
    the same sample whatever process builds it: the batches do not depend on the number of workers.
    Other attributes (``targets``, ``transform``, ``num_classes`` ...) are the wrapped dataset's."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        if get_worker_info() is not None:  # a worker: every item reseeds, nothing to restore
            _seed_all(seed)
            return self.dataset[index]
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        _seed_all(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])

    def __getattr__(self, name: str):
        if name == "dataset" or name.startswith("__"):  # not set yet (unpickling in a worker), or a
            raise AttributeError(name)  # protocol such as Subset's __getitems__, which takes bare indices
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"SeededDataset({self.dataset!r})"


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
    """A DataLoader whose batches depend on ``seed`` only, not on ``workers`` (0, 1 or N give the
    same batches, augmentation included): the order comes from ``sampler`` or, with ``shuffle``, a
    ``RandomSampler`` on a ``torch.Generator`` seeded with ``seed`` (a new permutation each pass),
    and every sample's transform runs with RNGs seeded per sample from ``(seed, epoch, position,
    index)`` (:class:`SeededSampler`, :class:`SeededDataset`; ``loader.dataset`` is the wrapper,
    which forwards attributes to ``dataset``). With ``workers > 0`` the workers are persistent
    (started once, kept across passes) and prefetch 4 batches each; ``pin_memory`` defaults to
    ``torch.cuda.is_available()`` and is never on without CUDA."""
    _check_int("batch_size", batch_size, 1)
    _check_int("workers", workers, 0)
    _check_int("seed", seed, 0)
    if sampler is not None and shuffle:
        raise ValueError(
            "shuffle=True conflicts with a sampler (the sampler sets the order); pass shuffle=False."
        )
    if sampler is None:
        if shuffle:
            order = torch.Generator()
            order.manual_seed(seed)
            sampler = RandomSampler(dataset, generator=order)  # type: ignore[arg-type]
        else:
            sampler = SequentialSampler(dataset)  # type: ignore[arg-type]
    generator = torch.Generator()  # the workers' base seed (seed_worker), nothing else
    generator.manual_seed(seed)
    extra = (
        {"persistent_workers": True, "worker_init_fn": seed_worker, "prefetch_factor": 4} if workers else {}
    )
    cuda = torch.cuda.is_available()
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        shuffle=False,
        sampler=SeededSampler(sampler, seed),
        num_workers=workers,
        pin_memory=cuda if pin_memory is None else bool(pin_memory) and cuda,
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
