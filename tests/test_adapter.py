"""Adapters against their authors' math: AdaptFormer (residual input, drop-path and layer scale on the MLP
branch only) and Adapter+ (post-block, channel scale, own drop-path); options, counts, old folders.

The authors' code, re-hosted in our words on timm blocks with our weights copied in:
- AdaptFormer (ShoufaChen/AdaptFormer @ 6967d67): ``models/adapter.py: Adapter.forward`` with
  ``adapter_layernorm_option="none"``, ``add_residual=False`` (``up(dropout(ReLU(down(x)))) * scale``),
  and ``models/custom_modules.py: Block.forward`` with ``ffn_option="parallel"``: ``adapt_x`` from the
  residual stream before ``norm2``, added to ``drop_path(mlp(norm2(x)))``. Their block has no layer
  scale; the re-hosted block keeps timm's ``ls2`` on the MLP branch, like the drop-path.
- Adapter+ (visinf/adapter_plus @ 191c4ab): ``adapter_plus/vit_adapter.py: Adapter.forward``
  (``norm_a`` = Identity, ``drop_path_a(bottleneck(x)) * scaling``, plus ``skip``) and
  ``AdapterBlock.forward_post`` (``x = adapter(x, skip=x)`` after the block).
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from conftest import HOSTS, perturb_, tiny_host
from timm.layers import DropPath
from torch import nn
from torch.nn import functional as F

import petl_zoo
from petl_zoo.methods.adapter import AdapterConfig, BottleneckAdapter, PlusAdapter, ResidualTap


def fp64_vit(**kwargs) -> nn.Module:
    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kwargs}).double()


def images64() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def vit_forward(model: nn.Module, x: torch.Tensor, block_fn) -> torch.Tensor:
    """timm's ViT forward with each block computed by ``block_fn(index, block, x)``."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for i, block in enumerate(model.blocks):
        x = block_fn(i, block, x)
    return model.forward_head(model.norm(x))


def adaptformer_adapter(p: dict, x: torch.Tensor, scale: float, dropout: float, training: bool):
    """Their ``Adapter.forward(x, add_residual=False)``, layer-norm option 'none'."""
    down = F.relu(F.linear(x, p["down.weight"], p["down.bias"]))
    down = F.dropout(down, p=dropout, training=training)
    return F.linear(down, p["up.weight"], p["up.bias"]) * scale


def adaptformer_block(
    block: nn.Module, p: dict, x: torch.Tensor, scale: float, training: bool, dropout: float = 0.1
):
    """Their parallel ``Block.forward`` on a timm block (timm's ``ls1``/``ls2`` on the branches); their
    ``Adapter(dropout=0.1)``."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    adapt_x = adaptformer_adapter(p, x, scale, dropout, training)
    residual = x
    x = block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    x = x + adapt_x
    return residual + x


def perturb_adapters_(model: nn.Module, std: float = 0.2) -> None:
    """Noise on the adapters only (the head stays what the reference model has)."""
    kinds = (BottleneckAdapter, PlusAdapter)
    perturb_(
        model, std=std, params=[p for m in model.modules() if isinstance(m, kinds) for p in m.parameters()]
    )


def adapter_weights(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Block ``index``'s adapter tensors, by their names inside the adapter module."""
    found = [m for m in model.blocks[index].modules() if isinstance(m, (BottleneckAdapter, PlusAdapter))]
    assert len(found) == 1
    return {n: t.detach() for n, t in found[0].named_parameters()}


@pytest.mark.parametrize("train", [False, True])
def test_adaptformer_matches_the_authors_block(train):
    """fp64, 1e-10: eval with the default dropout 0.1 (inactive), and train mode with drop-path 0.5 and
    layer scale (same seed, same drop-path masks; the adapter dropout off on both sides, since the two
    forwards draw its mask at another point of the RNG stream)."""
    torch.manual_seed(0)
    kwargs = dict(drop_path_rate=0.5, init_values=0.3) if train else {}
    theirs = fp64_vit(**kwargs).train(train)
    ours = copy.deepcopy(theirs)
    petl_zoo.create("adapter", ours, **({"dropout": 0.0} if train else {}))
    assert ours.petl_method.config.dropout == (0.0 if train else 0.1)
    assert ours.petl_method.config.adapter_input == "residual"
    assert isinstance(ours.blocks[0].norm2, ResidualTap)
    perturb_adapters_(ours)
    x = images64()
    torch.manual_seed(1)
    out = ours(x)
    torch.manual_seed(1)
    ref = vit_forward(
        theirs,
        x,
        lambda i, b, h: adaptformer_block(b, adapter_weights(ours, i), h, 0.1, train, 0.0 if train else 0.1),
    )
    assert (out - vit_forward(theirs, x, lambda i, b, h: b(h))).abs().max() > 1e-3  # a visible adapter
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_adaptformer_default_dropout_is_the_authors():
    """Their ``Adapter(dropout=0.1)``: a dropout of the hidden units between the activation and ``up``,
    active in training only; Adapter+ and Houlsby keep none (Adapter+'s base config: dropout 0)."""
    from petl_zoo.methods.adapter import BottleneckAdapter

    model = petl_zoo.create("adapter", tiny_host("vit"))
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    assert adapters and all(isinstance(a.dropout, nn.Dropout) and a.dropout.p == 0.1 for a in adapters)
    x = torch.randn(4, 16, adapters[0].down.in_features)
    adapters[0].up.weight.data.normal_()
    adapters[0].train()
    assert not torch.equal(adapters[0](x, None), adapters[0](x, None))
    adapters[0].eval()
    assert torch.equal(adapters[0](x, None), adapters[0](x, None))
    for style in ("plus", "sequential"):
        assert AdapterConfig(style=style).dropout == 0.0


def _block_io(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """(block, input, output) of every block in one forward."""
    from petl_zoo.targets import iter_blocks

    seen = []
    handles = [
        info.module.register_forward_hook(lambda m, a, out: seen.append((m, a[0], out)))
        for info in iter_blocks(model)
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _adapters_by_block(model: nn.Module) -> list[BottleneckAdapter]:
    from petl_zoo.targets import iter_blocks

    return [
        next(m for m in info.module.modules() if isinstance(m, BottleneckAdapter))
        for info in iter_blocks(model)
    ]


@pytest.mark.parametrize("host", ["vit", "deit3", "eva02", "beit", "swin", "swinv2", "swinv2_cr"])
def test_residual_adapter_sits_outside_drop_path_and_layer_scale(host):
    """Both branches of every block dropped (drop-path 1.0, train mode): the block is ``x + a(x)`` with
    the residual input, the plain identity with the 'norm' input (its adapter is inside the branch).
    SwinV2-Cr's stage-ending ``norm3`` follows the residual add: ``norm3(x + a(x))``."""
    torch.manual_seed(0)
    pristine = tiny_host(host)
    for block in pristine.modules():
        for name in ("drop_path1", "drop_path2"):
            if isinstance(getattr(block, name, None), nn.Module) and hasattr(block, "mlp"):
                setattr(block, name, DropPath(1.0))
    x = torch.randn(2, 3, 32, 32)
    for adapter_input in ("residual", "norm"):
        model = petl_zoo.create(
            "adapter", copy.deepcopy(pristine), adapter_input=adapter_input, dropout=0.0
        ).train()
        perturb_(model, std=0.2)
        with torch.no_grad():
            for (block, inp, out), adapter in zip(_block_io(model, x), _adapters_by_block(model)):
                update = adapter(inp, None) if adapter_input == "residual" else torch.zeros_like(inp)
                assert update.abs().max() > 0 or adapter_input == "norm"
                norm3 = getattr(block, "norm3", nn.Identity())
                torch.testing.assert_close(out, norm3(inp + update), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("host", ["deit3", "eva02", "beit"])
def test_residual_adapter_skips_the_hosts_layer_scale(host):
    """Layer scales at 0 switch the MLP branch off (eval): the residual adapter still adds ``a(x)``."""
    torch.manual_seed(0)
    model = petl_zoo.create("adapter", tiny_host(host, init_values=0.1)).eval()
    perturb_(model, std=0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):
                p.zero_()
        x = torch.randn(2, 3, 32, 32)
        for (_, inp, out), adapter in zip(_block_io(model, x), _adapters_by_block(model)):
            torch.testing.assert_close(out, inp + adapter(inp, None), atol=1e-6, rtol=1e-6)


def adapter_plus_block(block: nn.Module, p: dict, x: torch.Tensor, drop_path: nn.Module) -> torch.Tensor:
    """Their ``AdapterBlock.forward_post`` with the Adapter+ module (GELU, no norm, channel scaling)."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    h = F.linear(F.gelu(F.linear(x, p["down.weight"], p["down.bias"])), p["up.weight"], p["up.bias"])
    return drop_path(h) * p["scale"] + x


@pytest.mark.parametrize("train", [False, True])
def test_adapter_plus_matches_the_authors_module(train):
    torch.manual_seed(0)
    theirs = fp64_vit(drop_path_rate=0.1 if train else 0.0).train(train)
    ours = copy.deepcopy(theirs)
    petl_zoo.create("adapter", ours, style="plus")
    cfg = ours.petl_method.config
    assert (cfg.act, cfg.drop_path, cfg.adapter_input, cfg.resolved_scale) == ("gelu", 0.1, None, 1.0)
    perturb_adapters_(ours)
    x = images64()
    torch.manual_seed(1)
    out = ours(x)
    torch.manual_seed(1)
    drop = DropPath(0.1).train(train)
    ref = vit_forward(theirs, x, lambda i, b, h: adapter_plus_block(b, adapter_weights(ours, i), h, drop))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_adapter_plus_init_and_count():
    torch.manual_seed(0)
    model = petl_zoo.create("adapter", tiny_host("vit"), style="plus")
    found = [m for m in model.modules() if isinstance(m, PlusAdapter)]
    assert len(found) == len(model.blocks)
    for plus in found:
        assert torch.equal(plus.scale, torch.ones(48))
        for layer in (plus.down, plus.up):
            assert layer.weight.abs().max() <= 0.02 and 0.005 < layer.weight.std() < 0.012
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert isinstance(plus.act, nn.GELU) and plus.drop_path.drop_prob == 0.1
    with torch.device("meta"):
        base = timm.create_model("vit_base_patch16_224", num_classes=47)
    counts = {}
    for style in ("parallel", "plus"):
        model = petl_zoo.create("adapter", copy.deepcopy(base), style=style, dim=8)
        counts[style] = petl_zoo.trainable_parameters(model)["method"]
    assert counts == {"parallel": 156_768, "plus": 165_984}


@pytest.mark.parametrize(
    "options, match",
    [
        (
            {"style": "sequential", "adapter_input": "norm"},
            "adapter_input='norm' applies to style='parallel' only",
        ),
        ({"style": "plus", "adapter_input": "residual"}, "applies to style='parallel' only"),
        ({"style": "plus", "targets": ("mlp", "attn")}, r"style='plus' sits after the MLP only"),
        ({"adapter_input": "pre"}, "bad value 'pre' for option 'adapter_input'"),
        ({"drop_path": 1.0}, r"drop_path must be in \[0, 1\)"),
    ],
)
def test_options_are_validated(options, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig.from_options("adapter", **options)


def test_resolved_values_are_recorded():
    assert AdapterConfig().to_dict() == {
        "dim": 8,
        "scale": None,
        "style": "parallel",
        "targets": ["mlp"],
        "act": "relu",
        "dropout": 0.1,
        "adapter_input": "residual",
        "drop_path": 0.0,
    }
    assert AdapterConfig(style="sequential").adapter_input is None


def test_residual_attn_target_and_windowed_post_norm():
    model = petl_zoo.create("adapter", tiny_host("vit"), targets=("mlp", "attn"))
    assert isinstance(model.blocks[0].norm1, ResidualTap) and isinstance(model.blocks[0].norm2, ResidualTap)
    swin = petl_zoo.create("adapter", tiny_host("swinv2"))  # post-norm: the tap is the MLP itself
    assert isinstance(swin.layers[0].blocks[0].mlp, ResidualTap)
    with pytest.raises(ValueError, match="feeds its attention windows; use targets=\\('mlp',\\)"):
        petl_zoo.create("adapter", tiny_host("swinv2"), targets=("attn",))


@pytest.mark.parametrize("method, options", [("adapter", {}), ("pear", {})])
def test_folders_without_adapter_input_load_as_the_norm_form(method, options, tmp_path):
    """An adapter saved before ``adapter_input`` existed ran on norm2(x): it loads in that form, exactly."""
    torch.manual_seed(0)
    pristine = tiny_host("vit").eval()
    x = torch.randn(2, 3, 32, 32)
    old = petl_zoo.create(method, copy.deepcopy(pristine), adapter_input="norm", **options).eval()
    perturb_(old)
    petl_zoo.save_adapter(old, tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["config"]["adapter_input"]
    path.write_text(json.dumps(saved))
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "old").eval()
    assert fresh.petl_method.config.adapter_input == "norm"
    with torch.no_grad():
        assert torch.equal(fresh(x), old(x))
    new = petl_zoo.create(method, copy.deepcopy(pristine), **options).eval()
    perturb_(new)
    petl_zoo.save_adapter(new, tmp_path / "new")
    assert (
        json.loads((tmp_path / "new" / "adapter_config.json").read_text())["config"]["adapter_input"]
        == "residual"
    )
    again = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "new").eval()
    with torch.no_grad():
        assert torch.equal(again(x), new(x))


def test_pear_default_adapter_is_the_residual_adaptformer():
    """Before pruning, Pear's adapter base computes what ``adapter`` does with the same weights."""
    torch.manual_seed(0)
    pristine = tiny_host("deit3").eval()
    pear = petl_zoo.create("pear", copy.deepcopy(pristine))
    adapter = petl_zoo.create("adapter", copy.deepcopy(pristine))
    perturb_(pear, std=0.2)
    with torch.no_grad():
        for src, dst in zip(_adapters_by_block(pear), _adapters_by_block(adapter)):
            dst.load_state_dict(src.state_dict())
        dst_head, src_head = adapter.get_classifier(), pear.get_classifier()
        dst_head.load_state_dict(src_head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pear(x), adapter(x), atol=0, rtol=0)
        assert (pear(x) - pristine(x)).abs().max() > 1e-4


def test_paper_plus_preset_holds_the_authors_dims():
    from petl_zoo.presets import available_presets, load_preset

    assert "paper_plus" in available_presets("adapter")
    preset = load_preset("adapter", "paper_plus")
    dims = {task: preset.for_task(task)[0]["dim"] for task in preset.tasks}
    assert len(dims) == 19 and dims["cifar"] == 1 and dims["resisc45"] == 32 and dims["dmlab"] == 8
    options, recipe = preset.for_task("svhn")
    assert options == {
        "style": "plus",
        "act": "gelu",
        "dropout": 0.0,
        "drop_path": 0.1,
        "scale": 1.0,
        "dim": 16,
    }
    assert recipe["drop_path"] == 0.1 and recipe["seed"] == 18
    model = petl_zoo.create("adapter", tiny_host("vit"), **options)
    assert petl_zoo.trainable_parameters(model)["method"] == 2 * (48 * 16 + 16 + 16 * 48 + 48 + 48)


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize(
    "options", [{"style": "plus"}, {"targets": ("mlp", "attn")}, {"adapter_input": "norm"}], ids=str
)
def test_non_default_forms_on_every_host(host, options, tmp_path):
    """The contract checks for the forms the contract test (defaults only) does not build."""
    from test_contract import batches, check_gradients, check_sites_called, check_trainable

    torch.manual_seed(0)
    pristine = tiny_host(host).eval()
    model = copy.deepcopy(pristine)
    try:
        petl_zoo.create("adapter", model, **options)
    except ValueError as err:  # residual attention on windowed post-norm hosts only
        assert options.get("targets") and host in ("swinv2", "swinv2_cr"), err
        return
    data = batches()
    perturb_(model)
    check_trainable(model)
    check_gradients(model, data[1])
    check_sites_called(model, data[0][0])
    model.eval()
    with torch.no_grad():
        tuned = model(data[0][0])
        assert (tuned - pristine(data[0][0])).abs().max() > 1e-6
    petl_zoo.save_adapter(model, tmp_path / "ad")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(fresh(data[0][0]), tuned)
    with pytest.raises(ValueError, match="method 'adapter' cannot be merged: "):
        petl_zoo.merge(model)
    bf16 = petl_zoo.create("adapter", copy.deepcopy(pristine).to(torch.bfloat16), **options)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
