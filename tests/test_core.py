"""Core: registry, options, target resolver, wrappers, LoRA / adapter / baselines, save/load/merge."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import pytest
import timm
import torch
from conftest import BUILDERS, perturb_, tiny_swin, tiny_vit
from torch import nn

import petl_zoo
from petl_zoo.layers import AdaptedLinear, AdaptedModule, PetlModule
from petl_zoo.targets import iter_blocks, linear_sites

# (method, options) pairs exercised on both architectures
CASES = [
    ("lora", {}),
    ("lora", {"rank": 4, "targets": ("q", "k", "v", "proj", "fc1", "fc2"), "alpha": 8.0}),
    ("lora", {"targets": ("qkv",)}),
    ("adapter", {}),
    ("adapter", {"style": "sequential", "targets": ("mlp", "attn")}),
    ("linear", {}),
    ("full", {}),
    ("bitfit", {}),
]


def closed_form_count(method: str, options: dict, model: nn.Module) -> int:
    """Trainable parameter count (head excluded) computed from the architecture alone."""
    blocks = iter_blocks(model)
    if method == "lora":
        r = options.get("rank", 8)
        total = 0
        for b in blocks:
            d = b.dim
            widths = {
                "q": (d, d),
                "k": (d, d),
                "v": (d, d),
                "qkv": (d, 3 * d),
                "proj": (d, d),
                "fc1": (d, 4 * d),
                "fc2": (4 * d, d),
            }
            for t in options.get("targets", ("q", "v")):
                fan_in, fan_out = widths[t]
                total += r * (fan_in + fan_out)
        return total
    if method == "adapter":
        k = options.get("dim", 8)
        n_targets = len(options.get("targets", ("mlp",)))
        return sum(n_targets * (b.dim * k + k + k * b.dim + b.dim) for b in blocks)
    if method == "linear":
        return 0
    if method == "bitfit":
        # per block: norm1 d, qkv 3d, proj d, norm2 d, fc1 4d, fc2 d = 11 d
        per_blocks = sum(11 * b.dim for b in blocks)
        if petl_zoo.targets.model_family(model) == "vit":
            return per_blocks + 2 * blocks[0].dim  # patch_embed.proj.bias, final norm.bias
        dims = sorted({b.dim for b in blocks})
        # patch_embed conv + norm, merging norms (4 * previous width), final norm
        return per_blocks + 2 * dims[0] + sum(4 * d for d in dims[:-1]) + dims[-1]
    if method == "full":
        head = sum(p.numel() for p in model.get_classifier().parameters())
        return sum(p.numel() for p in model.parameters()) - head
    raise AssertionError(method)


@pytest.mark.parametrize("method,options", CASES, ids=lambda v: str(v))
def test_method_contract(family, images, method, options, tmp_path):
    torch.manual_seed(0)
    model = BUILDERS[family]().eval()
    reference = BUILDERS[family]().eval()
    reference.load_state_dict(model.state_dict())
    count_model = BUILDERS[family]()
    expected = closed_form_count(method, options, count_model)
    with torch.no_grad():
        base_out = reference(images)

    petl_zoo.create(method, model, **options)
    out = model(images)
    assert out.shape == (2, 5)
    if petl_zoo.get_method(method).identity_at_init:
        torch.testing.assert_close(out, base_out, atol=1e-6, rtol=0)

    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == expected
    assert counts["head"] == 48 * 5 + 5 if family == "vit" else counts["head"] == 32 * 5 + 5
    assert counts["total"] == counts["method"] + counts["head"]

    # only intended parameters get gradients, and the frozen backbone gets none
    model.train()
    perturb_(model)
    model.zero_grad()
    model(images).sum().backward()
    method_ids = {id(p) for m in model.modules() if isinstance(m, PetlModule) for p in m.parameters()}
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
        if method in ("lora", "adapter"):
            assert p.requires_grad == (id(p) in method_ids or id(p) in head_ids), name
        if method == "bitfit" and id(p) not in head_ids:
            assert p.requires_grad == name.endswith("bias"), name

    # save / load round trip gives identical outputs
    model.eval()
    with torch.no_grad():
        tuned = model(images)
    petl_zoo.save_adapter(model, tmp_path / "ad")
    files = sorted(os.listdir(tmp_path / "ad"))
    assert files == ["adapter.safetensors", "adapter_config.json"]
    fresh = BUILDERS[family]().eval()
    fresh.load_state_dict(reference.state_dict())
    petl_zoo.load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), tuned, atol=1e-6, rtol=0)
    assert petl_zoo.trainable_parameters(fresh) == counts

    # merge where the method is mergeable (the adapter's update depends on the input)
    assert petl_zoo.is_mergeable(model) == (method != "adapter")
    if petl_zoo.is_mergeable(model):
        originals = {
            n: m.base.weight.detach().clone()
            for n, m in model.named_modules()
            if isinstance(m, AdaptedLinear)
        }
        petl_zoo.merge(model)
        with torch.no_grad():
            torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="already merged"):
            petl_zoo.merge(model)
        petl_zoo.unmerge(model)
        for n, m in model.named_modules():
            if isinstance(m, AdaptedLinear):
                torch.testing.assert_close(m.base.weight, originals[n], atol=1e-6, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(model(images), tuned, atol=1e-6, rtol=0)
    else:
        with pytest.raises(
            ValueError,
            match=r"method 'adapter' cannot be merged: .*blocks\.0\.\w+\.\w+\.adapter \(BottleneckAdapter on a module\)",
        ):
            petl_zoo.merge(model)


def test_merge_unload_gives_plain_timm_layers(images):
    model = tiny_vit().eval()
    petl_zoo.create("lora", model, targets=("q", "v", "fc1"))
    perturb_(model)
    with torch.no_grad():
        tuned = model(images)
    petl_zoo.merge(model, unload=True)
    assert not any(isinstance(m, (AdaptedLinear, AdaptedModule)) for m in model.modules())
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    assert petl_zoo.method_of(model) is None
    with torch.no_grad():
        torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=0)


def test_vit_base_counts_match_papers():
    counts = {}
    for method, options in [("lora", {"rank": 8, "targets": ("q", "v")}), ("adapter", {"dim": 8})]:
        model = timm.create_model("vit_base_patch16_224", num_classes=47)
        petl_zoo.create(method, model, **options)
        counts[method] = petl_zoo.trainable_parameters(model)["method"]
        print(f"vit_base_patch16_224 {method} {options}: {counts[method]:,} trainable (head excluded)")
    assert counts["lora"] == 294_912
    assert counts["adapter"] == 12 * (768 * 8 + 8 + 8 * 768 + 768) == 156_768


def test_lora_matches_peft_on_fused_qkv(images):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = tiny_vit().eval()
    theirs = tiny_vit().eval()
    theirs.load_state_dict(ours.state_dict())
    petl_zoo.create("lora", ours, rank=4, alpha=8.0, targets=("qkv",))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], lora_dropout=0.0)
    theirs = peft.get_peft_model(theirs, config).eval()
    g = torch.Generator().manual_seed(3)
    for i, block in enumerate(ours.blocks):
        delta = block.attn.qkv.deltas["lora_qkv"]
        peft_layer = theirs.base_model.model.blocks[i].attn.qkv
        a = torch.randn(delta.lora_A.shape, generator=g)
        b = torch.randn(delta.lora_B.shape, generator=g)
        with torch.no_grad():
            delta.lora_A.copy_(a)
            delta.lora_B.copy_(b)
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), atol=1e-5, rtol=1e-5)


def test_lora_slices_only_touch_their_outputs():
    model = tiny_vit()
    petl_zoo.create("lora", model, targets=("q", "v"))
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, AdaptedLinear)
    assert qkv.slices == {"lora_q": (0, 48), "lora_v": (96, 144)}
    perturb_(model)
    x = torch.randn(3, 48)
    with torch.no_grad():
        diff = qkv(x) - qkv.base(x)
    assert diff[:, 48:96].abs().max() == 0  # k untouched
    assert diff[:, :48].abs().max() > 0 and diff[:, 96:].abs().max() > 0


def test_resolver_on_swin_stages_and_vit_variants():
    swin = tiny_swin()
    blocks = iter_blocks(swin)
    assert [(b.stage, b.dim, b.num_heads, b.head_dim) for b in blocks] == [(0, 16, 1, 16), (1, 32, 2, 16)]
    sites = linear_sites(swin, "v")
    assert [(s.path, s.start, s.stop) for s in sites] == [
        ("layers.0.blocks.0.attn.qkv", 32, 48),
        ("layers.1.blocks.0.attn.qkv", 64, 96),
    ]
    small = timm.create_model("vit_small_patch16_224", img_size=32, depth=2, num_classes=3)
    assert [b.dim for b in iter_blocks(small)] == [384, 384]
    assert linear_sites(small, "fc2")[1].path == "blocks.1.mlp.fc2"


def test_options_are_validated_and_parsed():
    model = tiny_vit()
    petl_zoo.create("lora", model, rank="4", targets="q,k")
    method = petl_zoo.method_of(model)
    assert method.config.rank == 4 and method.config.targets == ("q", "k")
    with pytest.raises(ValueError, match=r"unknown method 'lorra'.*did you mean lora.*valid methods"):
        petl_zoo.create("lorra", tiny_vit())
    with pytest.raises(ValueError, match=r"unknown target 'z' for method 'lora'; valid targets: q, k, v"):
        petl_zoo.create("lora", tiny_vit(), targets=("q", "z"))
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        petl_zoo.create("lora", tiny_vit(), rank=0)
    with pytest.raises(ValueError, match=r"unknown option 'ranks' for method 'lora'; valid options: alpha"):
        petl_zoo.create("lora", tiny_vit(), ranks=4)
    with pytest.raises(ValueError, match=r"bad value 'big' for option 'rank'"):
        petl_zoo.create("lora", tiny_vit(), rank="big")
    with pytest.raises(
        ValueError, match=r"bad value 'diagonal' for option 'style'.*'parallel', 'sequential'"
    ):
        petl_zoo.create("adapter", tiny_vit(), style="diagonal")
    with pytest.raises(ValueError, match="already carries method 'lora'"):
        petl_zoo.create("adapter", model)


def test_swiglu_fc1_and_unsupported_architecture():
    swiglu = tiny_vit(mlp_layer=timm.layers.SwiGLU)
    petl_zoo.create("lora", swiglu, targets=("fc1",))  # SwiGLU's fc1 is its two input projections
    wrapped = sorted(n for n, m in swiglu.named_modules() if isinstance(m, petl_zoo.AdaptedLinear))
    assert wrapped == [f"blocks.{i}.mlp.{p}" for i in range(2) for p in ("fc1_g", "fc1_x")]
    resnet = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(
        ValueError, match="unsupported architecture ResNet: petl_zoo supports the timm families vit"
    ):
        petl_zoo.create("lora", resnet)
    parallel = timm.create_model(
        "vit_small_patch16_18x2_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
    )
    with pytest.raises(ValueError, match="unsupported block ParallelThingsBlock in VisionTransformer"):
        petl_zoo.create("lora", parallel)


def test_load_errors_name_the_mismatch(tmp_path):
    model = petl_zoo.create("lora", tiny_vit())
    petl_zoo.save_adapter(model, tmp_path / "vit")
    with pytest.raises(ValueError, match="saved for a VisionTransformer, not for this SwinTransformer"):
        petl_zoo.load_adapter(tiny_swin(), tmp_path / "vit")
    with pytest.raises(
        ValueError, match=r"tensor 'blocks.0.attn.qkv.deltas.lora_q.lora_A' has shape \(8, 48\)"
    ):
        petl_zoo.load_adapter(tiny_vit(embed_dim=96, num_heads=3), tmp_path / "vit")
    with pytest.raises(ValueError, match="saved for a model with 2 blocks, this one has 3"):
        petl_zoo.load_adapter(tiny_vit(depth=3), tmp_path / "vit")
    with pytest.raises(
        ValueError, match="saved for method 'lora' but the model already carries method 'adapter'"
    ):
        petl_zoo.load_adapter(petl_zoo.create("adapter", tiny_vit()), tmp_path / "vit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        petl_zoo.load_adapter(tiny_vit(), tmp_path / "nowhere")
    config = json.loads((tmp_path / "vit" / "adapter_config.json").read_text())
    config["method"] = "adapter"
    with pytest.raises(ValueError, match="unknown option 'rank' for method 'adapter'"):
        (tmp_path / "vit" / "adapter_config.json").write_text(json.dumps(config))
        petl_zoo.load_adapter(tiny_vit(), tmp_path / "vit")
    config["config"] = {}
    (tmp_path / "vit" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not fit this model with method 'adapter': missing"):
        petl_zoo.load_adapter(tiny_vit(), tmp_path / "vit")


def test_save_is_atomic(tmp_path, monkeypatch):
    import petl_zoo.api as api

    model = petl_zoo.create("lora", tiny_vit())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(api, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        petl_zoo.save_adapter(model, tmp_path / "ad")
    assert os.listdir(tmp_path / "ad") == []


def test_third_party_registration(images, isolated_registry):
    @dataclass
    class ScaleConfig(petl_zoo.MethodConfig):
        init: float = 0.0

    class Scale(petl_zoo.Delta):
        """A sequential delta: ``out = m + m * gamma`` (a per-channel scale of the MLP output)."""

        def __init__(self, dim: int, init: float) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.full((dim,), init))

        def forward(self, x, weight):
            assert weight is None  # attached to a module, not a Linear
            return x * self.gamma

    @petl_zoo.register_method("test_scale", "scale the MLP output per channel")
    class ScaleMethod(petl_zoo.Method):
        config_class = ScaleConfig
        identity_at_init = True

        def apply(self, model):
            from petl_zoo.layers import adapt_module
            from petl_zoo.targets import module_sites

            for site in module_sites(model, "mlp"):
                adapt_module(site).sequential["scale"] = Scale(site.out_features, self.config.init)

    assert petl_zoo.list_methods()["test_scale"] == "scale the MLP output per channel"
    torch.manual_seed(0)
    plain = tiny_vit().eval()
    model = petl_zoo.create("test_scale", copy.deepcopy(plain))
    assert petl_zoo.trainable_parameters(model)["method"] == 2 * 48
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), atol=0, rtol=0)
    assert not petl_zoo.is_mergeable(model)
    with pytest.raises(ValueError, match=r"method 'test_scale' cannot be merged.*Scale on a module"):
        petl_zoo.merge(model)


def test_registry_unregister_and_clashes():
    lora = petl_zoo.get_method("lora")
    with pytest.raises(ValueError, match="a method named 'lora' is already registered"):
        petl_zoo.register_method("lora")(type("Other", (petl_zoo.Method,), {}))
    with pytest.raises(ValueError, match="no method named 'nope' is registered"):
        petl_zoo.unregister_method("nope")
    assert petl_zoo.unregister_method("lora") is lora
    try:
        assert "lora" not in petl_zoo.list_methods()
    finally:
        petl_zoo.register_method("lora")(lora)
    assert petl_zoo.get_method("lora") is lora


def test_config_checks_ranges_and_types_at_construction():
    from petl_zoo.config import Range
    from petl_zoo.methods.adapter import AdapterConfig
    from petl_zoo.methods.lora import LoraConfig

    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        LoraConfig(dropout=1.0)
    with pytest.raises(
        ValueError, match=r"bad value 'diagonal' for option 'style'.*'parallel', 'sequential'"
    ):
        AdapterConfig(style="diagonal")
    with pytest.raises(ValueError, match="unknown target 'z' for method 'lora'"):
        LoraConfig(targets=("q", "z"))
    assert LoraConfig(rank="4", targets=["q"]) == LoraConfig(rank=4, targets=("q",))  # parsed like options
    assert Range(low=0, low_open=True).describe(integer=True) == "a positive integer"
    assert Range(low=0, high=1, low_open=True, high_open=True).describe(integer=False) == "in (0, 1)"
    assert Range(low=0).describe(integer=False) == "a finite number >= 0"
    assert Range(nonzero=True).describe(integer=False) == "a finite non-zero number"
    assert (
        Range(low=0, low_open=True, none="all").describe(integer=True) == "a positive integer or None (all)"
    )
    assert not Range(low=0).contains(float("inf")) and not Range(nonzero=True).contains(0.0)


def test_list_methods_has_descriptions():
    methods = petl_zoo.list_methods()
    for name in ("lora", "adapter", "linear", "full", "bitfit"):
        assert methods[name]


@pytest.mark.slow
def test_torch_compile_forward_backward(images):
    model = petl_zoo.create("lora", tiny_vit())
    compiled = torch.compile(model)
    out = compiled(images)
    out.sum().backward()
    delta = model.blocks[0].attn.qkv.deltas["lora_q"]
    assert delta.lora_B.grad is not None and delta.lora_B.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(out, model(images), atol=1e-5, rtol=1e-5)
