"""OFT: counts on ViT-B (and peft's), identity at init, orthogonality, merge / unmerge / unload, save/load,
options, and exact float64 parity with Hugging Face peft 0.21 on the fused qkv and on split q, v."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import perturb_, tiny_vit
from peft_parity import assert_same_outputs_and_grads, fp64_pair, images64, peft_targets, split_qkv
from torch import nn

import petl_zoo
from petl_zoo.methods.oft import OftConfig, OftDelta, cayley, skew_from_upper


def oft_deltas(model: nn.Module) -> dict[str, OftDelta]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OftDelta)}


@pytest.mark.parametrize(
    ("targets", "count"),
    [(("q", "k", "v", "proj", "fc1", "fc2"), 622_080), (("q", "v"), 138_240), (("qkv",), 69_120)],
)
def test_vit_base_counts_equal_peft(targets, count):
    peft = pytest.importorskip("peft")
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
        theirs = split_qkv(model) if "q" in targets else copy.deepcopy(model)
    petl_zoo.create("oft", model, targets=targets)
    assert petl_zoo.trainable_parameters(model)["method"] == count  # 48 blocks x 120 per site
    config = peft.OFTConfig(oft_block_size=16, r=0, target_modules=peft_targets(targets))
    theirs = peft.get_peft_model(theirs, config)
    assert sum(p.numel() for n, p in theirs.named_parameters() if "oft_R" in n) == count


def test_identity_at_init_and_orthogonal_rotations(images):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    model = petl_zoo.create("oft", copy.deepcopy(pristine), block_size=8).eval()
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))
    perturb_(model, std=0.3)
    delta = next(iter(oft_deltas(model).values()))
    blocks = delta.rotation_blocks(torch.float64)
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(blocks @ blocks.transpose(1, 2), eye.expand_as(blocks), atol=1e-12, rtol=0)
    skew = skew_from_upper(torch.randn(3, 6, dtype=torch.float64), 4)
    assert torch.equal(skew, -skew.transpose(1, 2))
    # the Neumann series approximates (I + S)(I - S)^-1 (peft's default; the exact form is its inverse)
    small = 1e-3 * skew
    i4 = torch.eye(4, dtype=torch.float64)
    approx = torch.linalg.solve(i4 - small, i4 + small, left=False)
    torch.testing.assert_close(cayley(small, "neumann", 5), approx, atol=1e-10, rtol=0)
    assert (cayley(small, "exact") - approx).abs().max() > 1e-4  # the other direction


def test_forward_and_merge_follow_the_formula(images):
    torch.manual_seed(0)
    model = petl_zoo.create("oft", tiny_vit().double(), block_size=4).eval()
    perturb_(model, std=0.2)
    qkv = model.blocks[0].attn.qkv
    w0 = qkv.base.weight.detach().clone()
    expected = w0.clone()
    for name, (start, stop) in qkv.slices.items():
        r = torch.block_diag(*qkv.deltas[name].rotation_blocks())
        expected[start:stop] = w0[start:stop] @ r.T
    x = torch.randn(5, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(qkv(x), x @ expected.T + qkv.base.bias, atol=1e-12, rtol=0)
        tuned = model(images.double())
    petl_zoo.merge(model)
    torch.testing.assert_close(qkv.base.weight, expected, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(images.double()), tuned, atol=1e-10, rtol=0)
    petl_zoo.unmerge(model)
    assert torch.equal(qkv.base.weight, w0)
    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    assert not any(isinstance(m, OftDelta) for m in plain.modules())
    assert type(plain.blocks[0].attn.qkv) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(images.double()), tuned, atol=1e-10, rtol=0)


def test_save_load_exact(tmp_path, images):
    torch.manual_seed(0)
    pristine = tiny_vit()
    model = petl_zoo.create("oft", copy.deepcopy(pristine), block_size=8, coft=True, eps=1e-2).eval()
    perturb_(model)
    petl_zoo.save_adapter(model, tmp_path / "oft")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "oft").eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    assert petl_zoo.method_of(fresh).config == petl_zoo.method_of(model).config


def test_bf16_host_solves_in_float32(images):
    torch.manual_seed(0)
    model = petl_zoo.create("oft", tiny_vit().to(torch.bfloat16), block_size=8)
    perturb_(model, std=0.1)
    delta = next(iter(oft_deltas(model).values()))
    assert delta.oft_R.dtype == torch.float32
    out = model(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert delta.oft_R.grad is not None and torch.isfinite(delta.oft_R.grad).all()


def test_coft_keeps_each_block_in_its_ball(images):
    torch.manual_seed(0)
    model = petl_zoo.create("oft", tiny_vit(), block_size=8, coft=True, eps=1e-3)
    perturb_(model, std=0.5)
    model(images)
    for delta in oft_deltas(model).values():
        norms = torch.linalg.matrix_norm(skew_from_upper(delta.oft_R.detach(), 8))
        assert torch.all(norms <= 1e-3 / delta.blocks**0.5 * (1 + 1e-6))


def test_options_validated():
    cfg = OftConfig()
    assert (cfg.block_size, cfg.targets, cfg.cayley, cfg.coft, cfg.block_share) == (
        16,
        ("q", "k", "v", "proj", "fc1", "fc2"),
        "exact",
        False,
        False,
    )
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        OftConfig(block_size=0)
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        OftConfig(block_size=1)
    with pytest.raises(ValueError, match="cayley"):
        OftConfig(cayley="fast")
    with pytest.raises(ValueError, match="block_size 5 does not divide the input width 48"):
        petl_zoo.create("oft", tiny_vit(), block_size=5)
    with pytest.raises(ValueError, match="unknown target 'attn' for method 'oft'"):
        petl_zoo.create("oft", tiny_vit(), targets=("attn",))


PEFT_CASES = {
    "exact": (dict(block_size=4), dict(use_cayley_neumann=False)),
    "neumann": (dict(block_size=4, cayley="neumann"), dict(use_cayley_neumann=True)),
    "neumann3": (
        dict(block_size=8, cayley="neumann", neumann_terms=3),
        dict(use_cayley_neumann=True, num_cayley_neumann_terms=3),
    ),
    "coft": (dict(block_size=4, coft=True, eps=0.05), dict(use_cayley_neumann=False, coft=True, eps=0.05)),
    "block_share": (dict(block_size=8, block_share=True), dict(use_cayley_neumann=False, block_share=True)),
}


def _peft_pair(case: str, split: bool):
    """Ours on the fused qkv (``targets=("qkv",)``) or its q, v slices, peft on ``qkv`` or on the q, v
    Linears of a split copy, float64; peft's tensors perturbed off identity and copied into ours."""
    peft = pytest.importorskip("peft")
    ours_kw, peft_kw = PEFT_CASES[case]
    ours, theirs = fp64_pair()
    targets = ("q", "v") if split else ("qkv",)
    petl_zoo.create("oft", ours, targets=targets, **ours_kw)
    if split:
        theirs = split_qkv(theirs)
    config = peft.OFTConfig(
        r=0, oft_block_size=ours_kw["block_size"], target_modules=list(targets), **peft_kw
    )
    theirs = peft.get_peft_model(theirs, config).double().eval()
    g = torch.Generator().manual_seed(3)
    pairs = []
    for name, delta in oft_deltas(ours).items():
        layer, target = name.rsplit(".deltas.oft_", 1)
        path = f"{layer}.{target}" if split else layer
        theirs_param = theirs.base_model.model.get_submodule(path).oft_R["default"].weight
        assert theirs_param.shape == delta.oft_R.shape
        with torch.no_grad():
            theirs_param.copy_(0.3 * torch.randn(theirs_param.shape, generator=g, dtype=torch.float64))
            delta.oft_R.copy_(theirs_param)
        pairs.append((delta.oft_R, theirs_param))
    return ours, theirs, pairs


def _peft_weight(theirs, block: int, split: bool) -> torch.Tensor:
    qkv = theirs.base_model.model.blocks[block].attn.qkv
    if split:
        return torch.cat([qkv.q.get_base_layer().weight, qkv.k.weight, qkv.v.get_base_layer().weight])
    return qkv.get_base_layer().weight


@pytest.mark.parametrize("split", [False, True], ids=["fused_qkv", "split_q_v"])
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_matches_peft_in_float64(case, split):
    ours, theirs, pairs = _peft_pair(case, split)
    images = images64()
    assert_same_outputs_and_grads(ours, theirs, images, pairs, atol=1e-10)
    with torch.no_grad():
        petl_zoo.merge(ours)
        theirs.merge_adapter()
        for i, block in enumerate(ours.blocks):
            torch.testing.assert_close(
                block.attn.qkv.base.weight, _peft_weight(theirs, i, split), atol=1e-10, rtol=0
            )
        torch.testing.assert_close(ours(images), theirs(images), atol=1e-10, rtol=0)
