"""FacT: ViT-B/16 and Swin-B counts, parity with the authors' re-hosted FacT-TT / FacT-TK forwards (fp64,
dropout positions included), the TK interleaving, shared factors (counted, saved and loaded once; one
pair per Swin stage), merge/unmerge exactness, every host family with ``kind='tt'``, options."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from conftest import HOSTS, perturb_, pre_hook_count, tiny_host, tiny_swin, tiny_vit
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

import petl_zoo
from petl_zoo.layers import AdaptedLinear
from petl_zoo.methods.fact import (
    FACT_TARGETS,
    FactConfig,
    FactDelta,
    FactFactors,
    FactTKDelta,
    FactTTDelta,
    FactTucker,
)
from petl_zoo.targets import iter_blocks, linear_sites

try:
    from timm.layers.mlp import Mlp
except ImportError:  # pragma: no cover - older timm
    from timm.models.layers.mlp import Mlp


def fact_deltas(model: nn.Module) -> dict[tuple[int, str], FactDelta]:
    """``(block index, target) -> delta`` of a FacT model (targets qkv, proj, fc1, fc2)."""
    return {
        (site.block.index, target): site.linear.deltas[f"fact_{target}"]
        for target in FACT_TARGETS
        for site in linear_sites(model, target)
    }


def closed_form_count(model: nn.Module, kind: str, rank: int) -> int:
    """``2 d r`` per stage + TT: ``12 r^2`` per block (mlp_ratio 4) / TK: ``r`` per column + ``r^3``."""
    blocks = iter_blocks(model)
    shared = sum(2 * d * rank for d in {b.stage: b.dim for b in blocks}.values())
    if kind == "tt":
        return shared + len(blocks) * (4 * rank**2 + 4 * rank**2 + 4 * rank**2)
    return shared + rank * 12 * len(blocks) + rank**3


# -- counts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,rank,expected",
    [("tt", 8, 21_504), ("tt", 16, 61_440), ("tk", 32, 86_528), ("tk", 16, 30_976), ("tk", 8, 13_952)],
)
def test_vit_base_counts(kind, rank, expected):
    with torch.device("meta"):  # shapes only
        model = petl_zoo.create("fact", timm.create_model("vit_base_patch16_224"), kind=kind, rank=rank)
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == counts["stored"] == expected == closed_form_count(model, kind, rank)
    formula = 1_536 * rank + (144 * rank**2 if kind == "tt" else 144 * rank + rank**3)
    assert formula == expected


def test_swin_base_counts_one_factor_pair_per_stage():
    """The paper's Swin-B FacT-TT16 row has 0.135 M parameters: U/V per stage (widths 128..1024)."""
    with torch.device("meta"):
        tt = petl_zoo.create("fact", timm.create_model("swin_base_patch4_window7_224"), kind="tt", rank=16)
        tk = petl_zoo.create("fact", timm.create_model("swin_base_patch4_window7_224"), kind="tk", rank=32)
    assert petl_zoo.trainable_parameters(tt)["method"] == 135_168 == 2 * 16 * 1920 + 24 * 12 * 16**2
    assert petl_zoo.trainable_parameters(tk)["method"] == 164_864 == 2 * 32 * 1920 + 32 * 288 + 32**3
    assert closed_form_count(tk, "tk", 32) == 164_864


# -- parity with the authors' code ---------------------------------------------------------------------
# JieShibo/PETL-ViT @ 026e4f1, FacT/fact_tt.py L60-127 and FacT/fact_tk.py L59-134, re-hosted on current
# timm: their module-level ``vit`` is the global below; 768 -> the model's width and 144 -> 12 * depth;
# timm 0.4.12's ``Mlp.drop`` is timm 1.0's ``drop1``/``drop2`` (both p = 0 here), ``q_norm``/``k_norm``/
# ``norm`` are Identity on this host, and timm 1.0's Block passes ``attn_mask=None``. The bodies are
# otherwise theirs, line for line.
vit: nn.Module | None = None


def tt_forward_attn(self, x, attn_mask=None, is_causal=False):
    assert attn_mask is None and not is_causal  # timm 1.0's Block passes these; no mask in a ViT
    B, N, C = x.shape
    qkv = self.qkv(x)
    q = vit.FacTv(self.dp(self.q_FacTs(vit.FacTu(x))))
    k = vit.FacTv(self.dp(self.k_FacTs(vit.FacTu(x))))
    v = vit.FacTv(self.dp(self.v_FacTs(vit.FacTu(x))))
    qkv += torch.cat([q, k, v], dim=2) * self.s
    qkv = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    proj = self.proj(x)
    proj += vit.FacTv(self.dp(self.proj_FacTs(vit.FacTu(x)))) * self.s
    x = self.proj_drop(proj)
    return x


def tt_forward_mlp(self, x):
    B, N, C = x.shape
    h = self.fc1(x)
    h += (
        vit.FacTv(self.dp(self.fc1_FacTs(vit.FacTu(x))).reshape(B, N, 4, self.dim)).reshape(B, N, 4 * C)
        * self.s
    )
    x = self.act(h)
    x = self.drop1(x)
    h = self.fc2(x)
    x = x.reshape(B, N, 4, C)
    h += vit.FacTv(self.dp(self.fc2_FacTs(vit.FacTu(x).reshape(B, N, 4 * self.dim)))) * self.s
    x = self.drop2(h)
    return x


def tk_forward_attn(self, x, attn_mask=None, is_causal=False):
    assert attn_mask is None and not is_causal  # timm 1.0's Block passes these; no mask in a ViT
    B, N, C = x.shape
    FacTc = vit.FacTc @ vit.FacTp[:, self.idx : self.idx + 4]
    q_FacTc, k_FacTc, v_FacTc, proj_FacTc = FacTc[:, :, 0], FacTc[:, :, 1], FacTc[:, :, 2], FacTc[:, :, 3]
    qkv = self.qkv(x)
    q = vit.FacTv(self.dp(vit.FacTu(x) @ q_FacTc))
    k = vit.FacTv(self.dp(vit.FacTu(x) @ k_FacTc))
    v = vit.FacTv(self.dp(vit.FacTu(x) @ v_FacTc))
    qkv += torch.cat([q, k, v], dim=2) * self.s
    qkv = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    proj = self.proj(x)
    proj += vit.FacTv(self.dp(vit.FacTu(x) @ proj_FacTc)) * self.s
    x = self.proj_drop(proj)
    return x


def tk_forward_mlp(self, x):
    B, N, C = x.shape
    FacTc = vit.FacTc @ vit.FacTp[:, self.idx : self.idx + 8]
    fc1_FacTc = FacTc[:, :, :4].reshape(self.dim, self.dim * 4)
    fc2_FacTc = FacTc[:, :, 4:].reshape(self.dim, self.dim * 4)
    h = self.fc1(x)
    h += vit.FacTv(self.dp(vit.FacTu(x) @ fc1_FacTc).reshape(B, N, 4, self.dim)).reshape(B, N, 4 * C) * self.s
    x = self.act(h)
    x = self.drop1(x)
    h = self.fc2(x)
    x = x.reshape(B, N, 4, C)
    h += vit.FacTv(self.dp(vit.FacTu(x).reshape(B, N, 4 * self.dim) @ fc2_FacTc.t())) * self.s
    x = self.drop2(h)
    return x


def set_fact(model, kind, dim, s, width, depth):
    """The authors' ``set_FacT`` (TT: fact_tt.py L103-127, TK: fact_tk.py L107-134), one function."""
    if type(model) == VisionTransformer:  # noqa: E721 - as in their code
        model.FacTu = nn.Linear(width, dim, bias=False)
        model.FacTv = nn.Linear(dim, width, bias=False)
        if kind == "tk":
            model.FacTp = nn.Parameter(torch.zeros([dim, 12 * depth], dtype=torch.float))
            model.FacTc = nn.Parameter(torch.zeros([dim, dim, dim], dtype=torch.float))
            model.idx = 0
    for _ in model.children():
        if type(_) == Attention:  # noqa: E721
            if kind == "tt":
                _.q_FacTs = nn.Linear(dim, dim, bias=False)
                _.k_FacTs = nn.Linear(dim, dim, bias=False)
                _.v_FacTs = nn.Linear(dim, dim, bias=False)
                _.proj_FacTs = nn.Linear(dim, dim, bias=False)
            else:
                _.idx = vit.idx
                vit.idx += 4
            _.dp = nn.Dropout(0.1)
            _.s = s
            _.dim = dim
            forward = tt_forward_attn if kind == "tt" else tk_forward_attn
            _.forward = forward.__get__(_, _.__class__)
        elif type(_) == Mlp:  # noqa: E721
            if kind == "tt":
                _.fc1_FacTs = nn.Linear(dim, dim * 4, bias=False)
                _.fc2_FacTs = nn.Linear(4 * dim, dim, bias=False)
            else:
                _.idx = vit.idx
                vit.idx += 8
            _.dim = dim
            _.s = s
            _.dp = nn.Dropout(0.1)
            forward = tt_forward_mlp if kind == "tt" else tk_forward_mlp
            _.forward = forward.__get__(_, _.__class__)
        elif len(list(_.children())) != 0:
            set_fact(_, kind, dim, s, width, depth)


def authors_model(pristine: nn.Module, ours: nn.Module, kind: str, rank: int, scale: float) -> nn.Module:
    """The authors' FacT on a copy of ``pristine``, with our model's tensors copied in."""
    global vit
    vit = copy.deepcopy(pristine)
    width, depth = vit.embed_dim, len(vit.blocks)
    set_fact(vit, kind, rank, scale, width, depth)
    deltas = fact_deltas(ours)
    factors = deltas[0, "qkv"].factors
    with torch.no_grad():
        vit.head.load_state_dict(ours.head.state_dict())  # trained (perturbed) with the method
        vit.FacTu.weight.copy_(factors.U)
        vit.FacTv.weight.copy_(factors.V)
        if kind == "tk":
            vit.FacTc.copy_(deltas[0, "qkv"].tucker.core)
            vit.FacTp.copy_(deltas[0, "qkv"].tucker.columns)
        else:
            for i, block in enumerate(vit.blocks):
                for j, core in enumerate(deltas[i, "qkv"].core.chunk(3)):  # rows: T_q, T_k, T_v
                    getattr(block.attn, f"{'qkv'[j]}_FacTs").weight.copy_(core)
                block.attn.proj_FacTs.weight.copy_(deltas[i, "proj"].core)
                block.mlp.fc1_FacTs.weight.copy_(deltas[i, "fc1"].core)
                block.mlp.fc2_FacTs.weight.copy_(deltas[i, "fc2"].core)
    return vit.double()


class FixedMask(nn.Module):
    """A deterministic stand-in for dropout: a fixed 0 / 1/(1-p) pattern of period ``RANK`` along the last
    dimension (the authors drop q, k, v separately, we drop their stacked ``3r`` outputs), so a delta and
    the authors' code agree only if their dropout sits on the same tensors."""

    def forward(self, x):
        g = torch.Generator().manual_seed(1000)
        keep = (torch.rand(RANK, generator=g) > 0.3).to(x.dtype) / 0.7
        assert x.shape[-1] % RANK == 0
        return x * keep.repeat(x.shape[-1] // RANK)


RANK = 4


def ours_and_authors(kind: str, rank: int = RANK, scale: float = 0.7):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    ours = petl_zoo.create("fact", copy.deepcopy(pristine), kind=kind, rank=rank, scale=scale)
    perturb_(ours, std=0.3)  # V away from zero, every core moved
    ours = ours.double().eval()
    return pristine, ours, authors_model(pristine, ours, kind, rank, scale).eval()


@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_matches_the_authors_code(kind, images):
    pristine, ours, theirs = ours_and_authors(kind)
    x = images.double()
    with torch.no_grad():
        expected = theirs(x)
        assert (expected - pristine.double()(x)).abs().max() > 1e-3  # the update is visible
        torch.testing.assert_close(ours(x), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_dropout_sits_between_core_and_v_as_in_the_authors_code(kind, images):
    _, ours, theirs = ours_and_authors(kind)
    x = images.double()
    with torch.no_grad():
        plain = ours(x)
        for delta in fact_deltas(ours).values():
            delta.dropout = FixedMask()
        for block in theirs.blocks:
            block.attn.dp = FixedMask()
            block.mlp.dp = FixedMask()
        masked = ours(x)
        assert (masked - plain).abs().max() > 1e-3  # the masks matter
        torch.testing.assert_close(masked, theirs(x), atol=1e-10, rtol=0)


def test_tk_fc1_chunks_interleave_the_four_columns():
    """Hidden chunk ``i`` of fc1, element ``t``, reads column ``(i r + t) mod 4`` of the block's fc1 columns
    (the authors' reshape), not column ``i``."""
    torch.manual_seed(0)
    model = petl_zoo.create("fact", tiny_vit(), kind="tk", rank=4).double()
    delta = fact_deltas(model)[0, "fc1"]
    r = delta.rank
    m = delta.tucker.matrices(delta.columns)  # [r, r, 4]
    t1 = delta.core_matrix()  # [4r, r]
    for i in range(4):
        for t in range(r):
            k = i * r + t
            torch.testing.assert_close(t1[k], m[:, k // 4, k % 4], atol=0, rtol=0)
    assert not torch.equal(t1[:r], m[:, :, 0].T)  # the clean mapping would differ
    fc2 = fact_deltas(model)[0, "fc2"]
    torch.testing.assert_close(fc2.core_matrix(), fc2.tucker.matrices(fc2.columns).reshape(r, 4 * r))
    assert [fact_deltas(model)[1, t].columns for t in FACT_TARGETS] == [
        range(12, 15),  # q, k, v
        range(15, 16),  # proj
        range(16, 20),  # fc1
        range(20, 24),  # fc2
    ]
    qkv = fact_deltas(model)[0, "qkv"]  # attention: the clean stack, T_j = M_j^T
    m = qkv.tucker.matrices(qkv.columns)
    torch.testing.assert_close(qkv.core_matrix(), torch.cat([m[:, :, j].T for j in range(3)]), atol=0, rtol=0)


# -- shared factors ------------------------------------------------------------------------------------


def test_factors_are_shared_per_stage_and_counted_and_saved_once(family):
    torch.manual_seed(0)
    model = petl_zoo.create("fact", {"vit": tiny_vit, "swin": tiny_swin}[family](), kind="tk", rank=3)
    deltas = fact_deltas(model)
    stages = {b.index: b.stage for b in iter_blocks(model)}
    by_stage: dict[int, set[int]] = {}
    for (block, _), delta in deltas.items():
        by_stage.setdefault(stages[block], set()).add(id(delta.factors))
    assert all(len(ids) == 1 for ids in by_stage.values())
    assert len({next(iter(ids)) for ids in by_stage.values()}) == (2 if family == "swin" else 1)
    assert len({id(d.tucker) for d in deltas.values()}) == 1
    saved = petl_zoo.adapter_state_dict(model)
    factor_keys = [k for k in saved if k.endswith((".U", ".V", ".core", ".columns"))]
    assert len(factor_keys) == 2 * len(by_stage) + 2
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == counts["stored"] == closed_form_count(model, "tk", 3)


def test_save_load_keeps_the_factors_shared(tmp_path, images):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    model = petl_zoo.create("fact", copy.deepcopy(pristine), kind="tt", rank=3).eval()
    perturb_(model)
    petl_zoo.save_adapter(model, tmp_path / "ad")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
        shared = fact_deltas(fresh)[0, "qkv"].factors
        assert all(d.factors is shared for d in fact_deltas(fresh).values())
        shared.V.add_(0.1)  # one tensor moves every adapted matrix
        moved = fresh.blocks[1].mlp.fc2.deltas.fact_fc2.factors.V
        assert torch.equal(moved, shared.V)
    assert petl_zoo.trainable_parameters(fresh) == petl_zoo.trainable_parameters(model)
    copied = fact_deltas(copy.deepcopy(fresh))
    assert len({id(d.factors) for d in copied.values()}) == 1


# -- weight space: formula, merge, unmerge -------------------------------------------------------------


def paper_delta_w(delta: FactDelta) -> torch.Tensor:
    """``s V T U`` per ``d x d`` block, straight from the paper's formulas (float64)."""
    u, v, t = delta.factors.U.double(), delta.factors.V.double(), delta.core_matrix().double()
    r = u.shape[0]
    if delta.chunks_out > 1:  # fc1: block row i
        return delta.scale * torch.cat([v @ t[i * r : (i + 1) * r] @ u for i in range(delta.chunks_out)])
    if delta.chunks_in > 1:  # fc2: block column i
        return delta.scale * torch.cat([v @ t[:, i * r : (i + 1) * r] @ u for i in range(delta.chunks_in)], 1)
    return delta.scale * v @ t @ u


@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_delta_weight_is_the_paper_formula_and_the_forward(kind, family):
    torch.manual_seed(0)
    model = petl_zoo.create(
        "fact", {"vit": tiny_vit, "swin": tiny_swin}[family](), kind=kind, rank=3, scale=2.0
    )
    perturb_(model, std=0.2)
    model = model.double().eval()
    for delta in fact_deltas(model).values():
        w = delta.delta_weight(torch.empty(0))
        torch.testing.assert_close(w, paper_delta_w(delta), atol=1e-12, rtol=0)
        x = torch.randn(2, 5, w.shape[1], dtype=torch.float64)
        torch.testing.assert_close(delta(x, None), x @ w.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_merge_unmerge_exact(kind, family, images):
    torch.manual_seed(0)
    pristine = {"vit": tiny_vit, "swin": tiny_swin}[family]().double().eval()
    model = petl_zoo.create("fact", copy.deepcopy(pristine), kind=kind, rank=3).eval()
    perturb_(model, std=0.2)
    x = images.double()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        tuned = model(x)
        petl_zoo.merge(model)
        torch.testing.assert_close(model(x), tuned, atol=1e-10, rtol=0)
        petl_zoo.unmerge(model)
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
        assert torch.equal(model(x), tuned)
        plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
        assert not any(
            isinstance(m, (AdaptedLinear, FactDelta, FactFactors, FactTucker)) for m in plain.modules()
        )
        assert plain.state_dict().keys() == pristine.state_dict().keys() and pre_hook_count(plain) == 0
        torch.testing.assert_close(plain(x), tuned, atol=1e-10, rtol=0)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_tt_on_every_host(host, images, tmp_path):
    """The contract test runs the default (TK); this covers TT on every family the same way."""
    torch.manual_seed(0)
    pristine = tiny_host(host).eval()
    if host.startswith("eva"):
        with pytest.raises(ValueError, match="method 'fact' does not support the eva family: FacT cuts"):
            petl_zoo.create("fact", pristine, kind="tt")
        return
    model = petl_zoo.create("fact", copy.deepcopy(pristine), kind="tt", rank=2).eval()
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))
    perturb_(model)
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == closed_form_count(model, "tt", 2)
    with torch.no_grad():
        tuned = model(images)
        assert (tuned - pristine(images)).abs().max() > 1e-4
    petl_zoo.save_adapter(model, tmp_path / "ad")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), tuned)
        petl_zoo.merge(model)
        torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=1e-5)


# -- init, shapes, options -----------------------------------------------------------------------------


def test_init_is_the_authors():
    torch.manual_seed(0)
    model = petl_zoo.create("fact", tiny_vit(), kind="tt", rank=8)  # width 48
    deltas = fact_deltas(model)
    f = deltas[0, "qkv"].factors
    assert f.U.shape == (8, 48) and f.V.shape == (48, 8) and not f.V.any()
    assert f.U.abs().max() <= 1 / math.sqrt(48) and f.U.abs().max() > 0.8 / math.sqrt(48)
    for (_, target), d in deltas.items():
        assert isinstance(d, FactTTDelta)
        shape, bound = {
            "qkv": ((24, 8), 1 / math.sqrt(8)),  # T_q, T_k, T_v stacked: each nn.Linear(8, 8)'s init
            "fc1": ((32, 8), 1 / math.sqrt(8)),
            "fc2": ((8, 32), 1 / math.sqrt(32)),
        }.get(target, ((8, 8), 1 / math.sqrt(8)))
        assert d.core.shape == shape and d.core.abs().max() <= bound
        assert isinstance(d.dropout, nn.Dropout) and d.dropout.p == 0.1
    tk = petl_zoo.create("fact", tiny_vit(), kind="tk", rank=8)
    tucker = fact_deltas(tk)[0, "qkv"].tucker
    assert tucker.core.shape == (8, 8, 8) and tucker.columns.shape == (8, 24)
    assert tucker.core.abs().max() <= math.sqrt(3) / 8
    assert tucker.columns.abs().max() <= math.sqrt(6 / (24 + 8))
    assert all(isinstance(d, FactTKDelta) for d in fact_deltas(tk).values())


def test_mlp_ratio_two_has_two_chunks_and_odd_ratios_are_refused():
    torch.manual_seed(0)
    model = petl_zoo.create("fact", tiny_vit(mlp_ratio=2.0), kind="tk", rank=2)
    fc1 = fact_deltas(model)[0, "fc1"]
    assert (fc1.chunks_in, fc1.chunks_out, fc1.columns) == (1, 2, range(4, 6))
    assert fact_deltas(model)[1, "qkv"].columns == range(8, 11)  # 4 + 2 * 2 columns a block
    with pytest.raises(ValueError, match="fc1 48 -> 120 .* the hidden width must be a multiple of 48"):
        petl_zoo.create("fact", tiny_vit(mlp_ratio=2.5))


def test_defaults_and_recipe():
    cfg = FactConfig()
    assert (cfg.kind, cfg.rank, cfg.scale, cfg.dropout) == ("tk", 8, 10.0, 0.1)  # s: the authors' mode
    method = petl_zoo.get_method("fact")
    assert method.recipe == {} and method.identity_at_init
    assert "eva" not in method.families and {"vit", "swin"} <= set(method.families)
    assert petl_zoo.is_mergeable(petl_zoo.create("fact", tiny_swin()))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"kind": "cp"}, "bad value 'cp' for option 'kind'.*'tt', 'tk'"),
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"scale": 0}, "scale must be a finite non-zero number, got 0.0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"format": "tt"}, "unknown option 'format' for method 'fact'; valid options: dropout, kind, rank"),
    ],
    ids=str,
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        petl_zoo.create("fact", tiny_vit(), **options)


def test_tk_delta_checks_its_columns_and_layout():
    factors, tucker = FactFactors(8, 2), FactTucker(2, 12)
    with pytest.raises(ValueError, match="one column per chunk: 4 chunks, 3 columns"):
        FactTKDelta(factors, tucker, range(0, 3), "fc1", 4, 1.0, 0.0)
    with pytest.raises(ValueError, match="unknown TK layout 'clean'; valid layouts: stack, fc1, fc2"):
        FactTKDelta(factors, tucker, range(0, 4), "clean", 4, 1.0, 0.0)


def test_training_moves_every_factor():
    torch.manual_seed(0)
    model = petl_zoo.create("fact", tiny_vit(), kind="tk", rank=4, scale=10.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
