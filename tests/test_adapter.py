"""Adapters against their authors' math: AdaptFormer (residual input, drop-path and layer scale on the MLP
branch only), AdaptFormer's sequential variant and Houlsby (on the branch output, after layer scale and
drop-path) and Adapter+ (post-block, channel scale, own drop-path); options, counts, old folders.

The authors' code, re-hosted in our words on timm blocks with our weights copied in:
- AdaptFormer (ShoufaChen/AdaptFormer @ 6967d67): ``models/adapter.py: Adapter.forward`` with
  ``adapter_layernorm_option="none"``, ``add_residual=False`` (``up(dropout(ReLU(down(x)))) * scale``),
  and ``models/custom_modules.py: Block.forward`` with ``ffn_option="parallel"``: ``adapt_x`` from the
  residual stream before ``norm2``, added to ``drop_path(mlp(norm2(x)))``. Their block has no layer
  scale; the re-hosted block keeps timm's ``ls2`` on the MLP branch, like the drop-path. With
  ``ffn_option="sequential"``: ``x = adaptmlp(drop_path(mlp(norm2(x))))`` (``add_residual=True``), then
  ``residual + x``.
- Adapter+ (visinf/adapter_plus @ 191c4ab): ``adapter_plus/vit_adapter.py: Adapter.forward``
  (``norm_a`` = Identity, ``drop_path_a(bottleneck(x)) * scaling``, plus ``skip``) and
  ``AdapterBlock.forward_post`` (``x = adapter(x, skip=x)`` after the block); Houlsby:
  ``AdapterBlock.forward_houlsby`` (L294-298: ``y = drop_path1(ls1(attn(norm1(x))))``,
  ``x = x + adapter_attn(y, skip=y)``, the same on the MLP branch) with ``conf/adapter/houlsby.yaml``
  (GELU, no norm, ``scaling: 1.0``, Houlsby init, adapter drop-path 0.1 from ``base_adapter.yaml``).
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
from petl_zoo.methods.adapter import (
    AdapterConfig,
    BottleneckAdapter,
    BranchTap,
    HoulsbyAdapter,
    PlusAdapter,
    ResidualInject,
    ResidualTap,
)


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
    kinds = (BottleneckAdapter, HoulsbyAdapter)
    perturb_(
        model, std=std, params=[p for m in model.modules() if isinstance(m, kinds) for p in m.parameters()]
    )


def adapter_weights(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Block ``index``'s adapter tensors, by their names inside the adapter module."""
    found = [m for m in model.blocks[index].modules() if isinstance(m, (BottleneckAdapter, HoulsbyAdapter))]
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
    for style in ("plus", "houlsby"):
        assert AdapterConfig(style=style).dropout == 0.0
    assert AdapterConfig(style="sequential").dropout == 0.1  # AdaptFormer's sequential: the same module


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


def houlsby_bottleneck(p: dict, y: torch.Tensor, drop_path: nn.Module) -> torch.Tensor:
    """Their ``Adapter.forward(y, skip=y)`` in the Houlsby config: no norm, GELU, ``scaling`` 1.0."""
    h = F.linear(F.gelu(F.linear(y, p["down.weight"], p["down.bias"])), p["up.weight"], p["up.bias"])
    return drop_path(h) * 1.0 + y


def houlsby_block(block: nn.Module, attn_p: dict, mlp_p: dict, x: torch.Tensor, drop_path: nn.Module):
    """Their ``AdapterBlock.forward_houlsby``: each adapter reads its branch after ``ls`` and drop-path."""
    y = block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    x = x + houlsby_bottleneck(attn_p, y, drop_path)
    y = block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x + houlsby_bottleneck(mlp_p, y, drop_path)


def adaptformer_sequential_block(block: nn.Module, p: dict, x: torch.Tensor, training: bool, dropout: float):
    """Their ``Block.forward`` with ``ffn_option='sequential'``: ``adaptmlp`` (with its residual) on the
    MLP branch after drop-path (timm's ``ls1``/``ls2`` on the branches), ``s = 0.1``."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    residual = x
    y = block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    y = y + adaptformer_adapter(p, y, 0.1, dropout, training)
    return residual + y


def branch_weights(model: nn.Module, index: int, target: str) -> dict[str, torch.Tensor]:
    """The adapter on ``target`` (``attn`` / ``mlp``) of block ``index``, held by its :class:`BranchTap`."""
    tap = getattr(model.blocks[index], target)
    assert isinstance(tap, BranchTap)
    return {n: t.detach() for n, t in tap.sequential["adapter"].named_parameters()}


def host64(host: str, drop_path: float) -> nn.Module:
    """A tiny fp64 ViT-family host; ``drop_path`` > 0 puts ``DropPath`` on both branches of every block."""
    model = fp64_vit() if host == "vit" else tiny_host(host).double()
    for block in model.blocks:
        if drop_path > 0:
            block.drop_path1, block.drop_path2 = DropPath(drop_path), DropPath(drop_path)
    return model


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("host", ["vit", "deit3", "dinov2_reg"])
def test_houlsby_matches_the_authors_block(host, train):
    """fp64, 1e-10, plain ViT and layer-scale hosts; train mode: backbone drop-path 0.2 and the adapters'
    own 0.1, the same seed (their drop-path draws come in the same order as ours)."""
    torch.manual_seed(0)
    theirs = host64(host, 0.2 if train else 0.0).train(train)
    ours = copy.deepcopy(theirs)
    petl_zoo.create("adapter", ours, style="houlsby")
    cfg = ours.petl_method.config
    assert (cfg.targets, cfg.act, cfg.dropout, cfg.drop_path, cfg.adapter_input, cfg.resolved_scale) == (
        ("attn", "mlp"),
        "gelu",
        0.0,
        0.1,
        "branch",
        1.0,
    )
    perturb_adapters_(ours)
    x = images64()
    torch.manual_seed(1)
    out = ours(x)
    torch.manual_seed(1)
    drop = DropPath(0.1).train(train)
    ref = vit_forward(
        theirs,
        x,
        lambda i, b, h: houlsby_block(
            b, branch_weights(ours, i, "attn"), branch_weights(ours, i, "mlp"), h, drop
        ),
    )
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    if host != "vit" and not train:  # the old form (inside the layer scale) is another model here
        old = copy.deepcopy(theirs)
        petl_zoo.create("adapter", old, style="houlsby", adapter_input="sublayer")
        old.load_state_dict(ours.state_dict())
        assert (old(x) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("host", ["vit", "deit3"])
def test_adaptformer_sequential_matches_the_authors_block(host, train):
    """fp64, 1e-10: eval with the default dropout 0.1 (inactive); train mode with backbone drop-path 0.5
    (the adapter dropout off on both sides, as in the parallel test)."""
    torch.manual_seed(0)
    theirs = host64(host, 0.5 if train else 0.0).train(train)
    ours = copy.deepcopy(theirs)
    petl_zoo.create("adapter", ours, style="sequential", **({"dropout": 0.0} if train else {}))
    cfg = ours.petl_method.config
    assert (cfg.targets, cfg.act, cfg.adapter_input, cfg.resolved_scale) == (("mlp",), "relu", "branch", 0.1)
    assert cfg.dropout == (0.0 if train else 0.1) and cfg.drop_path == 0.0
    perturb_adapters_(ours)
    x = images64()
    torch.manual_seed(1)
    out = ours(x)
    torch.manual_seed(1)
    ref = vit_forward(
        theirs,
        x,
        lambda i, b, h: adaptformer_sequential_block(
            b, branch_weights(ours, i, "mlp"), h, train, cfg.dropout
        ),
    )
    assert (out - vit_forward(theirs, x, lambda i, b, h: b(h))).abs().max() > 1e-3  # a visible adapter
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("style", ["houlsby", "sequential"])
@pytest.mark.parametrize("host", ["vit", "deit3", "swinv2"])
def test_branch_adapters_are_each_called_once_per_forward(host, style):
    """Every adapter runs once per forward, from the inject on its branch's drop-path, on the branch
    output (what the drop-path returned)."""
    torch.manual_seed(0)
    model = petl_zoo.create("adapter", tiny_host(host), style=style).eval()
    injects = [m for m in model.modules() if isinstance(m, ResidualInject)]
    adapters = [m for m in model.modules() if isinstance(m, (BottleneckAdapter, HoulsbyAdapter))]
    n_blocks = len(_block_io(model, torch.randn(1, 3, 32, 32)))
    per_block = 2 if style == "houlsby" else 1
    assert len(adapters) == len(injects) == per_block * n_blocks
    seen: dict[int, list[torch.Tensor]] = {id(a): [] for a in adapters}
    branch: dict[int, list[torch.Tensor]] = {id(i.tap.sequential["adapter"]): [] for i in injects}
    hooks = [a.register_forward_hook(lambda m, args, out: seen[id(m)].append(args[0])) for a in adapters]
    hooks += [
        i.base.register_forward_hook(
            lambda m, args, out, k=id(i.tap.sequential["adapter"]): branch[k].append(out)  # noqa: B008
        )
        for i in injects
    ]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert all(len(v) == 1 for v in seen.values())
    for key, inputs in seen.items():
        assert inputs[0] is branch[key][0]


def test_houlsby_init():
    torch.manual_seed(0)
    pristine = tiny_host("deit3").eval()
    model = petl_zoo.create("adapter", copy.deepcopy(pristine), style="houlsby").eval()
    found = [m for m in model.modules() if isinstance(m, HoulsbyAdapter)]
    assert len(found) == 2 * len(model.blocks) and not any(isinstance(m, PlusAdapter) for m in found)
    for adapter in found:
        assert adapter.scale == 1.0 and isinstance(adapter.act, nn.GELU)
        assert adapter.drop_path.drop_prob == 0.1 and isinstance(adapter.dropout, nn.Identity)
        for layer in (adapter.down, adapter.up):
            assert layer.weight.abs().max() <= 0.02 and 0.005 < layer.weight.std() < 0.012
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # Houlsby init: not the identity
        assert (model(x) - pristine(x)).abs().max() > 0


def test_counts_on_vit_base():
    """ViT-B/16, dim 8, head excluded: one adapter per block for the AdaptFormer styles, two for Houlsby
    (attention and MLP), one plus the 768 channel scales for Adapter+."""
    with torch.device("meta"):
        base = timm.create_model("vit_base_patch16_224", num_classes=47)
    counts = {}
    for style in ("parallel", "sequential", "houlsby", "plus"):
        model = petl_zoo.create("adapter", copy.deepcopy(base), style=style, dim=8)
        counts[style] = petl_zoo.trainable_parameters(model)["method"]
    one = 768 * 8 + 8 + 8 * 768 + 768
    assert counts == {"parallel": 156_768, "sequential": 156_768, "houlsby": 313_536, "plus": 165_984}
    assert counts["houlsby"] == 2 * 12 * one


def test_adapter_plus_init():
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


@pytest.mark.parametrize(
    "options, match",
    [
        (
            {"style": "sequential", "adapter_input": "norm"},
            "adapter_input='norm' does not apply to style='sequential', which takes 'branch' or 'sublayer'",
        ),
        ({"style": "houlsby", "adapter_input": "residual"}, "which takes 'branch' or 'sublayer'"),
        ({"adapter_input": "branch"}, "style='parallel', which takes 'residual' or 'norm'"),
        ({"style": "plus", "adapter_input": "residual"}, "style='plus', which reads the block output"),
        ({"style": "plus", "targets": ("attn", "mlp")}, r"style='plus' sits after the MLP only"),
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
    assert AdapterConfig(style="houlsby").to_dict() == {
        "dim": 8,
        "scale": None,
        "style": "houlsby",
        "targets": ["attn", "mlp"],
        "act": "gelu",
        "dropout": 0.0,
        "adapter_input": "branch",
        "drop_path": 0.1,
    }
    sequential = AdapterConfig(style="sequential")
    assert (sequential.targets, sequential.adapter_input, sequential.dropout) == (("mlp",), "branch", 0.1)
    assert sequential.resolved_scale == 0.1 and AdapterConfig(style="plus").adapter_input is None


def test_old_sequential_folders_load_in_their_form(tmp_path):
    """A sequential adapter saved before it took ``adapter_input`` (saved as None, scale None = 1.0) ran
    on the sub-layer output inside layer scale and drop-path: it loads in that form, exactly."""
    torch.manual_seed(0)
    pristine = tiny_host("deit3").eval()
    x = torch.randn(2, 3, 32, 32)
    old = petl_zoo.create(
        "adapter",
        copy.deepcopy(pristine),
        style="sequential",
        adapter_input="sublayer",
        scale=1.0,
        dropout=0.0,
    ).eval()
    assert isinstance(old.blocks[0].mlp.sequential["adapter"], BottleneckAdapter)
    assert not isinstance(old.blocks[0].drop_path2, ResidualInject)
    perturb_(old)
    petl_zoo.save_adapter(old, tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["config"].update(adapter_input=None, scale=None)
    path.write_text(json.dumps(saved))
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "old").eval()
    cfg = fresh.petl_method.config
    assert (cfg.adapter_input, cfg.resolved_scale, cfg.dropout) == ("sublayer", 1.0, 0.0)
    with torch.no_grad():
        assert torch.equal(fresh(x), old(x))


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
    "options",
    [
        {"style": "plus"},
        {"targets": ("mlp", "attn")},
        {"adapter_input": "norm"},
        {"style": "houlsby"},  # the branch taps on both branches (AdaptFormer's sequential: the MLP one)
    ],
    ids=str,
)
def test_non_default_forms_on_every_host(host, options, tmp_path):
    """The contract checks for the forms the contract test (defaults only) does not build."""
    from test_contract import batches, check_gradients, check_sites_called, check_trainable

    from petl_zoo.targets import classifier_modules

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
    # on a bf16 host every adapter tensor is placed alike (the adapter dtype rule of petl_zoo.layers) and
    # the outputs keep the host's dtype
    bf16 = petl_zoo.create("adapter", copy.deepcopy(pristine).to(torch.bfloat16), **options)
    heads = {id(p) for head in classifier_modules(bf16) for p in head.parameters()}
    method_dtypes = {p.dtype for p in bf16.parameters() if p.requires_grad and id(p) not in heads}
    assert len(method_dtypes) == 1 and method_dtypes <= {torch.bfloat16, torch.float32}
    with torch.no_grad():
        assert bf16(data[0][0].to(torch.bfloat16)).dtype == torch.bfloat16
