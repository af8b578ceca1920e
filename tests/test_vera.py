"""VeRA: counts, init, one shared pair sized to the widest site, the formula and merge, save/load (exact
whatever the RNG), options, and Hugging Face peft parity (same seed -> same matrices; outputs, gradients)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import perturb_, tiny_swin, tiny_vit
from torch import nn

import petl_zoo
from petl_zoo.methods import vera as vera_module
from petl_zoo.methods.vera import VeraConfig, VeraDelta


def vera_deltas(model: nn.Module) -> dict[str, VeraDelta]:
    return {n: m for n, m in model.named_modules() if isinstance(m, VeraDelta)}


@pytest.mark.parametrize(
    ("targets", "trained", "frozen"),
    [(("q", "v"), 24_576, 256 * 768 + 768 * 256), (("qkv",), 30_720, 256 * 768 + 2304 * 256)],
)
def test_vit_base_counts(targets, trained, frozen):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    petl_zoo.create("vera", model, rank=256, targets=targets)
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == trained  # d (256) + b (out) per site, 12 blocks
    assert counts["stored"] == trained + frozen  # the shared pair once


@pytest.mark.parametrize("build", [tiny_vit, tiny_swin])
def test_one_shared_pair_sized_to_the_widest_site(build, images):
    torch.manual_seed(0)
    pristine = build().eval()
    model = petl_zoo.create("vera", copy.deepcopy(pristine), rank=8).eval()
    deltas = list(vera_deltas(model).values())
    shared = deltas[0].projections
    assert all(d.projections is shared for d in deltas)
    widths = [(d.out_features, d.in_features) for d in deltas]
    assert shared.vera_A.shape == (8, max(i for _, i in widths))
    assert shared.vera_B.shape == (max(o for o, _ in widths), 8)
    assert not shared.vera_A.requires_grad and not shared.vera_B.requires_grad
    for d in deltas:
        assert torch.all(d.vera_lambda_d == 0.1) and torch.all(d.vera_lambda_b == 0)
        a, b = d.matrices()
        assert torch.equal(a, shared.vera_A[:, : d.in_features]) and torch.equal(
            b, shared.vera_B[: d.out_features]
        )
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))


def test_forward_and_merge_follow_the_formula(images):
    torch.manual_seed(0)
    model = petl_zoo.create("vera", tiny_vit(), rank=6).eval()
    perturb_(model, std=0.2)
    qkv = model.blocks[0].attn.qkv
    w0 = qkv.base.weight.detach().clone()
    expected = w0.double().clone()
    for name, (start, stop) in qkv.slices.items():
        d = qkv.deltas[name]
        a, b = (t.double() for t in d.matrices())
        expected[start:stop] += (
            torch.diag(d.vera_lambda_b.double()) @ b @ torch.diag(d.vera_lambda_d.double()) @ a
        )
    x = torch.randn(5, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            qkv(x.float()).double(), x @ expected.T + qkv.base.bias.double(), atol=1e-5, rtol=1e-5
        )
        tuned = model(images)
    petl_zoo.merge(model)
    torch.testing.assert_close(qkv.base.weight.double(), expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=1e-5)
    petl_zoo.unmerge(model)
    assert torch.equal(qkv.base.weight, w0)


def test_seed_decides_the_matrices():
    torch.manual_seed(0)
    first, again, other = (
        next(iter(vera_deltas(petl_zoo.create("vera", tiny_vit(), rank=4, seed=s)).values())).projections
        for s in (5, 5, 6)
    )
    assert torch.equal(first.vera_A, again.vera_A) and torch.equal(first.vera_B, again.vera_B)
    assert not torch.equal(first.vera_A, other.vera_A)
    bound_a, bound_b = (6.0 / 48) ** 0.5, (6.0 / 4) ** 0.5  # kaiming-uniform, gain sqrt(2), fan-in
    assert first.vera_A.abs().max() <= bound_a and first.vera_B.abs().max() <= bound_b
    assert first.vera_A.abs().max() > 0.8 * bound_a


def test_reload_restores_the_saved_matrices_whatever_the_rng(tmp_path, images, monkeypatch):
    torch.manual_seed(0)
    pristine = tiny_vit()
    model = petl_zoo.create("vera", copy.deepcopy(pristine), rank=4, dropout=0.1).eval()
    perturb_(model)
    petl_zoo.save_adapter(model, tmp_path / "vera")
    # a torch build whose generator drew other numbers: the saved tensors still win
    monkeypatch.setattr(vera_module, "kaiming_uniform", lambda shape, generator: torch.zeros(shape))
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "vera").eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    shared = {id(d.projections) for d in vera_deltas(fresh).values()}
    assert len(shared) == 1  # still one shared pair after loading


def test_options_validated():
    assert VeraConfig().rank == 256 and VeraConfig().targets == ("q", "v") and VeraConfig().d_initial == 0.1
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        VeraConfig(rank=0)
    with pytest.raises(ValueError, match="d_initial must be a finite non-zero number"):
        VeraConfig(d_initial=0.0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        VeraConfig(seed=-1)
    with pytest.raises(ValueError, match="unknown target 'attn' for method 'vera'"):
        petl_zoo.create("vera", tiny_vit(), targets=("attn",))


def _peft_pair(build, dropout: float, seed: int = 3):
    """Our VeRA and peft's on the fused qkv of two copies of one tiny model, from the same seed; the
    trained vectors set to the same random values."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = build()
    theirs = copy.deepcopy(ours)
    petl_zoo.create("vera", ours, rank=8, dropout=dropout, targets=("qkv",), seed=11)
    config = peft.VeraConfig(r=8, vera_dropout=dropout, target_modules=["qkv"], projection_prng_key=11)
    theirs = peft.get_peft_model(theirs, config)
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for name, delta in vera_deltas(ours).items():
        layer = theirs.base_model.model.get_submodule(name.rsplit(".deltas.", 1)[0])
        assert torch.equal(layer.vera_A["default"], delta.projections.vera_A)  # peft's draw, bit for bit
        assert torch.equal(layer.vera_B["default"], delta.projections.vera_B)
        tied = [
            (delta.vera_lambda_d, layer.vera_lambda_d["default"]),
            (delta.vera_lambda_b, layer.vera_lambda_b["default"]),
        ]
        with torch.no_grad():
            for mine, peft_param in tied:
                value = mine + 0.3 * torch.randn(mine.shape, generator=g)
                mine.copy_(value)
                peft_param.copy_(value)
        pairs += tied
    return ours, theirs, pairs


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("build", [tiny_vit, tiny_swin])
def test_matches_peft_vera(build, dropout, images):
    ours, theirs, pairs = _peft_pair(build, dropout)
    targets = torch.tensor([0, 3])
    for mode in ("eval", "train"):
        for model in (ours, theirs):
            model.train(mode == "train")
        torch.manual_seed(7)
        out_ours = ours(images)
        torch.manual_seed(7)
        out_theirs = theirs(images)
        torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
        nn.functional.cross_entropy(out_ours, targets).backward()
        nn.functional.cross_entropy(out_theirs, targets).backward()
        for mine, peft_param in pairs:
            torch.testing.assert_close(mine.grad, peft_param.grad, atol=1e-5, rtol=1e-5)
            mine.grad, peft_param.grad = None, None
