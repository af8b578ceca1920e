"""GPS: selection against the authors' rule, masked-update parity, SupCon, counts, merge, round trips."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from conftest import perturb_, tiny_vit
from torch.nn import functional as F

import petl_zoo
from petl_zoo.importance import row_topk
from petl_zoo.methods.gps import GpsBias, SparseDelta, supcon_loss, two_views
from petl_zoo.registry import TrainContext


# -- the authors' code, re-hosted (FightingFighting/GPS @ 72e0c31) ----------------------------------
def authors_mask(grad: np.ndarray, times_para: int) -> np.ndarray:
    """utils/pruning.py:L14-31 for one weight: 1 = frozen, 0 = trained (conv weights flattened)."""
    shape = grad.shape
    tensor = grad.reshape(shape[0], -1)
    new_mask = np.ones_like(tensor)
    for ind in range(times_para):
        max_index = abs(tensor).argsort(1)[:, -(ind + 1)]
        one_hot_temp = ~np.eye(max(tensor.shape))[max_index][:, : tensor.shape[1]].astype(bool)
        new_mask = new_mask.astype(int) & one_hot_temp.astype(np.float32).astype(int)
        new_mask = new_mask.astype(np.float32)
    return new_mask.reshape(shape)


def authors_supcon(features, labels, temperature=0.07, base_temperature=0.07):
    """utils/loss_utils.py:L17-97 (contrast_mode 'all', normalize=True)."""
    features = F.normalize(features, dim=2)
    batch_size = features.shape[0]
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).to(features.dtype)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature, anchor_count = contrast_feature, contrast_count
    logits = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(logits, dim=1, keepdim=True)
    logits = logits - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0
    )
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def data(n=2, b=6, classes=3, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, size, size, generator=g), torch.arange(b) % classes) for _ in range(n)]


def gps_model(seed=0, dtype=torch.float32, **options):
    torch.manual_seed(seed)
    model = tiny_vit().to(dtype)
    petl_zoo.create("gps", model, **options)
    return model


# -- selection --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_row_topk_equals_the_authors_mask(k):
    g = torch.randn(40, 27, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    mask = authors_mask(g.numpy(), k)
    ours = torch.ones(40, 27).scatter(1, row_topk(g, k), 0.0)
    assert np.array_equal(ours.numpy(), mask)


def test_selection_on_the_model_equals_the_authors_on_the_same_gradients():
    model = gps_model()
    method = petl_zoo.method_of(model)
    grads = method.gradients(model, data(), TrainContext())
    assert set(grads) == set(method.sites(model)) and "patch_embed.proj" in grads
    assert all(p.grad is None for p in model.parameters())
    method.on_train_start(model, data(), TrainContext())
    for name, (delta, weight, rows) in method.sites(model).items():
        mask = authors_mask(grads[name].numpy().reshape(weight[rows].shape), 1)
        ours = torch.ones(delta.rows, delta.cols).scatter(1, delta.indices, 0.0)
        assert np.array_equal(ours.numpy().reshape(mask.shape), mask), name
        assert torch.equal(delta.values, torch.zeros_like(delta.values))


def test_gradients_are_the_summed_supcon_gradients_of_the_frozen_weights():
    model = gps_model()
    method = petl_zoo.method_of(model)
    views = [((torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1]))] * 2
    grads = method.gradients(model, views, TrainContext())
    torch.manual_seed(0)
    plain = tiny_vit().train()  # the same host, unpatched
    w = plain.blocks[1].mlp.fc1.weight
    w.requires_grad_(True)
    for (v1, v2), y in views:
        f = plain.forward_head(plain.forward_features(torch.cat([v1, v2])), pre_logits=True)
        authors_supcon(torch.stack(f.split(4), dim=1), y).backward()
    torch.testing.assert_close(grads["blocks.1.mlp.fc1"], w.grad, rtol=1e-5, atol=1e-7)


def test_supcon_equals_the_authors():
    f = torch.randn(6, 2, 10, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 1])
    ours, theirs = supcon_loss(f, y), authors_supcon(f, y)
    assert abs(float((ours - theirs).detach())) < 1e-12


def test_two_views_are_seeded_crops_of_the_input_shape():
    x = torch.randn(3, 3, 16, 16)
    a = two_views(x, torch.Generator().manual_seed(0))
    b = two_views(x, torch.Generator().manual_seed(0))
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and a[0].shape == x.shape
    assert not torch.equal(a[0], a[1])


# -- training: one step of ours == the authors' masked full-weight step -------------------------------
@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_one_step_equals_the_masked_full_weight_update(opt):
    model = gps_model(dtype=torch.float64, bias=False, patch_embed=True)
    method = petl_zoo.method_of(model)
    batches = [(x.double(), y) for x, y in data()]
    method.on_train_start(model, batches, TrainContext())
    theirs = copy.deepcopy(model)
    petl_zoo.merge(theirs, unload=True)  # the plain pretrained model (deltas are 0)
    masks = {}
    for name, (delta, _, _) in method.sites(model).items():
        layer = theirs.get_submodule(name)
        masks[layer.weight] = (
            torch.ones(delta.rows, delta.cols, dtype=torch.float64)
            .scatter(1, delta.indices, 0.0)
            .view_as(layer.weight)
        )
    head = [n for n, _ in model.named_parameters() if n.startswith("head.")]
    for n, p in theirs.named_parameters():
        p.requires_grad_(any(p is w for w in masks) or n in head)
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.0),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
    }[opt]
    ours_opt = make([p for p in model.parameters() if p.requires_grad])
    their_opt = make([p for p in theirs.parameters() if p.requires_grad])
    model.eval(), theirs.eval()
    for x, y in batches:
        for m, o in ((model, ours_opt), (theirs, their_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        for w, mask in masks.items():  # utils/cuda.py:L25-29
            w.grad = torch.where(mask == 1.0, mask - 1.0, w.grad)
        ours_opt.step(), their_opt.step()
    merged = copy.deepcopy(model)
    petl_zoo.merge(merged, unload=True)
    ref = dict(theirs.named_parameters())
    pristine = gps_model(dtype=torch.float64, bias=False)
    petl_zoo.merge(pristine, unload=True)
    base = dict(pristine.named_parameters())
    for n, p in merged.named_parameters():
        assert (p - ref[n]).abs().max() < 1e-10, n
        assert torch.equal(p != base[n], ref[n] != base[n]), n  # the same entries changed


# -- counts -----------------------------------------------------------------------------------------
def test_counts_on_vit_b16_equal_the_authors():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100, device="meta")
    petl_zoo.create("gps", model)
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == 167_424  # 83,712 selected weights (k = 1) + 83,712 biases
    assert counts["head"] == 76_900
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=2, device="meta")
    petl_zoo.create("gps", model, k=2, bias=False)
    assert petl_zoo.trainable_parameters(model)["method"] == 2 * 83_712


# -- merge, save/load, state ---------------------------------------------------------------------------
def test_merge_is_exact_without_bias_and_blocked_with_it():
    model = gps_model(bias=False)
    petl_zoo.method_of(model).on_train_start(model, data(), TrainContext())
    perturb_(model)
    x = data(1)[0][0]
    model.eval()
    with torch.no_grad():
        before = model(x)
    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), before, atol=1e-6, rtol=1e-6)
    delta = next(m for m in model.modules() if isinstance(m, SparseDelta))
    assert int((delta.delta_weight(None) != 0).sum()) == delta.values.numel()
    with_bias = gps_model()
    blockers = petl_zoo.layers.merge_blockers(with_bias)[0]
    assert not petl_zoo.is_mergeable(with_bias) and len(blockers) == 8  # the Linears' biases only
    assert all("gps_" in b and "_bias" in b and "patch_embed" not in b for b in blockers)


def test_save_load_and_set_state_restore_the_selection(tmp_path):
    model = gps_model()
    method = petl_zoo.method_of(model)
    assert method.get_state() == {}
    method.on_train_start(model, data(), TrainContext())
    perturb_(model)
    state = method.get_state()
    assert len(state["indices"]["blocks.0.attn.qkv"]) == 144
    petl_zoo.save_adapter(model, tmp_path / "ad")
    torch.manual_seed(0)
    fresh = petl_zoo.load_adapter(tiny_vit(), tmp_path / "ad")
    assert fresh.petl_method.get_state() == state
    x = data(1)[0][0]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # set_state alone (a resumed run: structure first, weights after) rebuilds the same indices
    other = gps_model(seed=0)
    other.petl_method.set_state(other, state)
    ours = {n: d.indices for n, (d, _, _) in method.sites(model).items()}
    for n, (d, _, _) in other.petl_method.sites(other).items():
        assert torch.equal(d.indices, ours[n])
    other.petl_method.on_train_start(other, data(seed=5), TrainContext())  # selected: a no-op
    assert other.petl_method.get_state() == state


def test_trainable_tensors_are_fp32_on_a_bf16_host():
    model = gps_model(dtype=torch.bfloat16)
    petl_zoo.method_of(model).on_train_start(model, [(x.bfloat16(), y) for x, y in data(1)], TrainContext())
    own = [m for m in model.modules() if isinstance(m, (SparseDelta, GpsBias))]
    assert own and all(p.dtype == torch.float32 for m in own for p in m.parameters())
    out = model(data(1)[0][0].bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for m in own for p in m.parameters())


def test_ce_loss_and_config_checks():
    model = gps_model(loss="ce", k=2)
    petl_zoo.method_of(model).on_train_start(model, data(), TrainContext())
    assert petl_zoo.method_of(model).get_state()
    with pytest.raises(ValueError):
        gps_model(k=0)


def test_preset_has_the_authors_per_task_k_and_lr():
    from petl_zoo.presets import load_preset

    preset = load_preset("gps", "paper")
    options, recipe = preset.for_task("patch_camelyon")
    assert options["k"] == 2 and recipe["lr"] == 0.004 and recipe["weight_decay"] == 0.0
    options, recipe = preset.for_task("cifar")
    assert options["k"] == 1 and (recipe["lr"], recipe["batch_size"]) == (0.01, 32)
