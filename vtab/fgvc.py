"""FGVC-5 sources for ``python -m vtab.prepare``: a dataset's official files (the archive as its page
gives it, or the extracted folder) and, optionally, VPT's released split files (KMnP/vpt).

Each dataset is one :class:`FgvcSpec` in ``SPECS``: what its folder holds, where its images are, and a
reader of its official listing (image -> class, official train/test). The rest is shared:
:func:`fgvc_splits` gives the train/val/test image lists, from VPT's ``train.json``/``val.json``/
``test.json`` when given (VPT's ``JSONDataset`` reads them: a JSON object mapping an image path,
relative to the image folder, to a 0-based class id), else from the official train/test split with
val carved out of train per class with a recorded seed. The writer is ``vtab.prepare.write_fgvc_task``.
"""

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

from .tasks import get_task

VPT_FILES: dict[str, str] = {"train": "train.json", "val": "val.json", "test": "test.json"}
VAL_FRACTION = 0.1  # of each class's official train images, when VPT's split files are not given
SEEDED_NOTE = "seeded, seed {seed}: not VPT's; results are not comparable with published rows"
_SHOWN = 3  # names shown in one message before the count


@dataclass(frozen=True)
class Official:
    """A dataset as its official files define it: image path (relative to the image folder) ->
    0-based class, and the official train and test images (in the listing's order)."""

    labels: dict[str, int]
    train: list[str]
    test: list[str]


@dataclass(frozen=True)
class FgvcSpec:
    """One FGVC-5 dataset: its title, the folder its archive unpacks to, the files that folder holds,
    the image folder (VPT's keys are relative to it) and the reader of its official listing."""

    task: str
    title: str
    folder: str
    archive: str
    required: tuple[str, ...]
    image_dir: str
    read: Callable[[Path, int], Official]
    urls: tuple[str, ...] = ()


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


def read_cub(folder: Path, num_classes: int) -> Official:
    """CUB-200-2011's ``images.txt`` (id, path under images/), ``image_class_labels.txt`` (id, class
    1..200) and ``train_test_split.txt`` (id, 1 = train, 0 = test); classes become 0-based."""
    paths = {_int(folder / "images.txt", n, p[0]): p[1].strip() for n, p in _table(folder / "images.txt", 2)}
    labels: dict[str, int] = {}
    for lineno, (image_id, cls) in _table(folder / "image_class_labels.txt", 2):
        where = folder / "image_class_labels.txt"
        key, value = _int(where, lineno, image_id), _int(where, lineno, cls)
        if key not in paths:
            raise ValueError(f"{where}:{lineno}: image id {key} is not in images.txt.")
        if not 1 <= value <= num_classes:
            raise ValueError(f"{where}:{lineno}: class {value} is outside 1..{num_classes}.")
        labels[paths[key]] = value - 1
    unlabelled = [p for p in paths.values() if p not in labels]
    if unlabelled:
        raise ValueError(
            f"{folder / 'image_class_labels.txt'} gives no class for {_some(unlabelled)} of images.txt."
        )
    train, test = [], []
    for lineno, (image_id, flag) in _table(folder / "train_test_split.txt", 2):
        where = folder / "train_test_split.txt"
        key, value = _int(where, lineno, image_id), _int(where, lineno, flag)
        if key not in paths or value not in (0, 1):
            raise ValueError(f"{where}:{lineno}: expected '<image id in images.txt> <1 train | 0 test>'.")
        (train if value == 1 else test).append(paths[key])
    return Official(labels, train, test)


SPECS: dict[str, FgvcSpec] = {
    "cub": FgvcSpec(
        task="cub",
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
}


def get_spec(task: str) -> FgvcSpec:
    """The FGVC spec of a task name or alias; ValueError naming the FGVC tasks otherwise."""
    name = get_task(task).name
    if name not in SPECS:
        raise ValueError(f"Task {name!r} is not an FGVC task; FGVC tasks: {', '.join(SPECS)}.")
    return SPECS[name]


def _some(names: list[str]) -> str:
    """``'a', 'b', 'c' and 4 more (7 in all)``: the first few names and the count."""
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{len(names)} image{'s' * (len(names) != 1)} ({shown}{more})"


def locate(spec: FgvcSpec, path: Path, what: str = "folder", shown: Path | None = None) -> Path:
    """The dataset folder at ``path`` (it, or its ``spec.folder`` subfolder); a ValueError naming what
    is missing when neither holds all of ``spec.required``. ``shown`` names the path in messages."""
    candidates = [path, path / spec.folder]
    for folder in candidates:
        if all((folder / f).exists() for f in spec.required):
            return folder
    folder = path / spec.folder if (path / spec.folder).is_dir() else path
    missing = [f for f in spec.required if not (folder / f).exists()]
    inside = "" if folder == path else f" ({spec.folder}/ inside it)"
    raise ValueError(
        f"{shown or path} is not a {spec.title} {what}{inside}: missing {', '.join(missing)} "
        f"(expected {spec.folder}/ holding {', '.join(spec.required)})."
    )


@contextmanager
def dataset_folder(spec: FgvcSpec, source: Path, scratch: Path) -> Iterator[tuple[Path, str]]:
    """The dataset folder of ``source`` (a folder, or an archive unpacked into a hidden temporary
    folder under ``scratch`` and removed afterwards) and the kind of source ('folder' or 'archive')."""
    if source.is_dir():
        yield locate(spec, source), "folder"
        return
    if not source.is_file():
        raise FileNotFoundError(
            f"--source {source} does not exist; give the official {spec.archive} or its extracted "
            f"{spec.folder}/ folder."
        )
    if not tarfile.is_tarfile(source):
        raise ValueError(
            f"--source {source} is neither a folder nor a tar archive; give the official {spec.archive} "
            f"or its extracted {spec.folder}/ folder."
        )
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.task}.source.", dir=scratch))
    try:
        try:
            with tarfile.open(source, "r:*") as archive:
                archive.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"--source {source}: cannot unpack the archive ({err}).") from None
        yield locate(spec, tmp, "archive", shown=source), "archive"
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


def vpt_splits(
    spec: FgvcSpec, splits_dir: Path, official: Official, num_classes: int
) -> dict[str, list[tuple[str, int]]]:
    """train/val/test from VPT's ``train.json``, ``val.json``, ``test.json`` in ``splits_dir``: every key
    must be an image of the dataset, every class id an integer in 0..num_classes-1 equal to the
    dataset's own (0-based) class of that image, and no image in two files."""
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
                f"to {spec.image_dir}/, e.g. {example!r}."
            )
        for key, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_classes:
                raise ValueError(
                    f"{path}: key {key!r} has class id {value!r}, outside 0..{num_classes - 1} "
                    f"(VPT's class ids are 0-based)."
                )
            if value != official.labels[key]:
                raise ValueError(
                    f"{path}: key {key!r} has class id {value}, but the dataset's own class of that image is "
                    f"{official.labels[key]} (0-based); the split files do not match this dataset."
                )
            if key in seen:
                raise ValueError(f"{path}: image {key!r} is also in {seen[key]}; VPT's splits are disjoint.")
            seen[key] = name
            entries.append((key, value))
        lines[split] = entries
    return lines


def seeded_splits(official: Official, seed: int) -> dict[str, list[tuple[str, int]]]:
    """The official train/test split; val is ``round(VAL_FRACTION * n)`` (at least 1 where a class has
    2 or more train images) of each class's n train images, drawn with ``default_rng(seed)`` class by
    class in class order. Lists keep the official listing's order."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[str]] = {}
    for name in official.train:
        by_class.setdefault(official.labels[name], []).append(name)
    val: set[str] = set()
    for cls in sorted(by_class):
        members = by_class[cls]
        n_val = max(1, round(VAL_FRACTION * len(members))) if len(members) >= 2 else 0
        val.update(members[i] for i in rng.permutation(len(members))[:n_val].tolist())
    return {
        "train": [(n, official.labels[n]) for n in official.train if n not in val],
        "val": [(n, official.labels[n]) for n in official.train if n in val],
        "test": [(n, official.labels[n]) for n in official.test],
    }


@contextmanager
def fgvc_splits(
    task: str, source: Path, scratch: Path, splits_dir: Path | None = None, seed: int = 0
) -> Iterator[FgvcSplits]:
    """The splits of an FGVC task from its official files at ``source`` (archive or folder; an archive is
    unpacked under ``scratch`` for the duration), with VPT's split files from ``splits_dir`` or seeded."""
    spec = get_spec(task)
    num_classes = get_task(task).num_classes
    with dataset_folder(spec, Path(source), Path(scratch)) as (folder, kind):
        official = spec.read(folder, num_classes)
        image_root = folder / spec.image_dir
        if splits_dir is not None:
            lines = vpt_splits(spec, Path(splits_dir), official, num_classes)
            splits = "vpt"
            message = f"{spec.task}: splits from VPT's files in {splits_dir}"
        else:
            lines = seeded_splits(official, seed)
            splits = SEEDED_NOTE.format(seed=seed)
            message = f"{spec.task}: splits {splits} (pass --splits VPT_SPLIT_DIR for VPT's)"
        _check_files(image_root, [n for entries in lines.values() for n, _ in entries], "the splits")
        record = {
            "benchmark": "fgvc",
            "dataset": spec.title,
            "source_kind": kind,
            "splits": splits,
            "vpt_splits": str(Path(splits_dir).absolute()) if splits_dir is not None else None,
            "seed": None if splits_dir is not None else seed,
            "val_rule": None
            if splits_dir is not None
            else f"{VAL_FRACTION:.0%} of each class's official train images (at least 1), default_rng(seed)",
        }
        yield FgvcSplits(image_root, lines, move=kind == "archive", record=record, message=message)
