"""The benchmark runner: every variant built on one backbone, timed interleaved, memory measured apart.

:func:`run_benchmark` builds every requested method on a fresh copy of the backbone, times the
training steps (forward + backward + ``on_after_backward`` + AdamW step) and inference of all
variants interleaved in one process (round-robin over repeats, median), so load on a shared machine
hits every method alike, and measures memory: by default its breakdown into weights, gradients,
optimizer state and activations with the step's peak (:func:`~.memory.memory_breakdown`: the CUDA
allocator, or the profiler's allocation events on CPU), or the older single peak (CUDA
``max_memory_allocated`` growth, or the growth of the peak RSS of a fresh child process on CPU).
Rows named ``NAME@compile`` run their training forward and inference through ``torch.compile``.
Callbacks receive every timing round and every finished row as soon as it is measured (the CLI
appends them to files).
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import is_mergeable, merge, method_of
from .flops import count_gmacs, count_gmacs_torch, example_batch, example_input
from .memory import measure_memory, memory_breakdown, memory_in_child
from .params import param_counts, stored_bytes
from .timing import make_inference, make_train_step, timed
from .variants import (
    BASE,
    build_variant,
    is_compiled,
    model_factory,
    reference_base,
    runnable,
    split_variant,
)

__all__ = ["BenchRow", "run_benchmark"]

logger = logging.getLogger(__name__)

MEMORY_MODES = ("breakdown", "child", "inprocess", "off")

#: ``on_round(index, {method: {'train'|'infer'|'merged': seconds per step}})``, once per timing round.
RoundCallback = Callable[[int, dict[str, dict[str, float]]], None]
#: ``on_row(row)``, once per row when it is final (summarised, memory measured).
RowCallback = Callable[["BenchRow"], None]


@dataclass
class BenchRow:
    """One benchmark row: counts, bytes, GMACs, medians of the timings, memory.

    ``peak_mem_mb``: training memory above the weights at the step's peak (see
    :class:`~.memory.MemoryBreakdown`; with ``memory='child'``/``'inprocess'`` the older peak growth);
    ``weights_mb`` .. ``activations_mb``: the breakdown (``memory='breakdown'`` only).
    ``infer_vs_base``: unmerged inference time over ``base``'s (the compiled ``base@compile`` for a
    compiled row): a method's inference overhead.

    ``train_times``, ``infer_times``, ``merged_times``: seconds per step, one per timing round, in
    round order (round ``i`` of every row ran back to back: their ratios are paired).
    """

    method: str
    trainable_params: int = 0
    method_params: int = 0
    head_params: int = 0
    stored_bytes: int | None = None
    stored_bytes_no_head: int | None = None
    gmacs: float | None = None
    gmacs_torch: float | None = None
    gmacs_merged: float | None = None
    gmacs_torch_merged: float | None = None
    train_ms: float | None = None
    train_img_per_s: float | None = None
    peak_mem_mb: float | None = None
    weights_mb: float | None = None
    gradients_mb: float | None = None
    optimizer_mb: float | None = None
    activations_mb: float | None = None
    infer_ms: float | None = None
    infer_vs_base: float | None = None
    infer_ms_merged: float | None = None
    mergeable: bool = False
    note: str = ""
    train_times: list[float] = field(default_factory=list, repr=False)
    infer_times: list[float] = field(default_factory=list, repr=False)
    merged_times: list[float] = field(default_factory=list, repr=False)


@dataclass
class _Built:
    row: BenchRow
    model: nn.Module
    merged: nn.Module | None = None


def _build(
    name: str,
    factory: Callable[[], nn.Module],
    options: dict[str, dict[str, Any]],
    device: torch.device,
    flops: bool,
    timed: bool = True,
) -> _Built:
    """Build variant ``name`` and fill its static columns: counts, bytes, GMACs (unmerged and merged).
    The merged copy is made when it is timed (``timed``) or counted (``flops``)."""
    model, note = build_variant(name, factory, options)
    model.to(device)
    counts = param_counts(model)
    row = BenchRow(
        method=name,
        trainable_params=counts["total"],
        method_params=counts["method"],
        head_params=counts["head"],
        note=note,
    )
    mergeable = method_of(model) is not None and is_mergeable(model)
    plain = split_variant(name)[0]
    row.mergeable = plain == BASE or mergeable
    if plain != BASE:
        row.stored_bytes, row.stored_bytes_no_head = stored_bytes(model)
    if flops:
        x1 = example_input(model, 1, device)
        row.gmacs = count_gmacs(model, x1)
        row.gmacs_torch = count_gmacs_torch(model, x1)
    built = _Built(row, model)
    if mergeable and (timed or flops):
        built.merged = merge(copy.deepcopy(model), unload=True).eval()
        if flops:
            row.gmacs_merged = count_gmacs(built.merged, x1)
            row.gmacs_torch_merged = count_gmacs_torch(built.merged, x1)
    logger.info("built %s: %s trainable", name, f"{counts['total']:,}")
    return built


def _time_interleaved(
    built: dict[str, _Built],
    batch: int,
    device: torch.device,
    amp: torch.dtype | None,
    warmup: int,
    repeats: int,
    steps: int,
    on_round: RoundCallback | None = None,
) -> None:
    """Append one timing per round to every row: train step (not ``base``), inference, merged inference."""
    x, y = example_batch(built[BASE].model, batch, device)
    forwards = {n: runnable(n, b.model) for n, b in built.items()}
    trainers = {
        n: make_train_step(b.model.train(), x, y, amp, forwards[n])
        for n, b in built.items()
        if split_variant(n)[0] != BASE
    }
    inferers = {n: make_inference(forwards[n], x, amp) for n, b in built.items()}
    merged = {
        n: make_inference(runnable(n, b.merged), x, amp) for n, b in built.items() if b.merged is not None
    }
    for fn in trainers.values():
        for _ in range(warmup):
            fn()
    for b in built.values():
        b.model.eval()
    for fn in list(inferers.values()) + list(merged.values()):
        for _ in range(warmup):
            fn()
    for r in range(repeats):
        times: dict[str, dict[str, float]] = {}
        for n, b in built.items():
            t = times[n] = {}
            if n in trainers:
                b.model.train()
                t["train"] = timed(trainers[n], steps, device)
                b.row.train_times.append(t["train"])
            b.model.eval()
            t["infer"] = timed(inferers[n], steps, device)
            b.row.infer_times.append(t["infer"])
            if n in merged:
                t["merged"] = timed(merged[n], steps, device)
                b.row.merged_times.append(t["merged"])
        logger.info("round %d/%d done", r + 1, repeats)
        if on_round is not None:
            on_round(r, times)


def _summarise(rows: dict[str, BenchRow], batch: int) -> None:
    """Medians of the per-round timings; a ``base`` row is its own merged model; each row's inference
    over its base's (:func:`~.variants.reference_base`)."""
    for row in rows.values():
        if row.train_times:
            row.train_ms = 1e3 * statistics.median(row.train_times)
            row.train_img_per_s = batch / (row.train_ms / 1e3)
        if row.infer_times:
            row.infer_ms = 1e3 * statistics.median(row.infer_times)
        if row.merged_times:
            row.infer_ms_merged = 1e3 * statistics.median(row.merged_times)
    for name, row in rows.items():
        base = rows.get(reference_base(name))
        if split_variant(name)[0] == BASE:
            row.infer_ms_merged = row.infer_ms
        elif base is not None and base.infer_ms and row.infer_ms is not None:
            row.infer_vs_base = row.infer_ms / base.infer_ms


def _breakdown_row(
    row: BenchRow,
    factory: Callable[[], nn.Module],
    spec: dict[str, Any],
    device: torch.device,
    amp: torch.dtype | None,
) -> None:
    """Fill ``row``'s memory breakdown and peak from one training step of a fresh build of it."""
    model = build_variant(row.method, factory, spec["options"])[0].to(device).train()
    x, y = example_batch(model, spec["batch"], device)
    step = make_train_step(model, x, y, amp, runnable(row.method, model))
    result = memory_breakdown(step, warmup_batch=None if is_compiled(row.method) else 1)
    row.weights_mb, row.gradients_mb = result.weights, result.gradients
    row.optimizer_mb, row.activations_mb = result.optimizer, result.activations
    row.peak_mem_mb = result.peak


def _measure_memory_rows(
    rows: dict[str, BenchRow],
    spec: dict[str, Any],
    factory: Callable[[], nn.Module],
    dev: torch.device,
    memory: str,
    on_row: RowCallback,
) -> None:
    """Memory of every row but the ``base`` ones in turn, each row handed to ``on_row`` once measured."""
    amp_dtype = getattr(torch, spec["amp"]) if spec["amp"] else None
    for name, row in rows.items():
        if split_variant(name)[0] != BASE and memory != "off":
            if memory == "breakdown":
                _breakdown_row(row, factory, spec, dev, amp_dtype)
            elif memory == "child" and dev.type == "cpu":
                row.peak_mem_mb = memory_in_child(spec, name)
            else:
                row.peak_mem_mb = measure_memory(
                    name, factory, spec["batch"], dev, amp_dtype, spec["options"]
                )
            logger.info("memory %s: %s", name, row.peak_mem_mb)
        on_row(row)


def run_benchmark(
    model_name: str,
    methods: Sequence[str],
    batch: int = 64,
    device: str = "cpu",
    num_classes: int = 100,
    model_kwargs: dict[str, Any] | None = None,
    pretrained_file: str | os.PathLike | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    steps: int = 3,
    amp: str | None = None,
    flops: bool = True,
    memory: str = "breakdown",
    on_round: RoundCallback | None = None,
    on_row: RowCallback | None = None,
) -> list[BenchRow]:
    """Benchmark ``methods`` (plus a ``base`` row) on one timm model with a ``num_classes`` head.

    Timings: each variant gets ``warmup`` steps, then ``repeats`` rounds; in each round every variant
    runs ``steps`` timed steps in turn (interleaved), and the median over rounds is reported.
    ``memory``: ``'breakdown'`` (weights, gradients, optimizer state, activations and the step's peak,
    :func:`~.memory.memory_breakdown`), ``'child'`` (peak RSS growth of a fresh process per method on
    CPU), ``'inprocess'`` or ``'off'``. ``repeats=0`` skips the timings.
    ``on_round`` gets each round's timings as the round ends, ``on_row`` each row once it is final
    (after its memory measurement), so a caller can keep them before the run is over.
    Progress goes to this module's logger.
    """
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory mode {memory!r} is not one of {', '.join(MEMORY_MODES)}")
    model_kwargs = dict(model_kwargs or {})
    options = options or {}
    dev = torch.device(device)
    amp_dtype = getattr(torch, amp) if amp else None
    pretrained_file = os.fspath(pretrained_file) if pretrained_file is not None else None
    factory = model_factory(model_name, num_classes, model_kwargs, pretrained_file)
    names = [BASE] + [m for m in methods if m != BASE]
    if repeats > 0:  # every variant in memory at once, timed interleaved
        built = {name: _build(name, factory, options, dev, flops) for name in names}
        _time_interleaved(built, batch, dev, amp_dtype, warmup, repeats, steps, on_round)
        rows = {name: b.row for name, b in built.items()}
        del built
    else:  # no timings: one variant in memory at a time
        rows = {name: _build(name, factory, options, dev, flops, timed=False).row for name in names}
    _summarise(rows, batch)
    spec = {
        "model": model_name,
        "num_classes": num_classes,
        "model_kwargs": model_kwargs,
        "pretrained_file": pretrained_file,
        "batch": batch,
        "device": device,
        "amp": amp,
        "options": options,
        "threads": torch.get_num_threads(),
    }
    _measure_memory_rows(rows, spec, factory, dev, memory, on_row or (lambda row: None))
    return list(rows.values())
