"""Convpass: parity with the authors' module and block forwards (ViT eval and train, Swin eval), prefix
tokens and layer scale, the patch grid from the model (non-square, dynamic), counts, init, refusals."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from conftest import tiny_host, tiny_vit
from torch import nn

import petl_zoo
from petl_zoo.methods.convpass import ConvpassBypass, ConvpassConfig, ConvpassInject, ConvpassTap
from petl_zoo.targets import iter_blocks


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class AuthorsConvpass(nn.Module):
    """JieShibo/PETL-ViT @ 026e4f1, convpass/vtab/convpass.py L106-149 (``Convpass``), re-hosted: the
    hard-coded width 768 and 14 x 14 grid are arguments. ``prefix`` generalises their one class token
    (``x_down[:, :1]``) to ``n`` prefix tokens, each a 1 x 1 image (ours; ``prefix=1`` is their code)."""

    def __init__(self, dim: int, width: int, grid: tuple[int, int], prefix: int = 1) -> None:
        super().__init__()
        self.adapter_conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.adapter_down = nn.Linear(width, dim)
        self.adapter_up = nn.Linear(dim, width)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(0.1)
        self.dim, self.grid, self.prefix = dim, grid, prefix

    def forward(self, x):
        B, N, C = x.shape
        (gh, gw), n = self.grid, self.prefix
        x_down = self.act(self.adapter_down(x))
        x_patch = x_down[:, n:].reshape(B, gh, gw, self.dim).permute(0, 3, 1, 2)
        x_patch = self.adapter_conv(x_patch)
        x_patch = x_patch.permute(0, 2, 3, 1).reshape(B, gh * gw, self.dim)
        if n:
            x_cls = x_down[:, :n].reshape(B * n, 1, 1, self.dim).permute(0, 3, 1, 2)
            x_cls = self.adapter_conv(x_cls)
            x_cls = x_cls.permute(0, 2, 3, 1).reshape(B, n, self.dim)
            x_patch = torch.cat([x_cls, x_patch], dim=1)
        return self.adapter_up(self.dropout(self.act(x_patch)))


class AuthorsConvpassSwin(nn.Module):
    """convpass.py L152-185 (``Convpass_swin``): all tokens on a sqrt(N) x sqrt(N) grid, no class token."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.adapter_conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.adapter_down = nn.Linear(width, dim)
        self.adapter_up = nn.Linear(dim, width)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(0.1)
        self.dim = dim

    def forward(self, x):
        B, N, C = x.shape
        H = int(math.sqrt(N))
        x_down = self.adapter_down(x)
        x_patch = x_down.reshape(B, H, H, self.dim).permute(0, 3, 1, 2)
        x_patch = self.act(x_patch)
        x_patch = self.adapter_conv(x_patch)
        x_down = x_patch.permute(0, 2, 3, 1).reshape(B, -1, self.dim)
        return self.adapter_up(self.dropout(self.act(x_down)))


def authors_forward_block(self, x):
    """convpass.py L7-10 (``forward_block``). timm 0.4.12's Block had one ``drop_path``; timm 1.0 has
    ``drop_path1``/``drop_path2`` with the same rate, and layer scale ``ls1``/``ls2`` on the frozen branch
    (Identity on the authors' ViT-B)."""
    x = (
        x
        + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        + self.drop_path1(self.adapter_attn(self.norm1(x))) * self.s
    )
    if hasattr(self, "adapter_mlp"):
        x = (
            x
            + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
            + self.drop_path2(self.adapter_mlp(self.norm2(x))) * self.s
        )
    else:  # forward_block_attn, L13-16
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return x


def authors_forward_swin_block(self, x):
    """convpass.py L19-57 (``forward_swin_block``) on timm 1.0's NHWC Swin block, whose ``_attn`` is the
    shift / window partition / attention / reverse of their L25-50."""
    B, H, W, C = x.shape
    shortcut = (
        x
        + self.drop_path1(self.adapter_attn(self.norm1(x).reshape(B, H * W, C)).reshape(B, H, W, C)) * self.s
    )
    x = shortcut + self.drop_path1(self._attn(self.norm1(x)))
    x = x.reshape(B, -1, C)
    x = (
        x
        + self.drop_path2(self.mlp(self.norm2(x)))
        + self.drop_path2(self.adapter_mlp(self.norm2(x))) * self.s
    )
    return x.reshape(B, H, W, C)


def copy_bypass(ours: ConvpassBypass, theirs: nn.Module) -> None:
    with torch.no_grad():
        for mine, their in (
            (ours.down, theirs.adapter_down),
            (ours.conv, theirs.adapter_conv),
            (ours.up, theirs.adapter_up),
        ):
            their.weight.copy_(mine.weight)
            their.bias.copy_(mine.bias)


def taps(block: nn.Module) -> list[ConvpassTap]:
    return [m for m in (block.norm1, block.norm2) if isinstance(m, ConvpassTap)]


def convpass_pair(host: nn.Module, grid=None, **options) -> tuple[nn.Module, nn.Module]:
    """(ours with perturbed bypasses, the authors' forwards on a pristine copy with the same weights), fp64."""
    host = host.double().eval()
    pristine = copy.deepcopy(host)
    model = petl_zoo.create("convpass", host, **options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sequential.convpass" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    cfg = ConvpassConfig(**options)
    swin = petl_zoo.targets.family_of(host).hierarchical
    prefix = 0 if swin else host.num_prefix_tokens
    for ours, theirs in zip(iter_blocks(model), iter_blocks(pristine)):
        block = theirs.module
        for tap, name in zip(taps(ours.module), ("adapter_attn", "adapter_mlp")):
            if swin:
                module = AuthorsConvpassSwin(cfg.dim, ours.dim)
            else:
                module = AuthorsConvpass(cfg.dim, ours.dim, grid or tuple(host.patch_embed.grid_size), prefix)
            module = module.double().eval()
            copy_bypass(tap.sequential["convpass"], module)
            setattr(block, name, module)
        block.s = cfg.scale
        forward = authors_forward_swin_block if swin else authors_forward_block
        block.forward = forward.__get__(block, type(block))
    return model, pristine


# -- parity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xavier_init", [False, True], ids=["identity", "xavier"])
@pytest.mark.parametrize("placement", ["block", "attn"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_vit_parity_with_the_authors_forward_block(xavier_init, placement, train):
    torch.manual_seed(0)
    host = tiny_vit(depth=2, drop_path_rate=0.5)  # block 1 at 0.5: masks surely drop some samples
    model, theirs = convpass_pair(host, xavier_init=xavier_init, placement=placement, scale=0.7)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model.train(train)
    theirs.train(train)
    torch.manual_seed(5)
    ours = model(x)
    torch.manual_seed(5)
    expected = theirs(x)
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)
    if train:  # drop-path and dropout acted: another draw differs
        assert (model(x) - ours).abs().max() > 1e-6


def test_swin_parity_with_the_authors_swin_block():
    torch.manual_seed(0)
    model, theirs = convpass_pair(tiny_host("swin"), scale=0.7)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), atol=1e-10, rtol=0)
    assert {b.dim for b in iter_blocks(model)} == {16, 32}  # both stages, their own widths


@pytest.mark.parametrize("host", ["dinov2_reg", "deit_distilled", "gap", "deit3", "siglip"])
def test_prefix_tokens_and_layer_scale(host):
    """Any number of prefix tokens (5, 2, 0) each through the conv as a 1 x 1 image; with layer scale
    (DINOv2, DeiT-III) the bypass is added outside it, as in the authors' block."""
    torch.manual_seed(0)
    model, theirs = convpass_pair(tiny_host(host), scale=2.0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), atol=1e-10, rtol=0)


def test_non_square_grid_from_the_patch_embedding():
    torch.manual_seed(0)
    model, theirs = convpass_pair(tiny_vit(img_size=(32, 48)), grid=(4, 6))
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), atol=1e-10, rtol=0)


def test_dynamic_image_size_grid_per_input():
    torch.manual_seed(0)
    host = tiny_vit(dynamic_img_size=True)
    model, theirs = convpass_pair(copy.deepcopy(host), grid=(4, 6))
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), atol=1e-10, rtol=0)
        model(torch.randn(1, 3, 40, 24, dtype=torch.float64))  # a 5 x 3 grid: the hook follows each input
        assert taps(model.blocks[0])[0].grid.current() == (5, 3)
    assert len(petl_zoo.method_of(model).hooks) == 1


# -- counts, init, options -----------------------------------------------------------------------------


@pytest.mark.parametrize("options,expected", [({}, 327_552), ({"placement": "attn"}, 163_776)], ids=str)
def test_vit_base_counts(options, expected):
    with torch.device("meta"):
        model = petl_zoo.create("convpass", timm.create_model("vit_base_patch16_224"), **options)
    assert petl_zoo.trainable_parameters(model)["method"] == expected
    per_bypass = (768 * 8 + 8) + (8 * 8 * 9 + 8) + (8 * 768 + 768)  # down, conv, up: 13,648
    assert expected == per_bypass * 12 * (2 if options == {} else 1)


def test_swin_counts_follow_each_stage():
    model = petl_zoo.create("convpass", tiny_host("swin"), dim=4)
    expected = sum(2 * (b.dim * 4 + 4 + 4 * 4 * 9 + 4 + 4 * b.dim + b.dim) for b in iter_blocks(model))
    assert petl_zoo.trainable_parameters(model)["method"] == expected


@pytest.mark.parametrize("dim", [8, 3])
def test_init(dim):
    torch.manual_seed(0)
    identity = ConvpassBypass(48, dim, xavier_init=False, dropout=0.1, prefix_tokens=1)
    kernel = torch.zeros(dim, dim, 3, 3)
    kernel[:, :, 1, 1] = torch.eye(dim)  # identity-centred for any dim (the authors' eye(8) only fits 8)
    assert torch.equal(identity.conv.weight, kernel) and not identity.conv.bias.any()
    xavier = ConvpassBypass(48, dim, xavier_init=True, dropout=0.1, prefix_tokens=1)
    bound = math.sqrt(6 / (2 * 9 * dim))
    assert xavier.conv.weight.abs().max() <= bound and xavier.conv.weight.abs().max() > 0.5 * bound
    for bypass in (identity, xavier):
        assert bypass.down.weight.abs().max() <= math.sqrt(6 / (48 + dim)) and not bypass.down.bias.any()
        assert not bypass.up.weight.any() and not bypass.up.bias.any()


def test_placement_and_wrappers():
    model = petl_zoo.create("convpass", tiny_vit(), placement="attn")
    block = model.blocks[0]
    assert isinstance(block.norm1, ConvpassTap) and isinstance(block.drop_path1, ConvpassInject)
    assert not isinstance(block.norm2, ConvpassTap) and not isinstance(block.drop_path2, ConvpassInject)
    assert [b.path for b in iter_blocks(model)] == ["blocks.0", "blocks.1"]  # blocks themselves untouched


def test_options():
    cfg = ConvpassConfig()
    assert (cfg.dim, cfg.scale, cfg.xavier_init, cfg.dropout, cfg.placement) == (8, 1.0, False, 0.1, "block")
    with pytest.raises(ValueError, match="dim must be a positive integer, got 0"):
        petl_zoo.create("convpass", tiny_vit(), dim=0)
    with pytest.raises(ValueError, match="scale must be a finite non-zero number"):
        ConvpassConfig(scale=0.0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        ConvpassConfig(dropout=1.0)
    with pytest.raises(ValueError, match="placement"):
        petl_zoo.create("convpass", tiny_vit(), placement="mlp")


def test_eval_mode_host_gets_eval_mode_dropout():
    torch.manual_seed(0)
    model = petl_zoo.create("convpass", tiny_vit().eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "convpass" in name:
                p.normal_()
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(model(x), model(x))


# -- refusals, merge -----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["swinv2", "swinv2_cr"])
def test_post_norm_families_are_refused(host):
    with pytest.raises(ValueError, match="does not support the swinv2.* family: its res-post-norm blocks"):
        petl_zoo.create("convpass", tiny_host(host))


def test_post_norm_vit_blocks_and_patch_dropout_are_refused():
    from timm.models.vision_transformer import ResPostBlock

    model = tiny_vit(block_fn=ResPostBlock)
    with pytest.raises(ValueError, match="convpass needs pre-norm blocks .* blocks.0 is a ResPostBlock"):
        petl_zoo.create("convpass", model)
    assert petl_zoo.method_of(model) is None and not isinstance(model.blocks[0].norm1, ConvpassTap)
    with pytest.raises(ValueError, match="drops patch tokens"):
        petl_zoo.create("convpass", tiny_vit(patch_drop_rate=0.5))


def test_not_mergeable(tmp_path):
    model = petl_zoo.create("convpass", tiny_vit())
    assert not petl_zoo.is_mergeable(model)
    with pytest.raises(
        ValueError, match=r"method 'convpass' cannot be merged: .*blocks\.0\.norm1\.sequential\.convpass"
    ):
        petl_zoo.merge(model)
    with pytest.raises(ValueError, match="method 'convpass' cannot be merged"):
        petl_zoo.merge(model, unload=True)
    petl_zoo.save_adapter(model, tmp_path / "ad")
    assert petl_zoo.read_adapter_config(tmp_path / "ad")["mergeable"] is False
