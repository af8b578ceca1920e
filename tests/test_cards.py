"""Model cards: generated from a run folder, parsed back with ModelCard.load, adapter loadable from the card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from huggingface_hub import ModelCard

import petl_zoo
from petl_zoo.cards import METRIC_BEST, METRIC_LAST, base_model_id, card_index, write_card, write_index

ROOT = Path(__file__).resolve().parents[1]
MODEL_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def make_run(
    folder: Path,
    task: str = "dtd",
    pretrained_file: str | None = None,
    method: str = "lora",
    options: dict | None = None,
) -> torch.nn.Module:
    options = {"rank": 2} if options is None else options
    torch.manual_seed(0)
    model = petl_zoo.create(method, tiny_vit(num_classes=5), **options)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    petl_zoo.save_adapter(model, folder)
    counts = petl_zoo.trainable_parameters(model)
    argv = [
        "tools/train.py",
        "--method",
        method,
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        *[f"{k}={v}" for k, v in MODEL_KWARGS.items()],
        "--task",
        task,
        *[a for k, v in options.items() for a in ("--opt", f"{k}={v}")],
        "--out",
        str(folder),
    ]
    config = {
        "method": method,
        "method_options": options,
        "model": "vit_tiny_patch16_224",
        "model_kwargs": MODEL_KWARGS,
        "task": task,
        "data_root": "/data/vtab",
        "pretrained_file": pretrained_file,
        "recipe": {"epochs": 10, "lr": 0.001, "batch_size": 64, "weight_decay": 0.0001, "seed": 0},
        "argv": argv,
    }
    result = {
        "method": method,
        "model": "vit_tiny_patch16_224",
        "task": task,
        "seed": 0,
        "num_classes": 5,
        "method_config": model.petl_method.config.to_dict(),
        "select_on": "test",
        "test_acc_best": 0.7234,
        "best_epoch": 7,
        "test_acc_last": 0.7011,
        "test_acc_selected": 0.7234,
        "val_acc_best": None,
        "epochs": 10,
        "trainable_params": counts,
        "train_time_s": 3.0,
        "img_per_s": 100.0,
        "peak_mem_mb": 0.0,
        "precision": "fp32",
        "world_size": 1,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_acc": 0.5}) + "\n")
    return model


def test_card_round_trip(tmp_path):
    run = tmp_path / "runs" / "lora" / "dtd"
    model = make_run(run)
    readme = write_card(run, tmp_path / "cards" / "lora" / "dtd")
    card = ModelCard.load(readme)
    data = card.data
    assert data.library_name == "timm"
    assert {"petl", "petl_zoo", "lora", "timm", "vtab-1k", "image-classification"} <= set(data.tags)
    assert data.base_model == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert data.datasets == ["vtab-1k/dtd"] and data.metrics == ["accuracy"]
    metrics = {e.metric_name: e for e in data.eval_results}
    assert metrics[METRIC_BEST].metric_value == pytest.approx(72.34)
    assert metrics[METRIC_LAST].metric_value == pytest.approx(70.11)
    assert all(e.metric_type == "accuracy" and e.dataset_type == "vtab-1k/dtd" for e in data.eval_results)
    assert all(e.task_type == "image-classification" for e in data.eval_results)
    assert [e.metric_name for e in data.eval_results] == [METRIC_BEST, METRIC_LAST]
    body = card.text
    assert "--opt rank=2" in body and "petl_zoo.load_adapter" in body and "| best epoch | 72.34 |" in body
    assert "| last epoch | 70.11 |" in body and "petl_zoo.merge(model)" in body  # LoRA is mergeable
    out = readme.parent
    assert {p.name for p in out.iterdir()} == {
        "README.md",
        "adapter.safetensors",
        "adapter_config.json",
        "train_config.json",
        "result.json",
        "metrics.jsonl",
    }
    assert json.loads((out / "train_config.json").read_text())["method"] == "lora"
    # The adapter shipped in the card reproduces the run's model (same random backbone via the seed).
    torch.manual_seed(0)
    fresh = petl_zoo.load_adapter(tiny_vit(num_classes=5), out)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize(
    "method,options,mergeable",
    [
        ("heat", {"base": "adapter"}, False),  # input-dependent adapters on q/v: no merge line
        ("pear", {"base": "lora"}, True),  # every Pear delta is a LoRA delta: the merge works
        ("adapter", {}, False),
    ],
)
def test_merge_line_follows_the_saved_adapter(tmp_path, caplog, method, options, mergeable):
    run = tmp_path / "run"
    model = make_run(run, method=method, options=options)
    assert petl_zoo.is_mergeable(model) is mergeable
    saved = petl_zoo.read_adapter_config(run)
    assert saved["mergeable"] is mergeable
    card = ModelCard.load(write_card(run, tmp_path / "card"))
    assert ("petl_zoo.merge(model)" in card.text) is mergeable
    # a folder saved before adapter_config.json recorded it: derived from the rebuilt structure
    del saved["mergeable"]
    (run / "adapter_config.json").write_text(json.dumps(saved))
    card = ModelCard.load(write_card(run, tmp_path / "old_card"))
    assert ("petl_zoo.merge(model)" in card.text) is mergeable
    assert not [r for r in caplog.records if "cannot tell whether" in r.getMessage()]  # really rebuilt


def test_local_pretrained_file_and_custom_task(tmp_path):
    run = tmp_path / "run"
    make_run(run, task="digits", pretrained_file="demo/vit_tiny_fmnist32.safetensors")
    card = ModelCard.load(write_card(run, tmp_path / "card"))
    assert card.data.base_model == "vit_tiny_patch16_224"  # local weights: no Hub base to point at
    assert card.data.datasets == ["digits"] and "vtab-1k" not in card.data.tags
    assert "vit_tiny_fmnist32.safetensors" in card.text and "pretrained_cfg_overlay" in card.text
    assert "# lora on vit_tiny_patch16_224 for the custom task digits\n" in card.text
    assert "VTAB-1K" not in card.text.split("## Results")[0]  # a custom task's card is not titled VTAB-1K


def test_a_tuned_run_says_it_was_tuned(tmp_path):
    """A retrained winner's card names the grid, the rule and the winner, not only plain flags."""
    tune = tmp_path / "runs" / "lora" / "dtd" / "tune-0123456789abcdef"
    make_run(tune / "seed0")
    record = {
        "version": 1, "method": "lora", "task": "dtd", "grid_fingerprint": "0123456789abcdef",
        "grid": {"lr": [0.001, 0.01]}, "rule": "highest val_accuracy", "winner": {"lr": 0.001},
        "points": [{"setting": {"lr": 0.001}, "folder": "points/lr0.001", "val_accuracy": 80.0},
                   {"setting": {"lr": 0.01}, "folder": "points/lr0.01", "val_accuracy": 70.0}],
        "retrained": [{"seed": 0, "folder": "seed0"}],
    }  # fmt: skip
    (tune / "selection.json").write_text(json.dumps(record))
    text = " ".join(ModelCard.load(write_card(tune / "seed0", tmp_path / "card")).text.split())
    assert (
        "**Tuned**: these settings were chosen, not given." in text and "the grid lr in {0.001, 0.01}" in text
    )
    assert 'by the rule "highest val_accuracy"; the winner, lr=0.001, was retrained' in text
    assert "`tune-0123456789abcdef/selection.json`, grid fingerprint `0123456789abcdef`" in text
    make_run(tmp_path / "untuned")
    assert "**Tuned**" not in ModelCard.load(write_card(tmp_path / "untuned", tmp_path / "c3")).text


def test_base_model_id():
    assert base_model_id("vit_base_patch16_224") == "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert base_model_id("no_such_model_xyz") == "no_such_model_xyz"
    assert base_model_id("vit_base_patch16_224", pretrained=False) == "vit_base_patch16_224"


@pytest.mark.slow  # two tools/model_card.py subprocesses
def test_unfinished_run_and_cli(tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "last.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="--resume"):
        write_card(killed, tmp_path / "out")
    run = tmp_path / "run"
    make_run(run)
    tool = str(ROOT / "tools" / "model_card.py")
    proc = subprocess.run(
        [sys.executable, tool, str(run), "--out", str(tmp_path / "card")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert ModelCard.load(tmp_path / "card" / "README.md").data.eval_results[0].metric_value == pytest.approx(
        72.34
    )
    proc = subprocess.run(
        [sys.executable, tool, str(killed), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "not a finished" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("blocked", ["under_a_file", "read_only"])
def test_card_out_that_cannot_be_written_is_one_line(tmp_path, capsys, blocked):
    from petl_zoo.cards import main

    run = tmp_path / "run"
    make_run(run)
    if blocked == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "card"
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
        if os.access(out, os.W_OK):  # root writes anywhere
            pytest.skip("this user can write a read-only folder")
    assert main([str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(tmp_path) in err


def test_index_lists_cards_and_repo_index_is_current(tmp_path):
    cards = tmp_path / "model_cards"
    cards.mkdir()
    (cards / "README.md").write_text((ROOT / "model_cards" / "README.md").read_text())
    assert "No cards are published yet." in (cards / "README.md").read_text()
    for task in ("dtd", "cifar"):
        make_run(tmp_path / "runs" / task, task=task)
        write_card(tmp_path / "runs" / task, cards / "lora" / task)
    write_index(cards)
    text = (cards / "README.md").read_text()
    assert "No cards are published yet." not in text and text.startswith("# Model cards")
    assert (
        "| [lora/cifar](lora/cifar/README.md) | lora | cifar | vit_tiny_patch16_224 | 72.34 | 70.11 | 768 |"
        in text
    )
    assert "[lora/dtd](lora/dtd/README.md)" in text
    write_index(cards)  # idempotent
    assert (cards / "README.md").read_text() == text
    # The repo's own index matches the cards it holds.
    repo_readme = (ROOT / "model_cards" / "README.md").read_text()
    assert card_index(ROOT / "model_cards") in repo_readme


def test_card_folder_carries_no_machine_paths(tmp_path):
    weights = tmp_path / "secret_place" / "backbone.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"not really weights")
    run = tmp_path / "run"
    run.mkdir()
    make_run(run, pretrained_file=str(weights))
    config = json.loads((run / "config.json").read_text())
    config["argv"] += ["--pretrained-file", str(weights), "--data-root", "/data/vtab"]
    (run / "config.json").write_text(json.dumps(config))
    card_dir = tmp_path / "card"
    write_card(run, card_dir)
    for path in card_dir.iterdir():
        text = path.read_text(errors="replace")
        assert str(tmp_path) not in text and "/data/vtab" not in text, path.name
    published = json.loads((card_dir / "train_config.json").read_text())
    assert published["pretrained_file"] == "backbone.safetensors" and "data_root" not in published
    assert len(published["pretrained_file_sha256"]) == 64
    assert "backbone.safetensors" in (card_dir / "README.md").read_text()


def test_index_refuses_or_marks_short_runs(tmp_path):
    cards = tmp_path / "model_cards"
    run = tmp_path / "runs" / "dtd"
    run.mkdir(parents=True)
    make_run(run)
    config = json.loads((run / "config.json").read_text())
    config["recipe_sources"] = {"epochs": "flag", "lr": "recipe:vtab"}  # --epochs 10 of the recipe's 100
    (run / "config.json").write_text(json.dumps(config))
    card = write_card(run, cards / "lora" / "dtd")
    assert "Short run" in card.read_text() and "10 of the recipe's 100 epochs" in card.read_text()
    with pytest.raises(ValueError, match="short run"):
        write_index(cards)
    assert not (cards / "README.md").exists()  # nothing written
    text = write_index(cards, allow_short=True).read_text()
    assert "short run: 10 of the recipe's 100 epochs" in text


def test_card_records_preset_and_input_protocol(tmp_path):
    run = tmp_path / "runs" / "ssf" / "svhn"
    make_run(run, task="svhn", method="ssf", options={})
    config = json.loads((run / "config.json").read_text())
    config["preset"] = "ssf/paper"
    config["recipe"].update(epochs=100, protocol="default")
    config["recipe_sources"] = {"epochs": "preset:ssf/paper", "lr": "recipe:vtab"}
    (run / "config.json").write_text(json.dumps(config))
    result = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps({**result, "epochs": 100}))
    body = ModelCard.load(write_card(run, tmp_path / "card")).text
    assert "Per-task preset: `ssf/paper`" in body and "the backbone's own normalisation" in body
    assert "Short run" not in body  # the preset's 100 epochs are the intended length
    plain = tmp_path / "runs" / "lora" / "dtd"
    make_run(plain)
    body = ModelCard.load(write_card(plain, tmp_path / "card2")).text
    assert "Per-task preset: none" in body and "Input protocol: not recorded" in body
