"""SSF: counts, parity with the authors' math (dongzelian/SSF), sites, merge / unmerge, options; and the
layer folds (petl_zoo.layers.fold_output / fold_input) that SSF and RepAdapter merge through."""

from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
from conftest import tiny_host, tiny_vit
from torch import nn

import petl_zoo
from petl_zoo.layers import AdaptedModule, Delta, adapt_child, fold_input, fold_output
from petl_zoo.methods.ssf import SsfConfig, SsfDelta, ssf_sites


def ssf_deltas(model: nn.Module) -> dict[str, SsfDelta]:
    """Our SSF deltas by the path of the module whose output they scale and shift."""
    return {
        name: module.sequential["ssf"]
        for name, module in model.named_modules()
        if isinstance(module, AdaptedModule) and "ssf" in module.sequential
    }


def spread_(model: nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Move gamma and beta well away from their N(1, .02) / N(0, .02) start, so a wrong site shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in ssf_deltas(model).values():
            for p in (delta.scale_offset, delta.shift):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# ------------------------------------------------------------------------------- the authors' math
def ssf_ada(x, scale, shift):
    """dongzelian/SSF models/vision_transformer.py L388-395, as written."""
    assert scale.shape == shift.shape
    if x.shape[-1] == scale.shape[0]:
        return x * scale + shift
    elif x.shape[1] == scale.shape[0]:
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    else:
        raise ValueError("the input tensor shape does not match the shape of the scale factor.")


def authors_vit_forward(vit: nn.Module, p: dict[str, tuple], x: torch.Tensor) -> torch.Tensor:
    """The authors' SSF ViT forward (PatchEmbed.forward L358-374, Block.forward L252-255 with LayerScale,
    Attention.forward L196-213, Mlp.forward L157-170, forward_features L520-534, forward_head L537-541)
    on the frozen layers of a pristine timm ViT; ``p[path] = (gamma, beta)`` of the site after the module
    at ``path``. Their last site follows ``self.norm`` on every token, an Identity on ``fc_norm`` hosts
    (L436, L468, L471), and ``fc_norm`` after pooling has none."""
    pe = vit.patch_embed
    t = pe.proj(x).flatten(2).transpose(1, 2)
    t = pe.norm(ssf_ada(t, *p["patch_embed.proj"]))
    num_tokens = 0 if vit.cls_token is None else 1
    if num_tokens:
        t = torch.cat((vit.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
    t = vit.pos_drop(t + vit.pos_embed)
    for i, blk in enumerate(vit.blocks):
        at, mlp, path = blk.attn, blk.mlp, f"blocks.{i}"
        h = ssf_ada(blk.norm1(t), *p[f"{path}.norm1"])
        B, N, C = h.shape
        qkv = ssf_ada(at.qkv(h), *p[f"{path}.attn.qkv"])
        q, k, v = qkv.reshape(B, N, 3, at.num_heads, C // at.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = ((q @ k.transpose(-2, -1)) * at.scale).softmax(dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, N, C)
        t = t + blk.ls1(ssf_ada(at.proj(o), *p[f"{path}.attn.proj"]))
        h = ssf_ada(blk.norm2(t), *p[f"{path}.norm2"])
        g = mlp.act(ssf_ada(mlp.fc1(h), *p[f"{path}.mlp.fc1"]))
        t = t + blk.ls2(ssf_ada(mlp.fc2(g), *p[f"{path}.mlp.fc2"]))
    t = ssf_ada(vit.norm(t), *p["norm"])
    pooled = t[:, num_tokens:].mean(dim=1) if vit.global_pool == "avg" else t[:, 0]
    return vit.head(vit.fc_norm(pooled))


def authors_params(model: nn.Module) -> dict[str, tuple]:
    return {path: (d.gamma.detach(), d.beta.detach()) for path, d in ssf_deltas(model).items()}


#: Tiny ViTs for the parity test: token-pooled (the VTAB-1K setting); average-pooled with ``fc_norm``
#: after pooling and an Identity ``norm``; average-pooled with ``norm`` (timm's ``gap`` ViT: no class
#: token, no fc_norm, layer scale, no qkv bias).
PARITY_VITS = {
    "token": lambda: tiny_vit(),
    "avg_fc_norm": lambda: tiny_vit(global_pool="avg"),
    "gap": lambda: tiny_host("gap"),
}


@pytest.mark.parametrize("host", sorted(PARITY_VITS))
def test_parity_with_the_authors_vit_forward_fp64(host):
    torch.manual_seed(0)
    pristine = PARITY_VITS[host]().double().eval()
    assert pristine.global_pool == ("token" if host == "token" else "avg")
    assert isinstance(pristine.norm, nn.Identity) == (host == "avg_fc_norm")
    model = petl_zoo.create("ssf", copy.deepcopy(pristine)).eval()
    spread_(model)
    p = authors_params(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        theirs = authors_vit_forward(pristine, p, x)
        plain = pristine(x)
    assert (ours - plain).abs().max() > 1e-2  # the SSF sites really change the function
    assert (ours - theirs).abs().max() < 1e-10
    if host == "avg_fc_norm":  # the option moves the last site after fc_norm: not the authors' function
        moved = petl_zoo.create("ssf", copy.deepcopy(pristine), after_fc_norm=True).eval()
        with torch.no_grad():
            ssf_deltas(moved)["fc_norm"].load_state_dict(ssf_deltas(model)["norm"].state_dict())
            for path, delta in ssf_deltas(moved).items():
                if path != "fc_norm":
                    delta.load_state_dict(ssf_deltas(model)[path].state_dict())
            assert (moved(x) - theirs).abs().max() > 1e-2


#: dongzelian/SSF models/swin_transformer.py: PatchEmbed L528-531 (after the conv, after its norm),
#: SwinTransformerBlock L342-344 / L374-375 (norm1, norm2), WindowAttention L225-227 / L254-255 (qkv,
#: proj), Mlp L119-126 (fc1, fc2), forward_features L683-684. PatchMerging L420-422 would scale and shift
#: after its norm, but only when ``tuning_mode == 'ssf'`` (L397, L421), and BasicLayer passes it the
#: per-block list (L477): off in their models, ``patch_merging=True`` here.
SWIN_BLOCK_SITES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def authors_swin_site_paths(swin: nn.Module, patch_merging: bool) -> list[str]:
    """The authors' Swin sites in forward order, as paths of a timm Swin (whose patch merging opens a
    stage where theirs closes the one before: the same point of the forward)."""
    paths = ["patch_embed.proj", "patch_embed.norm"]
    for i, layer in enumerate(swin.layers):
        if patch_merging and not isinstance(layer.downsample, nn.Identity):
            paths.append(f"layers.{i}.downsample.norm")
        paths += [f"layers.{i}.blocks.{j}.{s}" for j in range(len(layer.blocks)) for s in SWIN_BLOCK_SITES]
    return [*paths, "norm"]


def authors_swin_hooks(swin: nn.Module, p: dict[str, tuple]) -> list:
    """The authors' ``ssf_ada`` at their Swin sites, as forward hooks on a pristine timm Swin (whose
    window machinery is the authors' own, on NHWC tensors); the patch conv's output is scaled as the
    authors' flattened tokens."""
    handles = []
    for name, module in swin.named_modules():
        if name not in p:
            continue
        if name == "patch_embed.proj":

            def hook(mod, args, out, ab=p[name]):
                return ssf_ada(out.permute(0, 2, 3, 1), *ab).permute(0, 3, 1, 2)

        else:

            def hook(mod, args, out, ab=p[name]):
                return ssf_ada(out, *ab)

        handles.append(module.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("patch_merging", [False, True])
def test_parity_with_the_authors_swin_sites_fp64(patch_merging):
    torch.manual_seed(0)
    pristine = tiny_host("swin").double().eval()
    model = petl_zoo.create("ssf", copy.deepcopy(pristine), patch_merging=patch_merging).eval()
    spread_(model)
    p = authors_params(model)
    assert list(p) == authors_swin_site_paths(pristine, patch_merging)
    assert ("layers.1.downsample.norm" in p) == patch_merging
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    handles = authors_swin_hooks(pristine, p)
    try:
        with torch.no_grad():
            theirs = pristine(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        ours = model(x)
        assert (ours - pristine(x)).abs().max() > 1e-2
    assert (ours - theirs).abs().max() < 1e-10


# ------------------------------------------------------------------------------------ counts, sites
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_vit_base_count_is_the_papers(global_pool):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=100, global_pool=global_pool)
    assert isinstance(model.norm, nn.Identity) == (global_pool == "avg")  # avg: the final norm is fc_norm
    petl_zoo.create("ssf", model)
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == 2 * 768 + 12 * 16_896 + 2 * 768 == 205_824
    assert counts["head"] == 768 * 100 + 100


@pytest.mark.parametrize(("patch_merging", "count"), [(False, 267_264), (True, 274_432)])
def test_swin_base_count(patch_merging, count):
    """The authors' Swin-B has 267,264 (no SSF in patch merging); the option adds 8 C for three stages."""
    with torch.device("meta"):
        model = timm.create_model("swin_base_patch4_window7_224", num_classes=100)
    petl_zoo.create("ssf", model, patch_merging=patch_merging)
    dims, depths = (128, 256, 512, 1024), (2, 2, 18, 2)
    blocks = sum(22 * c * n for c, n in zip(dims, depths))  # per block 2 * (C + 3C + C + C + 4C + C)
    merging = sum(2 * 4 * c for c in dims[:3]) if patch_merging else 0  # PatchMerging's norm on 4C
    expected = 2 * 128 + 2 * 128 + blocks + merging + 2 * 1024  # patch conv + its norm, final norm
    assert petl_zoo.trainable_parameters(model)["method"] == expected == count


def test_sites_in_forward_order_on_vit():
    paths = [s.path for s in ssf_sites(tiny_vit())]
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    expected = ["patch_embed.proj"] + [f"blocks.{i}.{s}" for i in range(2) for s in block] + ["norm"]
    assert paths == expected


@pytest.mark.parametrize(
    ("host", "options", "present", "absent"),
    [
        ("gap", {}, ["norm"], ["fc_norm"]),  # timm's gap ViT keeps its final LayerNorm in norm
        ("eva02", {}, ["norm"], ["fc_norm", "norm_pre", "blocks.0.mlp.norm"]),  # before pooling
        ("eva02", {"after_fc_norm": True}, ["fc_norm"], ["norm"]),
        ("beit", {}, ["norm"], ["fc_norm"]),
        ("eva_sep", {}, ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj"], []),
        ("clip", {}, ["norm"], ["norm_pre"]),  # CLIP's pre-norm has no SSF in the authors' ViT
        ("swin", {}, ["norm", "patch_embed.norm"], ["layers.1.downsample.norm"]),
        ("swin", {"patch_merging": True}, ["layers.1.downsample.norm"], []),
        ("swinv2_cr", {}, ["patch_embed.norm"], ["stages.1.downsample.norm", "stages.0.blocks.1.norm3"]),
        ("swinv2_cr", {"patch_merging": True}, ["stages.1.downsample.norm"], ["stages.0.blocks.1.norm3"]),
    ],
)
def test_sites_per_host(host, options, present, absent):
    paths = {s.path for s in ssf_sites(tiny_host(host), SsfConfig(**options))}
    assert set(present) <= paths and not set(absent) & paths


def test_the_site_before_pooling_is_called_and_placed_like_the_others():
    """On an fc_norm host the last site wraps the Identity ``norm``: it runs on every token, and its
    tensors are placed as the other sites' although the Identity has no weight to copy."""
    model = petl_zoo.create("ssf", tiny_vit(global_pool="avg").to(torch.bfloat16))
    wrapper = model.norm
    assert isinstance(wrapper, AdaptedModule) and isinstance(wrapper.base, nn.Identity)
    others = {(p.dtype, p.device) for d in ssf_deltas(model).values() for p in d.parameters()}
    assert {(p.dtype, p.device) for p in wrapper.sequential["ssf"].parameters()} == others
    assert len(others) == 1
    seen = []
    wrapper.register_forward_hook(lambda mod, args, out: seen.append((out.shape, out.dtype)))
    model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)).float().sum().backward()
    assert seen == [((2, 1 + 16, 48), torch.bfloat16)]  # the class token and 16 patches, before pooling
    assert wrapper.sequential["ssf"].shift.grad is not None


def test_not_the_identity_at_init_unless_init_std_0(images):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    assert petl_zoo.get_method("ssf").identity_at_init is False
    with torch.no_grad():
        moved = petl_zoo.create("ssf", copy.deepcopy(pristine)).eval()(images)
        still = petl_zoo.create("ssf", copy.deepcopy(pristine), init_std=0.0).eval()(images)
        plain = pristine(images)
    assert (moved - plain).abs().max() > 1e-3
    torch.testing.assert_close(still, plain, atol=0, rtol=0)


def test_init_distribution():
    torch.manual_seed(0)
    deltas = [SsfDelta(20_000) for _ in range(2)]
    gamma = torch.cat([d.gamma.detach() for d in deltas])
    beta = torch.cat([d.beta.detach() for d in deltas])
    assert abs(gamma.mean() - 1) < 1e-3 and abs(gamma.std() - 0.02) < 1e-3
    assert abs(beta.mean()) < 1e-3 and abs(beta.std() - 0.02) < 1e-3


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"init_std must be a finite number >= 0, got -0.1"):
        petl_zoo.create("ssf", tiny_vit(), init_std=-0.1)
    with pytest.raises(
        ValueError,
        match=r"unknown option 'rank' for method 'ssf'; valid options: after_fc_norm, init_std, patch_merging",
    ):
        petl_zoo.create("ssf", tiny_vit(), rank=4)
    with pytest.raises(ValueError, match=r"patch_merging"):
        petl_zoo.create("ssf", tiny_host("swin"), patch_merging=1)


# ---------------------------------------------------------------------------------------- merging
def test_merge_folds_into_linear_layernorm_and_conv_exactly(images):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    model = petl_zoo.create("ssf", copy.deepcopy(pristine)).eval()
    spread_(model)
    deltas = ssf_deltas(model)
    with torch.no_grad():
        tuned = model(images)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    petl_zoo.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=1e-5)
    for path, shape in (
        ("blocks.0.attn.qkv", (-1, 1)),
        ("blocks.1.norm2", (-1,)),
        ("patch_embed.proj", (-1, 1, 1, 1)),
    ):
        layer = model.get_submodule(path).base
        pre = pristine.get_submodule(path)
        gamma, beta = deltas[path].gamma.detach(), deltas[path].beta.detach()
        torch.testing.assert_close(layer.weight, pre.weight * gamma.view(shape), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(layer.bias, pre.bias * gamma + beta, atol=1e-7, rtol=1e-6)
    petl_zoo.unmerge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(images), tuned)
    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    assert plain.state_dict().keys() == pristine.state_dict().keys()
    assert not any(isinstance(m, AdaptedModule) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(images), tuned, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("host", "options"),
    [
        ("vit", {}),
        ("swin", {}),
        ("swin", {"patch_merging": True}),
        ("swinv2", {}),
        ("beit", {"after_fc_norm": True}),
    ],
)
def test_merge_is_exact_in_fp64(host, options):
    torch.manual_seed(0)
    model = petl_zoo.create("ssf", tiny_host(host).double(), **options).eval()
    spread_(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        tuned = model(x)
        petl_zoo.merge(model)
        assert (model(x) - tuned).abs().max() < 1e-12


def test_a_layer_without_bias_blocks_the_merge_with_its_name():
    model = petl_zoo.create("ssf", tiny_host("clip"))  # CLIP's patch conv has no bias
    assert not petl_zoo.is_mergeable(model)
    with pytest.raises(
        ValueError,
        match=r"method 'ssf' cannot be merged: its weight-space form has no exact place in this host's layers "
        r"\(patch_embed\.proj\.sequential\.ssf \(SsfDelta: the Conv2d has no bias to take the shift\)\)",
    ):
        petl_zoo.merge(model)
    assert not petl_zoo.is_merged(model)


def test_the_site_before_pooling_blocks_the_merge_unless_after_fc_norm():
    """The authors' last site on an fc_norm host scales and shifts the tokens before pooling and
    ``fc_norm``: no layer of the plain model can take it. ``after_fc_norm`` folds it into ``fc_norm``."""
    pristine = tiny_vit(global_pool="avg").eval()  # qkv bias: the last site is the only blocker
    model = petl_zoo.create("ssf", copy.deepcopy(pristine))
    assert not petl_zoo.is_mergeable(model)
    with pytest.raises(ValueError, match=r"\(norm\.sequential\.ssf \(SsfDelta: a Identity is not a layer"):
        petl_zoo.merge(model)
    moved = petl_zoo.create("ssf", copy.deepcopy(pristine), after_fc_norm=True).eval()
    assert petl_zoo.is_mergeable(moved)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tuned = moved(x)
        plain = petl_zoo.merge(moved, unload=True)
        torch.testing.assert_close(plain(x), tuned, atol=1e-5, rtol=1e-5)


def test_unload_warns_when_a_key_bias_lives_in_a_non_persistent_buffer(caplog):
    # Eva keeps k_bias as a non-persistent buffer; after_fc_norm: the site before pooling has no fold
    model = petl_zoo.create("ssf", tiny_host("eva02"), after_fc_norm=True)
    with caplog.at_level(logging.WARNING, logger="petl_zoo.layers"):
        plain = petl_zoo.merge(model, unload=True)
    assert "non-persistent k_bias" in caplog.text and "blocks.0.attn.k_bias" in caplog.text
    assert plain.blocks[0].attn.k_bias.abs().max() > 0  # the merged key shift is there


# ------------------------------------------------------------------------- the folds in layers.py
class _Affine(Delta):
    """A test delta with a given affine form ``d(z) = M z + c`` (``M`` per channel or a matrix)."""

    mergeable = True

    def __init__(self, matrix: torch.Tensor, shift: torch.Tensor | None) -> None:
        super().__init__()
        self.matrix = nn.Parameter(matrix)
        self.shift = None if shift is None else nn.Parameter(shift)

    def forward(self, z, weight):
        m = self.matrix
        out = z * m if m.dim() == 1 else z @ m.T
        return out if self.shift is None else out + self.shift

    def affine(self):
        return self.matrix, self.shift


@pytest.mark.parametrize("diagonal", [True, False])
def test_fold_output_and_input_match_the_forward(diagonal):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(6, 5).double()
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    m_out = torch.randn(5, generator=g) if diagonal else torch.randn(5, 5, generator=g)
    m_in = torch.randn(6, generator=g) if diagonal else torch.randn(6, 6, generator=g)
    c_out, c_in = torch.randn(5, generator=g), torch.randn(6, generator=g)
    out_delta, in_delta = _Affine(m_out.double(), c_out.double()), _Affine(m_in.double(), c_in.double())
    with torch.no_grad():
        y = linear(x)
        after = y + out_delta(y, None)
        before = linear(x + in_delta(x, None))
        folded_out, folded_in = copy.deepcopy(linear), copy.deepcopy(linear)
        fold_output(folded_out, *out_delta.affine())
        fold_input(folded_in, [in_delta.affine()])
        torch.testing.assert_close(folded_out(x), after, atol=1e-12, rtol=0)
        torch.testing.assert_close(folded_in(x), before, atol=1e-12, rtol=0)


def test_fold_rules():
    norm = nn.LayerNorm(4)
    with pytest.raises(ValueError, match="a matrix affine map folds into a Linear, not into a LayerNorm"):
        fold_output(norm, torch.zeros(4, 4), None)
    with pytest.raises(ValueError, match="the Linear has no bias to take the shift"):
        fold_input(nn.Linear(4, 3, bias=False), [(torch.zeros(4), torch.zeros(4))])
    with pytest.raises(ValueError, match="an affine map of 3 channels cannot fold into a LayerNorm of 4"):
        fold_output(norm, torch.zeros(3), None)


def test_sequential_affine_on_an_unfoldable_module_blocks_the_merge(isolated_registry):
    """A mergeable sequential delta on a module that is not a Linear / Conv / norm (an Mlp) is named as
    having no place to fold; a scale-only one folds into a bias-free Linear."""
    from dataclasses import dataclass

    @dataclass
    class Options(petl_zoo.MethodConfig):
        where: str = "mlp"

    @petl_zoo.register_method("test_affine", "an affine delta after a module")
    class AffineMethod(petl_zoo.Method):
        config_class = Options

        def apply(self, model):
            block = model.blocks[0]
            parent, attr = (block, "mlp") if self.config.where == "mlp" else (block.attn, "proj")
            if self.config.where == "proj":
                block.attn.proj.bias = None
            wrapper = adapt_child(parent, attr)
            wrapper.sequential["a"] = _Affine(torch.full((48,), 0.5), None)

    model = petl_zoo.create("test_affine", tiny_vit())
    with pytest.raises(
        ValueError, match=r"no exact place .*blocks\.0\.mlp\.sequential\.a \(_Affine: a Mlp is not a layer"
    ):
        petl_zoo.merge(model)
    model = petl_zoo.create("test_affine", tiny_vit().eval(), where="proj")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tuned = model(x)
        petl_zoo.merge(model, unload=True)
        torch.testing.assert_close(model(x), tuned, atol=1e-5, rtol=1e-5)
    assert model.blocks[0].attn.proj.bias is None


def test_paper_preset_gives_valid_recipes_for_every_task():
    from petl_zoo.presets import load_preset
    from petl_zoo.train.recipe import RECIPES, validate_recipe

    preset = load_preset("ssf")
    assert len(preset.tasks) == 19
    for task in preset.tasks:
        options, recipe = preset.for_task(task)
        validate_recipe({**RECIPES["vtab"], **recipe})  # numbers, not YAML strings such as '5e-05'
        assert options == {"init_std": 0.02} and recipe["seed"] == 42
    assert preset.for_task("clevr_dist")[1] == {
        **preset.recipe,
        "lr": 0.05,
        "weight_decay": 0.05,
        "drop_path": 0.1,
        "protocol": "default",
    }


def test_recipe_lr_is_the_authors_most_common_per_task_lr():
    import statistics

    from petl_zoo.presets import load_preset

    preset = load_preset("ssf")
    lrs = [preset.for_task(task)[1]["lr"] for task in preset.tasks]
    assert petl_zoo.get_method("ssf").recipe == {"lr": statistics.mode(lrs)} == {"lr": 5e-3}
