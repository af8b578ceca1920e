"""The task registry: canonical folder names, class counts, groups and aliases of the 19 VTAB-1K
tasks (``tasks()``), the offline demo task, and the FGVC-5 tasks (``fgvc_tasks()``, kept apart so the
VTAB-1K benchmark's task list does not change)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

GROUPS = ("natural", "specialized", "structured")
FGVC_GROUP = "fgvc"


@dataclass(frozen=True)
class TaskInfo:
    """One task: its canonical folder name, class count, group and accepted aliases."""

    name: str
    num_classes: int
    group: str
    aliases: tuple[str, ...] = ()


_VTAB: tuple[TaskInfo, ...] = (
    # Natural
    TaskInfo("cifar", 100, "natural", ("cifar100", "cifar_100", "cifar-100")),
    TaskInfo("caltech101", 102, "natural", ("caltech", "caltech_101")),
    TaskInfo("dtd", 47, "natural", ("textures",)),
    TaskInfo("oxford_flowers102", 102, "natural", ("flowers102", "flowers", "oxford_flowers", "flowers_102")),
    TaskInfo(
        "oxford_iiit_pet", 37, "natural", ("pets", "oxford_pet", "oxford_pets", "pet", "oxford_iiit_pets")
    ),
    TaskInfo("svhn", 10, "natural", ("svhn_cropped",)),
    TaskInfo("sun397", 397, "natural", ("sun",)),
    # Specialized
    TaskInfo("patch_camelyon", 2, "specialized", ("camelyon", "pcam", "patchcamelyon")),
    TaskInfo("eurosat", 10, "specialized", ("eurosat_rgb",)),
    TaskInfo("resisc45", 45, "specialized", ("resisc",)),
    TaskInfo("diabetic_retinopathy", 5, "specialized", ("retinopathy", "diabetic_retinopathy_detection")),
    # Structured
    TaskInfo("clevr_count", 8, "structured", ("clevr_count_all", "clevr_counting")),
    TaskInfo("clevr_dist", 6, "structured", ("clevr_distance", "clevr_closest_object_distance")),
    TaskInfo("dmlab", 6, "structured", ()),
    TaskInfo("kitti", 4, "structured", ("kitti_dist", "kitti_distance", "kitti_closest_vehicle_distance")),
    TaskInfo("dsprites_loc", 16, "structured", ("dsprites_location", "dsprites_x", "dsprites_xpos")),
    TaskInfo("dsprites_ori", 16, "structured", ("dsprites_orientation", "dsprites_orient")),
    TaskInfo("smallnorb_azi", 18, "structured", ("smallnorb_azimuth", "norb_azi")),
    TaskInfo("smallnorb_ele", 9, "structured", ("smallnorb_elevation", "norb_ele")),
)

# Extra tasks known to the registry but not part of VTAB-1K (listed with include_extra=True).
_EXTRA: tuple[TaskInfo, ...] = (TaskInfo("digits", 10, "demo", ("sklearn_digits",)),)

# FGVC-5 (VPT's fine-grained benchmark): prepared from the official files by ``vtab.fgvc``; not part
# of ``tasks()`` (the VTAB-1K results table and sweep iterate that), listed by ``fgvc_tasks()``.
_FGVC: tuple[TaskInfo, ...] = (
    TaskInfo("cub", 200, FGVC_GROUP, ("cub200", "cub_200", "cub_200_2011", "cub2011", "cub_2011")),
)

_LOOKUP: dict[str, TaskInfo] = {}
for _info in _VTAB + _EXTRA + _FGVC:
    for _key in (_info.name, *_info.aliases):
        _LOOKUP[_key] = _info


def normalize_name(name: str) -> str:
    """Lower-case a task name and spell separators as '_' ('CIFAR-100' -> 'cifar_100')."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def tasks(include_extra: bool = False) -> list[TaskInfo]:
    """The 19 VTAB-1K tasks in canonical order (natural, specialized, structured); extras such as
    the offline demo task ``digits`` are appended when ``include_extra`` is true."""
    return list(_VTAB + _EXTRA) if include_extra else list(_VTAB)


def fgvc_tasks() -> list[TaskInfo]:
    """The FGVC-5 tasks prepared so far (group ``fgvc``), in VPT's order; not part of ``tasks()``."""
    return list(_FGVC)


def all_tasks() -> list[TaskInfo]:
    """Every registry task: the 19 VTAB-1K tasks, the extras, then the FGVC-5 tasks."""
    return list(_VTAB + _EXTRA + _FGVC)


def find_task(name: str) -> TaskInfo | None:
    """The registry entry for a canonical name or alias (case-insensitive), or None."""
    return _LOOKUP.get(normalize_name(name))


def suggest(name: str, candidates: list[str] | None = None) -> list[str]:
    """Up to three names close to ``name`` (difflib), from the registry names and aliases by default."""
    pool = list(_LOOKUP) if candidates is None else candidates
    return difflib.get_close_matches(normalize_name(name), pool, n=3, cutoff=0.5)


def unknown_task_message(name: str, extra_candidates: list[str] | None = None) -> str:
    """The message for an unknown task name: close matches and the valid names."""
    close = suggest(name, list(_LOOKUP) + list(extra_candidates or []))
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    valid = ", ".join(t.name for t in all_tasks())
    return f"Unknown task {name!r}.{hint} Known tasks: {valid}."


def get_task(name: str) -> TaskInfo:
    """The task for a canonical name or alias; ValueError with the closest names otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"Task name must be a string, got {type(name).__name__} {name!r}.")
    info = find_task(name)
    if info is None:
        raise ValueError(unknown_task_message(name))
    return info
