"""VPT on Swin: parity with the authors' Swin prompt code (KMnP/vpt @ 4410440,
``src/models/vit_prompt/swin_transformer.py``) re-hosted over timm's Swin, deep and shallow, outputs and
prompt gradients in float64; the sample mixing of their batched code; counts on Swin-B; init; every
adapted site called; identity-free; save/load; SwinV2 refused."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import timm
import torch
from conftest import tiny_host, tiny_swin
from timm.models.swin_transformer import PatchMerging, window_partition, window_reverse
from torch import nn

import petl_zoo
from petl_zoo.methods.vpt import (
    PromptedAveragePool,
    PromptedFinalNorm,
    PromptedPatchMerging,
    PromptedSwinBlock,
    PromptedWindowAttention,
    prompt_init_bound,
)


def prompt_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [
        m.parallel["prompt"].tokens
        for m in model.modules()
        if isinstance(m, PromptedSwinBlock) and m.parallel
    ]


# -- the authors' forward (their code's structure, timm's modules and geometry) ---------------------------


def _pad_prompts(t: torch.Tensor, p: int) -> torch.Tensor:
    """Their zero rows, then zero columns, for the prompts (L230-260; zeros in t's dtype: float64 here)."""
    c, h, w = t.shape
    t = torch.cat((torch.zeros(c, p, w, dtype=t.dtype), t), dim=1)
    return torch.cat((torch.zeros(c, h + p, p, dtype=t.dtype), t), dim=-1)


def authors_window_attention(attn, x, mask, p):
    """``PromptedWindowAttention.forward``: unfused attention, zero bias and mask for the prompts."""
    b_, n, c = x.shape
    qkv = attn.qkv(x).reshape(b_, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q * attn.scale) @ k.transpose(-2, -1)
    area = attn.window_area
    rpb = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(area, area, -1)
    a = a + _pad_prompts(rpb.permute(2, 0, 1).contiguous(), p).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        a = a.view(b_ // nw, nw, attn.num_heads, n, n) + _pad_prompts(mask, p).unsqueeze(1).unsqueeze(0)
        a = a.view(-1, attn.num_heads, n, n)
    a = a.softmax(-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(b_, n, c))


def authors_block(blk, x, res, p):
    """``PromptedSwinTransformerBlock.forward`` on ``[B, p + H W, C]`` (prompts first)."""
    (h, w), (ws, _), shift = res, blk.window_size, blk.shift_size[0]
    b, _, c = x.shape
    shortcut, x = x, blk.norm1(x)
    prompt, x = x[:, :p], x[:, p:].reshape(b, h, w, c)
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    xw = window_partition(x, (ws, ws)).view(-1, ws * ws, c)
    nw = xw.shape[0] // b
    # their expansion is window-major while window_partition is sample-major: equal only for B = 1
    prompt = prompt.unsqueeze(0).expand(nw, -1, -1, -1).reshape(-1, p, c)
    aw = authors_window_attention(blk.attn, torch.cat((prompt, xw), dim=1), blk.attn_mask, p)
    prompt, aw = aw[:, :p].reshape(-1, b, p, c).mean(0), aw[:, p:]
    x = window_reverse(aw.reshape(-1, ws, ws, c), (ws, ws), h, w)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + torch.cat((prompt, x.reshape(b, h * w, c)), dim=1)
    return x + blk.mlp(blk.norm2(x))


def authors_merge(pm, x, res, p):
    """``PromptedPatchMerging.forward``: prompts split off, ``cat(P, P, P, P)``, re-attached, norm, reduce."""
    (h, w), (b, _, c) = res, x.shape
    prompt, x = torch.cat([x[:, :p]] * 4, dim=-1), x[:, p:].reshape(b, h, w, c)
    x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    x = torch.cat((prompt, torch.cat([x0, x1, x2, x3], -1).reshape(b, -1, 4 * c)), dim=1)
    return pm.reduction(pm.norm(x))


def authors_logits(pristine, x, prompts, deep):
    """``incorporate_prompt`` (prepend), ``BasicLayer.forward`` (deep: before every block but the first,
    ``cat(P_i, h[:, p:])``), their ``PromptedPatchMerging`` (timm runs it at the start of the next stage),
    ``norm``, ``avgpool`` over prompts and patches, timm's head ``fc``. Eval: no prompt dropout."""
    p = prompts[0].shape[0]
    h = pristine.patch_embed(x)
    b, hh, ww, c = h.shape
    h = torch.cat((prompts[0].expand(b, -1, -1), h.reshape(b, hh * ww, c)), dim=1)
    i = 0
    for stage in pristine.layers:
        if isinstance(stage.downsample, PatchMerging):
            h, hh, ww = authors_merge(stage.downsample, h, (hh, ww), p), hh // 2, ww // 2
        for blk in stage.blocks:
            if deep and i > 0:
                h = torch.cat((prompts[i].expand(b, -1, -1), h[:, p:]), dim=1)
            h, i = authors_block(blk, h, (hh, ww), p), i + 1
    return pristine.head.fc(pristine.norm(h).mean(1))


def swin_pair(deep, **kwargs):
    torch.manual_seed(0)
    host = tiny_swin(depths=(2, 2), **kwargs).double().eval()
    pristine = copy.deepcopy(host)
    model = petl_zoo.create("vpt", host, deep=deep, num_prompts=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in prompt_tensors(model):
            t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return pristine, model


# -- parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_parity_with_the_authors_swin_prompts(deep):
    """Outputs and prompt gradients within 1e-10 (fp64); the authors' forward runs one sample at a time
    (their batched code mixes samples, below). tiny_swin with two blocks a stage: shifted windows
    (stage 0: 16 windows, stage 1: 4) and a patch merging."""
    pristine, model = swin_pair(deep)
    prompts = prompt_tensors(model)
    assert len(prompts) == (4 if deep else 1)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    weights = torch.randn(3, 5, dtype=torch.float64)
    assert any(b.base.shift_size[0] > 0 and b.base.attn_mask is not None for b in model.layers[0].blocks)
    for fused in (True, False):
        for m in model.modules():
            if isinstance(m, PromptedWindowAttention):
                m.base.fused_attn = fused
        ours = model(x)
        ours_grads = torch.autograd.grad((ours * weights).sum(), prompts)
        theirs_prompts = [t.detach().clone().requires_grad_() for t in prompts]
        theirs = torch.cat([authors_logits(pristine, x[i : i + 1], theirs_prompts, deep) for i in range(3)])
        theirs_grads = torch.autograd.grad((theirs * weights).sum(), theirs_prompts)
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
        for a, b in zip(ours_grads, theirs_grads, strict=True):
            assert b.abs().max() > 0
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_the_authors_batched_code_mixes_samples():
    """Their ``prompt_emb.unsqueeze(0).expand(nW, ...)`` pairs window ``j`` (sample ``j // nW``) with the
    prompts of sample ``j % B``: with B > 1 one sample's logits depend on the others. Ours do not."""
    pristine, model = swin_pair(deep=False)
    prompts = [t.detach() for t in prompt_tensors(model)]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    other = torch.cat([x[:1], torch.randn(1, 3, 32, 32, dtype=torch.float64)])
    with torch.no_grad():
        assert (
            authors_logits(pristine, x, prompts, False)[0]
            - authors_logits(pristine, other, prompts, False)[0]
        ).abs().max() > 1e-6
        torch.testing.assert_close(model(x)[0], model(other)[0], atol=1e-12, rtol=0)


# -- sites, counts, init ---------------------------------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_every_wrapper_is_called_by_timms_forward(deep):
    model = petl_zoo.create("vpt", tiny_swin(depths=(2, 2)), deep=deep)
    kinds = (
        PromptedSwinBlock,
        PromptedWindowAttention,
        PromptedPatchMerging,
        PromptedFinalNorm,
        PromptedAveragePool,
    )
    watched = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    counts = {type(m).__name__: 0 for m in watched.values()}
    assert len([m for m in watched.values() if isinstance(m, PromptedSwinBlock)]) == 4
    assert ("PromptedPatchMerging" in counts) is not deep  # deep prompts replace the merged ones
    called = set()
    for n, m in watched.items():
        m.register_forward_hook(lambda *_, n=n: called.add(n))
        counts[type(m).__name__] += 1
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert called == set(watched)


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"num_prompts": 5, "deep": False}, 640),  # the authors' default (NUM_TOKENS 5, DEEP False)
        ({"num_prompts": 5}, 60_160),
        ({}, 120_320),  # ours: deep, 10 prompts
        ({"deep": False}, 1_280),
    ],
    ids=str,
)
def test_swin_base_counts(options, expected):
    """Swin-B (embed 128, depths 2, 2, 18, 2): the authors' ``prompt_embeddings`` [1, p, 128] and deep
    ``deep_prompt_embeddings_0..3`` of shapes [1, p, 128], [2, p, 256], [18, p, 512], [2, p, 1024]:
    ``p (2 * 128 + 2 * 256 + 18 * 512 + 2 * 1024) = 12,032 p`` deep, ``128 p`` shallow."""
    with torch.device("meta"):
        model = petl_zoo.create("vpt", timm.create_model("swin_base_patch4_window7_224"), **options)
    assert petl_zoo.trainable_parameters(model)["method"] == expected
    p, deep = options.get("num_prompts", 10), options.get("deep", True)
    assert expected == p * (12_032 if deep else 128)


def test_init_bound_uses_the_embedding_width_for_every_stage():
    """Their ``val = sqrt(6 / (3 * 4 * 4 + embed_dim))`` for all stages' prompts (0.1846 on Swin-B)."""
    assert prompt_init_bound((4, 4), 128) == math.sqrt(6 / 176)
    torch.manual_seed(0)
    model = petl_zoo.create("vpt", tiny_swin(depths=(2, 2)), num_prompts=50)  # patch 2, embed 16
    bound = math.sqrt(6 / (3 * 2 * 2 + 16))
    widths = [t.shape[1] for t in prompt_tensors(model)]
    assert widths == [16, 16, 32, 32]
    for t in prompt_tensors(model):
        assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound


# -- behaviour, save/load, refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_prompts_change_outputs_and_save_load_is_exact(deep, tmp_path):
    torch.manual_seed(0)
    pristine = tiny_host("swin").eval()  # two blocks a stage, shifted windows
    model = petl_zoo.create("vpt", copy.deepcopy(pristine), deep=deep).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        assert (before - pristine(x)).abs().max() > 1e-4  # not identity at init: the prompts are attended
        assert model.forward_features(x).shape == pristine.forward_features(x).shape
        model.forward_head(model.forward_features(x))
        for t in prompt_tensors(model):
            t.normal_()
        tuned = model(x)
        assert (tuned - before).abs().max() > 1e-4
    petl_zoo.save_adapter(model, tmp_path / "ad")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)
    with pytest.raises(ValueError, match="method 'vpt' cannot be merged"):
        petl_zoo.merge(model)


def test_copies_keep_no_forward_tensors():
    model = petl_zoo.create("vpt", tiny_swin(depths=(2, 2))).train()
    x = torch.randn(2, 3, 32, 32)
    model.forward_features(x).sum().backward()  # the pool's prompts are left behind, with a graph
    twin = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), model.eval()(x))


def test_non_average_pool_is_refused():
    with pytest.raises(ValueError, match="global_pool='avg', got 'max'"):
        petl_zoo.create("vpt", tiny_swin(global_pool="max"))


@pytest.mark.parametrize("host", ["swinv2", "swinv2_cr"])
def test_swinv2_is_refused(host):
    with pytest.raises(ValueError, match="does not support the .* family: .*SwinV2"):
        petl_zoo.create("vpt", tiny_host(host))
