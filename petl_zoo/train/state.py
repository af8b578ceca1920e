"""``TrainState``: the run's model, optimizer, grad scaler and progress, and the one place where what
``last.pt`` holds is written (``state_dict``) and read back (``load_state_dict``).

``last.pt`` = ``TrainState.state_dict()``: the config, the finished epochs and optimizer steps, the
method's tensors and the head (``adapter_state_dict``), the method's structural state (``get_state()``),
the names of the trainable parameters, the AdamW and grad-scaler states, the python/numpy/torch/CUDA RNG
states, the best-so-far values, the epoch selected on val (its adapter), the metrics so far, the training
time and the images seen. Tensors and plain values only, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from ..api import adapter_state_dict, classifier_parameters, load_adapter_weights
from ..registry import Method
from .checkpoint import capture_rng, restore_rng
from .errors import TrainingError, UserError

__all__ = [
    "Best",
    "TrainState",
    "adapter_snapshot",
    "build_optimizer",
    "restore_adapter",
    "trainable_signature",
]


@dataclass
class Best:
    """Best-so-far and last accuracies (``None`` until the first evaluation; epochs are 1-based)."""

    test_acc: float | None = None
    test_epoch: int | None = None
    val_acc: float | None = None
    val_epoch: int | None = None
    test_at_val: float | None = None
    last_test: float | None = None
    last_val: float | None = None


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_signature(model: nn.Module) -> list[tuple[str, int, tuple[int, ...]]]:
    """Which tensors are trainable (name, identity, shape): a change means the optimizer is rebuilt."""
    return [(n, id(p), tuple(p.shape)) for n, p in _trainable(model)]


def _set_trainable(model: nn.Module, names: list[str]) -> None:
    wanted = set(names)
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"checkpoint names trainable parameters this model lacks, e.g. {unknown[:3]}")
    for name, p in params.items():
        p.requires_grad_(name in wanted)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    previous: torch.optim.Optimizer | None = None,
    head_scale: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW (``timm.optim.create_optimizer_v2``) over the trainable parameters: one group, weight decay
    on all of them, as the VTAB codebases do; AdamW state of parameters that were already trained
    (in ``previous``) carries over, a new tensor starts fresh.

    ``head_scale`` (``--head-lr``: head_lr / lr): the trainable classifier head
    (``petl_zoo.api.classifier_parameters``) in a group of its own at ``lr * head_scale``; the group
    keeps ``lr_scale`` so that each step sets its rate from the schedule's."""
    params = [p for _, p in _trainable(model)]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    groups: list[nn.Parameter] | list[dict[str, Any]] = params
    if head_scale is not None:
        head_ids = {id(p) for p in classifier_parameters(model)}
        head = [p for p in params if id(p) in head_ids]
        body = [p for p in params if id(p) not in head_ids]
        if not head:
            raise UserError("--head-lr is set but the classifier head is not trained; leave --head-lr out")
        head_group = {"params": head, "lr": lr * head_scale, "lr_scale": head_scale}
        groups = [{"params": body}, head_group] if body else [head_group]
    opt = create_optimizer_v2(groups, "adamw", lr=lr, weight_decay=weight_decay)
    if previous is not None:
        for p in params:
            if p in previous.state:
                opt.state[p] = previous.state[p]
    return opt


def adapter_snapshot(model: nn.Module) -> dict[str, Any]:
    """The trained part of ``model`` as CPU copies: ``model`` (tensors), ``method_state``, ``trainable``."""
    return {
        "model": {k: v.detach().to("cpu", copy=True) for k, v in adapter_state_dict(model).items()},
        "method_state": model.petl_method.get_state(),
        "trainable": [n for n, _ in _trainable(model)],
    }


def restore_adapter(model: nn.Module, snapshot: dict[str, Any], source: str) -> None:
    """Put an ``adapter_snapshot`` onto a freshly created model: the method's structure first
    (``set_state``), then which tensors are trainable, then the tensors."""
    model.petl_method.set_state(model, snapshot["method_state"])
    _set_trainable(model, snapshot["trainable"])
    load_adapter_weights(model, snapshot["model"], source=source)


class TrainState:
    """The run's live objects (``model`` with its method, ``optimizer``, ``scaler``) and its progress
    (``epoch`` finished epochs, ``global_step`` optimizer steps, ``train_time_s``, ``images_seen``,
    ``best``, ``metrics`` records, ``selected``: the snapshot of the best epoch on val)."""

    def __init__(self, config: dict[str, Any], model: nn.Module, device: torch.device) -> None:
        recipe = config["recipe"]
        self.config, self.model, self.device = config, model, device
        self.weight_decay = recipe["weight_decay"]
        head_lr = recipe["head_lr"]
        self.head_scale = None if head_lr is None else head_lr / recipe["lr"]
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler(device.type, enabled=recipe["precision"] == "fp16")
        self.epoch, self.global_step = 0, 0
        self.train_time_s, self.images_seen = 0.0, 0
        self.best = Best()
        self.metrics: list[dict[str, Any]] = []
        self.selected: dict[str, Any] | None = None

    @property
    def method(self) -> Method:
        return self.model.petl_method

    def rebuild_optimizer(self, lr: float) -> None:
        """A new AdamW over the current trainable set, carrying over the state of surviving tensors."""
        self.optimizer = build_optimizer(
            self.model, lr, self.weight_decay, previous=self.optimizer, head_scale=self.head_scale
        )

    def state_dict(self) -> dict[str, Any]:
        """What ``last.pt`` holds (tensors and plain values)."""
        if self.optimizer is None:
            raise RuntimeError("TrainState.state_dict() before the optimizer was built")
        return {
            "config": self.config,
            "epoch": self.epoch,
            "global_step": self.global_step,
            **adapter_snapshot(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng(),
            "best": asdict(self.best),
            "selected": self.selected,
            "metrics": self.metrics,
            "train_time_s": self.train_time_s,
            "images_seen": self.images_seen,
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Continue from ``state_dict()``'s ``state``. Expects the freshly created model, still on the
        CPU (``set_state`` may add modules): restores its structure and tensors, moves it to the device,
        rebuilds and restores the optimizer and the grad scaler, the progress, and last the RNG states."""
        restore_adapter(self.model, state, source)
        self.model.to(self.device)
        self.optimizer = None
        self.rebuild_optimizer(self.config["recipe"]["lr"])  # the saved param groups (lr too) replace it
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.train_time_s, self.images_seen = state["train_time_s"], state["images_seen"]
        self.best = Best(**state["best"])
        self.metrics = list(state["metrics"])
        self.selected = state["selected"]
        restore_rng(state["rng"])
