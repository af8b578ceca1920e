"""Training memory of one variant: its breakdown, or the CUDA allocator peak / peak RSS growth.

:func:`memory_breakdown` splits one training step's memory into weights, gradients, optimizer state
and activations (what the forward leaves allocated for the backward), plus the step's peak, from the
allocator: ``torch.cuda`` statistics on a GPU, the profiler's allocation events on the CPU (so it is
exact in a long-lived process, unlike the RSS). :func:`measure_memory` (and :func:`memory_in_child`) is
the older single figure: the peak growth of the allocator (CUDA) or of the RSS (CPU, fresh process).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .flops import example_batch
from .timing import TrainStep, make_train_step
from .variants import build_variant, model_factory

__all__ = ["MemoryBreakdown", "memory_breakdown", "measure_memory", "memory_in_child"]

logger = logging.getLogger(__name__)

MB = 2**20
_FORWARD = "petl_zoo::forward"


@dataclass(frozen=True)
class MemoryBreakdown:
    """One training step's memory in MB (2**20 bytes).

    ``weights``: every parameter and buffer of the model (frozen and trained, adapters included);
    ``gradients``: the trained parameters' gradients; ``optimizer``: AdamW's state; ``activations``: what
    the forward leaves allocated for the backward (saved tensors, the loss; with gradient checkpointing
    only the checkpointed blocks' inputs); ``peak``: the most the step held above the weights (optimizer
    state, plus activations, gradients and temporaries at the step's high point).
    """

    weights: float
    gradients: float
    optimizer: float
    activations: float
    peak: float


def _tensor_bytes(tensors: Any) -> int:
    """Bytes of ``tensors``, each storage counted once (tied or shared tensors are not repeated)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
    return sum(seen.values())


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _tensor_bytes(v for state in optimizer.state.values() for v in state.values())


def _cuda_step(step: TrainStep, device: torch.device) -> tuple[int, int]:
    """``(activations, peak above the memory before the step)`` in bytes from the CUDA allocator."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss = step.forward()
    torch.cuda.synchronize(device)
    activations = torch.cuda.memory_allocated(device) - before
    step.finish(loss)
    torch.cuda.synchronize(device)
    return activations, torch.cuda.max_memory_allocated(device) - before


def _cpu_step(step: TrainStep) -> tuple[int, int]:
    """``(activations, peak above the memory before the step)`` in bytes, from the profiler's CPU
    allocation events: their running sum at the end of the forward, and its maximum over the step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function(_FORWARD):
            loss = step.forward()
        step.finish(loss)
    events = prof.profiler.kineto_results.events()
    forward_end = max(e.end_ns() for e in events if e.name() == _FORWARD)
    allocations = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    held = peak = 0
    activations = None
    for start, nbytes in allocations:
        if activations is None and start > forward_end:
            activations = held
        held += nbytes
        peak = max(peak, held)
    return held if activations is None else activations, peak


def memory_breakdown(step: TrainStep, warmup: int = 1, warmup_batch: int | None = None) -> MemoryBreakdown:
    """The memory of one training step of ``step`` after ``warmup`` steps (which create the optimizer
    state): see :class:`MemoryBreakdown`. CUDA: the allocator's statistics; CPU: the profiler's
    allocation events (memory that a library allocates outside torch's allocator is not seen).
    ``warmup_batch``: run the warmup steps on the first that many samples only (cheaper; not for a
    compiled forward, which would compile the measured step's shapes during the measurement)."""
    x, y = step.x, step.y
    if warmup_batch is not None:
        step.x, step.y = x[:warmup_batch], y[:warmup_batch]
    try:
        for _ in range(warmup):
            step()
    finally:
        step.x, step.y = x, y
    device = step.x.device
    if device.type == "cuda":
        activations, growth = _cuda_step(step, device)
    else:
        activations, growth = _cpu_step(step)
    model = step.model
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer_bytes(step.optimizer)
    return MemoryBreakdown(
        weights=_tensor_bytes([*model.parameters(), *model.buffers()]) / MB,
        gradients=_tensor_bytes(trained) / MB,
        optimizer=optimizer / MB,
        activations=activations / MB,
        peak=(optimizer + growth) / MB,
    )


def _rss_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(
    name: str,
    factory: Callable[[], nn.Module],
    batch: int,
    device: torch.device,
    amp: torch.dtype | None,
    options: dict[str, dict[str, Any]] | None = None,
    steps: int = 3,
) -> float:
    """Peak memory growth (MB) of training steps of ``name`` over the model at rest.

    CUDA: ``max_memory_allocated`` during the steps minus what was allocated before (activations,
    gradients, optimizer state). CPU: growth of the peak RSS (Linux ``VmHWM``, reset first) over the RSS
    before the steps; honest only in a fresh process (freed memory stays in the allocator), which is
    what :func:`memory_in_child` gives.
    """
    model, _ = build_variant(name, factory, options)
    model.to(device).train()
    x, y = example_batch(model, batch, device)
    step = make_train_step(model, x, y, amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _reset_peak_rss()
    before = _rss_kb("VmRSS")
    for _ in range(steps):
        step()
    return max(0, _rss_kb("VmHWM") - before) / 1024


def child_memory(spec: dict[str, Any], name: str) -> float:
    """:func:`measure_memory` for the JSON ``spec`` that :func:`memory_in_child` passes (in the child)."""
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    factory = model_factory(
        spec["model"], spec["num_classes"], spec["model_kwargs"], spec.get("pretrained_file")
    )
    amp = getattr(torch, spec["amp"]) if spec.get("amp") else None
    return measure_memory(name, factory, spec["batch"], torch.device(spec["device"]), amp, spec["options"])


def memory_in_child(spec: dict[str, Any], name: str) -> float | None:
    """Peak memory growth of ``name`` measured in a fresh Python process; None (logged) if it fails.

    ``spec``: ``model``, ``num_classes``, ``model_kwargs``, ``pretrained_file``, ``batch``, ``device``,
    ``amp`` (a torch dtype name or None), ``options`` and ``threads``.
    """
    code = (
        "import json,sys; from petl_zoo.accounting.memory import child_memory; "
        "print('PEAKMB', child_memory(json.loads(sys.argv[1]), sys.argv[2]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec), name], capture_output=True, text=True, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PEAKMB "):
            return float(line.split()[1])
    logger.warning("memory child for %s failed:\n%s", name, proc.stderr[-2000:])
    return None
