"""VPT: parity with the authors' prompt math (shallow and deep, eval and train), token layout with any
number of prefix tokens, heads that pool, EVA's rotary embedding, counts, init, options, refusals."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from conftest import tiny_host, tiny_vit
from torch import nn

import petl_zoo
from petl_zoo.methods.vpt import PromptedBlock, Vpt, VptConfig, prompt_init_bound
from petl_zoo.train.recipe import resolve_recipe


def prompt_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The prompt tokens of every prompted block, in block order."""
    return [
        m.parallel["prompt"].tokens for m in model.modules() if isinstance(m, PromptedBlock) and m.parallel
    ]


def authors_logits(
    pristine: nn.Module, x: torch.Tensor, prompts: list[torch.Tensor], deep: bool, dropout: float, train: bool
) -> torch.Tensor:
    """KMnP/vpt @ 4410440, src/models/vit_prompt/vit.py, re-hosted on timm's embeddings, blocks and norm:
    ``incorporate_prompt`` (L75-87: ``cat(x[:, :1], drop(P.expand(B, -1, -1)), x[:, 1:])``), the encoder
    (shallow) or ``forward_deep_prompt`` (L102-130: before layer i >= 1, ``cat(h[:, :1], drop(P_i),
    h[:, 1 + p:])``), ``encoder_norm`` and the head on ``x[:, 0]`` (L160-169). Their backbone stays in
    eval mode while training (L89-100); only the prompt dropout follows ``train``."""
    drop = nn.Dropout(dropout).train(train)
    batch, p = x.shape[0], prompts[0].shape[0]
    emb = pristine.norm_pre(pristine.patch_drop(pristine._pos_embed(pristine.patch_embed(x))))
    hidden = torch.cat((emb[:, :1], drop(prompts[0].expand(batch, -1, -1)), emb[:, 1:]), dim=1)
    for i, layer in enumerate(pristine.blocks):
        if deep and i > 0:
            hidden = torch.cat(
                (hidden[:, :1], drop(prompts[i].expand(batch, -1, -1)), hidden[:, 1 + p :]), dim=1
            )
        hidden = layer(hidden)
    return pristine.head(pristine.norm(hidden)[:, 0])


def reference_logits(
    pristine: nn.Module, x: torch.Tensor, prompts: list[torch.Tensor], deep: bool
) -> torch.Tensor:
    """The same math for ``n`` prefix tokens (our generalisation: prompts after all of them), the prompt
    outputs dropped before the host's own norm, pooling and head (eval)."""
    n, p = pristine.num_prefix_tokens, prompts[0].shape[0]
    batch = x.shape[0]
    hidden = pristine.norm_pre(pristine._pos_embed(pristine.patch_embed(x)))
    hidden = torch.cat((hidden[:, :n], prompts[0].expand(batch, -1, -1), hidden[:, n:]), dim=1)
    for i, layer in enumerate(pristine.blocks):
        if deep and i > 0:
            hidden = torch.cat((hidden[:, :n], prompts[i].expand(batch, -1, -1), hidden[:, n + p :]), dim=1)
        hidden = layer(hidden)
    hidden = torch.cat((hidden[:, :n], hidden[:, n + p :]), dim=1)
    return pristine.forward_head(pristine.norm(hidden))


def vpt_pair(host: nn.Module, **options) -> tuple[nn.Module, nn.Module]:
    """(pristine copy, patched model with perturbed prompts), both float64."""
    host = host.double().eval()
    pristine = copy.deepcopy(host)
    model = petl_zoo.create("vpt", host, **options)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in prompt_tensors(model):
            t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return pristine, model


# -- parity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_parity_with_the_authors_prompt_math(deep, depth, train):
    torch.manual_seed(0)
    pristine, model = vpt_pair(tiny_vit(depth=depth), deep=deep, num_prompts=3, prompt_dropout=0.1)
    prompts = [t.detach() for t in prompt_tensors(model)]
    assert len(prompts) == (depth if deep else 1)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model.train(train)
    torch.manual_seed(1)
    ours = model(x)
    torch.manual_seed(1)
    theirs = authors_logits(pristine, x, prompts, deep, 0.1, train)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
    if train:  # the dropout really acted: another draw gives other logits
        assert (model(x) - ours).abs().max() > 1e-6


@pytest.mark.parametrize("host", ["deit_distilled", "dinov2_reg", "gap", "siglip", "clip"])
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_prefix_tokens_and_pooled_heads(host, deep):
    torch.manual_seed(0)
    pristine, model = vpt_pair(tiny_host(host, depth=3), deep=deep, num_prompts=2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    prompts = [t.detach() for t in prompt_tensors(model)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(pristine, x, prompts, deep), atol=1e-10, rtol=0)
        assert model.forward_features(x).shape == pristine.forward_features(x).shape  # prompts dropped


def test_token_layout_after_every_prefix_token():
    torch.manual_seed(0)
    pristine, model = vpt_pair(tiny_host("dinov2_reg", depth=2), num_prompts=3)  # class + 4 registers
    n = pristine.num_prefix_tokens
    assert n == 5
    seen = {}
    for i, block in enumerate(model.blocks):
        block.base.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        emb = pristine._pos_embed(pristine.patch_embed(x))
    prompts = prompt_tensors(model)
    assert torch.equal(seen[0][:, :n], emb[:, :n]) and torch.equal(seen[0][:, n + 3 :], emb[:, n:])
    for i in (0, 1):  # block 1's prompts are fresh: the previous prompt outputs are replaced
        assert torch.equal(seen[i][:, n : n + 3], prompts[i].expand(2, -1, -1))
    assert seen[1].shape[1] == emb.shape[1] + 3


@pytest.mark.parametrize("host", ["vit", "eva02", "eva_sep"])
def test_prompts_carry_no_position(host):
    """Permuting the prompts of every block leaves the logits unchanged: no position embedding, and on
    EVA no rotary embedding (the attention counts them as prefix tokens)."""
    torch.manual_seed(0)
    _, model = vpt_pair(tiny_host(host), num_prompts=4)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        for t in prompt_tensors(model):
            t.copy_(t[[2, 0, 3, 1]])
        torch.testing.assert_close(model(x), before, atol=1e-12, rtol=0)
    if host.startswith("eva"):
        assert all(b.base.attn.num_prefix_tokens == 1 + 4 for b in model.blocks)


def test_shallow_wraps_only_the_first_and_last_block():
    model = petl_zoo.create("vpt", tiny_vit(depth=4), deep=False)
    wrapped = [isinstance(b, PromptedBlock) for b in model.blocks]
    assert wrapped == [True, False, False, True]
    assert [b.insert for b in model.blocks if isinstance(b, PromptedBlock)] == [True, False]
    assert [b.strip for b in model.blocks if isinstance(b, PromptedBlock)] == [False, True]


# -- counts, init, options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"deep": False}, 7_680),
        ({}, 92_160),
        ({"num_prompts": 50}, 460_800),
        ({"deep": False, "num_prompts": 1}, 768),
    ],
    ids=str,
)
def test_vit_base_counts(options, expected):
    with torch.device("meta"):
        model = petl_zoo.create("vpt", timm.create_model("vit_base_patch16_224"), **options)
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == expected
    cfg = VptConfig(**options)
    assert expected == 768 * cfg.num_prompts * (12 if cfg.deep else 1)


def test_init_is_uniform_with_the_patch_aware_bound():
    assert prompt_init_bound((16, 16), 768) == 0.0625  # ViT-B/16: sqrt(6 / 1536)
    torch.manual_seed(0)
    model = petl_zoo.create("vpt", tiny_vit(), num_prompts=10)  # patch 8, width 48
    bound = math.sqrt(6 / (3 * 8 * 8 + 48))
    for t in prompt_tensors(model):
        assert t.shape == (10, 48) and t.abs().max() <= bound and t.abs().max() > 0.9 * bound


def test_options_and_recipe():
    cfg = VptConfig()
    assert (cfg.num_prompts, cfg.deep, cfg.prompt_dropout, cfg.resolved_dropout) == (10, True, None, 0.1)
    assert VptConfig(deep=False).resolved_dropout == 0.0
    assert VptConfig(deep=False, prompt_dropout=0.2).resolved_dropout == 0.2
    with pytest.raises(ValueError, match="num_prompts must be a positive integer, got 0"):
        petl_zoo.create("vpt", tiny_vit(), num_prompts=0)
    with pytest.raises(ValueError, match=r"prompt_dropout must be in \[0, 1\)"):
        VptConfig(prompt_dropout=1.0)
    recipe, sources = resolve_recipe("vtab", Vpt.recipe, {}, "vpt")
    assert recipe["drop_path"] == 0.0 and sources["drop_path"] == "method:vpt" and recipe["min_lr"] == 0.0
    # the paper's SGD learning rate, and the batch size its lr rule is tied to, do not carry over to AdamW
    assert (recipe["lr"], recipe["batch_size"]) == (1e-3, 64) and sources["lr"] == "recipe:vtab"


# -- refusals, merge, save/load ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["relpos", "beit", "swinv2", "swinv2_cr"])
def test_fixed_layout_families_are_refused(host):
    with pytest.raises(ValueError, match="does not support the .* family: prompts change the token count"):
        petl_zoo.create("vpt", tiny_host(host))


def test_attention_mask_is_refused():
    model = petl_zoo.create("vpt", tiny_vit())
    with pytest.raises(ValueError, match="attention masks are not supported"):
        model.forward_features(
            torch.randn(1, 3, 32, 32), attn_mask=torch.ones(1, 1, 17, 17, dtype=torch.bool)
        )


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_not_mergeable_and_save_load(deep, tmp_path):
    torch.manual_seed(0)
    model = petl_zoo.create("vpt", tiny_vit(depth=3), deep=deep).eval()
    with torch.no_grad():
        for t in prompt_tensors(model):
            t.normal_()
    assert not petl_zoo.is_mergeable(model)
    with pytest.raises(ValueError, match="method 'vpt' cannot be merged: .*VptPrompts"):
        petl_zoo.merge(model)
    with pytest.raises(ValueError, match="method 'vpt' cannot be merged"):
        petl_zoo.merge(model, unload=True)
    petl_zoo.save_adapter(model, tmp_path / "ad")
    saved = petl_zoo.read_adapter_config(tmp_path / "ad")
    assert saved["mergeable"] is False and saved["config"]["deep"] is deep
    torch.manual_seed(0)
    fresh = petl_zoo.load_adapter(tiny_vit(depth=3), tmp_path / "ad").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_eval_mode_host_gets_eval_mode_prompt_dropout():
    model = petl_zoo.create("vpt", tiny_vit().eval(), prompt_dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_flop_counter_sees_the_prompted_forward():
    """torch's module tracking (FlopCounterMode, used by tools/benchmark.py) under no_grad: the prompt
    dropout's input must not be a no-grad view of a Parameter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = petl_zoo.create("vpt", tiny_vit()).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() > 0
