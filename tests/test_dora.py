"""DoRA: counts, magnitude init and identity, the row norm without B A, the paper's weight, merge/unmerge,
no [out, in] tensor in training, save/load, options, and Hugging Face peft parity on the fused qkv."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import ShapeRecorder, perturb_, tiny_swin, tiny_vit
from torch import nn

import petl_zoo
from petl_zoo.methods.dora import DoraConfig, DoraDelta, dora_row_norm


def dora_deltas(model: nn.Module) -> dict[str, DoraDelta]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DoraDelta)}


def paper_weight(w0: torch.Tensor, delta: DoraDelta) -> torch.Tensor:
    """``m * (W0 + s B A) / ||W0 + s B A||_row`` straight from the paper, in float64."""
    a, b = delta.lora.lora_A.detach().double(), delta.lora.lora_B.detach().double()
    v = w0.double() + delta.lora.scaling * (b @ a)
    return delta.magnitude.detach().double()[:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True)


@pytest.mark.parametrize(("targets", "expected"), [(("q", "v"), 313_344), (("qkv",), 322_560)])
def test_vit_base_counts(targets, expected):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    petl_zoo.create("dora", model, rank=8, targets=targets)
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == expected and counts["stored"] == expected


@pytest.mark.parametrize("build", [tiny_vit, tiny_swin])
def test_magnitude_starts_at_the_row_norms_of_each_slice(build, images):
    torch.manual_seed(0)
    pristine = build().eval()
    model = petl_zoo.create("dora", copy.deepcopy(pristine)).eval()
    for _, module in model.named_modules():
        if not hasattr(module, "slices"):
            continue
        for name, (start, stop) in module.slices.items():
            rows = module.base.weight[start:stop]
            m = module.deltas[name].magnitude
            torch.testing.assert_close(m, torch.linalg.norm(rows, dim=1), rtol=1e-6, atol=0)
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))


def test_bf16_model_is_unchanged_at_init_and_trains(images):
    """m is rounded to bf16 and the norm is rounded the same way before dividing: g = 1 exactly."""
    torch.manual_seed(0)
    pristine = tiny_vit().to(torch.bfloat16).eval()
    model = petl_zoo.create("dora", copy.deepcopy(pristine)).eval()
    assert all(d.magnitude.dtype == torch.float32 for d in dora_deltas(model).values())
    x = images.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), pristine(x))
    model(x).float().sum().backward()
    assert all(d.magnitude.grad is not None for d in dora_deltas(model).values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_norm_equals_the_norm_of_the_formed_weight(dtype):
    g = torch.Generator().manual_seed(0)
    w0, a, b = (torch.randn(shape, generator=g, dtype=dtype) for shape in ((40, 24), (5, 24), (40, 5)))
    direct = torch.linalg.norm(w0.double() + 0.7 * b.double() @ a.double(), dim=1)
    ours = dora_row_norm(w0, a, b, 0.7)
    assert ours.dtype == dtype and not ours.requires_grad
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours.double(), direct, rtol=tol, atol=0)


def test_row_norm_stays_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    w0, a, b = (torch.randn(shape, generator=g) for shape in ((40, 24), (5, 24), (40, 5)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = dora_row_norm(w0, a, b, 0.7)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, dora_row_norm(w0, a, b, 0.7), rtol=1e-6, atol=0)


def test_forward_and_merge_give_the_papers_weight(images):
    torch.manual_seed(0)
    model = petl_zoo.create("dora", tiny_vit(), rank=4, alpha=8.0).eval()
    perturb_(model, std=0.2)
    qkv = model.blocks[1].attn.qkv
    w0 = qkv.base.weight.detach().clone()
    expected = w0.double().clone()
    for name, (start, stop) in qkv.slices.items():
        expected[start:stop] = paper_weight(w0[start:stop], qkv.deltas[name])
    x = torch.randn(5, 48, dtype=torch.float64)
    with torch.no_grad():
        reference = x @ expected.T + qkv.base.bias.double()
        torch.testing.assert_close(qkv(x.float()).double(), reference, atol=1e-5, rtol=1e-5)
        tuned = model(images)
    petl_zoo.merge(model)
    torch.testing.assert_close(qkv.base.weight.double(), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv.base.weight[48:96], w0[48:96])  # k rows untouched
    with torch.no_grad():
        torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=1e-5)
    petl_zoo.unmerge(model)
    assert torch.equal(qkv.base.weight, w0)


@pytest.mark.parametrize(("targets", "rows"), [(("q", "v"), 48), (("qkv",), 144)])
def test_training_builds_no_out_by_in_tensor(targets, rows):
    """Forward and backward form neither B A nor W' nor any other [out, in] tensor (the slices are
    48 x 48, the fused qkv 144 x 48; tokens 2 * 17 = 34)."""
    torch.manual_seed(0)
    model = petl_zoo.create("dora", tiny_vit(), rank=3, targets=targets, dropout=0.1).train()
    perturb_(model, std=0.1)
    recorder = ShapeRecorder()
    with recorder:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert (rows, 3) in [s for _, s in recorder.shapes]  # W0 A^T for the norm
    assert not [(f, s) for f, s in recorder.shapes if s[-2:] == (rows, 48)]
    delta = next(iter(dora_deltas(model).values()))
    with recorder:  # the check would catch the formula (what peft's get_lora_weight does)
        delta.delta_weight(model.blocks[0].attn.qkv.base.weight[:rows])
    assert [(f, s) for f, s in recorder.shapes if s[-2:] == (rows, 48)]


def test_norm_is_detached_and_every_part_learns():
    torch.manual_seed(0)
    model = petl_zoo.create("dora", tiny_vit(), rank=4).train()
    perturb_(model)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for delta in dora_deltas(model).values():
        for p in (delta.magnitude, delta.lora.lora_A, delta.lora.lora_B):
            assert p.grad is not None and p.grad.abs().sum() > 0
    x = torch.randn(3, 48)
    delta = dora_deltas(model)["blocks.0.attn.qkv.deltas.dora_q"]
    weight = model.blocks[0].attn.qkv.base.weight[:48]
    assert not delta.row_norm(weight).requires_grad and delta.scale(weight).requires_grad
    assert delta(x, weight).requires_grad


def test_save_load_round_trip(tmp_path, images):
    torch.manual_seed(0)
    pristine = tiny_vit()
    model = petl_zoo.create("dora", copy.deepcopy(pristine), rank=4, alpha=2.0, dropout=0.1).eval()
    perturb_(model)
    petl_zoo.save_adapter(model, tmp_path / "dora")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "dora").eval()
    assert fresh.petl_method.config == model.petl_method.config
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))


def test_options_are_loras_and_validated():
    assert DoraConfig().rank == 8 and DoraConfig().targets == ("q", "v") and DoraConfig(rank=4).scaling == 1.0
    assert DoraConfig(rank=4, alpha=8.0).scaling == 2.0
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        DoraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        DoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown target 'mlp' for method 'dora'"):
        petl_zoo.create("dora", tiny_vit(), targets=("mlp",))


def _peft_pair(dropout: float, seed: int = 3):
    """Our DoRA and peft's on the fused qkv of two copies of one tiny ViT, with the same A, B and m."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = tiny_vit()
    theirs = copy.deepcopy(ours)
    petl_zoo.create("dora", ours, rank=4, alpha=8.0, dropout=dropout, targets=("qkv",))
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, target_modules=["qkv"])
    theirs = peft.inject_adapter_in_model(config, theirs)
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i, block in enumerate(ours.blocks):
        delta = block.attn.qkv.deltas["dora_qkv"]
        layer = theirs.blocks[i].attn.qkv
        tied = [
            (delta.lora.lora_A, layer.lora_A["default"].weight),
            (delta.lora.lora_B, layer.lora_B["default"].weight),
            (delta.magnitude, layer.lora_magnitude_vector["default"].weight),
        ]
        with torch.no_grad():
            for mine, peft_param in tied:
                value = mine + 0.3 * torch.randn(mine.shape, generator=g)
                mine.copy_(value)
                peft_param.copy_(value)
        pairs += tied
    return ours, theirs, pairs


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_matches_peft_dora_on_fused_qkv(dropout, images):
    ours, theirs, pairs = _peft_pair(dropout)
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


def test_one_pass_form_equals_the_delta_forward(images):
    """In a training step the layer adds DoRA's update through ``low_rank`` (reusing the frozen output
    for the ``(g - 1)`` term); it equals the delta's own forward, values and gradients."""
    torch.manual_seed(0)
    model = petl_zoo.create("dora", tiny_vit())
    perturb_(model)
    delta = next(m for m in model.modules() if isinstance(m, DoraDelta))
    weight = torch.randn(delta.magnitude.shape[0], delta.lora.lora_A.shape[1], dtype=torch.float64)
    delta.double()
    x = torch.randn(3, 5, weight.shape[1], dtype=torch.float64)
    form = delta.low_rank(weight)
    by_form = (x @ form.down.T) @ form.up.T + form.base_scale * (x @ weight.T)
    torch.testing.assert_close(by_form, delta(x, weight), atol=1e-12, rtol=0)
    model.float()
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if isinstance(m, DoraDelta):
            m.low_rank = lambda weight: None  # the per-delta path
    calls = []
    first = next(m for m in model.modules() if isinstance(m, DoraDelta))
    original = first.low_rank
    first.low_rank = lambda weight: calls.append(1) or original(weight)
    outs = []
    for net in (model, copied):
        out = net(images)
        out.square().sum().backward()
        outs.append((out.detach(), [p.grad for p in net.parameters() if p.requires_grad]))
    assert calls == [1]  # the training step took the one-pass form
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
