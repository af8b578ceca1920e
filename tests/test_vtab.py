"""vtab: registry, root and folder resolution, list files, datasets, transforms, loaders and errors,
on tiny synthetic task folders (png and jpg, gray and RGB, nested paths) made in tmp_path."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

import vtab

VTAB_ORDER = [
    "cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
    "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele",
]  # fmt: skip
CLASSES = [100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9]
COUNTS = {"train": 8, "val": 4, "trainval": 12, "test": 6}


def tiny_vit(**kwargs) -> torch.nn.Module:
    args = dict(img_size=32, patch_size=4, depth=2, num_classes=10)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args)


def save_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    """Random pixels of ``size`` (W, H) in gray ('L') or 'RGB', saved as png or jpg by suffix."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=None).save(path)


def make_task(root: Path, folder: str, num_classes: int = 5, counts: dict[str, int] | None = None) -> Path:
    """A task folder in the field's layout: mixed png/jpg, gray/RGB, odd sizes, nested sub-folders.
    trainval lists train then val, as the field's files do. Labels cycle 0..num_classes-1."""
    counts = counts or COUNTS
    task = root / folder
    lines: dict[str, list[str]] = {}
    seed = 0
    for split in ("train", "val", "test"):
        lines[split] = []
        for i in range(counts[split]):
            ext = "png" if i % 2 == 0 else "jpg"
            mode = "L" if i % 3 == 0 else "RGB"
            rel = f"images/{split}/sub{i % 2}/{i:03d}.{ext}"
            save_image(task / rel, (20 + i, 16 + 2 * i), mode, seed)
            seed += 1
            lines[split].append(f"{rel} {(i + len(split)) % num_classes}")
    lines["trainval"] = lines["train"] + lines["val"]
    for split, file in vtab.SPLITS.items():
        (task / file).write_text("\n".join(lines[split]) + "\n", encoding="utf-8")
    return task


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_lists_the_19_tasks_in_canonical_order():
    infos = vtab.tasks()
    assert [t.name for t in infos] == VTAB_ORDER
    assert [t.num_classes for t in infos] == CLASSES
    assert [t.group for t in infos] == ["natural"] * 7 + ["specialized"] * 4 + ["structured"] * 8
    extra = vtab.tasks(include_extra=True)
    assert extra[:19] == infos and [t.name for t in extra[19:]] == ["digits"]
    digits = vtab.get_task("digits")
    assert (digits.num_classes, digits.group) == (10, "demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        infos[0].num_classes = 10


@pytest.mark.parametrize(
    "alias,name",
    [
        ("flowers102", "oxford_flowers102"),
        ("pets", "oxford_iiit_pet"),
        ("oxford_pet", "oxford_iiit_pet"),
        ("camelyon", "patch_camelyon"),
        ("retinopathy", "diabetic_retinopathy"),
        ("cifar100", "cifar"),
        ("CIFAR-100", "cifar"),
        ("dsprites_loc", "dsprites_loc"),
        ("Smallnorb_Ele", "smallnorb_ele"),
        ("digits", "digits"),
    ],
)
def test_get_task_resolves_aliases(alias, name):
    assert vtab.get_task(alias).name == name
    assert alias.lower().replace("-", "_") in (name, *vtab.get_task(alias).aliases)


def test_unknown_task_suggests_closest_names():
    with pytest.raises(
        ValueError, match=r"Unknown task 'cifra'\. Did you mean 'cifar'.*Known tasks: cifar, "
    ):
        vtab.get_task("cifra")
    with pytest.raises(ValueError, match=r"Did you mean 'dsprites_loc'"):
        vtab.get_task("dsprite_loc")


# ---------------------------------------------------------------------------------------------
# root and task folders


def test_resolve_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(vtab.ENV_VAR, raising=False)
    assert vtab.resolve_root() == tmp_path / "data" / "vtab-1k"
    monkeypatch.setenv(vtab.ENV_VAR, str(tmp_path / "env"))
    assert vtab.resolve_root() == tmp_path / "env"
    assert vtab.resolve_root(tmp_path / "cli") == tmp_path / "cli"
    assert vtab.resolve_root("rel") == tmp_path / "rel"


def test_task_dir_finds_alias_and_case_variant_folders(tmp_path):
    make_task(tmp_path, "cifar100", 100)
    make_task(tmp_path, "oxford_pet", 37)
    make_task(tmp_path, "DTD", 47)
    assert vtab.task_dir("cifar", tmp_path) == tmp_path / "cifar100"
    assert vtab.task_dir("pets", tmp_path) == tmp_path / "oxford_pet"
    assert vtab.task_dir("dtd", tmp_path) == tmp_path / "DTD"
    make_task(tmp_path, "caltech", 102)
    make_task(tmp_path, "aaa_mine", 3)
    (tmp_path / "not_a_task").mkdir()
    assert vtab.available_tasks(tmp_path) == ["cifar", "caltech101", "dtd", "oxford_iiit_pet", "aaa_mine"]


def test_task_dir_uses_env_var(tmp_path, monkeypatch):
    make_task(tmp_path, "eurosat", 10)
    monkeypatch.setenv(vtab.ENV_VAR, str(tmp_path))
    assert vtab.task_dir("eurosat") == tmp_path / "eurosat"
    assert len(vtab.VtabDataset("eurosat", "test")) == COUNTS["test"]


# ---------------------------------------------------------------------------------------------
# datasets


@pytest.mark.parametrize("split", ["train", "val", "trainval", "test"])
def test_every_split_loads_with_right_length_and_labels(tmp_path, split):
    task = make_task(tmp_path, "oxford_flowers102", 102)
    ds = vtab.VtabDataset("flowers102", split, data_root=tmp_path)
    assert (ds.task, ds.split, ds.num_classes) == ("oxford_flowers102", split, 102)
    assert len(ds) == COUNTS[split]
    expected = [
        (task / rel, int(label))
        for rel, label in (
            line.rsplit(" ", 1) for line in (task / vtab.SPLITS[split]).read_text().splitlines()
        )
    ]
    assert ds.samples == expected and ds.targets == [label for _, label in expected]
    for i in range(len(ds)):
        image, label = ds[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert label == expected[i][1]
        with Image.open(expected[i][0]) as raw:
            assert image.size == raw.size
            assert np.array_equal(np.asarray(image), np.asarray(raw.convert("RGB")))


def test_split_file_names_are_accepted(tmp_path):
    make_task(tmp_path, "dtd", 47)
    assert len(vtab.VtabDataset("dtd", "train800val200", data_root=tmp_path)) == COUNTS["trainval"]
    assert vtab.VtabDataset("dtd", "val200.txt", data_root=tmp_path).split == "val"


def test_list_files_with_crlf_and_byte_order_mark(tmp_path):
    task = make_task(tmp_path, "dtd", 47)
    text = (task / "test.txt").read_text()
    (task / "test.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    ds = vtab.VtabDataset("dtd", "test", data_root=tmp_path)
    assert len(ds) == COUNTS["test"] and ds.samples[0][0] == task / text.split(" ", 1)[0]
    assert ds[0][0].mode == "RGB"


def test_gray_images_become_three_identical_channels(tmp_path):
    make_task(tmp_path, "svhn", 10)
    ds = vtab.VtabDataset("svhn", "train", data_root=tmp_path)
    gray = np.asarray(ds[0][0])  # item 0 is saved gray
    assert (
        gray.shape[2] == 3 and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    )


def test_custom_folder_is_a_task(tmp_path):
    make_task(tmp_path, "my_leaves", 5)
    assert vtab.num_classes("my_leaves", tmp_path) == 5  # largest label (4) + 1 over the list files
    ds = vtab.VtabDataset("my_leaves", "trainval", data_root=tmp_path)
    assert (ds.task, ds.num_classes, len(ds)) == ("my_leaves", 5, COUNTS["trainval"])
    assert vtab.VtabDataset("my_leaves", "test", data_root=tmp_path, num_classes=9).num_classes == 9
    assert vtab.available_tasks(tmp_path) == ["my_leaves"]
    assert vtab.num_classes("sun397") == 397  # registry count, no folder needed


# ---------------------------------------------------------------------------------------------
# transforms


def _manual(image: Image.Image, size, interpolation, mean=None, std=None) -> torch.Tensor:
    out = TF.to_tensor(TF.resize(image, list(size), interpolation=interpolation))
    return TF.normalize(out, mean, std) if mean is not None else out


def test_default_transform_follows_the_model_config(tmp_path):
    make_task(tmp_path, "dtd", 47)
    image = vtab.VtabDataset("dtd", "test", data_root=tmp_path)[1][0]
    vit = tiny_vit()  # timm's config says 224; the real input is 32
    assert timm.data.resolve_model_data_config(vit)["input_size"] == (3, 224, 224)
    assert vtab.input_size(vit) == (32, 32)
    out = vtab.build_transform(vit)(image)
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out, _manual(image, (32, 32), InterpolationMode.BICUBIC, (0.5,) * 3, (0.5,) * 3))

    vit.pretrained_cfg = dict(
        vit.pretrained_cfg, interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(0.2,) * 3
    )
    cfg = vtab.transform_config(vit)
    assert cfg == {
        "input_size": (32, 32),
        "interpolation": "bilinear",
        "mean": (0.1, 0.2, 0.3),
        "std": (0.2,) * 3,
    }
    expected = _manual(image, (32, 32), InterpolationMode.BILINEAR, (0.1, 0.2, 0.3), (0.2,) * 3)
    assert torch.allclose(vtab.build_transform(vit)(image), expected)


def test_default_transform_resizes_to_exact_non_square_size_and_swin():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    vit = tiny_vit(img_size=(32, 48))
    assert vtab.input_size(vit) == (32, 48)
    assert vtab.build_transform(vit)(image).shape == (3, 32, 48)  # exact HxW, no crop
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4, embed_dim=16,
        depths=(1, 1), num_heads=(1, 2), num_classes=5,
    )  # fmt: skip
    cfg = vtab.transform_config(swin)
    assert cfg["input_size"] == (32, 32) and cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    imagenet = _manual(image, (32, 32), InterpolationMode.BICUBIC, cfg["mean"], cfg["std"])
    assert torch.allclose(vtab.build_transform(swin)(image), imagenet)


def test_vtab_protocol_is_unnormalised_bicubic_at_the_model_input_size():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30), dtype=np.uint8)).convert(
        "RGB"
    )
    vit = tiny_vit()
    vit.pretrained_cfg = dict(vit.pretrained_cfg, interpolation="bilinear")  # ignored by the protocol
    out = vtab.build_transform(vit, protocol="vtab")(image)
    assert out.shape == (3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out, _manual(image, (32, 32), InterpolationMode.BICUBIC))
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224")
    assert vtab.transform_config(vit_b, "vtab") == {
        "input_size": (224, 224), "interpolation": "bicubic", "mean": None, "std": None,
    }  # fmt: skip
    assert vtab.build_transform(vit_b, "vtab")(image).shape == (3, 224, 224)


def test_input_size_sees_through_wrappers():
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = tiny_vit(img_size=(32, 48))

    wrapped = Wrapper()
    assert vtab.input_size(wrapped) == (32, 48)
    assert vtab.transform_config(wrapped)["mean"] == (0.5, 0.5, 0.5)  # the ViT's config, not a default
    with pytest.raises(ValueError, match=r"Expected a torch\.nn\.Module .*got str"):
        vtab.input_size("vit_base_patch16_224")


def test_augmentation_is_random_resized_crop_and_flip():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    vit = tiny_vit()
    aug = vtab.build_transform(vit, augment=True)
    names = [type(t).__name__ for t in aug.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert aug.transforms[0].scale == (0.8, 1.0) and aug.transforms[0].size == (32, 32)
    torch.manual_seed(0)
    a = aug(image)
    torch.manual_seed(0)
    assert torch.equal(a, aug(image)) and a.shape == (3, 32, 32)
    assert not torch.equal(a, vtab.build_transform(vit)(image))
    assert [type(t).__name__ for t in vtab.build_transform(vit, "vtab", augment=True).transforms][
        -1
    ] == "ToTensor"


def test_unknown_protocol_is_an_error():
    with pytest.raises(
        ValueError, match=r"Unknown protocol 'inception'; valid: 'default', 'vtab', 'imagenet'"
    ):
        vtab.build_transform(tiny_vit(), protocol="inception")


def test_imagenet_protocol_uses_imagenet_statistics_on_any_backbone():
    """The VPT / FacT / Convpass / RepAdapter code normalises with ImageNet mean/std even on the in21k
    ViT pretrained at 0.5 / 0.5: ``imagenet`` reproduces that; ``default`` follows the backbone."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    vit = tiny_vit()
    assert vtab.transform_config(vit)["mean"] == (0.5, 0.5, 0.5)
    cfg = vtab.transform_config(vit, "imagenet")
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    expected = _manual(image, (32, 32), InterpolationMode.BICUBIC, cfg["mean"], cfg["std"])
    assert torch.allclose(vtab.build_transform(vit, "imagenet")(image), expected)


# ---------------------------------------------------------------------------------------------
# loaders


def _epoch_labels(loader) -> list[int]:
    return [int(y) for _, labels in loader for y in labels]


def test_make_loader_is_deterministic_given_seed(tmp_path):
    make_task(tmp_path, "my_task", 100, counts={"train": 40, "val": 1, "test": 1})
    for i, line in enumerate((tmp_path / "my_task" / "train800.txt").read_text().splitlines()):
        assert line.endswith(f" {(i + 5) % 100}")  # distinct labels identify the samples
    vit = tiny_vit()
    tf = vtab.build_transform(vit, augment=True)
    ds = vtab.VtabDataset("my_task", "train", tf, data_root=tmp_path, num_classes=100)  # labels 3..44 used

    def run(seed: int, workers: int):
        loader = vtab.make_loader(ds, 8, shuffle=True, workers=workers, seed=seed)
        first = [(x.clone(), y.clone()) for x, y in loader]
        return loader, first, _epoch_labels(loader)

    loader, a, a2 = run(0, 2)
    assert (
        loader.persistent_workers
        and loader.num_workers == 2
        and loader.pin_memory is torch.cuda.is_available()
    )
    _, b, b2 = run(0, 2)
    labels = [int(v) for _, y in a for v in y]
    assert sorted(labels) == sorted(ds.targets) and labels != ds.targets
    assert labels == [int(v) for _, y in b for v in y] and a2 == b2 and a2 != labels
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))  # same augmentation in the workers
    _, c, _ = run(1, 2)
    assert [int(v) for _, y in c for v in y] != labels
    ordered = vtab.make_loader(ds, 16, shuffle=False, workers=0, drop_last=True)
    assert _epoch_labels(ordered) == ds.targets[:32] and ordered.pin_memory is torch.cuda.is_available()


def test_make_loader_batches_do_not_depend_on_workers(tmp_path):
    """Augmentation is seeded per sample in the main process's order: 0, 1 and 2 workers give the
    same batches pass after pass, and a fresh loader on a sampler set to epoch 1 (a resumed run)
    gives what the first loader gave in its second pass."""
    from torch.utils.data.distributed import DistributedSampler

    make_task(tmp_path, "my_task", 100, counts={"train": 12, "val": 1, "test": 1})
    tf = vtab.build_transform(tiny_vit(), augment=True)
    ds = vtab.VtabDataset("my_task", "train", tf, data_root=tmp_path, num_classes=100)

    def passes(workers: int, n: int = 2, **kw) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        loader = vtab.make_loader(ds, 4, workers=workers, seed=3, **kw)
        return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]

    def same(a, b) -> bool:
        return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))

    torch.manual_seed(0)
    before = torch.get_rng_state()
    ref = passes(0, shuffle=True)
    assert torch.equal(torch.get_rng_state(), before)  # the main process's RNG is left alone
    assert not same(ref[0], ref[1]) and not torch.equal(ref[0][0][0][0], ref[0][0][0][1])
    for workers in (1, 2):
        got = passes(workers, shuffle=True)
        assert len(got[1]) == len(ref[1]) == 3 and same(got[0], ref[0]) and same(got[1], ref[1])
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
    loader = vtab.make_loader(ds, 4, shuffle=False, sampler=sampler, workers=2, seed=3)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append([(x.clone(), y.clone()) for x, y in loader])
    resumed = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
    resumed.set_epoch(1)
    again = vtab.make_loader(ds, 4, shuffle=False, sampler=resumed, workers=0, seed=3)
    assert not same(epochs[0], epochs[1]) and same(list(again), epochs[1])
    assert again.dataset.targets == ds.targets  # the wrapper forwards the dataset's attributes


def test_make_loader_takes_a_sampler(tmp_path):
    make_task(tmp_path, "my_task", 100, counts={"train": 10, "val": 1, "test": 1})
    tf = vtab.build_transform(tiny_vit())
    ds = vtab.VtabDataset("my_task", "train", tf, data_root=tmp_path, num_classes=100)
    loader = vtab.make_loader(ds, 4, shuffle=False, sampler=[9, 0, 3], workers=0, pin_memory=False)
    assert _epoch_labels(loader) == [ds.targets[9], ds.targets[0], ds.targets[3]]
    with pytest.raises(ValueError, match="shuffle=True conflicts with a sampler"):
        vtab.make_loader(ds, 4, shuffle=True, sampler=[0])
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        vtab.make_loader(ds, 0, shuffle=True)
    with pytest.raises(ValueError, match=r"workers must be an int >= 0, got -1"):
        vtab.make_loader(ds, 4, shuffle=True, workers=-1)


def test_make_loaders_gives_train_and_eval_loaders(tmp_path):
    make_task(tmp_path, "dtd", 47)
    vit = tiny_vit()
    loaders = vtab.make_loaders("dtd", vit, 4, data_root=tmp_path, workers=0, augment=True)
    assert list(loaders) == ["trainval", "test"]
    train, test = loaders["trainval"], loaders["test"]
    assert len(train.dataset) == COUNTS["trainval"] and len(test.dataset) == COUNTS["test"]
    assert type(train.dataset.transform.transforms[0]).__name__ == "RandomResizedCrop"
    assert type(test.dataset.transform.transforms[0]).__name__ == "Resize"
    assert _epoch_labels(test) == test.dataset.targets
    x, _ = next(iter(test))
    assert x.shape == (4, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_task_error_names_suggestions_and_custom_folders(tmp_path):
    make_task(tmp_path, "my_leaves", 5)
    with pytest.raises(
        ValueError, match=r"Unknown task 'my_leafs'\. Did you mean 'my_leaves'\?.*custom task"
    ):
        vtab.VtabDataset("my_leafs", "train", data_root=tmp_path)
    with pytest.raises(ValueError, match=r"Unknown task 'cifra'\. Did you mean 'cifar'"):
        vtab.task_dir("cifra", tmp_path / "nowhere")


def test_missing_root_says_where_it_looked_and_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(vtab.ENV_VAR, raising=False)
    root = tmp_path / "data" / "vtab-1k"
    with pytest.raises(FileNotFoundError) as err:
        vtab.VtabDataset("dtd", "train")
    message = str(err.value)
    assert f"VTAB root {root} does not exist" in message and "default ./data/vtab-1k" in message
    assert f"python -m vtab.prepare --task dtd --out {root}" in message


def test_missing_task_folder_says_where_it_looked(tmp_path):
    make_task(tmp_path, "dtd", 47)
    expected = (
        r"No folder for task 'oxford_iiit_pet' under .*looked for oxford_iiit_pet, pets, oxford_pet.*"
        r"Prepare it with: python -m vtab\.prepare --task oxford_iiit_pet --out"
    )
    with pytest.raises(FileNotFoundError, match=expected):
        vtab.VtabDataset("pets", "test", data_root=tmp_path)


def test_missing_list_file(tmp_path):
    task = make_task(tmp_path, "dtd", 47)
    (task / "val200.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"Task 'dtd' has no list file .*dtd/val200\.txt for split 'val'"
    ):
        vtab.VtabDataset("dtd", "val", data_root=tmp_path)
    (tmp_path / "my_empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"my_empty holds none of the list files train800\.txt"):
        vtab.num_classes("my_empty", tmp_path)


@pytest.mark.parametrize(
    "line,what",
    [
        ("images/train/sub0/000.png", r"cannot parse 'images/train/sub0/000\.png'"),
        ("images/train/sub0/000.png three", r"cannot parse 'images/train/sub0/000\.png three'"),
        ("images/train/sub0/000.png 1.5", r"cannot parse"),
        ("images/train/sub0/000.png -1", r"label -1 is negative"),
    ],
)
def test_bad_list_line_names_file_and_line(tmp_path, line, what):
    task = make_task(tmp_path, "dtd", 47)
    lines = (task / "train800.txt").read_text().splitlines()
    lines[2] = line
    (task / "train800.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"dtd/train800\.txt:3: " + what):
        vtab.VtabDataset("dtd", "train", data_root=tmp_path)


def _set_line(task: Path, file: str, index: int, text: str) -> None:
    lines = (task / file).read_text().splitlines()
    lines[index] = text
    (task / file).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("split", list(vtab.SPLITS))
@pytest.mark.parametrize(
    "rel,why",
    [
        ("../other_task/images/0.png", "a '..' component"),
        ("images/../../secret.png", "a '..' component"),
        (r"..\up.png", "a '..' component"),
        ("/etc/hostname", "an absolute path"),
        (r"C:\data\x.png", "an absolute path"),
    ],
)
def test_list_paths_outside_the_task_folder_are_refused(tmp_path, split, rel, why):
    task = make_task(tmp_path, "dtd", 47)
    make_task(tmp_path, "mine", 5)
    file = vtab.SPLITS[split]
    expected = rf"{file}:2: image path {re.escape(repr(rel))} is {why}, outside the task folder; list paths"
    for name in ("dtd", "mine"):
        _set_line(tmp_path / name, file, 1, f"{rel} 1")
        with pytest.raises(ValueError, match=rf"{name}/" + expected):
            vtab.VtabDataset(name, split, data_root=tmp_path)
    with pytest.raises(ValueError, match=expected):
        vtab.num_classes("mine", tmp_path)  # inferring the count reads every list file
    with pytest.raises(ValueError, match=expected):
        vtab.data_identity("dtd", tmp_path)
    assert (task / "images").is_dir()


def test_a_typo_label_that_leaves_classes_empty_is_an_error(tmp_path):
    task = make_task(tmp_path, "mine", 5)  # labels 0..4 in every list file
    assert vtab.num_classes("mine", tmp_path) == 5
    image = (task / "train800.txt").read_text().splitlines()[2].rsplit(" ", 1)[0]
    for file in ("train800.txt", "train800val200.txt"):
        _set_line(task, file, 2, f"{image} 99")
    expected = (
        r"mine: classes 5\.\.98 of 0\.\.99 have no line in train800\.txt, val200\.txt, train800val200\.txt, "
        r"test\.txt \(the class count is inferred as the largest label \+ 1 = 100\); above the gap: "
        r"label 99 at train800\.txt:3, label 99 at train800val200\.txt:3\. Fix those labels, or declare the "
        r"class count \(num_classes=N; the trainer's --num-classes N\) to allow empty classes\.$"
    )
    with pytest.raises(ValueError, match=expected):
        vtab.num_classes("mine", tmp_path)
    with pytest.raises(ValueError, match=expected):
        vtab.VtabDataset("mine", "test", data_root=tmp_path)  # the count is inferred over every list file
    assert vtab.num_classes("mine", tmp_path, declared=100) == 100  # insisting allows empty classes
    assert vtab.VtabDataset("mine", "train", data_root=tmp_path, num_classes=100).num_classes == 100
    with pytest.raises(
        ValueError,
        match=r"mine: label 99 at train800\.txt:3, label 99 at train800val200\.txt:3 outside 0\.\.9 "
        r"\(the declared class count is 10\); fix those lines or declare a larger count\.$",
    ):
        vtab.num_classes("mine", tmp_path, declared=10)


def test_empty_class_messages_for_other_gaps(tmp_path):
    task = make_task(tmp_path, "sparse", 5)
    for file in vtab.LIST_FILES:  # labels 0..4 -> 0, 2, 4, 6, 8: four single-id gaps
        lines = [line.rsplit(" ", 1) for line in (task / file).read_text().splitlines()]
        (task / file).write_text("".join(f"{rel} {2 * int(label)}\n" for rel, label in lines))
    with pytest.raises(
        ValueError,
        match=r"classes 1, 3, 5, 7 of 0\.\.8 have no line .*above the gap: label 8 at train800\.txt:",
    ):
        vtab.num_classes("sparse", tmp_path)
    task = make_task(tmp_path, "one_based", 5)
    for file in vtab.LIST_FILES:  # labels 1..5
        lines = [line.rsplit(" ", 1) for line in (task / file).read_text().splitlines()]
        (task / file).write_text("".join(f"{rel} {int(label) + 1}\n" for rel, label in lines))
    with pytest.raises(
        ValueError,
        match=r"class 0 of 0\.\.5 has no line .*; the smallest label is 1 \(labels count from 0\)\.",
    ):
        vtab.num_classes("one_based", tmp_path)
    assert vtab.num_classes("one_based", tmp_path, declared=6) == 6
    (tmp_path / "many_gaps").mkdir()  # ten gaps: eight are named, then the count
    (tmp_path / "many_gaps" / "test.txt").write_text(
        "".join(f"images/{c}.png {c}\n" for c in range(0, 21, 2))
    )
    with pytest.raises(
        ValueError,
        match=r"classes 1, 3, 5, 7, 9, 11, 13, 15, \.\.\. \(10 ids in all\) of 0\.\.20 have no line in test\.txt ",
    ):
        vtab.num_classes("many_gaps", tmp_path)


def test_declared_class_count(tmp_path):
    make_task(tmp_path, "mine", 5)
    assert vtab.num_classes("mine", tmp_path, declared=20) == 20  # classes 5..19 may be empty
    with pytest.raises(
        ValueError,
        match=r"mine: label 4 at train800\.txt:5, .* at test\.txt:1 and 1 more line outside 0\.\.3 \(the",
    ):
        vtab.num_classes("mine", tmp_path, declared=4)
    assert vtab.num_classes("dtd", declared=47) == 47  # a registry task: its count, no folder needed
    with pytest.raises(
        ValueError,
        match=r"Task 'dtd' has 47 classes \(the VTAB registry\); the declared class count 10 does not "
        r"match it \(omit it, or pass 47\)\.",
    ):
        vtab.num_classes("textures", declared=10)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=rf"num_classes must be a positive int, got {bad!r}\."):
            vtab.num_classes("mine", tmp_path, declared=bad)


def test_label_outside_class_count(tmp_path):
    task = make_task(tmp_path, "dtd", 47)
    lines = (task / "test.txt").read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0] + " 47"
    (task / "test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ValueError, match=r"test\.txt:2: label 47 is outside 0\.\.46 \(task 'dtd' has 47 classes\)"
    ):
        vtab.VtabDataset("dtd", "test", data_root=tmp_path)
    custom = make_task(tmp_path, "mine", 5)
    with pytest.raises(ValueError, match=r"mine/test\.txt:\d+: label 4 is outside 0\.\.3"):
        vtab.VtabDataset("mine", "test", data_root=tmp_path, num_classes=4)
    assert custom.is_dir()


def test_missing_and_corrupt_images_name_path_and_line(tmp_path):
    task = make_task(tmp_path, "dtd", 47)
    lines = (task / "train800.txt").read_text().splitlines()
    lines[1] = "images/missing.png 3"
    (task / "train800.txt").write_text("\n".join(lines) + "\n")
    (task / lines[2].rsplit(" ", 1)[0]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = vtab.VtabDataset("dtd", "train", data_root=tmp_path)  # images are decoded lazily
    with pytest.raises(FileNotFoundError, match=r"Image .*dtd/images/missing\.png \(listed at .*train800\.txt:2\) does not exist"):  # fmt: skip
        ds[1]
    with pytest.raises(
        ValueError, match=r"Image .*/002\.png \(listed at .*train800\.txt:3\) cannot be decoded"
    ):
        ds[2]
    truncated = task / lines[3].rsplit(" ", 1)[0]  # a jpg cut in half: the header opens, decoding fails
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=r"Image .*/003\.jpg \(listed at .*train800\.txt:4\) cannot be decoded"
    ):
        ds[3]
    loader = vtab.make_loader(ds, 2, shuffle=False, workers=1)
    with pytest.raises(FileNotFoundError, match=r"missing\.png \(listed at .*train800\.txt:2\)"):
        list(loader)


def test_other_input_errors(tmp_path):
    make_task(tmp_path, "dtd", 47)
    with pytest.raises(ValueError, match=r"Unknown split 'training'; valid: train, val, trainval, test"):
        vtab.VtabDataset("dtd", "training", data_root=tmp_path)
    with pytest.raises(ValueError, match=r"num_classes must be a positive int, got 0"):
        vtab.VtabDataset("dtd", "test", data_root=tmp_path, num_classes=0)
    (tmp_path / "dtd" / "val200.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"val200\.txt lists no images"):
        vtab.VtabDataset("dtd", "val", data_root=tmp_path)
