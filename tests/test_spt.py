"""SPT: the budget sweep against the authors' code, sensitivities, counts, merge, save/load, state;
SPT-Adapter's selection, counts and forward against the authors' code."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import perturb_, tiny_vit

import petl_zoo
from petl_zoo.methods.spt import BiasEntries, FlatSparseDelta, NormAffine, SptAdapter, SptLora, select
from petl_zoo.registry import TrainContext


# -- the authors' code, re-hosted (ziplab/SPT @ e385f67, engine.py:L92-293, on CPU, one budget) ---------
def authors_param_num(structured_type, in_dim, out_dim, low_rank_dim):
    if structured_type == "lora":
        return in_dim * low_rank_dim + low_rank_dim * out_dim
    return out_dim * low_rank_dim + low_rank_dim * out_dim + low_rank_dim + out_dim


def authors_sweep(grad_dict, target, low_rank_dim=8, structured_type="lora", alpha=10.0, beta=5.0):
    """engine.py:L162-299 for one budget ``target`` (their param_num_dict has several)."""
    vit_operation_dict = {"q": 0, "k": 1, "v": 2, "proj": 3, "fc1": 4, "fc2": 5}
    grad_shapes, grad_shapes_int = {}, {}
    grad_skip_kwd_list = ["head", "cls_token", "patch_embed", "pos_embed"]
    grad_matrix_kwd_list = [".q.", ".k.", ".v.", "proj", "fc"]
    grad_vector_kwd_list = ["norm", "bias"]
    for key in grad_dict.keys():
        if not any(kwd in key for kwd in grad_skip_kwd_list):
            grad_shapes[key] = grad_dict[key].shape
            grad_shapes_int[key] = np.cumprod(list(grad_dict[key].shape))[-1]
    large_tensor = torch.cat([grad_dict[key].flatten() for key in grad_shapes.keys()])
    param_num_dict = {target: 0}
    res = None
    for param_num in range(1, 80):
        param_num = param_num * 0.02
        _, indexes = large_tensor.topk(min(math.ceil(param_num * 1e6), large_tensor.numel()))  # ours: min
        tmp_large_tensor = torch.zeros_like(large_tensor)
        tmp_large_tensor[indexes] = 1.0
        tmp_large_tensor_list = tmp_large_tensor.split([int(s) for s in grad_shapes_int.values()])
        structured_param_num, structured_names, tuned_vectors = 0, [], []
        unstructured_param_num = 0
        unstructured_name_shapes, unstructured_grad_mask = {}, {}
        for i, key in enumerate(grad_shapes.keys()):
            grad_sum = tmp_large_tensor_list[i].view(grad_shapes[key]).sum()
            if any(kwd in key for kwd in grad_vector_kwd_list):
                if len(grad_shapes[key]) == 1 and grad_sum >= list(grad_shapes[key])[0] / beta:
                    structured_param_num += list(grad_shapes[key])[0]
                    tuned_vectors.append(key)
                else:
                    unstructured_param_num += grad_sum.item()
                    unstructured_name_shapes[key] = grad_shapes[key]
                    unstructured_grad_mask[key] = tmp_large_tensor_list[i].view(grad_shapes[key])
            elif any(kwd in key for kwd in grad_matrix_kwd_list):
                cur = authors_param_num(
                    structured_type, grad_shapes[key][1], grad_shapes[key][0], low_rank_dim
                )
                if grad_sum >= cur / alpha:
                    structured_param_num += cur
                    structured_names.append(key)
                else:
                    unstructured_param_num += grad_sum
                    unstructured_name_shapes[key] = grad_shapes[key]
                    unstructured_grad_mask[key] = tmp_large_tensor_list[i].view(grad_shapes[key])
            else:
                raise NotImplementedError
        tuned_matrices = [[0, 0, 0, 0, 0, 0] for _ in range(12)]
        for name in structured_names:
            attr = name.split(".")
            if len(attr) != 5:
                continue
            tuned_matrices[int(attr[1])][int(vit_operation_dict[attr[3]])] = 1
        for k in param_num_dict:
            v = param_num_dict[k]
            total_params = (unstructured_param_num + structured_param_num + 768) / 1e6
            if abs(total_params - k) <= abs(v - k):
                param_num_dict[k] = total_params
                res = {
                    "unstructured_name_shapes": unstructured_name_shapes,
                    "params": total_params,
                    "unstructured_indexes": torch.nonzero(
                        torch.cat([unstructured_grad_mask[key].flatten() for key in unstructured_grad_mask])
                    ).squeeze(-1)
                    if unstructured_param_num != 0
                    else torch.zeros(0).long(),
                    "tuned_matrices": tuned_matrices,
                    "tuned_vectors": tuned_vectors,
                    "structured_names": structured_names,
                }
    return res


def authors_name(ours: str) -> str:
    """Our ranked-tensor names on a fused-qkv timm ViT -> the authors' separate-qkv names."""
    for t in ("q", "k", "v"):
        ours = ours.replace(f".attn.qkv.{t}.", f".attn.{t}.")
    return ours


def authors_unstructured(res) -> dict[str, list[int]]:
    """Their flat indexes over the concatenated unstructured tensors, split per tensor."""
    sizes = [int(np.prod(list(s))) for s in res["unstructured_name_shapes"].values()]
    mask = torch.zeros(sum(sizes))
    mask[res["unstructured_indexes"]] = 1.0
    out = {}
    for key, part in zip(res["unstructured_name_shapes"], mask.split(sizes)):
        idx = part.nonzero().flatten().tolist()
        if idx:
            out[key] = idx
    return out


# -- helpers -------------------------------------------------------------------------------------------
def data(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)
    ]


def spt_model(seed: int = 0, **options):
    torch.manual_seed(seed)
    model = tiny_vit()
    return petl_zoo.create("spt", model, **options)


def skewed_scores(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Heavy-tailed sensitivities whose scale differs per tensor (10^-1.5..1): at a budget of 0.01 M the
    sweep mixes the three forms on the tiny host (56,640 ranked entries)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (tensor, _) in model.petl_method.tensors(model).items():
        scale = 10 ** (-1.5 * torch.rand(1, generator=g).item())
        out[name] = torch.rand(tensor.shape, generator=g) ** 4 * scale
    return out


# -- selection parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "form,budget,seed",
    [("lora", 0.01, 0), ("lora", 0.01, 1), ("lora", 0.02, 2), ("adapter", 0.01, 0), ("adapter", 0.02, 1)],
)
def test_selection_equals_the_authors_on_the_same_sensitivities(form, budget, seed):
    """engine.py's sweep with the same ``structured_type`` (adapter cost: 2 r out + r + out)."""
    model = spt_model(form=form)
    scores = skewed_scores(model, seed)
    ours = select(scores, budget, form=form)
    theirs = authors_sweep({authors_name(k): v for k, v in scores.items()}, budget, structured_type=form)
    assert [authors_name(n) for n in ours["structured"]] == theirs["structured_names"]
    assert [authors_name(n) for n in ours["vectors"]] == theirs["tuned_vectors"]
    assert {authors_name(k): v for k, v in ours["unstructured"].items()} == authors_unstructured(theirs)
    assert ours["params"] == round(float(theirs["params"]) * 1e6)
    kinds = (bool(ours["structured"]), bool(ours["vectors"]), bool(ours["unstructured"]))
    assert kinds == ((True, True, True) if budget == 0.01 else (True, True, False))


def test_sensitivities_are_summed_squared_gradients_and_select_on_the_model():
    model = spt_model(budget=0.04)
    batches = data(3)
    method = model.petl_method
    scores = method.sensitivities(model, batches, TrainContext())
    ref = spt_model(budget=0.04)
    ref.train()
    expected = {}
    for x, y in batches[:3]:
        ref.zero_grad()
        for p in ref.parameters():
            p.requires_grad_(True)
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        for name, (_tensor, place) in ref.petl_method.tensors(ref).items():
            if len(place) == 2:
                site, kind = place
                g = getattr(site.linear, kind).grad[site.start : site.stop]
            else:
                parent, attr, kind = place
                g = getattr(getattr(parent, attr), kind).grad
            expected[name] = expected.get(name, 0) + g**2
    assert scores.keys() == expected.keys() and len(scores) == 2 * 16 + 2
    for name in scores:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-5, atol=0)
    assert all(p.grad is None for p in model.parameters())
    method.on_train_start(model, batches, TrainContext())
    assert method.get_state()["selection"] == {
        **select(scores, 0.04),
        "params": select(scores, 0.04)["params"],
    }


# -- counts ----------------------------------------------------------------------------------------------
def vit_b():
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100, device="meta")


def test_counts_on_vit_b16_equal_the_authors_budget_rule():
    model = petl_zoo.create("spt", vit_b())
    b = "blocks.{}."
    selection = {
        "structured": [f"blocks.{i}.attn.qkv.{t}.weight" for i in range(12) for t in ("q", "v")],
        "vectors": [b.format(0) + "norm1.weight", b.format(0) + "attn.qkv.q.bias", "norm.bias"],
        "unstructured": {
            b.format(0) + "mlp.fc1.weight": list(range(0, 1000, 10)),  # 100 entries
            b.format(1) + "norm2.bias": list(range(10)),  # counted, not trained (the authors' too)
            b.format(3) + "attn.proj.bias": [1, 5, 7, 9, 11],
        },
    }
    rule = 24 * authors_param_num("lora", 768, 768, 8) + 3 * 768 + 100 + 10 + 5 + 768
    selection["params"] = rule
    model.petl_method.set_state(model, {"selection": selection})
    counts = petl_zoo.trainable_parameters(model)
    assert counts["method"] == rule - 768 - 10 == 294_912 + 3 * 768 + 105
    assert counts["head"] == 76_900
    # every matrix structured: 12 * (4 * 12,288 + 2 * 30,720)
    model = petl_zoo.create("spt", vit_b())
    names = [n for n in model.petl_method.tensors(model) if n.endswith("weight") and "norm" not in n]
    model.petl_method.set_state(
        model, {"selection": {"structured": names, "vectors": [], "unstructured": {}, "params": 0}}
    )
    assert len(names) == 72 and petl_zoo.trainable_parameters(model)["method"] == 1_327_104
    assert all(
        isinstance(m, SptLora) for n, m in model.named_modules() if n.endswith("spt_blocks_0_attn_qkv_q")
    )


# -- merge, save/load, state -------------------------------------------------------------------------------
#: Every form on the tiny host: LoRA, sparse matrix entries, whole and partial biases, LayerNorm vectors.
HAND = {
    "structured": ["blocks.0.attn.qkv.q.weight", "blocks.1.mlp.fc2.weight"],
    "vectors": ["blocks.0.norm1.weight", "blocks.0.attn.qkv.v.bias", "norm.bias"],
    "unstructured": {
        "blocks.1.mlp.fc1.weight": [0, 5, 99, 4000],
        "blocks.0.attn.proj.bias": [2, 3],
        "blocks.1.norm2.weight": [1],
    },
    "params": 0,
}


def test_merge_is_exact_without_bias_and_blocked_with_it():
    model = spt_model(bias=False)
    method = model.petl_method
    method.apply_selection(model, HAND)
    kinds = {type(m) for m in model.modules()}
    assert {SptLora, FlatSparseDelta, NormAffine} <= kinds and BiasEntries not in kinds
    perturb_(model)
    x = data(1)[0][0]
    model.eval()
    with torch.no_grad():
        before = model(x)
    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=1e-5)
    with_bias = spt_model()
    with_bias.petl_method.apply_selection(with_bias, HAND)
    blockers = petl_zoo.layers.merge_blockers(with_bias)[0]
    assert blockers and all("BiasEntries" in b for b in blockers)


def test_save_load_and_set_state_restore_the_selection(tmp_path):
    model = spt_model(budget=0.04)
    method = model.petl_method
    assert method.get_state() == {}
    method.on_train_start(model, data(), TrainContext())
    perturb_(model)
    state = method.get_state()
    petl_zoo.save_adapter(model, tmp_path / "ad")
    torch.manual_seed(0)  # the same backbone
    fresh = petl_zoo.load_adapter(tiny_vit(), tmp_path / "ad")
    assert fresh.petl_method.get_state() == state
    x = data(1)[0][0]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    other = spt_model(seed=3, budget=0.04)
    other.petl_method.set_state(other, state)
    ours = {n: m.indices for n, m in model.named_modules() if isinstance(m, (FlatSparseDelta, BiasEntries))}
    theirs = {n: m.indices for n, m in other.named_modules() if isinstance(m, (FlatSparseDelta, BiasEntries))}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    other.petl_method.on_train_start(other, data(seed=5), TrainContext())  # selected: a no-op
    assert other.petl_method.get_state() == state
    with pytest.raises(ValueError, match="already selected"):
        other.petl_method.set_state(other, state)


# -- SPT-Adapter ---------------------------------------------------------------------------------------------
def test_adapter_cost_decides_differently_from_lora():
    """A [48, 16] matrix holding 60 of the top 20,000 entries: LoRA (cost 512, threshold 51.2) is
    structured, the adapter (cost 824, threshold 82.4) is not, in ours as in the authors' rule."""
    g = torch.Generator().manual_seed(0)
    fc2, norm = torch.rand(48, 16, generator=g), torch.rand(20_200, generator=g)
    fc2.view(-1)[:60] += 10.0
    norm[:19_940] += 10.0
    scores = {"blocks.0.mlp.fc2.weight": fc2, "blocks.0.norm1.weight": norm}
    for form, structured, params in (("lora", ["blocks.0.mlp.fc2.weight"], 21_480), ("adapter", [], 21_028)):
        ours = select(scores, 0.02, form=form)
        theirs = authors_sweep(scores, 0.02, structured_type=form)
        assert ours["structured"] == theirs["structured_names"] == structured
        assert ours["params"] == round(float(theirs["params"]) * 1e6) == params


def test_adapter_counts_equal_the_authors_rule():
    """Trained = the rule's count - 768 (cls_token) - unstructured LayerNorm entries, on the tiny host after
    a real selection and on ViT-B/16 with every matrix structured: 12 * (5 * 13,064 + 52,232)."""
    model = spt_model(form="adapter", budget=0.01)
    model.petl_method.on_train_start(model, data(), TrainContext())
    chosen = model.petl_method.get_state()["selection"]
    norm_entries = sum(len(v) for k, v in chosen["unstructured"].items() if "norm" in k)
    assert chosen["structured"] and petl_zoo.trainable_parameters(model)["method"] == (
        chosen["params"] - 768 - norm_entries
    )
    assert authors_param_num("adapter", 768, 768, 8) == 13_064
    assert authors_param_num("adapter", 768, 3072, 8) == 52_232
    model = petl_zoo.create("spt", vit_b(), form="adapter")
    names = [n for n in model.petl_method.tensors(model) if n.endswith("weight") and "norm" not in n]
    model.petl_method.set_state(
        model, {"selection": {"structured": names, "vectors": [], "unstructured": {}, "params": 0}}
    )
    total = sum(52_232 if "fc1" in n else 13_064 for n in names)
    assert total == 12 * (5 * 13_064 + 52_232) == 1_410_624
    assert petl_zoo.trainable_parameters(model)["method"] == total


def authors_structured(h, p):
    """StructuredTuningModule(structured_type='adapter').forward in eval (L287-288): up(GELU(down(h)))."""
    return F.linear(F.gelu(F.linear(h, p.down.weight, p.down.bias)), p.up.weight, p.up.bias)


def authors_linear(layer):
    """The authors' Linear at this site: the frozen weight plus its trained sparse entries (their
    ``LinearSPTSparseGrad``), the frozen bias."""
    if not hasattr(layer, "deltas"):
        return layer.weight, layer.bias
    sparse = [d.sparse_weight() for d in layer.deltas.values() if isinstance(d, FlatSparseDelta)]
    return layer.base.weight + sum(sparse), layer.base.bias


def authors_seq_block(block, adapters, q_shift, x):
    """BlockSPTSeq.forward (L673-676) with AttentionSPTSeq (L406-441) and MlpSPTSeq (L538-554), eval mode,
    on our block's frozen weights (timm's fused qkv split as the authors' q, k, v); ``adapters``: target ->
    our SptAdapter (its tensors), ``q_shift``: the trained part of q's bias (the authors train q.bias)."""
    qkv, attn = block.attn.qkv.base, block.attn
    B, N, C = x.shape
    H = attn.num_heads
    h = block.norm1(x)
    out = {}
    for i, t in enumerate(("q", "k", "v")):
        bias = qkv.bias[i * C : (i + 1) * C] + (q_shift if t == "q" else 0)
        out[t] = F.linear(h, qkv.weight[i * C : (i + 1) * C], bias)
        if t in adapters:
            out[t] = out[t] + authors_structured(out[t], adapters[t])
    q, k, v = (out[t].reshape(B, N, H, C // H).permute(0, 2, 1, 3) for t in ("q", "k", "v"))
    a = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(dim=-1)
    y = (a @ v).transpose(1, 2).reshape(B, N, C)
    delta = authors_structured(y, adapters["proj"]) if "proj" in adapters else 0.0
    x = x + F.linear(y, *authors_linear(attn.proj)) + delta
    m = F.linear(block.norm2(x), *authors_linear(block.mlp.fc1))
    if "fc1" in adapters:
        m = m + authors_structured(m, adapters["fc1"])
    m = F.linear(F.gelu(m), *authors_linear(block.mlp.fc2))
    if "fc2" in adapters:
        m = m + authors_structured(m, adapters["fc2"])
    return x + m


ADAPTER_HAND = {
    "structured": [f"blocks.0.{p}.weight" for p in ("attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "attn.proj")]
    + [
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "blocks.1.attn.qkv.v.weight",
        "blocks.1.mlp.fc1.weight",
    ],
    "vectors": ["blocks.0.attn.qkv.q.bias"],
    "unstructured": {"blocks.1.attn.proj.weight": [0, 7, 100]},
    "params": 0,
}


def test_adapter_forward_and_gradients_equal_the_authors_seq_blocks_fp64():
    torch.manual_seed(0)
    model = petl_zoo.create("spt", tiny_vit().double(), form="adapter")
    model.petl_method.apply_selection(model, ADAPTER_HAND)
    perturb_(model)
    model.eval()
    x = torch.randn(2, 17, 48, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 17, 48, dtype=torch.float64)
    for i, block in enumerate(model.blocks):
        found = {n.split("_")[-1]: m for n, m in block.named_modules() if isinstance(m, SptAdapter)}
        adapters = {t: found[t] for t in ("q", "k", "v", "proj", "fc1", "fc2") if t in found}
        assert set(adapters) == ({"q", "k", "v", "proj", "fc1", "fc2"} if i == 0 else {"v", "fc1"})
        shift = block.attn.qkv.deltas["spt_blocks_0_attn_qkv_q_bias"].values if i == 0 else 0.0
        trained = [p for p in block.parameters() if p.requires_grad] + [x]
        ours, theirs = block(x), authors_seq_block(block, adapters, shift, x)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
        g_ours = torch.autograd.grad((ours * r).sum(), trained)
        g_theirs = torch.autograd.grad((theirs * r).sum(), trained)
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert any("SptAdapter" in b for b in petl_zoo.layers.merge_blockers(model)[0])


def test_adapter_init_identity_dropouts_and_save_load(tmp_path):
    model = spt_model(form="adapter", budget=0.01)
    x = data(1)[0][0]
    model.eval()
    with torch.no_grad():
        base = model(x)
    model.train()
    model.petl_method.on_train_start(model, data(), TrainContext())
    found = [m for m in model.modules() if isinstance(m, SptAdapter)]
    assert found and all(m.up.weight.abs().sum() == 0 and m.down.bias.abs().sum() > 0 for m in found)
    assert {type(m.input_dropout).__name__ for m in found} == {"Dropout", "Identity"}  # proj: none
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), base)  # the backbone at init
    perturb_(model)
    state = model.petl_method.get_state()
    petl_zoo.save_adapter(model, tmp_path / "ad")
    torch.manual_seed(0)
    fresh = petl_zoo.load_adapter(tiny_vit(), tmp_path / "ad")
    assert fresh.petl_method.get_state() == state and fresh.petl_method.config.form == "adapter"
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x)) and not torch.equal(model(x), base)
