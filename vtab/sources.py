"""Public sources for ``python -m vtab.prepare``: torchvision datasets, TensorFlow Datasets (optional,
imported lazily) and scikit-learn's bundled digits (the offline demo task).

Each adapter returns a :class:`TaskSplits`: a train pool, a val pool and a test pool following
VTAB's split definitions (task_adaptation's ``train``/``val``/``test``); the writer draws train800
from the train pool and val200 from the val pool with a seed and writes the whole test pool.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .images import to_rgb
from .tasks import get_task

# Seed of the fixed permutations that define pools where a source has no such split (e.g. the test
# 20% of EuroSAT from torchvision). Independent of prepare's --seed, so the test set never moves.
SPLIT_SEED = 0

Item = tuple[str, Image.Image, int]  # (stable key used as the file stem, image, label)


def to_pil(image: Any) -> Image.Image:
    """A PIL image from a PIL image, an encoded byte string or a uint8 array (H, W[, C])."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes | bytearray | memoryview):
        decoded = Image.open(io.BytesIO(bytes(image)))
        decoded.load()  # in-memory buffer: nothing to close
        return decoded
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image array, got dtype {array.dtype} with shape {array.shape}.")
    return Image.fromarray(array)


class Pool:
    """A sized split of a source; ``items(indices)`` yields ``(key, image, label)`` for each requested
    index in ascending order, decoding only those."""

    def __len__(self) -> int:
        raise NotImplementedError

    def items(self, indices: Sequence[int]) -> Iterator[Item]:
        raise NotImplementedError


class IndexedPool(Pool):
    """A random-access pool: ``get(position) -> (image, label)`` over the source ``positions``
    (default ``range(n)``); keys are the source positions."""

    def __init__(self, get: Callable[[int], tuple[Any, Any]], positions: Sequence[int] | int) -> None:
        self._get = get
        self._positions = list(range(positions)) if isinstance(positions, int) else list(positions)

    def __len__(self) -> int:
        return len(self._positions)

    def items(self, indices: Sequence[int]) -> Iterator[Item]:
        for i in sorted(indices):
            position = self._positions[i]
            image, label = self._get(position)
            yield str(position), to_pil(image), int(label)


class StreamPool(Pool):
    """A sequential pool (TFDS): ``iterate()`` yields records in a fixed order and ``decode(record)``
    turns the wanted ones into ``(image, label)``; keys are the record positions."""

    def __init__(
        self, length: int, iterate: Callable[[], Iterable[Any]], decode: Callable[[Any], tuple[Any, Any]]
    ) -> None:
        self._length = length
        self._iterate = iterate
        self._decode = decode

    def __len__(self) -> int:
        return self._length

    def items(self, indices: Sequence[int]) -> Iterator[Item]:
        wanted = sorted(set(indices))
        if not wanted:
            return
        cursor = 0
        for position, record in enumerate(self._iterate()):
            if position == wanted[cursor]:
                image, label = self._decode(record)
                yield str(position), to_pil(image), int(label)
                cursor += 1
                if cursor == len(wanted):
                    return
        raise ValueError(
            f"The source ended before record {wanted[cursor]} (it claims {self._length} records)."
        )


@dataclass
class TaskSplits:
    """Pools of one task. ``val=None``: train800 and val200 are both drawn (disjoint) from ``train``.
    ``exact``: the train and val pools already are train800 and val200 (no draw)."""

    train: Pool
    val: Pool | None
    test: Pool
    exact: bool = False
    note: str = ""


Builder = Callable[[Path, bool], TaskSplits]


def _permuted(n: int) -> np.ndarray:
    return np.random.default_rng(SPLIT_SEED).permutation(n)


def _cut(positions: Sequence[int], *percents: int) -> list[list[int]]:
    """VTAB-style percentage slices (``train[:60%]``, ``train[60%:80%]``, ...) of ``positions``;
    boundaries are ``pct * n // 100`` as task_adaptation counts them."""
    n = len(positions)
    bounds = [0] + [p * n // 100 for p in percents] + [n]
    return [list(positions[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------------------------------------
# Label rules shared by the torchvision and TFDS adapters (task_adaptation's preprocessing).

CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DIST_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)


def clevr_count_label(num_objects: int) -> int:
    """clevr_count: number of objects (3..10) - 3, 8 classes."""
    return int(num_objects) - 3


def clevr_dist_label(depths: Sequence[float]) -> int:
    """clevr_dist: bin of the closest object's depth (``pixel_coords[:, 2]``), 6 classes."""
    dist = float(np.min(depths))
    return int(max(i for i, t in enumerate(CLEVR_DIST_THRESHOLDS) if t < dist))


def kitti_dist_label(types: Sequence[int], depths: Sequence[float]) -> int:
    """kitti: closest vehicle (Car/Van/Truck, type < 3) depth binned <8 m, <20 m, farther, none."""
    vehicle = [float(z) for t, z in zip(types, depths) if int(t) < 3] + [1000.0]
    dist = min(vehicle)
    return int(max(i for i, t in enumerate(KITTI_DIST_THRESHOLDS) if t < dist))


def binned_label(value: int, original: int, classes: int) -> int:
    """dSprites: ``floor(value / (original / classes))`` (x position 32 -> 16, orientation 40 -> 16)."""
    return int(np.floor(float(value) / (float(original) / classes)))


# ---------------------------------------------------------------------------------------------
# torchvision


def _tv_dataset(task: str, cls_name: str, root: Path, download: bool, **kwargs: Any) -> Any:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    try:
        return cls(str(root), download=download, **kwargs)
    except RuntimeError as err:
        hint = "" if download else " (drop --no-download to fetch it)"
        raise FileNotFoundError(
            f"torchvision's {cls_name} found no data for task {task!r} under {root}: {err}{hint}"
        ) from None
    except OSError as err:  # urllib's URLError, a refused connection, a timeout: the source is unreachable
        reason = " ".join(str(getattr(err, "reason", None) or err).split())
        raise FileNotFoundError(
            f"could not download torchvision's {cls_name} for task {task!r}: the source is unreachable "
            f"({reason}); put its files under {root} and pass --no-download, or run where the network reaches it"
        ) from None


def _tv_pool(dataset: Any, positions: Sequence[int] | None = None) -> IndexedPool:
    return IndexedPool(dataset.__getitem__, len(dataset) if positions is None else positions)


def _tv_split_classes(task: str, cls_name: str, names: tuple[str, str, str], **kwargs: Any) -> Builder:
    """A task whose torchvision class has train/val/test splits (``split=`` argument)."""

    def build(root: Path, download: bool) -> TaskSplits:
        train, val, test = (_tv_dataset(task, cls_name, root, download, split=s, **kwargs) for s in names)
        return TaskSplits(_tv_pool(train), _tv_pool(val), _tv_pool(test), note=f"torchvision {cls_name}")

    return build


def _tv_cut_train(task: str, cls_name: str, train_pct: int, train_kw: dict, test_kw: dict) -> Builder:
    """VTAB's ``train[:p%]`` / ``train[p%:]`` of the source's train split (over a fixed permutation,
    since torchvision's order may be sorted by class), and the source's test split."""

    def build(root: Path, download: bool) -> TaskSplits:
        train = _tv_dataset(task, cls_name, root, download, **train_kw)
        test = _tv_dataset(task, cls_name, root, download, **test_kw)
        tr, va = _cut(_permuted(len(train)), train_pct)
        note = f"torchvision {cls_name}: train pool {train_pct}% / val pool {100 - train_pct}% of its train split"
        return TaskSplits(_tv_pool(train, tr), _tv_pool(train, va), _tv_pool(test), note=note)

    return build


def _tv_eurosat(root: Path, download: bool) -> TaskSplits:
    data = _tv_dataset("eurosat", "EuroSAT", root, download)
    tr, va, te = _cut(_permuted(len(data)), 60, 80)
    note = "torchvision EuroSAT: 60/20/20 train/val/test over a fixed permutation (VTAB's percentages)"
    return TaskSplits(_tv_pool(data, tr), _tv_pool(data, va), _tv_pool(data, te), note=note)


def _tv_sun397(root: Path, download: bool) -> TaskSplits:
    data = _tv_dataset("sun397", "SUN397", root, download)
    folder = Path(root) / "SUN397"
    files = sorted(folder.rglob("sun_*.jpg"))
    labels = [data.class_to_idx["/".join(f.relative_to(folder).parts[1:-1])] for f in files]

    def get(i: int) -> tuple[Image.Image, int]:
        with Image.open(files[i]) as im:
            return to_rgb(im), labels[i]

    tr, va, te = _cut(_permuted(len(files)), 70, 80)
    note = "torchvision SUN397: 70/10/20 train/val/test over a fixed permutation (the sizes of sun397/tfds)"
    return TaskSplits(IndexedPool(get, tr), IndexedPool(get, va), IndexedPool(get, te), note=note)


def _tv_caltech101(root: Path, download: bool) -> TaskSplits:
    _tv_dataset("caltech101", "Caltech101", root, download)  # downloads / checks the folder
    folder = Path(root) / "caltech101" / "101_ObjectCategories"
    # 102 classes as in TFDS/VTAB (torchvision drops BACKGROUND_Google), ordered by lower-case name.
    classes = sorted((p.name for p in folder.iterdir() if p.is_dir()), key=str.lower)
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for f in sorted(p for p in (folder / name).iterdir() if p.is_file()):
            files.append(f)
            labels.append(label)
    rng = np.random.default_rng(SPLIT_SEED)
    train: list[int] = []
    for label in range(len(classes)):
        members = [i for i, y in enumerate(labels) if y == label]
        train.extend(int(i) for i in rng.permutation(members)[:30])
    chosen = set(train)
    test = [i for i in range(len(files)) if i not in chosen]
    tr, va = _cut(rng.permutation(sorted(train)).tolist(), 90)

    def get(i: int) -> tuple[Image.Image, int]:
        with Image.open(files[i]) as im:
            return to_rgb(im), labels[i]

    note = "torchvision Caltech101 files, 102 classes: 30 random images per class train (90/10 train/val), rest test"
    return TaskSplits(IndexedPool(get, tr), IndexedPool(get, va), IndexedPool(get, test), note=note)


def _tv_clevr(task: str) -> Builder:
    def build(root: Path, download: bool) -> TaskSplits:
        _tv_dataset(task, "CLEVRClassification", root, download, split="train")
        base = Path(root) / "clevr" / "CLEVR_v1.0"

        def split_pool(split: str, positions: Sequence[int] | None = None) -> IndexedPool:
            files = sorted((base / "images" / split).glob("*"))
            with open(base / "scenes" / f"CLEVR_{split}_scenes.json", encoding="utf-8") as fh:
                scenes = {s["image_filename"]: s["objects"] for s in json.load(fh)["scenes"]}

            def get(i: int) -> tuple[Image.Image, int]:
                objects = scenes[files[i].name]
                if task == "clevr_count":
                    label = clevr_count_label(len(objects))
                else:
                    label = clevr_dist_label([o["pixel_coords"][2] for o in objects])
                with Image.open(files[i]) as im:
                    return to_rgb(im), label

            return IndexedPool(get, len(files) if positions is None else positions)

        n_train = len(list((base / "images" / "train").glob("*")))
        tr, va = _cut(list(range(n_train)), 90)
        note = "torchvision CLEVR (scenes JSON labels): train[:90%] / train[90%:], test = CLEVR val split"
        return TaskSplits(split_pool("train", tr), split_pool("train", va), split_pool("val"), note=note)

    return build


TORCHVISION: dict[str, Builder] = {
    "cifar": _tv_cut_train("cifar", "CIFAR100", 90, {"train": True}, {"train": False}),
    "caltech101": _tv_caltech101,
    "dtd": _tv_split_classes("dtd", "DTD", ("train", "val", "test")),
    "oxford_flowers102": _tv_split_classes("oxford_flowers102", "Flowers102", ("train", "val", "test")),
    "oxford_iiit_pet": _tv_cut_train(
        "oxford_iiit_pet", "OxfordIIITPet", 80, {"split": "trainval"}, {"split": "test"}
    ),
    "svhn": _tv_cut_train("svhn", "SVHN", 90, {"split": "train"}, {"split": "test"}),
    "sun397": _tv_sun397,
    "patch_camelyon": _tv_split_classes("patch_camelyon", "PCAM", ("train", "val", "test")),
    "eurosat": _tv_eurosat,
    "clevr_count": _tv_clevr("clevr_count"),
    "clevr_dist": _tv_clevr("clevr_dist"),
}


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets (optional extra 'tfds'), VTAB's own source


@dataclass(frozen=True)
class TfdsSpec:
    """A TFDS builder name, the VTAB train/val/test split strings, and how to read a record."""

    name: str
    splits: tuple[str, str, str]
    label: Callable[[dict], int]
    image_key: str = "image"
    binary_image: bool = False  # dSprites stores 0/1 pixels; VTAB multiplies by 255


def _key(name: str) -> Callable[[dict], int]:
    return lambda record: int(record[name])


_TFDS: dict[str, TfdsSpec] = {
    "cifar": TfdsSpec("cifar100", ("train[:90%]", "train[90%:]", "test"), _key("label")),
    "caltech101": TfdsSpec("caltech101", ("train[:90%]", "train[90%:]", "test"), _key("label")),
    "dtd": TfdsSpec("dtd", ("train", "validation", "test"), _key("label")),
    "oxford_flowers102": TfdsSpec("oxford_flowers102", ("train", "validation", "test"), _key("label")),
    "oxford_iiit_pet": TfdsSpec("oxford_iiit_pet", ("train[:80%]", "train[80%:]", "test"), _key("label")),
    "svhn": TfdsSpec("svhn_cropped", ("train[:90%]", "train[90%:]", "test"), _key("label")),
    "sun397": TfdsSpec("sun397/tfds", ("train", "validation", "test"), _key("label")),
    "patch_camelyon": TfdsSpec("patch_camelyon", ("train", "validation", "test"), _key("label")),
    "eurosat": TfdsSpec("eurosat/rgb", ("train[:60%]", "train[60%:80%]", "train[80%:]"), _key("label")),
    "resisc45": TfdsSpec("resisc45", ("train[:60%]", "train[60%:80%]", "train[80%:]"), _key("label")),
    "diabetic_retinopathy": TfdsSpec(
        "diabetic_retinopathy_detection/btgraham-300", ("train", "validation", "test"), _key("label")
    ),
    "clevr_count": TfdsSpec(
        "clevr",
        ("train[:90%]", "train[90%:]", "validation"),
        lambda r: clevr_count_label(len(r["objects"]["size"])),
    ),
    "clevr_dist": TfdsSpec(
        "clevr",
        ("train[:90%]", "train[90%:]", "validation"),
        lambda r: clevr_dist_label(np.asarray(r["objects"]["pixel_coords"])[:, 2]),
    ),
    "dmlab": TfdsSpec("dmlab", ("train", "validation", "test"), _key("label")),
    "kitti": TfdsSpec(
        "kitti",
        ("train", "validation", "test"),
        lambda r: kitti_dist_label(
            r["objects"]["type"], np.asarray(r["objects"]["location"]).reshape(-1, 3)[:, 2]
        ),
    ),
    "dsprites_loc": TfdsSpec(
        "dsprites",
        ("train[:80%]", "train[80%:90%]", "train[90%:]"),
        lambda r: binned_label(r["label_x_position"], 32, 16),
        binary_image=True,
    ),
    "dsprites_ori": TfdsSpec(
        "dsprites",
        ("train[:80%]", "train[80%:90%]", "train[90%:]"),
        lambda r: binned_label(r["label_orientation"], 40, 16),
        binary_image=True,
    ),
    "smallnorb_azi": TfdsSpec("smallnorb", ("train", "test[:50%]", "test[50%:]"), _key("label_azimuth")),
    "smallnorb_ele": TfdsSpec("smallnorb", ("train", "test[:50%]", "test[50%:]"), _key("label_elevation")),
}


def import_tfds() -> Any:
    """``tensorflow_datasets``, or an ImportError saying how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "Source 'tfds' needs TensorFlow Datasets (and TensorFlow to read it): "
            "pip install 'petl_zoo[tfds]'   (or use --source torchvision where it has the task; "
            f"see --list-sources). Import failed: {err}"
        ) from None
    return tfds


def _tfds_builder(task: str) -> Builder:
    spec = _TFDS[task]

    def build(root: Path, download: bool) -> TaskSplits:
        tfds = import_tfds()
        builder = tfds.builder(spec.name, data_dir=str(root))
        if download:
            config = tfds.download.DownloadConfig(manual_dir=str(Path(root) / "manual"))
            builder.download_and_prepare(download_config=config)

        def decode(record: dict) -> tuple[Image.Image, int]:
            image = to_pil(record[spec.image_key])
            if spec.binary_image:
                image = image.point(lambda v: 255 if v else 0)
            return image, spec.label(record)

        def pool(split: str) -> StreamPool:
            def iterate() -> Iterable[Any]:
                ds = builder.as_dataset(
                    split=split, shuffle_files=False, decoders={spec.image_key: tfds.decode.SkipDecoding()}
                )
                return tfds.as_numpy(ds)

            return StreamPool(int(builder.info.splits[split].num_examples), iterate, decode)

        tr, va, te = spec.splits
        note = f"tfds {spec.name}: train pool {tr}, val pool {va}, test {te}"
        return TaskSplits(pool(tr), pool(va), pool(te), note=note)

    return build


TFDS: dict[str, Builder] = {task: _tfds_builder(task) for task in _TFDS}


# ---------------------------------------------------------------------------------------------
# scikit-learn digits: the offline demo task

DIGITS_SIZE = 28  # the 8x8 digit is upscaled to 28x28 (bilinear) ...
DIGITS_CANVAS = 32  # ... and zero-padded to 32x32 (2 px each side)


def digits_image(pixels: np.ndarray) -> Image.Image:
    """One scikit-learn digit (8x8, values 0..16) as the 32x32 gray image the demo task uses:
    values scaled to 0..255 (rounded), upscaled to 28x28 bilinear, zero-padded 2 px each side."""
    scaled = np.round(np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    small = Image.fromarray(scaled)
    up = small.resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (DIGITS_CANVAS, DIGITS_CANVAS), 0)
    offset = (DIGITS_CANVAS - DIGITS_SIZE) // 2
    canvas.paste(up, (offset, offset))
    return canvas


def digits_split(seed: int = 0, n: int = 1797) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.random.default_rng(seed).permutation(n)``: first 800 train800, next 200 val200, rest test."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:800], perm[800:1000], perm[1000:]


def sklearn_digits(seed: int = 0) -> TaskSplits:
    """The 1797 scikit-learn digits as train800 / val200 / test (797); keys are sklearn indices."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images, targets = data.images, data.target

    def get(i: int) -> tuple[Image.Image, int]:
        return digits_image(images[i]), int(targets[i])

    tr, va, te = digits_split(seed, len(images))
    note = f"sklearn load_digits: permutation default_rng({seed}): [:800] train800, [800:1000] val200, [1000:] test"
    return TaskSplits(IndexedPool(get, tr), IndexedPool(get, va), IndexedPool(get, te), exact=True, note=note)


# ---------------------------------------------------------------------------------------------

SOURCES: dict[str, dict[str, Builder]] = {"torchvision": TORCHVISION, "tfds": TFDS}
SOURCE_NAMES = ("torchvision", "tfds", "sklearn")


def sources_for(task: str) -> list[str]:
    """The sources that can make ``task`` (canonical name or alias), in preference order."""
    name = get_task(task).name
    if name == "digits":
        return ["sklearn"]
    return [source for source, table in SOURCES.items() if name in table]


def default_source(task: str) -> str:
    """torchvision where it has the task (no extra install), else TFDS; sklearn for digits."""
    found = sources_for(task)
    if not found:
        raise ValueError(f"No source can make task {task!r}.")
    return found[0]
