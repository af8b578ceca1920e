"""What a run reports: ``result.json``'s dict and the lines the trainer logs at its start and its end."""

from __future__ import annotations

import resource
from typing import Any

import torch

from ..api import trainable_parameters
from . import distributed as D
from .spec import RunSpec
from .state import TrainState

__all__ = ["build_result", "start_line", "done_line", "peak_mem_mb"]


def peak_mem_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors on GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_result(
    spec: RunSpec, info: D.DistInfo, state: TrainState, wall_time_s: float, resumed_from: int | None
) -> dict[str, Any]:
    """``result.json``: accuracies (best, last, selected), cost (parameters, time, memory) and settings."""
    recipe, best, method = spec.recipe, state.best, state.method
    on_val = recipe["select_on"] == "val"
    trainable = trainable_parameters(state.model)
    return {
        "method": method.name,
        "model": spec.model,
        "task": spec.task,
        "seed": recipe["seed"],
        "num_classes": spec.num_classes,
        "method_config": method.config.to_dict(),
        "select_on": recipe["select_on"],
        "test_acc_best": best.test_acc,
        "best_epoch": best.test_epoch,
        "test_acc_last": best.last_test,
        "test_acc_selected": best.test_at_val if on_val else best.test_acc,
        "selected_epoch": best.val_epoch if on_val else best.test_epoch,
        "val_acc_best": best.val_acc,
        "val_acc_last": best.last_val,
        "epochs": recipe["epochs"],
        "trainable_params": trainable,
        "train_time_s": state.train_time_s,
        "wall_time_s": wall_time_s,
        "img_per_s": state.images_seen / max(state.train_time_s, 1e-9),
        "peak_mem_mb": peak_mem_mb(spec.device),
        "precision": recipe["precision"],
        "world_size": info.world_size,
        "device": spec.device.type,
        "resumed_from_epoch": resumed_from,
        "resolved_model": state.config.get("resolved_model", spec.model),
        "fingerprint": state.config.get("fingerprint"),
    }


def start_line(spec: RunSpec, info: D.DistInfo, state: TrainState, train_images: int, steps: int) -> str:
    """What is trained on what: parameter counts, data, schedule, batch, processes, precision."""
    counts, recipe = trainable_parameters(state.model), spec.recipe
    return (
        f"{state.method.name} on {spec.model} / {spec.task}: {counts['method']:,} method + {counts['head']:,} head "
        f"trainable parameters ({counts['percent']:.3f}% of the backbone); {train_images} train images, "
        f"{recipe['epochs']} epochs x {steps} steps, global batch {recipe['batch_size']} on "
        f"{info.world_size} x {spec.device.type}, {recipe['precision']}"
    )


def done_line(spec: RunSpec, state: TrainState, result: dict[str, Any]) -> str:
    """The closing summary: best and last test accuracy (and the val-selected one; val alone for a
    ``--no-test`` run), speed, the folder."""
    best = state.best
    if spec.test:
        sel = ""
        if spec.recipe["select_on"] == "val":
            sel = f", selected on val (epoch {best.val_epoch}) {best.test_at_val:.4f}"
        accuracy = (
            f"test acc best {best.test_acc:.4f} (epoch {best.test_epoch}), last {best.last_test:.4f}{sel}"
        )
    else:
        accuracy = (
            f"val acc best {best.val_acc:.4f} (epoch {best.val_epoch}), last {best.last_val:.4f}; no test"
        )
    return f"done: {accuracy}; train {state.train_time_s:.1f} s, {result['img_per_s']:.0f} img/s; wrote {spec.out}"
