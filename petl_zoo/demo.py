"""The demo backbones: a small ViT (and a small Swin) pretrained on Fashion-MNIST, for real-image checks
offline on a CPU.

The repository ships the files the docs' real-data rows were measured with,
``demo/vit_tiny_fmnist32.safetensors`` and ``demo/swin_tiny_fmnist32.safetensors`` (see demo/README.md);
:func:`build_demo_backbone` trains one like them from scratch (``python tools/build_demo_backbone.py
[--arch swin]``). The ViT:

- model: timm ``vit_tiny_patch16_224`` with ``img_size=32, patch_size=4, depth=6`` (width 192, 3 heads,
  64 patch tokens + class token, 10 classes, 2.7 M parameters);
- data: the 60,000 Fashion-MNIST training images, 28x28 gray, zero-padded to 32x32, replicated to RGB,
  normalised with mean = std = 0.5, random horizontal flips;
- optimisation: AdamW (lr 1e-3, torch's betas, weight decay 0.01), one-cycle schedule stepped per batch,
  batch 64, 5 epochs, seed 0, no dropout or drop-path.

The Swin (``--arch swin``, for the methods whose Swin form differs, e.g. VPT's per-window prompts) is
timm ``swin_tiny_patch4_window7_224`` with ``img_size=32, patch_size=2, window_size=4, embed_dim=48,
depths=(2, 2, 2), num_heads=(3, 6, 12)`` (16x16, 8x8 and 4x4 token grids, 1.27 M parameters), trained
on the same data with the same recipe.

The images come from the idx files (gzip or not) in ``--fmnist DIR`` (torchvision's ``raw`` layout, or
Debian's ``dataset-fashion-mnist`` package), else from the first default folder that holds them, else
torchvision downloads them. The held-out accuracy is measured on the test split (``t10k`` files) when
present, else on the last twelfth of the training split (not trained on). On a CPU the run is
deterministic for a given seed, torch version and thread count. The result is written atomically.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .io import atomic_write, sha256_file
from .train.errors import UserError

__all__ = [
    "DEMO_ARCHS",
    "DEMO_FILE",
    "DEMO_KWARGS",
    "DEMO_MODEL",
    "DemoArch",
    "DemoBuild",
    "DemoRecipe",
    "FashionMnist",
    "build_demo_backbone",
    "create_demo_model",
    "demo_arch",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "main",
    "read_idx",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoArch:
    """One demo backbone: the timm model, its options and where a clone keeps the shipped file
    (relative to the repository root)."""

    model: str
    model_kwargs: dict[str, Any]
    file: str


#: The demo backbones by ``--arch``: the ViT behind the docs' real-data rows and a Swin for the methods
#: whose Swin form differs (VPT's per-stage, per-window prompts), both 32 px and pretrained alike.
DEMO_ARCHS: dict[str, DemoArch] = {
    "vit": DemoArch(
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 4, "depth": 6},
        "demo/vit_tiny_fmnist32.safetensors",
    ),
    "swin": DemoArch(
        "swin_tiny_patch4_window7_224",
        {
            "img_size": 32,
            "patch_size": 2,
            "window_size": 4,
            "embed_dim": 48,
            "depths": (2, 2, 2),
            "num_heads": (3, 6, 12),
        },
        "demo/swin_tiny_fmnist32.safetensors",
    ),
}
#: The ViT demo backbone (the default ``--arch``).
DEMO_FILE = DEMO_ARCHS["vit"].file
DEMO_MODEL = DEMO_ARCHS["vit"].model
DEMO_KWARGS: dict[str, Any] = DEMO_ARCHS["vit"].model_kwargs
NUM_CLASSES = 10
#: Debian's ``dataset-fashion-mnist`` package and torchvision's layout under the project's ``data/``.
DEFAULT_DIRS = ("data/FashionMNIST/raw", "/usr/share/datasets/fashion-mnist")
#: The folder torchvision downloads into when no local copy is found (``ROOT/FashionMNIST/raw``).
DOWNLOAD_ROOT = "data"
TORCHVISION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: Without the test split, the last ``1 / HOLDOUT_DIVISOR`` of the training images is held out (5,000).
HOLDOUT_DIVISOR = 12


@dataclass(frozen=True)
class DemoRecipe:
    """How the demo backbone is trained; the defaults are the shipped file's recipe."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    #: timm options over the architecture's (tests use a tiny model: ``depth=1, embed_dim=16``).
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: train on the first N training images only (a quick check of the speed); None: all of them.
    train_limit: int | None = None
    #: which of :data:`DEMO_ARCHS`
    arch: str = "vit"


@dataclass(frozen=True)
class FashionMnist:
    """Fashion-MNIST as uint8 images ``[N, 28, 28]`` and int64 labels; test tensors are None when the
    folder has no ``t10k`` files."""

    folder: Path
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor | None
    test_labels: Tensor | None


@dataclass(frozen=True)
class DemoBuild:
    """What :func:`build_demo_backbone` wrote and measured."""

    path: Path
    sha256: str
    accuracy: float
    eval_split: str
    eval_images: int
    train_images: int
    epochs: int
    seconds: float
    images_per_second: float


def read_idx(path: str | os.PathLike) -> Tensor:
    """An idx file of unsigned bytes (gzip-compressed when it ends in ``.gz``) as a uint8 tensor."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    ndim = data[3] if len(data) >= 4 else 0
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= ndim <= 4:
        raise UserError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex() or 'none'})")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    if len(data) != start + math.prod(dims):
        raise UserError(f"{path} is truncated: {len(data) - start} bytes of data for shape {dims}")
    return torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8).view(*dims)


def _candidates(folder: Path) -> list[Path]:
    """The folders under ``folder`` that may hold the idx files (torchvision's layouts too)."""
    return [folder, folder / "raw", folder / "FashionMNIST" / "raw"]


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(dirs: Sequence[str | os.PathLike]) -> tuple[Path | None, list[Path]]:
    """``(the first folder holding the training idx files, every folder looked in)``."""
    looked: list[Path] = []
    for base in dirs:
        for folder in _candidates(Path(base).expanduser()):
            looked.append(folder)
            if all(_find_file(folder, _FILES[k]) for k in ("train_images", "train_labels")):
                return folder, looked
    return None, looked


def _not_found(looked: Sequence[Path], download_note: str) -> UserError:
    names = f"{_FILES['train_images']}[.gz] and {_FILES['train_labels']}[.gz]"
    return UserError(
        f"Fashion-MNIST not found: no {names} in {', '.join(map(str, looked))}; give --fmnist DIR "
        f"(torchvision's raw idx files, or install Debian's dataset-fashion-mnist){download_note}"
    )


def _download(root: Path, looked: Sequence[Path]) -> Path:
    """torchvision's ``FashionMNIST(download=True)`` into ``root``; its raw folder."""
    from torchvision.datasets import FashionMNIST

    log.info("downloading Fashion-MNIST with torchvision into %s (%s)", root, TORCHVISION_URL)
    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as err:  # noqa: BLE001 - urllib, socket and torchvision errors alike
        reason = " ".join(str(err).split())[:200]
        note = f"; downloading from {TORCHVISION_URL} failed ({type(err).__name__}: {reason})"
        raise _not_found(looked, note) from None
    return root / "FashionMNIST" / "raw"


def _read_split(folder: Path, images: str, labels: str) -> tuple[Tensor, Tensor] | None:
    image_file, label_file = _find_file(folder, _FILES[images]), _find_file(folder, _FILES[labels])
    if image_file is None or label_file is None:
        return None
    x, y = read_idx(image_file), read_idx(label_file)
    if x.dim() != 3 or tuple(x.shape[1:]) != (28, 28) or y.dim() != 1 or len(x) != len(y):
        raise UserError(
            f"{image_file} / {label_file}: expected [N, 28, 28] images and N labels, "
            f"got {list(x.shape)} and {list(y.shape)}"
        )
    if len(y) and int(y.max()) >= NUM_CLASSES:
        raise UserError(f"{label_file}: label {int(y.max())} is not a Fashion-MNIST class (0-9)")
    return x, y.long()


def load_fashion_mnist(
    fmnist: str | os.PathLike | None = None,
    download: bool = True,
    download_root: str | os.PathLike = DOWNLOAD_ROOT,
) -> FashionMnist:
    """Fashion-MNIST from ``fmnist`` (only there), else from :data:`DEFAULT_DIRS`, else downloaded by
    torchvision into ``download_root`` when ``download``; a one-line UserError when it is nowhere."""
    folder, looked = find_fashion_mnist([fmnist] if fmnist is not None else DEFAULT_DIRS)
    if folder is None and fmnist is None and download:
        folder = _download(Path(download_root), looked)
    if folder is None:
        note = (
            "" if fmnist is not None else f", or go online so torchvision downloads it from {TORCHVISION_URL}"
        )
        raise _not_found(looked, note)
    train = _read_split(folder, "train_images", "train_labels")
    assert train is not None  # found above
    test = _read_split(folder, "test_images", "test_labels")
    log.info(
        "Fashion-MNIST from %s: %d training images, %s",
        folder,
        len(train[0]),
        f"{len(test[0])} test images" if test else "no test split",
    )
    return FashionMnist(folder, *train, *(test if test else (None, None)))


def demo_arch(arch: str) -> DemoArch:
    """:data:`DEMO_ARCHS`' entry ``arch``; one UserError line naming the valid ones otherwise."""
    if arch not in DEMO_ARCHS:
        raise UserError(f"unknown demo architecture {arch!r}; valid: {', '.join(DEMO_ARCHS)}")
    return DEMO_ARCHS[arch]


def create_demo_model(arch: str = "vit", **overrides: Any) -> nn.Module:
    """A demo architecture, randomly initialised (seed torch first); ``overrides`` change timm options."""
    import timm

    spec = demo_arch(arch)
    return timm.create_model(spec.model, num_classes=NUM_CLASSES, **{**spec.model_kwargs, **overrides})


def _inputs(images: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """uint8 ``[B, 28, 28]`` -> the normalised ``[B, 3, size, size]`` input (flipped where ``flip``)."""
    x = images.float().div_(255.0)
    if flip is not None:
        x = torch.where(flip[:, None, None], x.flip(-1), x)
    before = (size - x.shape[-1]) // 2
    after = size - x.shape[-1] - before
    x = F.pad(x, (before, after, before, after))  # zero = the black background
    return x.sub_(0.5).div_(0.5).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _input_size(model: nn.Module) -> int:
    size = model.patch_embed.img_size
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    if side < 28:
        raise UserError(f"the demo model's img_size {side} is below Fashion-MNIST's 28")
    return side


@torch.inference_mode()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, size: int, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(_inputs(images[i : i + batch], size))
        correct += int((logits.argmax(-1) == labels[i : i + batch]).sum())
    return correct / max(1, len(images))


def _train(model: nn.Module, images: Tensor, labels: Tensor, recipe: DemoRecipe) -> float:
    """Train ``model`` in place with ``recipe``; returns the training images per second."""
    size, n, batch = _input_size(model), len(images), recipe.batch_size
    steps = math.ceil(n / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps)
    gen = torch.Generator().manual_seed(recipe.seed)
    start, seen = time.perf_counter(), 0
    every = max(1, steps // 10)
    for epoch in range(recipe.epochs):
        model.train()
        order, total = torch.randperm(n, generator=gen), 0.0
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            loss = F.cross_entropy(model(_inputs(images[idx], size, flip)), labels[idx])
            if not torch.isfinite(loss):
                raise UserError(
                    f"the loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; lower the lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen, total = seen + len(idx), total + loss.item()
            if (step + 1) % every == 0 or step + 1 == steps:
                rate = seen / max(time.perf_counter() - start, 1e-9)
                log.info(
                    "epoch %d/%d step %d/%d: loss %.4f, %.0f img/s",
                    epoch + 1,
                    recipe.epochs,
                    step + 1,
                    steps,
                    total / (step + 1),
                    rate,
                )
    return seen / max(time.perf_counter() - start, 1e-9)


def _split(data: FashionMnist, limit: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """(train images, labels, eval images, labels, the eval split's name)."""
    x, y = data.train_images, data.train_labels
    if data.test_images is not None and data.test_labels is not None:
        ex, ey, split = data.test_images, data.test_labels, "the Fashion-MNIST test split"
    else:
        hold = max(1, len(x) // HOLDOUT_DIVISOR)
        if len(x) <= hold:
            raise UserError(f"{data.folder} holds {len(x)} training image(s) and no test split: too few")
        x, y, ex, ey = x[:-hold], y[:-hold], x[-hold:], y[-hold:]
        split = f"a held-out slice of the training split (its last {hold} images, not trained on)"
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y, ex, ey, split


def _save(model: nn.Module, out: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def build_demo_backbone(
    out: str | os.PathLike,
    fmnist: str | os.PathLike | None = None,
    recipe: DemoRecipe | None = None,
    download: bool = True,
    download_root: str | os.PathLike = DOWNLOAD_ROOT,
) -> DemoBuild:
    """Train the demo backbone on Fashion-MNIST with ``recipe`` (the shipped file's by default), write
    it to ``out`` as ``.safetensors`` (atomically) and measure its held-out accuracy."""
    recipe = recipe or DemoRecipe()
    if (
        recipe.epochs < 1
        or recipe.batch_size < 1
        or (recipe.train_limit is not None and recipe.train_limit < 1)
    ):
        raise UserError(f"epochs, batch size and train limit must be positive, got {recipe}")
    spec = demo_arch(recipe.arch)
    data = load_fashion_mnist(fmnist, download=download, download_root=download_root)
    x, y, ex, ey, split = _split(data, recipe.train_limit)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = create_demo_model(recipe.arch, **recipe.model_kwargs)
    kwargs = {**spec.model_kwargs, **recipe.model_kwargs}
    log.info("training %s %s on %d images: %s", spec.model, kwargs, len(x), recipe)
    start = time.perf_counter()
    rate = _train(model, x, y, recipe)
    accuracy = _accuracy(model, ex, ey, _input_size(model))
    seconds = time.perf_counter() - start
    about = {
        "model": spec.model,
        "model_kwargs": kwargs,
        "num_classes": NUM_CLASSES,
        "recipe": asdict(recipe),
        "heldout_accuracy": round(accuracy, 4),
        "heldout_split": split,
    }
    # one metadata key: safetensors writes the metadata map in no fixed order, so several keys would
    # give different bytes for the same weights
    meta = {"petl_zoo_demo": json.dumps(about)}
    path = _save(model, Path(out), meta)
    build = DemoBuild(path, sha256_file(path), accuracy, split, len(ex), len(x), recipe.epochs, seconds, rate)
    log.info(
        "held-out accuracy %.1f %% on %s (%d images); %d epoch(s) trained and evaluated in %.0f s (training %.0f img/s)",
        100 * accuracy,
        split,
        len(ex),
        recipe.epochs,
        seconds,
        rate,
    )
    log.info("wrote %s (sha256 %s)", path, build.sha256)
    return build


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``tools/build_demo_backbone.py``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    d = DemoRecipe()
    p.add_argument(
        "--arch", default="vit", choices=sorted(DEMO_ARCHS), help="which demo backbone (default vit)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="the .safetensors to write (default runs/demo/<shipped name>_rebuilt.safetensors; the shipped "
        + " and ".join(a.file for a in DEMO_ARCHS.values())
        + ")",
    )
    p.add_argument("--fmnist", metavar="DIR", help="a folder with the Fashion-MNIST idx files (gzip or not)")
    p.add_argument("--no-download", action="store_true", help="never download (offline)")
    p.add_argument("--download-root", default=DOWNLOAD_ROOT, help="where torchvision downloads to")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-limit", type=int, metavar="N", help="train on the first N images (a speed check)")
    p.add_argument("--threads", type=int, help="torch CPU threads (the same count gives the same file)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``tools/build_demo_backbone.py``: progress and the result on stderr; a user error is one line."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = DemoRecipe(
        args.epochs,
        args.batch_size,
        args.lr,
        args.weight_decay,
        args.seed,
        train_limit=args.train_limit,
        arch=args.arch,
    )
    out = args.out or f"runs/demo/{Path(DEMO_ARCHS[args.arch].file).stem}_rebuilt.safetensors"
    try:
        build_demo_backbone(out, args.fmnist, recipe, not args.no_download, args.download_root)
    except (UserError, OSError) as err:
        log.error("error: %s", " ".join(str(err).split()))
        return 2 if isinstance(err, UserError) else 1
    return 0
