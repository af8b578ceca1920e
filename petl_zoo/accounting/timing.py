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

__all__ = ["TrainStep", "make_train_step", "make_inference", "timed"]


def _autocast_factory(device: torch.device, amp: torch.dtype | None) -> Callable[[], AbstractContextManager]:
    return (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext


class TrainStep:
    """One training step on ``(x, y)``: :meth:`forward` (cross-entropy of ``forward_fn(x)`` under autocast)
    then :meth:`finish` (backward, the method's ``on_after_backward`` when it has one, AdamW step on the
    trainable parameters, ``zero_grad``); calling the object does both. ``forward_fn`` is the model or a
    compiled form of it (``torch.compile(model)``, which shares its parameters)."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        amp: torch.dtype | None,
        forward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model, self.x, self.y = model, x, y
        self.forward_fn = model if forward_fn is None else forward_fn
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
        self.method = method_of(model)
        self.autocast = _autocast_factory(x.device, amp)
        self.context = TrainContext(
            device=x.device, autocast=self.autocast, epochs=1000, steps_per_epoch=1000
        )
        method = self.method
        self.hook = method is not None and type(method).on_after_backward is not Method.on_after_backward

    def forward(self) -> torch.Tensor:
        with self.autocast():
            return nn.functional.cross_entropy(self.forward_fn(self.x), self.y)

    def finish(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.hook:
            self.method.on_after_backward(self.model, self.context)
            self.context.step += 1
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.finish(self.forward())


def make_train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: torch.dtype | None,
    forward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TrainStep:
    """One training step on ``(x, y)`` (a :class:`TrainStep`): forward, cross-entropy, backward, the
    method's ``on_after_backward`` (when it has one), AdamW step on the trainable parameters,
    ``zero_grad``. ``forward_fn`` replaces ``model`` in the forward (e.g. its compiled form)."""
    return TrainStep(model, x, y, amp, forward_fn)


def make_inference(
    model: Callable[[torch.Tensor], Any], x: torch.Tensor, amp: torch.dtype | None
) -> Callable[[], None]:
    """One ``no_grad`` forward of ``x`` through ``model`` (a module or its compiled form; under autocast
    when ``amp`` is given)."""
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
