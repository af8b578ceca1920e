"""The demo backbone: the shipped file loads with the demo config, and tools/build_demo_backbone.py's
function trains one from Fashion-MNIST idx files (here a tiny fake set and a tiny model, one epoch)."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from petl_zoo import demo
from petl_zoo.io import sha256_file
from petl_zoo.train.backbone import build_backbone
from petl_zoo.train.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SHA256 = "d1eead24e3d7378bdce11f473c6cb20458587d40fb594b7b0d7672dce897967b"
SHIPPED_SWIN_SHA256 = "0b7e9aff82127c70e7335ae1d3bdfa48ad6f9077a77f1e76447f19972e8ab16c"
TINY = {"depth": 1, "embed_dim": 16, "num_heads": 2}


def write_idx(path: Path, data: torch.Tensor) -> None:
    """``data`` (uint8) as an idx file, gzip-compressed when ``path`` ends in ``.gz``."""
    header = bytes([0, 0, 8, data.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    raw = header + data.contiguous().numpy().tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def fake_fmnist(folder: Path, n_train: int = 48, n_test: int = 24, gz: bool = True) -> Path:
    """Fashion-MNIST's four idx files with random 28x28 images (the test pair left out when n_test is 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    ext = ".gz" if gz else ""
    splits = [("train", n_train)] + ([("t10k", n_test)] if n_test else [])
    for split, n in splits:
        write_idx(
            folder / f"{split}-images-idx3-ubyte{ext}",
            torch.randint(0, 256, (n, 28, 28), generator=gen).byte(),
        )
        write_idx(
            folder / f"{split}-labels-idx1-ubyte{ext}", torch.randint(0, 10, (n,), generator=gen).byte()
        )
    return folder


def tiny_recipe(**kw) -> demo.DemoRecipe:
    return demo.DemoRecipe(epochs=1, batch_size=16, model_kwargs=TINY, **kw)


def test_the_shipped_file_is_the_measured_one_and_loads_with_the_demo_config():
    path = ROOT / demo.DEMO_FILE
    assert path.is_file(), f"{demo.DEMO_FILE} is missing from the checkout"
    assert sha256_file(path) == SHIPPED_SHA256
    overlay = dict(file=str(path), num_classes=10)  # num_classes: keep the Fashion-MNIST head
    model = timm.create_model(
        demo.DEMO_MODEL, **demo.DEMO_KWARGS, num_classes=10, pretrained=True, pretrained_cfg_overlay=overlay
    )
    assert torch.equal(model.head.weight, load_file(path)["head.weight"])
    other = build_backbone(demo.DEMO_MODEL, 7, pretrained_file=path, model_kwargs=demo.DEMO_KWARGS)
    assert other.head.out_features == 7 and torch.equal(other.pos_embed, model.pos_embed)


def test_the_shipped_swin_file_loads_with_its_config():
    spec = demo.DEMO_ARCHS["swin"]
    path = ROOT / spec.file
    assert sha256_file(path) == SHIPPED_SWIN_SHA256
    model = build_backbone(spec.model, 7, pretrained_file=path, model_kwargs=spec.model_kwargs)
    assert model.head.fc.out_features == 7 and model.patch_embed.img_size == (32, 32)
    saved = load_file(path)
    assert torch.equal(model.layers[2].blocks[1].mlp.fc2.weight, saved["layers.2.blocks.1.mlp.fc2.weight"])


def test_build_on_a_fake_idx_set_writes_a_file_timm_loads(tmp_path, caplog):
    data = fake_fmnist(tmp_path / "fmnist")
    out = tmp_path / "out" / "demo.safetensors"
    with caplog.at_level(logging.INFO, logger="petl_zoo.demo"):
        build = demo.build_demo_backbone(out, fmnist=data, recipe=tiny_recipe(), download=False)
    assert build.path == out and out.is_file() and build.sha256 == sha256_file(out)
    assert build.eval_split == "the Fashion-MNIST test split" and build.eval_images == 24
    assert build.train_images == 48 and 0.0 <= build.accuracy <= 1.0
    assert not [p for p in out.parent.iterdir() if p != out], "a temporary file was left behind"
    assert "held-out accuracy" in caplog.text and "test split" in caplog.text
    model = timm.create_model(
        demo.DEMO_MODEL,
        **{**demo.DEMO_KWARGS, **TINY},
        num_classes=10,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out), num_classes=10),
    )
    saved = load_file(out)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert model.patch_embed.img_size == (32, 32) and model.patch_embed.patch_size == (4, 4)
    head3 = build_backbone(demo.DEMO_MODEL, 3, pretrained_file=out, model_kwargs={**demo.DEMO_KWARGS, **TINY})
    assert head3.head.out_features == 3


def test_swin_build_writes_a_file_the_trainer_loads(tmp_path):
    """``--arch swin``: the same data and recipe on the Swin demo architecture (here a tiny one)."""
    tiny = {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2)}
    recipe = demo.DemoRecipe(epochs=1, batch_size=16, model_kwargs=tiny, arch="swin")
    out = tmp_path / "swin.safetensors"
    build = demo.build_demo_backbone(
        out, fmnist=fake_fmnist(tmp_path / "fmnist"), recipe=recipe, download=False
    )
    assert build.sha256 == sha256_file(out) and build.train_images == 48
    spec = demo.DEMO_ARCHS["swin"]
    kwargs = {**spec.model_kwargs, **tiny}
    model = build_backbone(spec.model, 4, pretrained_file=out, model_kwargs=kwargs)
    saved = load_file(out)
    assert model.head.fc.out_features == 4
    assert torch.equal(model.layers[1].blocks[0].attn.qkv.weight, saved["layers.1.blocks.0.attn.qkv.weight"])
    with pytest.raises(UserError, match="unknown demo architecture 'convnext'; valid: vit, swin"):
        demo.create_demo_model("convnext")


def test_same_seed_same_file_and_without_a_test_split_a_training_slice_is_held_out(tmp_path):
    data = fake_fmnist(
        tmp_path / "FashionMNIST" / "raw", n_train=36, n_test=0, gz=False
    )  # torchvision's layout
    a = demo.build_demo_backbone(
        tmp_path / "a.safetensors", fmnist=tmp_path, recipe=tiny_recipe(), download=False
    )
    b = demo.build_demo_backbone(
        tmp_path / "b.safetensors", fmnist=data, recipe=tiny_recipe(), download=False
    )
    assert a.sha256 == b.sha256
    assert a.eval_split.startswith("a held-out slice of the training split") and a.eval_images == 3
    assert a.train_images == 33
    c = demo.build_demo_backbone(
        tmp_path / "c.safetensors", fmnist=data, recipe=tiny_recipe(seed=1), download=False
    )
    assert c.sha256 != a.sha256


def test_missing_data_is_one_line_naming_where_it_looked_and_the_url(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as err:
        demo.load_fashion_mnist(empty)
    text = str(err.value)
    assert (
        "\n" not in text and "train-images-idx3-ubyte" in text and str(empty / "FashionMNIST" / "raw") in text
    )
    monkeypatch.setattr(demo, "DEFAULT_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(UserError) as err:
        demo.load_fashion_mnist(download=False)
    assert (
        "\n" not in str(err.value) and demo.TORCHVISION_URL in str(err.value) and "nowhere" in str(err.value)
    )

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried mirrors, all failed")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", offline)
    with pytest.raises(UserError) as err:
        demo.load_fashion_mnist(download_root=tmp_path / "dl")
    assert "\n" not in str(err.value) and "failed (RuntimeError" in str(err.value)
    assert demo.TORCHVISION_URL in str(err.value)


def test_damaged_idx_files_are_one_line(tmp_path):
    (tmp_path / "x").write_bytes(b"not idx")
    with pytest.raises(UserError, match="not an idx file"):
        demo.read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(UserError, match="truncated"):
        demo.read_idx(tmp_path / "y")
    (tmp_path / "z.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(UserError, match="cannot read"):
        demo.read_idx(tmp_path / "z.gz")


def test_the_command_reports_missing_data_in_one_line(tmp_path, caplog):
    rc = demo.main(["--fmnist", str(tmp_path), "--out", str(tmp_path / "o.safetensors")])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert (
        len(errors) == 1 and errors[0].startswith("error: Fashion-MNIST not found") and "\n" not in errors[0]
    )
    assert not (tmp_path / "o.safetensors").exists()
