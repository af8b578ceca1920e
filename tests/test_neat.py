"""NEAT: identity at init, first-step gradients, forward vs the paper's formula (every activation, vanilla
and hidden pairs), no delta_W built in training, merge/unmerge, save/load, counts, HF peft PEANuT parity."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from conftest import BUILDERS, ShapeRecorder, perturb_, tiny_swin, tiny_vit
from torch import nn
from torch.nn import functional as F

import petl_zoo
from petl_zoo.layers import AdaptedLinear, adapted_linears
from petl_zoo.methods.neat import NeatConfig, NeatDelta
from petl_zoo.targets import iter_blocks, linear_sites

ACTS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sin": torch.sin}


def reference_delta_w(w0: torch.Tensor, delta: NeatDelta) -> torch.Tensor:
    """``delta_W`` straight from the paper's formula in the ``[in, r]`` layout, in float64."""
    act = ACTS[delta.act_name]
    a, b = delta.A.detach().double(), delta.B.detach().double()
    h = act(w0.double().T @ a.T)  # [in, r]
    stack = []
    for e in delta.encoders:
        stack.append(h)
        h = act(h @ e.weight.detach().double().T)
    for d in delta.decoders:
        h = act(h @ d.weight.detach().double().T) + stack.pop()
    return delta.scale * (h @ b.T).T  # [out, in]


def reference_weight(layer: AdaptedLinear, w0: torch.Tensor) -> torch.Tensor:
    """``W0 + delta_W`` for every delta of ``layer`` (float64)."""
    weight = w0.double().clone()
    for name, delta in layer.deltas.items():
        start, stop = layer.slices[name]
        weight[start:stop] += reference_delta_w(w0[start:stop], delta)
    return weight


def neat_model(family: str = "vit", seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return petl_zoo.create("neat", BUILDERS[family](), **options)


def closed_form_count(
    model: nn.Module,
    rank: int = 7,
    mlp_rank: int = 16,
    depth: int = 0,
    mlp: bool = False,
    targets: tuple[str, ...] = ("q", "v"),
) -> int:
    """``2 * out * r + 2 * depth * r^2`` per adapted matrix, from the architecture alone."""
    total = 0
    for b in iter_blocks(model):
        d = b.dim
        outs = {"q": d, "k": d, "v": d, "qkv": 3 * d, "proj": d, "fc1": 4 * d, "fc2": d}
        names = list(targets) + ([t for t in ("fc1", "fc2") if t not in targets] if mlp else [])
        for t in names:
            r = mlp_rank if t in ("fc1", "fc2") else rank
            total += 2 * outs[t] * r + 2 * depth * r * r
    return total


# -- init and gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"depth": 2, "act": "tanh"}, {"mlp": True, "act": "sin"}], ids=str)
def test_identity_at_init(family, images, options):
    torch.manual_seed(0)
    reference = BUILDERS[family]().eval()
    model = petl_zoo.create("neat", copy.deepcopy(reference), **options).eval()
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


@pytest.mark.parametrize("depth", [0, 2])
def test_first_step_gradients(family, images, depth):
    model = neat_model(family, depth=depth, mlp=True)
    F.cross_entropy(model(images), torch.tensor([0, 3])).backward()
    deltas = [m for m in model.modules() if isinstance(m, NeatDelta)]
    assert deltas
    for delta in deltas:
        assert delta.A.grad is not None and torch.count_nonzero(delta.A.grad) == 0
        for layer in [*delta.encoders, *delta.decoders]:
            assert torch.count_nonzero(layer.weight.grad) == 0
        assert delta.B.grad is not None and delta.B.grad.abs().sum() > 0
    # a step on B makes the gradient of A flow (through H) on the next step
    with torch.no_grad():
        for delta in deltas:
            delta.B.sub_(0.1 * delta.B.grad)
    model.zero_grad()
    F.cross_entropy(model(images), torch.tensor([0, 3])).backward()
    assert all(delta.A.grad.abs().sum() > 0 for delta in deltas)


def test_init_distribution():
    delta = NeatDelta(in_features=20, out_features=300, rank=7, depth=1)
    bound = 1.0 / math.sqrt(300)  # nn.Linear(out, r) default: kaiming-uniform a=sqrt(5), fan-in = out
    assert delta.A.shape == (7, 300) and delta.B.shape == (300, 7)
    assert delta.A.abs().max() <= bound and delta.A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(delta.B) == 0
    assert delta.encoders[0].weight.shape == (7, 7) and delta.encoders[0].bias is None
    assert delta.decoders[0].weight.abs().max() <= 1.0 / math.sqrt(7)


# -- the forward against the formula -----------------------------------------------------------------


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("act", list(ACTS))
def test_forward_matches_formula(family, act, depth):
    model = neat_model(family, act=act, depth=depth, scale=0.7, targets=("q", "v", "proj"), mlp=True)
    perturb_(model, std=0.1)
    g = torch.Generator().manual_seed(3)
    layers = list(adapted_linears(model))
    assert len(layers) == 4 * len(iter_blocks(model))  # qkv, proj, fc1, fc2
    for _, layer in layers:
        w0 = layer.base.weight.detach()
        x = torch.randn(2, 5, layer.in_features, generator=g)
        expected = F.linear(x.double(), reference_weight(layer, w0), layer.base.bias.detach().double())
        torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [0, 2])
def test_model_matches_plain_model_with_formula_weights(family, images, depth):
    """The whole patched model equals an unpatched timm model whose weights are W0 + delta_W."""
    model = neat_model(family, depth=depth, act="gelu", mlp=True).eval()
    perturb_(model, std=0.1)
    torch.manual_seed(0)
    plain = BUILDERS[family]().eval()
    plain.get_classifier().load_state_dict(model.get_classifier().state_dict())
    with torch.no_grad():
        for path, layer in adapted_linears(model):
            target = plain.get_submodule(path)
            assert torch.equal(target.weight, layer.base.weight)
            target.weight.copy_(reference_weight(layer, layer.base.weight).float())
        torch.testing.assert_close(model(images), plain(images), atol=1e-5, rtol=1e-5)


def test_training_forward_builds_no_delta_w():
    """Training computes H ([r, in]) and never a [out, in] delta_W nor a per-token weight."""
    model = neat_model("vit", rank=3, targets=("q", "v"))  # q/v slices are 48 x 48; tokens 2 * 17 = 34
    perturb_(model, std=0.1)
    recorder = ShapeRecorder()
    images = torch.randn(2, 3, 32, 32)
    with recorder:
        model(images).sum().backward()
    produced = [s for _, s in recorder.shapes]
    assert (3, 48) in produced  # H for q and v
    assert not [(f, s) for f, s in recorder.shapes if s[-2:] == (48, 48)]
    # the formula (what peft's PEANuT does) would be caught by the same check
    with recorder:
        model.blocks[0].attn.qkv.deltas["neat_q"].delta_weight(model.blocks[0].attn.qkv.base.weight[:48])
    assert [(f, s) for f, s in recorder.shapes if s[-2:] == (48, 48)]


def test_autocast_bf16(images):
    model = neat_model("vit", depth=1).eval()
    perturb_(model, std=0.1)
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.1)


# -- merge, save/load --------------------------------------------------------------------------------


def test_merge_unmerge(family, images):
    model = neat_model(family, depth=1, mlp=True).eval()
    perturb_(model, std=0.1)
    originals = {path: layer.base.weight.detach().clone() for path, layer in adapted_linears(model)}
    with torch.no_grad():
        before = model(images)
        petl_zoo.merge(model)
        assert petl_zoo.is_merged(model)
        for path, layer in adapted_linears(model):
            expected = reference_weight(layer, originals[path]).float()
            torch.testing.assert_close(layer.base.weight, expected, atol=1e-6, rtol=1e-6)
        merged = model(images)
        torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
        # merging twice is an error through the API and a no-op per layer, never a second update
        with pytest.raises(ValueError, match="already merged"):
            petl_zoo.merge(model)
        for _, layer in adapted_linears(model):
            layer.merge()
        torch.testing.assert_close(model(images), merged, atol=0, rtol=0)
        for path, layer in adapted_linears(model):
            expected = reference_weight(layer, originals[path]).float()
            torch.testing.assert_close(layer.base.weight, expected, atol=1e-6, rtol=1e-6)
        petl_zoo.unmerge(model)
        for path, layer in adapted_linears(model):
            assert torch.equal(layer.base.weight, originals[path])
        torch.testing.assert_close(model(images), before, atol=0, rtol=0)


def test_merge_unload_gives_plain_timm_model(images):
    model = neat_model("vit", act="silu").eval()
    perturb_(model, std=0.1)
    with torch.no_grad():
        before = model(images)
        petl_zoo.merge(model, unload=True)
        assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
        assert isinstance(model.blocks[0].attn.qkv, nn.Linear)
        torch.testing.assert_close(model(images), before, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(family, images, tmp_path):
    options = {"rank": 3, "depth": 2, "act": "tanh", "scale": 0.5, "mlp": True, "mlp_rank": 5}
    model = neat_model(family, **options).eval()
    perturb_(model, std=0.1)
    petl_zoo.save_adapter(model, tmp_path / "neat")
    torch.manual_seed(0)
    loaded = petl_zoo.load_adapter(BUILDERS[family]().eval(), tmp_path / "neat")
    assert loaded.petl_method.config == NeatConfig(**options)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    saved = petl_zoo.api.read_adapter_config(tmp_path / "neat")
    assert saved["method"] == "neat"
    assert any(k.endswith("deltas.neat_q.encoders.1.weight") for k in saved["tensors"])


# -- counts, shapes, options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,expected",
    [
        ({}, 258_048),
        ({"rank": 8}, 294_912),
        ({"depth": 2}, 262_752),  # the authors' depth 6
        ({"mlp": True}, 1_732_608),
    ],
    ids=str,
)
def test_vit_base_counts(options, expected):
    with torch.device("meta"):  # shapes only: no weight init, so building ViT-B costs nothing
        model = petl_zoo.create("neat", timm.create_model("vit_base_patch16_224"), **options)
    assert petl_zoo.trainable_parameters(model)["method"] == expected
    assert closed_form_count(model, **options) == expected


@pytest.mark.parametrize(
    "options",
    [{}, {"rank": 2, "depth": 1}, {"mlp": True, "mlp_rank": 3}, {"targets": ("qkv", "fc2")}],
    ids=str,
)
def test_tiny_counts_and_shapes(family, options):
    model = neat_model(family, **options)
    assert petl_zoo.trainable_parameters(model)["method"] == closed_form_count(model, **options)
    cfg = NeatConfig(**options)
    for target in cfg.resolved_targets:
        for site in linear_sites(model, target):
            delta = site.linear.deltas[f"neat_{target}"]
            r = cfg.rank_for(target)
            assert delta.A.shape == (r, site.out_features) and delta.B.shape == (site.out_features, r)
    if family == "swin":  # the two stages differ in width: shapes follow each layer
        target = cfg.resolved_targets[0]
        widths = {site.linear.deltas[f"neat_{target}"].A.shape[1] for site in linear_sites(model, target)}
        assert len(widths) == 2


def test_defaults_and_recipe():
    cfg = NeatConfig()
    assert (cfg.rank, cfg.mlp_rank, cfg.targets, cfg.mlp, cfg.act, cfg.scale, cfg.depth) == (
        7,
        16,
        ("q", "v"),
        False,
        "relu",
        1.0,
        0,
    )
    assert NeatConfig(mlp=True).resolved_targets == ("q", "v", "fc1", "fc2")
    assert NeatConfig(mlp=True, targets=("fc1", "q")).resolved_targets == ("fc1", "q", "fc2")
    method = petl_zoo.registry.get_method("neat")
    assert method.recipe == {"lr": 5e-3} and method.identity_at_init  # the authors' lr (run.sh)
    assert petl_zoo.is_mergeable(petl_zoo.create("neat", tiny_vit(), mlp=True, depth=1))
    assert "VTAB-1K" in (method.__doc__ or "") and "no VTAB-1K numbers" in " ".join(method.__doc__.split())


@pytest.mark.parametrize(
    "options,message",
    [
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"mlp_rank": -2}, "mlp_rank must be a positive integer, got -2"),
        ({"depth": -1}, "depth must be a non-negative integer"),
        ({"act": "swish"}, "'relu', 'gelu', 'silu', 'tanh', 'sin'"),
        ({"scale": float("nan")}, "scale must be a finite non-zero number, got nan"),
        ({"scale": 0}, "scale must be a finite non-zero number, got 0.0"),
        ({"targets": ("q", "out")}, "unknown target 'out' for method 'neat'; valid targets: q, k, v"),
        ({"ranks": 4}, "unknown option 'ranks'"),
    ],
    ids=str,
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        petl_zoo.create("neat", tiny_vit(), **options)


def test_validate_without_from_options():
    with pytest.raises(
        ValueError, match="bad value 'swish' for option 'act'.*'relu', 'gelu', 'silu', 'tanh', 'sin'"
    ):
        NeatConfig(act="swish")
    with pytest.raises(ValueError, match="depth must be a non-negative integer"):
        NeatConfig(depth=-1)
    with pytest.raises(ValueError, match="valid activations"):
        NeatDelta(4, 4, 2, act="elu")
    with pytest.raises(ValueError, match="attach it to a Linear"):
        NeatDelta(4, 4, 2)(torch.zeros(1, 4), None)


# -- training and parity with HF peft's PEANuT ---------------------------------------------------------


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = petl_zoo.create("neat", tiny_swin(), rank=4, depth=1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(
        d.A.abs().sum() > 0 and d.B.abs().sum() > 0 for d in model.modules() if isinstance(d, NeatDelta)
    )


@pytest.mark.parametrize("depth", [0, 2])
def test_matches_peft_peanut(images, depth):
    """Same weights in HF peft's PEANuT (the authors' formula, materialised) and ours on the fused qkv."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("peft.tuners.peanut")
    torch.manual_seed(0)
    ours = petl_zoo.create(
        "neat", tiny_vit().eval(), targets=("qkv",), rank=3, depth=depth, act="gelu", scale=0.5
    )
    perturb_(ours, std=0.1)
    torch.manual_seed(0)
    config = peft.PeanutConfig(r=3, depth=depth, act_fn="gelu", scaling=0.5, target_modules=["qkv"])
    theirs = peft.get_peft_model(tiny_vit().eval(), config).eval()
    with torch.no_grad():
        for i, block in enumerate(ours.blocks):
            delta = block.attn.qkv.deltas["neat_qkv"]
            layer = theirs.base_model.model.blocks[i].attn.qkv
            layer.peanut_A["default"].weight.copy_(delta.A)
            layer.peanut_B["default"].weight.copy_(delta.B)
            for mine, other in zip(delta.encoders, layer.peanut_encoders["default"]):
                other.weight.copy_(mine.weight)
            for mine, other in zip(delta.decoders, layer.peanut_decoders["default"]):
                other.weight.copy_(mine.weight)
        theirs.base_model.model.head.load_state_dict(ours.head.state_dict())
        torch.testing.assert_close(ours(images), theirs(images), atol=1e-5, rtol=1e-5)
