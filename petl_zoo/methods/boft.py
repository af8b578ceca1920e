"""BOFT: orthogonal butterfly fine-tuning (Liu et al., ICLR 2024), as Hugging Face peft 0.21 implements it.

Torch layout, a frozen Linear ``y = x W0^T + b`` with ``W0`` of shape ``[out, in]``. BOFT rotates what the
layer reads with a product of ``m`` butterfly factors, each a permuted block-diagonal orthogonal matrix,
and rescales each output row::

    y   = s * ((x R) W0^T) + b               (peft: rotate the input, frozen Linear, scale without the bias)
    W'  = diag(s) W0 R^T                     (merged; the bias is unchanged)
    R   = M_(m-1) ... M_1 M_0,   M_i = P_i blockdiag(Q_i1, ..., Q_iD) P_i^T
    Q   = (I - A_skew)(I + A_skew)^-1,   A_skew = (A - A^T) / 2

- ``boft_R`` (``[m, D, b, b]``, ``D = in / b`` blocks of ``b = block_size``): full matrices whose
  skew-symmetric part is used (peft's and the authors' storage; zeros at init, so every ``Q = I``);
  the Cayley transform is the exact one (a solve, :func:`petl_zoo.methods.oft.cayley`), in float32 or
  wider also on a bf16 host.
- ``P_i``: peft's block butterfly permutation (``block_butterfly_perm``): ``P_0 = I``; factor ``i >= 1``
  interleaves half-blocks (``b / 2`` channels) within groups of ``b 2^i`` channels, so that after ``m``
  factors each output channel mixes ``b 2^(m-1)`` inputs. With ``m = 1`` BOFT is OFT with full block
  storage. Applied as index permutations, never as ``[in, in]`` matrices.
- ``boft_s`` (``[out, 1]``): a trained scale per output row, ones at init.
- ``dropout``: peft's multiplicative dropout (``boft_dropout``): in training, a random ``int(p D)``
  blocks of one random factor are replaced by identity, drawn with peft's calls (``torch.randint``,
  ``torch.randperm``) so that a seeded step draws what peft's would.

On a slice: each delta rotates the input of its own output slice and scales its rows; the ``q`` and
``v`` slices of timm's fused ``qkv`` each get their own ``R`` and ``s`` (peft on separate ``q``, ``v``
Linears), ``targets=("qkv",)`` one ``R`` for ``q``, ``k``, ``v`` and one ``s`` of ``3 dim`` (peft's
``target_modules=["qkv"]``). The update added to the slice is ``x (W' - W0)^T``, ``W' - W0`` formed from
``W0`` (``out * in * b`` per factor), one more product of the slice's width per training step than the
frozen layer. Mergeable.

Defaults: ``m = 2`` factors of ``b = 8`` on every Linear of attention and MLP (``q``, ``k``, ``v``,
``proj``, ``fc1``, ``fc2``), multiplicative dropout 0.1: 1,410,048 trainable parameters on ViT-B/16; ``q``,
``v`` only: 313,344 (24 sites x (2 x 96 x 8 x 8 + 768)); ``targets=("qkv",)``: 175,104; equal to peft's
count for the same config (with its butterfly kernel available: without the CUDA extension peft silently
resets ``m`` to 1). These are the paper's VTAB-1K settings (the BOFT paper (Liu et al., ICLR 2024, arXiv 2311.06243v2), App. A.2 and Table 4, read in wassname/adapters_as_hypotheses docs/boft_butterfly_orthogonal.md @ ce0dfd0: the rows "BOFT m=2 b=8" (1.99 M on
DINOv2-L), m=4 b=4 and m=6 b=2; "every linear layer in all multihead self-attention (MSA) and MLP blocks";
"a multiplicative dropout rate of 0.1"; their weight decay 0.02 and 30 epochs are recipe values, not
options).

Compared with peft 0.21.2 in float64 (``tests/test_boft.py``, peft's CUDA block-diagonal kernel replaced by
``torch.block_diag`` so that ``m > 1`` runs on the CPU): outputs, gradients of ``boft_R`` and ``boft_s`` and
merged weights agree to 1e-10 on the fused ``qkv`` and on ``q``, ``v`` (peft on a copy split into three
Linears), for ``m`` = 1, 2, 3, and with seeded dropout in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, fraction, positive
from ..layers import Delta, DenseUpdate, adapt_linear
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, check_targets, linear_sites
from .oft import cayley, work_dtype

__all__ = ["BoftConfig", "BoftDelta", "Boft", "butterfly_permutation", "check_butterfly"]


@dataclass
class BoftConfig(MethodConfig):
    """BOFT options: ``block_size`` ``b`` of the orthogonal blocks (peft's ``boft_block_size``), ``factors``
    ``m`` (peft's ``boft_n_butterfly_factor``), ``targets``, ``dropout`` (peft's multiplicative
    ``boft_dropout``: the fraction of one factor's blocks set to identity in a training step)."""

    block_size: int = positive(8)
    factors: int = positive(2)
    targets: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")
    dropout: float = fraction(0.1)

    def validate(self) -> None:
        check_targets(self.targets, LINEAR_TARGETS, "boft")
        if self.block_size < 2:
            raise ValueError(
                f"block_size must be at least 2 (a 1x1 rotation is fixed), got {self.block_size}"
            )
        if self.factors > 1 and self.block_size % 2:
            raise ValueError(
                f"block_size must be even with factors > 1 (butterflies swap half-blocks), got {self.block_size}"
            )


def check_butterfly(in_features: int, block_size: int, factors: int) -> None:
    """peft's conditions on a site's input width: ``b`` divides it, and with ``m > 1`` so does
    ``b 2^(m-1)`` and the number of blocks is even. A ValueError names the failing one."""
    if in_features % block_size:
        raise ValueError(f"block_size {block_size} does not divide the input width {in_features}")
    span = block_size * 2 ** (factors - 1)
    if factors > 1 and (in_features < span or in_features % span):
        raise ValueError(
            f"{factors} butterfly factors of block_size {block_size} need an input width divisible by "
            f"{span}, got {in_features}"
        )
    if factors > 1 and (in_features // block_size) % 2:
        raise ValueError(f"the number of blocks ({in_features // block_size}) must be even with factors > 1")


def butterfly_permutation(n: int, blocks: int, half: int, butterfly: bool) -> list[int]:
    """peft's ``block_butterfly_perm(n, blocks, half, ...)`` as a list: within each group of
    ``n / blocks`` channels, the chunks of ``half`` channels in the order even chunks, then odd ones
    (the identity without butterfly)."""
    if not butterfly:
        return list(range(n))
    group = n // blocks
    chunks = group // half
    order = [c for c in range(0, chunks, 2)] + [c for c in range(1, chunks, 2)]
    within = [pos * half + k for pos in order for k in range(half)]
    return [start + i for start in range(0, n, group) for i in within]


class BoftDelta(Delta):
    """BOFT on one output slice: ``delta_W = diag(s) W0_slice R^T - W0_slice`` (see the module
    docstring); ``forward(x, W0_slice) = x delta_W^T``."""

    mergeable = True

    def __init__(
        self, in_features: int, out_features: int, block_size: int, factors: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_butterfly(in_features, block_size, factors)
        self.in_features = in_features
        self.block_size = block_size
        self.factors = factors
        self.dropout = dropout
        blocks = in_features // block_size
        self.boft_R = nn.Parameter(torch.zeros(factors, blocks, block_size, block_size))
        self.boft_s = nn.Parameter(torch.ones(out_features, 1))
        perms = [
            butterfly_permutation(in_features, blocks // 2**i, block_size // 2, factors > 1)
            for i in range(factors)
        ]
        self._perms = [(p, _inverse(p)) for p in perms]  # python lists: nothing to save, any device
        self._index_cache: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}

    def _indices(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        cached = self._index_cache.get(device)
        if cached is None:
            cached = [
                (torch.tensor(p, device=device), torch.tensor(q, device=device)) for p, q in self._perms
            ]
            self._index_cache[device] = cached
        return cached

    def orthogonal_blocks(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[m, D, b, b]`` Cayley blocks of ``boft_R``'s skew parts (float32 or wider), with the
        multiplicative dropout applied in training."""
        a = self.boft_R.to(work_dtype(dtype or self.boft_R.dtype))
        m, d, b, _ = a.shape
        flat = a.reshape(m * d, b, b)
        blocks = cayley(0.5 * (flat - flat.transpose(1, 2)), "exact").reshape(m, d, b, b)
        if self.training and self.dropout > 0:
            blocks = self._drop(blocks)
        return blocks

    def _drop(self, blocks: Tensor) -> Tensor:
        """peft's ``MultiplicativeDropoutLayer``: in one random factor, ``int(p D)`` random blocks become I."""
        m, d, b, _ = blocks.shape
        factor = torch.randint(0, m, (1,))  # a tensor index, not .item(): no graph break under torch.compile
        replaced = int(self.dropout * d)
        mask = torch.cat([torch.ones(replaced), torch.zeros(d - replaced)])
        mask = mask[torch.randperm(d)].view(1, d, 1, 1)
        full = torch.zeros(m, d, 1, 1)
        full[factor] = mask
        full = full.to(device=blocks.device, dtype=blocks.dtype)
        eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
        return (1 - full) * blocks + full * eye

    def rotate(self, weight: Tensor, blocks: Tensor) -> Tensor:
        """``W R^T`` for ``R = M_(m-1) ... M_0``: ``W M_0^T M_1^T ...``, each ``W M_i^T`` as
        ``(W[:, P^-1] Bd_i^T)[:, P]`` with the blocks applied per group of ``b`` columns."""
        out, width = weight.shape
        m, d, b, _ = blocks.shape
        w = weight
        for i, (perm, inverse) in enumerate(self._indices(weight.device)):
            w = w[:, inverse] if i else w  # P_0 = I
            w = torch.einsum("odc,dkc->odk", w.reshape(out, d, b), blocks[i]).reshape(out, width)
            w = w[:, perm] if i else w
        return w

    def _delta(self, weight: Tensor) -> Tensor:
        w = weight.detach().to(work_dtype(weight.dtype))
        rotated = self.rotate(w, self.orthogonal_blocks(w.dtype))
        return self.boft_s.to(w.dtype) * rotated - w

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return F.linear(x, self._delta(weight).to(x.dtype))

    def dense_update(self, weight: Tensor) -> DenseUpdate:
        return DenseUpdate(self._delta(weight))  # the multiplicative dropout drawn as the forward's

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``diag(s) W0 R^T - W0`` (``[out, in]``, float32 or wider)."""
        return self._delta(weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, block_size={self.block_size}, factors={self.factors}"


def _inverse(perm: list[int]) -> list[int]:
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return inverse


@register_method(
    "boft",
    "BOFT: butterfly-factorised orthogonal rotation of each target's input plus a row scale; mergeable",
)
class Boft(Method):
    config_class = BoftConfig
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        cfg: BoftConfig = self.config
        sites = [site for target in cfg.targets for site in linear_sites(model, target)]
        for site in sites:
            try:
                check_butterfly(site.in_features, cfg.block_size, cfg.factors)
            except ValueError as err:
                raise ValueError(f"boft: target {site.target!r}: {err}") from None
        for site in sites:
            layer = adapt_linear(site)
            delta = BoftDelta(site.in_features, site.out_features, cfg.block_size, cfg.factors, cfg.dropout)
            layer.add_delta(f"boft_{site.target}", delta, site.start, site.stop)
