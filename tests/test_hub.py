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


# Records you can trust: what from_pretrained rebuilds from, and what push_to_hub publishes.


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> dict[str, Path]:
    """create_repo / upload_folder replaced: each upload is copied to ``tmp_path/hub/<repo>`` (only the
    allowed files), so a pushed repo can be loaded back; the returned dict maps repo id -> its copy."""
    import huggingface_hub

    repos: dict[str, Path] = {}

    def fake_upload(repo_id, folder_path, allow_patterns, **_):
        target = tmp_path / "hub" / repo_id
        target.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            shutil.copy(Path(folder_path) / name, target / name)
        repos[repo_id] = target
        return type("Info", (), {"commit_url": f"https://example.invalid/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: repos.setdefault(repo_id, None))
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload)
    return repos


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    edit(config)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))


def test_a_model_from_pretrained_pushes_a_repo_that_loads_back(adapter_dir, weights_file, fake_hub):
    folder, model = adapter_dir
    loaded = petl_zoo.from_pretrained(folder, pretrained_file=weights_file)
    petl_zoo.push_to_hub(loaded, "someone/again")  # no model_kwargs: the record came with the model
    pushed = fake_hub["someone/again"]
    assert json.loads((pushed / ADAPTER_CONFIG).read_text())["base_model"]["model_kwargs"] == KWARGS
    again = petl_zoo.from_pretrained(pushed, pretrained_file=weights_file)
    torch.testing.assert_close(_out(again), _out(model), rtol=0, atol=0)


def test_load_adapter_attaches_the_record_and_explicit_kwargs_win(adapter_dir, weights_file, tmp_path):
    folder, _ = adapter_dir
    model = build_backbone(ARCH, 5, pretrained_file=weights_file, model_kwargs=KWARGS)
    petl_zoo.load_adapter(model, folder)
    assert petl_zoo.api.base_model_record(model)["model_kwargs"] == KWARGS
    petl_zoo.save_adapter(model, tmp_path / "resaved")
    assert petl_zoo.read_adapter_config(tmp_path / "resaved")["base_model"]["model_kwargs"] == KWARGS
    petl_zoo.save_adapter(model, tmp_path / "given", model_kwargs={"img_size": 32})
    assert petl_zoo.read_adapter_config(tmp_path / "given")["base_model"]["model_kwargs"] == {"img_size": 32}


def test_push_refuses_a_model_its_record_would_not_rebuild(weights_file, fake_hub):
    model = _trained_lora(weights_file)  # built with KWARGS, which the caller does not pass
    with pytest.raises(
        ValueError,
        match=r"^refusing to push this model to someone/x: from_pretrained would build "
        rf"{ARCH}\.\w+ with model_kwargs \{{\}}, another model than this one \('num_blocks' is 12 there, "
        r"2 here\); pass model_kwargs= with the timm.create_model keywords this model was built with; "
        r"nothing was uploaded$",
    ):
        petl_zoo.push_to_hub(model, "someone/x")
    no_size = {k: v for k, v in KWARGS.items() if k != "img_size"}  # the blocks fit, the input size not
    with pytest.raises(ValueError, match=r"'pos_embed' is \(1, 785, 48\) there, \(1, 17, 48\) here"):
        petl_zoo.push_to_hub(model, "someone/x", model_kwargs=no_size)
    assert fake_hub == {}  # no repo created, nothing uploaded
    petl_zoo.push_to_hub(model, "someone/x", model_kwargs=KWARGS)
    assert sorted(p.name for p in fake_hub["someone/x"].iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["base_model"].update(model_kwargs={}),
            r"from_pretrained could not load it back on \S+ with model_kwargs \{\} \(adapter in \S+ was saved "
            r"for a model with 2 blocks, this one has 12\)",
        ),
        (
            lambda c: c["base_model"].update(num_classes=7),
            r"tensor 'head.bias' has shape \(5,\), the model expects \(7,\)",
        ),
        (lambda c: c.pop("weights_sha256"), r"records no weights_sha256, which from_pretrained requires"),
        (lambda c: c.update(weights_sha256="0" * 64), r"does not match the SHA-256"),
        (
            lambda c: c["base_model"]["model_kwargs"].update(checkpoint_path="x.pth"),
            r"sets 'checkpoint_path'",
        ),
        (lambda c: c.pop("base_model"), r"has no base_model record"),
    ],
    ids=["kwargs-empty", "num-classes", "no-hash", "wrong-hash", "file-kwarg", "no-record"],
)
def test_push_refuses_a_folder_from_pretrained_would_not_load(adapter_dir, fake_hub, edit, message):
    folder, _ = adapter_dir
    _edit_config(folder, edit)
    with pytest.raises(ValueError, match=rf"^refusing to push {folder} to someone/x: .*{message}.*; nothing"):
        petl_zoo.push_to_hub(folder, "someone/x")
    assert fake_hub == {}


@pytest.mark.parametrize("method", petl_zoo.method_names())
def test_every_method_passes_the_push_check(method, fake_hub):
    torch.manual_seed(0)
    model = petl_zoo.create(method, build_backbone(ARCH, 5, pretrained=False, model_kwargs=KWARGS))
    petl_zoo.push_to_hub(model, f"someone/{method}", model_kwargs=KWARGS)
    assert (fake_hub[f"someone/{method}"] / ADAPTER_WEIGHTS).is_file()


@pytest.mark.parametrize(
    "key, value",
    [
        ("checkpoint_path", None),  # set to a real other backbone file below
        ("pretrained_cfg", {"file": "other.safetensors"}),
        ("pretrained_cfg_overlay", {"file": "other.safetensors"}),
        ("pretrained", True),
        ("pretrained_strict", False),
        ("cache_dir", "somewhere"),
        ("hf_hub_id", "someone/else"),
        ("weights_url", "https://example.invalid/w.pth"),
        ("features_only", True),
        ("__class__", 1),
    ],
)
def test_record_kwargs_reach_timm_only_as_architecture_keywords(
    adapter_dir, weights_file, tmp_path, key, value
):
    folder, _ = adapter_dir
    if value is None:  # a loadable file: without the check, it would silently replace the user's weights
        torch.manual_seed(3)
        other = build_backbone(ARCH, 5, pretrained=False, model_kwargs=KWARGS)
        value = str(tmp_path / "other.safetensors")
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, value)
    _edit_config(folder, lambda c: c["base_model"]["model_kwargs"].update({key: value}))
    with pytest.raises(
        ValueError, match=rf"^{folder / ADAPTER_CONFIG}: base_model.model_kwargs sets '{key}'"
    ):
        petl_zoo.from_pretrained(folder, pretrained_file=weights_file)
    model = build_backbone(ARCH, 5, pretrained_file=weights_file, model_kwargs=KWARGS)
    petl_zoo.load_adapter(model, folder)  # the record is not used here, and not carried on
    assert not hasattr(model, "petl_base_model")


@pytest.mark.parametrize("hash_edit", ["deleted", "empty"])
def test_an_adapter_without_a_hash_loads_only_with_verify_false(adapter_dir, weights_file, hash_edit, caplog):
    folder, model = adapter_dir
    _edit_config(
        folder, lambda c: c.pop("weights_sha256") if hash_edit == "deleted" else c.update(weights_sha256="")
    )
    message = (
        rf"^{folder / ADAPTER_CONFIG} records no weights_sha256, so {ADAPTER_WEIGHTS} cannot be checked; "
        r"pass verify=False to load it unchecked$"
    )
    with pytest.raises(ValueError, match=message):
        petl_zoo.from_pretrained(folder, pretrained_file=weights_file)
    fresh = build_backbone(ARCH, 5, pretrained_file=weights_file, model_kwargs=KWARGS)
    with pytest.raises(ValueError, match=message):
        petl_zoo.load_adapter(fresh, folder)
    assert petl_zoo.method_of(fresh) is None  # refused before anything was attached
    loaded = petl_zoo.from_pretrained(folder, pretrained_file=weights_file, verify=False)
    torch.testing.assert_close(_out(loaded), _out(model), rtol=0, atol=0)
    assert "without checking its SHA-256 (verify=False)" in caplog.text
    petl_zoo.load_adapter(fresh, folder, verify=False)
    torch.testing.assert_close(_out(fresh.eval()), _out(model), rtol=0, atol=0)


def test_checked_model_kwargs_passes_architecture_keywords_only():
    from petl_zoo.api import checked_model_kwargs

    assert checked_model_kwargs({"img_size": [32, 32], "depth": 2}, "a.json") == {
        "img_size": [32, 32],
        "depth": 2,
    }
    assert checked_model_kwargs(None, "a.json") == {}
    with pytest.raises(
        ValueError, match=r"^a.json: base_model.model_kwargs is a list, not an object of timm"
    ):
        checked_model_kwargs(["img_size", 32], "a.json")
    with pytest.raises(
        ValueError, match=r"^config.json: model_kwargs sets 'model_file', which a saved record"
    ):
        checked_model_kwargs({"depth": 2, "model_file": "x"}, "config.json", field="model_kwargs")
