"""Write task folders (VTAB-1K, FGVC-5, the full-dataset suite) from public sources.

    python -m vtab.prepare --task digits                      # offline demo, no download
    python -m vtab.prepare --task dtd --source torchvision --download-root ./data/downloads
    python -m vtab.prepare --task all --source tfds            # VTAB's own source (extra 'tfds')
    python -m vtab.prepare --list-sources
    python -m vtab.prepare --task cub --source CUB_200_2011.tgz --splits vpt_splits/cub   # FGVC-5
    python -m vtab.prepare --benchmark suite --task all       # NEAT's/FourierFT's full-dataset suite (extra 'suite')
    python -m vtab.prepare --task suite_digits                 # the suite's offline demo task

A task name is resolved inside ``--benchmark`` (vtab, fgvc, suite) when given, else as ``vtab.resolve_task``
infers it (``dtd`` is VTAB-1K's, ``cifar10`` the suite's, ``cars`` asks for ``--benchmark``).

Each task folder gets ``images/{train,val,test}/<key>.png`` and the four list files. An FGVC task keeps
its original image files under ``images/`` (``write_fgvc_task``), a suite task its source's encoded
bytes (``vtab.suite``), under the same four list file names. The folder is written under a hidden
temporary name and renamed at the end; an existing complete folder is kept (re-running is safe) unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .fgvc import FgvcSplits, fgvc_splits
from .layout import SPLITS, resolve_root
from .sources import (
    SOURCE_NAMES,
    SOURCES,
    Pool,
    TaskSplits,
    default_source,
    sklearn_digits,
    sources_for,
)
from .taskfolder import kept, partial_folder, removed_on_failure, savable, write_lists
from .tasks import (
    BENCHMARK_NAMES,
    FGVC_GROUP,
    SUITE_GROUP,
    TaskInfo,
    benchmark_name,
    fgvc_tasks,
    find_task,
    get_task,
    resolve_task,
    suite_tasks,
    tasks,
)

FORMATS = ("png", "jpg")
JPEG_QUALITY = 75  # Pillow's default quality
N_TRAIN, N_VAL = 800, 200
DEFAULT_DOWNLOAD_ROOT = Path("data") / "downloads"

logger = logging.getLogger(__name__)


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
        image = savable(image)
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
    if kept(final, overwrite, log):
        return final
    train_idx, val_idx = _draw(splits, seed, n_train, n_val)
    start = time.time()
    with partial_folder(final) as tmp:
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
        meta["counts"] = write_lists(tmp, lines, meta)
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
    if kept(final, overwrite, log):
        return final
    start = time.time()
    with partial_folder(final) as tmp:
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
        counts = write_lists(tmp, lines, meta)
    sizes = ", ".join(f"{k} {v}" for k, v in counts.items())
    log(f"{info.name}: wrote {final} ({sizes}) in {time.time() - start:.1f} s")
    return final


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
    with removed_on_failure(download_root):
        return SOURCES[source][name](download_root, download)


def sources_table(benchmark: str | None = None) -> str:
    """A text table: each task, its group and class count, and the sources that can make it: VTAB-1K's
    tasks and the demo task, then (no ``benchmark``, or ``suite``) the full-dataset suite's with the hub
    splits its authors load, or (``fgvc``) FGVC-5's."""
    from .suite import source_summary
    from .suite import sources_for as suite_sources_for

    rows: list[tuple[str, str, str, str]] = []
    if benchmark in (None, "vtab"):
        rows.append(("task", "group", "classes", "sources (first = default)"))
        for info in tasks(include_extra=True):
            rows.append((info.name, info.group, str(info.num_classes), ", ".join(sources_for(info.name))))
    if benchmark == "fgvc":
        rows.append(("task", "group", "classes", "sources"))
        for info in fgvc_tasks():
            rows.append((info.name, info.group, str(info.num_classes), "PATH of its official files"))
    if benchmark in (None, "suite"):
        if rows:
            rows.append(("", "", "", ""))
        rows.append(("suite task", "group", "classes", "sources (first = default): what the default loads"))
        for info in suite_tasks(include_extra=True):
            line = f"{', '.join(suite_sources_for(info.name))}: {source_summary(info.name)}"
            rows.append((info.name, info.group, str(info.num_classes), line))
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
        help="task name or alias (repeatable); 'all' = the 19 VTAB tasks, or the suite's ten with "
        "--benchmark suite; FGVC-5: fgvc_cub, fgvc_nabirds, fgvc_flowers, fgvc_dogs, fgvc_cars; the suite: "
        "suite_pets, suite_cifar10 ... and suite_digits (offline demo)",
    )
    parser.add_argument(
        "--benchmark",
        default=None,
        help=f"resolve task names inside one benchmark: {'|'.join(BENCHMARK_NAMES)} (default: inferred "
        "from the name; dtd is VTAB-1K's, cifar10 the suite's, cars needs it)",
    )
    parser.add_argument(
        "--source",
        default="auto",
        help=f"where images come from: auto|{'|'.join(SOURCE_NAMES)} for VTAB tasks (auto = torchvision "
        "where it has the task, else tfds; sklearn for digits); for an FGVC task the path of its official "
        "archive (CUB, NABirds) or of the folder its official files were extracted into; for a suite task "
        "auto|hf (the Hugging Face datasets its authors load), torchvision (some tasks, see --list-sources), "
        "sklearn (suite_digits) or the PATH of a save_to_disk folder",
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
        help="where sources download/keep their files (tfds data_dir; manual downloads in <it>/manual; "
        "the Hugging Face cache_dir of the suite)",
    )
    parser.add_argument(
        "--out", default=None, help="VTAB root to write into (default: $VTAB_ROOT or ./data/vtab-1k)"
    )
    parser.add_argument(
        "--format",
        default="png",
        choices=FORMATS,
        help="png (lossless, default) or jpg; VTAB-1K tasks only (FGVC and suite tasks keep the source's bytes)",
    )
    parser.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY, help="quality for --format jpg")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the train800/val200 draw (FGVC without --splits: of val; the suite: of its "
        "train_test_split)",
    )
    parser.add_argument("--overwrite", action="store_true", help="rewrite task folders that already exist")
    parser.add_argument(
        "--no-download", action="store_true", help="use only files already in --download-root"
    )
    parser.add_argument(
        "--list-sources",
        action="store_true",
        help="print which source can make which task (VTAB-1K's and the suite's; one benchmark with --benchmark)",
    )
    return parser


def _prepare_fgvc(name: str, args: argparse.Namespace, out_root: Path) -> Path:
    """One FGVC task from ``--source PATH`` (official archive or folder) and ``--splits``."""
    if args.source == "auto" or args.source in SOURCE_NAMES:
        raise ValueError(
            f"Task {name!r} is made from its official files: pass --source PATH (the archive or the folder "
            f"of its extracted files; see docs/vtab.md, FGVC-5), not {args.source!r}."
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


def _task_names(task_args: Sequence[str], benchmark: str | None) -> list[TaskInfo]:
    """The registry tasks the ``--task`` values name; ``all`` = VTAB-1K's 19, or the suite's ten with
    ``--benchmark suite`` (FGVC-5's each need their own --source: refused)."""
    infos: list[TaskInfo] = []
    for task in task_args:
        if task == "all":
            if benchmark == "fgvc":
                raise ValueError(
                    "--task all is not offered for FGVC-5: each of its tasks needs its own --source "
                    f"(name them: {', '.join(t.name for t in fgvc_tasks())})."
                )
            infos.extend(suite_tasks() if benchmark == SUITE_GROUP else tasks())
        else:
            infos.append(resolve_task(task, benchmark))
    return infos


def _prepare_suite(info: TaskInfo, args: argparse.Namespace, out_root: Path, download_root: Path) -> Path:
    """One task of the full-dataset suite (``vtab.suite``)."""
    from .suite import prepare_suite_task, source_summary

    source = args.source
    where = source_summary(info.name) if source in ("auto", "hf", "sklearn") else source
    print(f"{info.name}: source {source} ({where})", flush=True)
    return prepare_suite_task(
        info.name,
        source,
        out_root,
        download_root,
        download=not args.no_download,
        seed=args.seed,
        overwrite=args.overwrite,
        log=lambda text: print(text, flush=True),
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point (``python -m vtab.prepare``, ``petl-zoo prepare``); returns the exit status."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.list_sources:
        try:
            print(sources_table(None if args.benchmark is None else benchmark_name(args.benchmark)))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    if not args.task:
        parser.error("give --task NAME (repeatable, or 'all'), or --list-sources")
    out_root = resolve_root(args.out)
    download_root = Path(args.download_root).expanduser().absolute()
    try:
        benchmark = None if args.benchmark is None else benchmark_name(args.benchmark)
        infos = _task_names(args.task, benchmark)
        others = [i.name for i in infos if i.group != FGVC_GROUP]
        if args.splits is not None and others:
            raise ValueError(
                f"--splits applies to FGVC tasks ({', '.join(t.name for t in fgvc_tasks())}); "
                f"{others[0]!r} is not one."
            )
        vtab_names = [i.name for i in infos if i.benchmark == "vtab"]
        if vtab_names and args.source not in ("auto", *SOURCE_NAMES):
            raise ValueError(
                f"Unknown source {args.source!r} for task {vtab_names[0]!r}; valid: auto, "
                f"{', '.join(SOURCE_NAMES)} (a path is the --source of an FGVC or suite task)."
            )
        for info in infos:
            if kept(out_root / info.name, args.overwrite, print):  # before any source is read
                continue
            if info.group == FGVC_GROUP:
                _prepare_fgvc(info.name, args, out_root)
                continue
            if info.benchmark == SUITE_GROUP:
                _prepare_suite(info, args, out_root, download_root)
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
