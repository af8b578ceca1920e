"""Per-task presets: every shipped file loads and validates, every value cites its source, lookups work."""

from __future__ import annotations

import re

import pytest

import petl_zoo.presets as presets
from petl_zoo.presets import PRESET_DIR, available_presets, load_preset

SHIPPED = sorted(PRESET_DIR.glob("*.yaml"))
_VALUE_SECTIONS = ("recipe", "options_common", "tasks")


def _method_and_name(path) -> tuple[str, str]:
    import yaml

    method = yaml.safe_load(path.read_text())["method"]
    return method, "paper" if path.stem == method else f"paper_{path.stem[len(method) + 1 :]}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_preset_loads_and_every_value_has_a_source(path):
    method, name = _method_and_name(path)
    preset = load_preset(method, name)
    assert name in available_presets(method)
    for task in preset.tasks:
        options, recipe = preset.for_task(task)
        assert isinstance(options, dict) and isinstance(recipe, dict)
    section = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.split(":", 1)[0]
            continue
        value_line = re.match(r"\s+[\w.-]+:\s*\S", line)
        if section in _VALUE_SECTIONS and value_line:
            assert "source:" in line, f"{path.name}: a value without its source: {line.strip()}"


def test_lookup_order_and_errors(tmp_path, monkeypatch, isolated_registry):
    (tmp_path / "lora.yaml").write_text(
        "method: lora\nprotocol: default\nrecipe:\n  lr: 0.01  # source: test\n"
        "options_common:\n  dropout: 0.1  # source: test\n"
        "tasks:\n  dtd:\n    options: {rank: 4}  # source: test\n    recipe: {lr: 0.02}  # source: test\n"
    )
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    preset = load_preset("lora", "paper")
    assert preset.label == "lora/paper" and available_presets("lora") == ["paper"]
    assert preset.for_task("dtd") == ({"dropout": 0.1, "rank": 4}, {"lr": 0.02, "protocol": "default"})
    assert preset.for_task("cifar") == ({"dropout": 0.1}, {"lr": 0.01, "protocol": "default"})
    with pytest.raises(ValueError, match="no preset 'tuned' for method 'lora'; presets for lora: paper"):
        load_preset("lora", "tuned")
    (tmp_path / "lora_bad.yaml").write_text("method: lora\ntasks:\n  dtd:\n    options: {rank: 0}\n")
    with pytest.raises(ValueError, match=r"lora_bad.yaml \(task dtd\): .*rank"):
        load_preset("lora", "paper_bad")
    (tmp_path / "lora_task.yaml").write_text("method: lora\ntasks:\n  not_a_task:\n    options: {rank: 2}\n")
    with pytest.raises(ValueError, match="'not_a_task' is not a VTAB-1K task name"):
        load_preset("lora", "paper_task")
    (tmp_path / "lora_key.yaml").write_text("method: lora\nrecipe:\n  momentum: 0.9\n")
    with pytest.raises(ValueError, match=r"recipe keys \['momentum'\] are not recipe settings"):
        load_preset("lora", "paper_key")


# -- the trainer's --preset: options and recipe layered, recorded, fingerprinted --------------------
TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "depth=2"]


@pytest.fixture
def lora_preset(tmp_path, monkeypatch, isolated_registry):
    from test_train import write_task

    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "lora.yaml").write_text(
        "method: lora\nprotocol: default\nrecipe:\n  lr: 0.01  # source: test\n  epochs: 7  # source: test\n"
        "options_common:\n  dropout: 0.1  # source: test\n"
        "tasks:\n  dtd:\n    options: {rank: 4}  # source: test\n    recipe: {lr: 0.02}  # source: test\n"
    )
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path / "presets")
    root = tmp_path / "vtab"
    for task in ("dtd", "custom"):
        write_task(root, task)
    return root


def _config(root, *extra: str) -> dict:
    from petl_zoo.train.spec import expected_config

    return expected_config(
        ["--method", "lora", *TINY_ARGS, "--data-root", str(root), "--no-pretrained", *extra]
    )


def test_train_preset_layers_per_task_values_and_records_them(lora_preset):
    config = _config(lora_preset, "--task", "dtd", "--preset", "paper")
    assert config["preset"] == "lora/paper"
    assert (config["method_options"]["rank"], config["method_options"]["dropout"]) == (4, 0.1)
    recipe, sources = config["recipe"], config["recipe_sources"]
    assert (recipe["lr"], recipe["epochs"], recipe["protocol"]) == (0.02, 7, "default")
    assert (
        sources["lr"] == sources["protocol"] == "preset:lora/paper" and sources["batch_size"] == "recipe:vtab"
    )
    # --opt and flags win over the preset
    mine = _config(lora_preset, "--task", "dtd", "--preset", "paper", "--opt", "rank=2", "--lr", "0.5")
    assert mine["method_options"]["rank"] == 2 and mine["method_options"]["dropout"] == 0.1
    assert mine["recipe"]["lr"] == 0.5 and mine["recipe_sources"]["lr"] == "flag"
    # a custom task gets the common values
    custom = _config(lora_preset, "--task", "custom", "--preset", "paper")
    assert custom["method_options"]["rank"] == 8 and custom["recipe"]["lr"] == 0.01


def test_a_preset_run_is_another_row_than_the_same_values_by_hand(lora_preset):
    with_preset = _config(lora_preset, "--task", "custom", "--preset", "paper")
    by_hand = _config(
        lora_preset, "--task", "custom", "--opt", "dropout=0.1", "--lr", "0.01", "--epochs", "7",
        "--protocol", "default",
    )  # fmt: skip
    assert (
        with_preset["recipe"] == by_hand["recipe"]
        and with_preset["method_options"] == by_hand["method_options"]
    )
    assert by_hand["preset"] is None
    assert with_preset["fingerprint"]["recipe"] != by_hand["fingerprint"]["recipe"]
    plain = _config(lora_preset, "--task", "custom")
    assert plain["recipe_sources"]["lr"] == "recipe:vtab" and plain["preset"] is None


def test_unknown_preset_is_one_line_from_the_trainer(lora_preset, capsys):
    from petl_zoo.train.cli import main

    out = lora_preset.parent / "run"
    status = main(["--method", "lora", *TINY_ARGS, "--data-root", str(lora_preset), "--task", "dtd",
                   "--no-pretrained", "--preset", "tuned", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 1 and err == "error: no preset 'tuned' for method 'lora'; presets for lora: paper"
    assert not out.exists()


def test_shipped_preset_through_the_trainer(tmp_path):
    from test_train import write_task

    from petl_zoo.train.spec import expected_config

    root = write_task(tmp_path, "svhn")
    config = expected_config(
        ["--method", "ssf", *TINY_ARGS, "--data-root", str(root), "--task", "svhn", "--no-pretrained",
         "--preset", "paper"]
    )  # fmt: skip
    options, recipe = load_preset("ssf", "paper").for_task("svhn")
    assert config["preset"] == "ssf/paper"
    assert all(config["recipe"][k] == v for k, v in recipe.items())
    assert all(config["method_options"][k] == v for k, v in options.items())


def test_an_alias_records_the_preset_under_its_one_name():
    """``--preset tt`` and ``--preset paper_tt`` find one file: the same label, the same table row."""
    assert load_preset("fact", "tt").label == load_preset("fact", "paper_tt").label == "fact/paper_tt"
    assert load_preset("fact", "paper").label == "fact/paper"
