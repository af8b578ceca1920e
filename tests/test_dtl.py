"""DTL / DTL+: parity with the authors' forward (fp64, outputs and gradients), counts on ViT-B/16, the
frozen blocks before ``M`` keep nothing for backward, identity at init, save/load, options, refusals."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from conftest import tiny_host, tiny_vit
from torch import nn

import petl_zoo
from petl_zoo.methods.dtl import DTLAdd, DTLBlock, DTLConfig, DTLFusion, DTLMap


# -- the authors' code, re-hosted ----------------------------------------------------------------------
def swish(x, beta):
    """heekhero/DTL @ bf6c51e, models/vision_transformer.py L44-45."""
    return x * torch.sigmoid(x * beta)


class LoRALinear(nn.Module):
    """models/vision_transformer.py L47-68 (``LoRALinear``)."""

    def __init__(self, in_features, out_features, r=0):
        super().__init__()
        self.r = r
        assert r > 0
        self.lora_A = nn.Parameter(torch.zeros((r, in_features)))
        self.lora_B = nn.Parameter(torch.zeros((out_features, r)))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        return x @ self.lora_A.T @ self.lora_B.T


class AuthorsDTL(nn.Module):
    """The authors' ``VisionTransformer`` CSN parts (L359-367) and ``forward`` (L413-450) over a timm ViT's
    own modules: their hard-coded 14 x 14 grid / 196 patches are ``grid`` here; their ``self.norm`` after
    the patch-token mean is timm's ``fc_norm`` of a ``global_pool='avg'`` host (the same computation)."""

    def __init__(self, vit, r, lora_before_blocks, add_after_blocks, beta, fusion_size, grid):
        super().__init__()
        self.vit = vit
        embed_dim = vit.embed_dim
        self.num_tokens, self.num_features, self.grid = 1, embed_dim, grid
        self.beta = beta
        self.lora_before_blocks = lora_before_blocks
        self.add_after_blocks = add_after_blocks
        self.lora_dict = nn.ModuleDict({i: LoRALinear(embed_dim, embed_dim, r=r) for i in lora_before_blocks})
        if fusion_size > 0:
            self.lora_fusion = nn.Conv2d(
                embed_dim, embed_dim, kernel_size=fusion_size, stride=1, padding="same", groups=embed_dim,
                bias=False,
            )  # fmt: skip
        else:
            self.lora_fusion = None

    def forward(self, x):
        v, (gh, gw) = self.vit, self.grid
        B = x.shape[0]
        x = v.patch_embed(x)
        cls_token = v.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, x), dim=1)
        x = v.pos_drop(x + v.pos_embed)
        residuals = 0.0
        for bid, block in enumerate(v.blocks):
            if str(bid) in self.lora_before_blocks:
                residuals = residuals + self.lora_dict[str(bid)](x)
            x = block(x)
            if str(bid) in self.add_after_blocks:
                act_residuals = swish(residuals, self.beta)
                if self.lora_fusion is not None:
                    token_residual = act_residuals[:, 0].unsqueeze(1)
                    patch_residuals = (
                        act_residuals[:, self.num_tokens :]
                        .reshape(B, gh, gw, self.num_features)
                        .permute(0, 3, 1, 2)
                    )
                    fusion_patch_residuals = (
                        self.lora_fusion(patch_residuals)
                        .permute(0, 2, 3, 1)
                        .reshape(B, gh * gw, self.num_features)
                    )
                    fusion_residuals = torch.cat([token_residual, fusion_patch_residuals], dim=1)
                else:
                    fusion_residuals = act_residuals
                x = x + fusion_residuals
        x = x[:, self.num_tokens :].mean(dim=1)
        x = v.fc_norm(x)
        return v.head(x)


def _pair(fusion_size, read_from=0, add_from=2, depth=4, beta=100.0, rank=2):
    """Our patched host and the authors' model over an unpatched copy, same weights (fp64)."""
    torch.manual_seed(0)
    host = tiny_vit(depth=depth, global_pool="avg").double().eval()
    theirs_host = copy.deepcopy(host)
    opts = dict(rank=rank, beta=beta, read_from=read_from, add_from=add_from, fusion_size=fusion_size)
    ours = petl_zoo.create("dtl", host, **opts)
    with torch.no_grad():  # random B (zero at init) and conv: a real signal
        for block in ours.blocks:
            if isinstance(block, DTLBlock):
                block.parallel["dtl"].lora_B.normal_(0, 0.3)
    blocks = [str(i) for i in range(read_from, depth)]
    theirs = AuthorsDTL(
        theirs_host, rank, blocks, [str(i) for i in range(add_from, depth)], beta, fusion_size, (4, 4)
    ).double().eval()  # fmt: skip
    with torch.no_grad():
        for i in blocks:
            mine = ours.blocks[int(i)].parallel["dtl"]
            theirs.lora_dict[i].lora_A.copy_(mine.lora_A)
            theirs.lora_dict[i].lora_B.copy_(mine.lora_B)
        if fusion_size:
            fusion = ours.blocks[add_from].sequential["dtl"].fusion
            fusion.conv.weight.normal_(0, 0.3)
            theirs.lora_fusion.weight.copy_(fusion.conv.weight)
        theirs.vit.head.weight.copy_(ours.head.weight)
        theirs.vit.head.bias.copy_(ours.head.bias)
    for n, p in theirs.named_parameters():
        p.requires_grad_("lora_" in n or n.startswith("vit.head."))
    return ours, theirs


def _grads(ours, theirs, x, y):
    """(ours, theirs): {authors' name: gradient} of the same loss."""
    mine, their = {}, {}
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
    for i, block in enumerate(ours.blocks):
        if isinstance(block, DTLBlock):
            mine[f"lora_dict.{i}.lora_A"] = block.parallel["dtl"].lora_A.grad
            mine[f"lora_dict.{i}.lora_B"] = block.parallel["dtl"].lora_B.grad
            add = block.sequential["dtl"] if "dtl" in block.sequential else None
            if add is not None and "fusion" in add._modules:
                mine["lora_fusion.weight"] = add.fusion.conv.weight.grad
    mine["vit.head.weight"], mine["vit.head.bias"] = ours.head.weight.grad, ours.head.bias.grad
    their.update({n: p.grad for n, p in theirs.named_parameters() if p.requires_grad})
    return mine, their


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # theirs too (k = 4)
@pytest.mark.parametrize(
    "fusion_size,read_from,add_from", [(0, 0, 2), (3, 0, 2), (4, 1, 1), (5, 0, 3)], ids=str
)
def test_parity_with_the_authors_forward(fusion_size, read_from, add_from):
    ours, theirs = _pair(fusion_size, read_from, add_from)
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 1])
    with torch.no_grad():
        out, ref = ours(x), theirs(x)
    assert (out - ref).abs().max() <= 1e-10 and out.abs().max() > 0.1
    mine, their = _grads(ours, theirs, x, y)
    assert mine.keys() == their.keys()
    for name, grad in their.items():
        assert grad.abs().max() > 0, name
        assert (mine[name] - grad).abs().max() <= 1e-10, name


def test_vit_b16_counts_match_the_paper():
    with torch.device("meta"):
        base = timm.create_model("vit_base_patch16_224", pretrained=False)
    expected = {0: 36_864, 3: 43_776, 4: 49_152, 5: 56_064}  # 12 * 2 * (2 * 768) (+ 768 k^2)
    for k, count in expected.items():
        model = petl_zoo.create("dtl", copy.deepcopy(base), fusion_size=k)
        assert petl_zoo.trainable_parameters(model)["method"] == count
        adds = [b for b in model.blocks if isinstance(b, DTLBlock) and "dtl" in b.sequential]
        assert [model.blocks[i] in adds for i in range(12)] == [False] * 6 + [True] * 6
    assert round(expected[0] / 1e6, 2) == 0.04  # the paper's "0.04 M" (DTL, ViT-B/16)


def test_identity_at_init_and_the_authors_init():
    for k in (0, 3):
        torch.manual_seed(0)
        pristine = tiny_vit().eval()
        model = petl_zoo.create("dtl", copy.deepcopy(pristine), fusion_size=k)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), pristine(x))
        dtl_map = model.blocks[0].parallel["dtl"]
        assert torch.count_nonzero(dtl_map.lora_B) == 0 and dtl_map.lora_A.abs().max() > 0
        bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) on [r, D]: U(-1/sqrt(D), 1/sqrt(D))
        assert dtl_map.lora_A.abs().max() <= bound


def test_frozen_blocks_before_m_keep_nothing_for_backward():
    """No backbone tensor needs or gets a gradient; blocks 0..M-1 record no autograd graph (nothing
    saved for backward); blocks after M do (the authors' design: the side output flows through them)."""
    torch.manual_seed(0)
    model = petl_zoo.create("dtl", tiny_vit(depth=4).train(), add_from=2, fusion_size=3)
    with torch.no_grad():
        for block in model.blocks:
            block.parallel["dtl"].lora_B.normal_(0, 0.3)
    current: list[str] = ["outside"]
    saved: dict[str, int] = {}

    def pack(t):
        saved[current[0]] = saved.get(current[0], 0) + 1
        return t

    for i, block in enumerate(model.blocks):
        block.base.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, f"block{i}"))
        block.base.register_forward_hook(lambda *_: current.__setitem__(0, "outside"))
    x = torch.randn(2, 3, 32, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).logsumexp(-1).sum()
    assert "block0" not in saved and "block1" not in saved and "block2" not in saved
    assert saved["block3"] > 0 and saved["outside"] > 0
    loss.backward()
    backbone = [(n, p) for n, p in model.named_parameters() if "dtl" not in n and not n.startswith("head")]
    assert backbone and all(not p.requires_grad and p.grad is None for _, p in backbone)
    assert all(p.grad is not None for n, p in model.named_parameters() if "dtl" in n)

    # the same gradients with blocks 0..M-1 explicitly under no_grad
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    grad_mode: list[bool] = []

    def no_grad_in(*_):
        grad_mode.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def no_grad_out(*_):
        torch.set_grad_enabled(True)

    for block in list(model.blocks)[:2]:
        block.base.register_forward_pre_hook(no_grad_in)
        block.base.register_forward_hook(no_grad_out)
    model(x).logsumexp(-1).sum().backward()
    assert grad_mode == [True, True]
    for n, g in reference.items():
        assert torch.equal(dict(model.named_parameters())[n].grad, g), n


def test_save_load_exact_and_not_mergeable(tmp_path):
    torch.manual_seed(0)
    pristine = tiny_vit(depth=3).eval()
    model = petl_zoo.create("dtl", copy.deepcopy(pristine), fusion_size=4, read_from=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    petl_zoo.save_adapter(model, tmp_path / "ad")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert not petl_zoo.is_mergeable(model)
    assert not isinstance(model.blocks[0], DTLBlock)  # read_from=1: block 0 untouched
    owner = model.blocks[1].sequential["dtl"]  # add_from None -> depth // 2 = 1 owns the shared conv
    other = model.blocks[2].sequential["dtl"]
    assert "fusion" in owner._modules and "fusion" not in other._modules and other.fusion is owner.fusion


def test_prefix_tokens_pass_the_fusion_and_bf16_keeps_fp32():
    fusion = DTLFusion(8, 3, prefix_tokens=5)
    t = torch.randn(2, 5 + 12, 8)
    out = fusion(t, (3, 4))
    assert torch.equal(out[:, :5], t[:, :5]) and out.shape == t.shape
    with pytest.raises(ValueError, match="do not fit"):
        fusion(t, (4, 4))
    torch.manual_seed(0)
    model = petl_zoo.create("dtl", tiny_host("dinov2_reg").to(torch.bfloat16), fusion_size=3)
    own = [p for n, p in model.named_parameters() if "dtl" in n]
    assert own and all(p.dtype == torch.float32 for p in own)
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in own)


def test_options_and_refusals():
    assert DTLConfig() == DTLConfig(rank=2, beta=100.0, read_from=0, add_from=None, fusion_size=0)
    with pytest.raises(ValueError, match="add_from"):
        DTLConfig(read_from=3, add_from=2)
    with pytest.raises(ValueError, match="rank"):
        DTLConfig(rank=0)
    with pytest.raises(ValueError, match="must be blocks of this 2-block model"):
        petl_zoo.create("dtl", tiny_vit(), add_from=6)
    with pytest.raises(ValueError, match="does not support the swin family"):
        petl_zoo.create("dtl", tiny_host("swin"))
    with pytest.raises(ValueError, match="drops patch tokens"):
        petl_zoo.create("dtl", tiny_vit(patch_drop_rate=0.5), fusion_size=3)
    model = petl_zoo.create("dtl", tiny_vit(patch_drop_rate=0.5))  # plain DTL needs no grid
    assert isinstance(model.blocks[1].sequential["dtl"], DTLAdd)
    assert isinstance(model.blocks[0].parallel["dtl"], DTLMap) and "dtl" not in model.blocks[0].sequential


def test_dynamic_image_size_grid():
    torch.manual_seed(0)
    model = petl_zoo.create("dtl", tiny_vit(dynamic_img_size=True, global_pool="avg"), fusion_size=3).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.parallel["dtl"].lora_B.normal_(0, 0.3)
        assert model(torch.randn(1, 3, 32, 48)).shape == (1, 5)  # a 4 x 6 grid
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
