"""The task registry: canonical folder names, class counts, groups and aliases of the three benchmarks'
tasks: the 19 VTAB-1K tasks (``tasks()``) and the offline demo task, the FGVC-5 tasks (``fgvc_tasks()``)
and the full-dataset suite of NEAT and FourierFT (``suite_tasks()``), each kept apart so that the VTAB-1K
task list does not change.

A task's canonical name is its folder under the data root, unique over all benchmarks: VTAB-1K's as the
field spells them (``dtd``), the others prefixed with their benchmark (``fgvc_cub``, ``suite_dtd``),
since the same dataset (DTD, Stanford Cars, Flowers102) is a different task, with different splits, in
each. Inside a benchmark a task also answers to its short name and aliases (``--benchmark suite --task
dtd``); without a benchmark a name means VTAB-1K's task where VTAB-1K has one (``dtd``), else the one
benchmark's that has it (``cub``, ``cifar10``), and a name two other benchmarks share (``cars``) asks for
``--benchmark`` (:func:`resolve_task`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

GROUPS = ("natural", "specialized", "structured")
FGVC_GROUP = "fgvc"
SUITE_GROUP = "suite"
#: The suite's two datasets outside FourierFT's and NEAT's tables (Flowers102, Food-101): their group is
#: not the suite's, so the suite's mean stays over the eight tasks the published rows cover.
SUITE_EXTRA_GROUP = "suite_extra"
DEMO_GROUP = "demo"

#: The benchmarks the registry knows, and the names each answers to (``--benchmark``).
BENCHMARK_NAMES: tuple[str, ...] = ("vtab", "fgvc", "suite")
_BENCHMARK_ALIASES = {"vtab": "vtab", "vtab_1k": "vtab", "vtab1k": "vtab", "fgvc": "fgvc", "fgvc_5": "fgvc"}
_BENCHMARK_ALIASES |= {"fgvc5": "fgvc", "suite": "suite", "full": "suite"}


@dataclass(frozen=True)
class TaskInfo:
    """One task: its canonical folder name, class count, group and accepted aliases; ``benchmark`` is the
    benchmark it belongs to and ``short`` its name inside it (the canonical name less the benchmark's
    prefix; VTAB-1K's tasks have none)."""

    name: str
    num_classes: int
    group: str
    aliases: tuple[str, ...] = ()
    benchmark: str = "vtab"

    @property
    def short(self) -> str:
        prefix = f"{self.benchmark}_"
        return self.name[len(prefix) :] if self.name.startswith(prefix) else self.name


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
_EXTRA: tuple[TaskInfo, ...] = (TaskInfo("digits", 10, DEMO_GROUP, ("sklearn_digits",)),)

# FGVC-5 (VPT's fine-grained benchmark), in VPT's order: prepared from the official files by
# ``vtab.fgvc``; not part of ``tasks()`` (the VTAB-1K results table and sweep iterate that).
_FGVC: tuple[TaskInfo, ...] = (
    TaskInfo("fgvc_cub", 200, FGVC_GROUP, ("cub", "cub200", "cub_200", "cub_200_2011", "cub2011"), "fgvc"),
    TaskInfo("fgvc_nabirds", 555, FGVC_GROUP, ("nabirds", "na_birds"), "fgvc"),
    TaskInfo(
        "fgvc_flowers", 102, FGVC_GROUP, ("flowers", "oxford_flowers", "oxfordflower", "flowers102"), "fgvc"
    ),
    TaskInfo("fgvc_dogs", 120, FGVC_GROUP, ("dogs", "stanford_dogs", "stanforddogs"), "fgvc"),
    TaskInfo("fgvc_cars", 196, FGVC_GROUP, ("cars", "stanford_cars", "stanfordcars"), "fgvc"),
)

# The full-dataset suite of NEAT and FourierFT (their ``--dataset-name`` values are aliases), in the
# order of FourierFT's table, then the two further datasets their argument lists name; prepared by
# ``vtab.suite`` from the Hugging Face datasets the authors load. ``suite_digits`` is the offline demo
# task prepared the suite's way (a seeded 90/10 train/val split, the whole test split).
_SUITE: tuple[TaskInfo, ...] = (
    TaskInfo("suite_pets", 37, SUITE_GROUP, ("pets", "oxford_iiit_pet", "oxford_pets"), "suite"),
    TaskInfo("suite_cars", 196, SUITE_GROUP, ("cars", "stanford_cars", "stanfordcars"), "suite"),
    TaskInfo("suite_cifar10", 10, SUITE_GROUP, ("cifar10", "cifar_10"), "suite"),
    TaskInfo("suite_dtd", 47, SUITE_GROUP, ("dtd", "textures"), "suite"),
    TaskInfo("suite_eurosat", 10, SUITE_GROUP, ("eurosat", "eurosat_rgb"), "suite"),
    TaskInfo("suite_aircraft", 100, SUITE_GROUP, ("aircraft", "fgvc", "fgvc_aircraft"), "suite"),
    TaskInfo("suite_resisc45", 45, SUITE_GROUP, ("resisc45", "resisc"), "suite"),
    TaskInfo("suite_cifar100", 100, SUITE_GROUP, ("cifar100", "cifar_100"), "suite"),
    TaskInfo(
        "suite_flowers102", 102, SUITE_EXTRA_GROUP, ("flowers102", "flowers", "oxford_flowers"), "suite"
    ),
    TaskInfo("suite_food101", 101, SUITE_EXTRA_GROUP, ("food101", "food", "food_101"), "suite"),
)
_SUITE_EXTRA: tuple[TaskInfo, ...] = (TaskInfo("suite_digits", 10, DEMO_GROUP, ("digits",), "suite"),)

_BY_BENCHMARK: dict[str, tuple[TaskInfo, ...]] = {
    "vtab": _VTAB + _EXTRA,
    "fgvc": _FGVC,
    "suite": _SUITE + _SUITE_EXTRA,
}
_ALL: tuple[TaskInfo, ...] = _VTAB + _EXTRA + _FGVC + _SUITE + _SUITE_EXTRA


def normalize_name(name: str) -> str:
    """Lower-case a task name and spell separators as '_' ('CIFAR-100' -> 'cifar_100')."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _names(info: TaskInfo) -> set[str]:
    """What a task answers to inside its benchmark: its canonical and short names and its aliases."""
    return {info.name, info.short, *info.aliases}


_CANONICAL: dict[str, TaskInfo] = {info.name: info for info in _ALL}
_SCOPED: dict[str, dict[str, TaskInfo]] = {
    bench: {key: info for info in infos for key in _names(info)} for bench, infos in _BY_BENCHMARK.items()
}


def benchmark_name(name: str) -> str:
    """The registry's name of a benchmark (``vtab``, ``fgvc``, ``suite``) given it or an alias
    (``VTAB-1K``, ``FGVC-5``); ValueError naming the valid ones otherwise."""
    key = normalize_name(str(name))
    if key not in _BENCHMARK_ALIASES:
        raise ValueError(f"Unknown benchmark {name!r}; valid: {', '.join(BENCHMARK_NAMES)}.")
    return _BENCHMARK_ALIASES[key]


def tasks(include_extra: bool = False) -> list[TaskInfo]:
    """The 19 VTAB-1K tasks in canonical order (natural, specialized, structured); extras such as
    the offline demo task ``digits`` are appended when ``include_extra`` is true."""
    return list(_VTAB + _EXTRA) if include_extra else list(_VTAB)


def fgvc_tasks() -> list[TaskInfo]:
    """The five FGVC-5 tasks (group ``fgvc``) in VPT's order; not part of ``tasks()``."""
    return list(_FGVC)


def suite_tasks(include_extra: bool = False) -> list[TaskInfo]:
    """The ten tasks of the full-dataset suite (group ``suite``); ``suite_digits`` appended when
    ``include_extra`` is true."""
    return list(_SUITE + _SUITE_EXTRA) if include_extra else list(_SUITE)


def benchmark_tasks(benchmark: str, include_extra: bool = False) -> list[TaskInfo]:
    """The tasks of a benchmark (``vtab``, ``fgvc``, ``suite`` or an alias), extras on request."""
    bench = benchmark_name(benchmark)
    if include_extra:
        return list(_BY_BENCHMARK[bench])
    return [t for t in _BY_BENCHMARK[bench] if t.group != DEMO_GROUP]


def all_tasks() -> list[TaskInfo]:
    """Every registry task: VTAB-1K's 19 and the demo task, then FGVC-5's, then the suite's."""
    return list(_ALL)


def _candidates(name: str) -> list[TaskInfo]:
    """The tasks a benchmark-less name can mean: its canonical task, else VTAB-1K's (and the demo
    task), else every other benchmark's task answering to it."""
    key = normalize_name(name)
    if key in _CANONICAL:
        return [_CANONICAL[key]]
    if key in _SCOPED["vtab"]:
        return [_SCOPED["vtab"][key]]
    if key in _BENCHMARK_ALIASES:  # the suite's aircraft answers to "fgvc" only inside the suite
        return []
    return [_SCOPED[b][key] for b in BENCHMARK_NAMES if b != "vtab" and key in _SCOPED[b]]


def find_task(name: str, benchmark: str | None = None) -> TaskInfo | None:
    """The registry entry for a canonical name or alias (case-insensitive), inside ``benchmark`` when
    given; None for an unknown name or one that two benchmarks share (see :func:`resolve_task`)."""
    if benchmark is not None:
        key = normalize_name(name)
        scoped = _SCOPED[benchmark_name(benchmark)]
        return scoped.get(key) or (
            _CANONICAL[key] if key in _CANONICAL and _CANONICAL[key] in scoped.values() else None
        )
    found = _candidates(name)
    return found[0] if len(found) == 1 else None


def suggest(name: str, candidates: list[str] | None = None) -> list[str]:
    """Up to three names close to ``name`` (difflib), from the registry names and aliases by default."""
    pool = sorted({k for scoped in _SCOPED.values() for k in scoped}) if candidates is None else candidates
    return difflib.get_close_matches(normalize_name(name), pool, n=3, cutoff=0.5)


def ambiguity_message(name: str) -> str | None:
    """For a name several benchmarks share (``cars``): the line that asks for ``--benchmark``; else None."""
    found = _candidates(name)
    if len(found) < 2:
        return None
    options = ", ".join(f"--benchmark {t.benchmark} ({t.name})" for t in found)
    return f"Task {name!r} is in several benchmarks; pass {options}, or the canonical name."


def unknown_task_message(
    name: str, extra_candidates: list[str] | None = None, benchmark: str | None = None
) -> str:
    """The message for an unknown (or ambiguous) task name: close matches and the valid names."""
    if benchmark is None and (ambiguous := ambiguity_message(name)):
        return ambiguous
    pool = sorted(_SCOPED[benchmark_name(benchmark)]) if benchmark is not None else None
    close = suggest(
        name, (pool or sorted({k for s in _SCOPED.values() for k in s})) + list(extra_candidates or [])
    )
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    infos = benchmark_tasks(benchmark, include_extra=True) if benchmark is not None else all_tasks()
    where = f" in benchmark {benchmark_name(benchmark)}" if benchmark is not None else ""
    valid = ", ".join(t.name for t in infos)
    return f"Unknown task {name!r}{where}.{hint} Known tasks: {valid}."


def resolve_task(name: str, benchmark: str | None = None) -> TaskInfo:
    """The task for a name (canonical, short or alias) in ``benchmark`` (or inferred as the module
    docstring says); ValueError naming the closest names, or the benchmarks to choose between."""
    if not isinstance(name, str):
        raise ValueError(f"Task name must be a string, got {type(name).__name__} {name!r}.")
    info = find_task(name, benchmark)
    if info is None:
        raise ValueError(unknown_task_message(name, benchmark=benchmark))
    return info


def get_task(name: str) -> TaskInfo:
    """The task for a canonical name or alias (no benchmark given: see :func:`resolve_task`)."""
    return resolve_task(name)


def task_folder_name(name: str, benchmark: str | None = None) -> str:
    """The folder name a task's command line means: the canonical name of a registry task (inside
    ``benchmark`` when given), else ``name`` unchanged (a custom task folder, VTAB-1K-style). A name two
    benchmarks share, or one the given FGVC or suite benchmark does not have, is a ValueError."""
    info = find_task(name, benchmark)
    if info is not None:
        return info.name
    if benchmark is None and ambiguity_message(name):
        raise ValueError(ambiguity_message(name))
    if benchmark is not None and benchmark_name(benchmark) != "vtab":
        raise ValueError(unknown_task_message(name, benchmark=benchmark))
    return name
