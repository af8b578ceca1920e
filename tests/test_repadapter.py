"""RepAdapter: counts, parity with the authors' modules and block forwards (luogen1996/RepAdapter), their
re-parameterisation against petl_zoo.merge, refusals on res-post-norm hosts, options."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import perturb_, tiny_host, tiny_vit
from torch import nn

import petl_zoo
from petl_zoo.layers import AdaptedLinear
from petl_zoo.methods.repadapter import RepAdapterDelta


# ------------------------------------------------------------------------------- the authors' code
class AuthorsRepAdapter(nn.Module):
    """luogen1996/RepAdapter repadapter.py L147-172 (``RepAdapter``), as written (dropout made an
    argument: the authors fix it at 0.1)."""

    def __init__(self, in_features=768, hidden_dim=8, groups=2, scale=1, dropout=0.1):
        super().__init__()
        self.conv_A = nn.Conv1d(in_features, hidden_dim, 1, groups=1, bias=True)
        self.conv_B = nn.Conv1d(hidden_dim, in_features, 1, groups=groups, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.groups = groups
        self.scale = scale

    def forward(self, x):
        x = x.transpose(1, 2)
        x = self.conv_B(self.dropout(self.conv_A(x))) * self.scale + x
        x = x.transpose(1, 2).contiguous()
        return x


def forward_vit_block_adapter(self, x):
    """repadapter.py L21-24."""
    x = x + self.drop_path1(self.attn(self.adapter_attn(self.norm1(x))))
    x = x + self.drop_path1(self.mlp(self.adapter_mlp(self.norm2(x))))
    return x


def forward_vit_attn_adapter(self, x):
    """repadapter.py L26-29."""
    x = x + self.drop_path1(self.attn(self.adapter_attn(self.norm1(x))))
    x = x + self.drop_path1(self.mlp(self.norm2(x)))
    return x


def forward_swin_block_adapter(self, x):
    """repadapter.py L32-69 on timm >= 0.9's NHWC Swin block: the authors' shift / partition / attention
    / reverse sequence is timm's own ``_attn`` (the same steps; no padding on these grids)."""
    B, H, W, C = x.shape
    shortcut = x
    x = self.adapter_attn(self.norm1(x).reshape(B, H * W, C)).view(B, H, W, C)
    x = shortcut + self.drop_path1(self._attn(x))
    x = x.reshape(B, -1, C)
    x = x + self.drop_path2(self.mlp(self.adapter_mlp(self.norm2(x))))
    return x.reshape(B, H, W, C)


def reparameterize(Wa, Wb, Ba, Bb, scale=1, do_residual=False):
    """repadapter.py L201-211, as written."""
    bias = 0
    id_tensor = 0
    if Ba is not None:
        bias = Ba @ Wb
    if Bb is not None:
        bias = bias + Bb
    if do_residual:
        id_tensor = torch.eye(Wa.shape[0], Wb.shape[1]).to(Wa.device)
    weight = Wa @ Wb * scale + id_tensor
    return weight.T, bias * scale if isinstance(bias, torch.Tensor) else None


def sparse2dense(weight, groups):
    """repadapter.py L213-220, as written."""
    d, cg = weight.shape
    dg = d // groups
    weight = weight.view(groups, dg, cg).transpose(1, 2)
    new_weight = torch.zeros(cg * groups, d, device=weight.device, dtype=weight.dtype)
    for i in range(groups):
        new_weight[i * cg : (i + 1) * cg, i * dg : (i + 1) * dg] = weight[i]
    return new_weight.T


def authors_fold(
    adapter: AuthorsRepAdapter, linear: nn.Linear, s: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold of one adapter into its consumer in ``set_RepWeight`` (repadapter.py L271-329), with the
    adapter's trained scale ``s`` (the authors' test.py passes --scale, default 1)."""
    weight_B = sparse2dense(adapter.conv_B.weight.squeeze(), adapter.groups)
    w, b = reparameterize(
        adapter.conv_A.weight.squeeze().T,
        weight_B.T,
        adapter.conv_A.bias,
        adapter.conv_B.bias,
        s,
        do_residual=True,
    )
    return reparameterize(w.T, linear.weight.T, b, linear.bias)


def authors_adapter(ours: RepAdapterDelta) -> AuthorsRepAdapter:
    """The authors' module holding our weights (conv kernels of size 1 = our Linear weights)."""
    features, per_group = ours.up_weight.shape
    dim = ours.down.out_features
    theirs = AuthorsRepAdapter(features, dim, ours.groups, ours.scale).to(ours.up_weight.dtype)
    with torch.no_grad():
        theirs.conv_A.weight.copy_(ours.down.weight[:, :, None])
        theirs.conv_A.bias.copy_(ours.down.bias)
        theirs.conv_B.weight.copy_(ours.up_weight[:, :, None])
        theirs.conv_B.bias.copy_(ours.up_bias)
    return theirs


def adapters_of(block: nn.Module) -> tuple[RepAdapterDelta, RepAdapterDelta | None]:
    mlp = block.mlp.fc1
    return (
        block.attn.qkv.input_deltas["repadapter_attn"],
        mlp.input_deltas["repadapter_mlp"] if isinstance(mlp, AdaptedLinear) else None,
    )


def with_authors_adapters(pristine: nn.Module, model: nn.Module, blocks: list, forward) -> nn.Module:
    """A copy of ``pristine`` whose ``blocks`` run the authors' block forward with our adapters' weights."""
    theirs = copy.deepcopy(pristine)
    for path in blocks:
        block = theirs.get_submodule(path)
        attn, mlp = adapters_of(model.get_submodule(path))
        block.adapter_attn = authors_adapter(attn).eval()
        if mlp is not None:
            block.adapter_mlp = authors_adapter(mlp).eval()
        block.forward = forward.__get__(block, type(block))
    return theirs


def trained(host: str, **options) -> tuple[nn.Module, nn.Module]:
    """(pristine fp64 host, RepAdapter on a copy with every adapter tensor moved off its init)."""
    torch.manual_seed(0)
    pristine = tiny_host(host).double().eval()
    model = petl_zoo.create("repadapter", copy.deepcopy(pristine), **options).eval()
    params = [p for n, p in model.named_parameters() if "repadapter" in n]
    perturb_(model, std=0.3, params=params)
    return pristine, model


@pytest.mark.parametrize(
    ("placement", "forward"), [("block", forward_vit_block_adapter), ("attn", forward_vit_attn_adapter)]
)
def test_parity_with_the_authors_vit_blocks_fp64(placement, forward):
    pristine, model = trained("vit", placement=placement, scale=2.5)
    theirs = with_authors_adapters(pristine, model, [f"blocks.{i}" for i in range(2)], forward)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        assert (ours - pristine(x)).abs().max() > 1e-2
        assert (ours - theirs(x)).abs().max() < 1e-10


def test_parity_with_the_authors_swin_blocks_fp64():
    pristine, model = trained("swin", scale=0.5)
    paths = [n for n, m in pristine.named_modules() if type(m).__name__ == "SwinTransformerBlock"]
    assert len(paths) == 4 and any(any(pristine.get_submodule(p).shift_size) for p in paths)
    theirs = with_authors_adapters(pristine, model, paths, forward_swin_block_adapter)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        assert (ours - pristine(x)).abs().max() > 1e-2
        assert (ours - theirs(x)).abs().max() < 1e-10


class _FixedMask(nn.Module):
    """A dropout with a given keep-mask (``[B, N, hidden]``; ``channels_first`` for the authors' conv layout)."""

    def __init__(self, mask: torch.Tensor, channels_first: bool) -> None:
        super().__init__()
        self.mask, self.channels_first = mask, channels_first

    def forward(self, h):
        return h * (self.mask.transpose(1, 2) if self.channels_first else self.mask) * 2.0


def test_dropout_sits_between_the_projections_as_the_authors():
    torch.manual_seed(0)
    ours = RepAdapterDelta(16, 8, 2, 3.0, 0.5).double()
    with torch.no_grad():
        ours.up_weight.normal_()
        ours.up_bias.normal_()
    theirs = authors_adapter(ours)
    z = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = (torch.rand(2, 5, 8) > 0.5).double()
    ours.dropout, theirs.dropout = _FixedMask(mask, False), _FixedMask(mask, True)
    with torch.no_grad():
        torch.testing.assert_close(z + ours(z, None), theirs(z), atol=1e-12, rtol=0)
        assert (ours(z, None) - ours.eval().up(ours.down(z)) * 3.0).abs().max() > 1e-3  # the mask acts


# ------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("host", ["vit", "swin"])
def test_merge_equals_the_authors_reparameterisation(host):
    pristine, model = trained(host, scale=5.0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        tuned = model(x)
    blocks = [n for n, m in pristine.named_modules() if hasattr(m, "attn") and hasattr(m, "mlp")]
    expected = {}
    for path in blocks:
        attn, mlp = adapters_of(model.get_submodule(path))
        block = pristine.get_submodule(path)
        expected[f"{path}.attn.qkv"] = authors_fold(authors_adapter(attn), block.attn.qkv, 5.0)
        expected[f"{path}.mlp.fc1"] = authors_fold(authors_adapter(mlp), block.mlp.fc1, 5.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    petl_zoo.merge(model)
    for path, (weight, bias) in expected.items():
        layer = model.get_submodule(path).base
        torch.testing.assert_close(layer.weight, weight, atol=1e-12, rtol=0)
        torch.testing.assert_close(layer.bias, bias, atol=1e-12, rtol=0)
    with torch.no_grad():
        assert (model(x) - tuned).abs().max() < 1e-12
    petl_zoo.unmerge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), tuned)
    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    assert plain.state_dict().keys() == pristine.state_dict().keys()
    assert not any(isinstance(m, AdaptedLinear) for m in plain.modules())
    with torch.no_grad():
        assert (plain(x) - tuned).abs().max() < 1e-12


def test_merged_fp32_model_matches_within_round_off(images):
    torch.manual_seed(0)
    model = petl_zoo.create("repadapter", tiny_vit(), scale=10.0).eval()
    perturb_(model, std=0.1)
    with torch.no_grad():
        tuned = model(images)
        petl_zoo.merge(model, unload=True)
        torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=1e-5)


def test_separate_qkv_share_one_adapter_and_a_bias_free_consumer_blocks_the_merge():
    model = petl_zoo.create("repadapter", tiny_host("eva_sep"))
    attn = model.blocks[0].attn
    shared = attn.q_proj.input_deltas["repadapter_attn"]
    assert (
        attn.k_proj.input_deltas["repadapter_attn"] is shared is attn.v_proj.input_deltas["repadapter_attn"]
    )
    counts = petl_zoo.trainable_parameters(model)
    per_adapter = 48 * 8 + 8 + 48 * 4 + 48
    assert counts["method"] == 2 * 2 * per_adapter  # 2 blocks x (attention, MLP), shared counted once
    with pytest.raises(
        ValueError,
        match=r"method 'repadapter' cannot be merged: its weight-space form has no exact place .*"
        r"blocks\.0\.attn\.k_proj\.input_deltas\.repadapter_attn \(RepAdapterDelta: the Linear has no bias",
    ):
        petl_zoo.merge(model)


# ------------------------------------------------------------------------------ counts, refusals
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, 239_808),
        ({"dim": 16}, 461_184),
        ({"placement": "attn"}, 119_904),
        ({"placement": "attn", "dim": 16}, 230_592),
    ],
)
def test_vit_base_counts_are_the_papers(options, expected):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=10)
    petl_zoo.create("repadapter", model, **options)
    dim = options.get("dim", 8)
    per_adapter = 768 * dim + dim + 768 * dim // 2 + 768
    adapters = 12 * (2 if options.get("placement", "block") == "block" else 1)
    assert petl_zoo.trainable_parameters(model)["method"] == adapters * per_adapter == expected


def test_identity_at_init(images):
    torch.manual_seed(0)
    pristine = tiny_host("swin").eval()
    model = petl_zoo.create("repadapter", copy.deepcopy(pristine)).eval()
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))


@pytest.mark.parametrize("host", ["swinv2", "swinv2_cr"])
def test_res_post_norm_families_are_refused_with_the_reason(host):
    with pytest.raises(
        ValueError,
        match=rf"method 'repadapter' does not support the {host} family: RepAdapter sits on the LayerNorm "
        r"output that feeds attention and the MLP; res-post-norm blocks",
    ):
        petl_zoo.create("repadapter", tiny_host(host))


def test_res_post_norm_blocks_of_a_vit_are_refused():
    from timm.models.vision_transformer import ResPostBlock

    model = tiny_vit(block_fn=ResPostBlock)
    with pytest.raises(ValueError, match=r"does not support the ResPostBlock of blocks\.0: .*res-post-norm"):
        petl_zoo.create("repadapter", model)
    assert petl_zoo.method_of(model) is None and not any(
        isinstance(m, AdaptedLinear) for m in model.modules()
    )


def test_grouped_up_projection_is_a_grouped_conv():
    torch.manual_seed(0)
    delta = RepAdapterDelta(12, 6, 3, 1.0, 0.0).double()
    with torch.no_grad():
        delta.up_weight.normal_()
    conv = nn.Conv1d(6, 12, 1, groups=3).double()
    with torch.no_grad():
        conv.weight.copy_(delta.up_weight[:, :, None])
        conv.bias.copy_(delta.up_bias)
    h = torch.randn(2, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(delta.up(h), conv(h.transpose(1, 2)).transpose(1, 2), atol=1e-12, rtol=0)
    torch.testing.assert_close(delta.up(h), h @ delta.dense_up().T + delta.up_bias, atol=1e-12, rtol=0)


def test_options_are_validated():
    with pytest.raises(
        ValueError, match=r"dim must be a multiple of groups \(3\) for the grouped up projection, got 8"
    ):
        petl_zoo.create("repadapter", tiny_vit(), groups=3)
    with pytest.raises(ValueError, match=r"scale must be a finite non-zero number, got 0.0"):
        petl_zoo.create("repadapter", tiny_vit(), scale=0.0)
    with pytest.raises(ValueError, match=r"bad value 'mlp' for option 'placement'.*'block', 'attn'"):
        petl_zoo.create("repadapter", tiny_vit(), placement="mlp")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        petl_zoo.create("repadapter", tiny_vit(), dropout=1.0)


@pytest.mark.parametrize(("name", "placement"), [("paper", "block"), ("paper_attn", "attn")])
def test_paper_presets_give_valid_options_and_recipes_for_every_task(name, placement):
    from petl_zoo.presets import load_preset
    from petl_zoo.train.recipe import RECIPES, validate_recipe

    preset = load_preset("repadapter", name)
    assert len(preset.tasks) == 19
    for task in preset.tasks:
        options, recipe = preset.for_task(task)
        validate_recipe({**RECIPES["vtab"], **recipe})
        assert options["placement"] == placement and options["scale"] in (0.1, 0.5, 1.0, 5.0, 10.0)
        petl_zoo.get_method("repadapter").config_class.from_options("repadapter", **options)
    assert preset.for_task("svhn")[0]["scale"] == 10.0
