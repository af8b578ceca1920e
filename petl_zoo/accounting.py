"""Accounting and benchmarks for every registered method: parameters, stored bytes, FLOPs, speed, memory.

- :func:`count_gmacs` counts inference multiply-accumulates per image with fvcore's
  ``FlopCountAnalysis`` (the PETL papers' convention) plus a handle for
  ``aten::scaled_dot_product_attention``, which fvcore skips: ``q k^T`` and ``attn v`` cost
  ``B * H * N * M * (dk + dv)`` MACs (``2 B H N^2 dh`` for self-attention). ViT-B/16 at 224 counts 17.58.
- :func:`count_gmacs_torch` cross-checks with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2).
- :func:`stored_bytes` is the size of the ``adapter.safetensors`` that ``save_adapter`` writes.
- :func:`run_benchmark` builds every requested method on a fresh copy of the backbone, times the
  training steps (forward + backward + ``on_after_backward`` + AdamW step) and inference of all
  variants interleaved in one process (round-robin over repeats, median), so load on a shared machine
  hits every method alike, and measures peak memory (CUDA ``max_memory_allocated`` growth, or the
  growth of the peak RSS of a fresh child process on CPU).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import ADAPTER_WEIGHTS, classifier_parameters, create, is_mergeable, merge, method_of, save_adapter
from .api import trainable_parameters as _trainable_parameters
from .config import parse_cli_value, split_key_value
from .registry import Method, TrainContext, get_method, method_names

__all__ = [
    "sdpa_flop_jit",
    "count_gmacs",
    "count_gmacs_torch",
    "stored_bytes",
    "parse_method_options",
    "BenchRow",
    "build_variant",
    "run_benchmark",
    "compute_checks",
    "format_table",
    "write_outputs",
    "plot_results",
    "PEFT_LORA",
    "BASE",
]

PEFT_LORA = "peft_lora"
BASE = "base"  # the un-patched model: inference reference only
LORA_QKV = "lora_qkv"


# ---------------------------------------------------------------------------------------------- FLOPs
def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> float:
    """fvcore handle for ``aten::scaled_dot_product_attention``: MACs of ``q k^T`` and ``attn v``.

    ``q``: ``[..., N, dk]``, ``k``: ``[..., M, dk]``, ``v``: ``[..., M, dv]``; MACs ``= prod(...) N M (dk + dv)``.
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch = math.prod(q[:-2])
    n, dk = q[-2], q[-1]
    m, dv = k[-2], v[-1]
    return float(batch * n * m * (dk + dv))


def _example_input(model: nn.Module, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    size = None
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None) is not None:
        size = tuple(patch.img_size)
    if size is None:
        size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    chans = int(cfg.get("input_size", (3,))[0]) if cfg.get("input_size") else 3
    return torch.randn(batch, chans, *size, device=device)


def count_gmacs(model: nn.Module, x: torch.Tensor | None = None) -> float:
    """Inference GMACs per image with fvcore (SDPA counted via :func:`sdpa_flop_jit`)."""
    from fvcore.nn import FlopCountAnalysis

    if x is None:
        x = _example_input(model, 1, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, x)
            analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            total = analysis.total()
    finally:
        model.train(was_training)
    return total / x.shape[0] / 1e9


def _missing_sdpa_formulas() -> dict:
    """FLOP formulas for SDPA kernels the installed torch's counter does not know.

    torch <= 2.14 counts the CUDA flash/efficient kernels but not the CPU one
    (``aten._scaled_dot_product_flash_attention_for_cpu``), so on the CPU the attention products
    ``Q K^T`` and ``A V`` would silently count as zero. The formula is the counter's own
    ``sdpa_flop_count`` (``4 B H Nq Nk D`` FLOPs)."""
    from torch.utils import flop_counter

    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is None or cpu_op in flop_counter.flop_registry:
        return {}

    def cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    return {cpu_op: cpu_flash_flops}  # FlopCounterMode wraps it with shape_wrapper


def count_gmacs_torch(model: nn.Module, x: torch.Tensor | None = None) -> float:
    """Inference GMACs per image from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    if x is None:
        x = _example_input(model, 1, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_missing_sdpa_formulas())
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9


# ------------------------------------------------------------------------------------------- storage
def stored_bytes(model: nn.Module) -> tuple[int, int]:
    """``(with_head, without_head)``: bytes of ``adapter.safetensors`` as ``save_adapter`` writes it,
    and of the same file without the classifier head's tensors."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        if method_of(model) is not None:
            save_adapter(model, tmp)
            with_head = os.path.getsize(Path(tmp) / ADAPTER_WEIGHTS)
            from .api import adapter_state_dict

            state = adapter_state_dict(model)
        else:  # a foreign model (peft): its trainable tensors
            state = {n: p for n, p in model.named_parameters() if p.requires_grad}
            path = Path(tmp) / "all.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
            with_head = os.path.getsize(path)
        head_ids = {id(p) for p in classifier_parameters(model)}
        rest = {k: v.detach().contiguous().cpu() for k, v in state.items() if id(v) not in head_ids}
        path = Path(tmp) / "nohead.safetensors"
        save_file(rest, str(path))
        without_head = os.path.getsize(path)
    return with_head, without_head


def _param_counts(model: nn.Module) -> dict[str, int]:
    if method_of(model) is not None:
        c = _trainable_parameters(model)
        return {"method": int(c["method"]), "head": int(c["head"]), "total": int(c["total"])}
    head_ids = {id(p) for p in classifier_parameters(model)}
    params = dict(model.named_parameters())
    method = sum(p.numel() for p in params.values() if p.requires_grad and id(p) not in head_ids)
    head = sum(p.numel() for p in params.values() if id(p) in head_ids)
    return {"method": method, "head": head, "total": method + head}


# ------------------------------------------------------------------------------------------ variants
def parse_method_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``['neat:rank=8', 'lora:targets=q,v']`` -> ``{'neat': {'rank': 8}, 'lora': {'targets': 'q,v'}}``.

    Values are parsed like the train tool's ``--opt`` (JSON when it parses, else the string); the
    method's config dataclass coerces and validates them.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, value = split_key_value(item, "--opt (METHOD:KEY=VALUE, e.g. neat:rank=8)")
        method, colon, key = head.partition(":")
        if not colon or not method.strip() or not key.strip():
            raise ValueError(f"bad --opt {item!r}: expected METHOD:KEY=VALUE, e.g. neat:rank=8")
        out.setdefault(method.strip(), {})[key.strip()] = parse_cli_value(value)
    return out


def _note(name: str, cls: type[Method] | None) -> str:
    if cls is None:
        return ""
    hooks = [h for h in ("on_train_start", "on_after_backward", "on_epoch_end") if getattr(cls, h) is not getattr(Method, h)]
    if "on_epoch_end" in hooks or "on_train_start" in hooks:
        return "initial (unpruned/unmasked) structure; decided during training"
    return ""


def build_variant(
    name: str, factory: Callable[[], nn.Module], options: dict[str, dict[str, Any]] | None = None
) -> tuple[nn.Module, str]:
    """A fresh backbone from ``factory`` patched as ``name``; returns ``(model, note)``.

    ``name`` is a registered method, ``base`` (un-patched), ``peft_lora`` (HF peft LoRA on the fused
    ``qkv``, rank from ``--opt peft_lora:rank=R``, default 8) or ``lora_qkv`` (our LoRA on the fused
    ``qkv``, same rank: the apples-to-apples row against peft).
    """
    options = options or {}
    model = factory()
    if name == BASE:
        for p in model.parameters():
            p.requires_grad_(False)
        return model, "un-patched model (inference reference)"
    if name == PEFT_LORA:
        from peft import LoraConfig, inject_adapter_in_model

        rank = int(options.get(PEFT_LORA, {}).get("rank", 8))
        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv"], lora_dropout=0.0)
        model = inject_adapter_in_model(config, model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        for p in classifier_parameters(model):
            p.requires_grad_(True)
        return model, f"HF peft LoRA r={rank} on fused qkv"
    if name == LORA_QKV:
        rank = int(options.get(PEFT_LORA, {}).get("rank", 8))
        return create("lora", model, rank=rank, targets=("qkv",)), f"petl_zoo lora r={rank} on fused qkv"
    cls = get_method(name)
    return create(name, model, **options.get(name, {})), _note(name, cls)


# ---------------------------------------------------------------------------------------- benchmark
@dataclass
class BenchRow:
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
    infer_ms: float | None = None
    infer_ms_merged: float | None = None
    mergeable: bool = False
    note: str = ""
    train_times: list[float] = field(default_factory=list, repr=False)
    infer_times: list[float] = field(default_factory=list, repr=False)
    merged_times: list[float] = field(default_factory=list, repr=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None
) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    method = method_of(model)
    device = x.device

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()

    ctx = TrainContext(device=device, autocast=autocast, epochs=1000, steps_per_epoch=1000)
    hook = method is not None and type(method).on_after_backward is not Method.on_after_backward

    def step() -> None:
        with autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if hook:
            method.on_after_backward(model, ctx)
            ctx.step += 1
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _timed(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


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
    what :func:`run_benchmark` does by default.
    """
    model, _ = build_variant(name, factory, options)
    model.to(device).train()
    x = _example_input(model, batch, device)
    y = torch.randint(0, max(1, int(getattr(model, "num_classes", 2))), (batch,), device=device)
    step = _make_step(model, x, y, amp)
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


def _memory_in_child(spec: dict[str, Any], name: str) -> float | None:
    code = (
        "import json,sys; from petl_zoo.accounting import _child_memory; "
        "print('PEAKMB', _child_memory(json.loads(sys.argv[1]), sys.argv[2]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec), name], capture_output=True, text=True, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PEAKMB "):
            return float(line.split()[1])
    sys.stderr.write(f"memory child for {name} failed:\n{proc.stderr[-2000:]}\n")
    return None


def model_factory(model_name: str, model_kwargs: dict[str, Any], pretrained_file: str | None = None):
    """A zero-argument callable that builds the timm backbone (same weights on every call)."""
    import timm

    kwargs = dict(model_kwargs)
    if pretrained_file:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_file))
        return lambda: timm.create_model(model_name, **kwargs)
    torch.manual_seed(0)
    reference = timm.create_model(model_name, **kwargs)
    state = reference.state_dict()

    def build() -> nn.Module:
        model = timm.create_model(model_name, **kwargs)
        model.load_state_dict(state)
        return model

    return build


def _child_memory(spec: dict[str, Any], name: str) -> float:
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    factory = model_factory(spec["model"], spec["model_kwargs"], spec.get("pretrained_file"))
    amp = getattr(torch, spec["amp"]) if spec.get("amp") else None
    return measure_memory(name, factory, spec["batch"], torch.device(spec["device"]), amp, spec["options"])


def run_benchmark(
    model_name: str,
    methods: Sequence[str],
    batch: int = 64,
    device: str = "cpu",
    model_kwargs: dict[str, Any] | None = None,
    pretrained_file: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    steps: int = 3,
    amp: str | None = None,
    flops: bool = True,
    memory: str = "child",
    log: Callable[[str], None] = print,
) -> list[BenchRow]:
    """Benchmark ``methods`` (plus ``base``, ``peft_lora``, ``lora_qkv`` rows) on one timm model.

    Timings: each variant gets ``warmup`` steps, then ``repeats`` rounds; in each round every variant
    runs ``steps`` timed steps in turn (interleaved), and the median over rounds is reported.
    ``memory``: ``'child'`` (fresh process per method on CPU), ``'inprocess'`` or ``'off'``.
    """
    model_kwargs = dict(model_kwargs or {})
    options = options or {}
    dev = torch.device(device)
    amp_dtype = getattr(torch, amp) if amp else None
    factory = model_factory(model_name, model_kwargs, pretrained_file)
    names = [BASE] + [m for m in methods if m != BASE]
    rows: dict[str, BenchRow] = {}
    models: dict[str, nn.Module] = {}
    merged_models: dict[str, nn.Module] = {}
    for name in names:
        model, note = build_variant(name, factory, options)
        model.to(dev)
        counts = _param_counts(model)
        row = BenchRow(
            method=name,
            trainable_params=counts["total"],
            method_params=counts["method"],
            head_params=counts["head"],
            note=note,
        )
        method = method_of(model)
        row.mergeable = name == BASE or bool(method is not None and is_mergeable(model))
        if name != BASE:
            row.stored_bytes, row.stored_bytes_no_head = stored_bytes(model)
        if flops:
            x1 = _example_input(model, 1, dev)
            row.gmacs = count_gmacs(model, x1)
            row.gmacs_torch = count_gmacs_torch(model, x1)
        if method is not None and is_mergeable(model):
            merged = merge(copy.deepcopy(model), unload=True)
            merged_models[name] = merged.eval()
            if flops:
                row.gmacs_merged = count_gmacs(merged, x1)
                row.gmacs_torch_merged = count_gmacs_torch(merged, x1)
        models[name] = model
        rows[name] = row
        log(f"built {name}: {counts['total']:,} trainable")

    x = _example_input(models[BASE], batch, dev)
    num_classes = max(1, int(getattr(models[BASE], "num_classes", 2)))
    y = torch.randint(0, num_classes, (batch,), device=dev)
    trainers = {n: _make_step(m.train(), x, y, amp_dtype) for n, m in models.items() if n != BASE}
    infer_ctx = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    def infer(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), infer_ctx():
                model(x)

        return run

    inferers: dict[str, Callable[[], None]] = {n: infer(m) for n, m in models.items()}
    merged_inferers = {n: infer(m) for n, m in merged_models.items()}
    for fn in list(trainers.values()):
        for _ in range(warmup):
            fn()
    for m in models.values():
        m.eval()
    for fn in list(inferers.values()) + list(merged_inferers.values()):
        for _ in range(warmup):
            fn()
    for r in range(repeats):
        for n, m in models.items():
            if n in trainers:
                m.train()
                rows[n].train_times.append(_timed(trainers[n], steps, dev))
            m.eval()
            rows[n].infer_times.append(_timed(inferers[n], steps, dev))
            if n in merged_inferers:
                rows[n].merged_times.append(_timed(merged_inferers[n], steps, dev))
        log(f"round {r + 1}/{repeats} done")
    for row in rows.values():
        if row.train_times:
            row.train_ms = 1e3 * statistics.median(row.train_times)
            row.train_img_per_s = batch / (row.train_ms / 1e3)
        row.infer_ms = 1e3 * statistics.median(row.infer_times)
        if row.merged_times:
            row.infer_ms_merged = 1e3 * statistics.median(row.merged_times)
    if rows[BASE].infer_ms is not None:
        rows[BASE].infer_ms_merged = rows[BASE].infer_ms
    del trainers, models, merged_models, inferers, merged_inferers

    if memory != "off":
        spec = {
            "model": model_name,
            "model_kwargs": model_kwargs,
            "pretrained_file": pretrained_file,
            "batch": batch,
            "device": device,
            "amp": amp,
            "options": options,
            "threads": torch.get_num_threads(),
        }
        for name in names:
            if name == BASE:
                continue
            if memory == "child" and dev.type == "cpu":
                rows[name].peak_mem_mb = _memory_in_child(spec, name)
            else:
                rows[name].peak_mem_mb = measure_memory(name, factory, batch, dev, amp_dtype, options)
            log(f"memory {name}: {rows[name].peak_mem_mb}")
    return list(rows.values())


# ------------------------------------------------------------------------------------------- checks
def compute_checks(rows: Sequence[BenchRow], merged_tolerance: float = 0.03, neat_ratio: float = 1.15) -> list[dict]:
    """The issue's targets as ``{'check', 'value', 'target', 'passed'}`` dicts (skipped when a row is missing)."""
    by = {r.method: r for r in rows}
    checks: list[dict] = []
    full = by.get("full")
    if full and full.train_ms:
        for r in rows:
            if r.method in (BASE, "full") or not r.train_ms:
                continue
            ratio = r.train_ms / full.train_ms
            checks.append(
                {"check": f"{r.method} step time / full", "value": ratio, "target": "< 1", "passed": ratio < 1.0}
            )
    ours, peft = by.get(LORA_QKV), by.get(PEFT_LORA)
    if ours and peft and ours.train_ms and peft.train_ms:
        ratio = ours.train_ms / peft.train_ms
        checks.append(
            {"check": "lora_qkv step time / peft_lora", "value": ratio, "target": "<= 1", "passed": ratio <= 1.0}
        )
        if ours.peak_mem_mb is not None and peft.peak_mem_mb is not None and peft.peak_mem_mb > 0:
            ratio = ours.peak_mem_mb / peft.peak_mem_mb
            checks.append(
                {"check": "lora_qkv peak mem / peft_lora", "value": ratio, "target": "<= 1", "passed": ratio <= 1.0}
            )
    neat, lora = by.get("neat"), by.get("lora")
    if neat and lora and neat.train_ms and lora.train_ms:
        ratio = neat.train_ms / lora.train_ms
        checks.append(
            {"check": "neat step time / lora", "value": ratio, "target": f"<= {neat_ratio}", "passed": ratio <= neat_ratio}
        )
    base = by.get(BASE)
    if base and base.infer_ms:
        for r in rows:
            if r.method == BASE or r.infer_ms_merged is None:
                continue
            ratio = r.infer_ms_merged / base.infer_ms
            checks.append(
                {
                    "check": f"{r.method} merged inference / base",
                    "value": ratio,
                    "target": f"<= {1 + merged_tolerance:.2f}",
                    "passed": ratio <= 1 + merged_tolerance,
                }
            )
    return checks


# ------------------------------------------------------------------------------------------- output
COLUMNS = [
    ("method", "method", "{}"),
    ("method_params", "method params", "{:,}"),
    ("head_params", "head", "{:,}"),
    ("trainable_params", "total", "{:,}"),
    ("stored_bytes", "stored B", "{:,}"),
    ("gmacs", "GMACs", "{:.3f}"),
    ("gmacs_torch", "GMACs(torch)", "{:.3f}"),
    ("gmacs_merged", "GMACs merged", "{:.3f}"),
    ("train_img_per_s", "train img/s", "{:.1f}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("infer_ms", "infer ms", "{:.2f}"),
    ("infer_ms_merged", "infer ms merged", "{:.2f}"),
    ("note", "note", "{}"),
]


def _fmt(value: Any, spec: str) -> str:
    if value is None or value == "":
        return "-"
    return spec.format(value)


def format_table(rows: Sequence[BenchRow], checks: Sequence[dict] | None = None) -> str:
    """A markdown table of ``rows`` and, if given, the checks section."""
    header = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [header, "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        d = asdict(r)
        lines.append("| " + " | ".join(_fmt(d[k], spec) for k, _, spec in COLUMNS) + " |")
    if checks:
        lines += ["", "Checks:"]
        for c in checks:
            mark = "PASS" if c["passed"] else "FAIL"
            lines.append(f"- [{mark}] {c['check']}: {c['value']:.3f} (target {c['target']})")
    return "\n".join(lines)


_SKIP = {"train_times", "infer_times", "merged_times"}


def write_outputs(rows: Sequence[BenchRow], checks: Sequence[dict], out: str | os.PathLike, meta: dict) -> Path:
    """Write ``benchmark.json`` (list of rows), ``benchmark.csv`` and ``checks.json`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = [{k: v for k, v in asdict(r).items() if k not in _SKIP} for r in rows]
    (out / "benchmark.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    (out / "checks.json").write_text(json.dumps({"meta": meta, "checks": list(checks)}, indent=2) + "\n")
    with open(out / "benchmark.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return out


def plot_results(rows: Sequence[BenchRow], path: str | os.PathLike, title: str = "") -> Path:
    """Bar charts of training throughput and peak memory per method (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.method != BASE]
    names = [r.method for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(names) + 4), 4.5))
    for ax, key, label in (
        (axes[0], "train_img_per_s", "training images / s (higher is better)"),
        (axes[1], "peak_mem_mb", "peak training memory MB (lower is better)"),
    ):
        values = [getattr(r, key) or 0.0 for r in rows]
        bars = ax.bar(names, values, color=["tab:red" if n == "full" else "tab:blue" for n in names])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        for tick in ax.get_xticklabels():
            tick.set_ha("right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def default_methods(requested: str) -> list[str]:
    """``'all'`` -> every registered method plus ``lora_qkv`` and ``peft_lora``; else the comma list."""
    if requested.strip() == "all":
        names = list(method_names()) + [LORA_QKV]
        try:
            import peft  # noqa: F401

            names.append(PEFT_LORA)
        except ImportError:
            pass
        return names
    names = [n.strip() for n in requested.split(",") if n.strip()]
    valid = set(method_names()) | {BASE, PEFT_LORA, LORA_QKV}
    for n in names:
        if n not in valid:
            raise ValueError(f"unknown method {n!r}; valid: all, {', '.join(sorted(valid))}")
    return names
