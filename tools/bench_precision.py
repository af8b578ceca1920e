"""Cost of float32 method tensors on a bf16 host (issue 25): step time and memory against all-bf16.

    python tools/bench_precision.py [--model vit_small_patch16_224 --img-size 112 --batch 8
                                     --methods lora,adapter,ssf --rounds 20 --device cpu]

Per method, two variants of the same bf16 backbone: ``fp32`` (``create(..., adapter_dtype=None)``, the
default: float32 method tensors cast to bf16 inside the forward) and ``bf16`` (``adapter_dtype=
torch.bfloat16``, the former all-bf16 behaviour). Training steps (forward, cross-entropy, backward,
AdamW: :func:`petl_zoo.accounting.timing.make_train_step`) are timed one at a time, interleaved
(``fp32``, ``bf16``, ``fp32``, ... ``--rounds`` each; the median per variant), so that load on a shared
machine hits both alike. Memory: peak growth over the model at rest (CUDA allocator peak, or peak RSS growth in a
fresh process on CPU, as :mod:`petl_zoo.accounting.memory`), plus the exact bytes of the method's
tensors, their gradients and AdamW's two moments. Also counts the entries of the method's tensors that
a few AdamW steps at lr 1e-5 change, after one step at lr 1e-2 (the issue's measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

import torch
from torch import nn

import petl_zoo
from petl_zoo.accounting.flops import example_input
from petl_zoo.accounting.timing import make_train_step, timed
from petl_zoo.layers import PetlModule

VARIANTS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def build(args: argparse.Namespace, method: str, variant: str, device: torch.device) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=args.img_size, num_classes=10, drop_path_rate=0.0)
    model.to(device=device, dtype=torch.bfloat16)
    return petl_zoo.create(method, model, adapter_dtype=VARIANTS[variant]).train()


def batch(model: nn.Module, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = example_input(model, size).to(device=device, dtype=torch.bfloat16)
    return x, torch.randint(0, 10, (size,), generator=g).to(device)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the method's trainable tensors, their gradients and AdamW's two moments."""
    own = {id(p) for m in model.modules() if isinstance(m, PetlModule) for p in m.parameters()}
    return sum(
        4 * p.numel() * p.element_size() for p in model.parameters() if id(p) in own and p.requires_grad
    )


def peak_mb(args: argparse.Namespace, method: str, variant: str, device: torch.device) -> float:
    """Peak memory growth (MB) of ``--steps`` training steps over the model at rest."""
    model = build(args, method, variant, device)
    x, y = batch(model, args.batch, device)
    step = make_train_step(model, x, y, None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    for _ in range(args.steps):
        step()
    return max(0, _status_kb("VmHWM") - before) / 1024


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_in_child(args: argparse.Namespace, method: str, variant: str) -> float | None:
    """:func:`peak_mb` in a fresh process (freed CPU memory stays with the allocator)."""
    argv = [sys.executable, __file__, "--child", json.dumps([method, variant]), *_forwarded(args)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAKMB "):
            return float(line.split()[1])
    print(proc.stderr[-2000:], file=sys.stderr)
    return None


def _forwarded(args: argparse.Namespace) -> list[str]:
    keys = ("model", "img_size", "batch", "steps", "device", "threads")
    return [part for k in keys for part in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def moved_fraction(args: argparse.Namespace, method: str, variant: str, device: torch.device) -> float:
    """Share of the method's trainable entries that 3 AdamW steps at lr 1e-5 change (after one at 1e-2)."""
    model = build(args, method, variant, device)
    params = [
        p for m in model.modules() if isinstance(m, PetlModule) for p in m.parameters() if p.requires_grad
    ]
    x, y = batch(model, 2, device)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    before: list[torch.Tensor] = []
    for i in range(4):
        if i == 1:
            for group in opt.param_groups:
                group["lr"] = 1e-5
            before = [p.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    return changed / max(1, sum(p.numel() for p in params))


def measure(args: argparse.Namespace, method: str) -> dict[str, Any]:
    device = torch.device(args.device)
    models = {v: build(args, method, v, device) for v in VARIANTS}
    steps = {v: make_train_step(m, *batch(m, args.batch, device), None) for v, m in models.items()}
    for step in steps.values():  # warm up both
        step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v, step in steps.items():
            times[v].append(timed(step, 1, device))
    row: dict[str, Any] = {"method": method}
    for v in VARIANTS:
        row[f"step_s_{v}"] = statistics.median(times[v])
        row[f"state_mb_{v}"] = state_bytes(models[v]) / 2**20
    del models, steps
    for v in VARIANTS:
        row[f"peak_mb_{v}"] = (
            peak_mb(args, method, v, device) if device.type == "cuda" else peak_in_child(args, method, v)
        )
        row[f"moved_{v}"] = moved_fraction(args, method, v, device)
    row["time_ratio"] = row["step_s_fp32"] / row["step_s_bf16"]
    if row["peak_mb_fp32"] and row["peak_mb_bf16"]:
        row["peak_ratio"] = row["peak_mb_fp32"] / row["peak_mb_bf16"]
    return row


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--methods", default="lora,adapter,ssf")
    p.add_argument("--rounds", type=int, default=20, help="interleaved timed steps per variant (median)")
    p.add_argument("--steps", type=int, default=3, help="training steps of each memory run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        method, variant = json.loads(args.child)
        print("PEAKMB", peak_mb(args, method, variant, torch.device(args.device)))
        return 0
    print(f"# {args.model} img {args.img_size} batch {args.batch} on {args.device}, bf16 host")
    for method in args.methods.split(","):
        print(json.dumps(measure(args, method)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
