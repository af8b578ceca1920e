"""Pear: Taylor importance, pruning plan, tied sharing, knowledge checkpoint, counts, save/load, merge."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_swin, tiny_vit
from torch import nn

import petl_zoo
from petl_zoo.methods.adapter import BottleneckAdapter
from petl_zoo.methods.lora import LoraDelta
from petl_zoo.methods.pear import FrozenCheckpoint, GatedShare, OffsetShare, plan_pruning
from petl_zoo.registry import TrainContext


def build(family: str) -> nn.Module:
    """Tiny models with two blocks per sharing group (ViT: 4 blocks; Swin: 2 stages of 2 blocks)."""
    torch.manual_seed(0)
    model = tiny_vit(depth=4) if family == "vit" else tiny_swin(depths=(2, 2))
    return model.eval()


def batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)
    ]


def perturb_(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Random values for every trainable tensor, so adapters are not at their zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


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


def score_and_prune(model: nn.Module, data, epochs: int = 2) -> TrainContext:
    """Train epoch 0 (the scoring epoch for prune_epoch=1) and prune at its end."""
    method = model.petl_method
    ctx = TrainContext(epochs=epochs, steps_per_epoch=len(data))
    method.on_train_start(model, data, ctx)
    run_epoch(model, ctx, data, torch.optim.SGD(trainable(model), lr=0.05))
    model.eval()
    method.on_epoch_end(model, 0, ctx)
    return ctx


def pear(family: str, **options) -> nn.Module:
    model = build(family)
    petl_zoo.create("pear", model, **{"prune_epoch": 1, **options})
    perturb_(model)
    return model


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,match",
    [
        ({"prune_epoch": 0}, "prune_epoch must be >= 1"),
        ({"prune_ratio": 1.0}, r"prune_ratio must be in \(0, 1\), got 1.0"),
        ({"prune_ratio": 0}, r"prune_ratio must be in \(0, 1\)"),
        ({"share": "random"}, "expected one of 'top', 'nearest'"),
        ({"base": "prompt"}, "expected one of 'adapter', 'lora', 'both'"),
        ({"kc_scale": -1.0}, "kc_scale must be a finite number >= 0, got -1.0"),
        ({"base": "lora", "lora_targets": ("q", "x")}, "unknown target 'x'"),
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
                expected[name] += sum(float((p.detach() * p.grad).abs().sum()) for p in pos.module.parameters())
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

KC_VARIANTS = [
    {"knowledge_checkpoint": False},
    {"knowledge_checkpoint": True, "kc_shared": "gate"},
    {"knowledge_checkpoint": True, "kc_shared": "offset"},
]


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("kc", KC_VARIANTS, ids=["no_kc", "kc_gate", "kc_offset"])
def test_pruning_removes_planned_adapters_and_ties_shared_ones(family, kc):
    model = pear(family, base="both", **kc)
    method = model.petl_method
    before = petl_zoo.trainable_parameters(model)
    originals = {n: p.module for n, p in method.positions.items()}
    score_and_prune(model, batches())
    plan = method.get_state()

    # the plan is exactly plan_pruning on the recorded scores
    pos = method.positions
    expected = plan_pruning(
        plan["scores"], {n: p.size for n, p in pos.items()}, {n: p.group for n, p in pos.items()},
        {n: p.block for n, p in pos.items()}, 0.5, "top",
    )
    assert (plan["pruned"], plan["share"]) == expected
    assert len(plan["pruned"]) == len(pos) // 2  # equal sizes within kinds, two positions per group
    assert plan["removed_fraction"] == pytest.approx(0.5)

    live = {id(p) for p in trainable(model)}
    stored = {id(t) for t in petl_zoo.adapter_state_dict(model).values()}
    for name in pos:
        params = list(originals[name].parameters())
        if name in plan["pruned"]:
            assert not any(id(p) in live for p in params), name
            assert all(id(p) in stored for p in params) == kc["knowledge_checkpoint"], name
        else:
            assert all(id(p) in live for p in params), name

    for name, source in plan["share"].items():
        p, k = pos[name], pos[source]
        assert p.group == k.group and name != source
        slot = p.container[p.slot]
        if kc["knowledge_checkpoint"]:
            assert isinstance(slot, FrozenCheckpoint) and slot.module is originals[name]
            extra = p.container[f"{p.slot}_shared"]
            assert isinstance(extra, GatedShare if kc["kc_shared"] == "gate" else OffsetShare)
            slot = extra.shared
        assert slot is k.module is method.shared_module(name)
        for a, b in zip(slot.parameters(), k.module.parameters()):
            assert a is b

    # counts follow the ratio: half the adapter parameters stay trainable; checkpoints are stored
    after = petl_zoo.trainable_parameters(model)
    n_pruned = len(plan["pruned"])
    gates = n_pruned if kc == KC_VARIANTS[1] else 0
    assert after["method"] == before["method"] // 2 + gates
    if not kc["knowledge_checkpoint"]:
        assert after["stored"] == after["method"]
    elif kc["kc_shared"] == "gate":
        assert after["stored"] == before["stored"] + gates
    else:
        sources = set(plan["share"].values())
        assert after["stored"] == before["stored"] + sum(pos[s].size for s in sources)


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("kc", KC_VARIANTS[1:], ids=["kc_gate", "kc_offset"])
def test_knowledge_checkpoint_keeps_the_function_at_pruning(family, kc):
    data = batches()
    x = data[0][0]
    outputs = {}
    for with_kc in (True, False):
        model = pear(family, base="both", **(kc if with_kc else KC_VARIANTS[0]))
        method = model.petl_method
        ctx = TrainContext(epochs=2, steps_per_epoch=len(data))
        run_epoch(model, ctx, data, torch.optim.SGD(trainable(model), lr=0.05))
        model.eval()
        with torch.no_grad():
            unpruned = model(x)
        method.on_epoch_end(model, 0, ctx)
        assert method.pruned
        with torch.no_grad():
            outputs[with_kc] = (unpruned, model(x))
    torch.testing.assert_close(outputs[True][1], outputs[True][0], atol=1e-6, rtol=0)
    # without the checkpoint the shared adapters replace the pruned ones and the function changes
    assert (outputs[False][1] - outputs[False][0]).abs().max() > 1e-4


@pytest.mark.parametrize("kc", KC_VARIANTS, ids=["no_kc", "kc_gate", "kc_offset"])
def test_one_step_moves_every_position_of_a_shared_adapter(kc):
    model = pear("vit", base="adapter", **kc)
    method = model.petl_method
    data = batches()
    ctx = score_and_prune(model, data)
    plan = method.get_state()
    source = plan["share"][plan["pruned"][0]]
    users = [source] + [p for p, s in plan["share"].items() if s == source]
    assert len(users) >= 2

    calls: list[torch.Tensor] = []
    shared = method.positions[source].module
    handle = shared.register_forward_hook(lambda m, a, out: calls.append(out.detach()))

    def position_outputs() -> dict[str, torch.Tensor]:
        """What each user position adds to its MLP output on the batch (shared adapter part)."""
        caught = {}
        hooks = []
        for name in users:
            pos = method.positions[name]
            slot = f"{pos.slot}_shared" if name != source and kc["knowledge_checkpoint"] else pos.slot
            catch = lambda m, a, out, n=name: caught.__setitem__(n, out.detach())  # noqa: E731
            hooks.append(pos.container[slot].register_forward_hook(catch))
        model.eval()
        with torch.no_grad():
            model(data[0][0])
        for h in hooks:
            h.remove()
        return caught

    before = position_outputs()
    calls.clear()
    opt = torch.optim.SGD(trainable(model), lr=0.5)
    ctx.epoch = 1
    for _ in range(2):  # with a gate at 0 the first step moves the gate, the second the shared weights
        run_epoch(model, ctx, data[:1], opt)
    calls.clear()
    after = position_outputs()
    handle.remove()
    for name in users:
        assert (after[name] - before[name]).abs().max() > 1e-6, name
    # one module object is called once per position it serves
    assert len(calls) == len(users)


def test_shared_gradient_is_the_sum_over_its_positions():
    model = pear("vit", base="adapter", knowledge_checkpoint=False)
    method = model.petl_method
    data = batches()
    score_and_prune(model, data)
    plan = method.get_state()
    source = plan["share"][plan["pruned"][0]]
    shared = method.positions[source].module
    x, y = data[0]
    model.train()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    total = shared.up.weight.grad.clone()
    # untie: give the pruned position its own copy (same values), the gradients split between the two
    pruned = [p for p, s in plan["share"].items() if s == source]
    copies = {}
    for name in pruned:
        pos = method.positions[name]
        copies[name] = BottleneckAdapter(48, 8, 0.1)
        copies[name].load_state_dict(shared.state_dict())
        pos.container[pos.slot] = copies[name]
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    split = shared.up.weight.grad + sum(c.up.weight.grad for c in copies.values())
    torch.testing.assert_close(total, split, atol=1e-6, rtol=1e-5)


# -- state, save/load, merge ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("kc", KC_VARIANTS, ids=["no_kc", "kc_gate", "kc_offset"])
def test_save_load_after_pruning_is_exact(family, kc, tmp_path):
    model = pear(family, base="both", **kc)
    method = model.petl_method
    data = batches()
    ctx = score_and_prune(model, data)
    ctx.epoch = 1
    run_epoch(model, ctx, data, torch.optim.SGD(trainable(model), lr=0.05))  # gates and offsets move
    model.eval()
    x = data[0][0]
    with torch.no_grad():
        tuned = model(x)
    petl_zoo.save_adapter(model, tmp_path / "ad")
    saved = petl_zoo.read_adapter_config(tmp_path / "ad")
    assert saved["state"]["pruned"] == method.get_state()["pruned"]

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
    model = pear("vit")
    score_and_prune(model, batches())
    state = model.petl_method.get_state()
    other = petl_zoo.create("pear", tiny_vit(depth=2), prune_epoch=1)
    with pytest.raises(ValueError, match="saved plan is for positions"):
        other.petl_method.set_state(other, state)
    fresh = petl_zoo.create("pear", build("vit"), prune_epoch=1, knowledge_checkpoint=False)
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


@pytest.mark.parametrize("kc", KC_VARIANTS, ids=["no_kc", "kc_gate", "kc_offset"])
def test_lora_base_merges_checkpoints_into_the_weight(kc):
    model = pear("vit", base="lora", **kc)
    data = batches()
    ctx = score_and_prune(model, data)
    ctx.epoch = 1
    run_epoch(model, ctx, data, torch.optim.SGD(trainable(model), lr=0.05))
    model.eval()
    x = data[0][0]
    with torch.no_grad():
        tuned = model(x)
        petl_zoo.merge(model)
        torch.testing.assert_close(model(x), tuned, atol=1e-5, rtol=0)
        petl_zoo.unmerge(model)
        torch.testing.assert_close(model(x), tuned, atol=1e-6, rtol=0)
    assert all(isinstance(m, LoraDelta) for m in model.petl_method.positions.values() for m in [m.module])


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
