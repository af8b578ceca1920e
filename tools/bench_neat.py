"""Train-step time of NEAT against LoRA (same rank and targets) and a naive NEAT that builds delta_W.

    python tools/bench_neat.py --pretrained-file demo/vit_tiny_fmnist32.safetensors
    python tools/bench_neat.py --model vit_small_patch16_224 --batch 8
    python tools/bench_neat.py --profile                  # torch.profiler table of one step per variant

``--model proxy`` (the default) is the demo backbone's architecture (``vit_tiny_patch16_224`` at img 32,
patch 4, depth 6); ``--model-kwargs KEY=VALUE ...`` adds or overrides architecture options. The backbone
is built by ``petl_zoo.train.backbone.build_backbone``: with ``--pretrained-file`` its weights come from
that file, without it they are random (the step time hardly depends on the weights).

A train step is forward + cross-entropy + backward + AdamW step. Variants:

- ``neat``: petl_zoo's NEAT (``H = act(A W0)`` once per forward, then ``(x H^T) B^T``);
- ``lora``: petl_zoo's LoRA at the same rank and targets;
- ``naive``: the same NEAT parameters, but each forward builds ``delta_W = s B act(A W0)`` and runs
  ``F.linear(x, W0 + delta_W, b)`` on the whole fused Linear;
- ``naive_peft``: builds ``delta_W`` too and adds ``x delta_W^T`` to the frozen layer's output slice
  (Hugging Face peft's PEANuT forward).

The variants run interleaved in one process (shuffled order per round, the CPU is shared), and the
median over rounds is reported with the median of the per-round ratios. Writes ``bench_neat.json``
to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import petl_zoo
from petl_zoo.config import parse_key_values
from petl_zoo.layers import AdaptedLinear, adapted_linears
from petl_zoo.methods.neat import NeatDelta
from petl_zoo.train.backbone import build_backbone

# The architecture of the demo backbone (its weights: demo/vit_tiny_fmnist32.safetensors, demo/README.md).
PROXY_MODEL = "vit_tiny_patch16_224"
PROXY_KWARGS: dict[str, Any] = {"img_size": 32, "patch_size": 4, "depth": 6}
VARIANTS = ("lora", "neat", "naive", "naive_peft")
RATIOS = (
    ("neat", "lora"),
    ("naive", "lora"),
    ("naive_peft", "lora"),
    ("naive", "neat"),
    ("naive_peft", "neat"),
)


class NaiveNeatLinear(nn.Module):
    """NEAT that rebuilds ``delta_W = s B act(A W0)`` from the NEAT deltas on every forward.

    ``fused=True``: ``F.linear(x, W0 + delta_W, b)``; ``fused=False``: ``base(x) + x delta_W^T`` on each
    slice (Hugging Face peft's PEANuT forward).
    """

    def __init__(self, adapted: AdaptedLinear, fused: bool) -> None:
        super().__init__()
        self.base = adapted.base
        self.deltas = adapted.deltas  # the very same parameter values as the neat variant
        self.slices = dict(adapted.slices)
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        w0 = self.base.weight
        if not self.fused:
            y = self.base(x)
            for name, (start, stop) in self.slices.items():
                y[..., start:stop] += F.linear(x, self.deltas[name].delta_weight(w0[start:stop]))
            return y
        parts, cursor = [], 0
        for name, (start, stop) in sorted(self.slices.items(), key=lambda kv: kv[1]):
            parts.append(w0[cursor:start])
            parts.append(w0[start:stop] + self.deltas[name].delta_weight(w0[start:stop]))
            cursor = stop
        parts.append(w0[cursor:])
        return F.linear(x, torch.cat(parts), self.base.bias)


def backbone_spec(model: str, model_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(timm name, architecture options)``: ``proxy`` is the proxy ViT's architecture."""
    if model == "proxy":
        return PROXY_MODEL, {**PROXY_KWARGS, **model_kwargs}
    return model, dict(model_kwargs)


def build(args: argparse.Namespace) -> nn.Module:
    """The backbone through ``build_backbone``: weights from ``--pretrained-file``, else random."""
    name, kwargs = backbone_spec(args.model, args.model_kwargs)
    return build_backbone(name, args.num_classes, args.pretrained_file, pretrained=False, model_kwargs=kwargs)


def make_variants(args: argparse.Namespace) -> dict[str, nn.Module]:
    """The four variants, each on its own backbone with the same weights and the same NEAT/LoRA init."""
    targets = tuple(args.targets.split(","))
    variants = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        method = "lora" if name == "lora" else "neat"
        options = dict(rank=args.rank, targets=targets)
        if method == "neat":
            options["depth"] = args.depth
        model = petl_zoo.create(method, build(args), **options)
        with torch.no_grad():  # a non-zero B so that every variant computes a real update
            g = torch.Generator().manual_seed(1)
            for m in model.modules():
                if isinstance(m, NeatDelta):
                    m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.01)
        if name.startswith("naive"):
            for path, layer in list(adapted_linears(model)):
                parent_path, _, attr = path.rpartition(".")
                setattr(model.get_submodule(parent_path), attr, NaiveNeatLinear(layer, fused=name == "naive"))
        variants[name] = model
    return variants


def check_agreement(variants: dict[str, nn.Module], x: Tensor) -> None:
    """The naive variants must give NEAT's logits (same parameters), or the comparison means nothing."""
    with torch.no_grad():
        ref = variants["neat"].eval()(x)
        for name in ("naive", "naive_peft"):
            err = (variants[name].eval()(x) - ref).abs().max().item()
            print(f"neat vs {name} max |logit diff| = {err:.2e} (same parameters)")
            if err > 1e-3:
                raise SystemExit(f"{name} and neat disagree: the comparison would be meaningless")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def profile_steps(
    variants: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], x: Tensor, y: Tensor
):
    """Print a torch.profiler table of one train step per variant."""
    from torch.profiler import ProfilerActivity, profile

    for name in VARIANTS:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(variants[name], opts[name], x, y)
        print(f"--- {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def time_rounds(
    variants: dict[str, nn.Module],
    opts: dict[str, torch.optim.Optimizer],
    x: Tensor,
    y: Tensor,
    rounds: int,
    steps: int,
) -> dict[str, list[float]]:
    """Milliseconds per train step of every variant, one value per round (shuffled order per round)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(variants[name], opts[name], x, y)
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    return times


def report(args: argparse.Namespace, counts: dict[str, int], times: dict[str, list[float]]) -> dict[str, Any]:
    """Print the table and the ratios; return the result written to ``bench_neat.json``."""
    med = {name: statistics.median(v) for name, v in times.items()}
    ratio = {f"{a}/{b}": statistics.median(ta / tb for ta, tb in zip(times[a], times[b])) for a, b in RATIOS}
    label = f"{args.model} batch {args.batch}, rank {args.rank}, targets {args.targets}, depth {args.depth}"
    print(f"\n{label}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    print("| variant | trainable (head excl.) | ms / train step (median) | min | max |")
    print("|---|---:|---:|---:|---:|")
    for name in VARIANTS:
        t = times[name]
        print(f"| {name} | {counts[name]:,} | {med[name]:.1f} | {min(t):.1f} | {max(t):.1f} |")
    print("ratios (median of per-round ratios): " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
    return {
        "setting": vars(args),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "machine": platform.processor() or platform.machine(),
        "trainable": counts,
        "ms_per_step": times,
        "median_ms": med,
        "ratios": ratio,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="proxy", help="'proxy' (the proxy ViT's architecture) or a timm model name"
    )
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="architecture options")
    p.add_argument("--pretrained-file", default=None, help="backbone weights (.safetensors, .pth, .npz)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--depth", type=int, default=0, help="NEAT hidden pairs")
    p.add_argument("--targets", default="q,v")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table of one step per variant"
    )
    p.add_argument("--out", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.model_kwargs = parse_key_values(args.model_kwargs, "--model-kwargs")
        variants = make_variants(args)
    except (ValueError, FileNotFoundError) as err:  # bad model, options or weights file
        p.error(" ".join(str(err).split()))
    if args.pretrained_file is None:
        print("note: no --pretrained-file, so the backbone has random weights", file=sys.stderr)
    size = variants["neat"].patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, *size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    check_agreement(variants, x)
    counts = {name: petl_zoo.trainable_parameters(m)["method"] for name, m in variants.items()}
    opts = {}
    for name, model in variants.items():
        model.train()
        opts[name] = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        for _ in range(args.warmup):
            train_step(model, opts[name], x, y)
    if args.profile:
        profile_steps(variants, opts, x, y)
    result = report(args, counts, time_rounds(variants, opts, x, y, args.rounds, args.steps))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_neat.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
