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
