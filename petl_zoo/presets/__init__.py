"""Per-task presets: the option and recipe values a paper publishes for each VTAB-1K task.

A method ships its paper's table as ``petl_zoo/presets/<method>.yaml`` (preset ``paper``) and variants as
``<method>_<variant>.yaml`` (preset ``paper_<variant>``), every value with its source in a comment. The
files hold ``method``, ``protocol`` (the paper's input normalisation), ``recipe`` and ``options_common``
(values for every task), ``tasks: {task: {options: ..., recipe: ...}}``, and documentation-only keys
(``variant``, ``input_norm``, ``recipe_extra``: what the paper did that petl_zoo's recipe has no key
for). Values the authors do not publish are left out, never guessed: a task without an entry gets the
common values only.

``tools/train.py --preset paper`` and ``tools/sweep.py --preset paper`` apply them: dataclass defaults <
preset < ``--opt``; the shared recipe < the method's recipe < preset < flags. ``config.json`` records the
preset, and its name is part of the run's fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PRESET_DIR", "Preset", "available_presets", "load_preset"]

PRESET_DIR = Path(__file__).resolve().parent
_DOC_KEYS = ("variant", "input_norm", "recipe_extra", "notes")
_KEYS = ("method", "protocol", "recipe", "options_common", "tasks", *_DOC_KEYS)


@dataclass(frozen=True)
class Preset:
    """One preset file, checked: the method's options and recipe keys exist and hold valid values."""

    method: str
    name: str
    file: str
    protocol: str | None
    recipe: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def for_task(self, task: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(method options, recipe values)`` of ``task``: the common values, then the task's own."""
        entry = self.tasks.get(task, {})
        recipe = {**self.recipe, **entry.get("recipe", {})}
        if self.protocol is not None:
            recipe.setdefault("protocol", self.protocol)
        return {**self.options, **entry.get("options", {})}, recipe

    @property
    def label(self) -> str:
        """``method/name``, as config.json and the tables record it."""
        return f"{self.method}/{self.name}"


def _file_for(method: str, name: str) -> Path:
    if name == "paper":
        return PRESET_DIR / f"{method}.yaml"
    if name.startswith("paper_"):
        return PRESET_DIR / f"{method}_{name[len('paper_') :]}.yaml"
    return PRESET_DIR / f"{method}_{name}.yaml"


def available_presets(method: str) -> list[str]:
    """Preset names shipped for ``method`` (``paper``, ``paper_<variant>`` ...)."""
    names = []
    for path in sorted(PRESET_DIR.glob(f"{method}*.yaml")):
        stem = path.stem
        if stem == method:
            names.append("paper")
        elif stem.startswith(f"{method}_"):
            names.append(f"paper_{stem[len(method) + 1 :]}")
    return names


def load_preset(method: str, name: str = "paper") -> Preset:
    """The preset ``name`` of ``method``, validated; a ValueError names what is wrong or what exists."""
    path = _file_for(method, name)
    if not path.is_file():
        known = ", ".join(available_presets(method)) or "none"
        raise ValueError(f"no preset {name!r} for method '{method}'; presets for {method}: {known}")
    return _load(method, _canonical_name(method, path), str(path))


def _canonical_name(method: str, path: Path) -> str:
    """The one name of a preset file (``paper``, ``paper_<variant>``), whatever alias found it, so
    that ``--preset tt`` and ``--preset paper_tt`` record the same preset (one table row)."""
    stem = path.stem
    return "paper" if stem == method else f"paper_{stem[len(method) + 1 :]}"


def _load(method: str, name: str, path: str) -> Preset:
    import yaml

    from ..registry import get_method
    from ..train.recipe import PROTOCOLS, RECIPE_KEYS, resolve_recipe

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    where = f"preset file {Path(path).name}"
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid: {', '.join(_KEYS)}")
    if data.get("method") != method:
        raise ValueError(f"{where} is for method {data.get('method')!r}, not {method!r}")
    protocol = data.get("protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"{where}: protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    cls = get_method(method)
    tasks = data.get("tasks") or {}
    _check_tasks(tasks, where)
    preset = Preset(
        method,
        name,
        Path(path).name,
        protocol,
        data.get("recipe") or {},
        data.get("options_common") or {},
        tasks,
    )
    for task in [None, *tasks]:
        options, recipe = preset.for_task(task) if task else (preset.options, preset.recipe)
        bad = sorted(set(recipe) - set(RECIPE_KEYS))
        if bad:
            raise ValueError(
                f"{where}: recipe keys {bad} are not recipe settings; valid: {', '.join(RECIPE_KEYS)}"
            )
        try:
            cls.config_class.from_options(method, **options)
            resolve_recipe("vtab", cls.recipe, {}, method, (preset.label, recipe))  # types and ranges
        except ValueError as err:
            raise ValueError(f"{where}{f' (task {task})' if task else ''}: {err}") from None
    return preset


def _check_tasks(tasks: dict[str, Any], where: str) -> None:
    import vtab

    for task, entry in tasks.items():
        if vtab.find_task(task) is None or vtab.find_task(task).name != task:
            raise ValueError(f"{where}: {task!r} is not a VTAB-1K task name (see vtab.tasks())")
        extra = sorted(set(entry or {}) - {"options", "recipe"})
        if extra:
            raise ValueError(f"{where}: task {task} has keys {extra}; valid: options, recipe")
