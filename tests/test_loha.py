"""LoHa: Hugging Face peft parity in float64 (fused qkv, q/v slices against a split copy, the patch
embedding's conv in both forms; eval and training dropouts), merge/unmerge/unload, identity at init,
save/load, ViT-B/16 counts and options. ``lycoris_pair`` and ``check_peft_parity`` also serve
tests/test_lokr.py."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import perturb_, tiny_swin, tiny_vit
from peft_parity import assert_same_outputs_and_grads, fp64_pair, images64, split_qkv
from torch import nn

import petl_zoo
from petl_zoo.layers import AdaptedLinear, AdaptedModule
from petl_zoo.methods.loha import LohaConfig, LohaDelta, LycorisDelta

try:  # imported with the module, so that no test pays for peft's import
    import peft
except ImportError:  # pragma: no cover - peft is a test dependency
    peft = None

#: our option -> peft's config field
PEFT_NAMES = {"rank": "r", "init": "init_weights"}
PEFT_INIT = {"default": True, "random": False, "lycoris": "lycoris"}


def peft_options(options: dict) -> dict:
    out = {PEFT_NAMES.get(k, k): v for k, v in options.items()}
    if "init_weights" in out:
        out["init_weights"] = PEFT_INIT[out["init_weights"]]
    return out


def lycoris_deltas(model: nn.Module) -> dict[str, LycorisDelta]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LycorisDelta)}


def peft_layer_of(peft_model: nn.Module, name: str, split: bool) -> nn.Module:
    """The peft layer holding the tensors of our delta ``name`` (``...qkv.deltas.loha_q`` -> ``...qkv.q``
    on the split copy, ``...qkv`` on the fused one, ``patch_embed.proj.parallel.loha`` -> ``patch_embed.proj``)."""
    root = peft_model.base_model.model
    if ".parallel." in name:
        return root.get_submodule(name.rsplit(".parallel.", 1)[0])
    layer, _, key = name.rpartition(".deltas.")
    target = key.rpartition("_")[2]
    return root.get_submodule(f"{layer}.{target}" if split else layer)


def lycoris_pair(method: str, peft_class: str, targets: tuple, std: float = 0.3, seed: int = 3, **options):
    """Our ``method`` on one fp64 tiny ViT and peft's ``peft_class`` on a copy (its ``qkv`` split into
    q/k/v Linears for the ``q``/``v`` targets); peft's tensors perturbed (its init makes delta_W 0) and
    copied into ours. Returns ``(ours, peft_model, pairs, split)``."""
    if peft is None:
        pytest.skip("peft is not installed")
    ours, theirs = fp64_pair()
    split = any(t in ("q", "k", "v") for t in targets)
    if split:
        theirs = split_qkv(theirs)
    peft_targets = ["patch_embed.proj" if t == "patch_embed" else t for t in targets]
    petl_zoo.create(method, ours, targets=targets, **options)
    config = getattr(peft, peft_class)(target_modules=peft_targets, **peft_options(options))
    peft_model = peft.get_peft_model(theirs, config)
    g = torch.Generator().manual_seed(seed)
    pairs = []
    deltas = lycoris_deltas(ours)
    assert deltas
    for name, delta in deltas.items():
        layer = peft_layer_of(peft_model, name, split)
        mine = dict(delta.named_parameters())
        for pname in layer.adapter_layer_names:
            held = getattr(layer, pname)
            if "default" not in held:
                assert pname not in mine, f"{name}: we have {pname}, peft does not"
                continue
            theirs_t = held["default"]
            assert pname in mine, f"{name}: peft has {pname}, we do not"
            assert mine[pname].shape == theirs_t.shape and mine[pname].dtype == theirs_t.dtype
            with torch.no_grad():
                theirs_t.add_(std * torch.randn(theirs_t.shape, generator=g, dtype=theirs_t.dtype))
                mine[pname].copy_(theirs_t)
            pairs.append((mine[pname], theirs_t))
        assert len(pairs) and all(p.requires_grad for p, _ in pairs)
    assert sum(1 for _ in pairs) == sum(len(list(d.parameters())) for d in deltas.values())
    return ours, peft_model, pairs, split


def merged_weights(
    ours: nn.Module, peft_model: nn.Module, split: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(our merged weight, peft's)`` for every adapted layer (our qkv sliced as peft's q/k/v)."""
    root = peft_model.base_model.model
    pairs = []
    for name, module in ours.named_modules():
        if isinstance(module, AdaptedModule):
            pairs.append((module.base.weight, root.get_submodule(name).get_base_layer().weight))
        elif isinstance(module, AdaptedLinear):
            weight = module.base.weight
            if split:
                width = weight.shape[0] // 3
                for i, part in enumerate("qkv"):
                    theirs = root.get_submodule(f"{name}.{part}")
                    theirs = theirs.get_base_layer() if hasattr(theirs, "get_base_layer") else theirs
                    pairs.append((weight[i * width : (i + 1) * width], theirs.weight))
            else:
                pairs.append((weight, root.get_submodule(name).get_base_layer().weight))
    assert pairs
    return pairs


def check_peft_parity(method: str, peft_class: str, targets: tuple, **options) -> None:
    """Outputs and gradients within 1e-10 in fp64 (eval), then the merged weights equal peft's."""
    ours, theirs, pairs, split = lycoris_pair(method, peft_class, targets, **options)
    images = images64()
    assert_same_outputs_and_grads(ours, theirs, images, pairs)
    petl_zoo.merge(ours)
    theirs.base_model.merge_adapter()
    for mine, peft_weight in merged_weights(ours, theirs, split):
        torch.testing.assert_close(mine, peft_weight, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), atol=1e-10, rtol=0)


def check_peft_training_parity(method: str, peft_class: str, targets: tuple, **options) -> None:
    """In training mode, with the same seed before each forward, peft's module and rank dropouts draw the
    same numbers in the same order: outputs and gradients agree within 1e-10 over several steps."""
    ours, theirs, pairs, _ = lycoris_pair(method, peft_class, targets, **options)
    images = images64()
    ours.train()
    theirs.train()
    for step in range(4):
        torch.manual_seed(100 + step)
        out_ours = ours(images)
        torch.manual_seed(100 + step)
        out_theirs = theirs(images)
        torch.testing.assert_close(out_ours, out_theirs, atol=1e-10, rtol=0)
        out_ours.square().sum().backward()
        out_theirs.square().sum().backward()
        for mine, peft_tensor in pairs:
            assert (mine.grad is None) == (peft_tensor.grad is None)
            if mine.grad is not None:
                torch.testing.assert_close(mine.grad, peft_tensor.grad, atol=1e-10, rtol=0)
            mine.grad, peft_tensor.grad = None, None


# ------------------------------------------------------------------------------------------ peft parity
@pytest.mark.parametrize(
    ("targets", "options"),
    [
        (("qkv",), {}),  # peft's defaults: r = alpha = 8
        (("qkv",), dict(rank=4, alpha=6.0)),  # scale 1.5
        (("q", "v"), dict(rank=4, alpha=2.0)),
        (("patch_embed",), dict(rank=4, alpha=2.0)),  # flattened kernel
        (("patch_embed",), dict(rank=2, alpha=3.0, use_effective_conv2d=True)),  # Tucker cores
        (("q", "v", "patch_embed"), dict(rank=3, alpha=6.0, init="random")),
    ],
    ids=["qkv-default", "qkv", "q-v-split", "patch-conv", "patch-conv-tucker", "all-random-init"],
)
def test_matches_peft_loha(targets, options, monkeypatch):
    if options.get("use_effective_conv2d"):
        monkeypatch.setattr(peft_loha_layer(), "make_weight_cp", autograd_weight_cp)
    check_peft_parity("loha", "LoHaConfig", targets, **options)


def peft_loha_layer():
    return pytest.importorskip("peft.tuners.loha.layer")


def autograd_weight_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
    """peft's ``HadaWeightCP`` forward, differentiated by autograd (see the next test)."""
    rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
    rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    return rebuild1 * rebuild2 * scale


def test_peft_tucker_backward_is_wrong_ours_is_right():
    """peft 0.21.2's ``HadaWeightCP.backward`` (copied from LyCORIS) computes the gradients of
    ``hada_w1_a`` and ``hada_w2_a`` from the *other* pair's partial product: gradcheck fails. Ours is
    autograd's through the same forward (gradcheck passes), so the Tucker parity test compares with
    peft's forward differentiated by autograd; every other gradient of peft's backward agrees."""
    layer = peft_loha_layer()
    torch.manual_seed(0)
    shapes = [(2, 2, 3, 3), (2, 5), (2, 4), (2, 2, 3, 3), (2, 5), (2, 4)]
    tensors = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    scale = torch.tensor(1.5)
    assert not torch.autograd.gradcheck(
        lambda *t: layer.HadaWeightCP.apply(*t, scale), tensors, raise_exception=False
    )
    grad = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    theirs = torch.autograd.grad((layer.HadaWeightCP.apply(*tensors, scale) * grad).sum(), tensors)
    right = torch.autograd.grad((autograd_weight_cp(*tensors, scale) * grad).sum(), tensors)
    wrong = [i for i, (a, b) in enumerate(zip(theirs, right)) if not torch.allclose(a, b, atol=1e-10)]
    assert wrong == [1, 4]  # hada_w1_a, hada_w2_a

    conv = nn.Conv2d(4, 5, 3)
    delta = LohaDelta((5, 4, 3, 3), rank=2, scaling=1.5, conv=conv, use_effective_conv2d=True).double()
    assert delta.effective
    ours = [delta.hada_t1, delta.hada_w1_a, delta.hada_w1_b, delta.hada_t2, delta.hada_w2_a, delta.hada_w2_b]
    with torch.no_grad():
        for p, t in zip(ours, tensors):
            p.copy_(t)
    assert torch.equal(delta.make_weight(), layer.HadaWeightCP.apply(*tensors, scale))
    for got, want in zip(torch.autograd.grad((delta.make_weight() * grad).sum(), ours), right):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("targets", [("q", "v", "patch_embed"), ("qkv",)])
def test_matches_peft_loha_dropouts_in_training(targets):
    check_peft_training_parity(
        "loha", "LoHaConfig", targets, rank=4, alpha=4.0, rank_dropout=0.5, module_dropout=0.3
    )


# ------------------------------------------------------------------------------------------ our contract
def test_delta_weight_is_the_formula():
    torch.manual_seed(0)
    delta = LohaDelta((6, 5), rank=3, scaling=0.5, init="random").double()
    w = (delta.hada_w1_a @ delta.hada_w1_b) * (delta.hada_w2_a @ delta.hada_w2_b) * 0.5
    assert torch.equal(delta.delta_weight(torch.zeros(6, 5)), w)
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(delta(x, None), x @ w.T, atol=1e-14, rtol=0)
    assert delta.low_rank(torch.zeros(6, 5)) is None  # no one-pass (U, D) form
    # our Function's gradients are autograd's of the plain formula
    params = list(delta.parameters())
    grads = torch.autograd.grad(delta(x, None).square().sum(), params)
    a1, b1, a2, b2 = (p.detach().clone().requires_grad_() for p in params)
    plain = x @ ((a1 @ b1) * (a2 @ b2) * 0.5).T
    for got, want in zip(grads, torch.autograd.grad(plain.square().sum(), [a1, b1, a2, b2])):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("build", [tiny_vit, tiny_swin])
@pytest.mark.parametrize(
    "options", [{}, dict(targets=("qkv", "patch_embed"), use_effective_conv2d=True, rank=2)]
)
def test_identity_at_init_merge_unmerge_unload(build, options, images):
    torch.manual_seed(0)
    pristine = build().eval()
    model = petl_zoo.create("loha", copy.deepcopy(pristine), **options).eval()
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))  # w2_b = 0: delta_W = 0 exactly
    for delta in lycoris_deltas(model).values():
        assert not delta.hada_w2_b.any() and delta.hada_w1_a.any() and delta.hada_w2_a.any()
    perturb_(model, std=0.2)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        tuned = model(images)
    assert not torch.allclose(tuned, pristine(images))
    assert petl_zoo.is_mergeable(model)
    petl_zoo.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=1e-5)
    petl_zoo.unmerge(model)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    assert not any(isinstance(m, (AdaptedLinear, AdaptedModule, LycorisDelta)) for m in plain.modules())
    assert type(plain.patch_embed.proj) is nn.Conv2d
    assert set(plain.state_dict()) == set(pristine.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(images), tuned, atol=1e-5, rtol=1e-5)


def test_save_load_exact(tmp_path, images):
    torch.manual_seed(0)
    pristine = tiny_vit()
    options = dict(targets=("q", "v", "patch_embed"), rank=4, alpha=2.0, use_effective_conv2d=True)
    model = petl_zoo.create("loha", copy.deepcopy(pristine), **options).eval()
    perturb_(model)
    petl_zoo.save_adapter(model, tmp_path / "loha")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "loha").eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    assert petl_zoo.method_of(fresh).config == LohaConfig(**options)


def test_bf16_host_keeps_fp32_factors_and_merges(images):
    torch.manual_seed(0)
    model = petl_zoo.create("loha", tiny_vit().to(torch.bfloat16), targets=("q", "v", "patch_embed"), rank=4)
    perturb_(model)
    assert all(p.dtype == torch.float32 for d in lycoris_deltas(model).values() for p in d.parameters())
    out = model(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(p.grad is not None for d in lycoris_deltas(model).values() for p in d.parameters())
    model.eval()
    with torch.no_grad():
        tuned = model(images.to(torch.bfloat16)).float()
        petl_zoo.merge(model)
        torch.testing.assert_close(model(images.to(torch.bfloat16)).float(), tuned, atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    ("options", "count"),
    [
        ({}, 589_824),  # 4 * 8 * 768 a site, q and v of 12 blocks
        (dict(targets=("qkv",)), 589_824),  # 2 * 8 * (2304 + 768) a block
        (dict(targets=("patch_embed",)), 24_576),  # 4 * 8 * 768 (in * 16 * 16 = 768)
        (dict(targets=("patch_embed",), use_effective_conv2d=True), 45_104),  # 2 (8*8*16*16 + 8*768 + 8*3)
    ],
)
def test_vit_base_counts(options, count):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    petl_zoo.create("loha", model, **options)
    assert petl_zoo.trainable_parameters(model)["method"] == count


def test_options_validated():
    cfg = LohaConfig()
    assert (cfg.rank, cfg.alpha, cfg.rank_dropout, cfg.module_dropout) == (8, 8.0, 0.0, 0.0)
    assert cfg.targets == ("q", "v") and cfg.init == "default" and not cfg.use_effective_conv2d
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        LohaConfig(rank=0)
    with pytest.raises(ValueError, match="rank_dropout must be in"):
        LohaConfig(rank_dropout=1.0)
    with pytest.raises(ValueError, match="unknown target 'mlp' for method 'loha'"):
        petl_zoo.create("loha", tiny_vit(), targets=("mlp",))
    with pytest.raises(ValueError, match="bad value 'zeros' for option 'init'"):
        petl_zoo.create("loha", tiny_vit(), init="zeros")
