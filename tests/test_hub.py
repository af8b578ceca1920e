"""Hub adapters: the base-model record, from_pretrained (local folder, mocked Hub), push_to_hub, card round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import petl_zoo
from petl_zoo.api import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from petl_zoo.io import sha256_file
from petl_zoo.train.backbone import build_backbone

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}


@pytest.fixture
def weights_file(tmp_path) -> Path:
    """A 'pretrained' backbone file made here (random weights, 1000-class head as a timm checkpoint)."""
    torch.manual_seed(1)
    backbone = build_backbone(ARCH, 1000, pretrained=False, model_kwargs=KWARGS)
    path = tmp_path / "tiny_backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return path


def _trained_lora(weights_file: Path) -> torch.nn.Module:
    model = build_backbone(ARCH, 5, pretrained_file=weights_file, model_kwargs=KWARGS)
    petl_zoo.create("lora", model, rank=2)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture
def adapter_dir(tmp_path, weights_file) -> tuple[Path, torch.nn.Module]:
    model = _trained_lora(weights_file)
    folder = petl_zoo.save_adapter(model, tmp_path / "adapter", model_kwargs=KWARGS)
    return folder, model


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def test_adapter_config_records_base_model_and_hash(adapter_dir):
    folder, _ = adapter_dir
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = config["base_model"]
    assert base["architecture"] == ARCH and base["name"] == f"{ARCH}.{base['tag']}" and base["tag"]
    assert base["hf_hub_id"] == f"timm/{base['name']}"
    assert base["num_classes"] == 5 and base["model_kwargs"] == KWARGS
    assert config["weights_sha256"] == sha256_file(folder / ADAPTER_WEIGHTS)
    assert "file" not in json.dumps(base)  # no machine path of the weights file


def test_from_pretrained_local_folder(adapter_dir, weights_file):
    folder, model = adapter_dir
    loaded = petl_zoo.from_pretrained(folder, pretrained_file=weights_file)
    assert petl_zoo.method_of(loaded).name == "lora" and not loaded.training
    torch.testing.assert_close(_out(loaded), _out(model), rtol=0, atol=0)


def test_from_pretrained_hub_download_mocked(adapter_dir, weights_file, tmp_path, monkeypatch):
    import huggingface_hub

    folder, model = adapter_dir
    snapshot = tmp_path / "hub-cache" / "snapshots" / "abc123"
    asked: list[tuple[str, str, str | None]] = []

    def fake_download(repo_id, filename, revision=None, token=None, **_):
        asked.append((repo_id, filename, revision))
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(shutil.copy(folder / filename, snapshot / filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = petl_zoo.from_pretrained("someone/lora-tiny", pretrained_file=weights_file, revision="v1")
    assert sorted(name for _, name, _ in asked) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert {(repo, rev) for repo, _, rev in asked} == {("someone/lora-tiny", "v1")}
    torch.testing.assert_close(_out(loaded), _out(model), rtol=0, atol=0)


def test_corrupt_weights_are_refused_by_hash(adapter_dir, weights_file):
    folder, _ = adapter_dir
    data = bytearray((folder / ADAPTER_WEIGHTS).read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor: still a loadable safetensors file
    (folder / ADAPTER_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        petl_zoo.from_pretrained(folder, pretrained_file=weights_file)


def test_bad_sources_are_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an adapter folder nor a Hub repo id"):
        petl_zoo.from_pretrained(tmp_path / "nope" / "deeper")
    old = tmp_path / "old"
    old.mkdir()
    (old / ADAPTER_CONFIG).write_text(json.dumps({"method": "lora", "config": {}}))
    (old / ADAPTER_WEIGHTS).write_bytes(b"")
    with pytest.raises(ValueError, match="no base_model record"):
        petl_zoo.from_pretrained(old)


def test_push_to_hub_uploads_adapter_and_card(adapter_dir, monkeypatch):
    import huggingface_hub

    folder, model = adapter_dir
    (folder / "README.md").write_text("---\ntags: [petl_zoo]\n---\ncard\n")
    calls: dict[str, dict] = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", kw))

    def fake_upload(**kw):
        calls["upload"] = kw
        uploaded = Path(kw["folder_path"])
        calls["files"] = {"names": sorted(p.name for p in uploaded.iterdir())}
        return type("Info", (), {"commit_url": "https://example.invalid/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload)
    url = petl_zoo.push_to_hub(folder, "someone/lora-tiny", private=True)
    assert url.endswith("/commit/1") and calls["create"]["private"] is True
    assert calls["upload"]["repo_id"] == "someone/lora-tiny"
    assert calls["upload"]["allow_patterns"] == [ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md"]
    petl_zoo.push_to_hub(model, "someone/lora-tiny", model_kwargs=KWARGS)  # a model: saved to a temp folder
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG} <= set(calls["files"]["names"])
    with pytest.raises(FileNotFoundError, match="not an adapter"):
        petl_zoo.push_to_hub(folder.parent, "someone/x")


def test_card_folder_round_trips_through_from_pretrained(adapter_dir, weights_file, tmp_path):
    """A card written by tools/model_card.py from a run folder loads back with from_pretrained."""
    from huggingface_hub import ModelCard

    from petl_zoo.cards import write_card

    folder, model = adapter_dir
    run = folder  # a run folder is an adapter folder plus the run's records
    result = {
        "method": "lora",
        "model": ARCH,
        "task": "digits",
        "num_classes": 5,
        "test_acc_best": 0.5,
        "test_acc_last": 0.4,
        "epochs": 1,
        "best_epoch": 1,
        "trainable_params": {"method": 2},
    }
    config = {
        "method": "lora",
        "model": ARCH,
        "task": "digits",
        "model_kwargs": KWARGS,
        "pretrained_file": str(weights_file),
        "pretrained": True,
        "recipe": {"epochs": 1},
        "argv": ["tools/train.py", "--method", "lora"],
    }
    (run / "result.json").write_text(json.dumps(result))
    (run / "config.json").write_text(json.dumps(config))
    card_dir = tmp_path / "card"
    card = ModelCard.load(write_card(run, card_dir))
    assert "petl_zoo.from_pretrained" in card.text and weights_file.name in card.text
    assert str(weights_file.parent) not in card.text  # the file by name and hash, not by its path
    loaded = petl_zoo.from_pretrained(card_dir, pretrained_file=weights_file)
    torch.testing.assert_close(_out(loaded), _out(model), rtol=0, atol=0)
