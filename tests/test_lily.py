"""Lily: shared experts and LPs, per-block routers, batch vs sample mixing, counts, save/load."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from conftest import BUILDERS, perturb_, pre_hook_count, tiny_swin, tiny_vit
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import petl_zoo
from petl_zoo.methods.lily import LilyDelta
from petl_zoo.targets import iter_blocks


def closed_form(model: nn.Module, rank: int, ne: int, targets=("k", "v", "mlp"), stride=None) -> int:
    """Experts once per target and stage, one LP per group of ``stride`` blocks, one router per block."""
    stages: dict[int, list] = {}
    for info in iter_blocks(model):
        stages.setdefault(info.stage, []).append(info)
    total = 0
    for infos in stages.values():
        depth, d = len(infos), infos[0].dim
        step = stride or max(1, depth // ne)
        n_lp = math.ceil(depth / step)
        for t in targets:
            r = 2 * rank if t == "mlp" else rank
            total += ne * r * d + n_lp * d * r + depth * r * ne
    return total


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def lily_deltas(model: nn.Module) -> list[LilyDelta]:
    return [m for m in model.modules() if isinstance(m, LilyDelta)]


def path(model: nn.Module, block: int, target: str) -> LilyDelta:
    b = model.blocks[block]
    return b.mlp.parallel["lily"] if target == "mlp" else b.attn.qkv.deltas[f"lily_{target}"]


def test_vit_base_counts_match_the_closed_form():
    with torch.device("meta"):  # shapes only: no memory, no init time
        base = timm.create_model("vit_base_patch16_224")
    for options, expected in [
        ({}, 792_576),  # r=32, ne=4 (defaults), stride 3 -> 4 LPs
        ({"rank": 8, "num_experts": 4}, 198_144),
        ({"rank": 8, "num_experts": 5, "stride_lp": 2}, 272_256),  # 6 LPs
    ]:
        model = petl_zoo.create("lily", copy.deepcopy(base), **options)
        counts = petl_zoo.trainable_parameters(model)
        assert counts["method"] == expected, options
        assert counts["stored"] == expected, options
        r, ne = options.get("rank", 32), options.get("num_experts", 4)
        assert expected == closed_form(model, r, ne, stride=options.get("stride_lp"))


@pytest.mark.parametrize("mixing", ["batch", "sample"])
def test_output_unchanged_at_init(family, mixing):
    torch.manual_seed(0)
    model = BUILDERS[family]().eval()
    reference = copy.deepcopy(model)
    x = images()
    petl_zoo.create("lily", model, rank=4, num_experts=3, mixing=mixing)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)


def test_gradients_reach_experts_first_then_lps_and_routers(family):
    torch.manual_seed(0)
    model = petl_zoo.create("lily", BUILDERS[family](), rank=4, num_experts=3)
    x, y = images(), torch.tensor([0, 1, 2, 3])
    experts = {id(d.experts): d.experts for d in lily_deltas(model)}
    lps = {id(d.lp.weight): d.lp.weight for d in lily_deltas(model)}
    routers = [d.router.weight for d in lily_deltas(model)]

    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    # step 0: experts are zero, so only they (and the head) get a gradient
    assert all(e.grad.abs().sum() > 0 for e in experts.values())
    assert all(torch.count_nonzero(w.grad) == 0 for w in lps.values())
    assert all(torch.count_nonzero(w.grad) == 0 for w in routers)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert all(w.grad.abs().sum() > 0 for w in lps.values())
    assert all(w.grad.abs().sum() > 0 for w in routers)


def test_vit_sharing_structure_and_lp_groups():
    model = petl_zoo.create("lily", tiny_vit(depth=6), rank=4, num_experts=3)  # stride 6 // 3 = 2
    for t in ("k", "v", "mlp"):
        paths = [path(model, i, t) for i in range(6)]
        assert all(p.experts is paths[0].experts for p in paths)
        assert len({id(p.router) for p in paths}) == 6
        lp_groups = [[i for i in range(6) if paths[i].lp is paths[j].lp] for j in range(6)]
        assert lp_groups[0] == [0, 1] and lp_groups[2] == [2, 3] and lp_groups[4] == [4, 5]
        width = 8 if t == "mlp" else 4
        assert tuple(paths[0].experts.shape) == (3, width, 48)
        assert paths[0].lp.weight.shape == (width, 48)
        assert isinstance(paths[0].act, nn.ReLU) == (t == "mlp")
    assert path(model, 0, "k").experts is not path(model, 0, "v").experts
    assert path(model, 0, "k").lp is not path(model, 0, "v").lp
    assert "lily_q" not in model.blocks[0].attn.qkv.deltas

    model = petl_zoo.create("lily", tiny_vit(depth=6), rank=4, num_experts=3, stride_lp=4)
    lps = [path(model, i, "k").lp for i in range(6)]
    assert [lps[i] is lps[0] for i in range(6)] == [True] * 4 + [False] * 2
    assert lps[5] is lps[4]
    assert petl_zoo.trainable_parameters(model)["method"] == closed_form(model, 4, 3, stride=4)


def test_swin_experts_per_stage_and_lp_groups_within_stages():
    model = petl_zoo.create("lily", tiny_swin(depths=(2, 4)), rank=4, num_experts=2)  # strides 1, 2
    stage0, stage1 = model.layers[0].blocks, model.layers[1].blocks
    for t in ("k", "v"):
        d0 = [b.attn.qkv.deltas[f"lily_{t}"] for b in stage0]
        d1 = [b.attn.qkv.deltas[f"lily_{t}"] for b in stage1]
        assert d0[0].experts is d0[1].experts and tuple(d0[0].experts.shape) == (2, 4, 16)
        assert d1[0].experts is d1[3].experts and tuple(d1[0].experts.shape) == (2, 4, 32)
        assert d0[0].lp is not d0[1].lp
        assert d1[0].lp is d1[1].lp and d1[2].lp is d1[3].lp and d1[0].lp is not d1[2].lp
    assert tuple(stage1[0].mlp.parallel["lily"].experts.shape) == (2, 8, 32)
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == closed_form(model, 4, 2)


@pytest.mark.parametrize(
    "family,kwargs,options",
    [
        ("vit", {"depth": 4}, {"rank": 4, "num_experts": 2}),
        ("vit", {"depth": 4}, {"rank": 2, "num_experts": 3, "stride_lp": 3, "targets": ("q", "v", "mlp")}),
        ("swin", {"depths": (2, 2)}, {"rank": 4, "num_experts": 2, "mixing": "sample"}),
    ],
)
def test_shared_tensors_counted_once_saved_once_and_round_trip(family, kwargs, options, tmp_path):
    torch.manual_seed(0)
    model = BUILDERS[family](**kwargs).eval()
    pristine = copy.deepcopy(model)
    petl_zoo.create("lily", model, **options)
    targets = options.get("targets", ("k", "v", "mlp"))
    expected = closed_form(model, options["rank"], options["num_experts"], targets, options.get("stride_lp"))
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == expected == counts["stored"]

    perturb_(model, std=0.2)
    x = images()
    with torch.no_grad():
        tuned = model(x)
    petl_zoo.save_adapter(model, tmp_path / "ad")
    saved = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    n_stages = len({b.stage for b in iter_blocks(model)})
    assert sum(k.endswith(".experts") for k in saved) == len(targets) * n_stages
    n_lps = len({id(d.lp) for d in lily_deltas(model)})
    assert sum(k.endswith(".lp.weight") for k in saved) == n_lps
    assert sum(k.endswith(".router.weight") for k in saved) == len(targets) * len(iter_blocks(model))
    head = sum(p.numel() for p in model.get_classifier().parameters())
    assert sum(t.numel() for t in saved.values()) == expected + head

    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), tuned, atol=1e-6, rtol=0)
    assert petl_zoo.trainable_parameters(fresh) == counts
    # the loaded copy keeps the ties: one Parameter per target and stage, one LP per group
    assert len({id(d.experts) for d in lily_deltas(fresh)}) == len(targets) * n_stages
    assert len({id(d.lp) for d in lily_deltas(fresh)}) == n_lps


def test_sample_mixing_is_batch_independent(family):
    torch.manual_seed(0)
    kwargs = {"depths": (2, 2)} if family == "swin" else {}
    model = petl_zoo.create("lily", BUILDERS[family](**kwargs), rank=4, num_experts=3, mixing="sample")
    perturb_(model, std=0.2)
    model.eval()
    x = images(4)
    perm = torch.tensor([3, 0, 2, 1])
    with torch.no_grad():
        full = model(x)
        split = torch.cat([model(x[:1]), model(x[1:])])
        permuted = model(x[perm])
    torch.testing.assert_close(split, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(permuted, full[perm], atol=1e-6, rtol=0)

    # the same weights with batch mixing: predictions move with batch composition
    for d in lily_deltas(model):
        d.mixing = "batch"
    with torch.no_grad():
        full = model(x)
        split = torch.cat([model(x[:1]), model(x[1:])])
    assert (split - full).abs().max() > 1e-4


def _recompute(delta: LilyDelta, x: torch.Tensor, groups: int | None) -> torch.Tensor:
    """The paper's formula written out: h = act(x LP^T); p = mean softmax(h R^T); s * h (sum_e p_e HP_e)."""
    h = x @ delta.lp.weight.T
    if isinstance(delta.act, nn.ReLU):
        h = h.clamp_min(0)
    probs = torch.softmax(h @ delta.router.weight.T, dim=-1)
    if groups is None:  # batch mixing: one vector for the whole forward pass
        p = probs.reshape(-1, probs.shape[-1]).mean(0)
        mixed = (p[:, None, None] * delta.experts).sum(0)
        return delta.scale * (h @ mixed)
    out = torch.empty(*h.shape[:-1], delta.experts.shape[-1])
    per_image_h = h.reshape(groups, -1, h.shape[-1])
    per_image_p = probs.reshape(groups, -1, probs.shape[-1]).mean(1)
    rows = out.view(groups, -1, out.shape[-1])
    for i in range(groups):
        mixed = (per_image_p[i][:, None, None] * delta.experts).sum(0)
        rows[i] = delta.scale * (per_image_h[i] @ mixed)
    return out


def _capture(module: nn.Module, store: dict, key: str):
    def hook(mod, args, output):
        store[key] = (args[0].detach().clone(), output.detach().clone())

    return module.register_forward_hook(hook)


def test_batch_mixing_matches_the_formula_on_vit():
    torch.manual_seed(0)
    model = petl_zoo.create(
        "lily", tiny_vit(), rank=4, num_experts=3, scale=0.5, targets=("q", "k", "v", "mlp")
    )
    perturb_(model, std=0.2)
    model.eval()
    block = model.blocks[1]
    seen: dict = {}
    handles = [_capture(block.attn.qkv, seen, "qkv"), _capture(block.mlp, seen, "mlp")]
    with torch.no_grad():
        model(images(3))
        for h in handles:
            h.remove()
        x, out = seen["qkv"]
        assert x.shape == (3, 17, 48)
        expected = F.linear(x, block.attn.qkv.base.weight, block.attn.qkv.base.bias)
        for i, t in enumerate("qkv"):
            expected[..., i * 48 : (i + 1) * 48] += _recompute(block.attn.qkv.deltas[f"lily_{t}"], x, None)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        x, out = seen["mlp"]
        expected = block.mlp.base(x) + _recompute(block.mlp.parallel["lily"], x, None)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        # and the mixing really is shared by the batch: a one-image pass gives another delta
        delta = block.attn.qkv.deltas["lily_k"]
        assert not torch.allclose(delta(x[:1], None), delta(x, None)[:1], atol=1e-5)


def test_sample_mixing_on_swin_averages_over_all_windows_of_an_image():
    torch.manual_seed(0)
    model = petl_zoo.create("lily", tiny_swin(), rank=4, num_experts=3, mixing="sample")
    perturb_(model, std=0.2)
    model.eval()
    block = model.layers[0].blocks[0]
    seen: dict = {}
    handles = [_capture(block.attn.qkv, seen, "qkv"), _capture(block.mlp, seen, "mlp")]
    with torch.no_grad():
        model(images(3))
        for h in handles:
            h.remove()
        x, out = seen["qkv"]
        assert x.shape == (3 * 16, 16, 16)  # 16 windows of 4x4 tokens per image
        expected = F.linear(x, block.attn.qkv.base.weight, block.attn.qkv.base.bias)
        expected[..., 16:32] += _recompute(block.attn.qkv.deltas["lily_k"], x, 3)
        expected[..., 32:48] += _recompute(block.attn.qkv.deltas["lily_v"], x, 3)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        # per-window mixing would differ: the grouping is by image
        per_window = _recompute(block.attn.qkv.deltas["lily_k"], x, 3 * 16)
        assert (per_window - _recompute(block.attn.qkv.deltas["lily_k"], x, 3)).abs().max() > 1e-5
        x, out = seen["mlp"]
        expected = block.mlp.base(x) + _recompute(block.mlp.parallel["lily"], x, 3)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_options_are_validated():
    with pytest.raises(ValueError, match="stride_lp must be a positive integer.*got 0"):
        petl_zoo.create("lily", tiny_vit(), stride_lp=0)
    with pytest.raises(ValueError, match=r"stride_lp must be in 1\.\.2 .*got 3"):
        petl_zoo.create("lily", tiny_vit(), stride_lp=3)
    with pytest.raises(ValueError, match=r"stride_lp must be in 1\.\.2 .*deepest stage.*got 5"):
        petl_zoo.create("lily", tiny_swin(depths=(1, 2)), stride_lp=5)
    with pytest.raises(ValueError, match="'token' for option 'mixing'.*'batch', 'sample'"):
        petl_zoo.create("lily", tiny_vit(), mixing="token")
    with pytest.raises(ValueError, match="unknown target 'fc1'.*valid targets: q, k, v, mlp"):
        petl_zoo.create("lily", tiny_vit(), targets=("k", "fc1"))
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        petl_zoo.create("lily", tiny_vit(), rank=0)
    with pytest.raises(ValueError, match="num_experts must be a positive integer, got -1"):
        petl_zoo.create("lily", tiny_vit(), num_experts=-1)
    # command-line strings parse into the typed fields
    cfg = petl_zoo.get_method("lily").config_class.from_options(
        "lily", rank="8", num_experts="4", stride_lp="none", mixing="sample", targets="k,v"
    )
    assert (cfg.rank, cfg.num_experts, cfg.stride_lp, cfg.mixing, cfg.targets) == (
        8,
        4,
        None,
        "sample",
        ("k", "v"),
    )
    assert cfg.to_dict()["mixing"] == "sample"


def test_merge_is_refused_clearly():
    model = petl_zoo.create("lily", tiny_vit())
    with pytest.raises(ValueError, match="method 'lily' cannot be merged: its update depends on the input"):
        petl_zoo.merge(model)
    assert not petl_zoo.is_merged(model)


def test_swin_image_count_hooks_have_one_owner():
    assert (
        pre_hook_count(petl_zoo.create("lily", tiny_swin(), rank=4, num_experts=2)) == 0
    )  # batch mixing: none
    model = petl_zoo.create("lily", tiny_swin(depths=(2, 2)), rank=4, num_experts=2, mixing="sample")
    method = model.petl_method
    assert len(method.hooks) == pre_hook_count(model) == 4  # one per block
    clone = copy.deepcopy(model)
    assert clone.petl_method.hooks.remove() == 4
    assert pre_hook_count(clone) == 0 and pre_hook_count(model) == 4  # the copy's handles point at the copy
    assert method.hooks.remove() == 4 and pre_hook_count(model) == 0
