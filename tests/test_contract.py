"""The method contract, checked for every built-in method on a tiny instance of every host family.

Every method registered by ``petl_zoo.methods`` is covered with its default options, so a method added
there later is tested without editing this file (methods that tests register on the fly are not).
Per method and architecture:

- identity at initialisation, where the method claims it (``Method.identity_at_init``);
- only the method's tensors and the head require grad (methods that attach nothing train the model's
  own tensors), and everything trainable is saved;
- after the method's structure step (Pear's pruning, HEAT's head selection: the training callbacks on a
  tiny loader), every trainable tensor gets a gradient and frozen ones get none;
- perturbing the method's tensors changes the output;
- every adapted site is really called by timm's forward (a delta that is never called cannot ship);
- save -> load onto a fresh model gives identical outputs, structure and counts;
- mergeable models (``petl_zoo.is_mergeable``) merge to the same outputs, unmerge exactly and unload to
  a plain timm model without hooks; the others make ``merge`` raise a ValueError naming the method;
- on a bf16 model the method's tensors are float32 (the default adapter_dtype) and forward + backward work; on a meta-device model,
  ``to_empty`` + ``load_state_dict`` reproduce the outputs; a ``create`` that fails leaves the model as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HOSTS, perturb_, pre_hook_count, tiny_host
from torch import nn

import petl_zoo
from petl_zoo.layers import AdaptedLinear, AdaptedModule, Delta, PetlModule
from petl_zoo.registry import Method, TrainContext

BUILTIN = sorted(
    n for n in petl_zoo.method_names() if petl_zoo.get_method(n).__module__.startswith("petl_zoo.")
)
FAMILIES = {
    name: (lambda name=name: tiny_host(name)) for name in HOSTS
}  # Swin: two blocks a stage (Pear shares)
#: Epochs the structure step may take: Pear prunes at the end of epoch prune_epoch - 1 (default 9).
STRUCTURE_EPOCHS = 12
CALLBACKS = ("on_train_start", "on_after_backward", "on_epoch_end")


def batches(n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)
    ]


def method_tensor_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, PetlModule) for p in m.parameters()}


def head_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in petl_zoo.classifier_parameters(model)}


def method_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The method's trainable tensors (the head excluded)."""
    head = head_ids(model)
    return [p for p in model.parameters() if p.requires_grad and id(p) not in head]


def settle_structure(model: nn.Module, data) -> None:
    """Run the training loop's callbacks (backward passes, no optimizer step) until the method's
    structure is built: ``on_train_start``, then epochs until ``get_state()`` is non-empty."""
    method = petl_zoo.method_of(model)
    if all(getattr(type(method), c) is getattr(Method, c) for c in CALLBACKS):
        return
    ctx = TrainContext(epochs=STRUCTURE_EPOCHS, steps_per_epoch=len(data))
    method.on_train_start(model, data, ctx)
    model.train()
    for epoch in range(STRUCTURE_EPOCHS):
        if method.get_state():
            break
        ctx.epoch = epoch
        for x, y in data:
            model.zero_grad(set_to_none=True)
            ctx.loss_fn(model(x), y).backward()
            method.on_after_backward(model, ctx)
            ctx.step += 1
        method.on_epoch_end(model, epoch, ctx)
    model.zero_grad(set_to_none=True)
    if type(method).set_state is not Method.set_state:  # a structural method: its structure now exists
        assert method.get_state(), f"{method.name}: no structure after {STRUCTURE_EPOCHS} epochs"


def check_trainable(model: nn.Module) -> None:
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head, method = head_ids(model), method_tensor_ids(model)
    assert head and head <= trainable, "the classifier head must be trainable"
    if method:  # a method that attaches modules trains only those (and the head)
        names = [n for n, p in model.named_parameters() if id(p) in trainable - method - head]
        assert not names, f"trainable tensors outside the method and the head: {names[:3]}"
    saved = {id(t) for t in petl_zoo.adapter_state_dict(model).values()}
    assert trainable <= saved, "every trainable tensor is saved"


def check_gradients(model: nn.Module, batch) -> None:
    x, y = batch
    method = method_tensor_ids(model)
    model.train()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
            continue
        assert p.grad is not None, f"trainable {name} got no gradient"
        if id(p) in method:  # the method's own tensors, perturbed away from their init: a real signal
            assert p.grad.abs().sum() > 0, f"trainable {name} got an all-zero gradient"
    model.zero_grad(set_to_none=True)


def supported(name: str, model: nn.Module) -> bool:
    families = petl_zoo.get_method(name).families
    return families is None or petl_zoo.targets.model_family(model) in families


def check_sites_called(model: nn.Module, x: torch.Tensor) -> None:
    """Every wrapper and every delta runs in timm's forward (none is bypassed by the host's own code)."""
    watched = [
        (n, m) for n, m in model.named_modules() if isinstance(m, (AdaptedLinear, AdaptedModule, Delta))
    ]
    called: set[str] = set()
    handles = [m.register_forward_hook(lambda *_, n=n: called.add(n)) for n, m in watched]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    missed = [n for n, _ in watched if n not in called]
    assert not missed, f"adapted sites never called by the forward: {missed[:4]}"


def check_merge(
    name: str, model: nn.Module, pristine: nn.Module, x: torch.Tensor, tuned: torch.Tensor
) -> None:
    if not petl_zoo.is_mergeable(model):
        with pytest.raises(ValueError, match=f"method '{name}' cannot be merged: "):
            petl_zoo.merge(model)
        assert not petl_zoo.is_merged(model)
        return
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    petl_zoo.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tuned, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        petl_zoo.merge(model)
    petl_zoo.unmerge(model)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), f"unmerge did not restore {n} exactly"
    with torch.no_grad():
        assert torch.equal(model(x), tuned)

    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    assert petl_zoo.method_of(plain) is None and pre_hook_count(plain) == 0
    assert not any(isinstance(m, (AdaptedLinear, AdaptedModule)) for m in plain.modules())
    assert plain.state_dict().keys() == pristine.state_dict().keys()  # a plain timm model again
    with torch.no_grad():
        torch.testing.assert_close(plain(x), tuned, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:pear. pruned")  # a tiny model cannot always reach prune_ratio exactly
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", BUILTIN)
def test_method_contract(name, family, tmp_path):
    torch.manual_seed(0)
    pristine = FAMILIES[family]().eval()
    if not supported(name, pristine):
        with pytest.raises(ValueError, match=f"method '{name}' does not support the"):
            petl_zoo.create(name, pristine)
        return
    model = copy.deepcopy(pristine)
    data = batches()
    x = data[0][0]
    petl_zoo.create(name, model)
    if petl_zoo.get_method(name).identity_at_init:
        with torch.no_grad():
            torch.testing.assert_close(model(x), pristine(x), atol=0, rtol=0)
    check_trainable(model)

    perturb_(model)
    settle_structure(model, data)
    perturb_(model, seed=2)  # tensors the structure step created (Pear's gates start at 0)
    check_trainable(model)
    check_gradients(model, data[1])
    check_sites_called(model, x)

    model.eval()
    with torch.no_grad():
        tuned = model(x)
    moved = copy.deepcopy(model)
    if method_parameters(moved):
        perturb_(moved, seed=3, params=method_parameters(moved))
        with torch.no_grad():
            assert (moved(x) - tuned).abs().max() > 1e-6, "perturbing the method's tensors changed nothing"
    else:
        assert petl_zoo.trainable_parameters(model)["method"] == 0  # linear probe: the head only

    petl_zoo.save_adapter(model, tmp_path / "ad")
    assert petl_zoo.read_adapter_config(tmp_path / "ad")["mergeable"] == petl_zoo.is_mergeable(model)
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "ad").eval()
    assert fresh.petl_method.get_state() == model.petl_method.get_state()
    assert petl_zoo.trainable_parameters(fresh) == petl_zoo.trainable_parameters(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == trainable
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)

    check_merge(name, model, pristine, x, tuned)


@pytest.mark.parametrize("family", ["vit", "eva02", "eva_sep", "swinv2", "deit_distilled"])
@pytest.mark.parametrize("name", BUILTIN)
def test_bf16_model_forward_backward(name, family):
    torch.manual_seed(0)
    model = FAMILIES[family]().to(torch.bfloat16)
    if not supported(name, model):
        return
    petl_zoo.create(name, model)
    own = [p for m in model.modules() if isinstance(m, PetlModule) for p in m.parameters()]
    assert all(p.dtype == torch.float32 for p in own), "method tensors are float32 on a bf16 model"
    x, y = batches(1)[0]
    model.train()
    nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", BUILTIN)
def test_added_modules_take_the_models_mode(name):
    """A fresh module is in train mode: on a model the user put in eval mode, an added dropout (VPT's
    prompts, adapters) would run anyway unless create() gives the new modules the model's mode."""
    for training in (False, True):
        model = FAMILIES["vit"]().train(training)
        model.blocks[0].attn.attn_drop.train(not training)  # a module of the model keeps its own mode
        petl_zoo.create(name, model)
        assert model.blocks[0].attn.attn_drop.training is not training
        added = [n for n, m in model.named_modules() if isinstance(m, PetlModule)]
        assert all(m.training is training for m in model.modules() if isinstance(m, PetlModule)), added


@pytest.mark.parametrize("family", ["vit", "swin", "eva02"])
@pytest.mark.parametrize("name", BUILTIN)
def test_meta_device_then_to_empty_and_load(name, family):
    torch.manual_seed(0)
    if not supported(name, FAMILIES[family]()):
        return
    reference = petl_zoo.create(name, FAMILIES[family]()).eval()
    perturb_(reference)
    with torch.device("meta"):
        model = FAMILIES[family]()
    petl_zoo.create(name, model)
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    # timm's own non-persistent buffers (relative position indices, rope tables) are not in any state
    # dict: a user of to_empty re-creates them with the backbone. The method's must need no such step.
    own = {n for n, m in model.named_modules() if isinstance(m, PetlModule)}
    with torch.no_grad():
        kept = dict(reference.named_buffers())
        for name, buffer in model.named_buffers():
            if name not in reference.state_dict() and not any(name.startswith(f"{o}.") for o in own):
                buffer.copy_(kept[name])
    x = batches(1)[0][0]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(x))


def test_failing_create_leaves_the_model_as_it_was(isolated_registry):
    from dataclasses import dataclass

    from petl_zoo.layers import adapt_linear
    from petl_zoo.targets import linear_sites

    @dataclass
    class Options(petl_zoo.MethodConfig):
        pass

    @petl_zoo.register_method("half_applied", "wraps two blocks' qkv, hooks a module, then fails")
    class HalfApplied(petl_zoo.Method):
        config_class = Options

        def apply(self, model):
            for site in linear_sites(model, "q")[:1]:
                adapt_linear(site).add_delta("d", _Zero(), site.start, site.stop)
            self.hooks.add_forward_pre_hook(model.blocks[0], lambda m, a: a)
            model.blocks[0].extra = nn.Linear(2, 2)
            raise RuntimeError("boom")

    class _Zero(Delta):
        def forward(self, x, weight):
            return x.new_zeros(*x.shape[:-1], weight.shape[0])

    model = FAMILIES["eva02"]()  # q/v biases are folded into qkv on attach: that must be undone too
    model.head.weight.requires_grad_(False)
    before_modules = [(n, type(m)) for n, m in model.named_modules()]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        petl_zoo.create("half_applied", model)
    assert [(n, type(m)) for n, m in model.named_modules()] == before_modules
    assert model.state_dict().keys() == before_state.keys()
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_flags
    assert pre_hook_count(model) == 0 and petl_zoo.method_of(model) is None
    petl_zoo.create("lora", model)  # and it can still be patched


def test_distilled_deit_trains_and_saves_both_heads(tmp_path):
    model = petl_zoo.create("linear", FAMILIES["deit_distilled"]())
    counts = petl_zoo.trainable_parameters(model)
    assert counts["head"] == 2 * (48 * 5 + 5) and counts["total"] == counts["head"]
    saved = petl_zoo.adapter_state_dict(model)
    assert {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"} <= set(saved)


def test_siglip_attention_pool_is_frozen_unless_asked():
    frozen = petl_zoo.create("linear", FAMILIES["siglip"]())
    assert not any(p.requires_grad for p in frozen.attn_pool.parameters())
    pooled = petl_zoo.create("linear", FAMILIES["siglip"](), train_attn_pool=True)
    assert all(p.requires_grad for p in pooled.attn_pool.parameters())
    assert petl_zoo.trainable_parameters(pooled)["total"] > petl_zoo.trainable_parameters(frozen)["total"]


def test_every_builtin_method_is_covered():
    assert {"lora", "adapter", "linear", "full", "bitfit", "neat", "lily", "pear", "heat"} <= set(BUILTIN)


def test_every_family_has_a_tiny_host_and_a_doc_row():
    from pathlib import Path

    from petl_zoo.targets import list_families

    covered = {petl_zoo.targets.model_family(tiny_host(name)) for name in HOSTS}
    names = {f.name for f in list_families()}
    assert names <= covered, f"families without a tiny host in tests/conftest.py: {names - covered}"
    doc = (Path(__file__).resolve().parents[1] / "docs" / "hosts.md").read_text()
    assert all(f"| `{name}` |" in doc for name in names)
