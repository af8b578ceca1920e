"""HEAT: head importance scores against direct computations, head selection, masking, counts, round trips."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import BUILDERS, perturb_, pre_hook_count, tiny_swin, tiny_vit
from torch import nn
from torch.nn import functional as F

import petl_zoo
from petl_zoo.layers import AdaptedLinear
from petl_zoo.methods.heat import HeadAdapterDelta, HeadLoraDelta, select_heads
from petl_zoo.registry import TrainContext
from petl_zoo.targets import iter_blocks, linear_sites


def batches(
    n: int = 2, size: int = 4, seed: int = 0, dtype=torch.float32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 32, 32, generator=g).to(dtype), torch.randint(0, 5, (size,), generator=g))
        for _ in range(n)
    ]


def heat_model(family: str = "vit", seed: int = 0, build=None, **options) -> nn.Module:
    torch.manual_seed(seed)
    model = (build or BUILDERS[family])()
    return petl_zoo.create("heat", model, **options)


def fix_scores(model: nn.Module, scores: list[list[float]]) -> None:
    """Make the importance pass return ``scores`` (to test the selection on its own)."""
    model.petl_method.importance = lambda *args, **kwargs: scores


def flat(scores: list[list[float]]) -> torch.Tensor:
    return torch.tensor([s for row in scores for s in row], dtype=torch.float64)


def qkv_weights(model: nn.Module) -> list[nn.Parameter]:
    return [site.linear.weight for site in linear_sites(model, "qkv")]


# -- importance scores -------------------------------------------------------------------------------


@pytest.mark.parametrize("importance_batches", [None, 1])
def test_weight_tis_equals_direct_taylor_of_frozen_qkv(family, importance_batches):
    model = heat_model(family, tis="weight", importance_batches=importance_batches)
    perturb_(model)
    data = batches(2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    scores = model.petl_method.importance(model, data, TrainContext())
    assert not model.training  # mode restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    blocks = iter_blocks(model)
    expected = [[0.0] * b.num_heads for b in blocks]
    model.train()
    for x, y in data[: importance_batches or len(data)]:
        weights = qkv_weights(model)
        for w in weights:
            w.requires_grad_(True)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), weights)
        for w in weights:
            w.requires_grad_(False)
        for info, w, g in zip(blocks, weights, grads):
            width, dh = w.shape[0] // 3, info.head_dim
            for h in range(info.num_heads):
                rows = torch.cat(
                    [torch.arange(t * width + h * dh, t * width + (h + 1) * dh) for t in range(3)]
                )
                expected[info.index][h] += float((w[rows] * g[rows]).abs().sum())
    torch.testing.assert_close(flat(scores), flat(expected), rtol=1e-5, atol=1e-9)
    assert len({s for row in scores for s in row}) == sum(b.num_heads for b in blocks)  # not degenerate


def test_activation_tis_equals_finite_difference_of_a_head_gate(family):
    model = heat_model(family, tis="activation").double()
    perturb_(model)
    data = batches(2, dtype=torch.float64)
    scores = model.petl_method.importance(model, data, TrainContext())
    assert all(p.grad is None for p in model.parameters())

    model.train()
    eps = 1e-5
    for info in iter_blocks(model):
        for h in range(info.num_heads):
            gate = torch.ones(info.num_heads * info.head_dim, dtype=torch.float64)
            sl = slice(h * info.head_dim, (h + 1) * info.head_dim)
            handle = info.module.attn.proj.register_forward_pre_hook(lambda m, a, g=gate: (a[0] * g,))
            expected = 0.0
            with torch.no_grad():
                for x, y in data:
                    gate[sl] = 1 + eps
                    up = F.cross_entropy(model(x), y)
                    gate[sl] = 1 - eps
                    down = F.cross_entropy(model(x), y)
                    gate[sl] = 1.0
                    expected += abs(float(up - down) / (2 * eps))
            handle.remove()
            assert scores[info.index][h] == pytest.approx(expected, rel=1e-5, abs=1e-10), (info.path, h)
    assert min(s for row in scores for s in row) > 0


@pytest.mark.parametrize("base", ["lora", "adapter"])
def test_adapter_tis_after_warmup_equals_direct_taylor_of_head_rows(base):
    data = batches(2)
    opts = dict(base=base, tis="adapter", warmup_steps=3, warmup_lr=1e-2, warmup_weight_decay=0.1)
    kept_model = heat_model("vit", warmup_keep=True, **opts)
    replica = copy.deepcopy(kept_model)
    start = {n: p.detach().clone() for n, p in kept_model.named_parameters() if p.requires_grad}
    scores = kept_model.petl_method.importance(kept_model, data, TrainContext())

    # the warmup is 3 AdamW steps over the loader (cycling), on the adapter and the head
    params = [p for p in replica.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    replica.train()
    for x, y in [data[0], data[1], data[0]]:
        opt.zero_grad()
        F.cross_entropy(replica(x), y).backward()
        opt.step()
    for (name, p), q in zip(kept_model.named_parameters(), replica.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)

    # scores: sum over the head's rows of B (or up weight and bias) in q and v of |theta * dL/dtheta|
    deltas = kept_model.petl_method.deltas(kept_model)
    expected = [[0.0] * info.num_heads for info in iter_blocks(kept_model)]
    for x, y in data:
        kept_model.zero_grad()
        F.cross_entropy(kept_model(x), y).backward()
        for b, per_target in enumerate(deltas):
            for delta in per_target.values():
                tensors = (
                    [delta.lora_B] if base == "lora" else [delta.adapter.up.weight, delta.adapter.up.bias]
                )
                for h in range(delta.num_heads):
                    rows = slice(h * delta.head_dim, (h + 1) * delta.head_dim)
                    expected[b][h] += float(
                        sum((t.detach()[rows] * t.grad[rows]).abs().sum() for t in tensors)
                    )
    torch.testing.assert_close(flat(scores), flat(expected), rtol=1e-5, atol=1e-10)
    assert min(s for row in scores for s in row) > 0

    # without warmup_keep the warmed-up values are thrown away: the model is exactly as before
    reset_model = heat_model("vit", **opts)
    reset_scores = reset_model.petl_method.importance(reset_model, data, TrainContext())
    for name, p in reset_model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, start[name]), name
    torch.testing.assert_close(flat(reset_scores), flat(scores), rtol=1e-5, atol=1e-10)


# -- selection and masking -----------------------------------------------------------------------------


def test_select_heads_global_layer_ties_and_errors():
    scores = [[3.0, 1.0, 5.0], [2.0, 6.0, 4.0]]
    assert select_heads(scores, [0, 0], 0.5, "global") == [[2], [1, 2]]
    assert select_heads(scores, [0, 0], 0.5, "layer") == [[0, 2], [1, 2]]
    assert select_heads(scores, [0, 0], 0.0, "global") == [[0, 1, 2], [0, 1, 2]]
    assert select_heads([[1.0, 1.0], [1.0, 1.0]], [0, 0], 0.5) == [[], [0, 1]]  # ties: lower block first
    with pytest.raises(ValueError, match="valid scopes: global, layer"):
        select_heads(scores, [0, 0], 0.5, "stage")
    with pytest.raises(ValueError, match="block 1 head 0 is nan"):
        select_heads([[1.0], [float("nan")]], [0, 0], 0.5)


def test_right_heads_are_masked_for_given_scores():
    model = heat_model("vit")
    fix_scores(model, [[3.0, 1.0, 5.0], [2.0, 6.0, 4.0]])
    method = model.petl_method
    method.on_train_start(model, batches(1), TrainContext())
    assert method.get_state() == {"kept_heads": [[2], [1, 2]], "scores": [[3.0, 1.0, 5.0], [2.0, 6.0, 4.0]]}
    for b, per_target in enumerate(method.deltas(model)):
        assert set(per_target) == {"q", "v"}
        for delta in per_target.values():
            assert delta.kept == ((2,), (1, 2))[b]
            assert delta.lora_B.shape == (16 * len(delta.kept), 8)
    method.on_train_start(model, batches(1), TrainContext())  # a second call keeps the selection
    assert method.get_state()["kept_heads"] == [[2], [1, 2]]
    with pytest.raises(ValueError, match="already selected"):
        method.apply_mask(model, [[0], [0]])

    layer = heat_model("vit", scope="layer", mask_ratio=0.34)
    fix_scores(layer, [[3.0, 1.0, 5.0], [2.0, 6.0, 4.0]])
    layer.petl_method.on_train_start(layer, batches(1), TrainContext())
    assert layer.petl_method.get_state()["kept_heads"] == [[0, 2], [1, 2]]


def test_swin_masks_per_stage():
    build = lambda: tiny_swin(depths=(2, 2))  # noqa: E731 - stage 0: 2 blocks x 1 head; stage 1: 2 x 2 heads
    model = heat_model(build=build)
    assert [b.stage for b in iter_blocks(model)] == [0, 0, 1, 1]
    # a global ranking over the whole model would mask 0.1, 0.2 and 5 (both stage-0 heads)
    scores = [[0.1], [0.2], [5.0, 6.0], [7.0, 8.0]]
    fix_scores(model, scores)
    model.petl_method.on_train_start(model, batches(1), TrainContext())
    assert model.petl_method.get_state()["kept_heads"] == [[], [0], [], [0, 1]]
    deltas = model.petl_method.deltas(model)
    assert [sorted(d) for d in deltas] == [[], ["q", "v"], [], ["q", "v"]]  # empty blocks lose A as well
    assert isinstance(model.layers[0].blocks[0].attn.qkv, AdaptedLinear)
    assert len(model.layers[0].blocks[0].attn.qkv.deltas) == 0
    r = 8
    expected = 2 * (r * 16 + 16 * r) + 2 * (r * 32 + 32 * r)  # blocks 1 (1 head of 16) and 3 (2 heads of 16)
    assert petl_zoo.trainable_parameters(model)["method"] == expected

    # the real importance pass runs on Swin too and leaves a trainable model
    real = heat_model(build=build, tis="activation")
    real.petl_method.on_train_start(real, batches(2), TrainContext())
    kept = real.petl_method.get_state()["kept_heads"]
    assert sum(map(len, kept[:2])) == 1 and sum(map(len, kept[2:])) == 2
    F.cross_entropy(real(batches(1)[0][0]), batches(1)[0][1]).backward()


@pytest.mark.parametrize("base", ["lora", "adapter"])
def test_masked_deltas_stay_exactly_zero_through_training(base):
    model = heat_model("vit", base=base, scope="layer")
    perturb_(model, std=0.2)
    before = {}
    for b, per_target in enumerate(model.petl_method.deltas(model)):
        for t, d in per_target.items():
            w = d.lora_B if base == "lora" else d.adapter.up.weight
            before[b, t] = w.detach().clone()
    fix_scores(model, [[3.0, 1.0, 5.0], [2.0, 6.0, 4.0]])
    model.petl_method.on_train_start(
        model, batches(1), TrainContext()
    )  # masks head 1 of block 0, head 0 of 1
    masked = {0: 1, 1: 0}
    deltas = model.petl_method.deltas(model)
    for b, per_target in enumerate(deltas):  # kept rows keep their values
        for t, d in per_target.items():
            w = d.lora_B if base == "lora" else d.adapter.up.weight
            keep = [h for h in range(3) if h != masked[b]]
            rows = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in keep])
            assert torch.equal(w, before[b, t][rows])

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for x, y in batches(5, seed=3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    x = torch.randn(2, 17, 48)
    for info, per_target in zip(iter_blocks(model), deltas):
        qkv = info.module.attn.qkv
        with torch.no_grad():
            update = qkv(x) - qkv.base(x)
        for t, d in per_target.items():
            start = "qkv".index(t) * 48
            sl = slice(start + masked[info.index] * 16, start + (masked[info.index] + 1) * 16)
            assert torch.equal(update[..., sl], torch.zeros_like(update[..., sl])), (info.index, t)
            others = [h for h in range(3) if h != masked[info.index]]
            assert all(update[..., start + h * 16 : start + (h + 1) * 16].abs().sum() > 0 for h in others)
            if base == "lora":
                dw = d.delta_weight(qkv.base.weight[start : start + 48])
                sl_w = slice(masked[info.index] * 16, (masked[info.index] + 1) * 16)
                assert torch.equal(dw[sl_w], torch.zeros_like(dw[sl_w]))
        assert torch.equal(update[..., 48:96], torch.zeros_like(update[..., 48:96]))  # k is not adapted


@pytest.mark.parametrize("base", ["lora", "adapter"])
def test_trainable_and_stored_counts_drop_by_the_masked_share(base):
    model = heat_model("vit", base=base, scope="layer")
    full = petl_zoo.trainable_parameters(model)
    per_head = 16 * 8 if base == "lora" else 16 * 8 + 16  # B rows, or up weight rows + bias
    per_slice = 48 * 8 + 3 * per_head if base == "lora" else 48 * 8 + 8 + 3 * per_head
    assert full["method"] == full["stored"] == 2 * 2 * per_slice
    fix_scores(model, [[3.0, 1.0, 5.0], [2.0, 6.0, 4.0]])
    model.petl_method.on_train_start(model, batches(1), TrainContext())
    masked = petl_zoo.trainable_parameters(model)
    assert full["method"] - masked["method"] == 2 * 2 * per_head  # one head of each block, q and v
    assert masked["stored"] == masked["method"]
    assert masked["head"] == full["head"]


def test_vit_base_counts():
    model = petl_zoo.create("heat", timm.create_model("vit_base_patch16_224"))
    assert petl_zoo.trainable_parameters(model)["method"] == 294_912  # = LoRA r=8 on q, v before masking
    model.petl_method.set_state(model, {"kept_heads": [list(range(6))] * 12})
    # A (8 x 768) stays per slice, half of B's rows (768 x 8) go: 24 * (6144 + 3072)
    assert petl_zoo.trainable_parameters(model)["method"] == 221_184


# -- save / load, merge, head gating ---------------------------------------------------------------


@pytest.mark.parametrize(
    "family,options",
    [
        ("vit", {}),
        ("vit", {"mask": "head"}),
        ("vit", {"base": "adapter", "mask": "head"}),
        ("swin", {"tis": "weight"}),
    ],
    ids=str,
)
def test_save_load_and_merge_round_trips_after_masking(family, options, tmp_path):
    model = heat_model(family, **options)
    perturb_(model)
    model.petl_method.on_train_start(model, batches(2), TrainContext())
    state = model.petl_method.get_state()
    assert any(len(k) < b.num_heads for k, b in zip(state["kept_heads"], iter_blocks(model)))
    perturb_(model, seed=2)
    images = batches(1)[0][0]
    model.eval()
    with torch.no_grad():
        tuned = model(images)
    counts = petl_zoo.trainable_parameters(model)
    petl_zoo.save_adapter(model, tmp_path / "ad")

    torch.manual_seed(0)
    fresh = BUILDERS[family]().eval()  # same backbone weights (same seed)
    petl_zoo.load_adapter(fresh, tmp_path / "ad")
    assert fresh.petl_method.get_state() == state
    assert petl_zoo.trainable_parameters(fresh) == counts
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), tuned, atol=1e-6, rtol=0)

    assert petl_zoo.is_mergeable(model) == (options.get("base", "lora") == "lora")
    if petl_zoo.is_mergeable(model):
        originals = [w.detach().clone() for w in qkv_weights(model)]
        petl_zoo.merge(model)
        with torch.no_grad():
            torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=0)
        petl_zoo.unmerge(model)
        for w, w0 in zip(qkv_weights(model), originals):
            assert torch.equal(w, w0)
        with torch.no_grad():
            torch.testing.assert_close(model(images), tuned, atol=1e-6, rtol=0)
    else:
        with pytest.raises(ValueError, match="cannot be merged"):
            petl_zoo.merge(model)


def test_save_before_masking_loads_unmasked(tmp_path, images):
    model = heat_model("vit")
    perturb_(model)
    petl_zoo.save_adapter(model.eval(), tmp_path / "ad")
    torch.manual_seed(0)
    fresh = petl_zoo.load_adapter(tiny_vit().eval(), tmp_path / "ad")
    assert fresh.petl_method.get_state() == {}
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mask", ["adapter", "head"])
def test_head_mask_gates_the_head_output(mask, images):
    model = heat_model("vit", mask=mask).eval()
    model.petl_method.set_state(model, {"kept_heads": [[0, 2], [0, 1, 2]]})
    seen = {}
    model.blocks[0].attn.proj.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        model(images)
    head1 = seen["x"][..., 16:32]
    assert torch.equal(head1, torch.zeros_like(head1)) == (mask == "head")
    assert seen["x"][..., :16].abs().sum() > 0
    assert hasattr(model.blocks[0].attn, "heat_gate") == (mask == "head")
    assert not hasattr(model.blocks[1].attn, "heat_gate")  # nothing masked there
    assert "heat_gate" not in "".join(model.state_dict())  # the gate is rebuilt from the state


def test_delta_modules_keep_heads_errors():
    d = HeadLoraDelta(48, 48, 8, 1.0, 0.0, 16)
    d.keep_heads([2, 0])
    assert d.kept == (0, 2) and d.rows.tolist() == list(range(16)) + list(range(32, 48))
    with pytest.raises(ValueError, match=r"cannot keep head 1: valid heads are \[0, 2\]"):
        d.keep_heads([1])
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        HeadLoraDelta(48, 48, 8, 1.0, 0.0, 10)
    with pytest.raises(ValueError, match="as wide as its input"):
        HeadAdapterDelta(48, 32, 8, 0.1, 16)


def test_options_are_validated():
    with pytest.raises(ValueError, match="'rank' is the LoRA rank .*the head-ranking scope is now 'scope'"):
        petl_zoo.create("heat", tiny_vit(), rank="layer")
    for old, new in [("lora_rank", "rank"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"),
                     ("adapter_dim", "dim"), ("adapter_scale", "scale")]:  # fmt: skip
        with pytest.raises(
            ValueError, match=f"option '{old}' for method 'heat' was renamed: '{old}' is now '{new}'"
        ):
            petl_zoo.create("heat", tiny_vit(), **{old: 1})
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        petl_zoo.create("heat", tiny_vit(), rank=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        petl_zoo.create("heat", tiny_vit(), dropout=1.5)
    with pytest.raises(ValueError, match="importance_batches must be a positive integer or None"):
        petl_zoo.create("heat", tiny_vit(), importance_batches=0)
    with pytest.raises(ValueError, match="warmup_lr must be a finite number > 0, got 0.0"):
        petl_zoo.create("heat", tiny_vit(), warmup_lr=0)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\), got 1.0"):
        petl_zoo.create("heat", tiny_vit(), mask_ratio=1.0)
    with pytest.raises(ValueError, match="unknown target 'fc1'.*valid targets: q, k, v"):
        petl_zoo.create("heat", tiny_vit(), targets=("fc1",))
    with pytest.raises(ValueError, match="'weight', 'activation', 'adapter'"):
        petl_zoo.create("heat", tiny_vit(), tis="grad")
    with pytest.raises(ValueError, match="warmup_steps must be a positive integer or None"):
        petl_zoo.create("heat", tiny_vit(), warmup_steps=0)
    config = petl_zoo.get_method("heat").config_class.from_options(
        "heat", scope="layer", mask_ratio="0.25", rank="4", alpha="8", dim="2", scale="0.5"
    )
    assert (config.scope, config.mask_ratio, config.tis, config.rank) == ("layer", 0.25, "activation", 4)
    assert (config.scaling, config.dim, config.scale) == (2.0, 2, 0.5)
    model = petl_zoo.create("heat", tiny_vit())
    with pytest.raises(ValueError, match="kept_heads lists 1 blocks, the model has 2"):
        model.petl_method.set_state(model, {"kept_heads": [[0]]})
    with pytest.raises(ValueError, match=r"block blocks.1 has heads 0..2, kept_heads names \[3\]"):
        model.petl_method.set_state(model, {"kept_heads": [[0], [3]]})
    with pytest.raises(ValueError, match="bad HEAT state keys"):
        model.petl_method.set_state(model, {"masks": []})


def test_head_gate_hooks_have_one_owner_and_merge_unload_folds_them(images):
    model = heat_model("vit", mask="head").eval()
    perturb_(model)
    method = model.petl_method
    method.set_state(model, {"kept_heads": [[0, 2], [1]]})
    assert len(method.hooks) == pre_hook_count(model) == 2
    with torch.no_grad():
        tuned = model(images)

    petl_zoo.merge(model)  # a merge that keeps the method keeps the gates
    assert pre_hook_count(model) == 2
    petl_zoo.unmerge(model)

    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    assert pre_hook_count(plain) == 0 and petl_zoo.method_of(plain) is None
    assert not any(hasattr(b.attn, "heat_gate") for b in plain.blocks)
    assert not any(isinstance(m, AdaptedLinear) for m in plain.modules())
    proj = plain.blocks[0].attn.proj.weight
    assert torch.equal(proj[:, 16:32], torch.zeros_like(proj[:, 16:32]))  # head 1's input columns
    with torch.no_grad():
        torch.testing.assert_close(plain(images), tuned, atol=1e-5, rtol=0)
    assert pre_hook_count(model) == 2  # the copy's hooks were its own

    assert method.hooks.remove() == 2 and pre_hook_count(model) == 0 and len(method.hooks) == 0
