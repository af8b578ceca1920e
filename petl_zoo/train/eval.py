"""``tools/eval.py``: load a saved adapter onto its backbone and measure accuracy on a split.

The backbone is rebuilt from the run's ``config.json`` (model, model_kwargs, pretrained file, seed for
``--no-pretrained`` runs, protocol, batch size, precision); flags override each value, and a folder
without ``config.json`` (an adapter saved by ``petl_zoo.save_adapter``) needs ``--model`` and
``--task``. The accuracy is compared with ``result.json``'s ``test_acc_last`` (``test_acc_selected``
for runs selected on val): equal for the plain adapter; with ``--merge`` float rounding may move a
prediction, so within one sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..api import load_adapter as _load_adapter
from ..api import merge, read_adapter_config
from . import distributed as D
from .args import UserError, build_eval_parser, parse_key_values

__all__ = ["run_eval"]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_eval(argv: list[str] | None = None) -> int:
    import vtab

    from .backbone import build_backbone
    from .loop import evaluate_counts, make_autocast, seed_everything

    args = build_eval_parser().parse_args(argv)
    run_dir = Path(args.adapter)
    adapter_cfg = read_adapter_config(run_dir)  # FileNotFoundError names what is missing
    config = _read_json(run_dir / "config.json")
    result = _read_json(run_dir / "result.json")
    recipe = config.get("recipe", {})
    model_name = args.model or config.get("model")
    task = args.task or config.get("task")
    if not model_name or not task:
        missing = "--model" if not model_name else "--task"
        raise UserError(f"{run_dir} has no config.json of a tools/train.py run: give {missing}")
    model_kwargs = (
        parse_key_values(args.model_kwargs, "--model-kwargs") if args.model_kwargs is not None
        else config.get("model_kwargs", {})
    )
    if args.no_pretrained:
        pretrained_file, pretrained = None, False
    elif args.pretrained_file is not None:
        pretrained_file, pretrained = args.pretrained_file, True
    else:
        pretrained_file, pretrained = config.get("pretrained_file"), config.get("pretrained", True)
    info = D.DistInfo()
    device = D.resolve_device(args.device, info)
    precision = args.precision or recipe.get("precision") or ("bf16" if device.type == "cuda" else "fp32")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    protocol = args.protocol or recipe.get("protocol", "vtab")
    batch_size = args.batch_size or recipe.get("batch_size", 64)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    data_root = args.data_root or config.get("data_root")
    num_classes = adapter_cfg.get("num_classes") or vtab.num_classes(task, data_root)

    seed_everything(int(recipe.get("seed", 0)))  # the random init of a --no-pretrained run
    model = build_backbone(model_name, num_classes, pretrained_file, pretrained, model_kwargs, 0.0)
    _load_adapter(model, run_dir)
    model.to(device)
    if args.merge:
        merge(model)
    dataset = vtab.VtabDataset(task, args.split, vtab.build_transform(model, protocol), data_root, num_classes)
    loader = vtab.make_loader(dataset, batch_size, shuffle=False, workers=workers, seed=0)
    correct, total = evaluate_counts(
        model, loader, device, make_autocast(device, precision), progress=not args.no_progress, desc=args.split
    )
    acc = correct / total
    merged = " (merged)" if args.merge else ""
    line = f"{adapter_cfg['method']} on {model_name} / {task} {args.split}{merged}: accuracy {acc:.4f} ({correct}/{total})"
    ok = True
    if result and args.split == "test":
        key = "test_acc_selected" if result.get("select_on") == "val" else "test_acc_last"
        expected = result.get(key)
        if expected is not None:
            diff = round(abs(acc - expected) * total)
            ok = diff == 0 if not args.merge else diff <= 1
            verdict = "matches" if diff == 0 else f"differs by {diff} sample(s)"
            line += f"; result.json {key} {expected:.4f}: {verdict}"
    print(line, flush=True)
    if args.check and not ok:
        return 1
    return 0
