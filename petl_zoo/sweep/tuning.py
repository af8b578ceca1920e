"""Tuning (``sweep --grid``/``--grid-opt``/``--tune``): per method and task, every grid point trained
on train800 and scored on val200 (one seed), the best setting retrained on train800val200 for each
seed and tested.

Layout, below ``<out_root>/<method>/<task>/tune-<grid fingerprint>/``:

- ``points/<setting>/``: a grid point, e.g. ``points/lr0.001_rank4`` (``--select-on val``, the first
  of ``--seeds``);
- ``seed<k>/``: the winner retrained with seed ``k`` (``--select-on test``, the trainer's default);
- ``selection.json``: every point's val accuracy, the winner and the retrained seeds (the tuning
  record, :class:`petl_zoo.runfolder.Selection`), written atomically once every point is done, and
  again as retrained seeds finish.

Every point and retrained run is an ordinary run folder with the sweep's status rules (skipped when
done, resumed when killed, refused when made with other settings). The grid fingerprint hashes the
method, the model, the grid and the base trainer flags (those after ``--``, ``--preset`` included,
execution-only flags such as ``--workers`` left out), so another base recipe or preset gets another
folder.

**The rule** (``RULE``): the highest val accuracy (``val_acc_last`` of result.json, the last epoch's
accuracy on val200, in percent); ties go to the smaller lr, then to the smaller value of each other
axis in the grid's order (numbers by value, text alphabetically).

**Learning rates**: when neither ``--grid`` nor the trainer flags (``-- --lr X``) give the lr, the lr
axis is the method's default grid from ``LR_GRIDS`` (``DEFAULT_LR_GRID`` for methods not listed).
Every entry spans the method's published lr range and contains the default grid, so every method is
tuned over at least the values any other gets. A preset's lr is replaced by the grid's (flags win over
presets); to keep one lr, give it: ``--grid lr=5e-3`` or ``-- --lr 5e-3``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runfolder import OPT_PREFIX, SELECTION_VERSION, TUNE_PREFIX
from .plan import (
    ExpectedConfig,
    SweepRun,
    _expected_config,
    base_train_args,
    make_run,
    task_dirname,
)

__all__ = [
    "DEFAULT_LR_GRID",
    "LR_GRIDS",
    "GRID_KEYS",
    "POINT_FLAGS",
    "RULE",
    "lr_grid",
    "parse_grid",
    "build_grid",
    "check_grid",
    "grid_fingerprint",
    "grid_settings",
    "setting_flags",
    "setting_name",
    "choose_winner",
    "edge_axes",
    "Tuning",
    "plan_tuning",
]

#: The lr grid of methods without an entry in LR_GRIDS: the shared VTAB recipe's AdamW 1e-3 (what the
#: LoRA / Adapter (NOAH), FacT, Convpass, RepAdapter, Lily authors train with: docs/<method>.md), 3e-3
#: (on the proxy ViT LoRA r=8 gains 3.4 points at 3e-3 over 1e-3: docs/neat.md, Real data) and 1e-2,
#: so that every method gets the top of NEAT's range too (a fair grid: no method is tuned over larger
#: steps than another). VPT uses it: its authors train with SGD (base lr up to 50, no AdamW
#: equivalent), and with AdamW the shared 1e-3 under-trains the prompts (proxy VPT-deep 82.3 at 1e-3,
#: 88.2 at 1e-2: docs/vpt.md, Real data).
DEFAULT_LR_GRID: tuple[float, ...] = (1e-3, 3e-3, 1e-2)

#: Per method: a default lr grid spanning its published range, each containing DEFAULT_LR_GRID.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    # NEAT/PEANuT authors: vision fine-tuning at lr 5e-3 to 1e-2 (per the project's issue on fair
    # tuning; the papers give no VTAB-1K recipe, docs/neat.md); on the proxy NEAT r=8 rises from
    # 90.2 at 1e-3 to 94.9 at 3e-3 (docs/neat.md, Real data).
    "neat": (1e-3, 3e-3, 5e-3, 1e-2),
    # SSF authors: per-task lr 1e-3 .. 5e-2, mode 5e-3 (train_scripts/vit/vtab/<task>/train_ssf.sh,
    # petl_zoo/presets/ssf.yaml; docs/ssf.md). Spans the range: both ends, the mode, 1e-2.
    "ssf": (1e-3, 3e-3, 5e-3, 1e-2, 5e-2),
}

#: Grid keys: recipe key -> (trainer flag, value type). ``wd`` is short for weight_decay.
GRID_KEYS: dict[str, tuple[str, type]] = {
    "lr": ("--lr", float),
    "weight_decay": ("--weight-decay", float),
    "batch_size": ("--batch-size", int),
    "drop_path": ("--drop-path", float),
    "epochs": ("--epochs", int),
    "warmup_epochs": ("--warmup-epochs", int),
    "protocol": ("--protocol", str),
}
_ALIASES = {"wd": "weight_decay"}
#: Trainer flags the tuning sets itself (a point trains on train800 with the first seed and is
#: scored on val200 alone: ``--no-test``; the retrained runs are tested).
_RESERVED_FLAGS = ("--seed", "--select-on", "--out", "--no-test")
#: What a grid point adds to its trainer flags (besides its seed, folder and setting).
POINT_FLAGS = ("--select-on", "val", "--no-test")

RULE = (
    "highest val_accuracy (last-epoch accuracy on val200 of the point trained on train800, one seed); "
    "ties: the smaller lr, then the smaller value of each other axis in the grid's order "
    "(numbers by value, text alphabetically)"
)


def lr_grid(method: str) -> tuple[float, ...]:
    """The default lr grid of ``method`` (LR_GRIDS, else DEFAULT_LR_GRID)."""
    return LR_GRIDS.get(method, DEFAULT_LR_GRID)


def _number(text: str) -> Any:
    """``'4'`` -> 4, ``'1e-3'`` -> 0.001, anything else stays text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _axis(item: str, option: bool) -> tuple[str, list[Any]]:
    """``KEY=V1,V2`` (values split on ``|`` instead when one holds a comma list: ``targets=q,v|qkv``)."""
    flag = "--grid-opt" if option else "--grid"
    key, sep, values = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key or not values.strip():
        raise ValueError(f"{flag} {item!r} is invalid; valid: KEY=VALUE[,VALUE...], e.g. lr=1e-3,5e-3")
    texts = [v.strip() for v in values.split("|" if "|" in values else ",")]
    if any(not t for t in texts):
        raise ValueError(f"{flag} {item!r} has an empty value; valid: KEY=VALUE[,VALUE...]")
    if option:
        key, parsed = OPT_PREFIX + key, [_number(t) for t in texts]
    else:
        key = _ALIASES.get(key, key)
        if key not in GRID_KEYS:
            raise ValueError(
                f"--grid key {key!r} is invalid; valid: {', '.join(GRID_KEYS)} (wd = weight_decay)"
            )
        kind = GRID_KEYS[key][1]
        try:
            parsed = [kind(t) for t in texts]
        except ValueError:
            raise ValueError(f"--grid {item!r}: {key} takes {kind.__name__} values") from None
    for i, value in enumerate(parsed):  # 4 and 4.0, 1e-3 and 0.001: one grid point twice
        same = next((j for j in range(i) if parsed[j] == value or texts[j] == texts[i]), None)
        if same is not None:
            raise ValueError(
                f"{flag} {item!r} repeats a value ({texts[same]} and {texts[i]} are the same); "
                "give distinct values"
            )
    return key, parsed


def parse_grid(recipe_items: Sequence[str] = (), option_items: Sequence[str] = ()) -> dict[str, list[Any]]:
    """``--grid`` and ``--grid-opt`` items as ``{axis: values}`` (options as ``opt.<name>``), in order."""
    grid: dict[str, list[Any]] = {}
    for item, option in [(i, False) for i in recipe_items] + [(i, True) for i in option_items]:
        key, values = _axis(item, option)
        if key in grid:
            raise ValueError(f"grid key {key!r} is given twice: give its values in one item")
        grid[key] = values
    return grid


def _given(flag: str, args: Sequence[str]) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _given_options(args: Sequence[str]) -> set[str]:
    """The option names the trainer flags set with ``--opt KEY=VALUE``."""
    names = set()
    for i, a in enumerate(args):
        item = (
            args[i + 1] if a == "--opt" and i + 1 < len(args) else a[6:] if a.startswith("--opt=") else None
        )
        if item:
            names.add(item.partition("=")[0].strip())
    return names


def build_grid(method: str, grid: dict[str, list[Any]], extra_args: Sequence[str]) -> dict[str, list[Any]]:
    """The grid of ``method``: ``grid`` with the method's default lr axis first when neither ``grid`` nor
    the trainer flags give the lr. A key both in the grid and in the trainer flags is a ValueError."""
    for flag in _RESERVED_FLAGS:
        if _given(flag, extra_args):
            hint = " (--seeds gives the seeds)" if flag == "--seed" else ""
            raise ValueError(f"{flag} in the trainer flags after --: a tuning sets it itself{hint}")
    for key in grid:
        flag = GRID_KEYS[key][0] if key in GRID_KEYS else None
        if (flag and _given(flag, extra_args)) or (
            not flag and key[len(OPT_PREFIX) :] in _given_options(extra_args)
        ):
            raise ValueError(
                f"grid key {key!r} is also set by the trainer flags after --: give it in one place"
            )
    if "lr" in grid or _given("--lr", extra_args):
        return dict(grid)
    return {"lr": list(lr_grid(method)), **grid}


def _grid_value(key: str, value: Any) -> str:
    """How the command line gives an axis value: ``--grid lr=nan``, ``--grid-opt rank=0``."""
    if key.startswith(OPT_PREFIX):
        return f"--grid-opt {key[len(OPT_PREFIX) :]}={_text(value)}"
    return f"--grid {key}={_text(value)}"


def _setting_error(method_cls: Any, parser: Any, argv: list[str]) -> str | None:
    """Why the trainer would refuse ``argv`` before training (its parser, method options and recipe), or
    None. The per-task preset values are not applied here (the trainer checks them per task)."""
    from ..train.args import method_options
    from ..train.recipe import RECIPE_KEYS, default_recipe, resolve_recipe

    try:
        args = parser.parse_args(argv)
        method_options(method_cls, args.opt, args.method_config)
        flags = {k: getattr(args, k) for k in RECIPE_KEYS if hasattr(args, k)}
        recipe = args.recipe or default_recipe(args.task)  # the task's benchmark's, as the trainer
        resolve_recipe(recipe, method_cls.recipe, flags, method_cls.name)  # validates the recipe
    except (ValueError, FileNotFoundError) as err:
        return " ".join(str(err).split())
    return None


def check_grid(method: str, grid: dict[str, list[Any]], extra_args: Sequence[str]) -> None:
    """Every grid point as the trainer would take it (method options through the method's config class,
    recipe values through ``petl_zoo.train.recipe``), before anything runs: a ValueError line naming
    the first grid value that cannot train (``--grid lr=nan cannot train: lr nan is invalid; ...``), or
    the grid point when only a combination fails. A method not in the registry is not checked."""
    from ..registry import get_method
    from ..train.args import build_train_parser

    try:
        method_cls = get_method(method)
    except ValueError:  # --no-method-check: the trainer reports it
        return
    parser = build_train_parser(raise_errors=True)
    base = ["--method", method, "--task", "_", *extra_args]
    why = _setting_error(method_cls, parser, base)
    if why is not None:
        raise ValueError(f"the trainer flags after -- cannot train {method}: {why}")
    for key, values in grid.items():  # each value on the base flags alone: the message names it
        for value in values:
            why = _setting_error(method_cls, parser, [*base, *setting_flags({key: value})])
            if why is not None and not _fixed_by_grid(method_cls, parser, base, grid, key, value):
                raise ValueError(f"{_grid_value(key, value)} cannot train {method}: {why}")
    for setting in grid_settings(grid):
        why = _setting_error(method_cls, parser, [*base, *setting_flags(setting)])
        if why is not None:
            point = ", ".join(f"{k.removeprefix(OPT_PREFIX)}={_text(v)}" for k, v in setting.items())
            raise ValueError(f"grid point {point} cannot train {method}: {why}")


def _fixed_by_grid(
    method_cls: Any, parser: Any, base: list[str], grid: dict[str, list[Any]], key: str, value: Any
) -> bool:
    """Whether some grid point holding ``key=value`` trains (``epochs=5`` fails alone with the recipe's
    10 warmup epochs, but not with the grid's ``warmup_epochs=0``)."""
    others = {k: v for k, v in grid.items() if k != key}
    return any(
        _setting_error(method_cls, parser, [*base, *setting_flags({key: value, **rest})]) is None
        for rest in grid_settings(others)
    )


def _execution_dests(parser: Any) -> set[str]:
    """The trainer parser's execution-only options (how a run runs, not what it is)."""
    groups = [g for g in parser._action_groups if g.title == "execution"]  # argparse keeps no public list
    return {a.dest for g in groups for a in g._group_actions}


def _base_identity(method: str, model: str, extra_args: Sequence[str]) -> dict[str, Any]:
    """The trainer flags after ``--`` as parsed values (what the run is, not where or how it runs);
    a local weights file by its SHA-256 (its path may differ between machines)."""
    from ..io import sha256_file
    from ..train.args import build_train_parser

    parser = build_train_parser(raise_errors=True)
    args = vars(parser.parse_args(["--method", method, "--model", model, "--task", "_", *extra_args]))
    skip = _execution_dests(parser) | {"method", "task", "out", "data_root", "seed", "select_on"}
    identity = {k: v for k, v in args.items() if k not in skip}
    file = identity.get("pretrained_file")
    if file and Path(file).is_file():
        identity["pretrained_file"] = {"sha256": sha256_file(file)}
    return identity


def grid_fingerprint(method: str, model: str, grid: dict[str, list[Any]], extra_args: Sequence[str]) -> str:
    """16 hex digits naming a tuning: method, model, grid, the base trainer flags and the flags of a
    grid point (``POINT_FLAGS``: points scored on val200 only, never tested)."""
    data = {
        "version": SELECTION_VERSION,
        "method": method,
        "grid": grid,
        "base": _base_identity(method, model, extra_args),
        "points": list(POINT_FLAGS),
    }
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def grid_settings(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every grid point as ``{axis: value}``, the last axis varying fastest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def setting_flags(setting: dict[str, Any]) -> list[str]:
    """The trainer flags of a setting: ``--lr 0.001 --opt rank=4``."""
    flags: list[str] = []
    for key, value in setting.items():
        if key.startswith(OPT_PREFIX):
            flags += ["--opt", f"{key[len(OPT_PREFIX) :]}={_text(value)}"]
        else:
            flags += [GRID_KEYS[key][0], _text(value)]
    return flags


def setting_name(setting: dict[str, Any]) -> str:
    """A folder name for a setting: ``lr0.001_rank4`` (characters other than letters, digits and
    ``._+-`` become ``-``: ``targets=q,v`` gives ``targetsq-v``)."""
    parts = [f"{key.removeprefix(OPT_PREFIX)}{_text(value)}" for key, value in setting.items()]
    return re.sub(r"[^A-Za-z0-9._+-]", "-", "_".join(parts))


def _order(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, str(value))


def choose_winner(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The setting chosen by RULE among ``[{"setting": ..., "val_accuracy": ...}]`` (all the same axes)."""
    if not points:
        raise ValueError("no grid point to choose from")
    axes = list(points[0]["setting"])
    axes = (["lr"] if "lr" in axes else []) + [a for a in axes if a != "lr"]

    def key(point: dict[str, Any]) -> tuple:
        return (-point["val_accuracy"], *(_order(point["setting"][a]) for a in axes))

    return dict(min(points, key=key)["setting"])


def edge_axes(grid: dict[str, list[Any]], winner: dict[str, Any]) -> list[str]:
    """The numeric axes (of 2+ values) whose winning value is the grid's smallest or largest, as
    ``lr=0.01 (largest)``: the best value may lie outside the grid."""
    out = []
    for key, values in grid.items():
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if (
            len(numbers) < 2
            or len(numbers) != len(values)
            or winner.get(key) not in (min(numbers), max(numbers))
        ):
            continue
        out.append(f"{key}={_text(winner[key])} ({'largest' if winner[key] == max(numbers) else 'smallest'})")
    return out


@dataclass
class Tuning:
    """One (method, task) tuning: its folder, grid, points (setting and run) and retrain seeds."""

    method: str
    task: str
    folder: Path
    grid: dict[str, list[Any]]
    fingerprint: str
    base: list[str]  # the trainer arguments of every run but --seed/--out and the setting's flags
    extra: list[str]
    seeds: list[int]
    prefix: list[str]  # what precedes the trainer arguments (plan.train_prefix)
    points: list[tuple[dict[str, Any], SweepRun]] = field(default_factory=list)

    def train_args(self, setting: dict[str, Any], seed: int, out: Path, select_val: bool) -> list[str]:
        """A run's trainer arguments: a grid point's (``select_val``: train800, scored on val200, test
        never evaluated: ``POINT_FLAGS``) or a retrained run's (train800val200, tested)."""
        args = [*self.base, "--seed", str(seed), "--out", str(out), *self.extra, *setting_flags(setting)]
        return args + (list(POINT_FLAGS) if select_val else [])


def plan_tuning(
    method: str,
    model: str,
    tasks: Sequence[str],
    grid: dict[str, list[Any]],
    seeds: Sequence[int] | None,
    out_root: str | Path,
    data_root: str | None,
    extra_args: Sequence[str],
    prefix: Sequence[str],
    overwrite: bool = False,
    expected: ExpectedConfig = _expected_config,
) -> list[Tuning]:
    """One Tuning per task with its points planned (statuses classified now)."""
    method_grid = build_grid(method, grid, extra_args)
    check_grid(method, method_grid, extra_args)
    settings = grid_settings(method_grid)
    names = [setting_name(s) for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"grid settings {names} give the same folder name twice: use distinct values")
    fp = grid_fingerprint(method, model, method_grid, extra_args)
    seed_list = list(seeds) if seeds else [0]
    tunings = []
    for task in tasks:
        folder = Path(out_root) / method / task_dirname(task) / f"{TUNE_PREFIX}{fp}"
        base = base_train_args(method, model, task, data_root)
        tuning = Tuning(
            method, task, folder, method_grid, fp, base, list(extra_args), seed_list, list(prefix)
        )
        for setting, name in zip(settings, names):
            out = folder / "points" / name
            args = tuning.train_args(setting, seed_list[0], out, select_val=True)
            tuning.points.append(
                (setting, make_run(task, seed_list[0], out, args, prefix, overwrite, expected))
            )
        tunings.append(tuning)
    return tunings
