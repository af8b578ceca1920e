"""Throughput of mixed-adapter batches (``tools/bench_multi_adapter.py`` is its command line).

``N`` adapters of one method (random tensors, VTAB-1K's class counts: task ``i`` has the head of the
``i``-th VTAB-1K task) are saved into folders and loaded onto one backbone with
:func:`~petl_zoo.multi.load_adapters`. A batch of ``B`` images whose samples cycle over the ``N``
adapters (shuffled) is classified three ways, and two references are timed alongside:

- ``mixed``: ``model(x, adapter_names=names)``, one routed forward (or grouped, for methods that
  cannot route: :meth:`~petl_zoo.multi.MultiAdapterModel.routing` is reported);
- ``one_at_a_time``: what serving without mixed batches does: the batch sorted by task, then one
  forward of each adapter's own model over its samples;
- ``single``: the whole batch through one adapter's model (a one-task batch, unmerged: ``N``-free);
- ``frozen``: the backbone alone (a merged LoRA's cost, ``N``-free).

The timings run interleaved (every round times every variant once, in a shuffled order: the CPU is
shared) after one warm-up round, under ``torch.no_grad``; each is reported as the median images/s over
the rounds, by the wall clock and by the process's CPU time (steadier on a shared machine with one torch
thread), and the ratios as the median of the per-round ratios.
"""

from __future__ import annotations

import logging
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..api import adapter_state_dict, create, save_adapter
from .model import MultiAdapterModel, load_adapters
from .shared import share_backbone

__all__ = [
    "PROXY_MODEL",
    "PROXY_KWARGS",
    "VTAB_CLASSES",
    "make_adapters",
    "mixed_names",
    "run_benchmark",
    "format_report",
]

logger = logging.getLogger(__name__)

#: The proxy ViT's architecture (the demo backbone's: demo/README.md).
PROXY_MODEL = "vit_tiny_patch16_224"
PROXY_KWARGS: dict[str, Any] = {"img_size": 32, "patch_size": 4, "depth": 6}
#: The class counts of the 19 VTAB-1K tasks, in the registry's order (vtab.tasks).
VTAB_CLASSES = (100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9)


def make_adapters(
    model: nn.Module, method: str, count: int, root: Path, options: dict[str, Any], seed: int = 0
) -> dict[str, Path]:
    """``count`` adapters of ``method`` for ``model`` with random tensors (not their init: a LoRA ``B`` of
    zeros would be a special case), saved under ``root``: name -> folder."""
    folders = {}
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        shell = share_backbone(model)  # the method and a head of its own on the shared backbone
        shell.reset_classifier(VTAB_CLASSES[i % len(VTAB_CLASSES)])
        create(method, shell, **options)
        with torch.no_grad():
            for tensor in adapter_state_dict(shell).values():
                if tensor.is_floating_point():
                    tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator).to(tensor))
        folders[f"task{i:02d}"] = save_adapter(shell, root / f"task{i:02d}")
    return folders


def mixed_names(names: list[str], batch: int, seed: int = 0) -> list[str]:
    """``batch`` sample names cycling over ``names`` (each used ``batch / len(names)`` times, +-1), in
    a shuffled order."""
    order = [names[i % len(names)] for i in range(batch)]
    random.Random(seed).shuffle(order)
    return order


def _one_at_a_time(multi: MultiAdapterModel, x: torch.Tensor, names: list[str]) -> None:
    for name in dict.fromkeys(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        multi.adapter_model(name)(x[rows])


def _variants(
    multi_by_n: dict[int, tuple[MultiAdapterModel, list[str]]], base: nn.Module, x: torch.Tensor
) -> dict[str, Callable[[], Any]]:
    jobs: dict[str, Callable[[], Any]] = {"frozen": lambda: base(x)}
    largest = max(multi_by_n)
    one = multi_by_n[largest][0]
    jobs["single"] = lambda: one(x, adapter_names=one.adapter_names[0])
    for n, (multi, names) in multi_by_n.items():
        jobs[f"mixed/N={n}"] = lambda multi=multi, names=names: multi(x, adapter_names=names)
        jobs[f"one_at_a_time/N={n}"] = lambda multi=multi, names=names: _one_at_a_time(multi, x, names)
    return jobs


def _time_rounds(
    jobs: dict[str, Callable[[], Any]], rounds: int, seed: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per call of every job, ``rounds`` interleaved rounds after one
    warm-up round. On a shared machine with one torch thread the CPU time is the steadier measure: it
    leaves out the time other processes hold the core."""
    wall: dict[str, list[float]] = {name: [] for name in jobs}
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    shuffle = random.Random(seed)
    with torch.no_grad():
        for name in jobs:
            jobs[name]()  # warm-up: routed model built, factors cached
        for r in range(rounds):
            order = list(jobs)
            shuffle.shuffle(order)
            for name in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                jobs[name]()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            logger.info("round %d/%d done", r + 1, rounds)
    return wall, cpu


def run_benchmark(
    model_name: str,
    model_kwargs: dict[str, Any],
    *,
    method: str = "lora",
    options: dict[str, Any] | None = None,
    counts: tuple[int, ...] = (1, 4, 19),
    batch: int = 64,
    rounds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Images/s of every variant (module docstring) for every ``N`` in ``counts`` on ``model_name``
    (random weights, ``timm.create_model(model_name, **model_kwargs)``), with per-round ratios."""
    torch.manual_seed(seed)
    base = timm.create_model(model_name, pretrained=False, num_classes=VTAB_CLASSES[0], **model_kwargs).eval()
    size = model_kwargs.get("img_size", base.pretrained_cfg["input_size"][-1])
    x = torch.randn(batch, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(base, method, max(counts), Path(tmp), options or {}, seed)
        multi_by_n = {}
        for n in counts:
            chosen = dict(list(folders.items())[:n])
            multi = load_adapters(share_backbone(base, include_head=True), chosen)
            multi_by_n[n] = (multi, mixed_names(list(chosen), batch, seed))
    jobs = _variants(multi_by_n, base, x)
    wall, cpu = _time_rounds(jobs, rounds, seed)
    result = _summary(wall, cpu, multi_by_n, batch)
    result.update(model=model_name, model_kwargs=model_kwargs, method=method, options=options or {})
    return {**result, "rounds": rounds, "threads": torch.get_num_threads(), "torch": torch.__version__}


def _ratios(times: dict[str, list[float]], counts: list[int]) -> dict[str, float]:
    """Per ``N``: the median over rounds of (time of the other variant) / (time of ``mixed``)."""
    ratios = {}
    for n in counts:
        mixed = times[f"mixed/N={n}"]
        for other in (f"one_at_a_time/N={n}", "single", "frozen"):
            key = f"mixed/N={n} vs {other.split('/')[0]}"
            ratios[key] = statistics.median(o / m for m, o in zip(mixed, times[other]))
    return ratios


def _summary(
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    multi_by_n: dict[int, tuple[MultiAdapterModel, list[str]]],
    batch: int,
) -> dict[str, Any]:
    counts = list(multi_by_n)
    routing = {str(n): sorted(set(multi.routing().values())) for n, (multi, _) in multi_by_n.items()}
    return {
        "batch": batch,
        "images_per_s": {name: batch / statistics.median(t) for name, t in wall.items()},
        "images_per_cpu_s": {name: batch / statistics.median(t) for name, t in cpu.items()},
        "speed_ratios": _ratios(wall, counts),
        "cpu_speed_ratios": _ratios(cpu, counts),
        "routing": routing,
        "machine": platform.processor() or platform.machine(),
    }


def format_report(result: dict[str, Any]) -> str:
    """The result as a small text table: images/s per variant (wall clock and process CPU time), then
    the speed ratios (> 1: mixed is faster)."""
    lines = [
        f"{result['model']} {result['model_kwargs']}, method {result['method']} {result['options']}, "
        f"batch {result['batch']}, {result['rounds']} rounds, {result['threads']} threads, torch {result['torch']}",
        f"routing: {result['routing']}",
        f"{'variant':<24} {'images/s':>10} {'images/cpu-s':>13}",
    ]
    cpu = result["images_per_cpu_s"]
    lines += [
        f"{name:<24} {value:>10.2f} {cpu[name]:>13.2f}" for name, value in result["images_per_s"].items()
    ]
    lines.append(f"{'speed ratio (> 1: mixed is faster)':<36} {'wall':>6} {'cpu':>6}")
    cpu_ratios = result["cpu_speed_ratios"]
    lines += [
        f"{name:<36} {value:>6.2f} {cpu_ratios[name]:>6.2f}" for name, value in result["speed_ratios"].items()
    ]
    return "\n".join(lines)
