"""Binary adapters: parity with the authors' re-hosted ``QLinear`` / Bi-AdaptFormer / Bi-LoRA (fp64 outputs
and straight-through gradients), the quantiser levels, ViT-B/16 counts and packed bytes (the authors'
file sizes), packed export / load, merge of Bi-LoRA, save / load, options."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import HOSTS, perturb_, tiny_host, tiny_vit
from safetensors.torch import load_file, save_file
from scipy.stats import norm
from torch import nn
from torch.nn import functional as F

import petl_zoo
from petl_zoo.accounting.params import stored_bytes
from petl_zoo.methods.binary_adapter import (
    BinaryAdapterConfig,
    BinaryBottleneck,
    BinaryLinear,
    BinaryLoraDelta,
    export_packed,
    load_packed,
    quantizer_levels,
)
from petl_zoo.presets import load_preset


def tensor_bytes(path) -> int:
    """The bytes of a safetensors file's tensors: its size less the 8-byte length and the JSON header."""
    data = Path(path).read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


# -- the authors' code, re-hosted (JieShibo/PETL-ViT @ 026e4f1, binary_adapter/) ----------------------
# utils.py L15-90 (QLinear: forward and quantize, verbatim), adaptformer.py L7-46 and lora.py L7-58.
# Adapted: the width 768 is the host's ``width`` (a tiny ViT), timm's current Block names its drop-paths
# drop_path1 / drop_path2 and has layer scales ls1 / ls2 (Identity here).


class QLinear(nn.Linear):
    def __init__(self, in_channels, out_channels, bits=1):
        super().__init__(in_channels, out_channels, bias=False)
        self.q = self.quantize(bits)
        self.fake_quan = True
        self.bits = bits

    def forward(self, inputs):
        if not self.fake_quan:
            return F.linear(inputs, self.weight, None)
        w = self.weight
        mean_w = w.mean()
        std_w = w.std()
        w = (w - mean_w) / (std_w + 1e-5)
        wb = self.q(w).data + w - w.data
        weight = wb * std_w + mean_w
        return F.linear(inputs, weight, None)

    def quantize(self, bit=1):
        func, self.code = _authors_quantizer(bit)
        return func


@functools.cache
def _authors_quantizer(bit):
    """The body of the authors' ``QLinear.quantize``, verbatim but for ``_`` as the loop variable and
    returning ``value`` (they store it as ``self.code``); cached per ``bit`` (they ran it once a layer)."""
    j = 2**bit * 2
    ppf = np.array([0 for _ in range(1, j)])
    values = ppf[::2]
    ranges = ppf[1::2]
    for _ in range(500):
        ranges = (values[1:] + values[:-1]) / 2
        pv = norm.cdf(ranges)
        pv = np.insert(pv, 0, 0)
        pv = np.insert(pv, len(pv), 1)
        pv = (pv[1:] + pv[:-1]) / 2
        values = norm.ppf(pv)
    value = torch.tensor(values).float()
    pos = torch.tensor(ranges).float()
    delta = (value[1:] - value[:-1]) / 2

    def func(x):
        pos_ = pos.to(x.device)
        delta_ = delta.to(x.device)
        x = x.unsqueeze(dim=-1)
        x = x - pos_
        x = torch.sign(x)
        x *= delta_
        return x.sum(-1)

    return func, value


class AuthorsAdapter(nn.Module):
    def __init__(self, width, dim, bit, act):
        super().__init__()
        self.adapter_down = QLinear(width, dim, bit)
        self.adapter_up = QLinear(dim, width, bit)
        nn.init.trunc_normal_(self.adapter_up.weight, mean=0.0, std=0.001, a=-0.002, b=0.002)
        self.act = nn.ReLU() if act else nn.Identity()
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        x_down = self.adapter_down(x)
        x_down = self.act(x_down)
        x_down = self.dropout(x_down)
        return self.adapter_up(x_down)


def forward_block(self, x):
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.adapter_mlp(x) * self.s
    return x


def forward_attn(self, x, **_):  # timm's current Block passes attn_mask / is_causal (unused: None)
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    delta_q = (
        self.lora_q(x).reshape(B, N, 1, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4) * self.s
    )
    delta_v = (
        self.lora_v(x).reshape(B, N, 1, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4) * self.s
    )
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, v = q + delta_q[0], v + delta_v[0]
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


def set_adapter(model, form, width, dim, s, bit):
    for layer in model.children():
        if form == "adaptformer" and type(layer) is timm.models.vision_transformer.Block:
            layer.adapter_mlp = AuthorsAdapter(width, dim, bit, act=True)
            layer.s = s
            layer.forward = forward_block.__get__(layer, layer.__class__)
        elif form == "lora" and type(layer) is timm.models.vision_transformer.Attention:
            layer.lora_q = AuthorsAdapter(width, dim, bit, act=False)
            layer.lora_v = AuthorsAdapter(width, dim, bit, act=False)
            layer.s = s
            layer.forward = forward_attn.__get__(layer, layer.__class__)
        elif len(list(layer.children())) != 0:
            set_adapter(layer, form, width, dim, s, bit)


# -- helpers -----------------------------------------------------------------------------------------


def our_deltas(model: nn.Module, form: str) -> list[list[BinaryBottleneck]]:
    """Per block: ``[adapter]`` (adaptformer) or ``[q, v]`` (lora)."""
    if form == "adaptformer":
        return [[b.norm2.parallel["binary_adapter"]] for b in model.blocks]
    return [[b.attn.qkv.deltas["binary_q"], b.attn.qkv.deltas["binary_v"]] for b in model.blocks]


def their_adapters(model: nn.Module, form: str) -> list[list[AuthorsAdapter]]:
    if form == "adaptformer":
        return [[b.adapter_mlp] for b in model.blocks]
    return [[b.attn.lora_q, b.attn.lora_v] for b in model.blocks]


class FixedMask(nn.Module):
    """A deterministic stand-in for both dropouts (a fixed 0 / 1/(1-p) pattern on the last dimension)."""

    def forward(self, x):
        g = torch.Generator().manual_seed(1000)
        return x * ((torch.rand(x.shape[-1], generator=g) > 0.3).to(x.dtype) / 0.7)


DIM, SCALE = 8, 0.7


def ours_and_theirs(form: str, bits: int):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    ours = petl_zoo.create(
        "binary_adapter", copy.deepcopy(pristine), form=form, dim=DIM, bits=bits, scale=SCALE
    )
    perturb_(ours, std=0.3)
    ours = ours.double().eval()
    theirs = copy.deepcopy(pristine)
    set_adapter(theirs, form, pristine.embed_dim, DIM, SCALE, bits)
    theirs = theirs.double().eval()
    with torch.no_grad():
        theirs.head.load_state_dict(ours.head.state_dict())
        for mine, their in zip(our_deltas(ours, form), their_adapters(theirs, form), strict=True):
            for d, a in zip(mine, their, strict=True):
                a.adapter_down.weight.copy_(d.down.weight)
                a.adapter_up.weight.copy_(d.up.weight)
    return pristine.double(), ours, theirs


# -- parity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_levels_are_the_authors(bits):
    q = QLinear(8, 8, bits)
    levels, thresholds, half = quantizer_levels(bits)
    # torch's ndtr / ndtri in place of scipy's cdf / ppf: the same float32 levels for 1, 2 and 4 bits; at
    # 8 bits the two levels next to 0 (+-9.5e-8) differ by 7e-15
    torch.testing.assert_close(
        torch.tensor(levels, dtype=torch.float64), q.code.double(), atol=0 if bits < 8 else 1e-13, rtol=0
    )
    w = torch.randn(4000, dtype=torch.float64) * 2
    ours = petl_zoo.methods.binary_adapter.quantize(w, bits)
    torch.testing.assert_close(ours, q.q(w), atol=0 if bits < 8 else 1e-12, rtol=0)
    nearest = (ours[:, None] - torch.tensor(levels, dtype=torch.float64)).abs().min(dim=1).values
    assert nearest.max() < 1e-6 and len(thresholds) == len(half) == 2**bits - 1  # sums of half steps
    if bits == 1:
        assert levels == pytest.approx((-0.6744897501960817, 0.6744897501960817), abs=1e-7)


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("form", ["adaptformer", "lora"])
def test_outputs_and_gradients_match_the_authors(form, bits, images):
    pristine, ours, theirs = ours_and_theirs(form, bits)
    x = images.double()
    with torch.no_grad():
        assert (theirs(x) - pristine(x)).abs().max() > 1e-3  # the update is visible
    probe = torch.randn(2, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for masked in (False, True):
        if masked:
            for mine, their in zip(our_deltas(ours, form), their_adapters(theirs, form), strict=True):
                for d, a in zip(mine, their, strict=True):
                    d.dropout, a.dropout = FixedMask(), FixedMask()
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        out, expected = ours(x), theirs(x)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
        (out * probe).sum().backward()
        (expected * probe).sum().backward()
        for mine, their in zip(our_deltas(ours, form), their_adapters(theirs, form), strict=True):
            for d, a in zip(mine, their, strict=True):
                for ours_w, their_w in (
                    (d.down.weight, a.adapter_down.weight),
                    (d.up.weight, a.adapter_up.weight),
                ):
                    assert their_w.grad.abs().max() > 0
                    torch.testing.assert_close(ours_w.grad, their_w.grad, atol=1e-10, rtol=0)


def test_straight_through_gradient_reaches_mean_and_std():
    """``W_q = (Q(W_n) + W_n - sg(W_n)) sigma + mu``: the gradient reaches ``W`` through ``W_n`` (as the
    identity) and through ``mu`` and ``sigma``, as the closed form below (``G = dL/dW_q``)."""
    layer = BinaryLinear(6, 4, 1).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    g = torch.randn(3, 4, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    w = layer.weight.detach()
    n, m, s, e = w.numel(), w.mean(), w.std(), 1e-5
    wn = (w - m) / (s + e)
    wb = petl_zoo.methods.binary_adapter.quantize(wn, 1)
    G = g.t() @ x
    expected = (
        G * s / (s + e)
        + (G.sum() - s * G.sum() / (s + e)) / n
        + (w - m) / ((n - 1) * s) * ((G * wb).sum() - s * (G * wn).sum() / (s + e))
    )
    torch.testing.assert_close(layer.weight.grad, expected, atol=1e-12, rtol=0)
    assert (layer.weight.grad - G).abs().max() > 1e-3  # not the plain straight-through identity


# -- counts and bytes on ViT-B/16 ----------------------------------------------------------------------


@pytest.mark.parametrize("form,expected", [("adaptformer", 589_824), ("lora", 1_179_648)])
def test_vit_base_counts_equal_the_authors(form, expected):
    with torch.device("meta"):
        ours = petl_zoo.create("binary_adapter", timm.create_model("vit_base_patch16_224"), form=form)
        theirs = timm.create_model("vit_base_patch16_224")
        set_adapter(theirs, form, 768, 32, 1.0, 1)
    assert petl_zoo.trainable_parameters(ours)["method"] == expected
    assert sum(p.numel() for n, p in theirs.named_parameters() if "adapter" in n) == expected


@pytest.mark.parametrize(
    "form,adapter_bytes,with_head",
    # + 769 * 100 * 4 head bytes: the sizes of the authors' models_bin/<form>/cifar-bit1-dim32.bin
    [("adaptformer", 73_920, 381_520), ("lora", 147_840, 455_440)],
)
def test_vit_base_packed_bytes(form, adapter_bytes, with_head, tmp_path):
    with torch.device("meta"):
        model = petl_zoo.create(
            "binary_adapter", timm.create_model("vit_base_patch16_224", num_classes=100), form=form
        )
    model.to_empty(device="cpu")  # shapes only: no backbone init
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for layer in model.modules():
            if isinstance(layer, BinaryLinear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        model.head.weight.zero_()
        model.head.bias.zero_()
    assert len(export_packed(model)) == adapter_bytes
    assert len(export_packed(model, head=True)) == with_head
    # save_adapter writes the same bytes as tensors (bits, mu / sigma, head) behind safetensors' header
    weights = petl_zoo.save_adapter(model, tmp_path / "ad") / "adapter.safetensors"
    assert tensor_bytes(weights) == with_head
    assert weights.stat().st_size < with_head + 16 * 1024
    assert adapter_bytes < stored_bytes(model)[1] < adapter_bytes + 16 * 1024  # the benchmark's column


# -- packed export / load ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("form", ["adaptformer", "lora"])
def test_packed_round_trip(form, bits, images):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    model = petl_zoo.create("binary_adapter", copy.deepcopy(pristine), form=form, bits=bits, dim=DIM).eval()
    perturb_(model, std=0.3)
    data = export_packed(model, head=True)
    layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    assert len(data) == sum(m.weight.numel() * bits // 8 + 8 for m in layers) + 4 * 5 * (48 + 1)
    fresh = petl_zoo.create("binary_adapter", copy.deepcopy(pristine), form=form, bits=bits, dim=DIM).eval()
    load_packed(fresh, data, head=True)
    loaded = [m for m in fresh.modules() if isinstance(m, BinaryLinear)]
    for mine, back in zip(layers, loaded, strict=True):
        assert not back.quantize
        levels = set(quantizer_levels(bits)[0])
        std, mean = mine.weight.std(), mine.weight.mean()
        assert {round(v, 5) for v in ((back.weight - mean) / std).flatten().tolist()} <= {
            round(v, 5) for v in levels
        }
        torch.testing.assert_close(back.weight, mine.quantized_weight(), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="bytes left over"):
        load_packed(
            petl_zoo.create("binary_adapter", copy.deepcopy(pristine), form=form, bits=bits, dim=DIM),
            data + b"x",
            head=True,
        )


def test_pack_layout_is_lowest_bit_first():
    layer = BinaryLinear(8, 2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1, -1, -1, -1, -1, -1, -1], [-1, 1, 1, -1, -1, -1, -1, 1]]))
    data = layer.pack()
    assert data[:2] == bytes([0b00000001, 0b10000110])
    assert len(data) == 2 + 8


# -- merge, save / load --------------------------------------------------------------------------------


def test_lora_form_merges_exactly(images):
    torch.manual_seed(0)
    model = petl_zoo.create("binary_adapter", tiny_vit(), form="lora", dim=DIM, scale=SCALE)
    perturb_(model, std=0.3)
    model = model.double().eval()
    x = images.double()
    with torch.no_grad():
        expected = model(x)  # every delta through its own forward
    fused = model(x)  # a grad-enabled step: the low-rank one-pass form
    torch.testing.assert_close(fused.detach(), expected, atol=1e-12, rtol=0)
    delta = model.blocks[0].attn.qkv.deltas["binary_q"]
    w = delta.up.quantized_weight() @ delta.down.quantized_weight() * SCALE
    torch.testing.assert_close(delta.delta_weight(torch.zeros(1, dtype=torch.float64)), w, atol=0, rtol=0)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    petl_zoo.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=0)
    petl_zoo.unmerge(model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_lora_form_on_every_host(host, images, tmp_path):
    """The contract test covers the default form; Bi-LoRA: attaches, merges, saves and loads everywhere."""
    torch.manual_seed(0)
    pristine = tiny_host(host).eval()
    model = petl_zoo.create("binary_adapter", copy.deepcopy(pristine), form="lora", dim=4).eval()
    perturb_(model, std=0.3)
    with torch.no_grad():
        tuned = model(images)
        assert (tuned - pristine(images)).abs().max() > 1e-4
    petl_zoo.save_adapter(model, tmp_path / "ad")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "ad").eval()
    assert petl_zoo.is_mergeable(fresh)
    petl_zoo.merge(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), tuned, atol=1e-5, rtol=1e-5)


def test_adaptformer_form_does_not_merge():
    model = petl_zoo.create("binary_adapter", tiny_vit())
    assert not petl_zoo.is_mergeable(model)


@pytest.mark.parametrize("form", ["adaptformer", "lora"])
def test_save_load_exact(form, images, tmp_path):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    model = petl_zoo.create("binary_adapter", copy.deepcopy(pristine), form=form, dim=DIM).eval()
    perturb_(model, std=0.3)
    weights = petl_zoo.save_adapter(model, tmp_path / "ad") / "adapter.safetensors"
    assert tensor_bytes(weights) == len(export_packed(model, head=True))  # the packed form, not float32
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "ad").eval()
    assert not any(m.quantize for m in fresh.modules() if isinstance(m, BinaryLinear))
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))  # W_q to the bit
    assert export_packed(fresh) == export_packed(model)
    again = petl_zoo.save_adapter(fresh, tmp_path / "again") / "adapter.safetensors"
    assert again.read_bytes() == weights.read_bytes()


def test_corrupt_packed_weights_are_one_line(tmp_path):
    model = petl_zoo.create("binary_adapter", tiny_vit(), dim=DIM)
    folder = petl_zoo.save_adapter(model, tmp_path / "ad")
    tensors = load_file(folder / "adapter.safetensors")
    key = next(k for k in tensors if k.endswith(".weight_bits"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, folder / "adapter.safetensors")
    with pytest.raises(ValueError, match=r"do not fit a 1-bit \(\d+, \d+\) matrix"):
        petl_zoo.load_adapter(tiny_vit(), folder, verify=False)


def test_training_snapshot_keeps_the_latent_weights():
    """Resume needs the float32 latent weights: the snapshot (adapter_state_dict) is not packed."""
    model = petl_zoo.create("binary_adapter", tiny_vit(), dim=DIM)
    perturb_(model, std=0.3)
    state = {k: v.clone() for k, v in petl_zoo.adapter_state_dict(model).items()}
    fresh = petl_zoo.create("binary_adapter", tiny_vit(), dim=DIM)
    petl_zoo.load_adapter_weights(fresh, state)
    assert all(m.quantize for m in fresh.modules() if isinstance(m, BinaryLinear))
    assert all(torch.equal(v, state[k]) for k, v in petl_zoo.adapter_state_dict(fresh).items())


def test_bf16_host_binarises_in_float32(images):
    """The latent weights stay float32 on a bf16 host and the bits are those of the float32 model."""
    torch.manual_seed(0)
    model = petl_zoo.create("binary_adapter", tiny_vit(), dim=DIM).eval()
    perturb_(model, std=0.3)
    half = petl_zoo.create("binary_adapter", tiny_vit().to(torch.bfloat16), dim=DIM).eval()
    half.load_state_dict(model.state_dict(), strict=False)
    assert all(m.weight.dtype == torch.float32 for m in half.modules() if isinstance(m, BinaryLinear))
    assert export_packed(half) == export_packed(model)
    with torch.no_grad():
        out = half(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and (out.float() - model(images)).abs().max() < 0.1


# -- init and options ----------------------------------------------------------------------------------


def test_init_is_the_authors():
    delta = BinaryBottleneck(768, 768, 32, 1, 1.0, 0.1, act=True)
    up = delta.up.weight
    assert up.abs().max() <= 0.002 and 0.0005 < up.std() < 0.0015
    bound = 1 / 768**0.5  # nn.Linear's kaiming-uniform(a=sqrt(5))
    assert delta.down.weight.abs().max() <= bound and delta.down.weight.abs().max() > 0.9 * bound
    assert isinstance(delta.act, nn.ReLU) and delta.dropout.p == 0.1
    lora = BinaryLoraDelta(768, 768, 32, 1, 1.0, 0.1)
    assert isinstance(lora.act, nn.Identity)
    full = BinaryBottleneck(16, 16, 4, 32, 1.0, 0.1, act=True)
    assert not full.up.quantize and torch.count_nonzero(full.up.weight) == 0


def test_full_precision_baseline_is_the_identity_at_init(images):
    pristine = tiny_vit().eval()
    model = petl_zoo.create("binary_adapter", copy.deepcopy(pristine), bits=32).eval()
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))


def test_defaults_and_options():
    cfg = BinaryAdapterConfig()
    assert (cfg.form, cfg.dim, cfg.bits, cfg.scale, cfg.dropout, cfg.targets) == (
        "adaptformer",
        32,
        1,
        1.0,
        0.1,
        ("mlp",),
    )
    assert BinaryAdapterConfig(form="lora").targets == ("q", "v")
    with pytest.raises(ValueError):
        BinaryAdapterConfig(form="adaptformer", targets=("q",))
    with pytest.raises(ValueError):
        BinaryAdapterConfig(bits=3)
    preset = load_preset("binary_adapter")
    assert preset.for_task("dtd")[0] == {
        "form": "adaptformer",
        "dim": 32,
        "bits": 1,
        "dropout": 0.1,
        "scale": 0.01,
    }
    assert preset.protocol == "vtab" and preset.recipe["seed"] == 42
