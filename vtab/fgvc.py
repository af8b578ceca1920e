"""FGVC-5 sources for ``python -m vtab.prepare``: a dataset's official files (the archive as its page
gives it, or the folder its files were extracted into) and, optionally, VPT's released split files
(KMnP/vpt).

Each dataset is one :class:`FgvcSpec` in ``SPECS`` (CUB-200-2011, NABirds, Oxford Flowers 102,
Stanford Dogs, Stanford Cars): what its folder holds, where its images are (VPT's ``JSONDataset``
image folder), and a reader of its official listing (image -> 0-based class, official train/test).
The rest is shared: :func:`fgvc_splits` gives the train/val/test image lists, from VPT's
``train.json``/``val.json``/``test.json`` when given (a JSON object mapping an image path, relative to
the image folder, to a class id), else from the official train/test split with val carved out of
train per class with a recorded seed (Flowers: its official val). The writer is
``vtab.prepare.write_fgvc_task``. MATLAB files (Flowers, Dogs, Cars) are read with scipy."""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tasks import find_task, get_task

VPT_FILES: dict[str, str] = {"train": "train.json", "val": "val.json", "test": "test.json"}
VAL_FRACTION = 0.1  # of each class's official train images, when VPT's split files are not given
SEEDED_NOTE = "seeded, seed {seed}: not VPT's; results are not comparable with published rows"
OFFICIAL_NOTE = "official train/val/test ({val} as val): not checked against VPT's files"
_SHOWN = 3  # names shown in one message before the count


@dataclass(frozen=True)
class Official:
    """A dataset as its official files define it: image path (relative to the image folder) ->
    0-based class, and the official train and test images (in the listing's order).

    ``val`` is the official val split where the dataset has one (Oxford Flowers' ``setid.mat``
    ``valid``; train then excludes it), named by ``val_note``. ``class_ids`` is the dataset's own id of
    each 0-based class where VPT's split files may use those ids instead (NABirds' ``classes.txt`` ids),
    named by ``class_ids_note``."""

    labels: dict[str, int]
    train: list[str]
    test: list[str]
    val: list[str] | None = None
    val_note: str = ""
    class_ids: tuple[int, ...] | None = None
    class_ids_note: str = ""


@dataclass(frozen=True)
class FgvcSpec:
    """One FGVC-5 dataset: its title, the folder its archive unpacks to (or the folder the user extracts
    its files into), the files that folder holds, the image folder (VPT's keys are relative to it) and the
    reader of its official listing. ``archive`` is the one official archive, or "" for a dataset that
    comes as several files (``downloads`` says which). ``variants`` are other official layouts of the same
    dataset's files (Stanford Cars' ``car_ims/`` + ``cars_annos.mat``), tried in turn."""

    task: str
    title: str
    folder: str
    archive: str
    required: tuple[str, ...]
    image_dir: str
    read: Callable[[Path, int], Official]
    urls: tuple[str, ...] = ()
    downloads: str = ""
    variants: tuple[FgvcSpec, ...] = ()

    def source_hint(self) -> str:
        """What ``--source`` should be, for messages."""
        if self.archive:
            return f"give the official {self.archive} or its extracted {self.folder}/ folder"
        return f"give the folder you extracted {self.downloads} into"

    def expected(self) -> str:
        """What a dataset folder holds, for messages."""
        layouts = [f"{s.folder}/ holding {', '.join(s.required)}" for s in (self, *self.variants)]
        return "; or ".join(layouts)


@dataclass
class FgvcSplits:
    """What the writer needs: the image folder, (path relative to it, label) per split
    (train, val, test), whether the files may be moved (a temporary extraction) and what to record."""

    image_root: Path
    lines: dict[str, list[tuple[str, int]]]
    move: bool
    record: dict = field(default_factory=dict)
    message: str = ""


def _table(path: Path, columns: int) -> list[tuple[int, list[str]]]:
    """The ``(line number, fields)`` of a whitespace-separated metadata file (blank lines skipped);
    a line with fewer than ``columns`` fields is a ValueError naming ``file:line``."""
    rows = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = raw.split(maxsplit=columns - 1)
        if not parts:
            continue
        if len(parts) < columns:
            raise ValueError(f"{path}:{lineno}: cannot parse {raw.strip()!r}: expected {columns} fields.")
        rows.append((lineno, parts))
    return rows


def _int(path: Path, lineno: int, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: {text!r} is not an integer.") from None


def _read_listing(
    folder: Path, classes: Callable[[Path, int, int], int] | None
) -> tuple[dict[str, str], dict[str, int], list[str], list[str]]:
    """The CUB-style listing shared by CUB-200-2011 and NABirds: ``images.txt`` (image id, path under
    images/), ``image_class_labels.txt`` (image id, class id) and ``train_test_split.txt`` (image id,
    1 = train, 0 = test). Returns the paths by image id, each path's class id (checked by
    ``classes(file, line, value)`` when given, which returns it), and the train and test paths."""
    paths = {p[0]: p[1].strip() for _, p in _table(folder / "images.txt", 2)}
    where = folder / "image_class_labels.txt"
    raw: dict[str, int] = {}
    for lineno, (image_id, cls) in _table(where, 2):
        value = _int(where, lineno, cls)
        if image_id not in paths:
            raise ValueError(f"{where}:{lineno}: image id {image_id} is not in images.txt.")
        raw[paths[image_id]] = classes(where, lineno, value) if classes else value
    unlabelled = [p for p in paths.values() if p not in raw]
    if unlabelled:
        raise ValueError(f"{where} gives no class for {_some(unlabelled)} of images.txt.")
    train, test = [], []
    where = folder / "train_test_split.txt"
    for lineno, (image_id, flag) in _table(where, 2):
        if image_id not in paths or flag.strip() not in ("0", "1"):
            raise ValueError(f"{where}:{lineno}: expected '<image id in images.txt> <1 train | 0 test>'.")
        (train if flag.strip() == "1" else test).append(paths[image_id])
    return paths, raw, train, test


def read_cub(folder: Path, num_classes: int) -> Official:
    """CUB-200-2011's ``images.txt`` (id, path under images/), ``image_class_labels.txt`` (id, class
    1..200) and ``train_test_split.txt`` (id, 1 = train, 0 = test); classes become 0-based."""

    def check(where: Path, lineno: int, value: int) -> int:
        if not 1 <= value <= num_classes:
            raise ValueError(f"{where}:{lineno}: class {value} is outside 1..{num_classes}.")
        return value - 1

    _, labels, train, test = _read_listing(folder, check)
    return Official(labels, train, test)


def read_nabirds(folder: Path, num_classes: int) -> Official:
    """NABirds' listing, as CUB's (image ids are UUIDs, paths ``<class id>/<uuid>.jpg`` under images/),
    with class ids from ``classes.txt`` (0..1010: the whole taxonomy, of which the images use the 555
    leaf classes). As VPT's ``JSONDataset`` numbers the class ids it finds, the classes the images use
    are numbered 0, 1, ... in increasing id order."""
    where = folder / "classes.txt"
    known = {_int(where, lineno, p[0]) for lineno, p in _table(where, 2)}

    def check(path: Path, lineno: int, value: int) -> int:
        if value not in known:
            raise ValueError(f"{path}:{lineno}: class {value} is not in classes.txt.")
        return value

    _, raw, train, test = _read_listing(folder, check)
    used = sorted(set(raw.values()))
    if len(used) > num_classes:
        raise ValueError(
            f"{folder / 'image_class_labels.txt'}: the images use {len(used)} classes; NABirds has "
            f"{num_classes}."
        )
    index = {cls: i for i, cls in enumerate(used)}
    labels = {name: index[cls] for name, cls in raw.items()}
    return Official(
        labels, train, test, class_ids=tuple(used), class_ids_note="its id in image_class_labels.txt"
    )


def _loadmat(path: Path) -> dict:
    """A MATLAB file's variables (``scipy.io.loadmat``, squeezed); one-line errors."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError(
            f"Reading {path.name} needs scipy: pip install scipy (or pip install petl_zoo[fgvc])."
        ) from None
    try:
        return loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises ValueError, TypeError, MatReadError... for a bad file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: cannot read it as a MATLAB file ({reason}).") from None


def _mat_var(path: Path, data: dict, name: str) -> np.ndarray:
    if name not in data:
        held = ", ".join(k for k in data if not k.startswith("__")) or "nothing"
        raise ValueError(f"{path} has no variable {name!r} (it holds {held}).")
    return np.atleast_1d(data[name])


def _mat_field(path: Path, var: str, array: np.ndarray, name: str) -> np.ndarray:
    if name not in (array.dtype.names or ()):
        raise ValueError(f"{path}: {var} has no field {name!r} (a struct array with {name!r} expected).")
    return np.atleast_1d(array[name])


def _mat_ints(path: Path, what: str, values: np.ndarray, low: int, high: int) -> list[int]:
    """Integers in ``low..high``; a ValueError naming ``file: what(i) = value`` (MATLAB's 1-based
    index) otherwise."""
    out = []
    for i, value in enumerate(values.tolist(), start=1):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
        if not ok or not low <= value <= high:
            raise ValueError(f"{path}: {what}({i}) = {value!r} is not an integer in {low}..{high}.")
        out.append(int(value))
    return out


def _mat_strs(path: Path, what: str, values: np.ndarray) -> list[str]:
    out = []
    for i, value in enumerate(values.tolist(), start=1):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}: {what}({i}) = {value!r} is not a file name.")
        out.append(value.strip().replace("\\", "/"))
    return out


def _same_length(path: Path, first: str, a: list, second: str, b: list) -> None:
    if len(a) != len(b):
        raise ValueError(f"{path}: {first} has {len(a)} entries but {second} has {len(b)}.")


def read_flowers(folder: Path, num_classes: int) -> Official:
    """Oxford Flowers 102: ``imagelabels.mat`` (``labels``: class 1..102 of image_00001.jpg, ...),
    ``setid.mat`` (``trnid``, ``valid``, ``tstid``: 1-based image numbers). Paths are
    ``jpg/image_NNNNN.jpg`` (VPT's keys are relative to the dataset folder); train, val and test are
    the official trnid, valid and tstid (VPT's sizes: 1,020 / 1,020 / 6,149)."""
    path = folder / "imagelabels.mat"
    classes = _mat_ints(path, "labels", _mat_var(path, _loadmat(path), "labels"), 1, num_classes)
    names = [f"jpg/image_{i:05d}.jpg" for i in range(1, len(classes) + 1)]
    labels = {name: cls - 1 for name, cls in zip(names, classes)}
    path = folder / "setid.mat"
    data = _loadmat(path)
    parts: dict[str, list[str]] = {}
    seen: dict[int, str] = {}
    for var in ("trnid", "valid", "tstid"):
        numbers = _mat_ints(path, var, _mat_var(path, data, var), 1, len(names))
        for n in numbers:
            if n in seen:
                raise ValueError(f"{path}: image {n} is in both {seen[n]} and {var}.")
            seen[n] = var
        parts[var] = [names[n - 1] for n in numbers]
    return Official(labels, parts["trnid"], parts["tstid"], val=parts["valid"], val_note="setid.mat valid")


def read_dogs(folder: Path, num_classes: int) -> Official:
    """Stanford Dogs: ``train_list.mat`` and ``test_list.mat`` (``file_list``: paths under Images/,
    ``labels``: class 1..120 each); classes become 0-based."""
    labels: dict[str, int] = {}
    parts: dict[str, list[str]] = {}
    for split in ("train", "test"):
        path = folder / f"{split}_list.mat"
        data = _loadmat(path)
        files = _mat_strs(path, "file_list", _mat_var(path, data, "file_list"))
        classes = _mat_ints(path, "labels", _mat_var(path, data, "labels"), 1, num_classes)
        _same_length(path, "file_list", files, "labels", classes)
        for name, cls in zip(files, classes):
            if name in labels:
                raise ValueError(f"{path}: {name!r} is listed twice (train_list.mat and test_list.mat).")
            labels[name] = cls - 1
        parts[split] = files
    return Official(labels, parts["train"], parts["test"])


def _cars_classes(path: Path, data: dict, num_classes: int) -> int:
    """The class count ``class_names`` gives (at most ``num_classes``)."""
    names = _mat_var(path, data, "class_names")
    if len(names) > num_classes:
        raise ValueError(f"{path}: class_names has {len(names)} classes; Stanford Cars has {num_classes}.")
    return len(names)


def _cars_annotations(path: Path, data: dict, count: int, name_field: str) -> tuple[list[str], list[int]]:
    annotations = _mat_var(path, data, "annotations")
    files = _mat_strs(
        path, f"annotations.{name_field}", _mat_field(path, "annotations", annotations, name_field)
    )
    classes = _mat_ints(
        path, "annotations.class", _mat_field(path, "annotations", annotations, "class"), 1, count
    )
    return files, classes


def read_cars(folder: Path, num_classes: int) -> Official:
    """Stanford Cars as its devkit gives it: ``devkit/cars_meta.mat`` (``class_names``),
    ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (``annotations``: ``fname``,
    ``class`` 1..196, bounding box). Paths are ``cars_train/<fname>`` and ``cars_test/<fname>`` (VPT's
    keys are relative to the dataset folder); classes become 0-based."""
    meta = folder / "devkit" / "cars_meta.mat"
    count = _cars_classes(meta, _loadmat(meta), num_classes)
    labels: dict[str, int] = {}
    parts: dict[str, list[str]] = {}
    for split, path in (
        ("train", folder / "devkit" / "cars_train_annos.mat"),
        ("test", folder / "cars_test_annos_withlabels.mat"),
    ):
        files, classes = _cars_annotations(path, _loadmat(path), count, "fname")
        names = [f"cars_{split}/{f}" for f in files]
        labels.update((name, cls - 1) for name, cls in zip(names, classes))
        parts[split] = names
    return Official(labels, parts["train"], parts["test"])


def read_cars_ims(folder: Path, num_classes: int) -> Official:
    """Stanford Cars as ``car_ims.tgz`` + ``cars_annos.mat`` give it (the layout VPT's split README
    shows): ``annotations`` with ``relative_im_path`` (``car_ims/000001.jpg``), ``class`` 1..196 and
    ``test`` (1 = test, 0 = train), and ``class_names``; classes become 0-based."""
    path = folder / "cars_annos.mat"
    data = _loadmat(path)
    count = _cars_classes(path, data, num_classes)
    names, classes = _cars_annotations(path, data, count, "relative_im_path")
    flags = _mat_ints(
        path,
        "annotations.test",
        _mat_field(path, "annotations", _mat_var(path, data, "annotations"), "test"),
        0,
        1,
    )
    labels = {name: cls - 1 for name, cls in zip(names, classes)}
    train = [n for n, flag in zip(names, flags) if flag == 0]
    test = [n for n, flag in zip(names, flags) if flag == 1]
    return Official(labels, train, test)


_CARS_FILES = "https://ai.stanford.edu/~jkrause/car196/"
_DOGS_FILES = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
_FLOWERS_FILES = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"

SPECS: dict[str, FgvcSpec] = {
    "fgvc_cub": FgvcSpec(
        task="fgvc_cub",
        title="CUB-200-2011",
        folder="CUB_200_2011",
        archive="CUB_200_2011.tgz",
        required=("images", "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"),
        image_dir="images",
        read=read_cub,
        urls=(
            "https://data.caltech.edu/records/65de6-vp158",
            "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
        ),
    ),
    "fgvc_nabirds": FgvcSpec(
        task="fgvc_nabirds",
        title="NABirds",
        folder="nabirds",
        archive="nabirds.tar.gz",
        required=("images", "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"),
        image_dir="images",
        read=read_nabirds,
        urls=("https://dl.allaboutbirds.org/nabirds",),  # the archive, after accepting the terms of use
    ),
    "fgvc_flowers": FgvcSpec(
        task="fgvc_flowers",
        title="Oxford Flowers 102",
        folder="OxfordFlower",
        archive="",
        required=("jpg", "imagelabels.mat", "setid.mat"),
        image_dir=".",
        read=read_flowers,
        urls=(
            _FLOWERS_FILES,
            f"{_FLOWERS_FILES}102flowers.tgz",
            f"{_FLOWERS_FILES}imagelabels.mat",
            f"{_FLOWERS_FILES}setid.mat",
        ),
        downloads="102flowers.tgz (jpg/), imagelabels.mat and setid.mat",
    ),
    "fgvc_dogs": FgvcSpec(
        task="fgvc_dogs",
        title="Stanford Dogs",
        folder="Stanford-dogs",
        archive="",
        required=("Images", "train_list.mat", "test_list.mat"),
        image_dir="Images",
        read=read_dogs,
        urls=(f"{_DOGS_FILES}main.html", f"{_DOGS_FILES}images.tar", f"{_DOGS_FILES}lists.tar"),
        downloads="images.tar (Images/) and lists.tar (train_list.mat, test_list.mat, file_list.mat)",
    ),
    "fgvc_cars": FgvcSpec(
        task="fgvc_cars",
        title="Stanford Cars",
        folder="Stanford-cars",
        archive="",
        required=(
            "cars_train",
            "cars_test",
            "devkit/cars_meta.mat",
            "devkit/cars_train_annos.mat",
            "cars_test_annos_withlabels.mat",
        ),
        image_dir=".",
        read=read_cars,
        urls=(
            "https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
            f"{_CARS_FILES}cars_train.tgz",
            f"{_CARS_FILES}cars_test.tgz",
            "https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz",
            f"{_CARS_FILES}cars_test_annos_withlabels.mat",
            f"{_CARS_FILES}car_ims.tgz",
            f"{_CARS_FILES}cars_annos.mat",
        ),
        downloads=(
            "cars_train.tgz, cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat "
            "(or car_ims.tgz and cars_annos.mat)"
        ),
        variants=(
            FgvcSpec(
                task="fgvc_cars",
                title="Stanford Cars",
                folder="Stanford-cars",
                archive="",
                required=("car_ims", "cars_annos.mat"),
                image_dir=".",
                read=read_cars_ims,
            ),
        ),
    ),
}


def get_spec(task: str) -> FgvcSpec:
    """The FGVC spec of a task name or alias (looked up inside the FGVC-5 benchmark first, so ``cars``
    is Stanford Cars here); ValueError naming the FGVC tasks otherwise."""
    info = find_task(task, "fgvc") if isinstance(task, str) else None
    name = info.name if info is not None else get_task(task).name
    if name not in SPECS:
        raise ValueError(f"Task {name!r} is not an FGVC task; FGVC tasks: {', '.join(SPECS)}.")
    return SPECS[name]


def _some(names: list[str]) -> str:
    """``'a', 'b', 'c' and 4 more (7 in all)``: the first few names and the count."""
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{len(names)} image{'s' * (len(names) != 1)} ({shown}{more})"


def locate(
    spec: FgvcSpec, path: Path, what: str = "folder", shown: Path | None = None
) -> tuple[FgvcSpec, Path]:
    """The layout (``spec`` or one of its variants) and dataset folder at ``path`` (it, or its
    ``folder`` subfolder) holding all of the layout's ``required``; a ValueError naming what is missing
    (from the first layout) when none does. ``shown`` names the path in messages."""
    layouts = (spec, *spec.variants)
    for layout in layouts:
        for folder in (path, path / layout.folder):
            if all((folder / f).exists() for f in layout.required):
                return layout, folder
    folder = path / spec.folder if (path / spec.folder).is_dir() else path
    missing = [f for f in spec.required if not (folder / f).exists()]
    inside = "" if folder == path else f" ({spec.folder}/ inside it)"
    raise ValueError(
        f"{shown or path} is not a {spec.title} {what}{inside}: missing {', '.join(missing)} "
        f"(expected {spec.expected()})."
    )


@contextmanager
def dataset_folder(spec: FgvcSpec, source: Path, scratch: Path) -> Iterator[tuple[FgvcSpec, Path, str]]:
    """The layout and dataset folder of ``source`` (a folder, or an archive unpacked into a hidden
    temporary folder under ``scratch`` and removed afterwards) and the kind of source ('folder' or
    'archive'). A dataset that comes as several files takes a folder only."""
    if source.is_dir():
        yield (*locate(spec, source), "folder")
        return
    if not source.is_file():
        raise FileNotFoundError(f"--source {source} does not exist; {spec.source_hint()}.")
    if not spec.archive:
        raise ValueError(
            f"--source {source} is a file, but {spec.title} comes as several files: extract "
            f"{spec.downloads} into one folder and pass that folder."
        )
    if not tarfile.is_tarfile(source):
        raise ValueError(f"--source {source} is neither a folder nor a tar archive; {spec.source_hint()}.")
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.task}.source.", dir=scratch))
    try:
        try:
            with tarfile.open(source, "r:*") as archive:
                archive.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"--source {source}: cannot unpack the archive ({err}).") from None
        yield (*locate(spec, tmp, "archive", shown=source), "archive")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_files(image_root: Path, names: list[str], listing: str) -> None:
    missing = [n for n in names if not (image_root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{image_root}: {_some(missing)} listed in {listing} do not exist.")


def read_vpt_file(path: Path) -> dict[str, object]:
    """One of VPT's split files: a JSON object mapping image paths to class ids."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not a JSON file ({err}); VPT's split files map image paths to class ids."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}; VPT's split files hold an object mapping image "
            f"paths to class ids."
        )
    return data


def _relative_to(spec: FgvcSpec) -> str:
    return "the dataset folder" if spec.image_dir == "." else f"{spec.image_dir}/"


def vpt_splits(
    spec: FgvcSpec, splits_dir: Path, official: Official, num_classes: int
) -> dict[str, list[tuple[str, int]]]:
    """train/val/test from VPT's ``train.json``, ``val.json``, ``test.json`` in ``splits_dir``: every key
    must be an image of the dataset, every class id an integer in 0..num_classes-1 equal to the
    dataset's own (0-based) class of that image, and no image in two files. Where the dataset has its
    own class ids (``official.class_ids``: NABirds), a file whose ids reach past num_classes - 1 is read
    as using those ids instead, each equal to the dataset's id of that image's class (VPT's
    ``JSONDataset`` numbers the sorted ids either way, which gives the same 0-based classes)."""
    if not splits_dir.is_dir():
        raise FileNotFoundError(
            f"--splits {splits_dir} is not a folder; give the folder of VPT's split files."
        )
    absent = [f for f in VPT_FILES.values() if not (splits_dir / f).is_file()]
    if absent:
        raise FileNotFoundError(
            f"--splits {splits_dir} lacks {', '.join(absent)} (VPT's split folder holds "
            f"{', '.join(VPT_FILES.values())})."
        )
    own_ids = official.class_ids
    lines: dict[str, list[tuple[str, int]]] = {}
    seen: dict[str, str] = {}
    for split, name in VPT_FILES.items():
        path = splits_dir / name
        data = read_vpt_file(path)
        entries: list[tuple[str, int]] = []
        unknown = [k for k in data if k not in official.labels]
        if unknown:
            example = next(iter(official.labels), "")
            raise ValueError(
                f"{path}: {_some(unknown)} not in the {spec.title} dataset; keys are image paths relative "
                f"to {_relative_to(spec)}, e.g. {example!r}."
            )
        for key, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{path}: key {key!r} has class id {value!r}, not an integer.")
        uses_own = own_ids is not None and any(v >= num_classes for v in data.values())
        for key, value in data.items():
            label = official.labels[key]
            if uses_own:
                expected, note = own_ids[label], f"{official.class_ids_note}, as this file's ids are"
                if value not in own_ids:
                    raise ValueError(
                        f"{path}: key {key!r} has class id {value}, which no image of the {spec.title} "
                        f"dataset has (the file's ids are the dataset's own, {official.class_ids_note})."
                    )
            else:
                expected, note = label, "0-based"
                if not 0 <= value < num_classes:
                    raise ValueError(
                        f"{path}: key {key!r} has class id {value!r}, outside 0..{num_classes - 1} "
                        f"(VPT's class ids are 0-based)."
                    )
            if value != expected:
                raise ValueError(
                    f"{path}: key {key!r} has class id {value}, but the dataset's own class of that image is "
                    f"{expected} ({note}); the split files do not match this dataset."
                )
            if key in seen:
                raise ValueError(f"{path}: image {key!r} is also in {seen[key]}; VPT's splits are disjoint.")
            seen[key] = name
            entries.append((key, label))
        lines[split] = entries
    return lines


def seeded_splits(official: Official, seed: int) -> dict[str, list[tuple[str, int]]]:
    """The official train/test split; val is ``round(VAL_FRACTION * n)`` (at least 1 where a class has
    2 or more train images) of each class's n train images, drawn with ``default_rng(seed)`` class by
    class in class order. Lists keep the official listing's order. A dataset with an official val
    split (``official.val``) keeps it, and the seed is not used."""
    if official.val is not None:
        val_names = list(official.val)
    else:
        rng = np.random.default_rng(seed)
        by_class: dict[int, list[str]] = {}
        for name in official.train:
            by_class.setdefault(official.labels[name], []).append(name)
        chosen: set[str] = set()
        for cls in sorted(by_class):
            members = by_class[cls]
            n_val = max(1, round(VAL_FRACTION * len(members))) if len(members) >= 2 else 0
            chosen.update(members[i] for i in rng.permutation(len(members))[:n_val].tolist())
        val_names = [n for n in official.train if n in chosen]
    excluded = set(val_names)
    return {
        "train": [(n, official.labels[n]) for n in official.train if n not in excluded],
        "val": [(n, official.labels[n]) for n in val_names],
        "test": [(n, official.labels[n]) for n in official.test],
    }


@contextmanager
def fgvc_splits(
    task: str, source: Path, scratch: Path, splits_dir: Path | None = None, seed: int = 0
) -> Iterator[FgvcSplits]:
    """The splits of an FGVC task from its official files at ``source`` (archive or folder; an archive is
    unpacked under ``scratch`` for the duration), with VPT's split files from ``splits_dir``, else the
    official split (seeded val where the dataset has no official val)."""
    spec = get_spec(task)
    num_classes = get_task(spec.task).num_classes
    with dataset_folder(spec, Path(source), Path(scratch)) as (layout, folder, kind):
        official = layout.read(folder, num_classes)
        image_root = folder / layout.image_dir
        seed_used: int | None = None
        if splits_dir is not None:
            lines = vpt_splits(layout, Path(splits_dir), official, num_classes)
            splits, val_rule = "vpt", None
            message = f"{spec.task}: splits from VPT's files in {splits_dir}"
        elif official.val is not None:
            lines = seeded_splits(official, seed)
            splits = OFFICIAL_NOTE.format(val=official.val_note)
            val_rule = f"the official val split ({official.val_note})"
            message = f"{spec.task}: splits {splits} (pass --splits VPT_SPLIT_DIR for VPT's)"
        else:
            lines = seeded_splits(official, seed)
            splits, seed_used = SEEDED_NOTE.format(seed=seed), seed
            val_rule = (
                f"{VAL_FRACTION:.0%} of each class's official train images (at least 1), default_rng(seed)"
            )
            message = f"{spec.task}: splits {splits} (pass --splits VPT_SPLIT_DIR for VPT's)"
        _check_files(image_root, [n for entries in lines.values() for n, _ in entries], "the splits")
        record = {
            "benchmark": "fgvc",
            "dataset": spec.title,
            "source_kind": kind,
            "splits": splits,
            "vpt_splits": str(Path(splits_dir).absolute()) if splits_dir is not None else None,
            "seed": seed_used,
            "val_rule": val_rule,
        }
        yield FgvcSplits(image_root, lines, move=kind == "archive", record=record, message=message)
