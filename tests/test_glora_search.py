"""GLoRA's supernet (``supernet=True``) and evolutionary search (``petl_zoo.methods.glora_search``):
the supernet's storage and counts, seeded sampling and its state, the authors' supernet layer on the
same tensors, the export of a subnet as a fixed ``glora`` (equal outputs and gradients in float64), the
authors' parameter count on a hand-computed case, and the search: budget, winner, seeding."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import perturb_, tiny_vit
from peft_parity import fp64_pair, images64
from test_glora import AUTHORS_LAYERS, AuthorsGlora, authors_sites
from torch import nn

import petl_zoo
from petl_zoo.methods.glora import (
    GloraSuperDelta,
    get_subnet,
    parse_layer_choice,
    set_subnet,
    subnet_parameters,
    supernet_deltas,
)
from petl_zoo.methods.glora_search import (
    accuracy_score,
    evolution_search,
    export_subnet,
    subnet_state_dict,
)


def supernet(seed: int | None = 0, dtype: torch.dtype = torch.float32, **options) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_vit().to(dtype).eval()
    return petl_zoo.create("glora", model, supernet=True, rank=4, seed=seed, **options)


def drawn(model: nn.Module) -> list[dict[str, str]]:
    return [dict(d.choice) for d in supernet_deltas(model)]


# ------------------------------------------------------------------------------------ supernet


def test_supernet_counts():
    """Per site the authors' tensors: ``2 r (out + in)`` (A, B), ``r (in + 1)`` (C), ``2 out`` (D, E)."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    petl_zoo.create("glora", model, supernet=True, rank=4, seed=0)
    assert petl_zoo.trainable_parameters(model)["method"] == 1_603_776
    # qkv 32,260 + proj 16,900 + fc1 39,940 + fc2 44,548 = 133,648 per block
    assert 12 * (32_260 + 16_900 + 39_940 + 44_548) == 1_603_776
    delta = model.blocks[0].attn.qkv.deltas["glora_qkv"]
    shapes = {n: tuple(p.shape) for n, p in delta.named_parameters()}
    assert shapes == {
        "glora_Ad": (2304, 4),
        "glora_Au": (4, 768),
        "glora_Bd": (2304, 4),
        "glora_Bu": (4, 768),
        "glora_Cd": (768, 4),
        "glora_Cu": (4, 1),
        "glora_D": (2304,),
        "glora_E": (2304,),
    }


def test_supernet_is_identity_at_init_and_not_mergeable():
    torch.manual_seed(0)
    plain = tiny_vit().eval()
    model = petl_zoo.create("glora", copy.deepcopy(plain), supernet=True, seed=0)
    images = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        assert torch.equal(model(images), plain(images))
    assert not petl_zoo.is_mergeable(model)


def test_sampling_is_seeded():
    one, two, other = supernet(seed=3), supernet(seed=3), supernet(seed=4)
    images = torch.randn(2, 3, 32, 32)
    seq = {id(m): [] for m in (one, two, other)}
    for _ in range(5):
        for m in (one, two, other):
            m(images)
            seq[id(m)].append(drawn(m))
    assert seq[id(one)] == seq[id(two)] != seq[id(other)]
    assert petl_zoo.method_of(one).get_state() == {"sampler": {"seed": 3, "draws": 5 * 8}}
    torch.manual_seed(11)  # seed=None: the generator takes the run's seed
    model = petl_zoo.create("glora", tiny_vit(), supernet=True)
    assert petl_zoo.method_of(model).sampler.seed == 11


def test_sampler_state_round_trip(tmp_path):
    model = supernet(seed=5)
    perturb_(model, std=0.3)
    images = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        model(images)
    petl_zoo.save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(0)
    loaded = petl_zoo.load_adapter(tiny_vit().eval(), tmp_path / "adapter")
    assert petl_zoo.method_of(loaded).get_state() == {"sampler": {"seed": 5, "draws": 24}}
    assert torch.equal(loaded(images), model(images))  # the same next draws, the same tensors
    assert drawn(loaded) == drawn(model)
    set_subnet(model, AUTHORS_LAYERS)
    petl_zoo.save_adapter(model, tmp_path / "fixed")
    torch.manual_seed(0)
    loaded = petl_zoo.load_adapter(tiny_vit().eval(), tmp_path / "fixed")
    assert get_subnet(loaded) == AUTHORS_LAYERS
    assert torch.equal(loaded(images), model(images))


def test_set_subnet_fixes_the_choice_and_none_samples_again():
    model = supernet()
    images = torch.randn(2, 3, 32, 32)
    set_subnet(model, AUTHORS_LAYERS)
    state = petl_zoo.method_of(model).sampler.state()
    model(images)
    assert drawn(model) == [parse_layer_choice(e) for e in AUTHORS_LAYERS]
    assert petl_zoo.method_of(model).sampler.state() == state  # a fixed subnet draws nothing
    assert get_subnet(model) == AUTHORS_LAYERS
    set_subnet(model, None)
    assert get_subnet(model) is None
    model(images)
    assert petl_zoo.method_of(model).sampler.draws == 8


def test_a_checkpointed_block_reuses_the_draw_of_its_forward():
    """The model's forward pre-hook draws every site's choice once per call; gradient checkpointing runs
    each block again in backward with the same choices (gradients as with that subnet fixed)."""
    model = supernet(seed=3)
    perturb_(model, std=0.3)
    reference = copy.deepcopy(model)
    model.train().set_grad_checkpointing(True)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(images).sum().backward()
    assert petl_zoo.method_of(model).sampler.draws == 8
    set_subnet(reference, tuple(",".join(c[k] for k in "ABCDE") for c in drawn(model)))
    reference.train()(images).sum().backward()
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad is None) == (grads[name].grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5)


def test_supernet_matches_the_authors_layer_on_the_same_tensors():
    """The authors' ``SuperScalableLinear`` tensors copied one to one (no views: the same storage), each
    layer at the choice our supernet drew in that forward; outputs and gradients in float64."""
    ours, theirs = fp64_pair()
    petl_zoo.create("glora", ours, supernet=True, rank=4, seed=2).eval()
    perturb_(ours, std=0.3, params=[p for d in supernet_deltas(ours) for p in d.parameters()])
    images = images64()
    out_ours = ours(images)
    authors = []
    for parent, attr in authors_sites(theirs):
        delta = supernet_deltas(ours)[len(authors)]
        layer = AuthorsGlora(getattr(parent, attr), 4, dict(delta.choice))
        with torch.no_grad():
            for name in ("Ad", "Au", "Bd", "Bu", "Cd", "Cu", "D", "E"):
                getattr(layer, name).copy_(getattr(delta, f"glora_{name}"))
        setattr(parent, attr, layer)
        authors.append(layer)
    assert len({tuple(a.config.values()) for a in authors}) > 1  # the sites drew different choices
    out_theirs = theirs(images)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-10, rtol=0)
    out_ours.sum().backward()
    out_theirs.sum().backward()
    for delta, layer in zip(supernet_deltas(ours), authors):
        for name in ("Ad", "Au", "Bd", "Bu", "Cd", "Cu", "D", "E"):
            mine, their = getattr(delta, f"glora_{name}"), getattr(layer, name)
            zero = torch.zeros_like(mine)
            grads = [zero if t.grad is None else t.grad for t in (mine, their)]
            torch.testing.assert_close(*grads, atol=1e-10, rtol=0)


def test_options_validated():
    with pytest.raises(ValueError, match="layers"):
        supernet(layers=AUTHORS_LAYERS)
    with pytest.raises(ValueError, match="fixed"):
        supernet(d="vector")
    with pytest.raises(ValueError, match="needs supernet=True"):
        petl_zoo.create("glora", tiny_vit(), seed=3)
    model = supernet()
    with pytest.raises(ValueError, match="one 'A,B,C,D,E' entry per site"):
        set_subnet(model, AUTHORS_LAYERS[:3])
    with pytest.raises(ValueError, match="valid"):
        set_subnet(model, ("lora,lora,lora,lora,none",) * 8)
    with pytest.raises(ValueError, match="supernet=True"):
        set_subnet(petl_zoo.create("glora", tiny_vit()), AUTHORS_LAYERS)
    with pytest.raises(ValueError, match="cannot be merged"):
        petl_zoo.merge(model)


# ------------------------------------------------------------------------------ export, counts


def test_exported_subnet_equals_the_supernet_in_fp64():
    """Every form of every support (``AUTHORS_LAYERS``): the fixed ``glora`` built from the supernet's
    views computes the same outputs, and its tensors get the gradients of the views they came from."""
    ours, host = fp64_pair()
    petl_zoo.create("glora", ours, supernet=True, rank=4, seed=0)
    perturb_(ours, std=0.3)
    set_subnet(ours, AUTHORS_LAYERS)
    export_subnet(ours, host)
    images = images64()
    out_super, out_fixed = ours(images), host(images)
    assert torch.equal(out_super, out_fixed)
    out_super.sum().backward()
    out_fixed.sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    exported = _exported_grads(ours, grads)
    for name, p in host.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, exported[name].reshape(p.shape), atol=1e-12, rtol=0)
    trained = petl_zoo.trainable_parameters(host)["method"]
    assert trained == subnet_parameters(ours, AUTHORS_LAYERS) == 5925


def _exported_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``subnet_state_dict`` applied to the supernet's gradients instead of its tensors."""
    originals = {n: p.data for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.data = grads.get(n, torch.zeros_like(p))
        try:
            return subnet_state_dict(model)
        finally:
            for n, p in model.named_parameters():
                p.data = originals[n]


def test_subnet_parameters_hand_computed():
    """tiny ViT: embed 48, MLP 192; sites qkv 48->144, proj 48->48, fc1 48->192, fc2 192->48; rank 4."""
    model = supernet()
    layers = (
        "lora,lora,lora,vector,vector",  # qkv: 4(144+48) * 2 + 4(48+1) + 144 * 2 = 1536 + 196 + 288 = 2020
        "vector,constant,vector,constant,none",  # proj: 48 + 1 + 48 + 1 = 98
        "none,none,none,none,none",  # fc1: 0
        "constant,lora,none,vector,constant",  # fc2: 1 + 4(48+192) + 48 + 1 = 1010
    ) * 2
    assert subnet_parameters(model, layers) == 2 * (2020 + 98 + 0 + 1010) == 6256
    with pytest.raises(ValueError, match="entry per site"):
        subnet_parameters(model, layers[:2])


# ------------------------------------------------------------------------------------- search


def toy_score(calls: list[tuple[str, ...]]):
    """Deterministic: the number of sites whose A is ``lora`` (the best is 2 on the two fc2 sites)."""

    def score(model: nn.Module) -> float:
        layers = get_subnet(model)
        calls.append(layers)
        return float(sum(parse_layer_choice(e)["A"] == "lora" for e in layers))

    return score


SMALL = dict(population=16, select=4, mutations=8, crossovers=8, mutation_prob=0.2, generations=2)


def test_search_finds_the_known_winner_within_the_budget():
    """Budget 0.0025 M = 2500 values; A ``lora`` on an fc2 site (192 -> 48, rank 4) is 960 of them. The
    winner is the first scored subnet with the best score (the authors' stable sort keeps the earlier
    among ties)."""
    model = supernet(targets=("fc2",))
    calls: list[tuple[str, ...]] = []
    result = evolution_search(model, toy_score(calls), budget=0.0025, seed=1, **SMALL)
    assert get_subnet(model) == result.layers and not model.training
    scores = [toy_score([])(_fixed(model, c)) for c in calls]
    assert result.score == 2.0 == max(scores)
    assert result.layers == calls[scores.index(2.0)]
    assert result.params == subnet_parameters(model, result.layers) <= 2500
    assert len(calls) == len(set(calls)) == result.evaluations == 16 * 3  # each subnet scored once
    assert all(subnet_parameters(model, c) <= 2500 for c in calls)
    assert any(subnet_parameters(model, r) > 2500 for r in _random_subnets(model, 20))  # the budget binds
    assert len(result.history) == 2 and result.history[0] <= result.history[1]
    assert max(result.history[-1]) < result.score  # found among the last children (ranked at the end)
    assert [t[1] for t in result.top] == sorted((t[1] for t in result.top), reverse=True)


def _random_subnets(model: nn.Module, n: int) -> list[tuple[str, ...]]:
    model(torch.randn(1, 3, 32, 32))
    out = []
    set_subnet(model, None)
    for _ in range(n):
        model(torch.randn(1, 3, 32, 32))
        out.append(tuple(",".join(d.choice[k] for k in "ABCDE") for d in supernet_deltas(model)))
    return out


def _fixed(model: nn.Module, layers: tuple[str, ...]) -> nn.Module:
    set_subnet(model, layers)
    return model


def test_search_is_seeded():
    runs = []
    for seed in (1, 1, 2):
        calls: list[tuple[str, ...]] = []
        result = evolution_search(
            supernet(targets=("fc2",)), toy_score(calls), budget=1.0, seed=seed, **SMALL
        )
        runs.append((calls, result))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert runs[0][0] != runs[2][0]
    calls, _ = runs[0]
    assert len(calls) == 16 * 3  # the first population, then 2 generations refilled to 16


def test_search_options_validated():
    model = supernet()
    with pytest.raises(ValueError, match="population"):
        evolution_search(model, toy_score([]), budget=1.0, population=0)
    with pytest.raises(ValueError, match="mutation_prob"):
        evolution_search(model, toy_score([]), budget=1.0, mutation_prob=1.5)
    with pytest.raises(ValueError, match="min_budget"):
        evolution_search(model, toy_score([]), budget=0.1, min_budget=0.2)


def test_accuracy_score_on_a_loader():
    model = supernet()
    set_subnet(model, AUTHORS_LAYERS)
    images = torch.randn(6, 3, 32, 32)
    labels = model(images).argmax(-1)
    labels[:2] = (labels[:2] + 1) % 5
    loader = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    assert accuracy_score(loader)(model) == pytest.approx(100 * 4 / 6)


def test_supernet_deltas_are_the_sites_in_layers_order():
    model = supernet(targets=("q", "v"))
    deltas = supernet_deltas(model)
    assert all(isinstance(d, GloraSuperDelta) for d in deltas) and len(deltas) == 4
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(d)] for d in deltas] == [
        f"blocks.{b}.attn.qkv.deltas.glora_{t}" for b in (0, 1) for t in ("q", "v")
    ]


def test_command_line_search_and_export(tmp_path):
    """``tools/glora_search.py`` on a supernet folder: the JSON's winner within the budget, and the exported
    fixed glora scores what the search scored."""
    import importlib.util
    import json
    from pathlib import Path

    from test_train import TINY_KW, write_task

    root = write_task(tmp_path / "data")
    config = dict(model="vit_tiny_patch16_224", model_kwargs=TINY_KW, pretrained=False, task="synth")
    config.update(data_root=str(root), recipe=dict(seed=0, protocol="default", batch_size=8))
    torch.manual_seed(0)
    trained = petl_zoo.create("glora", tiny_vit(num_classes=3), supernet=True, rank=4, seed=0)
    perturb_(trained, std=0.3)
    petl_zoo.save_adapter(trained, tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    path = Path(__file__).resolve().parents[1] / "tools" / "glora_search.py"
    spec = importlib.util.spec_from_file_location("glora_search_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "subnet.json"), "--budget", "0.004"]
    argv += [
        "--population",
        "4",
        "--select",
        "2",
        "--mutations",
        "2",
        "--crossovers",
        "2",
        "--generations",
        "1",
    ]
    assert tool.main([*argv, "--workers", "0", "--device", "cpu", "--export", str(tmp_path / "fixed")]) == 0
    record = json.loads((tmp_path / "subnet.json").read_text())
    assert len(record["options"]["layers"]) == 8 and record["params"] <= 4000
    args = tool.parse_args(argv)
    model, settings = tool.build_model(args, config)
    petl_zoo.load_adapter(model, tmp_path / "fixed")
    assert petl_zoo.method_of(model).config.layers == tuple(record["options"]["layers"])
    assert petl_zoo.trainable_parameters(model)["method"] == record["params"]
    batches = tool.cached_batches(model, args, settings, config)
    assert accuracy_score(batches)(model.eval()) == record["score"]
