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
    "benchmark_of",
    "FGVC_5",
    "SUITE",
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

#: FGVC-5's column headers (VPT's Table names).
FGVC_HEADERS: dict[str, str] = {
    "fgvc_cub": "CUB-200-2011",
    "fgvc_nabirds": "NABirds",
    "fgvc_flowers": "Oxford Flowers",
    "fgvc_dogs": "Stanford Dogs",
    "fgvc_cars": "Stanford Cars",
}

FGVC_5 = Benchmark(
    name="fgvc",
    title="FGVC-5",
    tasks=tuple(TaskEntry(t.name, t.group, FGVC_HEADERS[t.name], t.aliases) for t in vtab.fgvc_tasks()),
    groups=(vtab.FGVC_GROUP,),
    task_noun="FGVC",
    groups_remark="one group: the same as the plain mean",
    published=PublishedReference(
        file="published_fgvc.yaml",
        model="vit_base_patch16_224",
        about="As printed by V-PETL Bench (ViT-B/16, ImageNet-21k; one group, so both means are the plain mean).",
        legend=(
            "Selection: best = the highest test accuracy over the run's test evaluations (best-of-test, what "
            "V-PETL Bench's training scripts keep), unstated = no script and no statement for that row. "
            "Weights: orig_in21k (ViT-B_16.npz). Input norm: imagenet (ImageNet mean/std)."
        ),
    ),
)

#: The suite's column headers (FourierFT's table names).
SUITE_HEADERS: dict[str, str] = {
    "suite_pets": "OxfordPets",
    "suite_cars": "StanfordCars",
    "suite_cifar10": "CIFAR10",
    "suite_dtd": "DTD",
    "suite_eurosat": "EuroSAT",
    "suite_aircraft": "FGVC",
    "suite_resisc45": "RESISC45",
    "suite_cifar100": "CIFAR100",
}

#: The full-dataset suite: the eight datasets of FourierFT's (and NEAT's) image-classification table.
#: Flowers102 and Food-101, which the authors' code can also load, are tasks of the registry (prepared
#: and trained the same way) but not of this definition: their columns come after the eight, outside the
#: suite's group, so a row's suite mean is comparable with the published ones.
SUITE = Benchmark(
    name="suite",
    title="Full-dataset suite (NEAT / FourierFT)",
    tasks=tuple(
        TaskEntry(t.name, t.group, SUITE_HEADERS[t.name], t.aliases)
        for t in vtab.suite_tasks()
        if t.group == vtab.SUITE_GROUP
    ),
    groups=(vtab.SUITE_GROUP,),
    task_noun="suite",
    groups_remark="one group: the same as the plain mean",
    published=PublishedReference(
        file="published_suite.yaml",
        model="vit_base_patch16_224",
        about=(
            "As printed by FourierFT (ViT-B/16 and ViT-L/16, ImageNet-21k, mean of 5 seeds; one group, so both "
            "means are the plain mean)."
        ),
        legend=(
            "Model: vit_base_patch16_224 or vit_large_patch16_224. Selection: best_val = the test accuracy of "
            "the epoch with the highest validation accuracy (validation held out of the training data). "
            "Weights: orig_in21k (google/vit-*-patch16-224-in21k). Input norm: inception (0.5/0.5)."
        ),
    ),
)

#: Every benchmark by its registry name (``vtab.BENCHMARK_NAMES``).
BENCHMARKS: dict[str, Benchmark] = {"vtab": VTAB_1K, "fgvc": FGVC_5, "suite": SUITE}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` or an alias of it (``vtab``, ``VTAB-1K``, ``fgvc``, ``suite``, ...);
    ValueError naming the known ones otherwise."""
    return BENCHMARKS[vtab.benchmark_name(name)]


def benchmark_of(task: str) -> Benchmark:
    """The benchmark a task's results belong to: its registry benchmark (``fgvc_cub``: FGVC-5), VTAB-1K
    for VTAB-1K's tasks, the demo task and custom tasks."""
    info = vtab.find_task(task)
    return BENCHMARKS[info.benchmark] if info is not None else VTAB_1K


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
