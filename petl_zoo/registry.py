"""The method registry and the :class:`Method` base class every PETL method subclasses."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from .config import MethodConfig
from .layers import HookRegistry

__all__ = [
    "Method",
    "TrainContext",
    "register_method",
    "unregister_method",
    "get_method",
    "list_methods",
    "method_names",
]

_REGISTRY: dict[str, type[Method]] = {}

M = TypeVar("M", bound="type[Method]")


@dataclass
class TrainContext:
    """What the training loop tells a method's callbacks.

    ``loss_fn(logits, targets)`` is the training loss; ``autocast()`` is the loop's precision context;
    ``epoch``/``step`` are updated by the loop (``step`` counts optimizer steps from 0).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    autocast: Callable[[], AbstractContextManager] = nullcontext
    epochs: int = 1
    steps_per_epoch: int = 1
    epoch: int = 0
    step: int = 0
    is_main: bool = True


class Method:
    """Base class of a PETL method: a typed config plus an injector that patches one model in place.

    Subclasses set ``config_class`` (a :class:`MethodConfig` dataclass whose defaults are the paper's
    VTAB-1K setting) and implement :meth:`apply`, which attaches :class:`~petl_zoo.layers.Delta` modules
    through :mod:`petl_zoo.layers`. ``create`` freezes the backbone before ``apply`` and makes the
    classifier head trainable after it, so parameters that ``apply`` adds are trainable unless the method
    sets ``requires_grad=False`` on them. Whether the model merges follows from the attached deltas
    (``petl_zoo.is_mergeable``); ``identity_at_init`` says that the patched model computes exactly what
    the unpatched one did (the contract test checks it). Forward pre-hooks go through ``self.hooks``.

    Methods whose structure changes during training (pruning, masking) return that structure from
    :meth:`get_state` (JSON-ready) and rebuild it in :meth:`set_state`; ``save_adapter`` stores it and
    ``load_adapter`` and resumed runs restore it before loading weights. The training loop calls the
    ``on_*`` callbacks; a callback may change the set of trainable parameters, and the loop then
    rebuilds its optimizer.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: True when the patched model's outputs equal the unpatched model's until training moves them.
    identity_at_init: ClassVar[bool] = False
    #: Training-recipe values from the paper that override the shared VTAB recipe (e.g. {"lr": 1e-3}).
    recipe: ClassVar[dict[str, Any]] = {}
    #: Host families (``petl_zoo.targets``) the method supports, None for all; with the reason for the
    #: others in ``unsupported_reason`` (``create`` names both in its error).
    families: ClassVar[tuple[str, ...] | None] = None
    unsupported_reason: ClassVar[str] = ""
    #: The ``adapter_dtype`` the method was created with (``petl_zoo.create``; None: the default rule of
    #: :func:`petl_zoo.layers.adapter_dtype_for`): what later placements of new modules use.
    adapter_dtype: torch.dtype | None = None

    @classmethod
    def check_family(cls, family: str) -> None:
        """A ValueError when the method cannot attach to a model of host family ``family``."""
        if cls.families is not None and family not in cls.families:
            why = f": {cls.unsupported_reason}" if cls.unsupported_reason else ""
            raise ValueError(
                f"method '{cls.name}' does not support the {family} family{why}; supported: {', '.join(cls.families)}"
            )

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.hooks = HookRegistry()

    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def unload(self, model: nn.Module) -> None:
        """Called by ``merge(unload=True)`` once the deltas are folded and the wrappers replaced: leave a
        plain timm model. Removes the method's hooks; a method whose hooks are part of the function folds
        them into the weights first (HEAT's head gates)."""
        self.hooks.remove()

    @classmethod
    def upgrade_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options of a saved adapter folder, for this version of the method: a method whose default
        changed fills in what older folders ran with (they did not record the option). Identity here."""
        return options

    def get_state(self) -> dict[str, Any]:
        """Structural state created during training (JSON-ready); empty for static methods."""
        return {}

    def set_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Rebuild the structure described by :meth:`get_state` on a freshly patched model."""
        if state:
            raise ValueError(f"method '{self.name}' has no structural state, got keys {sorted(state)}")

    def stored_tensors(self, model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """What ``save_adapter`` writes for ``state`` (:func:`petl_zoo.adapter_state_dict`'s tensors of
        ``model``): ``state`` itself, or a method's compact stored form (binary_adapter's sign bits),
        which :meth:`loaded_tensors` reads back."""
        return state

    def loaded_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The inverse of :meth:`stored_tensors`: ``tensors`` (from a file or a snapshot) as
        :func:`petl_zoo.adapter_state_dict` names and shapes them. Identity here."""
        return tensors

    # Training callbacks (no-ops by default).
    def on_train_start(self, model: nn.Module, loader: Any, ctx: TrainContext) -> None:
        """Called once before the first epoch (not on resume), before the optimizer is built."""

    def on_after_backward(self, model: nn.Module, ctx: TrainContext) -> None:
        """Called after each backward pass, before the optimizer step (gradients are available)."""

    def on_epoch_end(self, model: nn.Module, epoch: int, ctx: TrainContext) -> None:
        """Called after each training epoch (0-based ``epoch``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def register_method(name: str, description: str | None = None) -> Callable[[M], M]:
    """Class decorator registering a :class:`Method` subclass under ``name``.

    Third-party code can register its own method the same way, without touching petl_zoo::

        @petl_zoo.register_method("my_method", "one-line description")
        class MyMethod(petl_zoo.Method):
            config_class = MyConfig
            def apply(self, model): ...
    """

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method expects a Method subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        if description is not None:
            cls.description = description
        elif not cls.description:
            cls.description = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = cls
        return cls

    return decorator


def unregister_method(name: str) -> type[Method]:
    """Remove a registered method (tests that register a toy method undo it); returns its class."""
    if name not in _REGISTRY:
        raise ValueError(f"no method named {name!r} is registered; registered: {', '.join(method_names())}")
    return _REGISTRY.pop(name)


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The registered method class; an unknown name gets a ValueError listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown method {name!r}{hint}; valid methods: {', '.join(method_names())}"
        ) from None


def list_methods() -> dict[str, str]:
    """Registered method names with their one-line descriptions."""
    return {name: _REGISTRY[name].description for name in method_names()}
