"""Measure how many images/s the vtab loaders deliver (decode + transform + collate), per setting,
and, with ``--train``, the training images/s of a PETL method on a model in the same run.

    python tools/loader_throughput.py                          # synthetic 224x224 JPEGs, ViT-B/16 input
    python tools/loader_throughput.py --task digits --split trainval --data-root ./data/vtab-1k
    python tools/loader_throughput.py --synthetic 1000 --synthetic-size 500 375 --workers 0 2
    python tools/loader_throughput.py --synthetic-size 500 375 --transform suite --workers 0 1 2 \
        --train lora --train-batch 16 --rounds 3 --device cpu   # full-size task vs ViT-B LoRA training

The model is only used for its input size and data config (built on the meta device: no weights).
Two loader figures: the CPU cost per image (process time on one thread, nearly independent of other
load on the machine) and the wall-clock images/s of ``vtab.make_loader`` for each ``--workers``
value (the first pass starts the persistent workers and is not timed; the figure is over the timed
passes, so it reflects whatever else the machine is running).

``--transform suite`` is the training transform of the full-size (``suite``) tasks, the ``suite``
recipe's: ``vtab.build_transform(model, augment=True, crop="random_resized")``, RandomResizedCrop to
the model's input size (torchvision's default scale 0.08-1, bilinear) + random horizontal flip +
ToTensor + Normalize with the model's mean/std. ``--transform model`` (the default) is
``vtab.build_transform`` with ``--protocol`` and ``--augment``.

``--train METHOD``: the model (``--model``, random init, no download) patched with
``petl_zoo.create(METHOD, model)`` on ``--device``, training steps (forward, cross-entropy, backward,
AdamW step, as ``tools/benchmark.py``) on random tensors of ``--train-batch`` images. Loader passes
and training steps are interleaved over ``--rounds`` rounds (each round: one timed pass per worker
count, then ``--train-steps`` timed steps; never at the same time) and the medians are compared:
the ratio loader / training per worker count is how many times over the loader feeds the model
(the issue's goal: at least 2). In a real run both share the machine's cores; on a GPU the model
does not use them, on CPU it does, so a CPU ratio is an upper bound.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
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


def timed_pass(loader: torch.utils.data.DataLoader) -> tuple[int, float]:
    """Images and seconds of one pass over ``loader``."""
    images = 0
    start = time.perf_counter()
    for batch, _labels in loader:
        images += batch.shape[0]
    return images, time.perf_counter() - start


def measure(
    dataset: torch.utils.data.Dataset, batch_size: int, workers: int, passes: int = 2, seed: int = 0
) -> float:
    """Images/s over ``passes`` timed passes after one untimed warm-up pass."""
    loader = vtab.make_loader(dataset, batch_size, shuffle=True, workers=workers, seed=seed)
    timed_pass(loader)  # warm-up: worker start, page cache
    images, seconds = 0, 0.0
    for _ in range(passes):
        n, t = timed_pass(loader)
        images, seconds = images + n, seconds + t
    return images / seconds


def machine(device: torch.device) -> str:
    """CPU model, cores, torch threads, load and the accelerator, in one line."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"machine: {model}, {os.cpu_count()} cores ({usable} usable), torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads,{load}; device {device}{gpu}"
    )


def make_trainer(args: argparse.Namespace, device: torch.device):
    """``(step, batch)``: one training step of ``args.train`` on ``args.model`` (random init)."""
    import petl_zoo
    from petl_zoo.accounting.timing import make_train_step

    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    petl_zoo.create(args.train, model)
    model.to(device).train()
    height, width = vtab.input_size(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.train_batch, 3, height, width, generator=generator).to(device)
    y = torch.randint(args.num_classes, (args.train_batch,), generator=generator).to(device)
    amp = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp]
    return make_train_step(model, x, y, amp), args.train_batch


def timed_steps(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def side_by_side(
    dataset: torch.utils.data.Dataset, args: argparse.Namespace, device: torch.device, what: str
) -> None:
    """Interleaved rounds of loader passes (one per worker count) and training steps; prints the
    per-round figures, then the medians and the ratio loader / training per worker count."""
    step, batch = make_trainer(args, device)
    loaders = {
        n: vtab.make_loader(dataset, args.batch_size, shuffle=True, workers=n, seed=0) for n in args.workers
    }
    for loader in loaders.values():
        timed_pass(loader)  # warm-up: worker start, page cache
    for _ in range(args.train_warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rates: dict[int, list[float]] = {n: [] for n in args.workers}
    train: list[float] = []
    for r in range(args.rounds):
        for n, loader in loaders.items():
            images, seconds = timed_pass(loader)
            rates[n].append(images / seconds)
        train.append(args.train_steps * batch / timed_steps(step, args.train_steps, device))
        loads = "  ".join(f"workers={n}: {rates[n][-1]:.0f}" for n in args.workers)
        print(
            f"round {r + 1}/{args.rounds}: loader images/s {loads}; training {train[-1]:.2f} images/s",
            flush=True,
        )
    del loaders  # stops the persistent workers
    trained = statistics.median(train)
    print(
        f"training: {args.train} on {args.model} (random init), batch {batch}, device {device}, "
        f"amp {args.amp}: {trained:.2f} images/s (median of {args.rounds} rounds of {args.train_steps} "
        f"steps; rounds {min(train):.2f}-{max(train):.2f})"
    )
    for n in args.workers:
        rate = statistics.median(rates[n])
        print(
            f"loader: {what} ({len(dataset)} images) transform={args.transform} workers={n} "
            f"batch={args.batch_size}: {rate:.0f} images/s (rounds {min(rates[n]):.0f}-{max(rates[n]):.0f})"
            f" -> loader / training = {rate / trained:.1f}x (goal >= 2: "
            f"{'holds' if rate >= 2 * trained else 'FAILS'})",
            flush=True,
        )


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
    parser.add_argument(
        "--transform",
        default="model",
        choices=("model", "suite"),
        help="model: vtab.build_transform (--protocol, --augment); suite: the suite recipe's training "
        "transform (RandomResizedCrop + flip + Normalize)",
    )
    parser.add_argument("--train", default=None, metavar="METHOD", help="also measure training (e.g. lora)")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps per round")
    parser.add_argument("--train-warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds with --train")
    parser.add_argument("--num-classes", type=int, default=100, help="classifier size of the trained model")
    parser.add_argument("--device", default="cpu", help="where the trained model runs (cpu, cuda)")
    parser.add_argument("--amp", default="none", choices=("none", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    print(machine(device), flush=True)

    with torch.device("meta"):
        model = timm.create_model(args.model, pretrained=False)
    if args.transform == "suite":
        transform = vtab.build_transform(model, augment=True, crop="random_resized")
    else:
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
        label = "suite train transform" if args.transform == "suite" else f"protocol={args.protocol}"
        print(
            f"{what} -> {size[0]}x{size[1]} {label}: CPU cost {cost:.2f} ms/image "
            f"(one thread) = {1000 / cost:.0f} images/s per free core",
            flush=True,
        )
        if args.train is not None:
            side_by_side(dataset, args, device, what)
            return 0
        for workers in args.workers:
            rate = measure(dataset, args.batch_size, workers, args.passes)
            print(
                f"{what} ({len(dataset)} images, split {dataset.split}) -> {size[0]}x{size[1]} "
                f"{label}{'' if args.transform == 'suite' else f' augment={args.augment}'} workers={workers} "
                f"batch={args.batch_size}: {rate:.0f} images/s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
