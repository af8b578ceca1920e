"""FGVC-5 preparation (vtab.fgvc + ``python -m vtab.prepare --task cub``): a tiny fake CUB-200-2011
folder and archive, fake VPT split files, the written layout and prepare.json, the registry entry
(kept out of ``vtab.tasks()``), and the one-line errors for bad input."""

from __future__ import annotations

import json
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    task = out / "fgvc_cub"
    meta = json.loads((task / "prepare.json").read_text())
    if with_splits:
        assert "fgvc_cub: splits from VPT's files in" in text
        assert meta["splits"] == "vpt" and meta["seed"] is None
        for split, file in (("train", "train.json"), ("val", "val.json"), ("test", "test.json")):
            assert lines(task, split) == [(f"images/{k}", v) for k, v in VPT[file].items()]
    else:
        note = "seeded, seed 0: not VPT's; results are not comparable with published rows"
        assert f"fgvc_cub: splits {note} (pass --splits VPT_SPLIT_DIR for VPT's)" in text
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
    assert sorted(p.name for p in out.iterdir()) == ["fgvc_cub"]  # no extraction or partial folder left
    assert (folder / "images" / image_name(0, 1)).is_file()  # a source folder is copied from, not moved
    dataset = vtab.VtabDataset("cub", "test", None, out)
    image, label = dataset[0]
    assert (image.size, image.mode, label, dataset.num_classes) == ((8, 8), "RGB", 0, 200)
    code, text, _ = run(capsys, "--source", str(source), "--out", str(out))
    assert code == 0 and "already holds the list files; kept" in text


FGVC = [
    ("fgvc_cub", 200, ("cub", "CUB200", "cub_200_2011", "CUB-200-2011")),
    ("fgvc_nabirds", 555, ("nabirds", "NABirds", "na_birds")),
    ("fgvc_flowers", 102, ("oxfordflower",)),
    ("fgvc_dogs", 120, ("dogs", "stanford_dogs", "Stanford-Dogs")),
    ("fgvc_cars", 196, ()),  # its aliases are the suite's Stanford Cars' too
]


def test_fgvc_tasks_are_registered_apart_from_vtab_1k(tmp_path):
    names = [t.name for t in vtab.tasks(include_extra=True)]
    assert len(vtab.tasks()) == 19 and "fgvc" not in vtab.GROUPS
    assert not {name for name, _, _ in FGVC} & set(names)
    assert [(t.name, t.num_classes, t.group) for t in vtab.fgvc_tasks()] == [
        (n, c, "fgvc") for n, c, _ in FGVC
    ]
    assert list(fgvc.SPECS) == [name for name, _, _ in FGVC]
    for name, classes, aliases in FGVC:
        assert fgvc.get_spec(name).task == name == vtab.get_task(name).name
        for alias in aliases:
            assert vtab.get_task(alias).name == name and vtab.num_classes(alias) == classes
            assert fgvc.get_spec(alias).task == name
    # inside FGVC-5 the short names are its own; without a benchmark 'flowers' is VTAB-1K's task
    assert fgvc.get_spec("cars").task == fgvc.get_spec("stanford_cars").task == "fgvc_cars"
    assert fgvc.get_spec("flowers").task == "fgvc_flowers"
    assert vtab.num_classes("dtd") == 47 and vtab.find_task("flowers").name == "oxford_flowers102"
    with pytest.raises(
        ValueError, match=r"'dtd' is not an FGVC task; FGVC tasks: fgvc_cub, .*, fgvc_cars\.$"
    ):
        fgvc.get_spec("dtd")
    for name in ("fgvc_cub", "dtd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.txt").write_text("")
    assert vtab.task_dir("cub200", tmp_path) == tmp_path / "fgvc_cub"
    assert vtab.task_dir("dtd", tmp_path).name == "dtd"
    assert vtab.available_tasks(tmp_path) == ["dtd", "fgvc_cub"]
    with pytest.raises(
        ValueError, match=r"Did you mean 'cub'.*Known tasks: cifar, .*, fgvc_cub, fgvc_nabirds, "
    ):
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
    assert (
        "--splits applies to FGVC tasks (fgvc_cub, fgvc_nabirds, fgvc_flowers, fgvc_dogs, fgvc_cars); 'dtd'"
        in error("--task", "dtd", "--source", str(folder), "--splits", str(vpt))
    )
    assert "Unknown source 'bogus' for task 'dtd'; valid: auto, torchvision, tfds, sklearn" in error(
        "--task", "dtd", "--source", "bogus"
    )
    assert not out.exists() or list(out.iterdir()) == []


# --- the five datasets, one contract -------------------------------------------------------------
# Each fake: 3 classes x 4 tiny JPEGs in the dataset's official format; per class, VPT-style roles
# train, train, val (an official train image, or the official val one for Flowers) and test.

ROLES = ("train", "train", "val", "test")


@dataclass
class Fake:
    task: str
    title: str
    build: Callable[[Path], Path]  # writes the official files under a parent; returns the dataset folder
    items: list[tuple[str, int, str]]  # (VPT key, 0-based class, role)
    archive: bool = False  # the dataset is one official archive
    corrupt: Callable[[Path], str] | None = None  # breaks a metadata file; returns the expected message part


def jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path)


def savemat(path: Path, **variables) -> None:
    scipy_io = pytest.importorskip("scipy.io")  # the dev extra has it
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy_io.savemat(path, variables)


def cells(names: list[str]) -> np.ndarray:
    out = np.empty((len(names), 1), dtype=object)
    out[:, 0] = names
    return out


def structs(**columns: list) -> np.ndarray:
    n = len(next(iter(columns.values())))
    out = np.zeros(n, dtype=[(name, "O") for name in columns])
    for name, values in columns.items():
        out[name] = values
    return out


CUB_ITEMS = [(image_name(c, i), c, ROLES[i - 1]) for c in range(3) for i in range(1, 5)]

NABIRDS_IDS = (295, 560, 817)  # leaf ids in classes.txt: VPT numbers the sorted used ids 0, 1, 2
NABIRDS_ORDER = (2, 0, 1)  # images.txt lists class 817 first: numbering is by id, not appearance


def nabirds_name(c: int, i: int) -> str:
    return f"{NABIRDS_IDS[c]:04d}/{NABIRDS_IDS[c]:04d}{i:028x}.jpg"


def nabirds_uuid(c: int, i: int) -> str:
    h = f"{NABIRDS_IDS[c]:04d}{i:028x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def make_nabirds(parent: Path) -> Path:
    folder = parent / "nabirds"
    images, labels, split = [], [], []
    for c in NABIRDS_ORDER:
        for i in range(1, 5):
            jpeg(folder / "images" / nabirds_name(c, i), 40 * c + i)
            images.append(f"{nabirds_uuid(c, i)} {nabirds_name(c, i)}\n")
            labels.append(f"{nabirds_uuid(c, i)} {NABIRDS_IDS[c]}\n")
            split.append(f"{nabirds_uuid(c, i)} {int(i < 4)}\n")
    (folder / "images.txt").write_text("".join(images))
    (folder / "image_class_labels.txt").write_text("".join(labels))
    (folder / "train_test_split.txt").write_text("".join(split))
    names = {0: "Birds", 1: "Ducks, Geese, and Swans", **{k: f"Species {k}" for k in NABIRDS_IDS}, 900: "x"}
    (folder / "classes.txt").write_text("".join(f"{k} {v}\n" for k, v in names.items()))
    return folder


def corrupt_nabirds(folder: Path) -> str:
    text = (folder / "image_class_labels.txt").read_text().replace(" 817\n", " 5\n", 1)
    (folder / "image_class_labels.txt").write_text(text)
    return f"{folder / 'image_class_labels.txt'}:1: class 5 is not in classes.txt."


def corrupt_cub(folder: Path) -> str:
    (folder / "image_class_labels.txt").write_text("1 201\n")
    return f"{folder / 'image_class_labels.txt'}:1: class 201 is outside 1..200."


def flowers_number(c: int, i: int) -> int:
    return c + 1 + 3 * (i - 1)  # image_00001..00012, class (n - 1) % 3


def make_flowers(parent: Path) -> Path:
    folder = parent / "OxfordFlower"
    for n in range(1, 13):
        jpeg(folder / "jpg" / f"image_{n:05d}.jpg", n)
    savemat(folder / "imagelabels.mat", labels=np.array([[(n - 1) % 3 + 1 for n in range(1, 13)]], np.uint8))
    ids = {
        role: [flowers_number(c, i) for c in range(3) for i in range(1, 5) if ROLES[i - 1] == role]
        for role in ROLES
    }
    savemat(
        folder / "setid.mat",
        trnid=np.array([ids["train"]], np.uint16),
        valid=np.array([ids["val"]], np.uint16),
        tstid=np.array([ids["test"]], np.uint16),
    )
    return folder


def corrupt_flowers(folder: Path) -> str:
    savemat(folder / "imagelabels.mat", labels=np.array([[103] + [1] * 11], np.uint8))
    return f"{folder / 'imagelabels.mat'}: labels(1) = 103 is not an integer in 1..102."


DOGS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog")


def dogs_name(c: int, i: int) -> str:
    return f"{DOGS[c]}/{DOGS[c].split('-')[0]}_{i}.jpg"


def make_dogs(parent: Path) -> Path:
    folder = parent / "Stanford-dogs"
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for c in range(3):
        for i in range(1, 5):
            jpeg(folder / "Images" / dogs_name(c, i), 40 * c + i)
            lists["train" if i < 4 else "test"].append((dogs_name(c, i), c + 1))
    for split, entries in {**lists, "file": lists["train"] + lists["test"]}.items():
        names = [n for n, _ in entries]
        savemat(
            folder / f"{split}_list.mat",
            file_list=cells(names),
            annotation_list=cells([n[:-4] for n in names]),
            labels=np.array([[c] for _, c in entries], np.float64),
        )
    return folder


def corrupt_dogs(folder: Path) -> str:
    (folder / "test_list.mat").write_bytes(b"not a MATLAB file")
    return f"{folder / 'test_list.mat'}: cannot read it as a MATLAB file"


def make_cars(parent: Path) -> Path:
    folder = parent / "Stanford-cars"
    annos: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for c in range(3):
        for i in range(1, 5):
            split = "train" if i < 4 else "test"
            fname = f"{len(annos[split][0]) + 1:05d}.jpg"
            jpeg(folder / f"cars_{split}" / fname, 40 * c + i)
            annos[split][0].append(fname)
            annos[split][1].append(c + 1)
    savemat(
        folder / "devkit" / "cars_meta.mat",
        class_names=np.array([["AM General Hummer", "Acura RL", "Audi"]], object),
    )
    for split, path in (("train", "devkit/cars_train_annos.mat"), ("test", "cars_test_annos_withlabels.mat")):
        names, classes = annos[split]
        box = [1] * len(names)
        savemat(
            folder / path,
            annotations=structs(
                bbox_x1=box, bbox_y1=box, bbox_x2=box, bbox_y2=box, **{"class": classes, "fname": names}
            ),
        )
    return folder


def cars_items() -> list[tuple[str, int, str]]:
    count = {"train": 0, "test": 0}
    items = []
    for c in range(3):
        for i in range(1, 5):
            split = "train" if i < 4 else "test"
            count[split] += 1
            items.append((f"cars_{split}/{count[split]:05d}.jpg", c, ROLES[i - 1]))
    return items


def corrupt_cars(folder: Path) -> str:
    path = folder / "cars_test_annos_withlabels.mat"
    savemat(
        path, annotations=structs(**{"class": [4, 1, 2], "fname": ["00001.jpg", "00002.jpg", "00003.jpg"]})
    )
    return f"{path}: annotations.class(1) = 4 is not an integer in 1..3."


def make_car_ims(parent: Path) -> Path:
    folder = parent / "Stanford-cars"
    names, classes, test = [], [], []
    for c in range(3):
        for i in range(1, 5):
            names.append(f"car_ims/{len(names) + 1:06d}.jpg")
            jpeg(folder / names[-1], 40 * c + i)
            classes.append(c + 1)
            test.append(int(i == 4))
    savemat(
        folder / "cars_annos.mat",
        annotations=structs(relative_im_path=names, **{"class": classes}, test=test),
        class_names=np.array([["AM General Hummer", "Acura RL", "Audi"]], object),
    )
    return folder


def corrupt_car_ims(folder: Path) -> str:
    savemat(
        folder / "cars_annos.mat",
        annotations=structs(relative_im_path=["car_ims/000001.jpg"], test=[0]),
        class_names=np.array(["a"], object),
    )
    return f"{folder / 'cars_annos.mat'}: annotations has no field 'class'"


FAKES = {
    "cub": Fake("fgvc_cub", "CUB-200-2011", lambda p: make_cub(p), CUB_ITEMS, True, corrupt_cub),
    "nabirds": Fake(
        "fgvc_nabirds",
        "NABirds",
        make_nabirds,
        [(nabirds_name(c, i), c, ROLES[i - 1]) for c in NABIRDS_ORDER for i in range(1, 5)],
        True,
        corrupt_nabirds,
    ),
    "flowers": Fake(
        "fgvc_flowers",
        "Oxford Flowers 102",
        make_flowers,
        [
            (f"jpg/image_{flowers_number(c, i):05d}.jpg", c, ROLES[i - 1])
            for c in range(3)
            for i in range(1, 5)
        ],
        corrupt=corrupt_flowers,
    ),
    "dogs": Fake(
        "fgvc_dogs",
        "Stanford Dogs",
        make_dogs,
        [(dogs_name(c, i), c, ROLES[i - 1]) for c in range(3) for i in range(1, 5)],
        corrupt=corrupt_dogs,
    ),
    "cars": Fake("fgvc_cars", "Stanford Cars", make_cars, cars_items(), corrupt=corrupt_cars),
    "cars_car_ims": Fake(
        "fgvc_cars",
        "Stanford Cars",
        make_car_ims,
        [(f"car_ims/{4 * c + i:06d}.jpg", c, ROLES[i - 1]) for c in range(3) for i in range(1, 5)],
        corrupt=corrupt_car_ims,
    ),
}


def fake_vpt(folder: Path, fake: Fake, value=None, **changes: dict) -> Path:
    """VPT-style train/val/test.json of a fake (class ids ``value(class)``, 0-based by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    value = value or (lambda c: c)
    files = {
        f"{split}.json": {key: value(c) for key, c, role in fake.items if role == split}
        for split in VPT_SPLITS
    }
    for name, content in {**files, **changes}.items():
        (folder / name).write_text(json.dumps(content))
    return folder


VPT_SPLITS = ("train", "val", "test")


def make_tar(folder: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder, arcname=folder.name)
    return path


def prepare_args(capsys, task: str, *args: str) -> tuple[int, str, str]:
    code = prepare.main(["--task", task, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CONTRACT = [
    pytest.param(name, kind, splits, id=f"{name}-{kind}-{splits}")
    for name, fake in FAKES.items()
    for kind in (("folder", "archive") if fake.archive else ("folder",))
    for splits in ("vpt", "official")
]


@pytest.mark.parametrize(("name", "kind", "splits"), CONTRACT)
def test_prepare_each_dataset(tmp_path, capsys, name, kind, splits):
    fake = FAKES[name]
    folder = fake.build(tmp_path / "dl")
    spec = fgvc.get_spec(fake.task)
    source = make_tar(folder, tmp_path / "official.tgz") if kind == "archive" else tmp_path / "dl"
    out = tmp_path / "out"
    splits_args = ["--splits", str(fake_vpt(tmp_path / "vpt", fake))] if splits == "vpt" else []
    code, text, err = prepare_args(
        capsys, fake.task, "--source", str(source), "--out", str(out), *splits_args
    )
    assert (code, err) == (0, "")
    task = out / fake.task
    meta = json.loads((task / "prepare.json").read_text())
    expect = {role: [(f"images/{k}", c) for k, c, r in fake.items if r == role] for role in VPT_SPLITS}
    if splits == "vpt" or name == "flowers":  # Flowers' official val is VPT's val
        for split in VPT_SPLITS:
            assert sorted(lines(task, split)) == sorted(expect[split])
    if splits == "vpt":
        assert meta["splits"] == "vpt" and meta["seed"] is None and f"{fake.task}: splits from VPT's" in text
    elif name == "flowers":
        assert meta["splits"].startswith("official train/val/test (setid.mat valid as val)")
        assert meta["seed"] is None and "not checked against VPT's files" in text
    else:
        assert meta["seed"] == 0 and meta["splits"].startswith("seeded, seed 0") and "seeded, seed 0" in text
        assert sorted(lines(task, "train") + lines(task, "val")) == sorted(expect["train"] + expect["val"])
        assert sorted(lines(task, "test")) == sorted(expect["test"])
        assert sorted(c for _, c in lines(task, "val")) == [0, 1, 2]
    assert lines(task, "trainval") == lines(task, "train") + lines(task, "val")
    assert meta["counts"] == {"train800.txt": 6, "val200.txt": 3, "train800val200.txt": 9, "test.txt": 3}
    assert meta["num_classes"] == vtab.num_classes(fake.task) and meta["dataset"] == fake.title
    assert meta["source_kind"] == kind
    image_root = (folder / spec.image_dir) if spec.image_dir != "." else folder
    for rel, _ in lines(task, "trainval") + lines(task, "test"):  # the original bytes, not re-encoded
        assert (task / rel).read_bytes() == (image_root / rel.removeprefix("images/")).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [fake.task]  # nothing else left behind
    image, label = vtab.VtabDataset(fake.task, "test", None, out)[0]
    assert image.size == (8, 8) and label == lines(task, "test")[0][1]


def test_nabirds_split_files_may_use_its_own_class_ids(tmp_path, capsys):
    fake = FAKES["nabirds"]
    folder = fake.build(tmp_path / "dl")
    out = tmp_path / "out"
    vpt = fake_vpt(tmp_path / "vpt", fake, value=lambda c: NABIRDS_IDS[c])
    code, _, err = prepare_args(
        capsys, "nabirds", "--source", str(folder), "--splits", str(vpt), "--out", str(out)
    )
    assert (code, err) == (0, "")
    assert sorted(lines(out / "fgvc_nabirds", "test")) == sorted(
        (f"images/{nabirds_name(c, 4)}", c) for c in range(3)
    )
    key = nabirds_name(0, 4)
    wrong = fake_vpt(tmp_path / "vpt2", fake, value=lambda c: NABIRDS_IDS[c], **{"test.json": {key: 560}})
    code, _, err = prepare_args(
        capsys, "nabirds", "--source", str(folder), "--splits", str(wrong), "--out", str(out), "--overwrite"
    )
    assert code == 1 and err == (
        f"error: {wrong / 'test.json'}: key '{key}' has class id 560, but the dataset's own class of that image "
        "is 295 (its id in image_class_labels.txt, as this file's ids are); the split files do not match "
        "this dataset.\n"
    )
    unknown = fake_vpt(tmp_path / "vpt3", fake, value=lambda c: NABIRDS_IDS[c], **{"test.json": {key: 900}})
    code, _, err = prepare_args(
        capsys, "nabirds", "--source", str(folder), "--splits", str(unknown), "--out", str(out), "--overwrite"
    )
    assert code == 1 and "has class id 900, which no image of the NABirds dataset has" in err


@pytest.mark.parametrize("name", list(FAKES))
def test_bad_input_of_each_dataset_is_one_line(tmp_path, capsys, name):
    fake = FAKES[name]
    spec = fgvc.get_spec(fake.task)
    folder = fake.build(tmp_path / "dl")
    out = tmp_path / "out"

    def error(*args: str, source: Path = folder) -> str:
        code, _, err = prepare_args(capsys, fake.task, "--source", str(source), "--out", str(out), *args)
        assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
        return err.strip()

    # an archive that is not the dataset (or any file, for a dataset that comes as several files)
    other = tmp_path / "other" / "something"
    other.mkdir(parents=True)
    (other / "readme.txt").write_text("not a dataset\n")
    archive = make_tar(other, tmp_path / "other.tgz")
    if fake.archive:
        assert error(source=archive).startswith(
            f"error: {archive} is not a {fake.title} archive: missing {', '.join(spec.required)}"
        )
    else:
        assert error(source=archive) == (
            f"error: --source {archive} is a file, but {fake.title} comes as several files: extract "
            f"{spec.downloads} into one folder and pass that folder."
        )
    assert f"is not a {fake.title} folder: missing" in error(source=other)
    # split files naming images that are not in the dataset, or whose files are missing
    vpt = fake_vpt(tmp_path / "vpt1", fake, **{"val.json": {"nope/missing.jpg": 0}})
    assert (
        f"1 image ('nope/missing.jpg') not in the {fake.title} dataset; keys are image paths relative to"
        in error("--splits", str(vpt))
    )
    key, cls, _ = next(item for item in fake.items if item[2] == "test")
    image_root = folder / spec.image_dir if spec.image_dir != "." else folder
    (image_root / key).rename(tmp_path / "moved.jpg")
    assert error("--splits", str(fake_vpt(tmp_path / "vpt2", fake))) == (
        f"error: {image_root}: 1 image ('{key}') listed in the splits do not exist."
    )
    (tmp_path / "moved.jpg").rename(image_root / key)
    # a class id out of range, or not the image's class
    n = vtab.num_classes(fake.task)
    vpt = fake_vpt(tmp_path / "vpt3", fake, **{"test.json": {key: n + 1000 if name == "nabirds" else n}})
    if name == "nabirds":  # past 554: read as NABirds' own ids, and 1555 is none of them
        assert "has class id 1555, which no image of the NABirds dataset has" in error("--splits", str(vpt))
    else:
        assert f"has class id {n}, outside 0..{n - 1} (VPT's class ids are 0-based)." in error(
            "--splits", str(vpt)
        )
    vpt = fake_vpt(tmp_path / "vpt4", fake, **{"test.json": {key: (cls + 1) % 3}})
    assert (
        f"has class id {(cls + 1) % 3}, but the dataset's own class of that image is {cls} (0-based)"
        in error("--splits", str(vpt))
    )
    vpt = fake_vpt(tmp_path / "vpt5", fake, **{"test.json": {key: "3"}})
    assert (
        error("--splits", str(vpt))
        == f"error: {vpt / 'test.json'}: key '{key}' has class id '3', not an integer."
    )
    # malformed official metadata: the file and the line (or MATLAB index) or the bad value
    expected = fake.corrupt(folder)
    assert expected in error()
    assert not out.exists() or list(out.iterdir()) == []  # nothing half-written


def test_matlab_files_need_scipy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(
        ImportError,
        match=r"^Reading imagelabels.mat needs scipy: pip install scipy \(or pip install petl_zoo\[fgvc\]\)\.$",
    ):
        fgvc.read_flowers(tmp_path, 102)
