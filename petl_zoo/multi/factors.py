"""Which adapters can be routed per sample, and the factors of their updates.

An adapter is *routed* (batched per sample inside one forward of the shared backbone) when everything it
adds to the model is an additive update on the output slice of a plain ``nn.Linear`` of one of the
deltas of :data:`ROUTABLE_DELTAS`, whose form is known exactly:

- a low-rank form ``(x D^T) U^T [+ g * (x W0_slice^T)]`` (:class:`~petl_zoo.layers.LowRank`): LoRA
  (``D = A``, ``U = s B``), NEAT (``D = s act(A W0)`` + hidden layers, ``U = B``), DoRA (LoRA's pair times
  the row scale ``g``, plus ``base_scale = g - 1``) and VeRA (``D = diag(d) A``, ``U = diag(b) B``);
- a dense form ``x delta_W^T`` (``delta_W`` of the slice's shape): FourierFT, whose update has full rank.

Only these exact classes route (a subclass may change the forward); anything else (prompts, bottleneck
adapters, hooks, wrapped modules, input deltas, methods that change the host's structure) makes
:func:`routing_blocker` return why, and the adapter runs grouped: one forward of its own model per group
of samples. The factors are computed in the dtype of the activations, as the deltas' forwards compute.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from ..api import method_of
from ..layers import AdaptedLinear, Delta, LowRank, PetlModule, Wrapper, cast_method_tensors
from ..methods.dora import DoraDelta
from ..methods.fourierft import FourierFTDelta
from ..methods.lora import LoraDelta
from ..methods.neat import NeatDelta
from ..methods.vera import VeraDelta
from ..targets import classifier_modules
from .shared import backbone_tensors

__all__ = ["ROUTABLE_DELTAS", "delta_form", "routing_blocker", "adapted_sites"]


def _vera(delta: VeraDelta, weight: Tensor) -> LowRank:
    a, b = delta.matrices()
    return LowRank(delta.vera_lambda_d[:, None] * a, delta.vera_lambda_b[:, None] * b)


def _fourierft(delta: FourierFTDelta, weight: Tensor) -> Tensor:
    return delta.delta_weight(weight)


def _own_low_rank(delta: Delta, weight: Tensor) -> LowRank:
    form = delta.low_rank(weight)
    if form is None:  # LoRA/DoRA with an active dropout: no per-sample form to batch
        raise ValueError(
            f"{type(delta).__name__} has no low-rank form in train mode with dropout: route mixed batches "
            "in eval mode (model.eval())"
        )
    return form


#: Delta class -> its form on the frozen slice ``W0``: a :class:`LowRank` or a dense ``delta_W``.
ROUTABLE_DELTAS: dict[type[Delta], Callable[[Delta, Tensor], LowRank | Tensor]] = {
    LoraDelta: _own_low_rank,
    NeatDelta: _own_low_rank,
    DoraDelta: _own_low_rank,
    VeraDelta: _vera,
    FourierFTDelta: _fourierft,
}


def delta_form(delta: Delta, weight: Tensor, dtype: torch.dtype) -> LowRank | Tensor:
    """The form of ``delta`` on the slice ``weight`` in ``dtype`` (the activations'): a :class:`LowRank`
    with ``forward(x, weight) == (x down^T) up^T [+ base_scale * (x weight^T)]``, or a dense
    ``delta_W`` with ``forward(x, weight) == x delta_W^T``."""
    cast = cast_method_tensors(delta, dtype) if delta.casts_to_input else nullcontext()
    with cast:
        form = ROUTABLE_DELTAS[type(delta)](delta, weight)
    if isinstance(form, LowRank):
        return LowRank(*(None if t is None else t.to(dtype) for t in form))
    return form.to(dtype)


def adapted_sites(shell: nn.Module) -> dict[str, AdaptedLinear]:
    """The adapted Linears of a shell by module path (the path of the wrapped Linear in the model)."""
    return {name: m for name, m in shell.named_modules() if isinstance(m, AdaptedLinear)}


def routing_blocker(shell: nn.Module, base: nn.Module) -> str | None:
    """Why the adapter on ``shell`` (a shell of ``base``) cannot be routed per sample; None when it can:
    only deltas of :data:`ROUTABLE_DELTAS` on output slices of plain Linears, no hooks, no other method
    module, and the host's structure and tensors otherwise those of ``base``."""
    if not (
        callable(getattr(base, "forward_features", None)) and callable(getattr(base, "forward_head", None))
    ):
        return f"the host ({type(base).__name__}) has no forward_features/forward_head to share the features"
    method = method_of(shell)
    if method is not None and len(method.hooks):
        return f"method '{method.name}' puts forward hooks on the host"
    inside: set[str] = set()
    for name, module in shell.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, AdaptedLinear):
            why = _linear_blocker(name, module)
            if why:
                return why
            inside.add(f"{name}.deltas.")
            inside.add(f"{name}.input_deltas.")
        elif isinstance(module, (Wrapper, PetlModule)):
            return f"{name} is a {type(module).__name__}, not an update on a Linear's output"
    return _structure_blocker(shell, base)


def _linear_blocker(name: str, layer: AdaptedLinear) -> str | None:
    if len(layer.input_deltas):
        return f"{name} has input deltas (they change what the Linear reads)"
    if type(layer.base) is not nn.Linear or layer.base._forward_hooks or layer.base._forward_pre_hooks:
        return f"{name} wraps a {type(layer.base).__name__} with hooks or of another kind than nn.Linear"
    for key, delta in layer.deltas.items():
        if type(delta) not in ROUTABLE_DELTAS:
            kinds = ", ".join(t.__name__ for t in ROUTABLE_DELTAS)
            return f"{name}.deltas.{key} is a {type(delta).__name__}, not one of {kinds}"
        if delta._forward_hooks or delta._forward_pre_hooks:
            return f"{name}.deltas.{key} has hooks of its own"
    return None


def _structure_blocker(shell: nn.Module, base: nn.Module) -> str | None:
    """Why the shell's host is not ``base``'s: another module at some path (a wrapper is seen through to
    the Linear it wraps), or a backbone tensor of its own (a method that moved a bias into a Linear, as
    on Eva or BEiT)."""
    sites = adapted_sites(shell)
    inside = tuple(f"{name}.{part}" for name in sites for part in ("deltas", "input_deltas"))
    mine: dict[str, type] = {}
    for name, module in shell.named_modules():
        if name in sites or name.startswith(inside):
            continue
        owner = name[: -len(".base")]
        mine[owner if name.endswith(".base") and owner in sites else name] = type(module)
    theirs = {name: type(m) for name, m in base.named_modules()}
    differs = sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
    if differs:
        return f"the method changes the host's structure at {differs[0]!r}"
    own = backbone_tensors(base)
    for module in (
        *classifier_modules(shell),
        *(d for layer in sites.values() for d in layer.deltas.values()),
    ):
        own.update({id(t): t for t in (*module.parameters(), *module.buffers())})
    for name, tensor in (*shell.named_parameters(), *shell.named_buffers()):
        if id(tensor) not in own:
            return f"the method gives the host a tensor of its own ({name})"
    return None
