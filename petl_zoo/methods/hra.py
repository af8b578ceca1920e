"""HRA: Householder reflection adaptation (Yuan, Liu, Xu & Zhu, NeurIPS 2024).

Torch layout, a frozen Linear ``y = x W0^T + b`` with ``W0`` of shape ``[out, in]``. HRA multiplies the
frozen weight on its input side by an orthogonal matrix, a chain of ``r`` trainable Householder
reflections, one vector ``u_i`` (``[in]``) each::

    H_i = I - 2 u_i u_i^T / ||u_i||^2
    W'  = W0 H_0 H_1 ... H_{r-1}                 (peft's ``get_delta_weight``: W <- W - 2 (W u_i) u_i^T)
    y   = x W'^T + b

``hra_u`` (``[in, r]``, the columns ``u_i``) is peft's tensor, initialised as peft and the authors do:
``r / 2`` columns kaiming-uniform (``a = sqrt(5)``) and each repeated once (``repeat_interleave``), so
the reflections come in equal pairs, ``H_{2k} H_{2k+1} = I``, and the model starts unchanged. An odd
``r`` cannot pair its columns: as peft, every column is then drawn at random, with a warning.
``apply_gs`` (peft's ``apply_GS``) orthonormalises the columns by Gram-Schmidt (``Q``, in peft's order)
and uses ``W' = W0 (I - 2 Q Q^T)``; as in peft and the authors' code this does not start at the
identity (the paired columns leave rounding noise as the second vector of each pair), so use it from a
trained or perturbed ``hra_u``.

Computed form (exact, cheaper than forming ``H``): ``W' - W0`` has rank ``r``. Each pair
``a = u_{2k}/||u_{2k}||``, ``b = u_{2k+1}/||u_{2k+1}||`` gives ``H_{2k} H_{2k+1} = I + a e^T + d f^T``
with ``d = a - b``, ``e = -2 (d + ||d||^2 b)``, ``f = 2 b`` (the identity ``a.b - 1 = -||d||^2 / 2`` of
unit vectors; an odd last column gives ``I + a (-2 a)^T``). With ``V`` the columns ``a, d, ...``
(``[in, r]``) and ``E`` the rows ``e, f, ...`` (``[r, in]``), the chain telescopes to
``W' - W0 = (W0 V) M E`` with ``M = (I - N)^{-1}`` (``[r, r]``; ``N`` the block strictly upper part of
``E V``), built pair by pair. The delta is therefore a :class:`~petl_zoo.layers.LowRank` update,
``down = E``, ``up = W0 V M``: a training step runs every slice of the layer in one GEMM, as LoRA's;
inference adds ``(x E^T) up^T``. At the paired initialisation ``d = 0`` and ``e = 0`` exactly, so the
update is exactly zero (peft's product form is identity only up to rounding). The factors are
computed in float32 (or wider), as peft computes ``H``, and cast to the activations' dtype.

Sites: each adapted output slice has its own reflections (``[in, r]``), acting on the input side of that
slice only. Defaults: ``r = 8``, no Gram-Schmidt (the authors' code and peft), on the query, key,
value and output projections (``q``, ``k``, ``v`` slices of the fused ``qkv`` and ``proj``: the
authors' vision setting, their Stable Diffusion code adapts ``to_q``, ``to_k``, ``to_v``, ``to_out``;
the paper reports no VTAB-1K numbers): 294,912 trainable parameters on ViT-B/16 (head excluded);
``targets=("q", "v")``: 147,456; peft's ``target_modules=["qkv"]`` (one chain for the fused layer, shared
by q, k and v) is ``targets=("qkv",)``: 73,728. Mergeable: ``W0 <- W0 + (W0 V M) E``.

Compared with peft 0.21.2 (``HRAConfig``) in float64 on a tiny timm ViT, fused ``qkv`` and q/v on a
split copy, with and without Gram-Schmidt: outputs, gradients and merged weights within 1e-10
(``tests/test_hra.py``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, positive
from ..layers import Delta, LowRank, adapt_linear
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, check_targets, linear_sites

__all__ = ["HraConfig", "HraDelta", "Hra", "gram_schmidt", "hra_factors"]


@dataclass
class HraConfig(MethodConfig):
    """HRA options: ``rank`` = ``r``, the number of reflections per site (even: paired identity init),
    ``apply_gs`` = orthonormalise them by Gram-Schmidt (peft's ``apply_GS``), ``targets`` the Linear
    output slices (each gets its own reflections)."""

    rank: int = positive(8)
    apply_gs: bool = False
    targets: tuple[str, ...] = ("q", "k", "v", "proj")

    def validate(self) -> None:
        check_targets(self.targets, LINEAR_TARGETS, "hra")


def gram_schmidt(u: Tensor) -> Tensor:
    """The columns of ``u`` (``[in, r]``) orthonormalised in order (modified Gram-Schmidt, peft's loop)."""
    basis = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
    for i in range(1, u.shape[1]):
        ui = u[:, i].view(-1, 1)
        for q in basis:  # peft's operations, in its order (the same rounding)
            ui = ui - (q.t() @ ui) * q
        basis.append((ui / ui.norm()).view(-1, 1))
    return torch.cat(basis, dim=1)


def hra_factors(u: Tensor, weight: Tensor, apply_gs: bool) -> LowRank:
    """``(down, up)`` with ``W0 H - W0 == up @ down`` for ``W0 = weight`` (``[out, in]``) and the chain
    ``H`` of the columns of ``u`` (``[in, r]``): see the module docstring. Computed in ``u``'s dtype."""
    if apply_gs:
        q = gram_schmidt(u)
        return LowRank(q.t(), (weight @ q) * -2.0)
    rank = u.shape[1]
    unit = u / u.norm(dim=0)
    half = rank // 2
    a, b = unit[:, 0 : 2 * half : 2], unit[:, 1 : 2 * half : 2]
    d = a - b
    e = (d + (d * d).sum(0) * b) * -2.0
    left = torch.stack([a, d], dim=2).reshape(u.shape[0], 2 * half)  # a_0, d_0, a_1, d_1, ...
    right = torch.stack([e, b * 2.0], dim=2).reshape(u.shape[0], 2 * half)  # e_0, f_0, e_1, f_1, ...
    if rank % 2:
        last = unit[:, -1:]
        left, right = torch.cat([left, last], 1), torch.cat([right, last * -2.0], 1)
    down = right.t()
    gram = down @ left  # [r, r]: (E V)[j, i] = e_j . v_i
    eye = torch.eye(rank, dtype=u.dtype, device=u.device)
    blocks: list[Tensor] = []
    for start in range(0, rank, 2):
        col = eye[:, start : start + 2]
        if start:
            col = col + torch.cat(blocks, 1) @ gram[:start, start : start + 2]
        blocks.append(col)
    mix = torch.cat(blocks, 1)
    return LowRank(down, (weight @ left) @ mix)


class HraDelta(Delta):
    """``W0 H - W0`` on one output slice, ``H`` the chain of the columns of ``hra_u`` (``[in, r]``), as
    the rank-``r`` update ``(x down^T) up^T`` (:func:`hra_factors`)."""

    mergeable = True

    def __init__(self, in_features: int, rank: int, apply_gs: bool) -> None:
        super().__init__()
        self.apply_gs = apply_gs
        if rank % 2:
            self.hra_u = nn.Parameter(torch.empty(in_features, rank))
            nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))
        else:  # peft's symmetric init: each column twice, so the reflections cancel in pairs
            half = torch.zeros(in_features, rank // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            self.hra_u = nn.Parameter(torch.repeat_interleave(half, 2, dim=1))

    def factors(self, weight: Tensor) -> LowRank:
        """``(down, up)`` computed in float32 or wider, cast to ``weight``'s dtype."""
        work = torch.promote_types(torch.promote_types(self.hra_u.dtype, weight.dtype), torch.float32)
        down, up, _ = hra_factors(self.hra_u.to(work), weight.to(work), self.apply_gs)
        return LowRank(down.to(weight.dtype), up.to(weight.dtype))

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        down, up, _ = self.factors(weight)
        return F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))

    def delta_weight(self, weight: Tensor) -> Tensor:
        down, up, _ = self.factors(weight)
        return up @ down

    def low_rank(self, weight: Tensor) -> LowRank | None:
        if type(self).forward is not HraDelta.forward:
            return None
        return self.factors(weight)

    def extra_repr(self) -> str:
        return f"in_features={self.hra_u.shape[0]}, rank={self.hra_u.shape[1]}, apply_gs={self.apply_gs}"


@register_method(
    "hra", "HRA: a chain of trained Householder reflections on the input side of frozen weights; mergeable"
)
class Hra(Method):
    """HRA (module docstring). ``identity_at_init`` holds for an even rank without Gram-Schmidt (the
    defaults); an odd rank or ``apply_gs`` starts from random reflections, as in peft."""

    config_class = HraConfig
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        cfg: HraConfig = self.config
        if cfg.rank % 2:
            warnings.warn(
                f"hra: rank={cfg.rank} is odd, so the reflections cannot start in cancelling pairs: they "
                "are drawn at random and the model does not start unchanged (use an even rank)",
                stacklevel=2,
            )
        sites = [site for target in cfg.targets for site in linear_sites(model, target)]
        for site in sites:
            layer = adapt_linear(site)
            delta = HraDelta(site.in_features, cfg.rank, cfg.apply_gs)
            layer.add_delta(f"hra_{site.target}", delta, site.start, site.stop)
