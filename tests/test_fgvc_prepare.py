"""FGVC-5 preparation (vtab.fgvc + ``python -m vtab.prepare --task cub``): a tiny fake CUB-200-2011
folder and archive, fake VPT split files, the written layout and prepare.json, the registry entry
(kept out of ``vtab.tasks()``), and the one-line errors for bad input."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import vtab
from vtab import fgvc, prepare

CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
PER_CLASS = 4  # images 1..3 of each class are official train, image 4 is test


def image_name(cls: int, i: int) -> str:
    return f"{CLASSES[cls]}/{CLASSES[cls].split('.')[1]}_{i:04d}_{100 * cls + i}.jpg"


def make_cub(parent: Path) -> Path:
    """``parent/CUB_200_2011`` with 3 classes x 4 8x8 JPEGs (pixel (0, 0) = 40 * class + image) and the
    five metadata files, as the official archive unpacks."""
    folder = parent / "CUB_200_2011"
    images, labels, split = [], [], []
    for cls in range(len(CLASSES)):
        (folder / "images" / CLASSES[cls]).mkdir(parents=True)
        for i in range(1, PER_CLASS + 1):
            image_id = cls * PER_CLASS + i
            Image.new("RGB", (8, 8), (40 * cls + i, 0, 0)).save(folder / "images" / image_name(cls, i))
            images.append(f"{image_id} {image_name(cls, i)}\n")
            labels.append(f"{image_id} {cls + 1}\n")
            split.append(f"{image_id} {int(i < PER_CLASS)}\n")
    (folder / "images.txt").write_text("".join(images))
    (folder / "image_class_labels.txt").write_text("".join(labels))
    (folder / "train_test_split.txt").write_text("".join(split))
    (folder / "classes.txt").write_text("".join(f"{c + 1} {name}\n" for c, name in enumerate(CLASSES)))
    return folder


def make_archive(folder: Path, path: Path, drop: str = "") -> Path:
    """A ``.tgz`` of the fake folder (top entry ``CUB_200_2011/``, plus a stray top-level file as in
    the official archive), leaving out the member ``drop``."""
    (folder.parent / "attributes.txt").write_text("1 has_bill_shape::curved\n")
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder.parent / "attributes.txt", arcname="attributes.txt")
        for member in sorted(folder.rglob("*")):
            rel = member.relative_to(folder.parent).as_posix()
            if member.is_file() and rel != f"CUB_200_2011/{drop}":
                archive.add(member, arcname=rel)
    return path


VPT = {  # 2 train, 1 val per class from the official train images; the test image of each class
    "train.json": {image_name(c, i): c for c in range(3) for i in (1, 2)},
    "val.json": {image_name(c, 3): c for c in range(3)},
    "test.json": {image_name(c, 4): c for c in range(3)},
}


def make_vpt(folder: Path, **changes: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in {**VPT, **changes}.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def lines(task_folder: Path, split: str) -> list[tuple[str, int]]:
    return [(rel, label) for rel, label, _ in vtab.read_list(task_folder / vtab.SPLITS[split])]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = prepare.main(["--task", "cub", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("from_archive", [False, True], ids=["folder", "archive"])
@pytest.mark.parametrize("with_splits", [True, False], ids=["vpt", "seeded"])
def test_prepare_cub(tmp_path, capsys, from_archive, with_splits):
    folder = make_cub(tmp_path / "dl")
    source = make_archive(folder, tmp_path / "CUB_200_2011.tgz") if from_archive else folder
    out = tmp_path / "out"
    splits_args = ["--splits", str(make_vpt(tmp_path / "vpt"))] if with_splits else []
    code, text, err = run(capsys, "--source", str(source), "--out", str(out), *splits_args)
    assert (code, err) == (0, "")
    task = out / "cub"
    meta = json.loads((task / "prepare.json").read_text())
    if with_splits:
        assert "cub: splits from VPT's files in" in text
        assert meta["splits"] == "vpt" and meta["seed"] is None
        for split, file in (("train", "train.json"), ("val", "val.json"), ("test", "test.json")):
            assert lines(task, split) == [(f"images/{k}", v) for k, v in VPT[file].items()]
    else:
        note = "seeded, seed 0: not VPT's; results are not comparable with published rows"
        assert f"cub: splits {note} (pass --splits VPT_SPLIT_DIR for VPT's)" in text
        assert meta["splits"] == note and meta["seed"] == 0 and meta["vpt_splits"] is None
        val = lines(task, "val")
        assert sorted(label for _, label in val) == [0, 1, 2]  # 10% per class, at least one
        assert sorted(lines(task, "train") + val) == sorted(
            (f"images/{image_name(c, i)}", c) for c in range(3) for i in (1, 2, 3)
        )
        assert lines(task, "test") == [(f"images/{image_name(c, 4)}", c) for c in range(3)]
    assert lines(task, "trainval") == lines(task, "train") + lines(task, "val")
    counts = {"train800.txt": 6, "val200.txt": 3, "train800val200.txt": 9, "test.txt": 3}
    assert meta["counts"] == counts and meta["num_classes"] == 200
    assert meta["split_files"] == {
        "train": "train800.txt",
        "val": "val200.txt",
        "trainval": "train800val200.txt",
        "test": "test.txt",
    }
    assert meta["source_kind"] == ("archive" if from_archive else "folder")
    assert meta["source"] == str(source.absolute()) and meta["benchmark"] == "fgvc"
    for rel, label in lines(task, "trainval") + lines(task, "test"):
        with Image.open(task / rel) as im:  # the original file, its pixel naming class and image
            assert (
                im.format == "JPEG"
                and abs(im.getpixel((0, 0))[0] - (40 * label + int(rel.rsplit("_", 2)[1]))) <= 3
            )
    assert sorted(p.name for p in out.iterdir()) == ["cub"]  # no extraction or partial folder left
    assert (folder / "images" / image_name(0, 1)).is_file()  # a source folder is copied from, not moved
    dataset = vtab.VtabDataset("cub", "test", None, out)
    image, label = dataset[0]
    assert (image.size, image.mode, label, dataset.num_classes) == ((8, 8), "RGB", 0, 200)
    code, text, _ = run(capsys, "--source", str(source), "--out", str(out))
    assert code == 0 and "already holds the list files; kept" in text


def test_cub_is_registered_apart_from_vtab_1k(tmp_path):
    names = [t.name for t in vtab.tasks(include_extra=True)]
    assert len(vtab.tasks()) == 19 and "cub" not in names and "fgvc" not in vtab.GROUPS
    assert [(t.name, t.num_classes, t.group) for t in vtab.fgvc_tasks()] == [("cub", 200, "fgvc")]
    for alias in ("cub", "CUB200", "cub_200_2011", "CUB-200-2011"):
        assert vtab.get_task(alias).name == "cub" and vtab.num_classes(alias) == 200
    assert vtab.num_classes("dtd") == 47 and vtab.find_task("flowers").name == "oxford_flowers102"
    for name in ("cub", "dtd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.txt").write_text("")
    assert (
        vtab.task_dir("cub200", tmp_path) == tmp_path / "cub" and vtab.task_dir("dtd", tmp_path).name == "dtd"
    )
    assert vtab.available_tasks(tmp_path) == ["dtd", "cub"]
    with pytest.raises(ValueError, match=r"Did you mean 'cub'.*Known tasks: cifar, .*, digits, cub\.$"):
        vtab.get_task("cbu")


def test_seeded_val_follows_the_seed():
    labels = {f"c{c}/{i}.jpg": c for c in range(4) for i in range(20)}
    official = fgvc.Official(labels, list(labels), [])
    draws = [[n for n, _ in fgvc.seeded_splits(official, seed)["val"]] for seed in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2] and len(draws[0]) == 8  # 10% of 20 per class
    assert all(sum(n.startswith(f"c{c}/") for n in draws[0]) == 2 for c in range(4))


def test_bad_input_is_one_line(tmp_path, capsys):
    folder = make_cub(tmp_path / "dl")
    out = tmp_path / "out"

    def error(*args: str) -> str:
        code, _, err = run(capsys, "--out", str(out), *args)
        assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
        return err.strip()

    (folder / "images.txt").rename(tmp_path / "images.txt")
    (folder / "classes.txt").unlink()
    assert error("--source", str(tmp_path / "dl")) == (
        f"error: {tmp_path / 'dl'} is not a CUB-200-2011 folder (CUB_200_2011/ inside it): missing images.txt, "
        "classes.txt (expected CUB_200_2011/ holding images, images.txt, image_class_labels.txt, "
        "train_test_split.txt, classes.txt)."
    )
    (tmp_path / "images.txt").rename(folder / "images.txt")
    (folder / "classes.txt").write_text("1 a\n")
    archive = make_archive(folder, tmp_path / "CUB_200_2011.tgz", drop="image_class_labels.txt")
    assert error("--source", str(archive)) == (
        f"error: {archive} is not a CUB-200-2011 archive (CUB_200_2011/ inside it): missing "
        "image_class_labels.txt (expected CUB_200_2011/ holding images, images.txt, "
        "image_class_labels.txt, train_test_split.txt, classes.txt)."
    )
    unknown = {f"{CLASSES[0]}/nope_{i}.jpg": 0 for i in range(5)}
    vpt = make_vpt(tmp_path / "vpt1", **{"val.json": {**VPT["val.json"], **unknown}})
    assert error("--source", str(folder), "--splits", str(vpt)) == (
        f"error: {vpt / 'val.json'}: 5 images ('{CLASSES[0]}/nope_0.jpg', '{CLASSES[0]}/nope_1.jpg', "
        f"'{CLASSES[0]}/nope_2.jpg' and 2 more) not in the CUB-200-2011 dataset; keys are image paths "
        f"relative to images/, e.g. '{image_name(0, 1)}'."
    )
    vpt = make_vpt(tmp_path / "vpt2", **{"test.json": {**VPT["test.json"], image_name(2, 4): 200}})
    assert error("--source", str(folder), "--splits", str(vpt)) == (
        f"error: {vpt / 'test.json'}: key '{image_name(2, 4)}' has class id 200, outside 0..199 "
        "(VPT's class ids are 0-based)."
    )
    vpt = make_vpt(tmp_path / "vpt3", **{"test.json": {**VPT["test.json"], image_name(2, 4): 3}})
    assert "has class id 3, but the dataset's own class of that image is 2 (0-based)" in error(
        "--source", str(folder), "--splits", str(vpt)
    )
    (vpt / "val.json").unlink()
    assert "lacks val.json (VPT's split folder holds train.json, val.json, test.json)" in error(
        "--source", str(folder), "--splits", str(vpt)
    )
    assert "pass --source PATH" in error()
    assert "--splits applies to FGVC tasks (cub); 'dtd' is a VTAB-1K task." in error(
        "--task", "dtd", "--source", str(folder), "--splits", str(vpt)
    )
    assert "Unknown source 'bogus' for task 'dtd'; valid: auto, torchvision, tfds, sklearn" in error(
        "--task", "dtd", "--source", "bogus"
    )
    assert not out.exists() or list(out.iterdir()) == []
