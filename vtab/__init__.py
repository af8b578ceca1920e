"""vtab: training-loop-ready DataLoaders for the 19 VTAB-1K tasks in the field's shared folder layout
(and, in the same layout, the FGVC-5 tasks, ``fgvc_tasks()``, and the full-dataset suite of NEAT and
FourierFT, ``suite_tasks()``).

    import vtab
    tf = vtab.build_transform(model)                        # model's input size, interpolation, mean/std
    train = vtab.VtabDataset("dtd", "trainval", tf)          # <root>/dtd/train800val200.txt
    loader = vtab.make_loader(train, 64, shuffle=True, seed=0)

The root is ``--data-root``, else ``$VTAB_ROOT``, else ``./data/vtab-1k``; ``python -m vtab.prepare``
writes the folders (``--task digits`` works offline). See docs/vtab.md.

The torch-side names (datasets, loaders, transforms) are imported on first use, so that
``python -m vtab.prepare`` and the registry do not pay for importing torch and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .identity import data_identity, split_identity
from .layout import (
    DEFAULT_ROOT,
    ENV_VAR,
    LIST_FILES,
    SPLITS,
    available_tasks,
    infer_num_classes,
    load_image,
    num_classes,
    read_list,
    resolve_root,
    split_file,
    task_dir,
)
from .tasks import (
    BENCHMARK_NAMES,
    FGVC_GROUP,
    GROUPS,
    SUITE_EXTRA_GROUP,
    SUITE_GROUP,
    TaskInfo,
    all_tasks,
    benchmark_name,
    benchmark_tasks,
    fgvc_tasks,
    find_task,
    get_task,
    resolve_task,
    suite_tasks,
    task_folder_name,
    tasks,
)

if TYPE_CHECKING:
    from .data import VtabDataset, make_loader, make_loaders, seed_worker
    from .transforms import CROPS, PROTOCOLS, build_transform, input_size, transform_config

_LAZY = {
    "VtabDataset": "data",
    "make_loader": "data",
    "make_loaders": "data",
    "seed_worker": "data",
    "CROPS": "transforms",
    "PROTOCOLS": "transforms",
    "build_transform": "transforms",
    "input_size": "transforms",
    "transform_config": "transforms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vtab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BENCHMARK_NAMES",
    "CROPS",
    "DEFAULT_ROOT",
    "ENV_VAR",
    "FGVC_GROUP",
    "GROUPS",
    "LIST_FILES",
    "PROTOCOLS",
    "SPLITS",
    "SUITE_EXTRA_GROUP",
    "SUITE_GROUP",
    "TaskInfo",
    "VtabDataset",
    "all_tasks",
    "available_tasks",
    "benchmark_name",
    "benchmark_tasks",
    "build_transform",
    "data_identity",
    "fgvc_tasks",
    "find_task",
    "get_task",
    "infer_num_classes",
    "input_size",
    "load_image",
    "make_loader",
    "make_loaders",
    "num_classes",
    "read_list",
    "resolve_root",
    "resolve_task",
    "seed_worker",
    "split_file",
    "split_identity",
    "suite_tasks",
    "task_dir",
    "task_folder_name",
    "tasks",
    "transform_config",
]
