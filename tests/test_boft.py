"""BOFT: counts on ViT-B (and peft's), the butterfly permutations, identity at init, orthogonality, merge /
unmerge / unload, save/load, options, and exact float64 parity with Hugging Face peft 0.21 on the fused qkv
and on split q, v (peft's CUDA block-diagonal kernel replaced by torch.block_diag, so that its butterfly
factors run on the CPU: without the kernel peft silently uses one factor)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import perturb_, tiny_vit
from peft_parity import assert_same_outputs_and_grads, fp64_pair, images64, peft_targets, split_qkv
from torch import nn

import petl_zoo
from petl_zoo.methods.boft import BoftConfig, BoftDelta, butterfly_permutation


def boft_deltas(model: nn.Module) -> dict[str, BoftDelta]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BoftDelta)}


class _BlockDiag:
    """peft's ``FastBlockDiag`` (a CUDA kernel) in torch: ``[N, D, H, H] -> [N, D H, D H]``."""

    @staticmethod
    def apply(blocks: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])


@pytest.fixture
def peft_butterfly(monkeypatch):
    """peft with its butterfly factors on the CPU (see the module docstring)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.boft import layer

    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(layer, "FastBlockDiag", _BlockDiag)
    return peft


@pytest.mark.parametrize(
    ("targets", "count"),
    [(("q", "k", "v", "proj", "fc1", "fc2"), 1_410_048), (("q", "v"), 313_344), (("qkv",), 175_104)],
)
def test_vit_base_counts_equal_peft(targets, count, peft_butterfly):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
        theirs = split_qkv(model) if "q" in targets else copy.deepcopy(model)
    petl_zoo.create("boft", model, targets=targets)
    assert petl_zoo.trainable_parameters(model)["method"] == count  # 2 x 96 x 8 x 8 + out per site
    config = peft_butterfly.BOFTConfig(
        boft_block_size=8, boft_n_butterfly_factor=2, target_modules=peft_targets(targets)
    )
    theirs = peft_butterfly.get_peft_model(theirs, config)
    assert sum(p.numel() for n, p in theirs.named_parameters() if "boft_" in n) == count


@pytest.mark.parametrize(
    ("n", "blocks", "half"), [(16, 4, 2), (16, 2, 2), (48, 6, 4), (48, 3, 4), (32, 2, 2)]
)
def test_permutation_is_peft_s(n, blocks, half, peft_butterfly):
    from peft.tuners.boft.layer import BOFTLayer

    theirs = BOFTLayer.block_butterfly_perm(None, n, blocks, half, 1)
    assert butterfly_permutation(n, blocks, half, True) == theirs.tolist()
    assert butterfly_permutation(n, blocks, half, False) == list(range(n))


def test_identity_at_init_and_orthogonal_rotation(images):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    model = petl_zoo.create("boft", copy.deepcopy(pristine), block_size=4, factors=3).eval()
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))
    perturb_(model, std=0.3)
    delta = next(iter(boft_deltas(model).values()))
    eye = torch.eye(48, dtype=torch.float64)
    r_t = delta.rotate(eye, delta.orthogonal_blocks(torch.float64))  # I R^T
    torch.testing.assert_close(r_t @ r_t.T, eye, atol=1e-12, rtol=0)
    assert (r_t.abs() > 1e-12).sum(1).min() == 4 * 2**2  # each output mixes b 2^(m-1) inputs


def test_forward_and_merge_follow_the_formula(images):
    torch.manual_seed(0)
    model = petl_zoo.create("boft", tiny_vit().double(), block_size=4, factors=2).eval()
    perturb_(model, std=0.2)
    qkv = model.blocks[0].attn.qkv
    w0 = qkv.base.weight.detach().clone()
    expected = w0.clone()
    for name, (start, stop) in qkv.slices.items():
        delta = qkv.deltas[name]
        blocks = delta.orthogonal_blocks()
        r = torch.eye(48, dtype=torch.float64)
        for i in range(2):  # R = M_1 M_0, M_i = P_i blockdiag(Q_i) P_i^T, P[j, perm[j]] = 1
            perm = butterfly_permutation(48, 12 // 2**i, 2, True)
            p = torch.eye(48, dtype=torch.float64)[perm]
            r = p @ torch.block_diag(*blocks[i]) @ p.T @ r
        expected[start:stop] = delta.boft_s * (w0[start:stop] @ r.T)
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
    assert not any(isinstance(m, BoftDelta) for m in plain.modules())
    assert type(plain.blocks[0].attn.qkv) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(images.double()), tuned, atol=1e-10, rtol=0)


def test_save_load_exact(tmp_path, images):
    torch.manual_seed(0)
    pristine = tiny_vit()
    model = petl_zoo.create("boft", copy.deepcopy(pristine), block_size=4, factors=3, dropout=0.2).eval()
    perturb_(model)
    petl_zoo.save_adapter(model, tmp_path / "boft")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "boft").eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    assert petl_zoo.method_of(fresh).config == petl_zoo.method_of(model).config


def test_bf16_host_solves_in_float32(images):
    torch.manual_seed(0)
    model = petl_zoo.create("boft", tiny_vit().to(torch.bfloat16))
    perturb_(model, std=0.1)
    delta = next(iter(boft_deltas(model).values()))
    assert delta.boft_R.dtype == torch.float32 and delta.boft_s.dtype == torch.float32
    out = model(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert torch.isfinite(delta.boft_R.grad).all() and torch.isfinite(delta.boft_s.grad).all()


def test_options_validated():
    cfg = BoftConfig()
    assert (cfg.block_size, cfg.factors, cfg.dropout) == (8, 2, 0.1)
    assert cfg.targets == ("q", "k", "v", "proj", "fc1", "fc2")
    with pytest.raises(ValueError, match="factors must be a positive integer, got 0"):
        BoftConfig(factors=0)
    with pytest.raises(ValueError, match="block_size must be even"):
        BoftConfig(block_size=3, factors=2)
    with pytest.raises(ValueError, match="dropout must be in"):
        BoftConfig(dropout=1.0)
    with pytest.raises(ValueError, match="need an input width divisible by 64"):
        petl_zoo.create("boft", tiny_vit(), block_size=8, factors=4)
    with pytest.raises(ValueError, match="block_size 5 does not divide the input width 48"):
        petl_zoo.create("boft", tiny_vit(), block_size=5, factors=1)
    with pytest.raises(ValueError, match="unknown target 'attn' for method 'boft'"):
        petl_zoo.create("boft", tiny_vit(), targets=("attn",))


def _peft_pair(peft, split: bool, block_size: int, factors: int, dropout: float = 0.0):
    """Ours on the fused qkv or its q, v slices, peft on ``qkv`` or on the q, v Linears of a split copy,
    float64; peft's ``boft_R`` and ``boft_s`` perturbed off identity and copied into ours."""
    ours, theirs = fp64_pair()
    targets = ("q", "v") if split else ("qkv",)
    petl_zoo.create("boft", ours, targets=targets, block_size=block_size, factors=factors, dropout=dropout)
    if split:
        theirs = split_qkv(theirs)
    config = peft.BOFTConfig(
        boft_block_size=block_size,
        boft_n_butterfly_factor=factors,
        boft_dropout=dropout,
        target_modules=list(targets),
    )
    theirs = peft.get_peft_model(theirs, config).double().eval()
    g = torch.Generator().manual_seed(3)
    pairs = []
    for name, delta in boft_deltas(ours).items():
        layer, target = name.rsplit(".deltas.boft_", 1)
        module = theirs.base_model.model.get_submodule(f"{layer}.{target}" if split else layer)
        for mine, peft_param, centre in (
            (delta.boft_R, module.boft_R["default"], 0.0),
            (delta.boft_s, module.boft_s["default"], 1.0),
        ):
            assert peft_param.shape == mine.shape
            with torch.no_grad():
                peft_param.copy_(
                    centre + 0.3 * torch.randn(peft_param.shape, generator=g, dtype=torch.float64)
                )
                mine.copy_(peft_param)
            pairs.append((mine, peft_param))
    return ours, theirs, pairs


def _peft_weight(theirs, block: int, split: bool) -> torch.Tensor:
    qkv = theirs.base_model.model.blocks[block].attn.qkv
    if split:
        return torch.cat([qkv.q.get_base_layer().weight, qkv.k.weight, qkv.v.get_base_layer().weight])
    return qkv.get_base_layer().weight


@pytest.mark.parametrize("split", [False, True], ids=["fused_qkv", "split_q_v"])
@pytest.mark.parametrize(("block_size", "factors"), [(8, 1), (4, 2), (4, 3)])
def test_matches_peft_in_float64(block_size, factors, split, peft_butterfly):
    ours, theirs, pairs = _peft_pair(peft_butterfly, split, block_size, factors)
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


@pytest.mark.parametrize("split", [False, True], ids=["fused_qkv", "split_q_v"])
def test_matches_peft_dropout_in_training(split, peft_butterfly):
    ours, theirs, pairs = _peft_pair(peft_butterfly, split, 4, 2, dropout=0.5)
    ours.train(), theirs.train()
    images = images64()
    torch.manual_seed(11)
    out_ours = ours(images)
    torch.manual_seed(11)
    out_theirs = theirs(images)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-10, rtol=0)
    ours.eval()
    with torch.no_grad():
        assert (ours(images) - out_ours).abs().max() > 1e-6  # the dropout did replace blocks
    out_ours.sum().backward()
    out_theirs.sum().backward()
    for mine, peft_param in pairs:
        torch.testing.assert_close(mine.grad, peft_param.grad, atol=1e-10, rtol=0)
