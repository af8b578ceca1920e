"""How methods attach to timm layers without rewriting timm's forwards: one delta protocol, two wrappers.

Every method module is a :class:`Delta`: ``forward(x, weight)`` returns an **additive update**.

- On a Linear (:class:`AdaptedLinear`), ``weight`` is the frozen weight slice ``W0[start:stop]`` and the
  update is added to that output slice: ``y = x W0^T + b`` then ``y[..., start:stop] += d(x, W0[start:stop])``.
  A delta with a weight-space form sets ``mergeable = True`` and implements ``delta_weight(weight)``: it
  can be folded into ``W0`` (:meth:`AdaptedLinear.merge`) and taken out exactly.
- On a timm sub-module (:class:`AdaptedModule`: an ``Mlp``, ``Attention`` or block), ``weight`` is None.
  Parallel deltas see the module's input, ``out = base(x) + d(x, None)``; sequential ones its output,
  ``out = m + d(m, None)`` with ``m = base(x)``. These depend on the input and never merge.

Whether a model merges is derived from what is attached (:func:`unmergeable_deltas`), never declared by
the method. Forward pre-hooks that a method puts on timm modules are owned by one :class:`HookRegistry`
(``Method.hooks``), which removes them all.

Every tensor that lives under a :class:`PetlModule` belongs to the method: it is saved by
``save_adapter`` and counted as the method's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .targets import LinearSite, ModuleSite, unfold_qkv_bias

__all__ = [
    "PetlModule",
    "Delta",
    "LinearDelta",
    "AdaptedLinear",
    "AdaptedModule",
    "HookRegistry",
    "adapt_linear",
    "adapt_module",
    "adapted_linears",
    "unmergeable_deltas",
    "unload_wrappers",
    "place_like_host",
]


class PetlModule(nn.Module):
    """Marker base class: parameters and persistent buffers below it are the method's own.

    :func:`place_like_host` puts every PetlModule on the device and in the floating dtype of the weights
    it adapts (a bf16 model on the GPU gets bf16 GPU deltas); a module that must keep float32 on purpose
    (e.g. accumulated statistics) sets ``keeps_float32 = True`` and is only moved to the device.
    """

    keeps_float32: bool = False


class Delta(PetlModule):
    """A method's trainable update; the one protocol of every method module (see the module docstring).

    ``forward(x, weight)`` returns the additive update for input ``x``: ``weight`` is the frozen weight
    slice (``[stop-start, in]``) on a Linear and None on a module. Deltas that live in weight space set
    ``mergeable = True`` and implement ``delta_weight(weight)`` (``[stop-start, in]``).
    """

    mergeable: bool = False

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self, weight: Tensor) -> Tensor:
        raise ValueError(f"{type(self).__name__} has no weight-space form and cannot be merged")


#: The former name of :class:`Delta` (a delta on a Linear slice), kept for existing code.
LinearDelta = Delta


class HookRegistry:
    """The forward pre-hooks one method registered on timm modules, removable together.

    Handles survive ``copy.deepcopy`` of the model that holds the method (they then point at the copy).
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add_forward_pre_hook(self, module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
        handle = module.register_forward_pre_hook(hook)
        self._handles.append(handle)
        return handle

    def remove(self) -> int:
        """Remove every hook registered through this registry; returns how many there were."""
        count = len(self._handles)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return count

    def __len__(self) -> int:
        return len(self._handles)


class _Wrapper(nn.Module):
    """Shared behaviour of the wrappers: attribute fall-through to the wrapped timm module."""

    _petl_wrapper = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)


class AdaptedLinear(_Wrapper):
    """A frozen ``nn.Linear`` plus additive updates on output slices (see module docstring)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict()
        self.slices: dict[str, tuple[int, int]] = {}
        self.merged = False
        self._original_weight: Tensor | None = None

    def add_delta(self, name: str, delta: Delta, start: int, stop: int) -> None:
        if name in self.deltas:
            raise ValueError(f"a delta named {name!r} is already attached to this layer")
        if not 0 <= start < stop <= self.base.out_features:
            raise ValueError(f"bad output slice [{start}, {stop}) for a Linear of {self.base.out_features}")
        self.deltas[name] = delta
        self.slices[name] = (start, stop)

    def remove_delta(self, name: str) -> Delta:
        delta = self.deltas.pop(name)
        del self.slices[name]
        return delta

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged or not len(self.deltas):
            return y
        weight = self.base.weight
        width = y.shape[-1]
        for name, delta in self.deltas.items():
            start, stop = self.slices[name]
            update = delta(x, weight[start:stop])
            if start == 0 and stop == width:
                y = y + update
            else:
                y[..., start:stop] += update
        return y

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every delta into the base weight: ``W <- W0 + delta_W(W0)``; a no-op when merged."""
        if self.merged:
            return
        for name, delta in self.deltas.items():
            if not delta.mergeable:
                raise ValueError(f"delta {name!r} ({type(delta).__name__}) cannot be merged")
        weight = self.base.weight
        original = weight.detach().clone()
        for name, delta in self.deltas.items():
            start, stop = self.slices[name]
            weight[start:stop] += delta.delta_weight(original[start:stop]).to(weight.dtype)
        self._original_weight = original
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weight W0 (kept from :meth:`merge`)."""
        if not self.merged:
            return
        self.base.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = False


class AdaptedModule(_Wrapper):
    """A timm sub-module plus parallel deltas (on its input) and sequential ones (on its output)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.parallel = nn.ModuleDict()
        self.sequential = nn.ModuleDict()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base(x, *args, **kwargs)
        for delta in self.parallel.values():
            out = out + delta(x, None)
        for delta in self.sequential.values():
            out = out + delta(out, None)
        return out


def adapt_linear(site: LinearSite) -> AdaptedLinear:
    """The :class:`AdaptedLinear` at ``site``, wrapping the Linear there on first use (after the site's
    ``before_adapt`` step, which makes the host's forward call the Linear: see :mod:`petl_zoo.targets`)."""
    current = site.linear
    if isinstance(current, AdaptedLinear):
        return current
    if site.before_adapt is not None:
        site.before_adapt()
    wrapper = AdaptedLinear(current)
    setattr(site.parent, site.attr, wrapper)
    return wrapper


def adapt_module(site: ModuleSite) -> AdaptedModule:
    """The :class:`AdaptedModule` at ``site``, wrapping the module there on first use."""
    current = site.module
    if isinstance(current, AdaptedModule):
        return current
    wrapper = AdaptedModule(current)
    setattr(site.parent, site.attr, wrapper)
    return wrapper


def _reference_tensor(module: nn.Module) -> Tensor | None:
    """The first floating parameter (else buffer) of ``module``: what a delta attached to it should match."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def _move(module: PetlModule, like: Tensor) -> None:
    dtype = None if module.keeps_float32 else like.dtype
    module.to(device=like.device, dtype=dtype)


@torch.no_grad()
def place_like_host(model: nn.Module) -> None:
    """Move every method module to the device and floating dtype of what it adapts: a Linear's weight for
    the deltas of an :class:`AdaptedLinear`, the wrapped module's weights for an :class:`AdaptedModule`,
    the model's own weights for any other PetlModule. Shared tensors stay shared (``Module.to`` swaps
    their data in place). Idempotent; ``create`` and ``load_adapter`` call it."""
    placed: set[int] = set()
    for module in model.modules():
        if isinstance(module, (AdaptedLinear, AdaptedModule)):
            like = _reference_tensor(module.base)
            children = (
                module.deltas.values()
                if isinstance(module, AdaptedLinear)
                else (
                    *module.parallel.values(),
                    *module.sequential.values(),
                )
            )
            for delta in children:
                if like is not None:
                    _move(delta, like)
                placed.update(id(m) for m in delta.modules())
    like = next((t for t in model.parameters() if t.is_floating_point()), None)
    for module in model.modules():
        if isinstance(module, PetlModule) and id(module) not in placed and like is not None:
            _move(module, like)
            placed.update(id(m) for m in module.modules())


def adapted_linears(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def unmergeable_deltas(model: nn.Module) -> list[str]:
    """Why the updates attached to ``model`` have no weight-space form: one entry per delta that blocks a
    merge (a delta on a Linear without one, or any delta on a module); empty when the model merges."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            found += [
                f"{name}.deltas.{key} ({type(d).__name__})"
                for key, d in module.deltas.items()
                if not d.mergeable
            ]
        elif isinstance(module, AdaptedModule):
            for kind in ("parallel", "sequential"):
                found += [
                    f"{name}.{kind}.{key} ({type(d).__name__} on a module)"
                    for key, d in getattr(module, kind).items()
                ]
    return found


def unload_wrappers(model: nn.Module) -> int:
    """Replace every wrapper by the timm module it wraps (its updates must be merged first).

    Returns the number of wrappers removed.
    """
    count = 0
    # children before parents, so that nested wrappers resolve by name
    for name, module in reversed(list(model.named_modules())):
        if not isinstance(module, (AdaptedLinear, AdaptedModule)):
            continue
        if isinstance(module, AdaptedLinear) and len(module.deltas) and not module.merged:
            raise ValueError(f"{name} holds unmerged updates; merge before unloading")
        if isinstance(module, AdaptedModule) and (len(module.parallel) or len(module.sequential)):
            raise ValueError(f"{name} holds input-dependent deltas that cannot be unloaded")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.base)
        count += 1
    for module in model.modules():  # separate q/v biases back where the host keeps them
        unfold_qkv_bias(module)
    return count
