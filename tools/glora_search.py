#!/usr/bin/env python
"""GLoRA's evolutionary search on a trained supernet: ``python tools/glora_search.py --adapter RUN
--budget 1.0 --out subnet.json`` (see docs/glora.md).

``RUN`` is a folder saved by ``tools/train.py --method glora --opt supernet=true`` (or by
``petl_zoo.save_adapter`` on a supernet; then give ``--model`` and ``--task``). The backbone is rebuilt
as ``tools/eval.py`` does, the supernet loaded, and every candidate subnet scored by its top-1 accuracy
on ``--split`` (default ``val``: the authors' ``val200`` after their commit c1429c3) with the supernet's
weights. The chosen subnet is written as JSON: the ``glora`` options that build it (``rank``, ``init``,
``targets``, ``layers``), its score and parameter count, and the search's settings and top list.
``--export DIR`` also saves the subnet as a fixed ``glora`` adapter (``petl_zoo.load_adapter``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

import petl_zoo
from petl_zoo.api import checked_model_kwargs
from petl_zoo.methods.glora import supernet_deltas
from petl_zoo.methods.glora_search import accuracy_score, evolution_search, export_subnet
from petl_zoo.runfolder import RunFolder

logger = logging.getLogger("glora_search")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/glora_search.py", description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, help="run folder or adapter folder of a glora supernet")
    p.add_argument("--out", required=True, help="JSON file for the chosen subnet")
    p.add_argument("--budget", type=float, required=True, help="most trainable values, in millions")
    p.add_argument("--min-budget", type=float, default=0.0, help="fewest trainable values, in millions")
    p.add_argument("--split", default="val", choices=("train", "val", "trainval", "test"))
    p.add_argument("--population", type=int, default=50)
    p.add_argument("--select", type=int, default=10)
    p.add_argument("--mutations", type=int, default=25)
    p.add_argument("--crossovers", type=int, default=25)
    p.add_argument("--mutation-prob", type=float, default=0.2)
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--seed", type=int, default=1, help="the search's seed (the authors' default 1)")
    p.add_argument("--model", help="timm model name (default: the run's config.json)")
    p.add_argument("--task", help="VTAB task (default: the run's config.json)")
    p.add_argument("--data-root", help="VTAB-1K root (default: the run's config.json)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--export", help="also save the chosen subnet as a fixed glora adapter in this folder")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, config: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's backbone, unpatched, plus the settings it was built with."""
    import vtab
    from petl_zoo.train.backbone import build_backbone
    from petl_zoo.train.engine import seed_everything

    model_name, task = args.model or config.get("model"), args.task or config.get("task")
    if not model_name or not task:
        raise SystemExit(
            f"{args.adapter} has no config.json of a tools/train.py run: give --model and --task"
        )
    data_root = args.data_root or config.get("data_root")
    adapter_cfg = petl_zoo.read_adapter_config(args.adapter)
    num_classes = adapter_cfg.get("num_classes") or vtab.num_classes(task, data_root)
    settings = dict(model=model_name, task=task, data_root=data_root, num_classes=num_classes)
    seed_everything(int(config.get("recipe", {}).get("seed", 0)))  # a --no-pretrained run's weights
    model = build_backbone(
        model_name,
        num_classes,
        config.get("pretrained_file"),
        config.get("pretrained", True),
        checked_model_kwargs(config.get("model_kwargs"), f"{args.adapter}/config.json", "model_kwargs"),
        0.0,
    )
    return model, settings


def cached_batches(
    model: torch.nn.Module, args: argparse.Namespace, settings: dict[str, Any], config: dict
) -> list:
    """The scoring split, read once (every candidate is scored on it)."""
    import vtab

    recipe = config.get("recipe", {})
    transform = vtab.build_transform(model, recipe.get("protocol", "vtab"), crop=recipe.get("crop", "none"))
    dataset = vtab.VtabDataset(
        settings["task"], args.split, transform, settings["data_root"], settings["num_classes"]
    )
    batch_size = args.batch_size or recipe.get("batch_size", 64)
    loader = vtab.make_loader(dataset, batch_size, shuffle=False, workers=args.workers, seed=0)
    return [(x, y) for x, y in loader]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    config = RunFolder(Path(args.adapter)).read_config() or {}
    model, settings = build_model(args, config)
    host = build_model(args, config)[0] if args.export else None
    petl_zoo.load_adapter(model, args.adapter)
    supernet_deltas(model)  # a ValueError unless the folder holds a glora supernet
    model.to(args.device)
    batches = cached_batches(model, args, settings, config)
    result = evolution_search(
        model,
        accuracy_score(batches, args.device),
        args.budget,
        min_budget=args.min_budget,
        population=args.population,
        select=args.select,
        mutations=args.mutations,
        crossovers=args.crossovers,
        mutation_prob=args.mutation_prob,
        generations=args.generations,
        seed=args.seed,
    )
    cfg = petl_zoo.method_of(model).config
    record = {
        "method": "glora",
        "options": dict(rank=cfg.rank, init=cfg.init, targets=list(cfg.targets), layers=list(result.layers)),
        "score": result.score,
        "params": result.params,
        "scored_on": dict(task=settings["task"], split=args.split),
        "supernet": str(args.adapter),
        "search": {k: getattr(args, k) for k in ("budget", "min_budget", "population", "select", "mutations")}
        | {k: getattr(args, k) for k in ("crossovers", "mutation_prob", "generations", "seed")},
        "evaluations": result.evaluations,
        "top": [
            dict(layers=list(layers), score=score, params=params) for layers, score, params in result.top
        ],
        "history": result.history,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    logger.info(
        "subnet: accuracy %.2f on %s, %d parameters -> %s", result.score, args.split, result.params, args.out
    )
    if host is not None:
        export_subnet(model.cpu(), host, result.layers)
        petl_zoo.save_adapter(host, args.export)
        logger.info("fixed glora adapter saved to %s", args.export)
    return 0


if __name__ == "__main__":
    sys.exit(main())
