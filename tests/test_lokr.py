"""LoKr: Hugging Face peft parity in float64 (fused qkv, q/v slices against a split copy, the patch
embedding's conv in its three forms, decompose_both / decompose_factor, the lycoris init; eval and
training dropouts), peft's factorization and shape rules, merge/unmerge/unload, identity at init,
save/load, ViT-B/16 counts and options. The peft helpers are tests/test_loha.py's."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import perturb_, tiny_swin, tiny_vit
from test_loha import check_peft_parity, check_peft_training_parity, lycoris_deltas
from torch import nn

import petl_zoo
from petl_zoo.layers import AdaptedLinear, AdaptedModule
from petl_zoo.methods.loha import LycorisDelta
from petl_zoo.methods.lokr import LokrConfig, LokrDelta, factorization, lokr_shapes


# ------------------------------------------------------------------------------------------ peft parity
@pytest.mark.parametrize(
    ("targets", "options"),
    [
        (("qkv",), {}),  # peft's defaults: r = alpha = 8; tiny qkv 144 x 48: full w1 [12, 6], full w2 [12, 8]
        (("qkv",), dict(rank=2, alpha=3.0)),  # low-rank w2 (2 < 12 / 2), scale 1.5
        (("q", "v"), dict(rank=2, alpha=1.0, decompose_both=True)),  # w1 = w1_a @ w1_b as well
        (("q", "v"), dict(rank=4, alpha=4.0, decompose_factor=4, init="lycoris")),
        (("patch_embed",), {}),  # full w2 [8, 3, 8, 8], w1 [6, 1] broadcast over the kernel
        (("patch_embed",), dict(rank=2, alpha=4.0)),  # low-rank w2 over the flattened kernel
        (("patch_embed",), dict(rank=2, alpha=4.0, use_effective_conv2d=True)),  # Tucker core t2
        (("q", "v", "patch_embed"), dict(rank=2, alpha=2.0, decompose_both=True, init="random")),
    ],
    ids=[
        "qkv-default",
        "qkv-low-rank",
        "q-v-split-decompose-both",
        "q-v-factor-4-lycoris-init",
        "patch-conv-full",
        "patch-conv-low-rank",
        "patch-conv-tucker",
        "all-random-init",
    ],
)
def test_matches_peft_lokr(targets, options):
    check_peft_parity("lokr", "LoKrConfig", targets, **options)


@pytest.mark.parametrize("scale", [False, True])
def test_matches_peft_lokr_dropouts_in_training(scale):
    check_peft_training_parity(
        "lokr",
        "LoKrConfig",
        ("q", "v", "patch_embed"),
        rank=2,
        alpha=2.0,
        rank_dropout=0.5,
        module_dropout=0.3,
        rank_dropout_scale=scale,
    )


def test_factorization_and_shapes_are_peft_s():
    layer = pytest.importorskip("peft.tuners.lokr.layer")
    for dim in (*range(1, 200), 768, 1024, 2304, 3072):
        for factor in (-1, 2, 3, 4, 8, 16):
            assert factorization(dim, factor) == layer.factorization(dim, factor), (dim, factor)
    assert factorization(768) == (24, 32) and factorization(2304) == (48, 48)
    assert lokr_shapes(768, 768, 8, False, -1) == ((24, 32), (24, 32), True, False)
    assert lokr_shapes(768, 768, 8, True, -1) == ((24, 32), (24, 32), False, False)
    assert lokr_shapes(768, 768, 16, False, -1) == ((24, 32), (24, 32), True, True)


# ------------------------------------------------------------------------------------------ our contract
def test_delta_weight_is_the_kronecker_formula():
    torch.manual_seed(0)
    delta = LokrDelta((6, 8), rank=1, scaling=0.5, init="random").double()  # 6 = 2 x 3, 8 = 2 x 4
    assert (
        delta.lokr_w1.shape == (2, 2) and delta.lokr_w2_a.shape == (3, 1) and delta.lokr_w2_b.shape == (1, 4)
    )
    w2 = delta.lokr_w2_a @ delta.lokr_w2_b
    expected = torch.zeros(6, 8, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            expected[3 * i : 3 * i + 3, 4 * j : 4 * j + 4] = delta.lokr_w1[i, j] * w2 * 0.5
    torch.testing.assert_close(delta.delta_weight(torch.zeros(6, 8)), expected, atol=1e-15, rtol=0)
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(delta(x, None), x @ expected.T, atol=1e-14, rtol=0)
    assert delta.low_rank(torch.zeros(6, 8)) is None  # no one-pass (U, D) form


@pytest.mark.parametrize("build", [tiny_vit, tiny_swin])
@pytest.mark.parametrize(
    "options",
    [{}, dict(targets=("qkv", "patch_embed"), rank=2, use_effective_conv2d=True, init="lycoris")],
)
def test_identity_at_init_merge_unmerge_unload(build, options, images):
    torch.manual_seed(0)
    pristine = build().eval()
    model = petl_zoo.create("lokr", copy.deepcopy(pristine), **options).eval()
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))  # w1 = 0 (lycoris: w2 = 0): delta_W = 0
    perturb_(model, std=0.2)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        tuned = model(images)
    assert not torch.allclose(tuned, pristine(images))
    assert petl_zoo.is_mergeable(model)
    petl_zoo.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=1e-5)
    petl_zoo.unmerge(model)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    assert not any(isinstance(m, (AdaptedLinear, AdaptedModule, LycorisDelta)) for m in plain.modules())
    assert type(plain.patch_embed.proj) is nn.Conv2d
    assert set(plain.state_dict()) == set(pristine.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(images), tuned, atol=1e-5, rtol=1e-5)


def test_save_load_exact(tmp_path, images):
    torch.manual_seed(0)
    pristine = tiny_vit()
    options = dict(targets=("q", "v", "patch_embed"), rank=2, decompose_both=True, use_effective_conv2d=True)
    model = petl_zoo.create("lokr", copy.deepcopy(pristine), **options).eval()
    perturb_(model)
    petl_zoo.save_adapter(model, tmp_path / "lokr")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "lokr").eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    assert petl_zoo.method_of(fresh).config == LokrConfig(**options)


def test_bf16_host_keeps_fp32_factors_and_merges(images):
    torch.manual_seed(0)
    model = petl_zoo.create("lokr", tiny_vit().to(torch.bfloat16), targets=("q", "v", "patch_embed"), rank=2)
    perturb_(model)
    assert all(p.dtype == torch.float32 for d in lycoris_deltas(model).values() for p in d.parameters())
    out = model(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(p.grad is not None for d in lycoris_deltas(model).values() for p in d.parameters())
    model.eval()
    with torch.no_grad():
        tuned = model(images.to(torch.bfloat16)).float()
        petl_zoo.merge(model)
        torch.testing.assert_close(model(images.to(torch.bfloat16)).float(), tuned, atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    ("options", "count"),
    [
        ({}, 26_112),  # w1 [24, 24] + w2 [32, 8] @ [8, 32] = 1,088 a site, 24 sites
        (dict(targets=("qkv",)), 21_504),  # w1 [48, 24] + [48, 8] @ [8, 32] = 1,792 a block
        (dict(decompose_both=True), 21_504),  # w1 [24, 8] @ [8, 24] + 512 = 896 a site
        (dict(targets=("patch_embed",)), 6_424),  # w1 [24, 1] + [32, 8] @ [8, 3 * 16 * 16]
        (dict(targets=("patch_embed",), use_effective_conv2d=True), 16_688),  # 24 + 8*8*16*16 + 8*32 + 8*3
    ],
)
def test_vit_base_counts(options, count):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    petl_zoo.create("lokr", model, **options)
    assert petl_zoo.trainable_parameters(model)["method"] == count


def test_options_validated():
    cfg = LokrConfig()
    assert (cfg.rank, cfg.alpha, cfg.rank_dropout, cfg.module_dropout) == (8, 8.0, 0.0, 0.0)
    assert (cfg.decompose_both, cfg.decompose_factor, cfg.rank_dropout_scale) == (False, -1, False)
    assert cfg.targets == ("q", "v") and cfg.init == "default" and not cfg.use_effective_conv2d
    with pytest.raises(ValueError, match="decompose_factor must be -1 .* or a positive integer, got 0"):
        LokrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match="module_dropout must be in"):
        LokrConfig(module_dropout=-0.1)
    with pytest.raises(ValueError, match="unknown target 'block' for method 'lokr'"):
        petl_zoo.create("lokr", tiny_vit(), targets=("block",))
