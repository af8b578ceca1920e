"""The trainer end to end on the host families users pick first: EVA-02, SwinV2 and distilled DeiT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "eva02": (
        "eva02_tiny_patch14_224",
        ["img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3"],
    ),
    "swinv2": (
        "swinv2_tiny_window8_256",
        ["img_size=32", "patch_size=4", "window_size=4", "embed_dim=16", "depths=[1,1]", "num_heads=[1,2]"],
    ),
    "deit_distilled": (
        "deit_tiny_distilled_patch16_224",
        ["img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3"],
    ),
}


def train_on_digits(
    data: Path, out: Path, method: str, model: str, model_kwargs: list[str], batch: int
) -> subprocess.CompletedProcess:
    """One epoch of tools/train.py on digits from random weights."""
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--method", method, "--model", model]
    cmd += ["--model-kwargs", *model_kwargs, "--no-pretrained", "--task", "digits", "--data-root", str(data)]
    cmd += [
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--batch-size",
        str(batch),
        "--no-progress",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from vtab.prepare import main

    root = tmp_path_factory.mktemp("vtab")
    assert main(["--task", "digits", "--out", str(root)]) == 0
    return root


@pytest.mark.slow  # three short trainer subprocesses
@pytest.mark.parametrize("host", sorted(RUNS))
def test_train_runs_end_to_end_on_digits(host, digits, tmp_path):
    model, kwargs = RUNS[host]
    method = "linear" if host == "deit_distilled" else "lora"
    out = tmp_path / "run"
    proc = train_on_digits(digits, out, method, model, kwargs, batch=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert 0.0 <= result["test_acc_last"] <= 1.0 and result["resolved_model"].startswith(model)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model"]["architecture"] == model
    if host == "deit_distilled":  # both heads trained, counted and saved
        assert result["trainable_params"]["head"] == 2 * (48 * 10 + 10)
        assert {"head.weight", "head_dist.weight"} <= set(config["tensors"])
    else:
        assert result["trainable_params"]["method"] > 0


def test_deprecated_names_resolve_with_a_note():
    from petl_zoo.train.backbone import resolve_model_name

    resolved, note = resolve_model_name("vit_base_patch16_224_in21k")
    assert resolved == "vit_base_patch16_224.augreg_in21k"
    assert "deprecated" in note and "vit_base_patch16_224.orig_in21k" in note
    assert resolve_model_name("vit_base_patch16_224.orig_in21k") == ("vit_base_patch16_224.orig_in21k", None)
    assert resolve_model_name("eva02_tiny_patch14_224")[0].startswith("eva02_tiny_patch14_224.")


@pytest.mark.slow
def test_trainer_says_when_timm_remaps_the_name(digits, tmp_path):
    out = tmp_path / "run"
    tiny = ["img_size=32", "patch_size=8", "depth=1", "embed_dim=48", "num_heads=3"]
    proc = train_on_digits(digits, out, "linear", "vit_base_patch16_224_in21k", tiny, batch=250)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if "timm maps the deprecated model name" in line
    ]
    assert len(said) == 1 and "orig_in21k" in said[0]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "vit_base_patch16_224_in21k"
    assert config["resolved_model"] == "vit_base_patch16_224.augreg_in21k"
