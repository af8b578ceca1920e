"""Timed training steps and inference calls (wall clock, synchronised on CUDA)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from ..api import method_of
from ..registry import Method, TrainContext

__all__ = ["make_train_step", "make_inference", "timed"]


def _autocast_factory(device: torch.device, amp: torch.dtype | None) -> Callable[[], AbstractContextManager]:
    return (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext


def make_train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None
) -> Callable[[], None]:
    """One training step on ``(x, y)``: forward, cross-entropy, backward, the method's
    ``on_after_backward`` (when it has one), AdamW step on the trainable parameters, ``zero_grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    method = method_of(model)
    autocast = _autocast_factory(x.device, amp)
    ctx = TrainContext(device=x.device, autocast=autocast, epochs=1000, steps_per_epoch=1000)
    hook = method is not None and type(method).on_after_backward is not Method.on_after_backward

    def step() -> None:
        with autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if hook:
            method.on_after_backward(model, ctx)
            ctx.step += 1
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_inference(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> Callable[[], None]:
    """One ``no_grad`` forward of ``x`` (under autocast when ``amp`` is given)."""
    autocast = _autocast_factory(x.device, amp)

    def run() -> None:
        with torch.no_grad(), autocast():
            model(x)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    """Mean seconds of ``n`` calls of ``fn``."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n
