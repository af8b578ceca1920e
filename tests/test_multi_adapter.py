"""Several task adapters, each with its own head, on one frozen tiny model (petl_zoo.multi).

Three adapters per method are written with ``save_adapter`` into run folders (``runs/<method>/<task>``,
where the trainer writes them; :class:`petl_zoo.runfolder.RunFolder` finds them), from one fp64 backbone
with their tensors moved off their init, heads of 3, 5 and 4 classes. A mixed batch through
``load_adapters`` must give, per sample, what ``load_adapter`` of that sample's adapter alone gives
(1e-10 in fp64).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import timm
import torch

import petl_zoo
from petl_zoo.api import adapter_state_dict
from petl_zoo.runfolder import RunFolder

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
SWIN = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))
HOSTS = {"vit": ("vit_tiny_patch16_224", TINY), "swin": ("swin_tiny_patch4_window7_224", SWIN)}
CLASSES = {"t0": 3, "t1": 5, "t2": 4}
NAMES = ["t0", "t1", "t2", "t0", "t2", "t1", "t1", "t0"]
#: method -> the options of the three tasks (ranks and sites differ between tasks on purpose)
OPTIONS = {
    "lora": [dict(rank=2), dict(rank=4, targets=("qkv", "proj")), dict(rank=3)],
    "neat": [dict(rank=3), dict(rank=2, mlp=True, mlp_rank=3), dict(rank=2, depth=1)],
    "adapter": [dict(dim=4), dict(dim=2), dict(dim=3, style="sequential")],
    "dora": [dict(rank=2), dict(rank=3), dict(rank=2, targets=("qkv",))],
    "vera": [dict(rank=8), dict(rank=6, seed=1), dict(rank=8, targets=("qkv",))],
    "fourierft": [dict(n_frequency=40, scaling=2.0)] * 2 + [dict(n_frequency=30, scaling=1.0)],
}
BATCHED = ("lora", "neat", "dora", "vera", "fourierft")


def backbone(host: str = "vit", **kwargs) -> torch.nn.Module:
    name, args = HOSTS[host]
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **{**args, **kwargs}).double().eval()


def write_run(
    root: Path,
    base: torch.nn.Module,
    method: str,
    task: str,
    options: dict,
    seed: int,
    kwargs: dict | None = None,
) -> Path:
    """One run folder holding ``method``'s adapter for ``task``, its tensors moved off their init;
    ``kwargs``: the creation keywords its base-model record names."""
    model = copy.deepcopy(base)
    model.reset_classifier(CLASSES[task])
    petl_zoo.create(method, model.double(), **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            if tensor.is_floating_point():
                tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    folder = RunFolder(root / method / task)
    petl_zoo.save_adapter(model, folder.path, model_kwargs=kwargs)
    assert folder.has_adapter
    return folder.path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """host -> method -> task -> run folder (written once for the module)."""
    made: dict = {}

    def get(host: str, method: str) -> dict[str, Path]:
        if (host, method) not in made:
            root = tmp_path_factory.mktemp(f"runs_{host}")
            base = backbone(host)
            made[host, method] = {
                task: write_run(root, base, method, task, OPTIONS[method][i], 10 * i + 1, HOSTS[host][1])
                for i, task in enumerate(CLASSES)
            }
        return made[host, method]

    return get


def reference(host: str, folder: Path, task: str) -> torch.nn.Module:
    """The single-adapter model: the backbone with only this adapter, by petl_zoo.load_adapter."""
    model = backbone(host)
    model.reset_classifier(CLASSES[task])
    return petl_zoo.load_adapter(model.double(), folder).eval()


def images(n: int = len(NAMES)) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def assert_per_sample(out: torch.Tensor, x: torch.Tensor, names: list[str], refs: dict, tol: float = 1e-10):
    assert out.shape == (len(names), max(CLASSES[n] for n in names))
    for i, name in enumerate(names):
        c = CLASSES[name]
        with torch.no_grad():
            expected = refs[name](x[i : i + 1])[0]
        torch.testing.assert_close(out[i, :c], expected, rtol=0, atol=tol)
        assert torch.all(out[i, c:] == float("-inf"))


def count_patch_embeds():
    """A global forward hook counting PatchEmbed calls: how many forwards of a backbone ran."""
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append(1) if type(m).__name__ == "PatchEmbed" else None
    )
    return calls, hook


@pytest.mark.parametrize(
    "host, method",
    [("vit", m) for m in OPTIONS] + [("swin", "lora")],
)
def test_mixed_batch_equals_each_samples_single_adapter_model(runs, host, method):
    folders = runs(host, method)
    multi = petl_zoo.load_adapters(backbone(host), folders)
    refs = {task: reference(host, folder, task) for task, folder in folders.items()}
    x = images()
    calls, hook = count_patch_embeds()
    try:
        with torch.no_grad():
            out = multi(x, adapter_names=NAMES)
    finally:
        hook.remove()
    assert_per_sample(out, x, NAMES, refs)
    with torch.no_grad():  # every sample on one adapter: the routed layers skip the gather
        uniform = multi(x, adapter_names=["t1"] * len(x))
    assert_per_sample(uniform, x, ["t1"] * len(x), refs)
    routing = multi.routing()
    if method in BATCHED:  # one forward of the shared backbone for the whole mixed batch
        assert set(routing.values()) == {"batched"} and len(calls) == 1
    else:  # one forward per adapter group
        assert all(v.startswith("grouped: ") for v in routing.values()) and len(calls) == len(CLASSES)


def test_different_methods_in_one_batch_and_the_one_logged_line(runs, caplog):
    folders = {
        "t0": runs("vit", "lora")["t0"],
        "t1": runs("vit", "neat")["t1"],
        "t2": runs("vit", "adapter")["t2"],
    }
    multi = petl_zoo.load_adapters(backbone(), folders)
    refs = {task: reference("vit", folder, task) for task, folder in folders.items()}
    x = images()
    with caplog.at_level(logging.INFO, logger="petl_zoo.multi.model"), torch.no_grad():
        out = multi(x, adapter_names=NAMES)
        multi(x, adapter_names=NAMES)
    assert_per_sample(out, x, NAMES, refs)
    lines = [r.getMessage() for r in caplog.records if r.name == "petl_zoo.multi.model"]
    assert len(lines) == 1 and "(t0, t1)" in lines[0] and "t2 (" in lines[0], lines
    assert multi.routing()["t2"].startswith("grouped: ") and multi.routing()["t1"] == "batched"


def test_mixed_batch_with_gradients_on_matches_too(runs):
    folders = runs("vit", "dora")
    multi = petl_zoo.load_adapters(backbone(), folders)
    refs = {task: reference("vit", folder, task) for task, folder in folders.items()}
    x = images()
    out = multi(x, adapter_names=NAMES)  # factors built with autograd each call, not cached
    assert_per_sample(out.detach(), x, NAMES, refs)


def test_whole_batch_forms_are_the_single_adapter_model_exactly(runs):
    folders = runs("vit", "neat")
    multi = petl_zoo.load_adapters(backbone(), folders)
    x = images()
    with torch.no_grad():
        for task, folder in folders.items():
            expected = reference("vit", folder, task)(x)
            multi.set_active(task)
            assert multi.active == task and torch.equal(multi(x), expected)
            assert torch.equal(multi(x, adapter_names=task), expected)
            same = multi(x, adapter_names=[task] * len(x))  # routed, one adapter everywhere
            torch.testing.assert_close(same, expected, rtol=0, atol=1e-10)


def test_memory_grows_by_the_adapters_and_heads_only(runs):
    folders = runs("vit", "lora")
    base = backbone()
    base_storages = {t.untyped_storage().data_ptr() for t in (*base.parameters(), *base.buffers())}
    multi = petl_zoo.load_adapters(base, folders)
    with torch.no_grad():
        multi(images(), adapter_names=NAMES)  # builds the routed model too
    models = [multi, multi._plan.model]
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in models for t in _tensors(m)
    }
    extra = sum(nbytes for ptr, nbytes in storages.items() if ptr not in base_storages)
    own = sum(
        t.untyped_storage().nbytes()
        for name in multi.adapter_names
        for t in adapter_state_dict(multi.adapter_model(name)).values()
    )
    assert 0 < extra == own  # the method tensors and heads, nothing of the backbone copied
    assert not any(p.requires_grad for p in base.blocks.parameters())  # frozen, as create() leaves it


def test_a_dtype_change_keeps_the_backbone_shared(runs):
    folders = runs("swin", "lora")  # Swin: buffers (relative position index, masks) to keep shared too
    base = backbone("swin").float()
    multi = petl_zoo.load_adapters(base, folders).double()
    x = images()
    assert all(t.dtype == torch.float64 for t in base.parameters())
    shared = {id(t) for t in _tensors(base)}
    for name in multi.adapter_names:
        blocks = multi.adapter_model(name).layers
        assert all(
            id(t) in shared for t in _tensors(blocks) if t.dtype != torch.float64 or not t.requires_grad
        )
    with torch.no_grad():
        out = multi(x, adapter_names=NAMES)
        for i, name in enumerate(NAMES):
            expected = multi.adapter_model(name)(x[i : i + 1])[0]
            torch.testing.assert_close(out[i, : CLASSES[name]], expected, rtol=0, atol=1e-10)


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def test_merged_model_is_a_copy_and_merging_the_shared_model_is_caught(runs):
    folders = runs("vit", "lora")
    multi = petl_zoo.load_adapters(backbone(), folders)
    x = images()
    with torch.no_grad():
        merged = multi.merged_model("t1")
        assert petl_zoo.is_merged(merged)
        torch.testing.assert_close(merged(x), multi(x, adapter_names="t1"), rtol=0, atol=1e-10)
        petl_zoo.merge(multi.adapter_model("t0"))  # folds t0 into the weights every adapter shares
        with pytest.raises(ValueError, match="changed in place"):
            multi(x, adapter_names=NAMES)


def test_user_errors_are_one_line_valueerrors(runs):
    folders = runs("vit", "lora")
    multi = petl_zoo.load_adapters(backbone(), folders)
    x = images()
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'; loaded adapters: t0, t1, t2"):
        multi(x, adapter_names=["nope"] * len(x))
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        multi.set_active("nope")
    with pytest.raises(ValueError, match="3 names for a batch of 8"):
        multi(x, adapter_names=["t0"] * 3)
    with pytest.raises(ValueError, match="'t0' is already loaded"):
        multi.add_adapter("t0", folders["t0"])
    with pytest.raises(ValueError, match="'keys' is not usable"):
        multi.add_adapter("keys", folders["t0"])
    multi.remove_adapter("t0")
    assert multi.adapter_names == ["t1", "t2"] and multi.active == "t1"
    with pytest.raises(ValueError, match="unknown adapter 't0'; loaded adapters: t1, t2"):
        multi(x, adapter_names=["t0"] * len(x))
    with pytest.raises(ValueError, match="takes an unpatched model"):
        petl_zoo.load_adapters(petl_zoo.create("lora", backbone()), folders)


def test_adapters_of_another_backbone_or_that_train_it_are_refused(runs, tmp_path):
    folders = runs("vit", "lora")
    wide = write_run(
        tmp_path / "vit_wide", backbone(embed_dim=24), "lora", "t0", {}, 3, {**TINY, "embed_dim": 24}
    )
    with pytest.raises(ValueError, match=r"adapter 'w' was saved for another backbone: its dims is \[24\]"):
        petl_zoo.load_adapters(backbone(), {**folders, "w": wide})
    other = tmp_path / "vit_other"
    base = backbone()
    model = copy.deepcopy(base)
    petl_zoo.create("lora", model)
    petl_zoo.save_adapter(model, other, model_kwargs={**TINY, "img_size": 64})
    with pytest.raises(ValueError, match="another backbone than adapter 't0': its model_kwargs"):
        petl_zoo.load_adapters(backbone(), {**folders, "o": other})
    bitfit = write_run(tmp_path / "vit_bitfit", base, "bitfit", "t0", {}, 4, TINY)
    multi = petl_zoo.load_adapters(base, folders)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(
        ValueError, match="'bitfit' .* cannot be combined .* trains the backbone's own tensors"
    ):
        multi.add_adapter("b", bitfit)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # nothing written
    assert multi.adapter_names == ["t0", "t1", "t2"]
