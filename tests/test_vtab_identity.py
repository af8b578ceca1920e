"""vtab.data_identity / vtab.split_identity: a task's data identified by content (list file digests,
image names and sizes, counts), on tiny task folders made in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import vtab

SPLIT_COUNTS = {"train": 4, "val": 2, "trainval": 6, "test": 3}


def make_task(root: Path, folder: str = "mine") -> Path:
    """A task folder whose images are a few bytes of distinct lengths (identity never decodes them)."""
    task = root / folder
    lines: dict[str, list[str]] = {}
    for split in ("train", "val", "test"):
        lines[split] = []
        for i in range(SPLIT_COUNTS[split]):
            rel = f"images/{split}/{i}.png"
            (task / rel).parent.mkdir(parents=True, exist_ok=True)
            (task / rel).write_bytes(b"x" * (10 + i))
            lines[split].append(f"{rel} {i % 2}")
    lines["trainval"] = lines["train"] + lines["val"]
    for split, file in vtab.SPLITS.items():
        (task / file).write_text("\n".join(lines[split]) + "\n")
    return task


def _edit_line(task: Path, file: str, index: int, text: str | None) -> None:
    lines = (task / file).read_text().splitlines()
    if text is None:
        del lines[index]
    else:
        lines[index] = text
    (task / file).write_text("\n".join(lines) + "\n")


def test_identity_is_by_content_and_survives_a_move(tmp_path):
    make_task(tmp_path / "a")
    ident = vtab.data_identity("mine", tmp_path / "a")
    assert list(ident) == ["splits"] and list(ident["splits"]) == list(vtab.SPLITS)
    for split, record in ident["splits"].items():
        assert set(record) == {"list_sha256", "images_sha256", "count"}
        assert record["count"] == SPLIT_COUNTS[split] and len(record["list_sha256"]) == 64
        assert record == vtab.split_identity("mine", split, tmp_path / "a")
    assert json.loads(json.dumps(ident)) == ident
    assert ident["splits"]["train"]["list_sha256"] != ident["splits"]["trainval"]["list_sha256"]
    shutil.move(tmp_path / "a" / "mine", tmp_path / "elsewhere" / "deeper" / "mine")
    assert vtab.data_identity("mine", tmp_path / "elsewhere" / "deeper") == ident
    assert (
        vtab.split_identity("mine", "train800", tmp_path / "elsewhere" / "deeper") == ident["splits"]["train"]
    )


def test_a_changed_label_image_size_or_line_changes_the_identity(tmp_path):
    task = make_task(tmp_path)
    before = vtab.data_identity("mine", tmp_path)["splits"]

    _edit_line(task, "test.txt", 1, "images/test/1.png 0")  # one label: 1 -> 0
    after = vtab.data_identity("mine", tmp_path)["splits"]
    assert after["test"]["list_sha256"] != before["test"]["list_sha256"]
    assert after["test"]["images_sha256"] == before["test"]["images_sha256"]  # same files
    assert {s: after[s] for s in ("train", "val", "trainval")} == {
        s: before[s] for s in ("train", "val", "trainval")
    }
    before = after

    (task / "images" / "val" / "0.png").write_bytes(b"y" * 99)  # one image's size
    after = vtab.data_identity("mine", tmp_path)["splits"]
    for split in ("val", "trainval"):  # the splits that list it
        assert after[split]["images_sha256"] != before[split]["images_sha256"]
        assert after[split]["list_sha256"] == before[split]["list_sha256"]
    assert after["train"] == before["train"] and after["test"] == before["test"]
    before = after

    _edit_line(task, "train800.txt", 3, None)  # a dropped line
    after = vtab.data_identity("mine", tmp_path)["splits"]
    assert after["train"]["count"] == SPLIT_COUNTS["train"] - 1
    assert after["train"]["list_sha256"] != before["train"]["list_sha256"]
    assert after["train"]["images_sha256"] != before["train"]["images_sha256"]
    assert after["trainval"] == before["trainval"]


def test_identity_reads_sizes_not_pixels(tmp_path):
    """Cheap by design: same-sized bytes keep the identity (only ``os.stat``; no image is opened)."""
    task = make_task(tmp_path)
    before = vtab.data_identity("mine", tmp_path)
    (task / "images" / "train" / "0.png").write_bytes(b"z" * 10)
    assert vtab.data_identity("mine", tmp_path) == before


def test_identity_covers_the_list_files_present_and_names_missing_ones(tmp_path):
    task = make_task(tmp_path, "dtd")
    (task / "val200.txt").unlink()
    assert list(vtab.data_identity("textures", tmp_path)["splits"]) == ["train", "trainval", "test"]
    with pytest.raises(
        FileNotFoundError,
        match=r"Task 'dtd' has no list file .*dtd/val200\.txt for split 'val'\. Re-create it with: "
        r"python -m vtab\.prepare --task dtd --out ",
    ):
        vtab.split_identity("dtd", "val", tmp_path)
    with pytest.raises(ValueError, match=r"Unknown split 'dev'; valid: train, val, trainval, test"):
        vtab.split_identity("dtd", "dev", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds none of the list files train800\.txt"):
        vtab.data_identity("empty", tmp_path)


def test_identity_names_a_missing_image_and_its_line(tmp_path):
    task = make_task(tmp_path)
    (task / "images" / "test" / "2.png").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"Image .*mine/images/test/2\.png \(listed at .*mine/test\.txt:3\) does not exist\.$",
    ):
        vtab.data_identity("mine", tmp_path)
    assert vtab.split_identity("mine", "train", tmp_path)["count"] == SPLIT_COUNTS["train"]
