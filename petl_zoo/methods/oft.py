"""OFT: orthogonal fine-tuning (Qiu et al., NeurIPS 2023), as Hugging Face peft 0.21 implements it.

Torch layout, a frozen Linear ``y = x W0^T + b`` with ``W0`` of shape ``[out, in]``. OFT rotates what the
layer reads with a trained block-diagonal orthogonal matrix ``R`` (``[in, in]``, ``in / block_size``
blocks of ``block_size``), so the adapted layer is::

    y  = (x R) W0^T + b          (peft: the input is rotated, then the frozen Linear)
    W' = W0 R^T                  (merged; the bias is unchanged)
    R  = blockdiag(R_1, ..., R_n),   R_k = (I - S_k)(I + S_k)^-1   (exact Cayley, ``cayley="exact"``)

with ``S_k`` skew-symmetric (``block_size x block_size``), stored as its ``block_size (block_size - 1) / 2``
upper-triangle entries (``oft_R``, ``[n, b(b-1)/2]``, peft's ``OFTRotationModule.weight`` layout; zeros at
init, so ``R = I`` and the model is unchanged). ``cayley="neumann"`` is peft's default instead: the series
``I + 2S + 2S^2 + ... + 2S^(t-2) + S^(t-1)`` of ``t = neumann_terms`` terms (peft's
``use_cayley_neumann=True``, ``num_cayley_neumann_terms=5``), only approximately orthogonal, and a series
of ``(I + S)(I - S)^-1``, the inverse of peft's exact form: the two peft settings turn the same ``S``
opposite ways. ``block_share`` uses one block for all ``n`` (peft's ``block_share``); ``coft`` is the
constrained variant: before every use, each ``S_k`` is projected into a ball of radius
``eps / sqrt(n)`` around 0 (Frobenius norm of the skew matrix), in place, as peft and the authors do.

On a slice: each delta rotates the *input* of its own output slice, ``W'_slice = W0_slice R^T``; the ``q``
and ``v`` slices of timm's fused ``qkv`` each get their own ``R`` (peft on separate ``q``, ``v`` Linears),
``targets=("qkv",)`` one ``R`` shared by ``q``, ``k`` and ``v`` (peft's ``target_modules=["qkv"]``). The
update added to the slice is ``x (W' - W0)^T`` with ``W' - W0`` formed from ``W0`` (``[out, in]``, cheap:
``out * in * block_size``), so a training step costs one more product of the slice's width than the frozen
layer (peft's costs none: it rotates ``x``, ``tokens * in * block_size``, and calls the layer once). The
Cayley solve runs in float32 (or wider) also on a bf16 host. Mergeable: ``W' - W0`` is folded in.

Defaults: ``block_size = 16`` on every Linear of attention and MLP (``q``, ``k``, ``v``, ``proj``, ``fc1``,
``fc2``): 622,080 trainable parameters on ViT-B/16 (12 x (5 x 48 + 192) blocks x 120); ``q``, ``v`` only:
138,240; ``targets=("qkv",)``: 69,120; equal to peft's count for the same config. The OFT paper reports
no VTAB-1K numbers; the defaults are the OFT row of the BOFT paper's VTAB-1K runs (the BOFT paper (Liu et al., ICLR 2024, arXiv 2311.06243v2), App. A.2 and Table 4, read in wassname/adapters_as_hypotheses docs/boft_butterfly_orthogonal.md @ ce0dfd0: "OFT b=16",
injected "into every linear layer in all multihead self-attention (MSA) and MLP blocks" of DINOv2-L, whose
q, k, v are separate Linears, as they are here). Exact Cayley is the paper's and the
authors' code's (``Zeju1997/oft``, ``oft-control/oft.py``: ``(I - S)(I + S)^-1``, ``W' = W0 R^T``).

peft 0.21 defines ``module_dropout`` for OFT but never applies it on a Linear, so it has no option here.
Compared with peft 0.21.2 in float64 (``tests/test_oft.py``): outputs, gradients and merged weights agree
to 1e-10 on the fused ``qkv`` and on ``q``, ``v`` (peft on a copy split into three Linears), for exact and
Neumann Cayley, ``coft`` and ``block_share``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, positive
from ..layers import Delta, DenseUpdate, adapt_linear
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, check_targets, linear_sites

__all__ = ["OftConfig", "OftDelta", "Oft", "cayley", "skew_from_upper", "coft_project", "rotate_input_side"]


@dataclass
class OftConfig(MethodConfig):
    """OFT options: ``block_size`` of the diagonal blocks of ``R`` (must divide each target's input
    width; peft's ``oft_block_size``), ``targets``, ``block_share`` (one block for all), ``coft`` with
    its radius ``eps``, the Cayley form (``"exact"`` or peft's default ``"neumann"`` series of
    ``neumann_terms`` terms)."""

    block_size: int = positive(16)
    targets: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")
    block_share: bool = False
    coft: bool = False
    eps: float = positive(6e-5)
    cayley: Literal["exact", "neumann"] = "exact"
    neumann_terms: int = positive(5)

    def validate(self) -> None:
        check_targets(self.targets, LINEAR_TARGETS, "oft")
        if self.block_size < 2:
            raise ValueError(
                f"block_size must be at least 2 (a 1x1 rotation is fixed), got {self.block_size}"
            )


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rotations are computed in: float32 for half types, the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


def skew_from_upper(vec: Tensor, size: int) -> Tensor:
    """``[n, size(size-1)/2]`` upper-triangle entries (row-major, ``torch.triu_indices`` order) ->
    ``[n, size, size]`` skew-symmetric matrices (peft's ``_pytorch_skew_symmetric``)."""
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], size, size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def cayley(skew: Tensor, form: str = "exact", terms: int = 5) -> Tensor:
    """Orthogonal ``[n, b, b]`` matrices from skew-symmetric ``[n, b, b]``, in float32 or wider (the
    result in ``skew``'s dtype). ``"exact"``: ``(I - S)(I + S)^-1`` (a solve, peft's and the authors'
    form); ``"neumann"``: ``I + 2S + 2S^2 + ... + 2S^(t-2) + S^(t-1)`` with peft's term count ``t``."""
    dtype = skew.dtype
    s = skew.to(work_dtype(dtype))
    eye = torch.eye(s.shape[-1], device=s.device, dtype=s.dtype).expand_as(s)
    if form == "exact":
        out = torch.linalg.solve(eye + s, eye - s, left=False)
    elif form == "neumann":
        out = eye.clone()
        if terms > 1:
            out = out + 2.0 * s
            if terms > 2:
                power = s @ s
                out = out + 2.0 * power
                for _ in range(3, terms - 1):
                    power = power @ s
                    out = out + 2.0 * power
                out = out + power @ s
    else:
        raise ValueError(f"unknown Cayley form {form!r}; valid: 'exact', 'neumann'")
    return out.to(dtype)


@torch.no_grad()
def coft_project(vec: Tensor, size: int, eps: float) -> Tensor:
    """COFT: each block's skew matrix ``S`` (from ``vec``, ``[n, size(size-1)/2]``) scaled onto the ball
    ``||S||_F <= eps / sqrt(n)`` when outside it; returned as upper-triangle entries (peft's
    ``_project_batch``, from the authors' ``project_batch``)."""
    skew = skew_from_upper(vec, size)
    radius = eps / torch.sqrt(torch.tensor(float(skew.shape[0])))
    norm = torch.norm(skew, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= radius, skew, radius * (skew / norm))
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    return out[:, rows, cols]


def rotate_input_side(weight: Tensor, blocks: Tensor) -> Tensor:
    """``W R^T`` for ``R = blockdiag(blocks)`` (``blocks``: ``[n, b, b]``, or ``[1, b, b]`` shared by all
    ``n = in / b`` blocks), without forming ``R``: ``(W R^T)[:, block k] = W[:, block k] R_k^T``."""
    out, width = weight.shape
    size = blocks.shape[-1]
    n = width // size
    blocks = blocks.expand(n, size, size) if blocks.shape[0] == 1 else blocks
    return torch.einsum("onc,nkc->onk", weight.reshape(out, n, size), blocks).reshape(out, width)


class OftDelta(Delta):
    """OFT on one output slice: ``delta_W = W0_slice R^T - W0_slice`` with ``R`` the block-diagonal
    Cayley rotation of ``oft_R`` (see the module docstring); ``forward(x, W0_slice) = x delta_W^T``."""

    mergeable = True

    def __init__(
        self,
        in_features: int,
        block_size: int,
        block_share: bool = False,
        coft: bool = False,
        eps: float = 6e-5,
        cayley_form: str = "exact",
        neumann_terms: int = 5,
    ) -> None:
        super().__init__()
        if in_features % block_size:
            raise ValueError(
                f"block_size {block_size} does not divide the input width {in_features} of an OFT site"
            )
        self.in_features = in_features
        self.block_size = block_size
        self.blocks = in_features // block_size
        self.block_share = block_share
        self.coft = coft
        self.eps = eps
        self.cayley_form = cayley_form
        self.neumann_terms = neumann_terms
        n = 1 if block_share else self.blocks
        self.oft_R = nn.Parameter(torch.zeros(n, block_size * (block_size - 1) // 2))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.coft:  # project the stored tensor in place first (before any cast for the call), as peft
            self.project_()
        return super().__call__(*args, **kwargs)

    @torch.no_grad()
    def project_(self) -> None:
        """COFT's in-place projection of ``oft_R`` (see :func:`coft_project`)."""
        self.oft_R.copy_(coft_project(self.oft_R, self.block_size, self.eps))

    def rotation_blocks(self, dtype: torch.dtype | None = None) -> Tensor:
        """The orthogonal blocks ``[n, b, b]`` (``[1, b, b]`` with ``block_share``), in float32 or wider."""
        vec = self.oft_R.to(work_dtype(dtype or self.oft_R.dtype))
        return cayley(skew_from_upper(vec, self.block_size), self.cayley_form, self.neumann_terms)

    def _delta(self, weight: Tensor) -> Tensor:
        w = weight.detach().to(work_dtype(weight.dtype))
        return rotate_input_side(w, self.rotation_blocks(w.dtype)) - w

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return F.linear(x, self._delta(weight).to(x.dtype))

    def dense_update(self, weight: Tensor) -> DenseUpdate | None:
        # COFT projects the stored tensor in __call__, before any cast: that one goes through the call
        return None if self.coft else DenseUpdate(self._delta(weight))

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``W0 R^T - W0`` (``[out, in]``, float32 or wider); with ``coft``, ``oft_R`` is projected first."""
        if self.coft:
            self.project_()
        return self._delta(weight)

    def extra_repr(self) -> str:
        share = ", block_share" if self.block_share else ""
        return (
            f"in_features={self.in_features}, block_size={self.block_size}, cayley={self.cayley_form}{share}"
        )


@register_method(
    "oft", "OFT: block-diagonal orthogonal (Cayley) rotation of each target's input, W' = W0 R^T; mergeable"
)
class Oft(Method):
    config_class = OftConfig
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        cfg: OftConfig = self.config
        sites = [site for target in cfg.targets for site in linear_sites(model, target)]
        for site in sites:
            if site.in_features % cfg.block_size:
                raise ValueError(
                    f"oft: block_size {cfg.block_size} does not divide the input width {site.in_features} "
                    f"of target {site.target!r}"
                )
        for site in sites:
            layer = adapt_linear(site)
            delta = OftDelta(
                site.in_features,
                cfg.block_size,
                block_share=cfg.block_share,
                coft=cfg.coft,
                eps=cfg.eps,
                cayley_form=cfg.cayley,
                neumann_terms=cfg.neumann_terms,
            )
            layer.add_delta(f"oft_{site.target}", delta, site.start, site.stop)
