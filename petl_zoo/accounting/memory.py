"""Peak training memory of one variant: CUDA allocator peak, or peak RSS growth in a fresh process on CPU."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .flops import example_input
from .timing import make_train_step
from .variants import build_variant, model_factory

__all__ = ["measure_memory", "memory_in_child"]

logger = logging.getLogger(__name__)


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
    x = example_input(model, batch, device)
    y = torch.randint(0, max(1, int(getattr(model, "num_classes", 2))), (batch,), device=device)
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
