"""LoHa: low-rank Hadamard product updates (FedPara, Hyeon-Woo et al., ICLR 2022; LyCORIS), as peft's LoHa.

Torch layout, a frozen Linear ``y = x W0^T + b`` with ``W0`` of shape ``[out, in]``. Per adapted matrix
(or output slice of the fused ``qkv``), two rank-``r`` pairs whose products are multiplied element-wise::

    delta_W = ((w1_a @ w1_b) * (w2_a @ w2_b)) * s,      s = alpha / r
    y       = x W0^T + b + x delta_W^T

``w1_a``, ``w2_a``: ``[out, r]``; ``w1_b``, ``w2_b``: ``[r, in]``. peft's init (``init_weights=True``,
our ``init="default"``): He-uniform (``kaiming_uniform_(a=sqrt(5))``) on ``w1_a``, ``w1_b``, ``w2_a``,
and ``w2_b = 0``, so ``delta_W = 0`` and the model is unchanged at initialisation; ``init="random"``
(peft's ``init_weights=False``) draws ``w2_b`` as well. The rank of ``delta_W`` is up to ``r^2`` for
``4 r (out + in)`` / 2 trained values per pair.

On the patch embedding's Conv2d (``targets`` containing ``"patch_embed"``; ``W0``: ``[out, in, kh, kw]``),
peft's two forms: by default each pair spans the flattened kernel (``w*_b``: ``[r, in*kh*kw]``) and
``delta_W`` is reshaped to ``[out, in, kh, kw]``; with ``use_effective_conv2d`` (a kernel other than
1x1) each factor is a Tucker/CP form ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)`` with a core ``t``
(``[r, r, kh, kw]``), ``w_a``: ``[r, out]``, ``w_b``: ``[r, in]`` (FedPara's Proposition 3). The
update is ``conv(x, delta_W)`` with the layer's stride, padding, dilation and groups.

No one-pass low-rank form: ``delta_W`` is a Hadamard product of two low-rank matrices, not a product of
two thin ones, so ``low_rank`` returns None and every call materialises ``delta_W`` (``[out, in]``) and
computes ``F.linear(x, delta_W)`` (as peft does). Mergeable: ``delta_W`` is added to the weight (a
Linear slice, or the conv's weight) and unmerged from the cached ``W0``.

Dropouts, as peft (no input dropout): in training, ``module_dropout`` skips the whole update with that
probability (one ``torch.rand(1)`` per call, drawn in every training call as peft draws it; at the
default 0 nothing is dropped, where peft drops on a draw of exactly 0.0, chance 2^-24), and
``rank_dropout`` zeroes rows (output channels) of ``delta_W`` with that probability and rescales the
kept ones by ``1 / mean(mask)`` (peft's LoHa always rescales). The draws follow peft's order on the
CPU generator, so the same seed gives the same masks.

Defaults: peft's (``r = 8``, ``alpha = 8``, no dropouts, ``use_effective_conv2d=False``): no vision
paper gives LoHa a VTAB-1K setting, so the targets are LoRA's (``q``, ``v`` slices of the fused
``qkv``): 589,824 trainable parameters on ViT-B/16 (head excluded; ``4 * 8 * 768`` per site, 24
sites); ``targets=("qkv",)`` (peft's ``target_modules=["qkv"]``) is also 589,824; the patch embedding
adds 24,576 (``use_effective_conv2d``: 45,104).

Compared with peft 0.21.2 in float64 (``tests/test_loha.py``): on the fused ``qkv``, on the ``q``, ``v``
slices (against peft on a copy whose ``qkv`` is split into three Linears) and on the patch embedding
(both conv forms), with peft's tensors copied in after perturbing, outputs and gradients agree within
1e-10 and the merged weights are equal.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, bounded, fraction, positive
from ..layers import Delta, DenseUpdate, adapt_child, adapt_linear
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, LinearSite, check_targets, linear_sites

__all__ = [
    "LYCORIS_TARGETS",
    "LohaConfig",
    "LycorisDelta",
    "LohaDelta",
    "Loha",
    "lycoris_sites",
    "he_uniform_",
]

#: The targets of LoHa and LoKr: lora's Linear targets plus ``patch_embed`` (the patch embedding's Conv2d).
LYCORIS_TARGETS = (*LINEAR_TARGETS, "patch_embed")


def he_uniform_(tensor: Tensor) -> Tensor:
    """peft's init of the non-zero LyCORIS factors: ``kaiming_uniform_(a=sqrt(5))``."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


@dataclass
class LohaConfig(MethodConfig):
    """LoHa options, peft's ``LoHaConfig`` defaults: ``rank`` = ``r`` (8), ``alpha`` (8; scale
    ``alpha / rank``), ``rank_dropout`` and ``module_dropout`` (0), ``use_effective_conv2d`` (False: the
    Tucker form on a conv target), ``init`` (``"default"`` = ``init_weights=True``, ``w2_b = 0``;
    ``"random"`` = ``init_weights=False``), ``targets`` as lora's plus ``"patch_embed"``."""

    rank: int = positive(8)
    alpha: float = bounded(8.0)
    rank_dropout: float = fraction(0.0)
    module_dropout: float = fraction(0.0)
    use_effective_conv2d: bool = False
    init: Literal["default", "random"] = "default"
    targets: tuple[str, ...] = ("q", "v")

    def validate(self) -> None:
        check_targets(self.targets, LYCORIS_TARGETS, "loha")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class _Site:
    """Where one LyCORIS delta goes: a Linear output slice (``linear``) or a Conv2d (``conv``)."""

    name: str
    weight_shape: tuple[int, ...]  # the shape delta_W takes: [out, in] or [out, in/groups, kh, kw]
    linear: LinearSite | None = None
    conv: nn.Conv2d | None = None
    parent: nn.Module | None = None
    attr: str = ""


def lycoris_sites(model: nn.Module, targets: tuple[str, ...]) -> Iterator[_Site]:
    """The sites of ``targets``: every Linear slice of a Linear target, and for ``"patch_embed"`` the
    patch embedding's ``proj`` (a ValueError when it is not a zero-padded Conv2d)."""
    for target in targets:
        if target != "patch_embed":
            for site in linear_sites(model, target):
                yield _Site(site.target, (site.out_features, site.in_features), linear=site)
            continue
        patch = getattr(model, "patch_embed", None)
        proj = getattr(patch, "proj", None)
        proj = getattr(proj, "base", proj)
        if not isinstance(proj, nn.Conv2d) or proj.padding_mode != "zeros":
            raise ValueError(
                f"target 'patch_embed' needs a zero-padded Conv2d at {type(model).__name__}.patch_embed.proj, "
                f"found {type(proj).__name__}"
            )
        shape = (proj.out_channels, proj.in_channels // proj.groups, *proj.kernel_size)
        yield _Site("patch_embed", shape, conv=proj, parent=patch, attr="proj")


class LycorisDelta(Delta):
    """What LoHa and LoKr share: ``forward(x) = F.linear(x, delta_W)`` on a Linear slice, or
    ``conv2d(x, delta_W)`` with the conv's stride, padding, dilation and groups as a parallel delta on a
    Conv2d; peft's module and rank dropouts (see the module docstring). Subclasses build ``delta_W``
    (scale included, in ``weight_shape``) in :meth:`make_weight` and the rank-dropout mask in
    :meth:`rank_mask`. No one-pass low-rank form (``low_rank`` is None): ``delta_W`` is materialised per
    call. ``mergeable``: ``delta_weight`` is ``delta_W``."""

    mergeable = True

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        scaling: float,
        rank_dropout: float,
        module_dropout: float,
        conv: nn.Conv2d | None = None,
    ) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.scaling = float(scaling)
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.conv_args = (
            None
            if conv is None
            else dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        )

    def make_weight(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def rank_mask(self, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``delta_W`` (the frozen ``weight`` it adds to is not needed), in ``weight_shape``."""
        return self.make_weight()

    def _module_dropped(self) -> bool:
        """peft's module dropout draw (``torch.rand(1)``, drawn in every training forward, so the random
        stream is peft's) and test. At ``module_dropout = 0`` the draw is not tested: nothing is dropped
        (peft drops on a draw of exactly 0.0, chance 2^-24) and the forward has no data-dependent branch,
        so ``torch.compile`` traces it without a graph break."""
        draw = torch.rand(1)
        return self.module_dropout > 0 and not bool(draw > self.module_dropout)

    def _step_weight(self) -> Tensor | None:
        """This forward's ``delta_W``: None when the module dropout drops it, rank-masked in training."""
        if self.training and self._module_dropped():
            return None
        delta = self.make_weight()
        if self.training and self.rank_dropout:
            delta = delta * self.rank_mask(delta)
        return delta

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        delta = self._step_weight()
        if delta is None:
            if self.conv_args is None:
                return x.new_zeros((*x.shape[:-1], self.weight_shape[0]))
            return x.new_zeros(())  # added to the conv's output: broadcasts
        if self.conv_args is None:
            return F.linear(x, delta)
        return F.conv2d(x, delta, **self.conv_args)

    def dense_update(self, weight: Tensor) -> DenseUpdate | None:
        return DenseUpdate(self._step_weight()) if self.conv_args is None else None

    def extra_repr(self) -> str:
        kind = "conv2d" if self.conv_args is not None else "linear"
        return f"{kind}, weight_shape={self.weight_shape}, scaling={self.scaling:g}"


class _Hadamard(torch.autograd.Function):
    """``((w1a @ w1b) * (w2a @ w2b)) * s`` saving the four factors, not the two ``[out, in]`` products
    (recomputed in backward): peft's ``HadaWeight``."""

    @staticmethod
    def forward(ctx, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return ((w1a @ w1b) * (w2a @ w2b)) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        temp = grad * (w2a @ w2b)
        grad_w1a, grad_w1b = temp @ w1b.T, w1a.T @ temp
        temp = grad * (w1a @ w1b)
        grad_w2a, grad_w2b = temp @ w2b.T, w2a.T @ temp
        return grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


def cp_weight(core: Tensor, w_a: Tensor, w_b: Tensor) -> Tensor:
    """The Tucker/CP factor ``[out, in, kh, kw]`` of a core ``[r, r, kh, kw]``, ``w_a`` ``[r, out]`` and
    ``w_b`` ``[r, in]``: ``sum_ij core[i, j] w_a[i, p] w_b[j, r]``, contracted in the order of peft's LoHa
    (``HadaWeightCP``), so that the float results are the same."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, w_b, w_a)


class LohaDelta(LycorisDelta):
    """``delta_W = ((w1_a @ w1_b) * (w2_a @ w2_b)) * s`` (module docstring); on a conv, reshaped to the
    kernel, or with ``effective`` the product of two CP factors (``hada_t1``, ``hada_t2`` cores)."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        rank: int,
        scaling: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        conv: nn.Conv2d | None = None,
        use_effective_conv2d: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__(weight_shape, scaling, rank_dropout, module_dropout, conv)
        out, rest = self.weight_shape[0], self.weight_shape[1:]
        kernel = rest[1:]
        self.effective = conv is not None and use_effective_conv2d and tuple(kernel) != (1, 1)
        if self.effective:
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, *kernel))
            self.hada_w1_a = nn.Parameter(torch.empty(rank, out))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, rest[0]))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, *kernel))
            self.hada_w2_a = nn.Parameter(torch.empty(rank, out))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, rest[0]))
        else:
            width = math.prod(rest)
            self.hada_w1_a = nn.Parameter(torch.empty(out, rank))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, width))
            self.hada_w2_a = nn.Parameter(torch.empty(out, rank))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, width))
        he_uniform_(self.hada_w1_a)
        he_uniform_(self.hada_w1_b)
        he_uniform_(self.hada_w2_a)
        if init == "random":
            he_uniform_(self.hada_w2_b)
        else:
            nn.init.zeros_(self.hada_w2_b)
        if self.effective:
            he_uniform_(self.hada_t1)
            he_uniform_(self.hada_t2)

    def make_weight(self) -> Tensor:
        if self.effective:
            first = cp_weight(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            second = cp_weight(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
            return first * second * self.scaling
        weight = _Hadamard.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling)
        return weight.reshape(self.weight_shape)

    def rank_mask(self, weight: Tensor) -> Tensor:
        """peft's LoHa mask: rows kept with probability ``1 - rank_dropout``, divided by their mean."""
        drop = (torch.rand(weight.size(0)) > self.rank_dropout).to(weight.dtype)
        drop = drop.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
        return drop / drop.mean()


def attach_lycoris(model: nn.Module, targets: tuple[str, ...], prefix: str, build) -> None:
    """Attach ``build(site)`` (a :class:`LycorisDelta`) at every site of ``targets``: on a Linear slice
    as ``{prefix}_{target}``, on the patch embedding's conv as its parallel delta ``prefix``."""
    for site in list(lycoris_sites(model, targets)):
        delta = build(site)
        if site.conv is None:
            adapt_linear(site.linear).add_delta(
                f"{prefix}_{site.name}", delta, site.linear.start, site.linear.stop
            )
        else:
            adapt_child(site.parent, site.attr).parallel[prefix] = delta


@register_method(
    "loha",
    "LoHa (LyCORIS/FedPara): delta_W = (w1a w1b) * (w2a w2b) * alpha/r on q, v (r = 8), optional patch "
    "conv; mergeable",
)
class Loha(Method):
    config_class = LohaConfig
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        cfg: LohaConfig = self.config

        def build(site: _Site) -> LohaDelta:
            return LohaDelta(
                site.weight_shape,
                cfg.rank,
                cfg.scaling,
                cfg.rank_dropout,
                cfg.module_dropout,
                conv=site.conv,
                use_effective_conv2d=cfg.use_effective_conv2d,
                init=cfg.init,
            )

        attach_lycoris(model, cfg.targets, "loha", build)
