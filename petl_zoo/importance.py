"""First-order Taylor importance scores for groups of parameters (used by Pear and HEAT).

Removing a group ``a`` of parameters (setting them to zero) changes the loss by, to first order,
``L(theta with a = 0) - L(theta) ~ -sum_{theta in a} theta * dL/dtheta``. Two scores follow:

- ``mode='group'``: ``I_a = | sum_{theta in a} theta * dL/dtheta |`` (Molchanov et al., 2019, group form);
- ``mode='abs'``:   ``I_a = sum_{theta in a} | theta * dL/dtheta |`` (per-parameter terms).

Scores are computed per batch from the gradients currently in ``.grad`` and summed over batches
with :class:`TaylorAccumulator`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["ParamSlice", "taylor_scores", "TaylorAccumulator", "row_topk"]

#: A tensor (whose ``.grad`` is read) or a tensor with an index selecting part of it (e.g. a head's rows).
ParamSlice = Tensor | tuple[Tensor, object]

Mode = Literal["group", "abs"]


def _term(item: ParamSlice) -> Tensor:
    tensor, index = (item, None) if isinstance(item, Tensor) else item
    if tensor.grad is None:
        return torch.zeros_like(tensor if index is None else tensor[index])
    prod = tensor.detach() * tensor.grad.detach()
    return prod if index is None else prod[index]


def taylor_scores(groups: Mapping[str, Sequence[ParamSlice]], mode: Mode = "group") -> dict[str, float]:
    """Taylor score of each named group from the gradients currently stored in ``.grad``.

    A parameter with no gradient contributes zero.
    """
    if mode not in ("group", "abs"):
        raise ValueError(f"unknown Taylor mode {mode!r}; valid modes: 'group', 'abs'")
    scores = {}
    for name, items in groups.items():
        terms = [_term(item).float() for item in items]
        if mode == "group":
            total = sum((t.sum() for t in terms), torch.zeros(()))
            scores[name] = float(total.abs())
        else:
            scores[name] = float(sum((t.abs().sum() for t in terms), torch.zeros(())))
    return scores


class TaylorAccumulator:
    """Sums per-batch Taylor scores of parameter groups: call :meth:`update` after each backward."""

    def __init__(self, groups: Mapping[str, Sequence[ParamSlice]], mode: Mode = "group") -> None:
        self.groups = dict(groups)
        self.mode = mode
        self.totals = dict.fromkeys(self.groups, 0.0)
        self.batches = 0

    def update(self) -> None:
        for name, score in taylor_scores(self.groups, self.mode).items():
            self.totals[name] += score
        self.batches += 1

    def scores(self) -> dict[str, float]:
        return dict(self.totals)


def row_topk(score: Tensor, k: int) -> Tensor:
    """Per row of ``score`` (``[rows, cols]``), the columns of the ``k`` largest ``|score|``, ascending
    (GPS: the top-k input connections of each neuron by gradient magnitude). Ties: torch.topk's order."""
    if not 0 < k <= score.shape[1]:
        raise ValueError(f"k = {k} must be in 1..{score.shape[1]}")
    return score.abs().topk(k, dim=1).indices.sort(dim=1).values
