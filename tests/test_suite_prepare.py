"""``python -m vtab.prepare`` for the full-dataset suite (``vtab.suite``), offline: tiny local Hugging Face
datasets saved with ``save_to_disk``, a stand-in for ``datasets.load_dataset``, and scikit-learn's digits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from vtab import suite  # noqa: E402
from vtab.prepare import _task_names, main  # noqa: E402
from vtab.tasks import get_task  # noqa: E402
from vtab.tasks import suite_tasks as get_suite_tasks  # noqa: E402

PETS = get_task("suite_pets")
N_TRAIN, N_TEST = 20, 6


@pytest.fixture(autouse=True)
def _no_progress_bars():
    """save_to_disk's progress bars would share stderr with the one-line errors under test."""
    disabled = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    yield
    if not disabled:
        datasets.enable_progress_bars()


def _png(value: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (value, 255 - value, 7))


def _jpeg_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 0, 200)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _features(names: list[str]) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})


def _dataset(
    n: int, num_classes: int, *, names: list[str] | None = None, offset: int = 0
) -> datasets.Dataset:
    """Even rows hold JPEG bytes, odd rows PIL images (stored as PNG); label = (row + offset) % classes."""
    images = [{"bytes": _jpeg_bytes(i), "path": None} if i % 2 == 0 else _png(i) for i in range(n)]
    labels = [(i + offset) % num_classes for i in range(n)]
    names = names or [f"class_{c}" for c in range(num_classes)]
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=_features(names))


def _saved(tmp_path: Path, splits: dict[str, datasets.Dataset], name: str = "src") -> Path:
    folder = tmp_path / name
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def _lines(folder: Path, name: str) -> list[tuple[str, int]]:
    rows = (folder / name).read_text(encoding="utf-8").split("\n")
    return [(line.split(" ")[0], int(line.split(" ")[1])) for line in rows if line]


def _row(rel: str) -> int:
    return int(Path(rel).stem)


@pytest.fixture
def pets_source(tmp_path):
    classes = PETS.num_classes
    return _saved(
        tmp_path, {"train": _dataset(N_TRAIN, classes), "test": _dataset(N_TEST, classes, offset=3)}
    )


# ---------------------------------------------------------------------------------------------
# the split equals datasets' train_test_split


@pytest.mark.parametrize("n", [10, 37, 101])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_split_indices_equal_train_test_split(n, seed):
    ds = datasets.Dataset.from_dict({"i": list(range(n))})
    for test_size in (0.1, 0.2):
        theirs = ds.train_test_split(test_size=test_size, seed=seed)
        train, test = suite.train_test_split_indices(n, test_size, seed)
        assert train.tolist() == theirs["train"]["i"]
        assert test.tolist() == theirs["test"]["i"]


@pytest.mark.parametrize("seed", [0, 3])
def test_dtd_carving_equals_nested_train_test_split(seed):
    ds = datasets.Dataset.from_dict({"i": list(range(57))})
    outer = ds.train_test_split(test_size=0.2, seed=seed)
    inner = outer["train"].train_test_split(test_size=0.1, seed=seed)
    ours = suite.carve(57, seed, carve_test=True)
    assert ours["test"].tolist() == outer["test"]["i"]
    assert ours["train"].tolist() == inner["train"]["i"]
    assert ours["val"].tolist() == inner["test"]["i"]


def test_split_refuses_what_the_library_refuses():
    with pytest.raises(ValueError, match="empty"):
        suite.train_test_split_indices(0, 0.1, 0)
    with pytest.raises(ValueError, match="leaves train empty"):
        suite.train_test_split_indices(1, 0.1, 0)


@pytest.mark.parametrize(
    "data, ext",
    [
        (b"\xff\xd8\xff\xe0rest", "jpg"),
        (b"\x89PNG\r\n\x1a\nrest", "png"),
        (b"GIF89a", "gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"II*\x00", "tif"),
        (b"BMxx", "bmp"),
        (b"nothing", None),
    ],
)
def test_image_extension(data, ext):
    assert suite.image_extension(data) == ext


# ---------------------------------------------------------------------------------------------
# a local save_to_disk folder


def test_local_datasetdict_writes_the_seeded_split(pets_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["--benchmark", "suite", "--task", "pets", "--source", str(pets_source), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "the authors' split was unseeded, ours seeded 0" in printed
    folder = out / "suite_pets"
    train, val = _lines(folder, "train800.txt"), _lines(folder, "val200.txt")
    trainval, test = _lines(folder, "train800val200.txt"), _lines(folder, "test.txt")
    assert (len(train), len(val), len(test)) == (18, 2, N_TEST)
    assert trainval == train + val
    # val is the 'test' side of train_test_split(test_size=0.1, seed=0), train its 'train' side
    library = datasets.load_from_disk(str(pets_source))["train"].train_test_split(test_size=0.1, seed=0)
    reference = datasets.Dataset.from_dict({"i": list(range(N_TRAIN))}).train_test_split(
        test_size=0.1, seed=0
    )
    assert sorted(_row(r) for r, _ in val) == sorted(reference["test"]["i"])
    assert sorted(_row(r) for r, _ in train) == sorted(reference["train"]["i"])
    assert sorted(label for _, label in val) == sorted(library["test"]["label"])
    assert sorted(_row(r) for r, _ in test) == list(range(N_TEST))
    for rel, label in train + val:
        assert label == _row(rel) % PETS.num_classes
    for rel, label in test:
        assert label == (_row(rel) + 3) % PETS.num_classes
    meta = json.loads((folder / "prepare.json").read_text())
    assert meta["benchmark"] == "suite" and meta["seed"] == 0
    assert meta["source"]["path"] == str(pets_source) and meta["source"]["splits"] == {
        "train": "train",
        "test": "test",
    }
    assert "seed=0" in meta["split_rule"] and "unseeded" in meta["authors_split"]
    assert meta["class_names"] == [f"class_{c}" for c in range(PETS.num_classes)]
    assert meta["counts"] == {"train800.txt": 18, "val200.txt": 2, "train800val200.txt": 20, "test.txt": 6}


def test_original_bytes_are_kept(pets_source, tmp_path):
    out = tmp_path / "out"
    assert main(["--task", "suite_pets", "--source", str(pets_source), "--out", str(out)]) == 0
    folder = out / "suite_pets"
    for rel, _ in _lines(folder, "train800val200.txt"):
        row = _row(rel)
        if row % 2 == 0:  # a JPEG stays the same bytes
            assert rel.endswith(".jpg") and (folder / rel).read_bytes() == _jpeg_bytes(row)
        else:  # the PIL rows were stored as PNG by datasets: written as stored
            assert rel.endswith(".png")
            assert np.array_equal(np.asarray(Image.open(folder / rel)), np.asarray(_png(row)))


def test_rerun_is_skipped_and_overwrite_rewrites(pets_source, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--task", "suite_pets", "--source", str(pets_source), "--out", str(out)]
    assert main(args) == 0
    val0 = _lines(out / "suite_pets", "val200.txt")
    assert main([*args, "--seed", "5"]) == 0
    assert "already holds the list files; kept" in capsys.readouterr().out
    assert _lines(out / "suite_pets", "val200.txt") == val0
    assert main([*args, "--seed", "5", "--overwrite"]) == 0
    _, expected = suite.train_test_split_indices(N_TRAIN, 0.1, 5)
    assert sorted(_row(r) for r, _ in _lines(out / "suite_pets", "val200.txt")) == sorted(expected.tolist())
    assert json.loads((out / "suite_pets" / "prepare.json").read_text())["seed"] == 5
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_authors_local_layout_is_used_as_given(tmp_path):
    classes = PETS.num_classes
    root = tmp_path / "local"
    for name, n in (("train", 7), ("val", 3), ("test", 4)):
        _dataset(n, classes).save_to_disk(str(root / "pets" / name))  # <data-local-dir>/<their name>/<split>
    out = tmp_path / "out"
    assert main(["--task", "suite_pets", "--source", str(root), "--out", str(out)]) == 0
    folder = out / "suite_pets"
    sizes = [len(_lines(folder, f)) for f in ("train800.txt", "val200.txt", "test.txt")]
    assert sizes == [7, 3, 4]
    assert "no carving" in json.loads((folder / "prepare.json").read_text())["split_rule"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.mark.parametrize(
    "splits, message",
    [
        (lambda c: {"train": _dataset(8, c)}, r"lacks split\(s\) test"),
        (
            lambda c: {"train": _dataset(8, c), "test": _dataset(4, c, names=[f"x{i}" for i in range(c)])},
            "class names of .* differ",
        ),
        (
            lambda c: {"train": _dataset(8, 5), "test": _dataset(4, 5)},
            "5 class names, the registry's task 37",
        ),
        (lambda c: {"train": _dataset(8, c), "test": _dataset(0, c)}, r"\[test\] is empty"),
        (
            lambda c: {"train": _dataset(8, c), "test": _dataset(4, c).rename_column("label", "labels")},
            "has no 'label' column",
        ),
        (
            lambda c: {
                "train": _dataset(8, c),
                "test": _dataset(4, c)
                .cast_column("label", datasets.Value("int64"))
                .map(lambda r: {"label": 99}),
            },
            "label 99, outside 0..36",
        ),
    ],
    ids=["missing-split", "names-differ", "class-count", "empty", "no-label-column", "label-range"],
)
def test_source_errors_are_one_line(tmp_path, capsys, splits, message):
    import re

    source = _saved(tmp_path, splits(PETS.num_classes))
    out = tmp_path / "out"
    assert main(["--task", "suite_pets", "--source", str(source), "--out", str(out)]) == 1
    assert re.search(message, _error(capsys))
    assert not (out / "suite_pets").exists()
    assert not out.exists() or not any(out.iterdir())


def test_a_folder_of_neither_layout_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--task", "suite_pets", "--source", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 1
    assert "neither a DatasetDict" in _error(capsys)
    (tmp_path / "half" / "train").mkdir(parents=True)
    assert main(["--task", "suite_pets", "--source", str(tmp_path / "half"), "--out", str(tmp_path)]) == 1
    assert "lacks val, test" in _error(capsys)


# ---------------------------------------------------------------------------------------------
# the hub: load_dataset with the authors' ids


@pytest.mark.parametrize(
    "task, expected",
    [
        (
            "resisc45",
            [("timm/resisc45", "train"), ("timm/resisc45", "validation"), ("timm/resisc45", "test")],
        ),
        ("dtd", [("cansa/Describable-Textures-Dataset-DTD", "train")]),
        (
            "cars",
            [
                ("Multimodal-Fatima/StanfordCars_train", "train"),
                ("Multimodal-Fatima/StanfordCars_test", "test"),
            ],
        ),
        ("food101", [("food101", "train"), ("food101", "validation")]),
    ],
)
def test_hub_loads_the_authors_ids(monkeypatch, tmp_path, task, expected):
    info = get_task(f"suite_{task}")
    calls = []

    def fake_load_dataset(path, split=None, cache_dir=None, **kwargs):
        calls.append((path, split, cache_dir, kwargs))
        return _dataset(20 if split == "train" else 5, info.num_classes)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--benchmark", "suite", "--task", task, "--out", str(out), "--download-root", str(cache)]
    assert main(argv) == 0
    assert [(c[0], c[1]) for c in calls] == expected
    assert all(c[2] == str(cache) and c[3] == {} for c in calls)
    folder = out / info.name
    sizes = [len(_lines(folder, f)) for f in ("train800.txt", "val200.txt", "test.txt")]
    assert sizes == {"resisc45": [20, 5, 5], "dtd": [14, 2, 4]}.get(task, [18, 2, 5])
    meta = json.loads((folder / "prepare.json").read_text())
    assert [(s["dataset"], s["split"]) for s in meta["source"]["splits"].values()] == expected


def test_no_download_loads_offline_from_the_cache(monkeypatch, tmp_path, capsys):
    seen = []

    def fake_load_dataset(path, split=None, cache_dir=None, **kwargs):
        seen.append((kwargs.get("download_mode"), datasets.config.HF_HUB_OFFLINE))
        raise FileNotFoundError(f"Dataset {path} is not cached in {cache_dir}\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    offline_before = datasets.config.HF_HUB_OFFLINE
    cache = tmp_path / "cache"
    argv = [
        "--task",
        "suite_pets",
        "--no-download",
        "--download-root",
        str(cache),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 1
    assert seen == [("reuse_dataset_if_exists", True)]
    assert datasets.config.HF_HUB_OFFLINE == offline_before
    err = _error(capsys)
    assert "timm/oxford-iiit-pet[train] is not in the cache" in err and "--no-download" in err
    assert not cache.exists()  # nothing half-made left behind


def test_missing_datasets_package_is_one_line(monkeypatch, pets_source, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    assert main(["--task", "suite_pets", "--source", str(pets_source), "--out", str(tmp_path / "o")]) == 1
    assert "pip install petl_zoo[suite]" in _error(capsys)


# ---------------------------------------------------------------------------------------------
# torchvision


class _FakeDTD:
    """torchvision's DTD as the suite uses it: a split argument and a loader (here: the bytes)."""

    sizes = {"train": 5, "val": 4, "test": 3}
    classes = [f"texture_{i}" for i in range(47)]

    def __init__(self, root, split="train", partition=1, download=False, loader=None):
        self.split, self.loader = split, loader

    def __len__(self):
        return self.sizes[self.split]

    def __getitem__(self, i):
        base = {"train": 0, "val": 10, "test": 20}[self.split]
        return _jpeg_bytes(base + i), (base + i) % 47


def test_torchvision_dtd_is_its_three_splits_carved(monkeypatch, tmp_path):
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd, "DTD", _FakeDTD)
    out = tmp_path / "out"
    argv = [
        "--task",
        "suite_dtd",
        "--source",
        "torchvision",
        "--download-root",
        str(tmp_path),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    folder = out / "suite_dtd"
    carved = suite.carve(12, 0, carve_test=True)
    for file, sub in (("train800.txt", "train"), ("val200.txt", "val"), ("test.txt", "test")):
        assert sorted(_row(r) for r, _ in _lines(folder, file)) == sorted(carved[sub].tolist())
    rel, _ = _lines(folder, "test.txt")[0]
    original = [0, 1, 2, 3, 4, 10, 11, 12, 13, 20, 21, 22][_row(rel)]
    assert (folder / rel).read_bytes() == _jpeg_bytes(original)


def test_torchvision_refuses_a_task_it_cannot_follow(tmp_path, capsys):
    assert main(["--task", "suite_eurosat", "--source", "torchvision", "--out", str(tmp_path)]) == 1
    assert "torchvision cannot make suite_eurosat" in _error(capsys)


# ---------------------------------------------------------------------------------------------
# suite_digits and the CLI


def test_suite_digits_is_the_digits_pools(monkeypatch, tmp_path):
    import sklearn.datasets

    from vtab.sources import digits_split

    calls = []

    def fewer(seed, n):  # the real pools, cut short so that the test writes 70 images, not 1797
        calls.append((seed, n))
        train, val, test = digits_split(seed, n)
        return train[:40], val[:10], test[:20]

    monkeypatch.setattr(suite, "digits_split", fewer)
    full = sklearn.datasets.load_digits()
    out = tmp_path / "out"
    assert main(["--task", "suite_digits", "--out", str(out), "--seed", "2"]) == 0
    assert calls == [(0, 1797)]  # the pools of sklearn_digits(0), whatever --seed
    folder = out / "suite_digits"
    train_pos, val_pos, test_pos = fewer(0, 1797)
    pool = np.concatenate([train_pos, val_pos])
    train, val = _lines(folder, "train800.txt"), _lines(folder, "val200.txt")
    tr, va = suite.train_test_split_indices(len(pool), 0.1, 2)
    assert sorted(_row(r) for r, _ in train) == sorted(tr.tolist())
    assert sorted(_row(r) for r, _ in val) == sorted(va.tolist())
    assert sorted(int(pool[_row(r)]) for r, _ in train + val) == sorted(pool.tolist())  # the train pool
    test = _lines(folder, "test.txt")
    assert [int(test_pos[_row(r)]) for r, _ in test] == test_pos.tolist()  # the whole test pool
    assert all(label == full.target[test_pos[_row(r)]] for r, label in test)


@pytest.mark.parametrize(
    "bench, task, expected",
    [
        (None, "dtd", ["dtd"]),
        (None, "cifar10", ["suite_cifar10"]),
        ("suite", "dtd", ["suite_dtd"]),
        ("suite", "all", None),
        (None, "all", None),
    ],
)
def test_task_names(bench, task, expected):
    from vtab.tasks import suite_tasks, tasks

    if expected is None:
        expected = [t.name for t in (suite_tasks() if bench == "suite" else tasks())]
    assert [t.name for t in _task_names([task], bench)] == expected


def test_suite_all_prepares_the_ten_tasks(monkeypatch, tmp_path):
    done = []
    monkeypatch.setattr(suite, "prepare_suite_task", lambda name, *a, **k: done.append(name))
    assert main(["--benchmark", "suite", "--task", "all", "--out", str(tmp_path)]) == 0
    assert len(done) == 10 and "suite_digits" not in done and done[0] == "suite_pets"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "cars"], "--benchmark fgvc (fgvc_cars), --benchmark suite (suite_cars)"),
        (["--benchmark", "fgvc", "--task", "all"], "--task all is not offered for FGVC-5"),
        (["--benchmark", "nope", "--task", "dtd"], "Unknown benchmark 'nope'"),
        (["--task", "suite_digits", "--source", "hf"], "scikit-learn's digits"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path)]) == 1
    assert message in _error(capsys)


def test_list_sources_shows_the_suite(capsys):
    assert main(["--list-sources"]) == 0
    printed = capsys.readouterr().out
    assert "suite_dtd" in printed and "cansa/Describable-Textures-Dataset-DTD[train]" in printed
    assert "suite_digits" in printed and "timm/resisc45[validation]" in printed


def test_list_sources_of_one_benchmark(capsys):
    assert main(["--list-sources", "--benchmark", "suite"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows[1:]] == [t.name for t in get_suite_tasks(include_extra=True)]
    assert main(["--list-sources", "--benchmark", "vtab"]) == 0
    assert "suite_" not in capsys.readouterr().out


def test_a_failed_download_is_one_line(monkeypatch, tmp_path, capsys):
    def unreachable(path, split=None, cache_dir=None, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub\ntraceback detail")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    argv = [
        "--task",
        "suite_flowers102",
        "--download-root",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 1
    assert "Could not load nelorth/oxford-flowers[train]" in _error(capsys)
