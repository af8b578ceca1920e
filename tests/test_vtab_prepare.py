"""vtab.prepare: the folder writer (draw, formats, atomic and re-runnable), the offline digits task,
the torchvision adapters (fake files or stand-in classes), the TFDS adapters (a stand-in module),
the CLI, and the loader-throughput tool's smoke run."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets
from PIL import Image
from sklearn.datasets import load_digits

import vtab
from vtab import prepare, sources, taskfolder
from vtab.sources import IndexedPool, TaskSplits

REPO = Path(__file__).resolve().parents[1]


def pool(n: int, color: int, num_classes: int = 10, mode: str = "L", size: int = 4) -> IndexedPool:
    """n tiny images whose pixels encode (pool colour, position): colour at (0, 0), position at (0, 1)."""

    def get(i: int):
        image = Image.new(mode, (size, size), 0 if mode == "L" else (0, 0, 0))
        image.putpixel((0, 0), color if mode == "L" else (color, 0, 0))
        image.putpixel((1, 0), i if mode == "L" else (i, 0, 0))
        return image, i % num_classes

    return IndexedPool(get, n)


def read_lines(folder: Path, split: str) -> list[tuple[str, int]]:
    text = (folder / vtab.SPLITS[split]).read_text(encoding="utf-8").splitlines()
    return [(rel, int(label)) for rel, label in (line.rsplit(" ", 1) for line in text)]


def first_pixels(folder: Path, rel: str) -> tuple[int, int]:
    with Image.open(folder / rel) as im:
        gray = im.convert("L")
        return gray.getpixel((0, 0)), gray.getpixel((1, 0))


def write(tmp_path: Path, splits: TaskSplits, name: str = "my_task", **kwargs) -> Path:
    kwargs = {"n_train": 8, "n_val": 4, "num_classes": 10, "log": lambda _msg: None, **kwargs}
    return prepare.write_task(name, splits, tmp_path / "out", **kwargs)


# ---------------------------------------------------------------------------------------------
# writer


def test_writer_draws_train_and_val_from_their_pools(tmp_path):
    folder = write(tmp_path, TaskSplits(pool(30, 10), pool(12, 20), pool(5, 30)), seed=3)
    train, val, trainval, test = (read_lines(folder, s) for s in ("train", "val", "trainval", "test"))
    assert (len(train), len(val), len(trainval), len(test)) == (8, 4, 12, 5)
    assert trainval == train + val
    assert {first_pixels(folder, rel)[0] for rel, _ in train} == {10}
    assert {first_pixels(folder, rel)[0] for rel, _ in val} == {20}
    assert [first_pixels(folder, rel) for rel, _ in test] == [
        (30, i) for i in range(5)
    ]  # the whole test pool
    for rel, label in train + val + test:
        assert (
            label == first_pixels(folder, rel)[1] % 10 and rel.startswith("images/") and rel.endswith(".png")
        )
    meta = json.loads((folder / taskfolder.METADATA).read_text())
    assert meta["seed"] == 3 and meta["counts"]["train800val200.txt"] == 12 and meta["format"] == "png"
    assert max(label for _, label in trainval + test) < 10  # a small draw can miss a class: declare 10
    assert vtab.num_classes("my_task", folder.parent, declared=10) == 10
    assert sorted(p.name for p in folder.parent.iterdir()) == ["my_task"]  # no temp folder left


def test_writer_without_val_pool_draws_disjoint_from_train_and_follows_seed(tmp_path):
    def draw(seed: int, where: str) -> tuple[list, list]:
        folder = write(tmp_path / where, TaskSplits(pool(20, 10), None, pool(3, 30)), seed=seed)
        return [first_pixels(folder, r)[1] for r, _ in read_lines(folder, "train")], [
            first_pixels(folder, r)[1] for r, _ in read_lines(folder, "val")
        ]

    train, val = draw(0, "a")
    assert len(train) == 8 and len(val) == 4 and not set(train) & set(val)
    assert draw(0, "b") == (train, val)
    assert draw(1, "c") != (train, val)


def test_writer_formats_and_modes(tmp_path):
    rgb = TaskSplits(pool(10, 10, mode="RGB", size=16), pool(5, 20, mode="RGB"), pool(3, 30, mode="RGB"))
    folder = write(tmp_path, rgb, fmt="jpg", jpeg_quality=90)
    rels = [rel for rel, _ in read_lines(folder, "trainval") + read_lines(folder, "test")]
    assert all(rel.endswith(".jpg") for rel in rels)
    for rel in rels:
        with Image.open(folder / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
    assert json.loads((folder / taskfolder.METADATA).read_text())["jpeg_quality"] == 90

    def odd(mode: str) -> IndexedPool:
        return IndexedPool(lambda i: (Image.new(mode, (3, 3)), 0), 12)

    folder = write(tmp_path / "modes", TaskSplits(odd("1"), None, odd("RGBA")))
    with Image.open(folder / read_lines(folder, "train")[0][0]) as im:
        assert (im.format, im.mode) == ("PNG", "L")
    with Image.open(folder / read_lines(folder, "test")[0][0]) as im:
        assert im.mode == "RGB"
    with pytest.raises(ValueError, match=r"Unknown image format 'gif'; valid: png, jpg"):
        write(tmp_path / "gif", rgb, fmt="gif")


def test_writer_is_rerunnable_and_atomic(tmp_path):
    splits = TaskSplits(pool(30, 10), pool(12, 20), pool(5, 30))
    folder = write(tmp_path, splits, seed=0)
    before = read_lines(folder, "train")
    messages: list[str] = []
    assert write(tmp_path, splits, seed=5, log=messages.append) == folder
    assert read_lines(folder, "train") == before and "kept" in messages[0]
    write(tmp_path, splits, seed=5, overwrite=True)
    assert read_lines(folder, "train") != before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["my_task"]

    (folder / "test.txt").unlink()
    with pytest.raises(FileExistsError, match=r"my_task exists but lacks some of .*pass --overwrite"):
        write(tmp_path, splits)

    def broken(i: int):
        if i == 2:
            raise RuntimeError("source broke")
        return Image.new("L", (2, 2)), 0

    out = tmp_path / "fail"
    with pytest.raises(RuntimeError, match="source broke"):
        write(out, TaskSplits(pool(30, 10), pool(12, 20), IndexedPool(broken, 5)))
    assert list((out / "out").iterdir()) == []  # neither the task folder nor its temporary remains


def test_writer_checks_labels_and_pool_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"Source item \d+ has label \d, outside 0\.\.3"):
        write(tmp_path, TaskSplits(pool(30, 10), pool(12, 20), pool(5, 30)), num_classes=4)
    with pytest.raises(ValueError, match=r"The train pool holds 10 items; 8 \+ 4 are needed"):
        write(tmp_path, TaskSplits(pool(10, 10), None, pool(5, 30)))
    with pytest.raises(ValueError, match=r"The pools hold 30 train and 3 val items; 8 and 4 are needed"):
        write(tmp_path, TaskSplits(pool(30, 10), pool(3, 20), pool(5, 30)))
    assert not (tmp_path / "out" / "my_task").exists()


def test_registry_task_uses_its_class_count_and_canonical_folder(tmp_path):
    three = TaskSplits(pool(30, 10, num_classes=3), pool(12, 20, num_classes=3), pool(5, 30, num_classes=3))
    with pytest.raises(ValueError, match=r"has label 2, outside 0\.\.1"):  # patch_camelyon has 2 classes
        write(tmp_path, three, name="camelyon", num_classes=None)
    two = TaskSplits(pool(30, 10, num_classes=2), pool(12, 20, num_classes=2), pool(5, 30, num_classes=2))
    folder = write(tmp_path, two, name="camelyon", num_classes=None)
    assert folder == tmp_path / "out" / "patch_camelyon"
    assert json.loads((folder / taskfolder.METADATA).read_text())["num_classes"] == 2
    assert len(vtab.VtabDataset("pcam", "trainval", data_root=folder.parent)) == 12


# ---------------------------------------------------------------------------------------------
# digits


def test_prepare_digits_cli_then_load(tmp_path):
    out = tmp_path / "vtab-1k"
    run = subprocess.run(
        [sys.executable, "-m", "vtab.prepare", "--task", "digits", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    sizes = {split: len(vtab.VtabDataset("digits", split, data_root=out)) for split in vtab.SPLITS}
    assert sizes == {"train": 800, "val": 200, "trainval": 1000, "test": 797}

    digits = load_digits()
    folder = out / "digits"
    train_idx, val_idx, test_idx = sources.digits_split(0)
    keys = {s: [int(Path(rel).stem) for rel, _ in read_lines(folder, s)] for s in vtab.SPLITS}
    # lists follow the permutation: perm[:800] train800, perm[800:1000] val200, perm[1000:] test
    assert keys["train"] == train_idx.tolist() and keys["val"] == val_idx.tolist()
    assert keys["test"] == test_idx.tolist() and keys["trainval"] == keys["train"] + keys["val"]
    assert sorted(keys["trainval"] + keys["test"]) == list(range(1797))
    ds = vtab.VtabDataset("digits", "test", data_root=out)
    assert ds.targets == [int(digits.target[k]) for k in keys["test"]]
    for i in (0, 1, 500):
        key = keys["test"][i]
        with Image.open(ds.samples[i][0]) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "L", (32, 32))
            pixels = np.asarray(im)
        # the documented construction, rebuilt independently: 0..16 -> 0..255 (rounded), 28x28 bilinear, pad 2
        scaled = Image.fromarray(np.round(digits.images[key] * 255 / 16).astype(np.uint8))
        expected = np.pad(np.asarray(scaled.resize((28, 28), Image.BILINEAR)), 2)
        assert np.array_equal(pixels, expected)
        assert pixels[:2].max() == 0 and pixels[:, -2:].max() == 0 and pixels.max() > 200
        rgb = np.asarray(ds[i][0])
        assert rgb.shape == (32, 32, 3) and np.array_equal(rgb[..., 1], pixels)


def test_prepare_digits_jpg_into_vtab_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(vtab.ENV_VAR, str(tmp_path / "env-root"))
    assert prepare.main(["--task", "sklearn_digits", "--format", "jpg", "--seed", "1"]) == 0
    ds = vtab.VtabDataset("digits", "trainval")
    assert ds.root == tmp_path / "env-root" / "digits" and len(ds) == 1000
    assert ds.samples[0][0].suffix == ".jpg" and ds[0][0].size == (32, 32)
    keys = sorted(int(p.stem) for p, _ in ds.samples[:800])
    assert keys == sorted(sources.digits_split(1)[0]) and keys != sorted(sources.digits_split(0)[0])
    assert prepare.main(["--task", "digits"]) == 0
    assert "already holds the list files; kept" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# label rules (task_adaptation's preprocessing)


def test_structured_label_rules():
    assert sources.clevr_count_label(3) == 0 and sources.clevr_count_label(10) == 7
    assert sources.clevr_dist_label([9.2, 8.7, 12.0]) == 2  # closest 8.7 -> (8.5, 9.0]
    assert sources.clevr_dist_label([7.9]) == 0 and sources.clevr_dist_label([10.5]) == 5
    assert sources.kitti_dist_label([0, 3], [5.0, 1.0]) == 0  # car at 5 m (pedestrian ignored)
    assert sources.kitti_dist_label([1], [15.0]) == 1 and sources.kitti_dist_label([2], [30.0]) == 2
    assert sources.kitti_dist_label([3, 5], [2.0, 3.0]) == 3 and sources.kitti_dist_label([], []) == 3
    assert [sources.binned_label(x, 32, 16) for x in (0, 1, 2, 31)] == [0, 0, 1, 15]
    assert [sources.binned_label(o, 40, 16) for o in (0, 2, 3, 39)] == [0, 0, 1, 15]


# ---------------------------------------------------------------------------------------------
# torchvision adapters


class FakeTorchvision:
    """Stands in for a torchvision dataset class: n tiny images per split, pixel (0,0) = split code."""

    sizes: dict[str, int] = {}
    calls: list[dict] = []
    codes = {"train": 10, "val": 20, "test": 30, "trainval": 40}

    def __init__(self, root, download=False, train=None, split=None, **kwargs):
        self.split = split if split is not None else ("train" if train else "test")
        FakeTorchvision.calls.append({"root": root, "download": download, "split": self.split, **kwargs})
        self.n = self.sizes[self.split]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        image = Image.new("RGB", (4, 4))
        image.putpixel((0, 0), (self.codes[self.split], 0, 0))
        return image, i % 2


@pytest.mark.parametrize(
    "task,cls,sizes,expected",
    [
        ("cifar", "CIFAR100", {"train": 50, "test": 7}, ((45, 10), (5, 10), (7, 30))),
        ("svhn", "SVHN", {"train": 50, "test": 7}, ((45, 10), (5, 10), (7, 30))),
        ("oxford_iiit_pet", "OxfordIIITPet", {"trainval": 50, "test": 7}, ((40, 40), (10, 40), (7, 30))),
        ("dtd", "DTD", {"train": 11, "val": 6, "test": 7}, ((11, 10), (6, 20), (7, 30))),
        ("oxford_flowers102", "Flowers102", {"train": 11, "val": 6, "test": 7}, ((11, 10), (6, 20), (7, 30))),
        ("patch_camelyon", "PCAM", {"train": 11, "val": 6, "test": 7}, ((11, 10), (6, 20), (7, 30))),
    ],
)
def test_torchvision_split_adapters(monkeypatch, tmp_path, task, cls, sizes, expected):
    monkeypatch.setattr(torchvision.datasets, cls, FakeTorchvision)
    monkeypatch.setattr(FakeTorchvision, "sizes", sizes)
    monkeypatch.setattr(FakeTorchvision, "calls", [])
    splits = sources.TORCHVISION[task](tmp_path, False)
    for pool_, (n, code) in zip((splits.train, splits.val, splits.test), expected):
        items = list(pool_.items(range(len(pool_))))
        assert len(pool_) == n and {image.getpixel((0, 0))[0] for _, image, _ in items} == {code}
    if splits.train is not splits.val and expected[0][1] == expected[1][1]:  # cut of one split: disjoint
        train_keys = {k for k, _, _ in splits.train.items(range(len(splits.train)))}
        val_keys = {k for k, _, _ in splits.val.items(range(len(splits.val)))}
        assert not train_keys & val_keys and len(train_keys | val_keys) == sizes.get(
            "train", sizes.get("trainval")
        )
    assert all(c["root"] == str(tmp_path) and c["download"] is False for c in FakeTorchvision.calls)


def test_torchvision_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"torchvision's DTD found no data for task 'dtd' under .*--no-download"
    ):
        sources.TORCHVISION["dtd"](tmp_path, False)
    assert (
        prepare.main(
            ["--task", "dtd", "--no-download", "--download-root", str(tmp_path), "--out", str(tmp_path)]
        )
        == 1
    )


def _tiny_png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (value, 0, 0)).save(path, format="PNG")  # lossless whatever the suffix


def test_torchvision_clevr_count_and_distance_from_scene_files(tmp_path):
    base = tmp_path / "clevr" / "CLEVR_v1.0"
    scenes = {}
    for split, n in (("train", 20), ("val", 4)):
        scenes[split] = []
        for i in range(n):
            name = f"CLEVR_{split}_{i:06d}.png"
            _tiny_png(base / "images" / split / name, i)
            depths = [8.0 + 0.4 * (i % 6) + d for d in (0.05, 1.0, 2.0)][: 3 + i % 2]
            objects = [{"pixel_coords": [1, 2, d]} for d in depths] + [{"pixel_coords": [0, 0, 20.0]}] * (
                i % 5
            )
            scenes[split].append({"image_filename": name, "objects": objects})
        (base / "scenes").mkdir(parents=True, exist_ok=True)
        (base / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"scenes": scenes[split]}))
    (base / "images" / "test").mkdir()
    for task, rule in (
        ("clevr_count", lambda s: len(s["objects"]) - 3),
        ("clevr_dist", lambda s: sources.clevr_dist_label([o["pixel_coords"][2] for o in s["objects"]])),
    ):
        splits = sources.TORCHVISION[task](tmp_path, False)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 4)
        got = {k: y for k, _, y in splits.train.items(range(18))} | {
            k: y for k, _, y in splits.val.items([0, 1])
        }
        assert got == {str(i): rule(s) for i, s in enumerate(scenes["train"])}
        assert [y for _, _, y in splits.test.items(range(4))] == [rule(s) for s in scenes["val"]]
        assert [im.getpixel((0, 0))[0] for _, im, _ in splits.test.items(range(4))] == [0, 1, 2, 3]
    assert (
        len({sources.clevr_dist_label([o["pixel_coords"][2] for o in s["objects"]]) for s in scenes["train"]})
        > 3
    )


def test_torchvision_eurosat_sun397_caltech101_from_fake_files(tmp_path):
    for c in ("AnnualCrop", "Forest"):
        for i in range(10):
            _tiny_png(tmp_path / "eurosat" / "2750" / c / f"{c}_{i}.jpg")
    splits = sources.TORCHVISION["eurosat"](tmp_path, False)
    keys = [{k for k, _, _ in p.items(range(len(p)))} for p in (splits.train, splits.val, splits.test)]
    assert [len(k) for k in keys] == [12, 4, 4] and set().union(*keys) == {str(i) for i in range(20)}

    sun = tmp_path / "SUN397"
    sun.mkdir()
    (sun / "ClassName.txt").write_text("/a/abbey\n/a/apartment_building/outdoor\n")
    for i in range(10):
        _tiny_png(sun / "a" / "abbey" / f"sun_a{i}.jpg", 1)
        _tiny_png(sun / "a" / "apartment_building" / "outdoor" / f"sun_b{i}.jpg", 2)
    splits = sources.TORCHVISION["sun397"](tmp_path, False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (14, 2, 4)
    for p in (splits.train, splits.val, splits.test):
        assert all(im.getpixel((0, 0))[0] == y + 1 for _, im, y in p.items(range(len(p))))

    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    for value, (c, n) in enumerate((("BACKGROUND_Google", 31), ("Faces", 33), ("accordion", 32))):
        for i in range(n):
            _tiny_png(cats / c / f"image_{i:04d}.jpg", value)
    splits = sources.TORCHVISION["caltech101"](tmp_path, False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (81, 9, 6)
    value_of_label = {
        0: 2,
        1: 0,
        2: 1,
    }  # labels follow lower-case name order: accordion, BACKGROUND_Google, Faces
    train_val = list(splits.train.items(range(81))) + list(splits.val.items(range(9)))
    for _, im, y in train_val + list(splits.test.items(range(6))):
        assert im.getpixel((0, 0))[0] == value_of_label[y]
    assert np.bincount([y for _, _, y in train_val]).tolist() == [30, 30, 30]


# ---------------------------------------------------------------------------------------------
# TFDS adapters, with a stand-in tensorflow_datasets module


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _slice(records: list, spec: str) -> list:
    base, _, rest = spec.partition("[")
    data = records[base]
    if not rest:
        return data
    start, _, stop = rest.rstrip("]").partition(":")
    n = len(data)

    def bound(text: str, default: int) -> int:
        return default if not text else int(text.rstrip("%")) * n // 100

    return data[bound(start, 0) : bound(stop, n)]


class FakeTfds(types.ModuleType):
    """The bits of tensorflow_datasets the adapter uses: builder(), as_numpy, decode, download."""

    def __init__(self, data: dict[str, dict[str, list[dict]]]) -> None:
        super().__init__("tensorflow_datasets")
        self.data = data
        self.calls: list[tuple] = []
        self.decode = types.SimpleNamespace(SkipDecoding=lambda: "skip")
        self.download = types.SimpleNamespace(DownloadConfig=lambda manual_dir: {"manual_dir": manual_dir})

    def builder(self, name: str, data_dir: str):
        fake = self
        records = self.data[name]

        class Splits:
            def __getitem__(self, spec):
                return types.SimpleNamespace(num_examples=len(_slice(records, spec)))

        class Builder:
            info = types.SimpleNamespace(splits=Splits())

            def download_and_prepare(self, download_config):
                fake.calls.append(("prepare", name, data_dir, download_config["manual_dir"]))

            def as_dataset(self, split, shuffle_files, decoders):
                assert shuffle_files is False and list(decoders.values()) == ["skip"]
                fake.calls.append(("read", name, split))
                return _slice(records, split)

        return Builder()

    def as_numpy(self, dataset):
        return iter(dataset)


def test_tfds_adapters_follow_vtab_splits_and_labels(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    sprite = (rng.random((8, 8)) > 0.5).astype(np.uint8)  # dSprites pixels are 0/1
    dsprites = [
        {"image": _png(sprite), "label_x_position": i % 32, "label_orientation": (3 * i) % 40}
        for i in range(40)
    ]
    kitti_objects = [
        {"type": np.array([0, 3]), "location": np.array([[0, 0, 5.0], [0, 0, 1.0]])},
        {"type": np.array([1]), "location": np.array([[0, 0, 15.0]])},
        {"type": np.array([3]), "location": np.array([[0, 0, 2.0]])},
    ]
    kitti = {s: [{"image": _png(np.zeros((4, 6, 3), np.uint8)), "objects": kitti_objects[i % 3]} for i in range(n)]
             for s, n in (("train", 12), ("validation", 6), ("test", 3))}  # fmt: skip
    norb = {s: [{"image": _png(np.full((5, 5), i, np.uint8)), "label_azimuth": i % 18, "label_elevation": i % 9}
                for i in range(n)] for s, n in (("train", 20), ("test", 10))}  # fmt: skip
    fake = FakeTfds({"dsprites": {"train": dsprites}, "kitti": kitti, "smallnorb": norb})
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)

    splits = sources.TFDS["dsprites_loc"](tmp_path, True)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (
        32,
        4,
        4,
    )  # train[:80%], [80%:90%], [90%:]
    items = list(splits.test.items(range(4)))
    assert [int(k) for k, _, _ in items] == [0, 1, 2, 3]
    assert [y for _, _, y in items] == [(i % 32) // 2 for i in range(36, 40)]
    assert np.array_equal(np.asarray(items[0][1]), sprite * 255)  # binary pixels scaled as VTAB does
    ori = sources.TFDS["dsprites_ori"](tmp_path, False)
    assert [y for _, _, y in ori.train.items([0, 1, 5])] == [0, 1, 6]  # floor(3i / 2.5)
    assert ("prepare", "dsprites", str(tmp_path), str(tmp_path / "manual")) in fake.calls
    assert ("read", "dsprites", "train[90%:]") in fake.calls

    splits = sources.TFDS["kitti"](tmp_path, False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 3)
    assert [y for _, _, y in splits.test.items(range(3))] == [0, 1, 3]

    splits = sources.TFDS["smallnorb_ele"](tmp_path, False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (
        20,
        5,
        5,
    )  # val test[:50%], test test[50%:]
    assert [(im.getpixel((0, 0)), y) for _, im, y in splits.test.items(range(5))] == [
        (i, i % 9) for i in range(5, 10)
    ]

    folder = write(
        tmp_path, sources.TFDS["smallnorb_azi"](tmp_path, False), name="smallnorb_azi", num_classes=None
    )
    assert folder.name == "smallnorb_azi" and len(read_lines(folder, "test")) == 5
    ds = vtab.VtabDataset("smallnorb_azi", "test", data_root=folder.parent)
    assert ds.num_classes == 18 and ds.targets == [i % 18 for i in range(5, 10)]


def test_tfds_missing_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(
        ImportError, match=r"Source 'tfds' needs TensorFlow Datasets.*pip install 'petl_zoo\[tfds\]'"
    ):
        sources.TFDS["dmlab"](tmp_path, False)
    assert prepare.main(["--task", "dmlab", "--out", str(tmp_path), "--download-root", str(tmp_path)]) == 1
    assert "pip install 'petl_zoo[tfds]'" in capsys.readouterr().err
    assert not (tmp_path / "dmlab").exists()


# ---------------------------------------------------------------------------------------------
# CLI


def test_list_sources(capsys):
    assert prepare.main(["--list-sources", "--benchmark", "vtab"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert list(rows) == [t.name for t in vtab.tasks(include_extra=True)]
    assert rows["dtd"].endswith("torchvision, tfds") and rows["resisc45"].endswith("  tfds")
    assert rows["digits"].endswith("sklearn") and " 397 " in rows["sun397"]
    assert all(sources.sources_for(t.name) for t in vtab.tasks())


def test_cli_errors(tmp_path, capsys):
    assert prepare.main(["--task", "cifra", "--out", str(tmp_path)]) == 1
    assert "Unknown task 'cifra'. Did you mean 'cifar'" in capsys.readouterr().err
    assert prepare.main(["--task", "dmlab", "--source", "torchvision", "--out", str(tmp_path)]) == 1
    assert "Source 'torchvision' cannot make task 'dmlab'; sources for dmlab: tfds" in capsys.readouterr().err
    assert prepare.main(["--task", "digits", "--source", "tfds", "--out", str(tmp_path)]) == 1
    assert "sources for digits: sklearn" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        prepare.main([])
    assert exit_.value.code == 2 and "give --task NAME" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# tools/loader_throughput.py


def test_loader_throughput_tool_runs(capsys):
    spec = importlib.util.spec_from_file_location(
        "loader_throughput", REPO / "tools" / "loader_throughput.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = [
        "--synthetic",
        "12",
        "--synthetic-size",
        "40",
        "30",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--passes",
        "1",
    ]
    assert tool.main(args + ["--model", "vit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "synthetic 40x30 jpg (12 images, split trainval) -> 224x224 protocol=vtab" in out
    assert float(out.split("batch=4: ")[1].split(" images/s")[0]) > 0
    assert float(out.split("CPU cost ")[1].split(" ms/image")[0]) > 0
