"""A run's data is identified by content: moved data is the same run (skipped, resumed), changed data
is another (refused by the sweep and by --resume), and eval --check compares the split first."""

from __future__ import annotations

import shutil

import pytest
from test_train import base_args, write_task

from petl_zoo.sweep.plan import classify
from petl_zoo.train import eval_main, main
from petl_zoo.train.spec import expected_config


def _relabel(root, split_file: str = "train800val200.txt") -> None:
    """Change the first label of a list file (what a fixed typo or a re-annotation does)."""
    path = root / "synth" / split_file
    lines = path.read_text().splitlines()
    rel, label = lines[0].rsplit(" ", 1)
    lines[0] = f"{rel} {(int(label) + 1) % 3}"
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def finished(tmp_path):
    """A finished 1-epoch run on data root ``a`` and its trainer arguments."""
    root = write_task(tmp_path / "a")
    out = tmp_path / "run"
    args = base_args(root, out, "--epochs", "1", "--eval-every", "1")
    assert main(args) == 0
    return root, out, args


def test_moved_data_is_the_same_run_changed_data_another(finished, tmp_path):
    root, out, args = finished
    assert classify(out, args, expected=expected_config) == ("done", "")
    moved = tmp_path / "b"
    shutil.copytree(root, moved)
    at_b = [str(moved) if a == str(root) else a for a in args]
    assert classify(out, at_b, expected=expected_config) == ("done", "")  # same content elsewhere
    _relabel(root)
    status, why = classify(out, args, expected=expected_config)
    assert status == "differs" and why.startswith("other settings: data.trainval: 24 images, list ")


def test_resume_refuses_changed_data_and_follows_moved_data(tmp_path, capsys):
    root = write_task(tmp_path / "a")
    out = tmp_path / "run"
    args = base_args(root, out, "--epochs", "2", "--eval-every", "1")
    assert main([*args, "--stop-after-epoch", "1"]) == 137
    moved = tmp_path / "b"
    shutil.copytree(root, moved)
    _relabel(root)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: --resume: the run in {out} was started with other settings (data.trainval: "
    )
    at_b = [str(moved) if a == str(root) else a for a in args]
    assert main([*at_b, "--resume"]) == 0  # the original data, moved: resumes


def test_eval_check_compares_the_split_identity_first(finished, capsys):
    root, out, _ = finished
    test = root / "synth" / "test.txt"
    test.write_text("\n".join(test.read_text().splitlines()[:6]) + "\n")  # 12 -> 6 images
    capsys.readouterr()
    assert eval_main(["--adapter", str(out), "--no-progress", "--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --check: the test split is not the one {out} was evaluated on (12 images")
    assert "-> 6 images" in err
    assert eval_main(["--adapter", str(out), "--no-progress"]) == 0
    assert "not comparable with result.json: the test split changed (12 images" in capsys.readouterr().out


def test_a_typo_label_is_refused_and_num_classes_insists(tmp_path):
    root = write_task(tmp_path / "a")
    path = root / "synth" / "train800.txt"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 9"  # a 3-class task with one label typed as 9
    path.write_text("\n".join(lines) + "\n")
    args = base_args(root, tmp_path / "run")
    with pytest.raises(
        ValueError, match=r"classes 3\.\.8 of 0\.\.9 have no line .* label 9 at train800\.txt:3"
    ):
        expected_config(args)
    config = expected_config([*args, "--num-classes", "10"])
    assert config["num_classes"] == 10 and config["data_identity"]["splits"]["train"]["count"] == 16


def test_a_run_config_cannot_redirect_what_eval_and_the_card_load(finished, capsys):
    """config.json is data: a checkpoint_path in its model_kwargs reaches neither eval nor the card."""
    import json

    from petl_zoo.cards import build_card

    _, out, _ = finished
    config = json.loads((out / "config.json").read_text())
    config["model_kwargs"]["checkpoint_path"] = "other.safetensors"
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert eval_main(["--adapter", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'config.json'}: model_kwargs sets 'checkpoint_path', which a saved")
    with pytest.raises(ValueError, match="model_kwargs sets 'checkpoint_path'"):
        build_card(out)


def test_the_trainer_refuses_model_kwargs_its_record_could_not_carry(tmp_path, capsys):
    root = write_task(tmp_path / "a")
    assert main(base_args(root, tmp_path / "run", "--model-kwargs", "checkpoint_path=x.pth")) == 1
    assert capsys.readouterr().err.startswith(
        "error: --model-kwargs: the run's model_kwargs sets 'checkpoint_path', which a saved record may not set"
    )


def test_an_offline_first_command_lists_every_missing_input_at_once(tmp_path, capsys, monkeypatch):
    """No data and no weights: one message names both and how to get each (not one per attempt)."""
    import petl_zoo.train.backbone as backbone

    monkeypatch.setattr(backbone, "_weights_cached", lambda name: False)
    monkeypatch.setattr(backbone, "hub_offline_reason", lambda: "offline (test)")
    assert main(["--method", "lora", "--task", "dtd", "--data-root", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 2 inputs are missing: (1) VTAB root ")
    assert (
        "python -m vtab.prepare --task dtd" in err
        and "(2) no pretrained weights for vit_base_patch16_224" in err
    )
    assert "--pretrained-file PATH" in err
    root = write_task(tmp_path / "a")  # the data there: only the weights are missing
    args = [a for a in base_args(root, tmp_path / "run") if a != "--no-pretrained"]
    assert main(args) == 1
    assert capsys.readouterr().err.startswith(
        "error: no pretrained weights for vit_tiny_patch16_224: offline (test)"
    )
