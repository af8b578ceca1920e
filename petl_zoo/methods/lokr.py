"""LoKr: low-rank Kronecker product updates (LyCORIS, Yeh et al., ICLR 2024; KAdaptation), as peft's LoKr.

Torch layout, a frozen Linear ``y = x W0^T + b`` with ``W0`` of shape ``[out, in]``. The two widths are
factorised, ``out = a * b`` and ``in = c * d`` (peft's ``factorization``: the divisor pair closest to
the square root, or ``decompose_factor`` and its cofactor), and per adapted matrix (or output slice of
the fused ``qkv``)::

    delta_W = kron(w1, w2) * s,          s = alpha / r
    y       = x W0^T + b + x delta_W^T

with ``w1`` ``[a, c]`` and ``w2`` ``[b, d]``. ``w2`` is low-rank, ``w2_a @ w2_b`` (``[b, r]``, ``[r, d]``),
when ``r < max(b, d) / 2``, else a full ``lokr_w2``; ``w1`` is a full ``lokr_w1`` unless ``decompose_both``
and ``r < max(a, c) / 2`` (then ``w1_a @ w1_b``): peft's shape rules, reproduced exactly. peft's init
(``init_weights=True``, our ``init="default"``): ``w1 = 0`` (or ``w1_a = 0``), the rest He-uniform
(``kaiming_uniform_(a=sqrt(5))``), so ``delta_W = 0`` at initialisation; ``init="lycoris"``: ``w2 = 0``
(or ``w2_b = 0``) instead; ``init="random"`` (``init_weights=False``): nothing zero.

On the patch embedding's Conv2d (``targets`` containing ``"patch_embed"``; ``W0``: ``[out, in, kh, kw]``,
``in = in_channels / groups``): a full ``w2`` is ``[b, d, kh, kw]`` and ``w1`` is broadcast over the
kernel (``kron(w1[:, :, None, None], w2)``); a low-rank ``w2`` spans the flattened kernel (``w2_b``:
``[r, d*kh*kw]``) and ``kron(w1, w2)`` is reshaped to the kernel; with ``use_effective_conv2d`` (a
kernel other than 1x1) ``w2`` is the Tucker/CP form ``einsum("ijkl,ip,jr->prkl", t2, w2_a, w2_b)`` with
a core ``t2`` ``[r, r, kh, kw]``. The update is ``conv(x, delta_W)`` with the layer's stride, padding,
dilation and groups.

No one-pass low-rank form: ``delta_W`` is a Kronecker product, not a product of two thin matrices, so
``low_rank`` returns None and every call materialises ``delta_W`` (``[out, in]``) and computes
``F.linear(x, delta_W)`` (as peft does). Mergeable: ``delta_W`` is added to the weight (a Linear slice,
or the conv's weight) and unmerged from the cached ``W0``.

Dropouts, as peft (no input dropout): in training ``module_dropout`` skips the whole update with that
probability (one ``torch.rand(1)`` per training call; at the default 0 nothing is dropped, see
``LycorisDelta``), ``rank_dropout`` zeroes rows (output channels)
of ``delta_W`` with that probability, rescaled by ``1 / mean(mask)`` only with ``rank_dropout_scale``.

Defaults: peft's (``r = 8``, ``alpha = 8``, no dropouts, ``decompose_both=False``,
``decompose_factor=-1``, ``use_effective_conv2d=False``): no vision paper gives LoKr a VTAB-1K setting,
so the targets are LoRA's (``q``, ``v`` slices of the fused ``qkv``). On ViT-B/16 (head excluded) each
``768 x 768`` slice factorises as ``24 x 32`` by ``24 x 32``: ``w1`` ``[24, 24]`` (576) and ``w2`` rank
8, ``[32, 8] @ [8, 32]`` (512): 1,088 a site, **26,112** for 24 sites; ``targets=("qkv",)`` (peft's
``target_modules=["qkv"]``, ``2304 = 48 x 48``): ``w1`` ``[48, 24]`` + ``[48, 8] @ [8, 32]`` = 1,792 a
block, 21,504; the patch embedding (``3 -> 768``, 16x16) adds 6,424 (``use_effective_conv2d``: 16,688).

Compared with peft 0.21.2 in float64 (``tests/test_lokr.py``): on the fused ``qkv``, on the ``q``, ``v``
slices (against peft on a copy whose ``qkv`` is split into three Linears) and on the patch embedding
(the flattened, full-``w2`` and Tucker forms), with peft's tensors copied in after perturbing, outputs
and gradients agree within 1e-10 and the merged weights are equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..config import MethodConfig, bounded, fraction, positive
from ..registry import Method, register_method
from ..targets import check_targets
from .loha import LYCORIS_TARGETS, LycorisDelta, attach_lycoris, he_uniform_

__all__ = ["LokrConfig", "LokrDelta", "Lokr", "factorization", "lokr_shapes"]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n = dimension`` and ``m <= n``: ``(factor, dimension / factor)`` when
    ``factor`` divides it, else the divisor pair closest to the square root with ``m <= factor``
    (``factor = -1``: no bound). peft's (LyCORIS's) ``factorization``, step for step."""
    if factor > 0 and (dimension % factor) == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def lokr_shapes(
    out_dim: int, in_dim: int, rank: int, decompose_both: bool, decompose_factor: int
) -> tuple[tuple[int, int], tuple[int, int], bool, bool]:
    """``((a, b), (c, d), use_w1, use_w2)``: ``out = a b``, ``in = c d``; a full ``w1`` ``[a, c]`` unless
    ``decompose_both`` and ``rank < max(a, c) / 2``; a full ``w2`` ``[b, d]`` unless ``rank < max(b, d) / 2``
    (peft's rules; the same for a Linear and a conv)."""
    in_m, in_n = factorization(in_dim, decompose_factor)
    out_l, out_k = factorization(out_dim, decompose_factor)
    use_w1 = not (decompose_both and rank < max(out_l, in_m) / 2)
    use_w2 = not (rank < max(out_k, in_n) / 2)
    return (out_l, out_k), (in_m, in_n), use_w1, use_w2


def lokr_cp_weight(core: Tensor, w_a: Tensor, w_b: Tensor) -> Tensor:
    """The Tucker/CP ``w2`` (``[b, d, kh, kw]``) of a core ``[r, r, kh, kw]``, ``w_a`` ``[r, b]`` and ``w_b``
    ``[r, d]``, contracted as peft's LoKr ``make_weight_cp``."""
    return torch.einsum("i j k l, i p, j r -> p r k l", core, w_a, w_b)


@dataclass
class LokrConfig(MethodConfig):
    """LoKr options, peft's ``LoKrConfig`` defaults: ``rank`` = ``r`` (8), ``alpha`` (8; scale
    ``alpha / rank``), ``rank_dropout`` and ``module_dropout`` (0), ``rank_dropout_scale`` (False),
    ``use_effective_conv2d`` (False), ``decompose_both`` (False: ``w1`` full), ``decompose_factor`` (-1:
    factors near the square root), ``init`` (``"default"`` = ``init_weights=True``, ``w1 = 0``;
    ``"lycoris"``: ``w2 = 0``; ``"random"`` = ``init_weights=False``), ``targets`` as lora's plus
    ``"patch_embed"``."""

    rank: int = positive(8)
    alpha: float = bounded(8.0)
    rank_dropout: float = fraction(0.0)
    module_dropout: float = fraction(0.0)
    rank_dropout_scale: bool = False
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    init: Literal["default", "lycoris", "random"] = "default"
    targets: tuple[str, ...] = ("q", "v")

    def validate(self) -> None:
        check_targets(self.targets, LYCORIS_TARGETS, "lokr")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(
                f"decompose_factor must be -1 (factors near the square root) or a positive integer, "
                f"got {self.decompose_factor}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LokrDelta(LycorisDelta):
    """``delta_W = kron(w1, w2) * s`` (module docstring), with peft's parameter names (``lokr_w1`` or
    ``lokr_w1_a``/``lokr_w1_b``; ``lokr_w2``, ``lokr_w2_a``/``lokr_w2_b``, or ``lokr_t2`` + the pair)."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        rank: int,
        scaling: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        conv: nn.Conv2d | None = None,
        use_effective_conv2d: bool = False,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        rank_dropout_scale: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__(weight_shape, scaling, rank_dropout, module_dropout, conv)
        self.rank_dropout_scale = bool(rank_dropout_scale)
        out_dim, in_dim, kernel = self.weight_shape[0], self.weight_shape[1], self.weight_shape[2:]
        (a, b), (c, d), use_w1, use_w2 = lokr_shapes(out_dim, in_dim, rank, decompose_both, decompose_factor)
        effective = conv is not None and use_effective_conv2d and tuple(kernel) != (1, 1)
        if use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, c))
        if use_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        elif effective:
            self.lokr_t2 = nn.Parameter(torch.empty(rank, rank, *kernel))
            self.lokr_w2_a = nn.Parameter(torch.empty(rank, b))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, d * math.prod(kernel)))
        self._init(init)

    @torch.no_grad()
    def _init(self, init: str) -> None:
        """peft's ``reset_adapter_parameters`` (``"default"``), ``..._lycoris_way`` and ``..._random``."""
        zero_w1, zero_w2 = init == "default", init == "lycoris"
        if hasattr(self, "lokr_w1"):
            (nn.init.zeros_ if zero_w1 else he_uniform_)(self.lokr_w1)
        else:
            (nn.init.zeros_ if zero_w1 else he_uniform_)(self.lokr_w1_a)
            he_uniform_(self.lokr_w1_b)
        if hasattr(self, "lokr_w2"):
            (nn.init.zeros_ if zero_w2 else he_uniform_)(self.lokr_w2)
        elif zero_w2:  # peft's lycoris way: w2_b zero, then w2_a
            nn.init.zeros_(self.lokr_w2_b)
            he_uniform_(self.lokr_w2_a)
        else:
            he_uniform_(self.lokr_w2_a)
            he_uniform_(self.lokr_w2_b)
        if hasattr(self, "lokr_t2"):
            he_uniform_(self.lokr_t2)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(w1, w2)``: ``w1`` ``[a, c]``; ``w2`` ``[b, d]`` (Linear), ``[b, d, kh, kw]`` (full or Tucker on
        a conv) or ``[b, d*kh*kw]`` (low-rank on a conv)."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        elif hasattr(self, "lokr_t2"):
            w2 = lokr_cp_weight(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def make_weight(self) -> Tensor:
        w1, w2 = self.factors()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2.contiguous()) * self.scaling).reshape(self.weight_shape)

    def rank_mask(self, weight: Tensor) -> Tensor:
        """peft's LoKr mask: rows kept with probability ``1 - rank_dropout`` (a float32 draw), divided by
        their mean only with ``rank_dropout_scale``."""
        drop = (torch.rand(weight.size(0)) > self.rank_dropout).float()
        drop = drop.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
        if self.rank_dropout_scale:
            drop = drop / drop.mean()
        return drop.to(weight.dtype)


@register_method(
    "lokr",
    "LoKr (LyCORIS): delta_W = kron(w1, w2) * alpha/r, w2 low-rank, on q, v (r = 8), optional patch conv; "
    "mergeable",
)
class Lokr(Method):
    config_class = LokrConfig
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        cfg: LokrConfig = self.config

        def build(site) -> LokrDelta:
            return LokrDelta(
                site.weight_shape,
                cfg.rank,
                cfg.scaling,
                cfg.rank_dropout,
                cfg.module_dropout,
                conv=site.conv,
                use_effective_conv2d=cfg.use_effective_conv2d,
                decompose_both=cfg.decompose_both,
                decompose_factor=cfg.decompose_factor,
                rank_dropout_scale=cfg.rank_dropout_scale,
                init=cfg.init,
            )

        attach_lycoris(model, cfg.targets, "lokr", build)
