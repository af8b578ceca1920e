"""The full-dataset suite of NEAT and FourierFT: task folders from the Hugging Face datasets the authors
load, split by the authors' rule but seeded, and written once by ``python -m vtab.prepare``.

    python -m vtab.prepare --benchmark suite --task all                    # the hub, via `datasets`
    python -m vtab.prepare --benchmark suite --task pets --source ./pets   # a save_to_disk folder
    python -m vtab.prepare --benchmark suite --task cifar10 --source torchvision
    python -m vtab.prepare --task suite_digits                             # offline demo task

The authors (``get_data`` in NEAT's ``image-classification/main.py`` and FourierFT's
``experiments/ViT/exec.py``) take val from train with ``Dataset.train_test_split(test_size=0.1)`` where
the source has no validation split, and DTD's test and val from its one split (0.2, then 0.1), all
unseeded: each of their runs saw a different split. Here the split is drawn once, with ``--seed``, by
:func:`train_test_split_indices`, which gives the indices ``train_test_split(test_size, seed=seed)``
gives, so ``datasets`` reproduces it. The folder keeps the four list file names of the layout
(train800.txt = train, val200.txt = val, train800val200.txt = train + val, test.txt = test) whatever
their true sizes, which ``prepare.json`` records. Images are written as the source stores them (its
encoded bytes, not re-encoded); only a source without encoded bytes (CIFAR from torchvision, arrays) is
decoded and written as PNG.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .layout import SPLITS
from .sources import digits_image, digits_split, to_pil
from .taskfolder import kept, partial_folder, removed_on_failure, savable, write_lists
from .tasks import SUITE_GROUP, resolve_task

BENCHMARK = SUITE_GROUP
VAL_FRACTION = 0.1  # the authors' train_test_split(test_size=0.1) of train into train / val
DTD_TEST_FRACTION = 0.2  # DTD's one split: test_size=0.2 for test, then 0.1 of the rest for val
DIGITS_POOL_SEED = 0  # the digits train/test pools (sklearn_digits(0)): fixed, like an official split
INSTALL_HINT = "the suite's hub and local sources need Hugging Face datasets: pip install petl_zoo[suite]"
SUITE_SOURCES = ("hf", "torchvision", "PATH", "sklearn")
IMAGE = "image"
LABEL = "label"


@dataclass(frozen=True)
class HubSplit:
    """One split of a Hugging Face dataset: ``load_dataset(dataset, split=split)``."""

    dataset: str
    split: str

    def __str__(self) -> str:
        return f"{self.dataset}[{self.split}]"


@dataclass(frozen=True)
class HubSpec:
    """Where the authors load a task from: its train split, its val split (None: carved from train) and
    its test split (None: carved from train, DTD); ``authors_name`` is their ``--dataset-name``."""

    authors_name: str
    train: HubSplit
    val: HubSplit | None
    test: HubSplit | None

    def splits(self) -> list[tuple[str, HubSplit]]:
        return [(role, s) for role, s in (("train", self.train), ("val", self.val), ("test", self.test)) if s]


def _hub(authors: str, train: str, test: str | None, val: str | None = None) -> HubSpec:
    """``train``/``val``/``test`` as ``dataset:split``."""

    def split(text: str | None) -> HubSplit | None:
        return None if text is None else HubSplit(*text.rsplit(":", 1))

    return HubSpec(authors, split(train), split(val), split(test))  # type: ignore[arg-type]


#: The authors' sources (NEAT and FourierFT load the same ones; NEAT's DTD reads a local ``./data``).
HUB_SPECS: dict[str, HubSpec] = {
    "suite_pets": _hub("pets", "timm/oxford-iiit-pet:train", "timm/oxford-iiit-pet:test"),
    "suite_cars": _hub(
        "cars", "Multimodal-Fatima/StanfordCars_train:train", "Multimodal-Fatima/StanfordCars_test:test"
    ),
    "suite_cifar10": _hub(
        "cifar10", "Multimodal-Fatima/CIFAR10_train:train", "Multimodal-Fatima/CIFAR10_test:test"
    ),
    "suite_dtd": _hub("dtd", "cansa/Describable-Textures-Dataset-DTD:train", None),
    "suite_eurosat": _hub(
        "eurosat", "timm/eurosat-rgb:train", "timm/eurosat-rgb:test", val="timm/eurosat-rgb:validation"
    ),
    "suite_aircraft": _hub(
        "fgvc", "Multimodal-Fatima/FGVC_Aircraft_train:train", "Multimodal-Fatima/FGVC_Aircraft_test:test"
    ),
    "suite_resisc45": _hub(
        "resisc", "timm/resisc45:train", "timm/resisc45:test", val="timm/resisc45:validation"
    ),
    "suite_cifar100": _hub(
        "cifar100", "Multimodal-Fatima/CIFAR100_train:train", "Multimodal-Fatima/CIFAR100_test:test"
    ),
    "suite_flowers102": _hub("flowers", "nelorth/oxford-flowers:train", "nelorth/oxford-flowers:test"),
    "suite_food101": _hub("food", "food101:train", "food101:validation"),
}

#: torchvision classes whose splits follow the authors' meaning: (class, keyword sets concatenated into
#: the train source, keyword set of the test source or None when carved from train). Not offered:
#: EuroSAT (torchvision has no splits; the hub's has train/validation/test), RESISC45 (not in
#: torchvision), Flowers102 (the hub's train/test are not torchvision's train/val/test).
TORCHVISION_SPECS: dict[str, tuple[str, tuple[dict, ...], dict | None]] = {
    "suite_cifar10": ("CIFAR10", ({"train": True},), {"train": False}),
    "suite_cifar100": ("CIFAR100", ({"train": True},), {"train": False}),
    # the hub's one DTD split holds all 5640 images: partition 1's train + val + test
    "suite_dtd": ("DTD", ({"split": "train"}, {"split": "val"}, {"split": "test"}), None),
    "suite_food101": ("Food101", ({"split": "train"},), {"split": "test"}),
    "suite_pets": ("OxfordIIITPet", ({"split": "trainval"},), {"split": "test"}),
    "suite_aircraft": ("FGVCAircraft", ({"split": "train"},), {"split": "test"}),
    "suite_cars": ("StanfordCars", ({"split": "train"},), {"split": "test"}),
}


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return datasets


# ---------------------------------------------------------------------------------------------
# the split


def train_test_split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices of ``Dataset.train_test_split(test_size=test_size, seed=seed)`` on ``n``
    rows: ``n_test = ceil(test_size * n)``, ``n_train = n - n_test``, ``perm =
    np.random.default_rng(seed).permutation(n)``, test = ``perm[:n_test]``, train =
    ``perm[n_test:]``, in that order (the order of the rows of the library's two datasets)."""
    if n <= 0:
        raise ValueError("Cannot split an empty split.")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}.")
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    if n_train <= 0:
        raise ValueError(f"A split of {n} rows with test_size={test_size} leaves train empty.")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test : n_test + n_train], perm[:n_test]


def carve(n: int, seed: int, carve_test: bool) -> dict[str, np.ndarray]:
    """Indices into the train source for train and val (and test when ``carve_test``): DTD's
    ``train_test_split(0.2)`` then ``train_test_split(0.1)`` of its train side, each with ``seed``;
    otherwise ``train_test_split(0.1)``."""
    if not carve_test:
        train, val = train_test_split_indices(n, VAL_FRACTION, seed)
        return {"train": train, "val": val}
    trainval, test = train_test_split_indices(n, DTD_TEST_FRACTION, seed)
    train, val = train_test_split_indices(len(trainval), VAL_FRACTION, seed)
    return {"train": trainval[train], "val": trainval[val], "test": test}


def split_rule(carved: str, seed: int) -> str:
    """The split rule in words (``carved``: "none", "val" or "test+val")."""
    if carved == "none":
        return "train, val and test are the source's own splits, used whole (no carving; the seed is unused)"
    if carved == "val":
        return (
            f"val = the 'test' side of train_test_split(test_size={VAL_FRACTION}, seed={seed}) of the source's "
            "train split, train = its 'train' side; test = the source's test split, whole"
        )
    return (
        f"test = the 'test' side of train_test_split(test_size={DTD_TEST_FRACTION}, seed={seed}) of the "
        f"source's one split; of its 'train' side, val = the 'test' side of train_test_split(test_size="
        f"{VAL_FRACTION}, seed={seed}) and train = the 'train' side"
    )


# ---------------------------------------------------------------------------------------------
# sources

Record = tuple[bytes | None, Any, int]  # (encoded image bytes or None, decodable image or None, label)


@dataclass
class SplitData:
    """One split of a source: a name for messages, its size, its class names (None when its label
    column is not a ClassLabel) and ``records()``, every row in order."""

    name: str
    length: int
    class_names: list[str] | None
    records: Callable[[], Iterator[Record]]


@dataclass
class SuiteSource:
    """A task's source splits: ``val``/``test`` None when carved from ``train``; ``given``: the
    source's train/val/test are the task's (the authors' local layout)."""

    train: SplitData
    val: SplitData | None
    test: SplitData | None
    record: dict = field(default_factory=dict)

    @property
    def carved(self) -> str:
        if self.val is not None:
            return "none"
        return "val" if self.test is not None else "test+val"


def _hf_split(ds: Any, name: str) -> SplitData:
    """A ``datasets.Dataset`` with an ``image`` and a ``label`` column; the image column read as stored
    (``Image(decode=False)``)."""
    datasets = _import_datasets()
    for column in (IMAGE, LABEL):
        if column not in ds.column_names:
            raise ValueError(f"{name} has no {column!r} column (columns: {', '.join(ds.column_names)}).")
    label = ds.features[LABEL]
    names = [str(n) for n in label.names] if isinstance(label, datasets.ClassLabel) else None
    if len(ds) == 0:  # datasets cannot cast an empty saved table; check_source names the empty split
        return SplitData(name, 0, names, lambda: iter(()))
    ds = ds.select_columns([IMAGE, LABEL])
    encoded = isinstance(ds.features[IMAGE], datasets.Image)
    if encoded:
        ds = ds.cast_column(IMAGE, datasets.Image(decode=False))

    def records() -> Iterator[Record]:
        for batch in ds.iter(batch_size=256):
            for image, target in zip(batch[IMAGE], batch[LABEL]):
                if encoded:
                    yield _stored_bytes(image, name), None, target
                else:
                    yield None, image, target

    return SplitData(name, len(ds), names, records)


def _stored_bytes(value: dict, where: str) -> bytes:
    """The encoded bytes of an undecoded ``datasets.Image`` value (its ``bytes``, else its file)."""
    if value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path")
    if path and os.path.isfile(path):
        return Path(path).read_bytes()
    raise ValueError(f"An image of {where} has neither bytes nor a readable file ({path!r}).")


@contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """Hugging Face's offline mode for the duration (``--no-download``): the hub is not contacted."""
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    targets = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    targets.append((hub_constants, "HF_HUB_OFFLINE"))
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in targets if hasattr(obj, attr)]
    os.environ.update({k: "1" for k in saved_env})
    for obj, attr, _ in saved:
        setattr(obj, attr, True)
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n", 1)[0].split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_hub_split(split: HubSplit, cache_dir: Path, download: bool) -> Any:
    """``datasets.load_dataset(split.dataset, split=split.split, cache_dir=cache_dir)``; with
    ``download`` false, offline and from the cache only (what a failed offline load created is
    removed). A failed download keeps its partial files, which the next try resumes. Failures are
    one-line errors."""
    datasets = _import_datasets()
    if not download:
        with removed_on_failure(cache_dir):
            try:
                with _offline(datasets):
                    return datasets.load_dataset(
                        split.dataset,
                        split=split.split,
                        cache_dir=str(cache_dir),
                        download_mode="reuse_dataset_if_exists",
                    )
            except Exception as err:
                raise FileNotFoundError(
                    f"{split} is not in the cache {cache_dir} and --no-download forbids fetching it "
                    f"({_first_line(err)})."
                ) from None
    try:
        return datasets.load_dataset(split.dataset, split=split.split, cache_dir=str(cache_dir))
    except Exception as err:
        raise FileNotFoundError(f"Could not load {split} into {cache_dir} ({_first_line(err)}).") from None


def hub_source(task: str, cache_dir: Path, download: bool) -> SuiteSource:
    """The task's splits from the Hugging Face hub, as the authors load them."""
    spec = HUB_SPECS[task]
    loaded = {role: _hf_split(load_hub_split(s, cache_dir, download), str(s)) for role, s in spec.splits()}
    record = {
        "kind": "hf",
        "splits": {role: {"dataset": s.dataset, "split": s.split} for role, s in spec.splits()},
        "cache_dir": str(cache_dir),
    }
    return SuiteSource(loaded["train"], loaded.get("val"), loaded.get("test"), record)


AUTHORS_LAYOUT = ("train", "val", "test")


def local_source(task: str, path: Path) -> SuiteSource:
    """A folder of ``save_to_disk``: a DatasetDict holding the splits of the hub source under their hub
    names (``train``, ``validation``, ``test``), or the authors' ``--data-local-dir`` layout (``<path>/
    {train,val,test}`` or ``<path>/<their dataset name>/{train,val,test}``, or a DatasetDict with
    ``train``, ``val`` and ``test``), whose three splits are used as they are."""
    datasets = _import_datasets()
    spec = HUB_SPECS[task]
    if not path.exists():
        raise FileNotFoundError(f"--source {path} does not exist.")
    if (path / "dataset_dict.json").is_file():
        found = _load_from_disk(datasets, path)
        if not isinstance(found, datasets.DatasetDict):
            raise ValueError(f"{path} is not a DatasetDict saved with save_to_disk.")
        record = {"kind": "local", "path": str(path), "layout": "DatasetDict"}
        if set(AUTHORS_LAYOUT) <= set(found):
            return _given(
                found, path, {**record, "layout": "DatasetDict train/val/test (the authors' splits)"}
            )
        needed = {role: s.split for role, s in spec.splits()}
        missing = [name for name in needed.values() if name not in found]
        if missing:
            raise ValueError(
                f"{path} lacks split(s) {', '.join(missing)} that {task} needs ({', '.join(needed.values())}; "
                f"it has {', '.join(found) or 'none'})."
            )
        loaded = {role: _hf_split(found[name], f"{path}[{name}]") for role, name in needed.items()}
        record["splits"] = needed
        return SuiteSource(loaded["train"], loaded.get("val"), loaded.get("test"), record)
    folder = path / spec.authors_name if (path / spec.authors_name).is_dir() else path
    present = [s for s in AUTHORS_LAYOUT if (folder / s).is_dir()]
    if not present:
        raise ValueError(
            f"{path} is neither a DatasetDict saved with save_to_disk (no dataset_dict.json) nor the "
            f"authors' layout {path}/{{train,val,test}}."
        )
    missing = [s for s in AUTHORS_LAYOUT if s not in present]
    if missing:
        raise ValueError(f"{folder} lacks {', '.join(missing)} of the authors' layout {{train,val,test}}.")
    found = {s: _load_from_disk(datasets, folder / s) for s in AUTHORS_LAYOUT}
    return _given(
        found, folder, {"kind": "local", "path": str(folder), "layout": "authors' {train,val,test}"}
    )


def _load_from_disk(datasets: Any, path: Path) -> Any:
    """``datasets.load_from_disk``; a failure is one line, an empty saved split named as such (datasets
    cannot reload a split saved with no rows)."""
    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:
        import json

        states = (
            [path / "state.json"] if (path / "state.json").is_file() else sorted(path.glob("*/state.json"))
        )
        for state in states:
            try:
                files = json.loads(state.read_text(encoding="utf-8")).get("_data_files")
            except (OSError, ValueError):
                continue
            if files == []:
                where = path if state.parent == path else f"{path}[{state.parent.name}]"
                raise ValueError(f"{where} is empty.") from None
        raise ValueError(
            f"{path} cannot be read with datasets.load_from_disk ({_first_line(err)})."
        ) from None


def _given(found: Any, path: Path, record: dict) -> SuiteSource:
    loaded = {s: _hf_split(found[s], f"{path}[{s}]") for s in AUTHORS_LAYOUT}
    record["splits"] = {s: s for s in AUTHORS_LAYOUT}
    return SuiteSource(loaded["train"], loaded["val"], loaded["test"], record)


def _read_bytes(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def _tv_dataset(cls_name: str, root: Path, download: bool, kwargs: dict) -> Any:
    """A torchvision dataset whose items are the image files' bytes where its class takes a ``loader``."""
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    extra = {"loader": _read_bytes} if "loader" in inspect.signature(cls).parameters else {}
    try:
        return cls(str(root), download=download, **kwargs, **extra)
    except (RuntimeError, OSError) as err:
        hint = "" if download else " (drop --no-download to fetch it)"
        raise FileNotFoundError(
            f"torchvision's {cls_name}({kwargs}) found no data under {root}: {_first_line(err)}{hint}"
        ) from None


def _tv_split(parts: list[Any], name: str) -> SplitData:
    def records() -> Iterator[Record]:
        for dataset in parts:
            for i in range(len(dataset)):
                image, target = dataset[i]
                if isinstance(image, bytes | bytearray):
                    yield bytes(image), None, target
                else:
                    yield None, image, target

    names = getattr(parts[0], "classes", None)
    return SplitData(name, sum(len(p) for p in parts), None if names is None else list(names), records)


def torchvision_source(task: str, root: Path, download: bool) -> SuiteSource:
    """The task from torchvision (:data:`TORCHVISION_SPECS`), reading/downloading under ``root``."""
    if task not in TORCHVISION_SPECS:
        offered = ", ".join(TORCHVISION_SPECS)
        raise ValueError(f"torchvision cannot make {task} the authors' way; it makes {offered}.")
    cls_name, train_kw, test_kw = TORCHVISION_SPECS[task]
    with removed_on_failure(root):
        train_parts = [_tv_dataset(cls_name, root, download, kw) for kw in train_kw]
        test = None if test_kw is None else _tv_dataset(cls_name, root, download, test_kw)
    train = _tv_split(train_parts, f"torchvision {cls_name}{list(train_kw)}")
    record = {
        "kind": "torchvision",
        "class": cls_name,
        "train": list(train_kw),
        "test": test_kw,
        "root": str(root),
        "note": "indices follow torchvision's order, not the hub's: the same rule, not the same images",
    }
    test_split = None if test is None else _tv_split([test], f"torchvision {cls_name}({test_kw})")
    return SuiteSource(train, None, test_split, record)


def digits_source() -> SuiteSource:
    """scikit-learn's digits: the train pool of ``sklearn_digits(0)`` (its train800 and val200, 1000
    images) as the train split and its test pool (797) as the test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    train_pos, val_pos, test_pos = digits_split(DIGITS_POOL_SEED, len(data.images))
    train_pool = [int(i) for i in np.concatenate([train_pos, val_pos])]

    def split(positions: list[int], name: str) -> SplitData:
        def records() -> Iterator[Record]:
            for i in positions:
                yield None, digits_image(data.images[i]), int(data.target[i])

        return SplitData(name, len(positions), [str(d) for d in range(10)], records)

    record = {
        "kind": "sklearn",
        "note": f"load_digits; train/test pools of sklearn_digits({DIGITS_POOL_SEED}): train = its "
        "train800 + val200 (1000), test = its test (797)",
    }
    return SuiteSource(
        split(train_pool, "digits train pool"), None, split([int(i) for i in test_pos], "digits test"), record
    )


def load_source(task: str, source: str, download_root: Path, download: bool) -> SuiteSource:
    """The source of a suite task: ``auto``/``hf`` (the hub), ``torchvision``, ``sklearn`` (digits) or
    a local ``save_to_disk`` folder."""
    if task == "suite_digits":
        if source not in ("auto", "sklearn"):
            raise ValueError(
                f"suite_digits is made from scikit-learn's digits (--source sklearn), not {source!r}."
            )
        return digits_source()
    if source == "sklearn":
        raise ValueError(f"--source sklearn makes only suite_digits, not {task}.")
    if source in ("auto", "hf"):
        return hub_source(task, download_root, download)
    if source == "torchvision":
        return torchvision_source(task, download_root, download)
    if source == "tfds":
        raise ValueError(f"The suite is not made from tfds; --source for {task}: hf, torchvision or a PATH.")
    return local_source(task, Path(source).expanduser().absolute())


def sources_for(task: str) -> list[str]:
    """The sources that can make a suite task, the default first."""
    if task == "suite_digits":
        return ["sklearn"]
    return ["hf", *(["torchvision"] if task in TORCHVISION_SPECS else []), "PATH"]


def source_summary(task: str) -> str:
    """One line: where the task's data comes from on the hub (or scikit-learn)."""
    if task == "suite_digits":
        return "scikit-learn load_digits"
    spec = HUB_SPECS[task]
    parts = [f"{role} {s}" for role, s in spec.splits()]
    carved = "val from train" if spec.val is None and spec.test else "test+val from train"
    return ", ".join(parts) + ("" if spec.val else f"; {carved}")


# ---------------------------------------------------------------------------------------------
# checks and writing

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"II*\x00", 0, "tif"),
    (b"MM\x00*", 0, "tif"),
    (b"WEBP", 8, "webp"),
    (b"BM", 0, "bmp"),
)


def image_extension(data: bytes) -> str | None:
    """The file extension of an encoded image from its magic bytes (jpg, png, gif, tif, webp, bmp), or None."""
    for magic, offset, ext in _MAGIC:
        if data[offset : offset + len(magic)] == magic and (ext != "webp" or data[:4] == b"RIFF"):
            return ext
    return None


def check_source(task: str, num_classes: int, source: SuiteSource) -> list[str] | None:
    """One-line ValueErrors: an empty split, class names differing between splits, a class count
    other than the registry's. Returns the class names (the train split's, as the authors take them)."""
    splits = [s for s in (source.train, source.val, source.test) if s is not None]
    for split in splits:
        if split.length == 0:
            raise ValueError(f"{task}: {split.name} is empty.")
    names = source.train.class_names
    for split in splits[1:]:
        if names is not None and split.class_names is not None and split.class_names != names:
            first = next(
                (i for i, (a, b) in enumerate(zip(names, split.class_names)) if a != b),
                min(len(names), len(split.class_names)),
            )
            ours = names[first] if first < len(names) else None
            theirs = split.class_names[first] if first < len(split.class_names) else None
            raise ValueError(
                f"{task}: the class names of {source.train.name} and {split.name} differ "
                f"({len(names)} vs {len(split.class_names)} names; label {first}: {ours!r} vs {theirs!r})."
            )
    if names is not None and len(names) != num_classes:
        raise ValueError(
            f"{task}: {source.train.name} has {len(names)} class names, the registry's task {num_classes} classes."
        )
    return names


def _write_split(
    split: SplitData,
    routes: dict[int, str],
    folder: Path,
    num_classes: int,
    lines: dict[str, list[tuple[str, int]]],
    log: Callable[[str], None],
    task: str,
) -> None:
    """Write every routed row of ``split`` (one pass) into ``images/<sub>/<row>.<ext>``."""
    for sub in set(routes.values()):
        (folder / "images" / sub).mkdir(parents=True, exist_ok=True)
    count = 0
    for index, (encoded, image, label) in enumerate(split.records()):
        sub = routes.get(index)
        if sub is None:
            continue
        if label is None or isinstance(label, bool) or not 0 <= int(label) < num_classes:
            raise ValueError(
                f"{task}: row {index} of {split.name} has label {label!r}, outside 0..{num_classes - 1}."
            )
        ext = None if encoded is None else image_extension(encoded)
        if ext is not None:
            rel = f"images/{sub}/{index}.{ext}"
            (folder / rel).write_bytes(encoded)  # type: ignore[arg-type]
        else:  # no bytes, or bytes of a format we do not name: decoded and written losslessly
            rel = f"images/{sub}/{index}.png"
            savable(to_pil(encoded if encoded is not None else image)).save(folder / rel, format="PNG")
        lines[sub].append((rel, int(label)))
        count += 1
        if count % 10000 == 0:
            log(f"  {split.name}: {count}/{len(routes)} images")
    if count != len(routes):
        raise ValueError(f"{task}: {split.name} yielded {count} of its {len(routes)} rows.")


def write_suite_task(
    name: str,
    source: SuiteSource,
    out_root: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write the suite task folder ``<out_root>/<name>`` atomically (a hidden temporary folder renamed at
    the end, as ``write_fgvc_task``) and return it. An existing complete folder is kept unless
    ``overwrite``; an incomplete one is an error unless ``overwrite``."""
    log = log or print
    info = resolve_task(name, BENCHMARK)
    out_root = Path(out_root).expanduser().absolute()
    final = out_root / info.name
    if kept(final, overwrite, log):
        return final
    names = check_source(info.name, info.num_classes, source)
    plan: list[tuple[SplitData, dict[int, str]]] = []
    if source.carved == "none":
        for sub, split in (("train", source.train), ("val", source.val), ("test", source.test)):
            plan.append((split, dict.fromkeys(range(split.length), sub)))  # type: ignore[union-attr]
    else:
        indices = carve(source.train.length, seed, carve_test=source.test is None)
        plan.append((source.train, {int(i): sub for sub, idx in indices.items() for i in idx}))
        if source.test is not None:
            plan.append((source.test, dict.fromkeys(range(source.test.length), "test")))
    start = time.time()
    with partial_folder(final) as tmp:
        lines: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
        for split, routes in plan:
            _write_split(split, routes, tmp, info.num_classes, lines, log, info.name)
        meta = {
            "task": info.name,
            "benchmark": BENCHMARK,
            "source": source.record,
            "seed": seed,
            "split_rule": split_rule(source.carved, seed),
            "authors_split": "unseeded train_test_split (a different split each run)"
            if source.carved != "none"
            else "the source's own splits",
            "split_files": dict(SPLITS),
            "images": "images/<split>/<row in its source split>.<ext>: the source's encoded bytes where it "
            "stores them, else decoded and written as PNG",
            "num_classes": info.num_classes,
            "class_names": names,
        }
        counts = write_lists(tmp, lines, meta)
    sizes = ", ".join(f"{k} {v}" for k, v in counts.items())
    seeded = (
        "the source's own splits (no carving)"
        if source.carved == "none"
        else f"the authors' split was unseeded, ours seeded {seed}"
    )
    log(f"{info.name}: wrote {final} ({sizes}; {seeded}) in {time.time() - start:.1f} s")
    return final


def prepare_suite_task(
    name: str,
    source: str,
    out_root: Path,
    download_root: Path,
    *,
    download: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Load the source of a suite task and write its folder (``python -m vtab.prepare --benchmark suite``)."""
    log = log or print
    info = resolve_task(name, BENCHMARK)
    final = Path(out_root).expanduser().absolute() / info.name
    if kept(final, overwrite, log):  # before loading: a kept folder needs no download
        return final
    loaded = load_source(info.name, source, Path(download_root), download)
    return write_suite_task(info.name, loaded, out_root, seed=seed, overwrite=overwrite, log=log)
