"""Writing a task folder, for every benchmark's preparation (``vtab.prepare``, ``vtab.suite``): images
savable as the loader reads them, the four list files and ``prepare.json``, the hidden temporary folder
swapped in whole, and a failed download's leftovers removed."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from .images import to_8bit
from .layout import LIST_FILES, SPLITS, umask_mode

METADATA = "prepare.json"


def savable(image: Image.Image) -> Image.Image:
    """Gray stays gray ('L', 16-bit gray scaled to 8 bits); everything else becomes RGB (the loader
    converts gray to RGB)."""
    image = to_8bit(image)
    if image.mode == "L" or image.mode == "RGB":
        return image
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")


def is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in LIST_FILES)


def kept(final: Path, overwrite: bool, log: Callable[[str], None]) -> bool:
    """Whether the task folder ``final`` is kept as it is: a complete folder is (said in one line) unless
    ``overwrite``; an incomplete one is a FileExistsError unless ``overwrite``; an absent one is not."""
    if overwrite or not final.exists():
        return False
    if is_complete(final):
        log(f"{final.name}: {final} already holds the list files; kept (pass --overwrite to rewrite).")
        return True
    raise FileExistsError(
        f"{final} exists but lacks some of {', '.join(LIST_FILES)}; pass --overwrite to replace it."
    )


@contextmanager
def partial_folder(final: Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``final`` to write the task into, swapped in as ``final`` when
    the block ends (:func:`swap_in`) and removed when it raises: nothing half-written is left."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_lists(tmp: Path, lines: dict[str, list[tuple[str, int]]], meta: dict) -> dict[str, int]:
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


def swap_in(tmp: Path, final: Path) -> None:
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


@contextmanager
def removed_on_failure(download_root: Path) -> Iterator[None]:
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
