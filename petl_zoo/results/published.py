"""Published rows shipped with the package, with their sources (VTAB-1K, FGVC-5, the full-dataset suite).

A benchmark names its data file (:attr:`Benchmark.published`); VTAB-1K's,
``petl_zoo/reference/published_vtab1k.yaml``, holds, per row, the 19 per-task accuracies as printed, the
printed average and the convention it follows, the source (repository file and commit), the selection
rule of the source's protocol (last epoch or best-of-test), the backbone weights and the input
normalisation (format: docs/table.md). FGVC-5's (``published_fgvc.yaml``) and the suite's
(``published_suite.yaml``) have the same format; their averages are plain means of their tasks
(``mean_of_5``, ``mean_of_8``), and a suite row names its backbone (``model``: ViT-B or ViT-L). A source
is a repository file at a commit, or a web page (``url`` and its ``version``, e.g. an arXiv version),
optionally with the repository copy the numbers were read from. :func:`load_published` reads and
validates a file; :func:`recompute` gives both averages from the per-task values and :func:`check_row`
compares them with what the source prints, within the source's rounding.

The two averaging conventions: ``mean_of_19`` is the plain mean of the 19 tasks; ``mean_of_group_means``
is the mean of the Natural, Specialized and Structured means (what most papers print). The second weighs
each of the 4 Specialized tasks more than each of the 8 Structured ones, so the two differ by 2.1 to 4.7
points on the same row.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .benchmarks import VTAB_1K, Benchmark

__all__ = [
    "CONVENTIONS",
    "SELECTIONS",
    "MODELS",
    "WEIGHTS",
    "INPUT_NORMS",
    "Source",
    "PublishedRow",
    "load_published",
    "recompute",
    "tolerance",
    "check_row",
]

log = logging.getLogger(__name__)

#: The names of VTAB-1K's two averages in its published data (:attr:`Benchmark.conventions`).
CONVENTIONS = VTAB_1K.conventions
#: last: the final epoch's test accuracy; best: the highest test accuracy over the run (best-of-test);
#: best_val: the test accuracy of the epoch with the highest validation accuracy; unstated: not said.
SELECTIONS = ("last", "best", "best_val", "unstated")
WEIGHTS = ("orig_in21k", "augreg_in21k")
INPUT_NORMS = ("imagenet", "inception", "none")
#: The backbones published rows may name (timm names; the weights are the row's ``weights``).
MODELS = ("vit_base_patch16_224", "vit_large_patch16_224")
_SOURCE_KEYS = ("title", "where", "average", "decimals", "average_decimals")
#: Where a source is: a repository file at a commit, or a web page and its version (or both: the page,
#: read in a repository's copy of it).
_REPO_KEYS = ("repository", "file", "commit")
_URL_KEYS = ("url", "version")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Source:
    """Where a row was read, and how that source prints numbers: a repository file at a commit, or a web
    page (``url``, ``version``: e.g. an arXiv paper's version), or a page read in a repository's copy of
    it (both)."""

    key: str
    title: str
    where: str
    average: str
    decimals: int
    average_decimals: int
    repository: str = ""
    file: str = ""
    commit: str = ""
    url: str = ""
    version: str = ""
    params: str = ""

    @property
    def cite(self) -> str:
        """``repo file @ commit, where``; ``url (version), where``; a page read in a repository copy:
        ``url (version), where; read in repo file @ commit``."""
        repo = f"{self.repository} {self.file} @ {self.commit[:7]}" if self.repository else ""
        if not self.url:
            return f"{repo}, {self.where}"
        page = f"{self.url} ({self.version}), {self.where}"
        return f"{page}; read in {repo}" if repo else page


@dataclass(frozen=True)
class PublishedRow:
    """One published row: per-task accuracies (percent) as printed, with its source and protocol."""

    name: str
    method: str | None
    source: Source
    model: str
    selection: str
    weights: str
    input_norm: str
    average: float
    accuracy: dict[str, float]
    params_m: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seeds: int | None = None
    selection_detail: str = ""
    original: str = ""
    note: str = ""
    group_means: dict[str, float] = field(default_factory=dict)
    discrepancy: str = ""

    @property
    def label(self) -> str:
        """``LoRA [fact-aaai23; best; orig_in21k; imagenet]``: name, source, selection, weights, input norm
        (and the model where it is not ViT-B/16: ``LoRA [fourierft-arxiv; vit_large_patch16_224; ...]``)."""
        model = f"{self.model}; " if self.model != MODELS[0] else ""
        return f"{self.name} [{self.source.key}; {model}{self.selection}; {self.weights}; {self.input_norm}]"


def _data_path(benchmark: Benchmark = VTAB_1K) -> Path:
    if benchmark.published is None:
        raise ValueError(f"{benchmark.title} ships no published rows")
    return Path(str(resources.files("petl_zoo") / "reference" / benchmark.published.file))


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {what}")


def _source(key: str, raw: Any, where: str, conventions: tuple[str, str]) -> Source:
    _need(isinstance(raw, dict), where, "a source is a mapping")
    missing = [k for k in _SOURCE_KEYS if k not in raw]
    _need(not missing, where, f"source '{key}' lacks {', '.join(missing)}")
    _need(raw["average"] in conventions, where, f"average '{raw['average']}' is not one of {conventions}")
    known = set(_SOURCE_KEYS) | set(_REPO_KEYS) | set(_URL_KEYS) | {"params"}
    _need(set(raw) <= known, where, f"unknown source keys {sorted(set(raw) - known)}")
    has_repo, has_url = any(k in raw for k in _REPO_KEYS), any(k in raw for k in _URL_KEYS)
    _need(has_repo or has_url, where, f"source '{key}' needs repository, file, commit or url, version")
    if has_repo:
        lacking = [k for k in _REPO_KEYS if not raw.get(k)]
        _need(not lacking, where, f"source '{key}' names a repository but lacks {', '.join(lacking)}")
        _need(bool(_COMMIT.fullmatch(str(raw["commit"]))), where, f"commit '{raw['commit']}' is not 40 hex")
    if has_url:
        lacking = [k for k in _URL_KEYS if not raw.get(k)]
        _need(not lacking, where, f"source '{key}' names a url but lacks {', '.join(lacking)}")
        _need(str(raw["url"]).startswith("https://"), where, f"url '{raw['url']}' is not an https:// address")
    return Source(key=key, **{k: raw[k] for k in raw})


def _choice(raw: dict[str, Any], key: str, valid: tuple[str, ...], where: str) -> str:
    value = raw.get(key)
    _need(value in valid, where, f"{key} '{value}' is not one of {', '.join(valid)}")
    return str(value)


def _accuracy(raw: Any, where: str, names: list[str]) -> dict[str, float]:
    _need(isinstance(raw, dict), where, "accuracy is a mapping task -> percent")
    _need(
        set(raw) == set(names), where, f"accuracy must name the {len(names)} tasks exactly; got {sorted(raw)}"
    )
    bad = [t for t in names if not isinstance(raw[t], (int, float)) or not 0 <= raw[t] <= 100]
    _need(not bad, where, f"accuracies of {bad} are not percentages in [0, 100]")
    return {t: float(raw[t]) for t in names}


_ROW_KEYS = {
    "name",
    "method",
    "options",
    "source",
    "model",
    "original",
    "note",
    "selection",
    "selection_detail",
    "seeds",
    "weights",
    "input_norm",
    "params_m",
    "average",
    "group_means",
    "discrepancy",
    "accuracy",
}


def _row(raw: Any, sources: dict[str, Source], index: int, benchmark: Benchmark) -> PublishedRow:
    where = f"published row {index}"
    _need(isinstance(raw, dict) and "name" in raw, where, "a row is a mapping with a name")
    where = f"published row {index} ({raw['name']})"
    _need(set(raw) <= _ROW_KEYS, where, f"unknown keys {sorted(set(raw) - _ROW_KEYS)}")
    _need(
        raw.get("source") in sources, where, f"source '{raw.get('source')}' is not one of {sorted(sources)}"
    )
    _need(isinstance(raw.get("average"), (int, float)), where, "average (as printed) is a number")
    groups = raw.get("group_means") or {}
    _need(set(groups) <= set(benchmark.groups), where, f"group_means keys must be among {benchmark.groups}")
    default_model = benchmark.published.model if benchmark.published else None
    model = raw.get("model", default_model)
    _need(model in MODELS, where, f"model '{model}' is not one of {', '.join(MODELS)}")
    return PublishedRow(
        name=str(raw["name"]),
        method=raw.get("method"),
        source=sources[raw["source"]],
        model=str(model),
        selection=_choice(raw, "selection", SELECTIONS, where),
        weights=_choice(raw, "weights", WEIGHTS, where),
        input_norm=_choice(raw, "input_norm", INPUT_NORMS, where),
        average=float(raw["average"]),
        accuracy=_accuracy(raw.get("accuracy"), where, benchmark.task_names),
        params_m=None if raw.get("params_m") is None else float(raw["params_m"]),
        options=dict(raw.get("options") or {}),
        seeds=raw.get("seeds"),
        selection_detail=str(raw.get("selection_detail", "")),
        original=str(raw.get("original", "")),
        note=str(raw.get("note", "")),
        group_means={g: float(v) for g, v in groups.items()},
        discrepancy=str(raw.get("discrepancy", "")),
    )


def load_published(path: str | Path | None = None, benchmark: Benchmark = VTAB_1K) -> list[PublishedRow]:
    """The published rows of ``benchmark`` (default: the file it ships in the package), validated; a
    malformed file is a ValueError naming the row and the bad field."""
    path = Path(path) if path is not None else _data_path(benchmark)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the published rows {path}: {e}") from e
    _need(isinstance(data, dict) and data.get("version") == 1, str(path), "expected 'version: 1'")
    raw_sources = (data.get("sources") or {}).items()
    sources = {k: _source(k, v, f"{path} source {k}", benchmark.conventions) for k, v in raw_sources}
    rows = [_row(raw, sources, i, benchmark) for i, raw in enumerate(data.get("rows") or [])]
    log.debug("read %d published rows from %s", len(rows), path)
    return rows


def recompute(accuracy: dict[str, float], benchmark: Benchmark = VTAB_1K) -> dict[str, float]:
    """The group means and both averages of the benchmark's per-task accuracies, the averages under
    their names in published data (VTAB-1K: ``mean_of_group_means`` and ``mean_of_19``)."""
    out: dict[str, float] = {}
    for g in benchmark.groups:
        members = benchmark.members(g)
        out[g] = sum(accuracy[t] for t in members) / len(members)
    of_tasks, of_groups = benchmark.conventions
    out[of_groups] = sum(out[g] for g in benchmark.groups) / len(benchmark.groups)
    out[of_tasks] = sum(accuracy[t] for t in benchmark.task_names) / len(benchmark.tasks)
    return out


def tolerance(source: Source, printed_decimals: int) -> float:
    """How far a mean recomputed from rounded per-task values may be from a printed one: half a unit of
    the per-task rounding (the most the mean of rounded values can move) plus half a unit of the printed
    number's rounding (a source that truncates instead of rounding stays within this too)."""
    return 0.5 * 10.0**-source.decimals + 0.5 * 10.0**-printed_decimals + 1e-9


def check_row(row: PublishedRow, convention: str | None = None, benchmark: Benchmark = VTAB_1K) -> list[str]:
    """What does not recompute: the printed average under ``convention`` (default: the source's) and any
    printed group mean, each compared with the value recomputed from the per-task accuracies."""
    convention = convention or row.source.average
    if convention not in benchmark.conventions:
        raise ValueError(f"convention '{convention}' is not one of {benchmark.conventions}")
    means = recompute(row.accuracy, benchmark)
    problems = []
    tol = tolerance(row.source, row.source.average_decimals)
    if not math.isclose(means[convention], row.average, abs_tol=tol):
        problems.append(
            f"{row.label}: printed average {row.average} but {convention} of its tasks is "
            f"{means[convention]:.3f} (tolerance {tol:.3f})"
        )
    for g, printed in row.group_means.items():
        if not math.isclose(means[g], printed, abs_tol=tol):
            problems.append(f"{row.label}: printed {g} mean {printed} but its tasks give {means[g]:.3f}")
    return problems
