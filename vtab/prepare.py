"""Write VTAB-1K task folders from public sources.

    python -m vtab.prepare --task digits                      # offline demo, no download
    python -m vtab.prepare --task dtd --source torchvision --download-root ./data/downloads
    python -m vtab.prepare --task all --source tfds            # VTAB's own source (extra 'tfds')
    python -m vtab.prepare --list-sources
    python -m vtab.prepare --task cub --source CUB_200_2011.tgz --splits vpt_splits/cub   # FGVC-5

Each task folder gets ``images/{train,val,test}/<key>.png`` and the four list files (an FGVC task:
its original image files under ``images/`` and the same four list file names, see ``write_fgvc_task``). The folder is
written under a hidden temporary name and renamed at the end; an existing complete folder is kept
(re-running is safe) unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .fgvc import FgvcSplits, fgvc_splits
from .images import to_8bit
from .layout import LIST_FILES, SPLITS, resolve_root, umask_mode
from .sources import (
    SOURCE_NAMES,
    SOURCES,
    Pool,
    TaskSplits,
    default_source,
    sklearn_digits,
    sources_for,
)
from .tasks import FGVC_GROUP, fgvc_tasks, find_task, get_task, tasks

FORMATS = ("png", "jpg")
JPEG_QUALITY = 75  # Pillow's default quality
N_TRAIN, N_VAL = 800, 200
METADATA = "prepare.json"
DEFAULT_DOWNLOAD_ROOT = Path("data") / "downloads"

logger = logging.getLogger(__name__)


def _savable(image: Image.Image) -> Image.Image:
    """Gray stays gray ('L', 16-bit gray scaled to 8 bits); everything else becomes RGB (the loader
    converts gray to RGB)."""
    image = to_8bit(image)
    if image.mode == "L" or image.mode == "RGB":
        return image
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")


def _draw(splits: TaskSplits, seed: int, n_train: int, n_val: int) -> tuple[list[int], list[int]]:
    """Indices of train800 in the train pool and of val200 in the val pool (or the train pool)."""
    if splits.exact:
        if len(splits.train) != n_train or splits.val is None or len(splits.val) != n_val:
            val_len = None if splits.val is None else len(splits.val)
            raise ValueError(
                f"An exact split needs {n_train} train and {n_val} val items, got {len(splits.train)} and {val_len}."
            )
        return list(range(n_train)), list(range(n_val))
    rng = np.random.default_rng(seed)
    if splits.val is None:
        if len(splits.train) < n_train + n_val:
            raise ValueError(
                f"The train pool holds {len(splits.train)} items; {n_train} + {n_val} are needed."
            )
        perm = rng.permutation(len(splits.train))
        return sorted(perm[:n_train].tolist()), sorted(perm[n_train : n_train + n_val].tolist())
    if len(splits.train) < n_train or len(splits.val) < n_val:
        raise ValueError(
            f"The pools hold {len(splits.train)} train and {len(splits.val)} val items; "
            f"{n_train} and {n_val} are needed."
        )
    train = sorted(rng.permutation(len(splits.train))[:n_train].tolist())
    val = sorted(rng.permutation(len(splits.val))[:n_val].tolist())
    return train, val


def _write_pool(
    pool: Pool,
    wanted: dict[str, list[int]],
    folder: Path,
    fmt: str,
    jpeg_quality: int,
    num_classes: int | None,
    log: Callable[[str], None],
) -> dict[str, list[tuple[str, int]]]:
    """Write the wanted items of one pool (one pass) into ``images/<sub>/``; returns list lines."""
    route = {i: sub for sub, indices in wanted.items() for i in indices}
    order = sorted(route)
    lines: dict[str, list[tuple[str, int]]] = {sub: [] for sub in wanted}
    for sub in wanted:
        (folder / "images" / sub).mkdir(parents=True, exist_ok=True)
    count = 0
    for index, (key, image, label) in zip(order, pool.items(order)):
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise ValueError(f"Source item {key} has label {label}, outside 0..{(num_classes or 1) - 1}.")
        sub = route[index]
        rel = f"images/{sub}/{key}.{fmt}"
        image = _savable(image)
        if fmt == "jpg":
            image.save(folder / rel, format="JPEG", quality=jpeg_quality)
        else:
            image.save(folder / rel, format="PNG")
        lines[sub].append((rel, label))
        count += 1
        if count % 10000 == 0:
            log(f"  {count}/{len(order)} images")
    if count != len(order):
        raise ValueError(f"The source yielded {count} of the {len(order)} requested items.")
    return lines


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in LIST_FILES)


def write_task(
    name: str,
    splits: TaskSplits,
    out_root: str | Path,
    *,
    fmt: str = "png",
    seed: int = 0,
    overwrite: bool = False,
    jpeg_quality: int = JPEG_QUALITY,
    n_train: int = N_TRAIN,
    n_val: int = N_VAL,
    num_classes: int | None = None,
    source: str = "",
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write one task folder ``<out_root>/<name>`` atomically and return it.

    train800 (``n_train``) and val200 (``n_val``) are drawn with ``seed`` from the train and val
    pools (both from the train pool, disjoint, when ``splits.val`` is None); test is the whole test
    pool; train800val200 is train800 followed by val200. Labels are checked against
    ``num_classes`` (the registry's count by default). An existing complete folder is kept unless
    ``overwrite``; an incomplete one is an error unless ``overwrite``.
    """
    log = log or logger.info
    if fmt not in FORMATS:
        raise ValueError(f"Unknown image format {fmt!r}; valid: {', '.join(FORMATS)}.")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality!r}.")
    info = find_task(name)
    folder_name = info.name if info is not None else name
    if num_classes is None and info is not None:
        num_classes = info.num_classes
    out_root = Path(out_root).expanduser().absolute()
    final = out_root / folder_name
    if final.exists() and not overwrite:
        if _is_complete(final):
            log(f"{folder_name}: {final} already holds the list files; kept (pass --overwrite to rewrite).")
            return final
        raise FileExistsError(
            f"{final} exists but lacks some of {', '.join(LIST_FILES)}; pass --overwrite to replace it."
        )
    train_idx, val_idx = _draw(splits, seed, n_train, n_val)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", suffix=".partial", dir=out_root))
    start = time.time()
    try:
        lines = _write_images(splits, train_idx, val_idx, tmp, fmt, jpeg_quality, num_classes, log)
        meta = {
            "task": folder_name,
            "source": source,
            "note": splits.note,
            "seed": seed,
            "format": fmt,
            "jpeg_quality": jpeg_quality if fmt == "jpg" else None,
            "num_classes": num_classes,
        }
        meta["counts"] = _write_lists(tmp, lines, meta)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = ", ".join(f"{k} {v}" for k, v in meta["counts"].items())
    log(f"{folder_name}: wrote {final} ({counts}) in {time.time() - start:.1f} s")
    return final


def _write_images(
    splits: TaskSplits,
    train_idx: list[int],
    val_idx: list[int],
    tmp: Path,
    fmt: str,
    jpeg_quality: int,
    num_classes: int | None,
    log: Callable[[str], None],
) -> dict[str, list[tuple[str, int]]]:
    """The images of every split under ``tmp``; returns (relative path, label) per split."""
    args = (tmp, fmt, jpeg_quality, num_classes, log)
    if splits.val is None:
        lines = _write_pool(splits.train, {"train": train_idx, "val": val_idx}, *args)
    else:
        lines = _write_pool(splits.train, {"train": train_idx}, *args)
        lines.update(_write_pool(splits.val, {"val": val_idx}, *args))
    lines.update(_write_pool(splits.test, {"test": list(range(len(splits.test)))}, *args))
    return lines


def _write_lists(tmp: Path, lines: dict[str, list[tuple[str, int]]], meta: dict) -> dict[str, int]:
    """The four list files (train800val200 = train800 then val200) and the metadata file; the counts."""
    content = {
        "train": lines["train"],
        "val": lines["val"],
        "trainval": lines["train"] + lines["val"],
        "test": lines["test"],
    }
    for split, entries in content.items():
        text = "".join(f"{rel} {label}\n" for rel, label in entries)
        (tmp / SPLITS[split]).write_text(text, encoding="utf-8")
    counts = {SPLITS[s]: len(e) for s, e in content.items()}
    (tmp / METADATA).write_text(json.dumps({**meta, "counts": counts}, indent=2) + "\n", encoding="utf-8")
    return counts


def write_fgvc_task(
    name: str,
    splits: FgvcSplits,
    out_root: str | Path,
    *,
    overwrite: bool = False,
    source: str = "",
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write an FGVC task folder ``<out_root>/<name>`` atomically and return it.

    The images are the dataset's own files, copied (moved out of a temporary extraction) to
    ``images/<path relative to the dataset's image folder>``. The splits use the layout's four list
    file names: train -> train800.txt, val -> val200.txt, train + val -> train800val200.txt, test ->
    test.txt, whatever their true sizes (``prepare.json`` records them). Existing folders as in
    ``write_task``."""
    log = log or logger.info
    info = get_task(name)
    out_root = Path(out_root).expanduser().absolute()
    final = out_root / info.name
    if final.exists() and not overwrite:
        if _is_complete(final):
            log(f"{info.name}: {final} already holds the list files; kept (pass --overwrite to rewrite).")
            return final
        raise FileExistsError(
            f"{final} exists but lacks some of {', '.join(LIST_FILES)}; pass --overwrite to replace it."
        )
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{info.name}.", suffix=".partial", dir=out_root))
    start = time.time()
    try:
        lines: dict[str, list[tuple[str, int]]] = {}
        for split, entries in splits.lines.items():
            lines[split] = []
            for rel, label in entries:
                if not 0 <= label < info.num_classes:
                    raise ValueError(f"Image {rel} has label {label}, outside 0..{info.num_classes - 1}.")
                target = tmp / "images" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if splits.move:
                    (splits.image_root / rel).replace(target)
                else:
                    shutil.copyfile(splits.image_root / rel, target)
                lines[split].append((f"images/{rel}", label))
        meta = {
            "task": info.name,
            "source": source,
            **splits.record,
            "split_files": {split: SPLITS[split] for split in ("train", "val", "trainval", "test")},
            "format": "original files, not re-encoded",
            "num_classes": info.num_classes,
        }
        counts = _write_lists(tmp, lines, meta)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = ", ".join(f"{k} {v}" for k, v in counts.items())
    log(f"{info.name}: wrote {final} ({sizes}) in {time.time() - start:.1f} s")
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``, replacing an old one only once ``tmp`` is whole.

    ``mkdtemp`` made ``tmp`` private (0700); the task folder gets the umask's mode like any ``mkdir``.
    """
    tmp.chmod(umask_mode(0o777))
    if final.exists():
        old = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.old"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def build_splits(task: str, source: str, download_root: Path, download: bool, seed: int) -> TaskSplits:
    """The pools of ``task`` from ``source`` ('torchvision', 'tfds' or 'sklearn')."""
    name = get_task(task).name
    if source not in SOURCE_NAMES:
        raise ValueError(f"Unknown source {source!r}; valid: {', '.join(SOURCE_NAMES)}.")
    if source not in sources_for(name):
        available = ", ".join(sources_for(name)) or "none"
        raise ValueError(
            f"Source {source!r} cannot make task {name!r}; sources for {name}: {available} (see --list-sources)."
        )
    if name == "digits":
        return sklearn_digits(seed)
    with _removed_on_failure(download_root):
        return SOURCES[source][name](download_root, download)


@contextmanager
def _removed_on_failure(download_root: Path) -> Iterator[None]:
    """On an exception, delete what the failed download created under ``download_root`` (the root too,
    when it did not exist before): an unreachable source leaves nothing half-made behind."""
    existed = download_root.exists()
    before = set(download_root.iterdir()) if existed else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(download_root, ignore_errors=True)
        elif download_root.is_dir():
            for entry in set(download_root.iterdir()) - before:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        raise


def sources_table() -> str:
    """A text table: each task, its group and class count, and the sources that can make it."""
    rows = [("task", "group", "classes", "sources (first = default)")]
    for info in tasks(include_extra=True):
        rows.append((info.name, info.group, str(info.num_classes), ", ".join(sources_for(info.name))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in rows
    )


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m vtab.prepare",
        description="Write VTAB-1K task folders (train800/val200/train800val200/test lists + images).",
    )
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        help="task name or alias (repeatable); 'all' = the 19 VTAB tasks; FGVC: cub",
    )
    parser.add_argument(
        "--source",
        default="auto",
        help=f"where images come from: auto|{'|'.join(SOURCE_NAMES)} for VTAB tasks (auto = torchvision "
        "where it has the task, else tfds; sklearn for digits); for an FGVC task (cub) the path of its "
        "official archive or extracted folder",
    )
    parser.add_argument(
        "--splits",
        default=None,
        metavar="VPT_SPLIT_DIR",
        help="FGVC tasks: the folder of VPT's train.json/val.json/test.json (without it: official "
        "train/test, val carved from train with --seed; not comparable with published rows)",
    )
    parser.add_argument(
        "--download-root",
        default=str(DEFAULT_DOWNLOAD_ROOT),
        help="where sources download/keep their files (tfds data_dir; manual downloads in <it>/manual)",
    )
    parser.add_argument(
        "--out", default=None, help="VTAB root to write into (default: $VTAB_ROOT or ./data/vtab-1k)"
    )
    parser.add_argument("--format", default="png", choices=FORMATS, help="png (lossless, default) or jpg")
    parser.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY, help="quality for --format jpg")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the train800/val200 draw (FGVC without --splits: of val)"
    )
    parser.add_argument("--overwrite", action="store_true", help="rewrite task folders that already exist")
    parser.add_argument(
        "--no-download", action="store_true", help="use only files already in --download-root"
    )
    parser.add_argument("--list-sources", action="store_true", help="print which source can make which task")
    return parser


def _prepare_fgvc(name: str, args: argparse.Namespace, out_root: Path) -> Path:
    """One FGVC task from ``--source PATH`` (official archive or folder) and ``--splits``."""
    if args.source == "auto" or args.source in SOURCE_NAMES:
        raise ValueError(
            f"Task {name!r} is made from its official files: pass --source PATH (the archive or its "
            f"extracted folder; see docs/vtab.md, FGVC-5), not {args.source!r}."
        )
    source = Path(args.source).expanduser().absolute()
    splits_dir = None if args.splits is None else Path(args.splits).expanduser().absolute()
    with fgvc_splits(name, source, out_root, splits_dir, args.seed) as splits:
        print(splits.message, flush=True)
        return write_fgvc_task(
            name,
            splits,
            out_root,
            overwrite=args.overwrite,
            source=str(source),
            log=lambda text: print(text, flush=True),
        )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point (``python -m vtab.prepare``, ``petl-zoo prepare``); returns the exit status."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.list_sources:
        print(sources_table())
        return 0
    if not args.task:
        parser.error("give --task NAME (repeatable, or 'all'), or --list-sources")
    names: list[str] = []
    for task in args.task:
        if task == "all":
            names.extend(t.name for t in tasks())
        else:
            names.append(task)
    out_root = resolve_root(args.out)
    download_root = Path(args.download_root).expanduser().absolute()
    try:
        infos = [get_task(task) for task in names]
        vtab_names = [i.name for i in infos if i.group != FGVC_GROUP]
        if args.splits is not None and vtab_names:
            raise ValueError(
                f"--splits applies to FGVC tasks ({', '.join(t.name for t in fgvc_tasks())}); "
                f"{vtab_names[0]!r} is a VTAB-1K task."
            )
        if vtab_names and args.source not in ("auto", *SOURCE_NAMES):
            raise ValueError(
                f"Unknown source {args.source!r} for task {vtab_names[0]!r}; valid: auto, "
                f"{', '.join(SOURCE_NAMES)} (a path is the --source of an FGVC task)."
            )
        for info in infos:
            existing = out_root / info.name
            if not args.overwrite and _is_complete(existing):
                print(
                    f"{info.name}: {existing} already holds the list files; kept (pass --overwrite to rewrite)."
                )
                continue
            if info.group == FGVC_GROUP:
                _prepare_fgvc(info.name, args, out_root)
                continue
            source = default_source(info.name) if args.source == "auto" else args.source
            print(f"{info.name}: source {source}", flush=True)
            splits = build_splits(info.name, source, download_root, not args.no_download, args.seed)
            write_task(
                info.name,
                splits,
                out_root,
                fmt=args.format,
                seed=args.seed,
                overwrite=args.overwrite,
                jpeg_quality=args.jpeg_quality,
                source=source,
                log=lambda text: print(text, flush=True),
            )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
