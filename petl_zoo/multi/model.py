"""Many task adapters, each with its own head, on one frozen timm model: :class:`MultiAdapterModel`.

Each adapter is loaded onto its own shell of the model (:mod:`petl_zoo.multi.shared`: the backbone's
tensors shared, the head and the method's tensors its own), so ``adapter_model(name)`` is exactly the
model :func:`petl_zoo.load_adapter` would give, and memory grows by the adapters' tensors and heads only.

- ``set_active(name)`` then ``model(x)``: the whole batch through that adapter's model, ``[B, C_name]``.
- ``model(x, adapter_names=[...])``: a mixed batch, one name per sample. Adapters of the additive
  low-rank family (LoRA, NEAT, DoRA, VeRA, FourierFT: :mod:`petl_zoo.multi.factors`) run together in
  one forward of the shared backbone with each sample's factors gathered (:mod:`petl_zoo.multi.routed`),
  then each sample's features go through its adapter's head (one call per adapter present). The others
  run grouped: one forward of the adapter's own model over its samples. One logged line says which
  adapters run which way whenever that plan changes. The result is ``[B, C_max]``: sample ``i``'s logits
  in its first ``C_i`` columns, ``-inf`` after them (argmax, softmax and top-k stay per-sample right).

The shared backbone must not change while adapters are loaded: a forward checks the tensors' version
counters and raises if they moved (e.g. ``petl_zoo.merge`` on ``adapter_model(name)``, which would fold
one task's update into every task's weights); ``merged_model(name)`` gives a merged copy instead.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..api import merge, method_of, read_adapter_config
from .factors import routing_blocker
from .routed import Route, build_routed_model
from .shared import attach_shared, backbone_tensors, check_same_backbone, tensor_versions

__all__ = ["MultiAdapterModel", "load_adapters", "PAD_LOGIT"]

logger = logging.getLogger(__name__)

#: The value after a sample's last class in a mixed batch's logits (classes differ per task).
PAD_LOGIT = float("-inf")


@dataclass
class _Plan:
    """Which adapters run batched in the routed model (name -> slot) and which grouped (name -> why)."""

    routed: dict[str, int] = field(default_factory=dict)
    grouped: dict[str, str] = field(default_factory=dict)
    model: nn.Module | None = None


class MultiAdapterModel(nn.Module):
    """Several task adapters with their heads side by side on one frozen, unpatched timm ``model`` (see
    the module docstring). Starts in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        existing = method_of(model)
        if existing is not None:
            raise ValueError(
                f"MultiAdapterModel takes an unpatched model; this one carries method '{existing.name}'"
            )
        self.base = model
        self.adapters = nn.ModuleDict()
        self._configs: dict[str, dict] = {}
        self._active: str | None = None
        self._route = Route()
        self._plan: _Plan | None = None
        self._shared = backbone_tensors(model)
        self._versions = tensor_versions(self._shared)
        self.eval()

    # ------------------------------------------------------------------------------- the adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    @property
    def active(self) -> str | None:
        return self._active

    def add_adapter(
        self,
        name: str,
        source: str | os.PathLike,
        *,
        verify: bool = True,
        adapter_dtype: torch.dtype | None = None,
        revision: str | None = None,
        token: str | None = None,
    ) -> None:
        """Load the adapter in ``source`` (a folder written by :func:`petl_zoo.save_adapter` or the
        trainer, or a Hub repo id) under ``name``, checked as :func:`petl_zoo.load_adapter` checks it;
        it must have been saved for this backbone (the saved base-model record) as the others were."""
        from ..hub import resolve_adapter_folder

        if name in self.adapters:
            raise ValueError(f"adapter name {name!r} is already loaded; loaded adapters: {self._names()}")
        if not isinstance(name, str) or not name or "." in name or hasattr(self.adapters, name):
            raise ValueError(
                f"adapter name {name!r} is not usable: a non-empty string without '.' that is not an "
                "nn.ModuleDict attribute (keys, items, update, ...)"
            )
        self._check_backbone()
        folder = resolve_adapter_folder(source, revision=revision, token=token)
        config = read_adapter_config(folder)
        check_same_backbone(self.base, name, config, self._configs)
        shell = attach_shared(self.base, folder, config, verify=verify, adapter_dtype=adapter_dtype)
        shell.train(self.training)
        self.adapters[name] = shell
        self._configs[name] = config
        self._plan = None
        self._versions = tensor_versions(self._shared)
        if self._active is None:
            self._active = name

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (its model, tensors and head); the next one becomes active if it was."""
        self._require(name)
        del self.adapters[name]
        del self._configs[name]
        self._plan = None
        if self._active == name:
            self._active = next(iter(self.adapters), None)

    def set_active(self, name: str) -> None:
        """The adapter that ``model(x)`` (no ``adapter_names``) runs the whole batch through."""
        self._require(name)
        self._active = name

    def num_classes(self, name: str) -> int:
        """The class count of adapter ``name``'s head."""
        return int(self._require(name).num_classes)

    def adapter_model(self, name: str) -> nn.Module:
        """Adapter ``name``'s own model: the model :func:`petl_zoo.load_adapter` would give, sharing this
        backbone (do not merge it: use :meth:`merged_model`)."""
        return self._require(name)

    def merged_model(self, name: str) -> nn.Module:
        """An independent copy of adapter ``name``'s model (its own backbone tensors) with the adapter
        merged into its weights (:func:`petl_zoo.merge`): single-task inference without overhead."""
        return merge(copy.deepcopy(self._require(name)))

    def routing(self) -> dict[str, str]:
        """How each adapter runs in a mixed batch: ``'batched'`` or ``'grouped: <why>'``."""
        plan = self._current_plan()
        return {
            name: "batched" if name in plan.routed else f"grouped: {plan.grouped[name]}"
            for name in self.adapters
        }

    def _names(self) -> str:
        return ", ".join(self.adapters) or "none"

    def _require(self, name: str) -> nn.Module:
        if not isinstance(name, str) or name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; loaded adapters: {self._names()}")
        return self.adapters[name]

    def _check_backbone(self) -> None:
        if tensor_versions(self._shared) != self._versions:
            raise ValueError(
                "the shared backbone's tensors were changed in place since the adapters were loaded "
                "(petl_zoo.merge on adapter_model(name)?); use merged_model(name) for a merged copy"
            )

    def _current_plan(self) -> _Plan:
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def _make_plan(self) -> _Plan:
        plan = _Plan()
        for name, shell in self.adapters.items():
            why = routing_blocker(shell, self.base)
            if why is None:
                plan.routed[name] = len(plan.routed)
            else:
                plan.grouped[name] = why
        if plan.routed:
            shells = [self.adapters[name] for name in plan.routed]
            plan.model = build_routed_model(self.base, shells, self._route)
        grouped = "; ".join(f"{name} ({why})" for name, why in plan.grouped.items()) or "none"
        logger.info(
            "multi-adapter: %d adapter(s) batched per sample in one forward (%s); grouped by adapter, "
            "one forward per group: %s",
            len(plan.routed),
            ", ".join(plan.routed) or "none",
            grouped,
        )
        return plan

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        """``to()``, ``double()``, ``cuda()`` ...: the backbone once, then each adapter's own tensors; the
        shells keep sharing the backbone (``Module._apply`` replaces buffers, so the shells' references to
        the backbone's buffers are pointed at the converted ones first)."""
        old = {id(t): (m, k) for m in self.base.modules() for k, t in m._buffers.items() if t is not None}
        self.base._apply(fn, recurse)
        for shell in self.adapters.values():
            for module in shell.modules():
                for key, tensor in list(module._buffers.items()):
                    if tensor is not None and id(tensor) in old:
                        owner, name = old[id(tensor)]
                        module._buffers[key] = owner._buffers[name]
            shell._apply(fn, recurse)  # the shared Parameters are converted in place already: a no-op
        self._shared = backbone_tensors(self.base)
        self._versions = tensor_versions(self._shared)
        self._plan = None  # the routed model is rebuilt on the converted tensors
        return self

    # ------------------------------------------------------------------------------- the forward
    def forward(self, x: Tensor, adapter_names: str | Sequence[str] | None = None) -> Tensor:
        """Logits of the batch ``x``: through the active adapter (``adapter_names`` None), one adapter
        (a name), or each sample's (a sequence of ``len(x)`` names; ``[B, C_max]``, see the module
        docstring)."""
        self._check_backbone()
        if adapter_names is None:
            if self._active is None:
                raise ValueError("no adapter is loaded: call add_adapter(name, folder) first")
            return self.adapters[self._active](x)
        if isinstance(adapter_names, str):
            return self._require(adapter_names)(x)
        names = list(adapter_names)
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {x.shape[0]} samples")
        for name in dict.fromkeys(names):
            self._require(name)
        return self._mixed(x, names)

    def _mixed(self, x: Tensor, names: list[str]) -> Tensor:
        plan = self._current_plan()
        present = list(dict.fromkeys(names))
        order = {name: i for i, name in enumerate(present)}
        which = torch.tensor([order[n] for n in names], device=x.device)
        width = max(self.num_classes(name) for name in present)
        out: Tensor | None = None
        routed = [name for name in present if name in plan.routed]
        pieces: list[tuple[Tensor, Tensor]] = []  # (rows of x, their logits) per adapter
        if routed:
            pieces += self._routed_logits(x, routed, which, order, plan)
        for name in present:
            if name not in plan.routed:
                rows = (which == order[name]).nonzero().squeeze(1)
                pieces.append((rows, self.adapters[name](x[rows])))
        for rows, logits in pieces:
            if out is None:
                out = logits.new_full((x.shape[0], width), PAD_LOGIT)
            out[rows, : logits.shape[1]] = logits
        return out

    def _routed_logits(
        self, x: Tensor, names: list[str], which: Tensor, order: dict[str, int], plan: _Plan
    ) -> list[tuple[Tensor, Tensor]]:
        """One forward of the routed model over the samples of routed adapters, then each adapter's head
        over its samples' features: ``(rows of x, logits)`` per adapter."""
        slot_of = torch.full((len(order),), -1, dtype=torch.long, device=x.device)
        for name in names:
            slot_of[order[name]] = plan.routed[name]
        slots = slot_of[which]
        rows = (slots >= 0).nonzero().squeeze(1)
        every = rows.numel() == x.shape[0]
        if plan.model.training != self.training:
            plan.model.train(self.training)
        with self._route.using(slots if every else slots[rows]):
            features = plan.model.forward_features(x if every else x[rows])
        pieces = []
        for name in names:
            mine = (slots[rows] == plan.routed[name]).nonzero().squeeze(1)
            pieces.append((rows[mine], self.adapters[name].forward_head(features[mine])))
        return pieces


def load_adapters(
    model: nn.Module,
    sources: Mapping[str, str | os.PathLike],
    *,
    verify: bool = True,
    adapter_dtype: torch.dtype | None = None,
) -> MultiAdapterModel:
    """A :class:`MultiAdapterModel` on the unpatched ``model`` with every adapter of ``sources`` (name ->
    adapter folder, run folder or Hub repo id) loaded, the first one active, in eval mode."""
    if not sources:
        raise ValueError("load_adapters needs at least one adapter: {name: folder, ...}")
    multi = MultiAdapterModel(model)
    for name, source in sources.items():
        multi.add_adapter(name, source, verify=verify, adapter_dtype=adapter_dtype)
    return multi
