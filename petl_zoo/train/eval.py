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

from ..api import ADAPTER_WEIGHTS, merge, read_adapter_config
from ..api import load_adapter as _load_adapter
from ..io import read_json
from . import distributed as D
from .args import UserError, parse_key_values
from .recipe import execution_defaults

__all__ = ["EvalResult", "evaluate_run"]


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


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """The run's JSON file as a dict ({} when absent); a damaged one is one line naming it."""
    if not path.is_file():
        return {}
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} does not hold a dict (found {type(data).__name__})")
    return data


def _read_adapter(run_dir: Path) -> dict[str, Any]:
    """adapter_config.json, after checking that it and adapter.safetensors can be read at all."""
    from safetensors import SafetensorError, safe_open

    try:
        adapter_cfg = read_adapter_config(run_dir)  # FileNotFoundError names what is missing
    except json.JSONDecodeError:
        read_json(run_dir / "adapter_config.json", "adapter config")  # raises, naming the file
        raise
    weights = run_dir / ADAPTER_WEIGHTS
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
        raise UserError(f"{run_dir} has no config.json of a tools/train.py run: give {missing}")
    if args.model_kwargs is not None:
        model_kwargs = parse_key_values(args.model_kwargs, "--model-kwargs")
    else:
        model_kwargs = config.get("model_kwargs", {})
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
        raise UserError(f"--check: {run_dir} has no result.json to compare with (an unfinished run?)")
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
    return f"; result.json {key} {expected:.4f}: {verdict}", (diff == 0 if not merged else diff <= 1)


def evaluate_run(args: argparse.Namespace) -> EvalResult:
    """Rebuild the backbone of ``args.adapter``, load the adapter (merged with ``--merge``) and count
    the right top-1 predictions on ``args.split``."""
    import vtab

    from .backbone import build_backbone
    from .engine import evaluate_counts, make_autocast, seed_everything

    run_dir = Path(args.adapter)
    adapter_cfg = _read_adapter(run_dir)
    config = _read_json(run_dir / "config.json", "run config")
    result = _read_json(run_dir / "result.json", "run result")
    _check_comparable(args, run_dir, result)
    recipe = config.get("recipe", {})
    b = _backbone_settings(args, config, run_dir)
    device = D.resolve_device(args.device, D.DistInfo())
    precision, workers = execution_defaults(device, args.precision or recipe.get("precision"), args.workers)
    protocol = args.protocol or recipe.get("protocol", "vtab")
    batch_size = args.batch_size or recipe.get("batch_size", 64)
    data_root = args.data_root or config.get("data_root")
    num_classes = adapter_cfg.get("num_classes") or vtab.num_classes(b["task"], data_root)

    seed_everything(int(recipe.get("seed", 0)))  # the random init of a --no-pretrained run
    model = build_backbone(
        b["model_name"], num_classes, b["pretrained_file"], b["pretrained"], b["model_kwargs"], 0.0
    )
    _load_adapter(model, run_dir)
    model.to(device)
    if args.merge:
        merge(model)
    dataset = vtab.VtabDataset(
        b["task"], args.split, vtab.build_transform(model, protocol), data_root, num_classes
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
    if result:
        suffix, matches = _compare(correct / total, total, result, args.split, args.merge)
    return EvalResult(correct, total, line + suffix, matches)


if __name__ == "__main__":
    from .cli import eval_main

    sys.exit(eval_main(prog="python -m petl_zoo.train.eval"))
