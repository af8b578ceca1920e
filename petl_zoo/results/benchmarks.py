"""Benchmark definitions: which tasks a results table has, in which order and groups, under which column
headers, how its two averages are named, and which published rows it ships.

A definition is data, not code: the collecting, averaging, rendering, published rows and plot read
everything benchmark-specific from a :class:`Benchmark` (default: :data:`VTAB_1K`), so another suite is
one more definition in :data:`BENCHMARKS`. Tasks a definition does not name (custom tasks) still get a
column of their own, in the group vtab gives them (``demo`` for ``digits``) or ``other``.
"""

from __future__ import annotations

from dataclasses import dataclass

import vtab

__all__ = [
    "TaskEntry",
    "PublishedReference",
    "Benchmark",
    "HEADERS",
    "VTAB_1K",
    "BENCHMARKS",
    "get_benchmark",
    "canonical_task",
    "task_group",
]


@dataclass(frozen=True)
class TaskEntry:
    """One task of a benchmark: its name, its group and its short column header."""

    name: str
    group: str
    header: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class PublishedReference:
    """The published rows a benchmark ships: the data file (under ``petl_zoo/reference``), the model
    they were made with, and what the published table's notes say about them."""

    file: str
    model: str
    about: str
    legend: str


@dataclass(frozen=True)
class Benchmark:
    """A suite of tasks and its averaging conventions.

    ``Mean of groups`` is the mean of the group means (``group_convention`` names it in published data),
    ``Mean of tasks`` the plain mean over the tasks (``task_convention``); ``task_noun`` names the suite's
    tasks in notes (``the 19 VTAB tasks``) and ``groups_remark`` says where the group mean comes from."""

    name: str
    title: str
    tasks: tuple[TaskEntry, ...]
    groups: tuple[str, ...]
    task_noun: str
    group_convention: str = "mean_of_group_means"
    task_convention: str = ""
    groups_remark: str = ""
    published: PublishedReference | None = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def headers(self) -> dict[str, str]:
        return {t.name: t.header for t in self.tasks}

    @property
    def conventions(self) -> tuple[str, str]:
        """The names of the two averages in published data: (plain mean of tasks, mean of group means)."""
        return (self.task_convention or f"mean_of_{len(self.tasks)}", self.group_convention)

    def group_of(self, task: str) -> str | None:
        return next((t.group for t in self.tasks if t.name == task), None)

    def members(self, group: str) -> list[str]:
        return [t.name for t in self.tasks if t.group == group]


# The short column header of each VTAB-1K task (the names, groups and order are vtab's: vtab.tasks()).
HEADERS: dict[str, str] = {
    "cifar": "CIFAR-100",
    "caltech101": "Caltech101",
    "dtd": "DTD",
    "oxford_flowers102": "Flowers102",
    "oxford_iiit_pet": "Pets",
    "svhn": "SVHN",
    "sun397": "Sun397",
    "patch_camelyon": "Camelyon",
    "eurosat": "EuroSAT",
    "resisc45": "Resisc45",
    "diabetic_retinopathy": "Retinopathy",
    "clevr_count": "Clevr-Count",
    "clevr_dist": "Clevr-Dist",
    "dmlab": "DMLab",
    "kitti": "KITTI-Dist",
    "dsprites_loc": "dSpr-Loc",
    "dsprites_ori": "dSpr-Ori",
    "smallnorb_azi": "sNORB-Azim",
    "smallnorb_ele": "sNORB-Elev",
}

VTAB_1K = Benchmark(
    name="vtab-1k",
    title="VTAB-1K",
    tasks=tuple(TaskEntry(t.name, t.group, HEADERS.get(t.name, t.name), t.aliases) for t in vtab.tasks()),
    groups=tuple(vtab.GROUPS),
    task_noun="VTAB",
    groups_remark="the papers' usual average",
    published=PublishedReference(
        file="published_vtab1k.yaml",
        model="vit_base_patch16_224",
        about="As printed by each source (ViT-B/16, ImageNet-21k).",
        legend=(
            "Selection: last = test accuracy after the final epoch, best = the highest test accuracy over "
            "the run's evaluations (best-of-test), unstated = the source does not say. Weights: orig_in21k "
            "(ViT-B_16.npz) or augreg_in21k. Input norm: imagenet (ImageNet mean/std), inception (0.5/0.5, "
            "our protocol default on these backbones), none ([0, 1], our protocol vtab)."
        ),
    ),
)

#: Every benchmark by name.
BENCHMARKS: dict[str, Benchmark] = {VTAB_1K.name: VTAB_1K}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (case-insensitive); ValueError naming the known ones otherwise."""
    key = name.strip().lower()
    if key not in BENCHMARKS:
        raise ValueError(f"benchmark '{name}' is not one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[key]


def _normalize(name: str) -> str:
    """Lower case, separators as '_' (as vtab matches names: 'CIFAR-100' -> 'cifar_100')."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def canonical_task(name: str, benchmark: Benchmark = VTAB_1K) -> str:
    """The benchmark's name of a task given a name or alias, else vtab's (``vtab.find_task``, e.g. the
    demo task); unknown (custom) names come back unchanged."""
    key = _normalize(name)
    for t in benchmark.tasks:
        if key in (_normalize(n) for n in (t.name, *t.aliases)):
            return t.name
    info = vtab.find_task(name)
    return info.name if info is not None else name


def task_group(task: str, benchmark: Benchmark = VTAB_1K) -> str:
    """A task's group: the benchmark's, else its vtab group (``demo`` for digits), else ``other``."""
    group = benchmark.group_of(task)
    if group is not None:
        return group
    info = vtab.find_task(task)
    return info.group if info is not None else "other"
