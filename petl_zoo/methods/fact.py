"""FacT: Factor-Tuning, tensorised weight increments shared across the whole ViT (Jie & Deng, AAAI 2023).

FacT stacks the increments of all ``d x d`` weight matrices of a ViT (per block: ``q``, ``k``, ``v``,
``proj``, and ``fc1``/``fc2`` as four ``d x d`` chunks each: 12 per block) into one tensor and factorises
it. Torch layout, ``y = x W0^T + b``; ``U`` (``[r, d]``, the Linear ``d -> r``) and ``V`` (``[d, r]``,
``r -> d``, zeros at init) are **shared by every adapted matrix of the model**; each matrix ``j`` has a
small core ``T_j``; ``dp`` is dropout between the core and ``V``::

    delta_j(x) = s * V dp(T_j U x)                      q, k, v, proj: T_j is r x r
    fc1:  z = dp(T_1 U x) (4r),  delta = s * cat_i[V z_i]       chunk i = z[i r:(i+1) r] -> hidden i d:(i+1) d
    fc2:  g = cat_i[U h_i] (4r) of the hidden chunks h_i,  delta = s * V dp(T_2 g)

so ``delta_W_j = s V T_j U`` (fc1: block row ``i`` is ``s V T_1[i r:(i+1) r] U``; fc2: block column
``i`` is ``s V T_2[:, i r:(i+1) r] U``): mergeable. ``kind`` chooses how the cores are made:

- ``'tt'`` (tensor train): per block ``T_q, T_k, T_v, T_proj`` ``r x r``, ``T_1`` ``4r x r``, ``T_2``
  ``r x 4r``, trainable (PyTorch Linear default init). ``1,536 r + 144 r^2`` on ViT-B/16: r = 8: 21,504;
  r = 16: 61,440.
- ``'tk'`` (Tucker): one core tensor ``C`` (``r x r x r``, xavier-uniform) and one factor ``P``
  (``[r, 12 * depth]``, xavier-uniform) with a column per ``d x d`` slice; slice ``j``'s matrix is
  ``M_j = C x_3 P[:, j]`` and ``T_j = M_j^T``. fc1 and fc2 use the authors' reshape: the ``(r, r, 4)``
  stack ``M`` of their four columns becomes ``(r, 4r)`` with ``[a, 4b + c] = M[a, b, c]``, so
  ``T_1 = M.reshape(r, 4r)^T`` and ``T_2 = M.reshape(r, 4r)``: the four hidden chunks are an
  *interleaving* of the four columns' matrices, not chunk ``i`` = column ``i``.
  ``1,536 r + 144 r + r^3`` on ViT-B/16: r = 32: 86,528; r = 16: 30,976.

On the fused ``qkv`` Linear the q, k and v increments are its three ``d``-wide output chunks, so one
delta computes ``U x`` once with the stacked core ``[T_q; T_k; T_v]`` (``3r x r``; TT: one parameter,
TK: the three columns' ``M_j^T``), exactly the authors' ``cat([q, k, v])``; their three dropout calls
draw independent masks, as does one dropout on the stacked ``3r`` outputs.

Generalised beyond ViT-B only where the paper is silent: ``d`` is each block's width, the MLP is cut
into ``hidden / d`` chunks (4 for ``mlp_ratio`` 4; a hidden width that is not a multiple of ``d`` is
refused), ``P`` has ``4 + 2 * hidden / d`` columns per block. On hierarchical models (Swin) the stages
differ in width, so there is **one shared ``U``/``V`` pair per stage** (one for a plain ViT) while
``C`` and ``P`` stay model-wide; with TT r = 16 this gives the paper's Swin-B count, 0.135 M (135,168).

Defaults: the comparison set's variant, ``kind='tk'``, with the authors' code defaults ``rank=8``
(``set_FacT(model, dim=8, s=1)``: the paper's fixed-rank row FacT-TK8), ``scale=10`` (the value their
shipped per-task configs choose most often; their function's argument default is 1), dropout 0.1
(both files). The paper's headline rows search rank and ``s`` per task: presets ``paper`` (FacT-TK<=32)
and ``paper_tt`` (FacT-TT<=16). The authors' recipe is the shared VTAB one (``recipe = {}``); they
normalise with ImageNet mean/std and seed 42 (see the presets).

Compared with the authors' code (``JieShibo/PETL-ViT`` ``FacT/fact_tt.py``, ``fact_tk.py``): their
patched ``Attention``/``Mlp`` forwards re-hosted on a tiny timm ViT with the same tensors give the same
outputs in float64 to 1e-10, TT and TK, dropout positions included (``tests/test_fact.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, fraction, nonzero, positive
from ..layers import Delta, PetlModule, adapt_linear
from ..registry import Method, register_method
from ..targets import LinearSite, linear_sites

__all__ = [
    "FactConfig",
    "FactFactors",
    "FactTucker",
    "FactDelta",
    "FactTTDelta",
    "FactTKDelta",
    "Fact",
    "TK_LAYOUTS",
    "FACT_TARGETS",
]

#: The Linears FacT adapts in every block, in the authors' order (their TK column order too): the fused
#: ``qkv`` carries the q, k and v matrices as three ``d``-wide output chunks (one delta, one ``U x``).
FACT_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class FactConfig(MethodConfig):
    """FacT options: ``kind`` ``'tt'`` (tensor train) or ``'tk'`` (Tucker), ``rank`` = ``r``,
    ``scale`` = ``s``, ``dropout`` between the core and ``V``."""

    kind: Literal["tt", "tk"] = "tk"
    rank: int = positive(8)
    #: The authors' most common per-task scale: 10 in 9 of the 19 FacT-TK and 6 of the 19 FacT-TT configs
    #: they ship (JieShibo/PETL-ViT FacT/configs/{tk,tt}/<task>.yaml, presets/fact*.yaml; their
    #: ``set_FacT`` argument default is s=1, which none of their published rows uses more often).
    scale: float = nonzero(10.0)
    dropout: float = fraction(0.1)


class FactFactors(PetlModule):
    """The shared factors of one width: ``U`` (``[r, d]``, ``nn.Linear(d, r)``'s default init) and ``V``
    (``[d, r]``, zeros). One instance is registered in every delta of its stage: named, counted and
    saved once (``named_parameters`` and ``save_adapter`` skip repeats)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.U = nn.Parameter(torch.empty(rank, dim))
        self.V = nn.Parameter(torch.zeros(dim, rank))
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"dim={self.U.shape[1]}, rank={self.U.shape[0]}"


class FactTucker(PetlModule):
    """FacT-TK's model-wide core ``C`` (``[r, r, r]``) and column factor ``P`` (``[r, columns]``, one
    column per ``d x d`` slice), both xavier-uniform as in the authors' code."""

    def __init__(self, rank: int, columns: int) -> None:
        super().__init__()
        self.core = nn.Parameter(torch.empty(rank, rank, rank))
        self.columns = nn.Parameter(torch.empty(rank, columns))
        nn.init.xavier_uniform_(self.core)
        nn.init.xavier_uniform_(self.columns)

    def matrices(self, columns: range) -> Tensor:
        """``M = C x_3 P[:, columns]`` (``[r, r, len(columns)]``)."""
        return self.core @ self.columns[:, columns.start : columns.stop]


class FactDelta(Delta):
    """``delta(x) = s * kron(I, V) dp(T kron(I, U) x)`` on one Linear: the input is cut into ``chunks_in``
    and the output into ``chunks_out`` ``d``-wide chunks (fc2: input 4, fc1: output 4, others 1); ``T``
    (``[chunks_out * r, chunks_in * r]``) comes from :meth:`core_matrix`. ``delta_W`` is the same
    product with the identity for ``x``."""

    mergeable = True

    def __init__(
        self, factors: FactFactors, chunks_in: int, chunks_out: int, scale: float, dropout: float
    ) -> None:
        super().__init__()
        self.factors = factors
        self.chunks_in = chunks_in
        self.chunks_out = chunks_out
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.factors.U.shape[0]

    def core_matrix(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        lead, r = x.shape[:-1], self.rank
        h = F.linear(x.reshape(*lead, self.chunks_in, -1), self.factors.U).reshape(*lead, -1)
        h = self.dropout(F.linear(h, self.core_matrix()))
        out = F.linear(h.reshape(*lead, self.chunks_out, r), self.factors.V).reshape(*lead, -1)
        return out * self.scale

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``s * kron(I, V) T kron(I, U)`` (``[chunks_out * d, chunks_in * d]``)."""
        u, v, r = self.factors.U, self.factors.V, self.rank
        core = self.core_matrix().reshape(self.chunks_out, r, self.chunks_in, r)
        full = torch.einsum("dp,opiq,qe->odie", v, core, u)
        return full.reshape(self.chunks_out * v.shape[0], self.chunks_in * u.shape[1]) * self.scale

    def extra_repr(self) -> str:
        return f"chunks_in={self.chunks_in}, chunks_out={self.chunks_out}, scale={self.scale}"


class FactTTDelta(FactDelta):
    """FacT-TT: the delta's own trainable core ``T`` (``nn.Linear(chunks_in * r, chunks_out * r)``'s
    default init, kaiming-uniform ``a = sqrt(5)``)."""

    def __init__(
        self, factors: FactFactors, chunks_in: int, chunks_out: int, scale: float, dropout: float
    ) -> None:
        super().__init__(factors, chunks_in, chunks_out, scale, dropout)
        r = self.rank
        self.core = nn.Parameter(torch.empty(chunks_out * r, chunks_in * r))
        nn.init.kaiming_uniform_(self.core, a=math.sqrt(5))

    def core_matrix(self) -> Tensor:
        return self.core


#: How a TK delta turns ``M = C x_3 P[:, columns]`` (``[r, r, n]``) into its core ``T`` (authors' code):
#: ``stack`` (qkv, proj) stacks ``M_j^T`` column by column; fc1 / fc2 reshape ``M`` to ``(r, n r)``
#: (``[a, n b + c] = M[a, b, c]``: the interleaving) and take its transpose (fc1) or itself (fc2).
TK_LAYOUTS = ("stack", "fc1", "fc2")


class FactTKDelta(FactDelta):
    """FacT-TK: ``T`` from the shared :class:`FactTucker` and this delta's columns of ``P`` (one per
    ``d x d`` chunk), arranged by ``layout`` (:data:`TK_LAYOUTS`)."""

    def __init__(
        self,
        factors: FactFactors,
        tucker: FactTucker,
        columns: range,
        layout: Literal["stack", "fc1", "fc2"],
        chunks: int,
        scale: float,
        dropout: float,
    ) -> None:
        if layout not in TK_LAYOUTS:
            raise ValueError(f"unknown TK layout {layout!r}; valid layouts: {', '.join(TK_LAYOUTS)}")
        if len(columns) != chunks:
            raise ValueError(
                f"FactTKDelta takes one column per chunk: {chunks} chunks, {len(columns)} columns"
            )
        chunks_in, chunks_out = (chunks, 1) if layout == "fc2" else (1, chunks)
        super().__init__(factors, chunks_in, chunks_out, scale, dropout)
        self.tucker = tucker
        self.columns = columns
        self.layout = layout

    def core_matrix(self) -> Tensor:
        r = self.rank
        m = self.tucker.matrices(self.columns)
        if self.layout == "stack":  # row block j = M[:, :, j]^T
            return m.permute(2, 1, 0).reshape(-1, r)
        flat = m.reshape(r, -1)
        return flat if self.layout == "fc2" else flat.T

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout}, columns={self.columns.start}..{self.columns.stop - 1}"


def _block_sites(model: nn.Module) -> list[dict[str, LinearSite]]:
    """Per block (in forward order), the site of each of :data:`FACT_TARGETS`."""
    per_block: dict[int, dict[str, LinearSite]] = {}
    for target in FACT_TARGETS:
        for site in linear_sites(model, target):
            slot = per_block.setdefault(site.block.index, {})
            if target in slot:
                raise ValueError(
                    f"fact adapts one {target} Linear per block; block {site.block.path} has two "
                    f"({slot[target].path}, {site.path})"
                )
            slot[target] = site
    return [per_block[i] for i in sorted(per_block)]


def _mlp_chunks(sites: dict[str, LinearSite]) -> int:
    """How many ``d``-wide chunks the block's MLP hidden layer has; a ValueError when the shapes do not
    fit FacT's ``d x d`` tensorisation."""
    info = sites["qkv"].block
    d = info.dim
    for target, shape in (("qkv", (d, 3 * d)), ("proj", (d, d))):
        site = sites[target]
        if (site.in_features, site.out_features) != shape:
            raise ValueError(
                f"fact needs {d} x {d} attention matrices; {target} of block {info.path} is "
                f"{site.in_features} -> {site.out_features}"
            )
    fc1, fc2 = sites["fc1"], sites["fc2"]
    hidden = fc1.out_features
    if hidden % d or fc1.in_features != d or (fc2.in_features, fc2.out_features) != (hidden, d):
        raise ValueError(
            f"fact cuts the MLP into {d}-wide chunks: block {info.path} has fc1 {fc1.in_features} -> "
            f"{hidden} and fc2 {fc2.in_features} -> {fc2.out_features}; the hidden width must be a "
            f"multiple of {d}"
        )
    return hidden // d


@register_method(
    "fact",
    "FacT: model-wide shared factors U, V with per-matrix TT or Tucker cores on every d x d weight; mergeable",
)
class Fact(Method):
    """FacT-TT / FacT-TK (see the module docstring). The authors' VTAB-1K recipe is the shared one
    (AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs, 10 warmup, drop-path 0.1): ``recipe = {}``."""

    config_class = FactConfig
    identity_at_init = True
    recipe: dict = {}
    families = ("vit", "vit_relpos", "beit", "swin", "swinv2", "swinv2_cr")
    unsupported_reason = (
        "FacT cuts the MLP into d x d blocks of one fc1 and one fc2; EVA's SwiGLU MLP has two input "
        "projections of width 8/3 d"
    )

    def apply(self, model: nn.Module) -> None:
        cfg: FactConfig = self.config
        blocks = _block_sites(model)
        chunks = [_mlp_chunks(sites) for sites in blocks]
        tucker = FactTucker(cfg.rank, sum(4 + 2 * m for m in chunks)) if cfg.kind == "tk" else None
        factors: dict[int, FactFactors] = {}  # one shared U/V per stage (a ViT has one)
        column = 0
        for sites, m in zip(blocks, chunks):
            info = sites["qkv"].block
            shared = factors.setdefault(info.stage, FactFactors(info.dim, cfg.rank))
            for target in FACT_TARGETS:
                count = {"qkv": 3, "proj": 1}.get(target, m)
                if tucker is None:
                    chunks_in, chunks_out = (count, 1) if target == "fc2" else (1, count)
                    delta = FactTTDelta(shared, chunks_in, chunks_out, cfg.scale, cfg.dropout)
                else:
                    layout = target if target in ("fc1", "fc2") else "stack"
                    columns = range(column, column + count)
                    column += count
                    delta = FactTKDelta(shared, tucker, columns, layout, count, cfg.scale, cfg.dropout)
                site = sites[target]
                adapt_linear(site).add_delta(f"fact_{target}", delta, site.start, site.stop)
