"""Per-sample routing in one forward: the routed model and its :class:`RoutedLinear` layers.

The routed model is one more shell of the backbone (:func:`~petl_zoo.multi.shared.share_backbone`, heads
shared too: only its features are used) in which every Linear that some routed adapter adapts is a
:class:`RoutedLinear`. Each such layer holds, per adapter *slot* ``n``, that adapter's deltas on the
layer (the very modules of the adapter's own model). A forward reads the slot of every sample from the
shared :class:`Route` and adds, per sample ``b`` with slot ``n = idx[b]``::

    y_b = x_b W0^T + bias + (x_b D_n^T) U_n^T  [+ g_n * (x_b W0^T)]  [+ x_b dW_n^T]

- low-rank updates (LoRA, NEAT, DoRA, VeRA): every slot's deltas on the layer are stacked as in the
  one-pass training form (``layers._stacked``: ``D_n`` ``[R_n, in]``, ``U_n`` ``[out, R_n]``, the slices
  as blocks), zero-padded to the largest rank ``R`` into ``D`` ``[N, R, in]`` and ``U`` ``[N, out, R]``;
  then ``D[idx]`` and ``U[idx]`` are gathered and applied with two batched products (``torch.bmm``), no
  loop over samples (a batch whose samples all have one slot uses that slot's pair directly). Padded ranks and slots without a delta on the layer add exact zeros. DoRA's row
  scales ``g - 1`` are gathered the same way (``[N, out]``) and multiply ``y - bias``.
- dense updates (FourierFT: ``dW_n`` has full rank, a gather would copy ``[out, in]`` per sample): the
  batch is grouped by slot inside the layer, one product per slot present.

The rows of ``x`` are the samples' in batch-major order: ``x`` is ``[B, ...]``, or ``[B * k, ...]`` where
the ``k`` rows of each sample are contiguous (Swin's attention windows); any other leading size is a
ValueError. With gradients off the stacked factors are cached until a delta's tensor changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import AdaptedLinear, Delta, LowRank, _stacked
from .factors import adapted_sites, delta_form
from .shared import share_backbone

__all__ = ["Route", "RoutedLinear", "build_routed_model"]


class Route:
    """The slot of every sample of the batch that the routed model is running (None outside a run), and
    that slot when it is the same for every sample (``uniform``: the layers then skip the gather)."""

    def __init__(self) -> None:
        self.index: Tensor | None = None
        self.uniform: int | None = None

    @contextmanager
    def using(self, index: Tensor) -> Iterator[None]:
        self.index = index
        first = int(index[0])
        self.uniform = first if bool((index == first).all()) else None  # one check per forward
        try:
            yield
        finally:
            self.index = None
            self.uniform = None


class _Factors:
    """One layer's updates of every slot, stacked: low-rank ``down`` ``[N, R, in]``, ``up`` ``[N, out, R]``,
    ``scale`` ``[N, out]`` (DoRA's ``g - 1``; None when no slot has one), and the dense ``delta_W`` per
    slot."""

    def __init__(
        self, down: Tensor | None, up: Tensor | None, scale: Tensor | None, dense: dict[int, Tensor]
    ):
        self.down, self.up, self.scale, self.dense = down, up, scale, dense


class RoutedLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base``, the backbone's own) plus, per slot, the deltas of one adapter on
    its output slices; the slot of each sample comes from ``route`` (see the module docstring)."""

    def __init__(self, base: nn.Linear, route: Route, sources: Sequence[Sequence[tuple[int, int, Delta]]]):
        super().__init__()
        self.base = base
        self.route = route
        # the deltas live in the adapters' own models: plain lists, not registered twice
        self.sources = [list(slot) for slot in sources]
        self._cache: tuple[tuple, _Factors] | None = None

    def _key(self, x: Tensor) -> tuple:
        tensors = [self.base.weight] + [
            t for slot in self.sources for _, _, d in slot for t in (*d.parameters(), *d.buffers())
        ]
        return (x.dtype, x.device, *((t.data_ptr(), t._version) for t in tensors))

    def factors(self, x: Tensor) -> _Factors:
        """The stacked factors for activations like ``x`` (cached while gradients are off)."""
        if torch.is_grad_enabled():
            return self._stack(x.dtype)
        key = self._key(x)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._stack(x.dtype))
        return self._cache[1]

    def _stack(self, dtype: torch.dtype) -> _Factors:
        weight, width = self.base.weight, self.base.out_features
        low: list[tuple[Tensor, Tensor, Tensor | None] | None] = []
        dense: dict[int, Tensor] = {}
        for n, slot in enumerate(self.sources):
            forms, updates = [], []
            for start, stop, delta in slot:
                form = delta_form(delta, weight[start:stop], dtype)
                if isinstance(form, LowRank):
                    forms.append((start, stop, form))
                else:
                    updates.append(F.pad(form, (0, 0, start, width - stop)))
            if updates:
                dense[n] = torch.stack(updates).sum(0) if len(updates) > 1 else updates[0]
            low.append(_slot_low_rank(forms, width) if forms else None)
        return _pad_slots(low, weight.shape[1], width, weight.new_empty(0, dtype=dtype), dense)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        index = self.route.index
        if index is None:
            raise ValueError("a RoutedLinear runs inside MultiAdapterModel's routed forward only")
        batch = index.shape[0]
        if x.shape[0] % batch:
            raise ValueError(
                f"a routed Linear got {x.shape[0]} rows for a batch of {batch} samples: "
                "the host does not keep its rows batch-major"
            )
        f = self.factors(x)
        x3 = x.reshape(batch, -1, x.shape[-1])
        y3 = y.reshape(batch, -1, y.shape[-1])
        one = self.route.uniform
        out = y3
        if f.down is not None and one is None:  # y + (x D[idx]^T) U[idx]^T, the add fused into the product
            h = torch.bmm(x3, f.down[index].transpose(1, 2))
            out = torch.baddbmm(out, h, f.up[index].transpose(1, 2))
        elif f.down is not None:
            h = F.linear(x3, f.down[one]).flatten(0, 1)
            out = torch.addmm(out.flatten(0, 1), h, f.up[one].t()).view_as(out)
        if f.scale is not None:
            frozen = y3 if self.base.bias is None else y3 - self.base.bias.to(y3.dtype)
            out = out + frozen * (f.scale[index][:, None, :] if one is None else f.scale[one])
        for n, delta_w in f.dense.items():
            if one is not None:
                out = out + F.linear(x3, delta_w) if n == one else out
                continue
            rows = (index == n).nonzero().squeeze(1)
            if rows.numel():
                out = out.index_add(0, rows, F.linear(x3[rows], delta_w))
        return out.reshape(y.shape)


def _slot_low_rank(forms: list[tuple[int, int, LowRank]], width: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """One slot's ``(D, U, g)``: the stacked factors of its deltas and their row scales (zeros where a
    delta has none)."""
    down, up = _stacked(forms, width)
    scaled = [(start, stop, form.base_scale) for start, stop, form in forms if form.base_scale is not None]
    scale = None
    if scaled:
        scale = torch.stack([F.pad(g, (start, width - stop)) for start, stop, g in scaled]).sum(0)
    return down, up, scale


def _pad_slots(
    low: list[tuple[Tensor, Tensor, Tensor | None] | None],
    fan_in: int,
    width: int,
    like: Tensor,
    dense: dict[int, Tensor],
) -> _Factors:
    """Every slot's low-rank factors zero-padded to the largest rank and stacked over the slots (a slot
    without a low-rank delta on the layer: zeros), on ``like``'s device and in its dtype."""
    rank = max((entry[0].shape[0] for entry in low if entry is not None), default=0)
    if rank == 0:
        return _Factors(None, None, None, dense)
    downs, ups, scales = [], [], []
    for entry in low:
        d, u, g = entry if entry is not None else (like.new_zeros(0, fan_in), like.new_zeros(width, 0), None)
        downs.append(F.pad(d, (0, 0, 0, rank - d.shape[0])))
        ups.append(F.pad(u, (0, rank - u.shape[1])))
        scales.append(like.new_zeros(width) if g is None else g)
    scaled = any(entry is not None and entry[2] is not None for entry in low)
    return _Factors(torch.stack(downs), torch.stack(ups), torch.stack(scales) if scaled else None, dense)


def build_routed_model(base: nn.Module, shells: Sequence[nn.Module], route: Route) -> nn.Module:
    """A shell of ``base`` (tensors shared, heads too) whose Linears that any of ``shells`` adapts are
    :class:`RoutedLinear` layers; slot ``n`` is ``shells[n]``. Every shell must pass
    :func:`~petl_zoo.multi.factors.routing_blocker`."""
    routed = share_backbone(base, include_head=True)
    per_site: dict[str, list[list[tuple[int, int, Delta]]]] = {}
    for n, shell in enumerate(shells):
        for path, layer in adapted_sites(shell).items():
            slots = per_site.setdefault(path, [[] for _ in shells])
            slots[n] = _deltas(layer)
    for path, slots in per_site.items():
        parent_name, _, attr = path.rpartition(".")
        parent = routed.get_submodule(parent_name) if parent_name else routed
        setattr(parent, attr, RoutedLinear(getattr(parent, attr), route, slots))
    return routed.eval()


def _deltas(layer: AdaptedLinear) -> list[tuple[int, int, Delta]]:
    return [(*layer.slices[name], delta) for name, delta in layer.deltas.items()]
