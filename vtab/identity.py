"""What a task's data is, by content: digests of its list files and of its images' names and sizes,
so that a run's record survives moving the data and notices a changed label, image or line."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .layout import SPLITS, PathLike, list_file_missing_message, read_list, split_file, task_dir
from .tasks import find_task


def _split_name(split: str) -> str:
    file = split_file(split)
    return next(name for name, f in SPLITS.items() if f == file)


def _split_record(folder: Path, split: str, sizes: dict[str, int]) -> dict[str, Any]:
    """``{"list_sha256", "images_sha256", "count"}`` of one list file; ``sizes`` caches ``os.stat``."""
    list_file = folder / SPLITS[split]
    entries = read_list(list_file)  # also refuses lines that do not parse or leave the folder
    images = hashlib.sha256()
    for rel, _, line in entries:
        if rel not in sizes:
            try:
                sizes[rel] = os.stat(folder / rel).st_size
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"Image {folder / rel} (listed at {list_file}:{line}) does not exist."
                ) from None
        images.update(f"{rel}\t{sizes[rel]}\n".encode())
    return {
        "list_sha256": hashlib.sha256(list_file.read_bytes()).hexdigest(),
        "images_sha256": images.hexdigest(),
        "count": len(entries),
    }


def split_identity(task: str, split: str, data_root: PathLike | None = None) -> dict[str, Any]:
    """One split's data by content: ``{"list_sha256": <hex>, "images_sha256": <hex>, "count": <int>}``.

    ``list_sha256`` is the SHA-256 of the list file's bytes (paths, labels, order); ``images_sha256``
    is the SHA-256 of ``"<relative path>\\t<size in bytes>\\n"`` over its lines in order (``os.stat``
    only, no image is read); ``count`` is the number of listed images. Neither depends on where the
    root is, so moved data keeps its identity. Equal to ``data_identity(...)["splits"][split]``."""
    name = _split_name(split)
    folder = task_dir(task, data_root)
    if not (folder / SPLITS[name]).is_file():
        info = find_task(task)
        label = info.name if info is not None else folder.name
        raise FileNotFoundError(list_file_missing_message(label, folder, name, info is not None))
    return _split_record(folder, name, {})


def data_identity(task: str, data_root: PathLike | None = None) -> dict[str, Any]:
    """A task's data by content: ``{"splits": {split: split_identity(task, split)}}`` over the list
    files the folder holds (``train``, ``val``, ``trainval``, ``test``), in that order.

    Cheap for large folders: the list files are read and each listed image is ``os.stat``-ed once.
    JSON-able; equal for a copy of the folder anywhere, different when a label, a line or an image's
    size changes. A folder with no list file is a FileNotFoundError."""
    folder = task_dir(task, data_root)
    present = [name for name, file in SPLITS.items() if (folder / file).is_file()]
    if not present:
        raise FileNotFoundError(f"{folder} holds none of the list files {', '.join(SPLITS.values())}.")
    sizes: dict[str, int] = {}
    return {"splits": {name: _split_record(folder, name, sizes) for name in present}}
