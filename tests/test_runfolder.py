"""The run folder module: states, records written and read back, damaged files named, fingerprints
recorded or computed (the same either way), ``clear`` deleting run files only, tuning records."""

from __future__ import annotations

import json

import pytest

from petl_zoo import runfolder as rf
from petl_zoo.fingerprint import fingerprints
from petl_zoo.runfolder import RunFolder

CONFIG = {
    "method": "lora",
    "method_options": {"rank": 8},
    "model": "vit_tiny_patch16_224",
    "model_kwargs": {"depth": 2},
    "task": "digits",
    "data_root": "/data",
    "pretrained": False,
    "recipe": {"epochs": 3, "lr": 1e-3, "seed": 0},
}


def test_states_follow_the_files(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert not folder.holds_run and not folder.killed and not folder.finished
    folder.path.mkdir()
    folder.write_config(CONFIG)
    assert folder.holds_run and folder.killed and not folder.finished  # killed before its first epoch
    folder.checkpoint_path.write_bytes(b"x")
    assert folder.killed and folder.has_checkpoint
    folder.write_result({"method": "lora", "task": "digits"})
    assert folder.finished and not folder.killed
    assert folder.missing((rf.RESULT, rf.ADAPTER_WEIGHTS)) == [rf.ADAPTER_WEIGHTS]


def test_records_round_trip_and_metrics_append(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_config(CONFIG)
    folder.write_metrics([{"epoch": 1}])
    folder.append_metrics({"epoch": 2})
    assert folder.read_config() == CONFIG
    assert folder.read_metrics() == [{"epoch": 1}, {"epoch": 2}]
    assert folder.read_result() is None
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "is empty"),
        ('{"a": [1', "the file ends early: truncated?"),
        ("[1, 2]", "does not hold a JSON object"),
    ],
)
def test_a_damaged_record_is_one_line_naming_the_file(tmp_path, text, why):
    folder = RunFolder(tmp_path)
    folder.result_path.write_text(text)
    with pytest.raises(ValueError) as err:
        folder.read_result()
    message = str(err.value)
    assert message.startswith(f"run result {folder.result_path} ") and why in message and "\n" not in message


def test_a_damaged_metrics_line_is_named(tmp_path):
    folder = RunFolder(tmp_path)
    folder.metrics_path.write_text('{"epoch": 1}\n{"epo')
    with pytest.raises(ValueError, match=rf"metrics {folder.metrics_path} line 2 is not valid JSON"):
        folder.read_metrics()


def test_fingerprints_recorded_first_else_computed_equal(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_config(CONFIG)
    computed = folder.fingerprints()
    assert (computed.recipe, computed.run) == tuple(fingerprints(CONFIG).values())
    folder.write_config({**CONFIG, "fingerprint": {"recipe": "r" * 16, "run": "u" * 16}})
    assert folder.fingerprints() == rf.Fingerprints("r" * 16, "u" * 16)
    folder.write_result({"fingerprint": {"recipe": "a" * 16, "run": "b" * 16}})
    assert folder.fingerprints() == rf.Fingerprints("a" * 16, "b" * 16)  # result.json wins
    assert RunFolder(tmp_path / "none").fingerprints() == rf.Fingerprints(None, None)


def test_clear_deletes_the_run_files_and_temporaries_only(tmp_path):
    folder = RunFolder(tmp_path)
    for name in rf.RUN_FILES:
        (tmp_path / name).write_text("{}")
    (tmp_path / ".result.json.abc.tmp").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    folder.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_selection_is_written_only_when_it_changes(tmp_path):
    record = {"version": rf.SELECTION_VERSION, "method": "lora", "task": "digits", "grid_fingerprint": "f" * 16,
              "grid": {"lr": [0.001]}, "points": [{"setting": {"lr": 0.001}, "folder": "p", "val_accuracy": 90.0}],
              "winner": {"lr": 0.001}, "retrained": [{"seed": 0, "folder": "seed0"}]}  # fmt: skip
    tune = tmp_path / "lora" / "digits" / f"{rf.TUNE_PREFIX}{'f' * 16}"
    rf.write_selection(tune, record)
    stamp = rf.selection_path(tune).stat().st_mtime_ns
    rf.write_selection(tune, json.loads(json.dumps(record)))
    assert rf.selection_path(tune).stat().st_mtime_ns == stamp
    (selection,) = rf.read_selections(tmp_path)
    assert selection.retrained == ((0, tune / "seed0"),) and selection.is_winner(selection.points[0])
    assert rf.in_tuning(tune / "seed0" / rf.RESULT, tmp_path)
