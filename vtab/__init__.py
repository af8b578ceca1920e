"""vtab: training-loop-ready DataLoaders for the 19 VTAB-1K tasks in the field's shared folder layout.

    import vtab
    tf = vtab.build_transform(model)                        # model's input size, interpolation, mean/std
    train = vtab.VtabDataset("dtd", "trainval", tf)          # <root>/dtd/train800val200.txt
    loader = vtab.make_loader(train, 64, shuffle=True, seed=0)

The root is ``--data-root``, else ``$VTAB_ROOT``, else ``./data/vtab-1k``; ``python -m vtab.prepare``
writes the folders (``--task digits`` works offline). See docs/vtab.md.
"""

from .data import (
    DEFAULT_ROOT,
    ENV_VAR,
    LIST_FILES,
    SPLITS,
    VtabDataset,
    available_tasks,
    infer_num_classes,
    load_image,
    make_loader,
    make_loaders,
    num_classes,
    read_list,
    resolve_root,
    seed_worker,
    split_file,
    task_dir,
)
from .tasks import GROUPS, TaskInfo, find_task, get_task, tasks
from .transforms import PROTOCOLS, build_transform, input_size, transform_config

__all__ = [
    "DEFAULT_ROOT",
    "ENV_VAR",
    "GROUPS",
    "LIST_FILES",
    "PROTOCOLS",
    "SPLITS",
    "TaskInfo",
    "VtabDataset",
    "available_tasks",
    "build_transform",
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
    "seed_worker",
    "split_file",
    "task_dir",
    "tasks",
    "transform_config",
]
