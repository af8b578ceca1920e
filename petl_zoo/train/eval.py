"""``tools/eval.py``: load a saved adapter onto its backbone and measure accuracy on a split.

The backbone is rebuilt from the run's ``config.json`` (model, model_kwargs, pretrained file, seed for
``--no-pretrained`` runs, protocol, batch size, precision); flags override each value, and a folder
without ``config.json`` (an adapter saved by ``petl_zoo.save_adapter``) needs ``--model`` and
``--task``. The accuracy is compared with what ``result.json`` recorded for the saved adapter: on test
``test_acc_last`` (``test_acc_selected`` for runs selected on val), on val ``val_acc_best`` (runs
selected on val; other runs trained on val and recorded no val accuracy); equal for the plain
adapter; with ``--merge`` float rounding may move a prediction, so within one sample. ``--check``
refuses, in one line, a split or a folder with nothing recorded to compare with.

``python -m petl_zoo.train.eval`` runs it too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api import checked_model_kwargs, merge, read_adapter_config
from ..api import load_adapter as _load_adapter
from ..io import read_json
from ..runfolder import CONFIG, RESULT, RunFolder
from . import distributed as D
from .args import build_eval_parser, parse_key_values
from .cli import _guarded, _prog
from .errors import UserError
from .recipe import execution_defaults

__all__ = ["EvalResult", "evaluate_run", "eval_main"]


@dataclass
class EvalResult:
    """``correct`` of ``total`` images right; ``line`` says so (and how it compares with result.json);
    ``matches`` is False when it differs from result.json (by any sample; by more than one merged)."""

    correct: int
    total: int
    line: str
    matches: bool = True

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def _read_adapter(folder: RunFolder) -> dict[str, Any]:
    """The adapter's config, after checking that it and the adapter's weights can be read at all."""
    from safetensors import SafetensorError, safe_open

    try:
        adapter_cfg = read_adapter_config(folder.path)  # FileNotFoundError names what is missing
    except json.JSONDecodeError:
        read_json(folder.adapter_config_path, "adapter config")  # raises, naming the file
        raise
    weights = folder.adapter_weights_path
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            reason = " ".join(str(err).split())[:160] or "empty file"
            raise UserError(
                f"cannot read adapter weights {weights}: truncated or not a safetensors file ({reason}); "
                "restore the file or train the run again"
            ) from None
    return adapter_cfg


def _backbone_settings(args: argparse.Namespace, config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Model name, kwargs, task and pretrained weights: the flags, else the run's config.json."""
    model_name = args.model or config.get("model")
    task = args.task or config.get("task")
    if not model_name or not task:
        missing = "--model" if not model_name else "--task"
        raise UserError(f"{run_dir} has no {CONFIG} of a tools/train.py run: give {missing}")
    if args.model_kwargs is not None:
        model_kwargs = parse_key_values(args.model_kwargs, "--model-kwargs")
    else:  # the run's record is data: only architecture keywords reach timm
        model_kwargs = checked_model_kwargs(
            config.get("model_kwargs"), str(RunFolder(run_dir).config_path), "model_kwargs"
        )
    if args.no_pretrained:
        pretrained_file, pretrained = None, False
    elif args.pretrained_file is not None:
        pretrained_file, pretrained = args.pretrained_file, True
    else:
        pretrained_file, pretrained = config.get("pretrained_file"), config.get("pretrained", True)
    return {
        "model_name": model_name,
        "task": task,
        "model_kwargs": model_kwargs,
        "pretrained_file": pretrained_file,
        "pretrained": pretrained,
    }


def _recorded_key(split: str, result: dict[str, Any]) -> str | None:
    """result.json's accuracy of the saved adapter on ``split``, if the run recorded one: test always;
    val when the run was selected on val (its adapter is the best-val epoch's, ``val_acc_best``)."""
    on_val = result.get("select_on") == "val"
    if split == "test":
        return "test_acc_selected" if on_val else "test_acc_last"
    if split == "val" and on_val:
        return "val_acc_best"
    return None


def _check_comparable(args: argparse.Namespace, run_dir: Path, result: dict[str, Any]) -> None:
    """``--check`` needs a recorded accuracy of this split: refuse in one line when there is none."""
    if not args.check:
        return
    if not result:
        raise UserError(f"--check: {run_dir} has no {RESULT} to compare with (an unfinished run?)")
    if _recorded_key(args.split, result) is None or result.get(_recorded_key(args.split, result)) is None:
        why = (
            "the run trained on val (select_on test) and recorded no val accuracy"
            if args.split == "val"
            else f"runs record no {args.split} accuracy"
        )
        raise UserError(
            f"--check --split {args.split}: {why}; --check compares test, and val for runs trained "
            "with --select-on val"
        )


def _compare(acc: float, total: int, result: dict[str, Any], split: str, merged: bool) -> tuple[str, bool]:
    """The ``; result.json ...: matches`` suffix and whether it matches (within one sample when merged)."""
    key = _recorded_key(split, result)
    expected = result.get(key) if key else None
    if expected is None:
        return "", True
    diff = round(abs(acc - expected) * total)
    verdict = "matches" if diff == 0 else f"differs by {diff} sample(s)"
    return f"; {RESULT} {key} {expected:.4f}: {verdict}", (diff == 0 if not merged else diff <= 1)


def _split_change(config: dict[str, Any], task: str, split: str, data_root: str | None) -> str | None:
    """How ``split`` of ``task`` now differs from the run's recorded data identity (``797 images, list
    1a2b3c4d, files ... -> 400 images, ...``); None when it is the same or the run recorded none."""
    import vtab

    from ..fingerprint import split_text

    recorded = ((config.get("data_identity") or {}).get("splits") or {}).get(split)
    if not recorded:
        return None
    current = vtab.split_identity(task, split, data_root)
    return None if current == recorded else f"{split_text(recorded)} -> {split_text(current)}"


def evaluate_run(args: argparse.Namespace) -> EvalResult:
    """Rebuild the backbone of ``args.adapter``, load the adapter (merged with ``--merge``) and count
    the right top-1 predictions on ``args.split``."""
    import vtab

    from .backbone import build_backbone
    from .engine import evaluate_counts, make_autocast, seed_everything

    run_dir = Path(args.adapter)
    folder = RunFolder(run_dir)
    adapter_cfg = _read_adapter(folder)
    config = folder.read_config() or {}
    result = folder.read_result() or {}
    _check_comparable(args, run_dir, result)
    recipe = config.get("recipe", {})
    b = _backbone_settings(args, config, run_dir)
    device = D.resolve_device(args.device, D.DistInfo())
    precision, workers = execution_defaults(device, args.precision or recipe.get("precision"), args.workers)
    protocol = args.protocol or recipe.get("protocol", "vtab")
    batch_size = args.batch_size or recipe.get("batch_size", 64)
    data_root = args.data_root or config.get("data_root")
    num_classes = adapter_cfg.get("num_classes") or vtab.num_classes(b["task"], data_root)
    changed = _split_change(config, b["task"], args.split, data_root)
    if changed and args.check:
        raise UserError(
            f"--check: the {args.split} split is not the one {run_dir} was evaluated on ({changed}); "
            "its recorded accuracy is not comparable"
        )

    seed_everything(int(recipe.get("seed", 0)))  # the random init of a --no-pretrained run
    model = build_backbone(
        b["model_name"], num_classes, b["pretrained_file"], b["pretrained"], b["model_kwargs"], 0.0
    )
    _load_adapter(model, run_dir)
    model.to(device)
    if args.merge:
        merge(model)
    dataset = vtab.VtabDataset(
        b["task"],
        args.split,
        vtab.build_transform(model, protocol, crop=recipe.get("crop", "none")),
        data_root,
        num_classes,
    )
    loader = vtab.make_loader(dataset, batch_size, shuffle=False, workers=workers, seed=0)
    correct, total = evaluate_counts(
        model,
        loader,
        device,
        make_autocast(device, precision),
        progress=not args.no_progress and sys.stderr.isatty(),
        desc=args.split,
    )
    merged = " (merged)" if args.merge else ""
    line = (
        f"{adapter_cfg['method']} on {b['model_name']} / {b['task']} {args.split}{merged}: "
        f"accuracy {correct / total:.4f} ({correct}/{total})"
    )
    suffix, matches = ("", True)
    if changed:
        suffix, matches = f"; not comparable with {RESULT}: the {args.split} split changed ({changed})", False
    elif result:
        suffix, matches = _compare(correct / total, total, result, args.split, args.merge)
    return EvalResult(correct, total, line + suffix, matches)


def eval_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The evaluator: evaluate a saved adapter and print the accuracy; returns the exit status (1 with
    ``--check`` when it differs from the run's recorded result)."""

    def body() -> int:
        args = build_eval_parser(_prog(prog)).parse_args(argv)
        result = evaluate_run(args)
        print(result.line, flush=True)
        return 1 if args.check and not result.matches else 0

    return _guarded(body)


if __name__ == "__main__":
    sys.exit(eval_main(prog="python -m petl_zoo.train.eval"))
