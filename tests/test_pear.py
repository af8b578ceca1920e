"""Pear: Taylor importance, pruning plan, tied sharing, knowledge checkpoint, counts, save/load, merge."""

from __future__ import annotations

import copy
import functools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from conftest import perturb_, tiny_swin, tiny_vit
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import petl_zoo
import vtab
from petl_zoo.methods.adapter import BottleneckAdapter
from petl_zoo.methods.pear import FrozenCheckpoint, GatedShare, OffsetShare, plan_pruning
from petl_zoo.registry import TrainContext


def build(family: str) -> nn.Module:
    """Tiny models with two blocks per sharing group (ViT: 4 blocks; Swin: 2 stages of 2 blocks)."""
    torch.manual_seed(0)
    model = tiny_vit(depth=4) if family == "vit" else tiny_swin(depths=(2, 2), patch_size=4)
    return model.eval()


def batches(n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)
    ]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def run_epoch(model: nn.Module, ctx: TrainContext, data, opt: torch.optim.Optimizer) -> None:
    """One epoch of the loop the trainer runs: backward, on_after_backward, step (no on_epoch_end)."""
    method = model.petl_method
    model.train()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        ctx.loss_fn(model(x), y).backward()
        method.on_after_backward(model, ctx)
        opt.step()
        ctx.step += 1


def pear(family: str, **options) -> nn.Module:
    model = build(family)
    petl_zoo.create("pear", model, **{"prune_epoch": 1, **options})
    perturb_(model)
    return model


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,match",
    [
        ({"prune_epoch": 0}, r"prune_epoch must be a positive integer \(an epoch to score in\), got 0"),
        ({"prune_ratio": 1.0}, r"prune_ratio must be in \(0, 1\), got 1.0"),
        ({"prune_ratio": 0}, r"prune_ratio must be in \(0, 1\)"),
        ({"share": "random"}, "expected one of 'top', 'nearest'"),
        ({"base": "prompt"}, "expected one of 'adapter', 'lora', 'both'"),
        ({"kc_scale": -1.0}, "kc_scale must be a finite number >= 0, got -1.0"),
        ({"base": "lora", "targets": ("q", "x")}, "unknown target 'x'"),
        (
            {"lora_targets": ("q",)},
            "option 'lora_targets' for method 'pear' was renamed: 'lora_targets' is now 'targets'",
        ),
    ],
)
def test_options_are_validated(options, match):
    with pytest.raises(ValueError, match=match):
        petl_zoo.create("pear", tiny_vit(), **options)


def test_identity_at_init_and_counts_before_pruning():
    model = build("vit")
    x = batches(1)[0][0]
    with torch.no_grad():
        reference = model(x)
    petl_zoo.create("pear", model, base="both")
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-6, rtol=0)
    d, k, r = 48, 8, 8
    per_block = (d * k + k + k * d + d) + 2 * r * (d + d)
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == counts["stored"] == 4 * per_block


def test_vit_base_counts_before_and_after_pruning():
    """ViT-B/16, 12 MLP adapters of dim 8: 156,768 trainable; pruning half leaves 6 adapters + 6 gates,
    and the 6 frozen knowledge checkpoints stay in the stored count."""
    model = timm.create_model("vit_base_patch16_224", num_classes=100)
    petl_zoo.create("pear", model)
    method = model.petl_method
    assert petl_zoo.trainable_parameters(model)["method"] == 12 * (768 * 8 + 8 + 8 * 768 + 768) == 156_768
    method.prune({name: float(i % 4) for i, name in enumerate(method.positions)})
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == 156_768 // 2 + 6 == 78_390
    assert counts["stored"] == 156_768 + 6


# -- importance ----------------------------------------------------------------------------------


def test_importance_equals_hand_computation():
    """I_a = sum over batches |sum_{theta in a} theta * dL/dtheta|, checked through the adapter's output.

    Scaling all of an adapter's up (or LoRA B) parameters by t scales its output by t, and ReLU / the
    low-rank product is positively homogeneous in the down (or A) parameters, so
    sum theta * g = <dL/dout, 2 out - s b_up> for a bottleneck adapter and 2 <dL/dout, out> for LoRA.
    """
    model = pear("vit", base="both")
    method = model.petl_method
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in method.positions}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            outputs[name].append(out)

        return hook

    for name, pos in method.positions.items():
        pos.module.register_forward_hook(keep(name))

    data = batches(2)
    ctx = TrainContext(epochs=2, steps_per_epoch=len(data))
    hand = dict.fromkeys(method.positions, 0.0)
    model.train()
    for x, y in data:
        model.zero_grad(set_to_none=True)
        ctx.loss_fn(model(x), y).backward()
        method.on_after_backward(model, ctx)  # epoch 0 == prune_epoch - 1: scored
        for name, pos in method.positions.items():
            out = outputs[name].pop()
            if isinstance(pos.module, BottleneckAdapter):
                inner = 2 * out - pos.module.scale * pos.module.up.bias
            else:
                inner = 2 * out
            hand[name] += float((out.grad * inner.detach()).sum().abs())
    scores = method._accumulator.scores()
    assert method._accumulator.batches == 2
    for name in method.positions:
        assert hand[name] > 0
        assert scores[name] == pytest.approx(hand[name], rel=1e-4), name


def test_abs_importance_and_scoring_epoch_only():
    model = pear("vit", importance="abs", prune_epoch=2)
    method = model.petl_method
    data = batches(2)
    ctx = TrainContext(epochs=3, steps_per_epoch=2)
    model.train()
    for epoch in (0, 1):
        ctx.epoch = epoch
        expected = dict.fromkeys(method.positions, 0.0)
        for x, y in data:
            model.zero_grad(set_to_none=True)
            ctx.loss_fn(model(x), y).backward()
            method.on_after_backward(model, ctx)
            for name, pos in method.positions.items():
                params = pos.module.parameters()
                expected[name] += sum(float((p.detach() * p.grad).abs().sum()) for p in params)
        if epoch == 0:
            assert method._accumulator is None  # epoch 0 is not the scoring epoch for prune_epoch=2
    scores = method._accumulator.scores()
    for name in method.positions:
        assert scores[name] == pytest.approx(expected[name], rel=1e-5)


# -- plan ----------------------------------------------------------------------------------------


def test_plan_rule():
    names = [f"mlp.{i}" for i in range(6)]
    sizes = dict.fromkeys(names, 10)
    groups = dict.fromkeys(names, "g")
    depths = {n: i for i, n in enumerate(names)}
    scores = dict(zip(names, [5.0, 1.0, 3.0, 0.5, 4.0, 2.0]))
    pruned, share = plan_pruning(scores, sizes, groups, depths, 0.5, "top")
    assert pruned == ["mlp.3", "mlp.1", "mlp.5"]  # ascending importance, half of equal-size adapters
    assert share == dict.fromkeys(pruned, "mlp.0")
    _, near = plan_pruning(scores, sizes, groups, depths, 0.5, "nearest")
    # mlp.1: 0 and 2 both at distance 1 -> the more important (0); mlp.3: 2 and 4 -> 4; mlp.5: 4
    assert near == {"mlp.3": "mlp.4", "mlp.1": "mlp.0", "mlp.5": "mlp.4"}
    # ratio rule: the smallest prefix reaching the ratio (0.3 of 60 = 18 -> two adapters)
    assert plan_pruning(scores, sizes, groups, depths, 0.3)[0] == ["mlp.3", "mlp.1"]
    # every group keeps one adapter, even when that group holds the least important ones
    two = {n: ("a" if n in ("mlp.1", "mlp.3") else "b") for n in names}
    pruned, share = plan_pruning(scores, sizes, two, depths, 0.5, "top")
    assert pruned == ["mlp.3", "mlp.5", "mlp.2"]  # mlp.1 skipped: the last of group a
    assert share == {"mlp.3": "mlp.1", "mlp.5": "mlp.0", "mlp.2": "mlp.0"}


def test_plan_keeps_one_per_group_and_unequal_sizes():
    sizes = {"a.0": 10, "a.1": 10, "b.0": 30, "b.1": 30}
    groups = {"a.0": "a", "a.1": "a", "b.0": "b", "b.1": "b"}
    depths = {"a.0": 0, "a.1": 1, "b.0": 0, "b.1": 1}
    scores = {"a.0": 0.1, "a.1": 0.2, "b.0": 0.3, "b.1": 0.4}
    pruned, share = plan_pruning(scores, sizes, groups, depths, 0.5)
    # a.0 (10), a.1 skipped (last of group a), b.0 (30): 40 >= 0.5 * 80
    assert pruned == ["a.0", "b.0"] and share == {"a.0": "a.1", "b.0": "b.1"}


# -- pruning on a model --------------------------------------------------------------------------

KC_VARIANTS = {
    "no_kc": {"knowledge_checkpoint": False},
    "kc_gate": {"knowledge_checkpoint": True, "kc_shared": "gate"},
    "kc_offset": {"knowledge_checkpoint": True, "kc_shared": "offset"},
}


@functools.cache
def scenario(family: str, kc: str, base: str = "both") -> SimpleNamespace:
    """A Pear model trained for its scoring epoch and pruned at its end (built once per test session;
    tests that change it work on a deep copy, which keeps the tying and the method's references)."""
    model = pear(family, base=base, **KC_VARIANTS[kc])
    method = model.petl_method
    before = petl_zoo.trainable_parameters(model)
    originals = {n: p.module for n, p in method.positions.items()}
    data = batches()
    x = data[0][0]
    ctx = TrainContext(epochs=2, steps_per_epoch=len(data))
    method.on_train_start(model, data, ctx)
    run_epoch(model, ctx, data, torch.optim.SGD(trainable(model), lr=0.05))
    model.eval()
    with torch.no_grad():
        unpruned = model(x)
    method.on_epoch_end(model, 0, ctx)
    with torch.no_grad():
        pruned = model(x)
    return SimpleNamespace(
        model=model, before=before, originals=originals, data=data, unpruned=unpruned, pruned=pruned
    )


def pruned_copy(family: str, kc: str, base: str = "both") -> tuple[nn.Module, SimpleNamespace]:
    s = scenario(family, kc, base)
    return copy.deepcopy(s.model), s


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("kc", list(KC_VARIANTS))
def test_pruning_removes_planned_adapters_and_ties_shared_ones(family, kc):
    s = scenario(family, kc)
    model, originals, before = s.model, s.originals, s.before
    method = model.petl_method
    plan = method.get_state()
    assert method.pruned and plan["epoch"] == 0 and plan["batches"] == len(s.data)

    # the plan is exactly plan_pruning on the recorded scores
    pos = method.positions
    expected = plan_pruning(
        plan["scores"], {n: p.size for n, p in pos.items()}, {n: p.group for n, p in pos.items()},
        {n: p.block for n, p in pos.items()}, 0.5, "top",
    )  # fmt: skip
    assert (plan["pruned"], plan["share"]) == expected
    assert len(plan["pruned"]) == len(pos) // 2  # equal sizes within kinds, two positions per group
    assert plan["removed_fraction"] == pytest.approx(0.5)

    live = {id(p) for p in trainable(model)}
    stored = {id(t) for t in petl_zoo.adapter_state_dict(model).values()}
    for name in pos:
        params = list(originals[name].parameters())
        if name in plan["pruned"]:
            assert not any(id(p) in live for p in params), name
            assert all(id(p) in stored for p in params) == (kc != "no_kc"), name
        else:
            assert all(id(p) in live for p in params), name

    for name, source in plan["share"].items():
        p, k = pos[name], pos[source]
        assert p.group == k.group and name != source
        slot = p.container[p.slot]
        if kc != "no_kc":
            assert isinstance(slot, FrozenCheckpoint) and slot.module is originals[name]
            extra = p.container[f"{p.slot}_shared"]
            assert isinstance(extra, GatedShare if kc == "kc_gate" else OffsetShare)
            slot = extra.shared
        assert slot is k.module is method.shared_module(name)
        for a, b in zip(slot.parameters(), k.module.parameters()):
            assert a is b

    # counts follow the ratio: half the adapter parameters stay trainable; checkpoints are stored
    after = petl_zoo.trainable_parameters(model)
    gates = len(plan["pruned"]) if kc == "kc_gate" else 0
    assert after["method"] == before["method"] // 2 + gates
    if kc == "no_kc":
        assert after["stored"] == after["method"]
    elif kc == "kc_gate":
        assert after["stored"] == before["stored"] + gates
    else:
        sources = set(plan["share"].values())
        assert after["stored"] == before["stored"] + sum(pos[s].size for s in sources)


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("kc", ["kc_gate", "kc_offset"])
def test_knowledge_checkpoint_keeps_the_function_at_pruning(family, kc):
    s = scenario(family, kc)
    torch.testing.assert_close(s.pruned, s.unpruned, atol=1e-6, rtol=0)
    # without the checkpoint the shared adapters replace the pruned ones and the function changes
    plain = scenario(family, "no_kc")
    torch.testing.assert_close(plain.unpruned, s.unpruned, atol=1e-6, rtol=0)  # same run up to pruning
    assert (plain.pruned - plain.unpruned).abs().max() > 1e-4


@pytest.mark.parametrize("kc", list(KC_VARIANTS))
def test_one_step_moves_every_position_of_a_shared_adapter(kc):
    model, s = pruned_copy("vit", kc)
    method = model.petl_method
    plan = method.get_state()
    source = plan["share"][next(p for p in plan["pruned"] if p.startswith("mlp."))]
    users = [source] + [p for p, k in plan["share"].items() if k == source]
    assert len(users) >= 2

    calls: list[torch.Tensor] = []
    shared = method.positions[source].module
    handle = shared.register_forward_hook(lambda m, a, out: calls.append(out.detach()))

    def position_outputs() -> dict[str, torch.Tensor]:
        """What the shared adapter adds at each position it serves, on a fixed batch."""
        caught = {}
        hooks = []
        for name in users:
            pos = method.positions[name]
            slot = f"{pos.slot}_shared" if name != source and kc != "no_kc" else pos.slot
            catch = lambda m, a, out, n=name: caught.__setitem__(n, out.detach())  # noqa: E731
            hooks.append(pos.container[slot].register_forward_hook(catch))
        model.eval()
        with torch.no_grad():
            model(s.data[0][0])
        for h in hooks:
            h.remove()
        return caught

    before = position_outputs()
    opt = torch.optim.SGD(trainable(model), lr=0.5)
    ctx = TrainContext(epochs=2, epoch=1)
    for _ in range(2):  # with a gate at 0 the first step moves the gate, the second the shared weights
        run_epoch(model, ctx, s.data[:1], opt)
    calls.clear()
    after = position_outputs()
    handle.remove()
    for name in users:
        assert (after[name] - before[name]).abs().max() > 1e-6, name
    assert len(calls) == len(users)  # one module object, called once per position it serves


def test_shared_gradient_is_the_sum_over_its_positions():
    model, s = pruned_copy("vit", "no_kc")
    method = model.petl_method
    plan = method.get_state()
    source = plan["share"][next(p for p in plan["pruned"] if p.startswith("mlp."))]
    shared = method.positions[source].module
    x, y = s.data[0]
    model.train()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    total = shared.up.weight.grad.clone()
    # untie: give each pruned position its own copy (same values); the gradient splits among them
    copies = []
    for name in (p for p, k in plan["share"].items() if k == source):
        pos = method.positions[name]
        copies.append(BottleneckAdapter(48, 8, 0.1))
        copies[-1].load_state_dict(shared.state_dict())
        pos.container[pos.slot] = copies[-1]
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    split = shared.up.weight.grad + sum(c.up.weight.grad for c in copies)
    assert (split - shared.up.weight.grad).abs().max() > 1e-6  # the copies did get gradients
    torch.testing.assert_close(total, split, atol=1e-6, rtol=1e-5)


# -- state, save/load, merge ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("kc", list(KC_VARIANTS))
def test_save_load_after_pruning_is_exact(family, kc, tmp_path):
    model, s = pruned_copy(family, kc)
    method = model.petl_method
    ctx = TrainContext(epochs=2, epoch=1)
    run_epoch(model, ctx, s.data, torch.optim.SGD(trainable(model), lr=0.05))  # gates and offsets move
    model.eval()
    x = s.data[0][0]
    with torch.no_grad():
        tuned = model(x)
    petl_zoo.save_adapter(model, tmp_path / "ad")
    saved = petl_zoo.read_adapter_config(tmp_path / "ad")
    assert saved["state"] == method.get_state()

    fresh = build(family)
    petl_zoo.load_adapter(fresh, tmp_path / "ad")
    loaded = fresh.petl_method
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), tuned, atol=1e-6, rtol=0)
    assert loaded.get_state() == method.get_state()
    assert petl_zoo.trainable_parameters(fresh) == petl_zoo.trainable_parameters(model)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    for name, source in loaded.plan["share"].items():
        assert loaded.shared_module(name) is loaded.positions[source].module


def test_set_state_rejects_a_plan_for_another_model():
    state = scenario("vit", "kc_gate").model.petl_method.get_state()
    other = petl_zoo.create("pear", tiny_vit(depth=2), prune_epoch=1)
    with pytest.raises(ValueError, match="saved plan is for positions"):
        other.petl_method.set_state(other, state)
    fresh = petl_zoo.create("pear", build("vit"), prune_epoch=1, knowledge_checkpoint=False, base="both")
    with pytest.raises(ValueError, match="knowledge_checkpoint=True, the config has False"):
        fresh.petl_method.set_state(fresh, state)


def test_unpruned_save_load_round_trip(tmp_path):
    model = pear("vit")
    x = batches(1)[0][0]
    with torch.no_grad():
        tuned = model(x)
    petl_zoo.save_adapter(model, tmp_path / "ad")
    fresh = petl_zoo.load_adapter(build("vit"), tmp_path / "ad")
    assert not fresh.petl_method.pruned
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), tuned, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kc", ["kc_gate", "kc_offset"])
def test_lora_base_merges_checkpoints_into_the_weight(kc):
    model, s = pruned_copy("vit", kc, base="lora")
    run_epoch(model, TrainContext(epochs=2, epoch=1), s.data, torch.optim.SGD(trainable(model), lr=0.05))
    model.eval()
    x = s.data[0][0]
    qkv = model.blocks[0].attn.qkv
    w0 = qkv.base.weight.detach().clone()
    with torch.no_grad():
        tuned = model(x)
        petl_zoo.merge(model)
        assert (qkv.base.weight - w0).abs().max() > 0
        torch.testing.assert_close(model(x), tuned, atol=1e-5, rtol=0)
        petl_zoo.unmerge(model)
        torch.testing.assert_close(model(x), tuned, atol=1e-6, rtol=0)
    assert torch.equal(qkv.base.weight, w0)


def test_adapter_base_is_not_mergeable():
    model = pear("vit")
    with pytest.raises(ValueError, match="cannot be merged"):
        petl_zoo.merge(model)


# -- callbacks -----------------------------------------------------------------------------------


def test_prune_epoch_must_fall_inside_training():
    model = pear("vit", prune_epoch=3)
    with pytest.raises(ValueError, match=r"prune_epoch=3 but training runs 3 epoch\(s\).*<= 2"):
        model.petl_method.on_train_start(model, None, TrainContext(epochs=3))


def test_pruning_without_scores_is_an_error():
    model = pear("vit")
    with pytest.raises(RuntimeError, match="no gradients were scored during epoch 0"):
        model.petl_method.on_epoch_end(model, 0, TrainContext(epochs=2))


def test_two_epoch_loop_with_optimizer_rebuild():
    """The loop the trainer runs: on_train_start, backward callbacks, prune at the end of epoch 0,
    optimizer rebuilt on the new trainable set, epoch 1 trains the pruned model."""
    model = pear("vit", base="both")
    method = model.petl_method
    data = batches()
    ctx = TrainContext(epochs=2, steps_per_epoch=len(data))
    method.on_train_start(model, data, ctx)
    opt = torch.optim.AdamW(trainable(model), lr=1e-3)
    for epoch in range(2):
        ctx.epoch = epoch
        run_epoch(model, ctx, data, opt)
        ids = [id(p) for p in trainable(model)]
        method.on_epoch_end(model, epoch, ctx)
        if [id(p) for p in trainable(model)] != ids:
            assert epoch == 0
            opt = torch.optim.AdamW(trainable(model), lr=1e-3)
    assert method.pruned and method.get_state()["epoch"] == 0
    assert method.get_state()["batches"] == len(data)


# -- the trainer ---------------------------------------------------------------------------------


def write_tiny_task(root, name: str = "tiny") -> None:
    """A custom task folder (random 32x32 images, 3 classes) in the VTAB-1K list-file layout."""
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {}
    for split, n in (("train", 12), ("val", 4), ("test", 8)):
        lines[split] = []
        for i in range(n):
            rel = f"images/{split}/{i}.png"
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / rel)
            lines[split].append(f"{rel} {i % 3}")
    lines["trainval"] = lines["train"] + lines["val"]
    for split, file in vtab.SPLITS.items():
        (root / name / file).write_text("\n".join(lines[split]) + "\n", encoding="utf-8")


def test_trainer_prunes_after_epoch_one_and_resumes_the_pruned_structure(tmp_path):
    from petl_zoo.train import main

    write_tiny_task(tmp_path / "data")
    common = [
        "--method", "pear", "--model", "vit_tiny_patch16_224",
        "--model-kwargs", "img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3",
        "--no-pretrained", "--task", "tiny", "--data-root", str(tmp_path / "data"), "--epochs", "2",
        "--warmup-epochs", "0", "--batch-size", "4", "--opt", "prune_epoch=1", "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    state = saved["state"]
    assert state["epoch"] == 0 and state["batches"] == 4 and len(state["pruned"]) == 1
    per_adapter = 48 * 8 + 8 + 8 * 48 + 48
    assert result["trainable_params"]["method"] == per_adapter + 1  # one adapter + the pruned position's gate
    assert result["trainable_params"]["stored"] == 2 * per_adapter + 1
    assert result["test_acc_best"] is not None and result["test_acc_last"] is not None

    # killed after the pruning epoch, then resumed: set_state rebuilds the pruned structure exactly
    assert main([*common, "--out", str(tmp_path / "killed"), "--stop-after-epoch", "1"]) == 137
    assert main([*common, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "killed" / "adapter_config.json").read_text())["state"]
    assert resumed == state
    a = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
