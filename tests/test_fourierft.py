"""FourierFT: counts on ViT-B/16, the entries and coefficients peft draws, the formula against an explicit
inverse DFT, merge / unmerge / unload, save/load (exact whatever the RNG), options, and Hugging Face peft
parity in float64 (fused qkv; q and v on a split copy) and float32."""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager

import pytest
import timm
import torch
from conftest import perturb_, pre_hook_count, tiny_swin, tiny_vit
from peft_parity import assert_same_outputs_and_grads, fp64_pair, images64, split_qkv
from torch import nn

import petl_zoo
from petl_zoo.layers import AdaptedLinear
from petl_zoo.methods import fourierft as fourierft_module
from petl_zoo.methods.fourierft import FourierFTConfig, FourierFTDelta, spectral_entries


def deltas(model: nn.Module) -> dict[str, FourierFTDelta]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FourierFTDelta)}


@pytest.mark.parametrize(("targets", "trained"), [(("q", "v"), 72_000), (("qkv",), 36_000)])
def test_vit_base_counts(targets, trained):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    petl_zoo.create("fourierft", model, targets=targets)
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == trained  # 3000 coefficients per site: 12 x 2 (q, v) or 12 x 1 (qkv)
    assert counts["stored"] == trained + 2 * trained  # + the (rows, cols) of every entry, saved
    assert all(d.indices.dtype == torch.int32 for d in deltas(model).values())  # half the bytes of int64


def test_defaults_and_options_validated():
    cfg = FourierFTConfig()
    assert (cfg.n_frequency, cfg.scaling, cfg.targets, cfg.random_loc_seed, cfg.init_weights) == (
        3000,
        300.0,
        ("q", "v"),
        777,
        False,
    )
    with pytest.raises(ValueError, match="n_frequency must be a positive integer, got 0"):
        FourierFTConfig(n_frequency=0)
    with pytest.raises(ValueError, match="scaling must be a finite non-zero number"):
        FourierFTConfig(scaling=0.0)
    with pytest.raises(ValueError, match="random_loc_seed must be a non-negative integer"):
        FourierFTConfig(random_loc_seed=-1)
    with pytest.raises(ValueError, match="unknown target 'mlp' for method 'fourierft'"):
        petl_zoo.create("fourierft", tiny_vit(), targets=("mlp",))


def test_entries_are_peft_draw_shared_by_equal_shapes_and_set_by_the_seed():
    torch.manual_seed(0)
    model = petl_zoo.create("fourierft", tiny_vit(), n_frequency=100, targets=("q", "v", "fc1"))
    found = deltas(model)
    assert list(found)[:3] == [  # module order (peft's on a split qkv): q, v of block 0, then fc1
        "blocks.0.attn.qkv.deltas.fourierft_q",
        "blocks.0.attn.qkv.deltas.fourierft_v",
        "blocks.0.mlp.fc1.deltas.fourierft_fc1",
    ]
    flat = torch.randperm(48 * 48, generator=torch.Generator().manual_seed(777))[:100]
    q = found["blocks.0.attn.qkv.deltas.fourierft_q"]
    assert torch.equal(q.indices.long(), torch.stack([flat // 48, flat % 48]))
    for d in found.values():  # one seed for every site: same shape, same entries (the authors' share_entry)
        assert torch.equal(d.indices, spectral_entries(d.out_features, d.in_features, 100, 777))
        assert d.indices.shape == (2, 100) and d.fourierft_spectrum.shape == (100,)
    assert not torch.equal(spectral_entries(48, 48, 100, 778), q.indices)
    fc1 = found["blocks.0.mlp.fc1.deltas.fourierft_fc1"]
    assert fc1.indices[0].max() < 192 and fc1.indices[1].max() < 48  # rows index out, cols index in


def test_narrow_site_trains_every_entry(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="petl_zoo.methods.fourierft"):
        model = petl_zoo.create("fourierft", tiny_swin())  # 16 and 32 wide: fewer than 3000 entries
    assert "n_frequency=3000 exceeds the entries of the 16x16, 32x32 site(s)" in caplog.text
    for d in deltas(model).values():
        size = d.out_features * d.in_features
        assert d.fourierft_spectrum.numel() == size
        flat = d.indices[0].long() * d.in_features + d.indices[1].long()
        assert torch.equal(flat.sort().values, torch.arange(size))


def test_init_normal_or_zeros(images):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    torch.manual_seed(4)
    normal = petl_zoo.create("fourierft", copy.deepcopy(pristine), n_frequency=200).eval()
    torch.manual_seed(4)
    zeros = petl_zoo.create("fourierft", copy.deepcopy(pristine), n_frequency=200, init_weights=True).eval()
    torch.manual_seed(4)
    expected = [torch.randn(200) for _ in range(4)]  # peft's torch.randn(n) per site, in module order
    for d, e in zip(deltas(normal).values(), expected):
        assert torch.equal(d.fourierft_spectrum.detach(), e)
    assert all(torch.all(d.fourierft_spectrum == 0) for d in deltas(zeros).values())
    with torch.no_grad():
        assert torch.equal(zeros(images), pristine(images))  # zeros: unchanged, bit for bit
        assert (normal(images) - pristine(images)).abs().max() > 1e-3  # normal: not (peft's default)


def explicit_inverse_dft(d: FourierFTDelta) -> torch.Tensor:
    """``scaling / (M N) * sum_k c_k cos(2 pi (r row_k / M + s col_k / N))``, the real part of the 2-D
    inverse DFT of the sparse spectrum, formed term by term in float64 without torch.fft."""
    m, n = d.out_features, d.in_features
    c = d.fourierft_spectrum.detach().double()
    rows, cols = d.indices.double()
    r = torch.arange(m, dtype=torch.float64)[:, None, None]
    s = torch.arange(n, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (r * rows / m + s * cols / n)
    return d.scaling / (m * n) * (torch.cos(phase) * c).sum(-1)


def test_forward_and_merge_follow_the_formula(images):
    torch.manual_seed(0)
    model = petl_zoo.create("fourierft", tiny_vit(), n_frequency=300, scaling=20.0).eval()
    perturb_(model, std=0.2)
    qkv = model.blocks[0].attn.qkv
    w0 = qkv.base.weight.detach().clone()
    expected = w0.double().clone()
    for name, (start, stop) in qkv.slices.items():
        delta_w = explicit_inverse_dft(qkv.deltas[name])
        torch.testing.assert_close(qkv.deltas[name].delta_weight().double(), delta_w, atol=1e-6, rtol=0)
        expected[start:stop] += delta_w
    x = torch.randn(5, 48, dtype=torch.float64)
    with torch.no_grad():
        reference = x @ expected.T + qkv.base.bias.double()
        torch.testing.assert_close(qkv(x.float()).double(), reference, atol=1e-5, rtol=1e-5)
        tuned = model(images)
    petl_zoo.merge(model)
    torch.testing.assert_close(qkv.base.weight.double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(qkv.base.weight[48:96], w0[48:96])  # k rows untouched
    with torch.no_grad():
        torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=1e-5)
    petl_zoo.unmerge(model)
    assert torch.equal(qkv.base.weight, w0)
    with torch.no_grad():
        assert torch.equal(model(images), tuned)


def test_merge_unload_gives_a_plain_timm_model(images):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    model = petl_zoo.create("fourierft", copy.deepcopy(pristine), n_frequency=500).eval()
    with torch.no_grad():
        tuned = model(images)
    plain = petl_zoo.merge(model, unload=True)
    assert petl_zoo.method_of(plain) is None and pre_hook_count(plain) == 0
    assert not any(isinstance(m, (AdaptedLinear, FourierFTDelta)) for m in plain.modules())
    assert type(plain.blocks[0].attn.qkv) is nn.Linear
    assert plain.state_dict().keys() == pristine.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(plain(images), tuned, atol=1e-5, rtol=1e-5)


def test_reload_restores_the_saved_entries_whatever_the_rng(tmp_path, images, monkeypatch):
    torch.manual_seed(0)
    pristine = tiny_vit()
    model = petl_zoo.create("fourierft", copy.deepcopy(pristine), n_frequency=400).eval()
    perturb_(model)
    petl_zoo.save_adapter(model, tmp_path / "fourierft")
    # a torch build whose randperm drew other entries: the saved indices still win
    monkeypatch.setattr(
        fourierft_module,
        "spectral_entries",
        lambda out, inp, n, seed: torch.zeros(2, min(n, out * inp), dtype=torch.int32),
    )
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "fourierft").eval()
    assert fresh.petl_method.config == model.petl_method.config
    for (name, mine), theirs in zip(deltas(model).items(), deltas(fresh).values()):
        assert torch.equal(mine.indices, theirs.indices), name
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))


# -- Hugging Face peft parity ------------------------------------------------------------------------


class _Float64Spectrum(nn.Parameter):
    """A spectrum whose ``.float()`` keeps float64. peft's ``get_delta_weight`` casts the coefficients
    with ``.float()`` and builds the dense spectrum in the default dtype, so its FFT runs in float32
    whatever the model's dtype; with this class and a float64 default dtype the same code runs in
    float64 (its formula untouched), which lets the comparison go to 1e-10."""

    def float(self) -> torch.Tensor:  # type: ignore[override]
        return self


@contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _peft_pair(split: bool, n: int = 300, scaling: float = 40.0, fp64: bool = True, seed: int = 5):
    """Our FourierFT and peft's on two copies of one tiny ViT (float64, or float32 with ``fp64=False``),
    created after the same global seed: fused ``qkv`` (``split=False``) or ``q``, ``v`` on a copy whose
    ``qkv`` is split. Checks that peft drew the same entries and coefficients, then perturbs both
    identically. Returns ``(ours, peft model, [(our spectrum, peft's spectrum)])``."""
    peft = pytest.importorskip("peft")
    ours, theirs = fp64_pair()
    if not fp64:
        ours, theirs = ours.float(), theirs.float()
    targets = ("q", "v") if split else ("qkv",)
    if split:
        theirs = split_qkv(theirs)
    torch.manual_seed(seed)
    petl_zoo.create("fourierft", ours, n_frequency=n, scaling=scaling, targets=targets)
    torch.manual_seed(seed)
    config = peft.FourierFTConfig(n_frequency=n, scaling=scaling, target_modules=list(targets))
    theirs = peft.get_peft_model(theirs, config).eval()
    layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.fourierft.FourierFTLinear)]
    mine = list(deltas(ours).values())
    assert len(layers) == len(mine) == 2 * len(targets)
    g = torch.Generator().manual_seed(11)
    pairs = []
    for delta, layer in zip(mine, layers):
        assert torch.equal(delta.indices.long(), layer.indices["default"])  # peft's draw: same entries ...
        assert torch.equal(delta.fourierft_spectrum, layer.fourierft_spectrum["default"])  # ... and values
        with torch.no_grad():
            value = delta.fourierft_spectrum + 0.3 * torch.randn(n, generator=g, dtype=torch.float64).to(
                delta.fourierft_spectrum.dtype
            )
            delta.fourierft_spectrum.copy_(value)
        spectrum = _Float64Spectrum(value.clone()) if fp64 else nn.Parameter(value.clone())
        layer.fourierft_spectrum["default"] = spectrum
        pairs.append((delta.fourierft_spectrum, spectrum))
    return ours, theirs, pairs


@pytest.mark.parametrize("split", [False, True], ids=["fused_qkv", "split_q_v"])
def test_matches_peft_fourierft_in_float64(split):
    ours, theirs, pairs = _peft_pair(split)
    images = images64()
    with default_dtype(torch.float64):
        assert_same_outputs_and_grads(ours, theirs, images, pairs, atol=1e-10)
        theirs.merge_adapter()
    petl_zoo.merge(ours)
    for block, peft_block in zip(ours.blocks, theirs.base_model.model.blocks):
        merged = block.attn.qkv.base.weight
        if split:
            parts = peft_block.attn.qkv
            peft_merged = torch.cat([parts.q.base_layer.weight, parts.k.weight, parts.v.base_layer.weight])
        else:
            peft_merged = peft_block.attn.qkv.base_layer.weight
        torch.testing.assert_close(merged, peft_merged, atol=1e-10, rtol=0)
    with torch.no_grad(), default_dtype(torch.float64):
        torch.testing.assert_close(ours(images), theirs(images), atol=1e-10, rtol=0)


def test_matches_peft_fourierft_in_float32_without_lifting():
    """peft's own float32 FFT, as shipped: our float32 path computes the same operations."""
    ours, theirs, pairs = _peft_pair(split=False, fp64=False)
    assert_same_outputs_and_grads(ours, theirs, images64().float(), pairs, atol=1e-6)
