"""What a run depends on: the command line resolved into a ``RunSpec`` (what ``config.json`` records)."""

from __future__ import annotations

import json
import logging
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from ..api import checked_model_kwargs
from ..fingerprint import fingerprints, identity_diff
from ..io import sha256_file
from ..registry import get_method
from ..runfolder import RunFolder
from ..version import __version__ as petl_zoo_version
from . import distributed as D
from .args import DEFAULT_COMPILE_BACKEND, build_train_parser, method_options, parse_key_values
from .backbone import check_weights_file, resolve_model_name, weights_unavailable
from .errors import UserError
from .recipe import default_recipe, execution_defaults, resolve_recipe

__all__ = [
    "RunSpec",
    "resolve_spec",
    "expected_config",
    "run_differences",
    "format_differences",
    "check_resume_config",
]

logger = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """Everything a run depends on, resolved from the command line (what config.json records)."""

    method: str
    method_options: dict[str, Any]
    model: str
    model_kwargs: dict[str, Any]
    task: str
    num_classes: int
    data_root: str
    pretrained_file: str | None
    pretrained: bool
    recipe: dict[str, Any]
    recipe_sources: dict[str, str]
    out: Path
    workers: int
    device: torch.device
    compile: bool = False
    compile_backend: str = DEFAULT_COMPILE_BACKEND
    grad_checkpointing: bool = False  # how the run runs (like compile): not in its fingerprint
    progress: bool = True
    keep_checkpoint: bool = False
    find_unused_parameters: bool = False
    resume: bool = False
    overwrite: bool = False
    stop_after_epoch: int | None = None
    argv: list[str] = field(default_factory=list)
    resolved_model: str = ""  # timm's architecture.tag for ``model`` (deprecated names remapped)
    pretrained_file_sha256: str | None = None
    preset: str | None = None  # ``method/name`` of the per-task preset applied (petl_zoo.presets)
    test: bool = True  # False (--no-test): val only, the test split is never evaluated
    data_identity: dict[str, Any] = field(default_factory=dict)  # vtab.data_identity: the data by content

    @property
    def folder(self) -> RunFolder:
        """The run folder (``out``): where the run's files are read and written."""
        return RunFolder(self.out)

    def run_config(self, info: D.DistInfo) -> dict[str, Any]:
        config = {
            "method": self.method,
            "method_options": self.method_options,
            "model": self.model,
            "resolved_model": self.resolved_model or self.model,
            "model_kwargs": self.model_kwargs,
            "task": self.task,
            "num_classes": self.num_classes,
            "data_root": self.data_root,
            "data_identity": self.data_identity,
            "pretrained_file": self.pretrained_file,
            "pretrained_file_sha256": self.pretrained_file_sha256,
            "pretrained": self.pretrained,
            "preset": self.preset,
            "recipe": self.recipe,
            "recipe_sources": self.recipe_sources,
            "test": self.test,
            "world_size": info.world_size,
            "per_rank_batch_size": self.recipe["batch_size"] // info.world_size,
            "device": self.device.type,
            "workers": self.workers,
            "compile": self.compile,
            "compile_backend": self.compile_backend,
            "grad_checkpointing": self.grad_checkpointing,
            "argv": self.argv,
            "versions": _versions(),
        }
        config["fingerprint"] = fingerprints(config)
        return config


def _versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,  # a str subclass (TorchVersion): stored as a plain str for last.pt
        "timm": timm.__version__,
        "numpy": np.__version__,
        "petl_zoo": petl_zoo_version,
    }
    return {k: str(v) for k, v in versions.items()}


def _recipe_flags(args: Any) -> dict[str, Any]:
    """The recipe values given on the command line (``None``: not given)."""
    return {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "eval_every": args.eval_every,
        "seed": args.seed,
        "drop_path": args.drop_path,
        "protocol": args.protocol,
        "augment": args.augment,
        "precision": args.precision,
        "select_on": args.select_on,
        "accumulate": args.accumulate,
        "head_lr": args.head_lr,
        "schedule": args.schedule,
        "crop": args.crop,
        "train_split": args.train_split,
        "clip_grad": args.clip_grad,
    }


def _pretrained_file(args: Any) -> str | None:
    if args.pretrained_file is not None and args.no_pretrained:
        raise UserError("--pretrained-file and --no-pretrained contradict each other: give one")
    if args.pretrained_file is None:
        return None
    path = Path(args.pretrained_file).expanduser().absolute()
    check_weights_file(path)
    return str(path)


def resolve_spec(args: Any, device: torch.device, argv: list[str]) -> RunSpec:
    """Validate the command line into a RunSpec (user errors are ValueError/FileNotFoundError)."""
    import vtab

    method_cls = get_method(args.method)
    args.task = vtab.task_folder_name(args.task, args.benchmark)
    folder, identity = _check_inputs(args)  # the data and the weights: every missing input in one message
    info = vtab.find_task(args.task)
    task = info.name if info is not None else folder.name
    preset_label, preset_options, preset_recipe = _preset_values(method_cls.name, args.preset, task)
    config = method_options(method_cls, args.opt, args.method_config, preset_options)
    # what the run records must load back: the keywords a saved record may not set are refused here
    model_kwargs = checked_model_kwargs(
        parse_key_values(args.model_kwargs, "--model-kwargs"), "--model-kwargs", "the run's model_kwargs"
    )
    recipe, sources = resolve_recipe(
        args.recipe or default_recipe(task),
        method_cls.recipe,
        _recipe_flags(args),
        method_cls.name,
        (preset_label, preset_recipe) if preset_label else None,
    )
    if recipe["precision"] is None:
        sources["precision"] = f"device:{device.type}"
    recipe["precision"], workers = execution_defaults(device, recipe["precision"], args.workers)
    pretrained_file = _pretrained_file(args)
    resolved_model, note = resolve_model_name(args.model)
    if note:
        logger.warning(note)
    num_classes = vtab.num_classes(args.task, args.data_root, declared=args.num_classes)
    if args.no_test and recipe["select_on"] != "val":
        raise UserError("--no-test needs --select-on val: without test or val nothing would be evaluated")
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise UserError(f"--stop-after-epoch {args.stop_after_epoch} is invalid; valid: an integer >= 1")
    return RunSpec(
        method=method_cls.name,
        method_options=config.to_dict(),
        model=args.model,
        model_kwargs=model_kwargs,
        task=task,
        num_classes=num_classes,
        data_root=str(vtab.resolve_root(args.data_root)),
        pretrained_file=pretrained_file,
        pretrained=not args.no_pretrained,
        recipe=recipe,
        recipe_sources=sources,
        out=Path(args.out) if args.out else Path("runs") / method_cls.name / task,
        workers=workers,
        device=device,
        compile=args.compile,
        compile_backend=_compile_backend(args),
        grad_checkpointing=args.grad_checkpointing,
        progress=not args.no_progress and sys.stderr.isatty(),  # bars on a terminal, lines in a log
        keep_checkpoint=args.keep_checkpoint,
        find_unused_parameters=args.find_unused_parameters,
        resume=args.resume,
        overwrite=args.overwrite,
        stop_after_epoch=args.stop_after_epoch,
        argv=argv,
        resolved_model=resolved_model,
        pretrained_file_sha256=sha256_file(pretrained_file) if pretrained_file else None,
        preset=preset_label or None,
        test=not args.no_test,
        data_identity=identity,
    )


def _compile_backend(args: Any) -> str:
    """``--compile-backend``, checked: a backend torch.compile knows, given with ``--compile``."""
    name = args.compile_backend
    if not args.compile:
        if name != DEFAULT_COMPILE_BACKEND:
            raise UserError(f"--compile-backend {name} needs --compile")
        return name
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        shown = ", ".join([*torch._dynamo.list_backends(), "aot_eager", "eager"])
        raise UserError(f"--compile-backend {name!r} is not a torch.compile backend; e.g. {shown}")
    return name


def _check_inputs(args: Any) -> tuple[Path, dict[str, Any]]:
    """The task's folder and its data identity (``vtab.data_identity``), after checking that the data
    and the pretrained weights can be had: what is
    missing (the data and how to prepare it, the weights and how to give them) is one message, so an
    offline first command says everything it needs at once."""
    import vtab

    problems, folder, identity = [], None, {}
    try:
        folder = vtab.task_dir(args.task, args.data_root)  # an unknown task: its own clear error
        identity = vtab.data_identity(args.task, args.data_root)  # the list files and their images
    except FileNotFoundError as err:
        problems.append(" ".join(str(err).split()))
    if args.pretrained_file is None and not args.no_pretrained:
        problems.append(weights_unavailable(args.model) or "")
    problems = [p for p in problems if p]
    if len(problems) > 1:
        raise UserError(
            f"{len(problems)} inputs are missing: "
            + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        )
    if problems:
        raise UserError(problems[0])
    return folder, identity


def _preset_values(method: str, name: str | None, task: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(label, method options, recipe values)`` of preset ``name`` for ``task`` (empty without one).
    A task the preset has no entry for (a custom task) gets the preset's common values, said in a line."""
    if name is None:
        return "", {}, {}
    from ..presets import load_preset

    preset = load_preset(method, name)
    if task not in preset.tasks:
        logger.info(f"preset {preset.label} has no values for task {task}: its common values only")
    options, recipe = preset.for_task(task)
    return preset.label, options, recipe


def expected_config(train_args: list[str]) -> dict[str, Any]:
    """The ``config.json`` dict (with its fingerprints) that the trainer would write for the command
    line ``train_args``, resolved in this process without touching the run folder (what the sweep
    compares an existing run with). Bad arguments raise UserError (or another user error)."""
    args = build_train_parser("tools/train.py", raise_errors=True).parse_args(train_args)
    info = D.DistInfo()
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)  # only its type matters here (no CUDA context in the caller)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; valid: cpu, cuda, cuda:N") from None
    return resolve_spec(args, device, ["tools/train.py", *train_args]).run_config(info)


def run_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes the run of config ``old`` another run than ``new``: ``fingerprint.identity_diff``
    (method, options, model, weights, recipe, task, class count, the data by content) and the seed, as
    ``key: old -> new``. Moved data is the same data; a run recorded without a data identity is
    compared by its data root's path."""
    diff = identity_diff(old, new)
    seeds = [(c.get("recipe") or {}).get("seed") for c in (old, new)]
    if seeds[0] != seeds[1]:
        diff.append(f"recipe.seed: {json.dumps(seeds[0])} -> {json.dumps(seeds[1])}")
    return diff


def format_differences(diff: list[str], limit: int = 6) -> str:
    """``a: 1 -> 2, b: x -> y`` (at most ``limit``, then how many more)."""
    shown = ", ".join(diff[:limit])
    return shown + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def check_resume_config(saved: dict[str, Any], config: dict[str, Any], out: Path) -> None:
    """Refuse to ``--resume`` the run in ``out`` with settings that change the numbers (everything in
    ``run_differences``: changed data is refused, moved data resumes), naming the keys that differ. A
    run started before data identities were recorded resumes from moved data, as it always could."""
    diff = run_differences(saved, config)
    if not saved.get("data_identity"):
        diff = [d for d in diff if not d.startswith("data_root:")]
    if diff:
        raise UserError(
            f"--resume: the run in {out} was started with other settings ({format_differences(diff)}); "
            "repeat the original options or use --overwrite"
        )
