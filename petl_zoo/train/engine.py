"""The small pieces the trainer and ``tools/eval.py`` share: seeding, the precision context, evaluation."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["seed_everything", "make_autocast", "evaluate_counts", "evaluate"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (what the backbone's random init and the method draw from)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """The loop's precision context factory: ``torch.autocast`` for bf16/fp16, a no-op for fp32."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_counts(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> tuple[int, int]:
    """(correct, total) of top-1 predictions over ``loader`` (model in eval mode, restored after)."""
    from tqdm import tqdm

    autocast = autocast or nullcontext
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    try:
        for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast():
                logits = model(images)
            correct += (logits.argmax(dim=-1) == labels).sum()
            total += labels.numel()
    finally:
        model.train(was_training)
    return int(correct.item()), total


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` over ``loader``."""
    correct, total = evaluate_counts(model, loader, torch.device(device), autocast)
    if total == 0:
        raise ValueError("evaluation loader yielded no samples")
    return correct / total
