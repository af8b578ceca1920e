"""Measure how many images/s the vtab loaders deliver (decode + transform + collate), per setting.

    python tools/loader_throughput.py                          # synthetic 224x224 JPEGs, ViT-B/16 input
    python tools/loader_throughput.py --task digits --split trainval --data-root ./data/vtab-1k
    python tools/loader_throughput.py --synthetic 1000 --synthetic-size 500 375 --workers 0 2

The model is only used for its input size and data config (built on the meta device: no weights).
Two figures: the CPU cost per image (process time on one thread, nearly independent of other load
on the machine) and the wall-clock images/s of ``vtab.make_loader`` for each ``--workers`` value
(the first pass starts the persistent workers and is not timed; the figure is over the timed
passes, so it reflects whatever else the machine is running).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import default_collate

import vtab


def make_synthetic(root: Path, n: int, size: tuple[int, int], fmt: str = "jpg", seed: int = 0) -> str:
    """A task folder ``<root>/synthetic`` of ``n`` random-noise-plus-gradient images (W, H = size);
    every list file lists all of them. Returns the task name."""
    folder = root / "synthetic"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    lines = []
    for i in range(n):
        noise = rng.normal(0, 40, size=(height, width, 3)).astype(np.float32)
        pixels = np.clip(ramp + noise + rng.uniform(-60, 60, size=3), 0, 255).astype(np.uint8)
        rel = f"images/{i:05d}.{fmt}"
        options = {"quality": 90} if fmt == "jpg" else {}
        Image.fromarray(pixels).save(folder / rel, **options)
        lines.append(f"{rel} {i % 10}\n")
    for file in vtab.LIST_FILES:
        (folder / file).write_text("".join(lines), encoding="utf-8")
    return "synthetic"


def measure(
    dataset: torch.utils.data.Dataset, batch_size: int, workers: int, passes: int = 2, seed: int = 0
) -> float:
    """Images/s over ``passes`` timed passes after one untimed warm-up pass."""
    loader = vtab.make_loader(dataset, batch_size, shuffle=True, workers=workers, seed=seed)
    for _ in loader:  # warm-up: worker start, page cache
        pass
    images = 0
    start = time.perf_counter()
    for _ in range(passes):
        for batch, _labels in loader:
            images += batch.shape[0]
    return images / (time.perf_counter() - start)


def cpu_cost(dataset: torch.utils.data.Dataset, batch_size: int, limit: int = 512) -> float:
    """CPU milliseconds per image (decode + transform + collate) in this process on one thread:
    unlike images/s it hardly depends on what else the machine is running. ``2 * 1000 / cost``
    is what 2 workers can deliver on 2 free cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = min(len(dataset), limit)
        dataset[0]  # warm caches
        start = time.process_time()
        for first in range(0, n, batch_size):
            default_collate([dataset[i] for i in range(first, min(n, first + batch_size))])
        return (time.process_time() - start) * 1000 / n
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default=None, help="a prepared task (default: a synthetic folder)")
    parser.add_argument("--split", default="trainval")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--synthetic", type=int, default=1000, help="images in the synthetic folder")
    parser.add_argument("--synthetic-size", type=int, nargs=2, default=(224, 224), metavar=("W", "H"))
    parser.add_argument("--synthetic-format", default="jpg", choices=("jpg", "png"))
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model giving the input size")
    parser.add_argument("--protocol", default="vtab", choices=vtab.PROTOCOLS)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args(argv)

    with torch.device("meta"):
        model = timm.create_model(args.model, pretrained=False)
    transform = vtab.build_transform(model, args.protocol, augment=args.augment)
    size = vtab.input_size(model)
    with tempfile.TemporaryDirectory() as tmp:
        if args.task is None:
            root = Path(tmp)
            task = make_synthetic(root, args.synthetic, tuple(args.synthetic_size), args.synthetic_format)
            what = f"synthetic {args.synthetic_size[0]}x{args.synthetic_size[1]} {args.synthetic_format}"
        else:
            root, task, what = args.data_root, args.task, args.task
        try:
            dataset = vtab.VtabDataset(task, args.split, transform, data_root=root)
        except (FileNotFoundError, ValueError) as err:  # unknown/unprepared task, bad list file
            parser.error(" ".join(str(err).split()))
        cost = cpu_cost(dataset, args.batch_size)
        print(
            f"{what} -> {size[0]}x{size[1]} protocol={args.protocol}: CPU cost {cost:.2f} ms/image "
            f"(one thread) = {1000 / cost:.0f} images/s per free core",
            flush=True,
        )
        for workers in args.workers:
            rate = measure(dataset, args.batch_size, workers, args.passes)
            print(
                f"{what} ({len(dataset)} images, split {dataset.split}) -> {size[0]}x{size[1]} "
                f"protocol={args.protocol} augment={args.augment} workers={workers} "
                f"batch={args.batch_size}: {rate:.0f} images/s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
