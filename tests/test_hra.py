"""HRA: counts, the paired init (exactly the identity), the product of reflections and Gram-Schmidt forms
against direct formulas, merge/unmerge/unload, save/load, options, and Hugging Face peft parity in
float64 (fused qkv, and q/v on a split copy; with and without Gram-Schmidt)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import perturb_, tiny_swin, tiny_vit
from peft_parity import assert_same_outputs_and_grads, fp64_pair, images64, split_qkv
from torch import nn

import petl_zoo
from petl_zoo.layers import AdaptedLinear
from petl_zoo.methods.hra import HraConfig, HraDelta, hra_factors


def hra_deltas(model: nn.Module) -> dict[str, HraDelta]:
    return {n: m for n, m in model.named_modules() if isinstance(m, HraDelta)}


def reflections(u: torch.Tensor) -> torch.Tensor:
    """``H_0 H_1 ... H_{r-1}``, ``H_i = I - 2 u_i u_i^T / ||u_i||^2``, formed directly (``[in, in]``)."""
    h = torch.eye(u.shape[0], dtype=u.dtype)
    for i in range(u.shape[1]):
        ui = u[:, i : i + 1]
        h = h @ (torch.eye(u.shape[0], dtype=u.dtype) - 2 * ui @ ui.t() / (ui.t() @ ui))
    return h


@pytest.mark.parametrize(
    ("options", "expected"),
    [({}, 294_912), ({"targets": ("q", "v")}, 147_456), ({"targets": ("qkv",)}, 73_728)],
)
def test_vit_base_counts(options, expected):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    petl_zoo.create("hra", model, **options)
    # 768 x 8 per site: q, k, v, proj (default; 4 x 12 sites), q, v (24) or the fused qkv (12)
    assert petl_zoo.trainable_parameters(model)["method"] == expected


@pytest.mark.parametrize("build", [tiny_vit, tiny_swin])
def test_paired_init_is_exactly_the_identity(build, images):
    torch.manual_seed(0)
    pristine = build().eval()
    model = petl_zoo.create("hra", copy.deepcopy(pristine)).eval()
    deltas = hra_deltas(model)
    assert len(deltas) == 4 * len([m for m in pristine.modules() if hasattr(m, "qkv")])
    for d in deltas.values():
        u = d.hra_u
        assert u.shape[1] == 8 and u.requires_grad
        assert torch.equal(u[:, 0::2], u[:, 1::2])  # peft's symmetric init: each column twice
        bound = (1 / 4) ** 0.5  # kaiming-uniform a=sqrt(5) on [in, r/2]: 1 / sqrt(fan_in = r/2)
        assert u.abs().max() <= bound and u.abs().max() > 0.5 * bound
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))  # per-delta form
    assert torch.equal(model(images), pristine(images))  # one-pass training form


def test_product_of_reflections_and_merge(images):
    torch.manual_seed(0)
    model = petl_zoo.create("hra", tiny_vit().double(), rank=6).eval()
    perturb_(model, std=0.3)
    qkv = model.blocks[0].attn.qkv
    w0 = qkv.base.weight.detach().clone()
    expected = w0.clone()
    for name, (start, stop) in qkv.slices.items():
        expected[start:stop] = w0[start:stop] @ reflections(qkv.deltas[name].hra_u.detach())
    x = torch.randn(5, 48, dtype=torch.float64)
    for grad in (False, True):  # per-delta form, one-pass form
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(qkv(x), x @ expected.T + qkv.base.bias, atol=1e-12, rtol=0)
    images = images.double()
    with torch.no_grad():
        tuned = model(images)
    petl_zoo.merge(model)
    torch.testing.assert_close(qkv.base.weight, expected, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), tuned, atol=1e-12, rtol=0)
    petl_zoo.unmerge(model)
    assert torch.equal(qkv.base.weight, w0)
    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    assert (
        not any(isinstance(m, AdaptedLinear) for m in plain.modules()) and petl_zoo.method_of(plain) is None
    )
    assert plain.state_dict().keys() == tiny_vit().state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(plain(images), tuned, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rank", [1, 5, 8])
def test_factors_equal_the_direct_forms(rank):
    g = torch.Generator().manual_seed(rank)
    u = torch.randn(12, rank, generator=g, dtype=torch.float64)
    w0 = torch.randn(7, 12, generator=g, dtype=torch.float64)
    down, up, _ = hra_factors(u, w0, apply_gs=False)
    assert down.shape == (rank, 12) and up.shape == (7, rank)  # rank r
    torch.testing.assert_close(w0 + up @ down, w0 @ reflections(u), atol=1e-12, rtol=0)
    down, up, _ = hra_factors(u, w0, apply_gs=True)
    q = torch.linalg.qr(u).Q  # Q Q^T does not depend on the signs Gram-Schmidt picks
    torch.testing.assert_close(
        w0 + up @ down, w0 @ (torch.eye(12, dtype=u.dtype) - 2 * q @ q.T), atol=1e-12, rtol=0
    )


def test_save_load_exact(tmp_path, images):
    torch.manual_seed(0)
    pristine = tiny_vit()
    model = petl_zoo.create("hra", copy.deepcopy(pristine), apply_gs=True).eval()
    perturb_(model)
    petl_zoo.save_adapter(model, tmp_path / "hra")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "hra").eval()
    assert petl_zoo.method_of(fresh).config == HraConfig(apply_gs=True)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))


def test_options_validated():
    cfg = HraConfig()
    assert cfg.rank == 8 and cfg.apply_gs is False and cfg.targets == ("q", "k", "v", "proj")
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        HraConfig(rank=0)
    with pytest.raises(ValueError, match="unknown target 'attn' for method 'hra'"):
        petl_zoo.create("hra", tiny_vit(), targets=("attn",))
    with pytest.warns(UserWarning, match="rank=3 is odd"):
        model = petl_zoo.create("hra", tiny_vit(), rank=3)
    assert all(d.hra_u.shape == (48, 3) for d in hra_deltas(model).values())


def _peft_pair(targets: tuple[str, ...], apply_gs: bool, rank: int = 4):
    """Our HRA and peft's on two fp64 copies of one tiny ViT (peft's q/v on a split copy), peft's
    ``hra_u`` perturbed and copied into ours; returns ``(ours, peft model, tensor pairs)``."""
    peft = pytest.importorskip("peft")
    ours, theirs = fp64_pair()
    split = targets != ("qkv",)
    petl_zoo.create("hra", ours, rank=rank, targets=targets, apply_gs=apply_gs)
    config = peft.HRAConfig(r=rank, apply_GS=apply_gs, target_modules=list(targets))
    theirs = peft.get_peft_model(split_qkv(theirs) if split else theirs, config)
    g = torch.Generator().manual_seed(3)
    pairs = []
    for name, delta in hra_deltas(ours).items():
        path, _, key = name.rpartition(".deltas.")
        layer = theirs.base_model.model.get_submodule(f"{path}.{key[4:]}" if split else path)
        peft_u = layer.hra_u["default"]
        with torch.no_grad():
            peft_u.add_(0.3 * torch.randn(peft_u.shape, generator=g, dtype=peft_u.dtype))
            delta.hra_u.copy_(peft_u)
        pairs.append((delta.hra_u, peft_u))
    assert len(pairs) == 2 * len(targets)  # two blocks
    return ours, theirs, pairs


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("targets", [("qkv",), ("q", "v")])
def test_matches_peft_hra(targets, apply_gs):
    ours, theirs, pairs = _peft_pair(targets, apply_gs)
    images = images64()
    with torch.no_grad():  # our per-delta form (the one-pass training form below)
        torch.testing.assert_close(ours(images), theirs(images), atol=1e-10, rtol=0)
    assert_same_outputs_and_grads(ours, theirs, images, pairs, atol=1e-10)

    with torch.no_grad():
        tuned = ours(images)
    merged_theirs = theirs.merge_and_unload()
    plain = petl_zoo.merge(ours, unload=True)
    for block, peft_block in zip(plain.blocks, merged_theirs.blocks):
        qkv, peft_qkv = block.attn.qkv, peft_block.attn.qkv
        peft_weight = (
            peft_qkv.weight
            if targets == ("qkv",)
            else torch.cat([peft_qkv.q.weight, peft_qkv.k.weight, peft_qkv.v.weight])
        )
        torch.testing.assert_close(qkv.weight, peft_weight, atol=1e-10, rtol=0)
    with torch.no_grad():
        out = plain(images)
        torch.testing.assert_close(out, tuned, atol=1e-10, rtol=0)
        torch.testing.assert_close(out, merged_theirs(images), atol=1e-10, rtol=0)
