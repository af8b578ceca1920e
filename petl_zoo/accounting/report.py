"""The benchmark's report: ratio checks (with their spread over rounds), a markdown table and a chart.

A timing check compares the ratio of two medians with its target, and also every round's own ratio
(round ``i`` of both rows ran back to back, so their ratio is paired): the band is the min-max of
those per-round ratios. A check is PASS when the median ratio and every round meet the target, FAIL
when none does, and ``inconclusive`` when the band straddles the target (the difference is within the
timing noise). Counts (parameters, GMACs) and the single memory measurement are exact: PASS or FAIL.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .runner import BenchRow
from .variants import BASE, LORA_QKV, PEFT_LORA, reference_base

__all__ = [
    "compute_checks",
    "check_summary",
    "format_table",
    "plot_results",
    "COLUMNS",
    "LORA_STEP_TARGETS",
    "ACTIVATION_TARGETS",
    "PASS",
    "FAIL",
    "INCONCLUSIVE",
]

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "inconclusive"
#: Step-time targets of ``lora`` on its default q and v slices (computed in one pass per Linear) against
#: the same rank on the whole fused ``qkv``: ours (``lora_qkv``) and Hugging Face peft's.
LORA_STEP_TARGETS: tuple[tuple[str, str, float], ...] = (("lora", LORA_QKV, 1.05), ("lora", PEFT_LORA, 0.9))
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    ">=": operator.ge,
}
#: Methods whose peak saves at least :data:`SAVING_TARGET` of ``full``'s gradient and optimizer bytes
#: and whose activations stay within their bound of ``full``'s (issue goals; docs/benchmark.md).
ACTIVATION_TARGETS: dict[str, float] = {"lora": 1.05, "neat": 1.05, "adapter": 1.05, "dora": 1.15}
SAVING_TARGET = 0.95
#: ``(row, reference, bound)``: peak of a side network over LoRA's; gradient checkpointing's activations
#: and step time over the same method without it; compiled over eager step time.
SIDE_NETWORK_PEAK = ("dtl", "lora", 0.6)
CHECKPOINT_TARGETS = (("lora@gc", "lora", 0.5, 1.4),)
COMPILE_TARGETS = (("lora@compile", "lora", 0.9), ("neat@compile", "neat", 0.9))


def _check(
    name: str,
    value: float,
    bound: float,
    op: str = "<=",
    bound_text: str = "",
    rounds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A check dict: ``check``, ``value``, ``target``, ``verdict`` (PASS/FAIL/inconclusive), ``passed``
    (None when inconclusive) and, for a timing check (``rounds`` = per-round ratios), ``low``/``high``
    (their min-max) and ``rounds`` (how many)."""
    meets = _OPS[op]
    results = [meets(value, bound)] + [meets(r, bound) for r in rounds or ()]
    verdict = PASS if all(results) else FAIL if not any(results) else INCONCLUSIVE
    check: dict[str, Any] = {"check": name, "value": value, "target": f"{op} {bound_text or f'{bound:g}'}"}
    if rounds:
        check.update(low=min(rounds), high=max(rounds), rounds=len(rounds))
    check.update(verdict=verdict, passed=None if verdict == INCONCLUSIVE else verdict == PASS)
    return check


def _paired(a: Sequence[float], b: Sequence[float]) -> list[float] | None:
    """Per-round ratios ``a[i] / b[i]`` (None without per-round times, e.g. rows built by hand)."""
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    return ratios or None


def _step_vs_full(rows: Sequence[BenchRow], full: BenchRow | None) -> list[dict[str, Any]]:
    if not (full and full.train_ms):
        return []
    return [
        _check(
            f"{r.method} step time / full",
            r.train_ms / full.train_ms,
            1.0,
            op="<",
            rounds=_paired(r.train_times, full.train_times),
        )
        for r in rows
        if r.method not in (BASE, "full") and "@" not in r.method and r.train_ms
    ]


def _ours_vs_peft(ours: BenchRow | None, peft: BenchRow | None) -> list[dict[str, Any]]:
    """Same parameters and GMACs (exact), then step time (timed) and peak memory (one measurement)."""
    if not (ours and peft):
        return []
    vs = f"{LORA_QKV} {{}} / {PEFT_LORA}"
    checks = []
    if peft.method_params:
        checks.append(_check(vs.format("method params"), ours.method_params / peft.method_params, 1.0, "=="))
    if ours.gmacs and peft.gmacs:
        checks.append(_check(vs.format("GMACs"), ours.gmacs / peft.gmacs, 1.0, "=="))
    if ours.train_ms and peft.train_ms:
        rounds = _paired(ours.train_times, peft.train_times)
        checks.append(_check(vs.format("step time"), ours.train_ms / peft.train_ms, 1.0, rounds=rounds))
    if ours.peak_mem_mb is not None and peft.peak_mem_mb is not None and peft.peak_mem_mb > 0:
        checks.append(_check(vs.format("peak mem"), ours.peak_mem_mb / peft.peak_mem_mb, 1.0))
    return checks


def _merged_vs_base(
    rows: Sequence[BenchRow], by: dict[str, BenchRow], tolerance: float
) -> list[dict[str, Any]]:
    """Every merged model's inference against its base (``base@compile`` for a compiled row)."""
    checks = []
    for r in rows:
        reference = reference_base(r.method)
        base = by.get(reference)
        if r.method == reference or r.infer_ms_merged is None or not (base and base.infer_ms):
            continue
        checks.append(
            _check(
                f"{r.method} merged inference / {reference}",
                r.infer_ms_merged / base.infer_ms,
                1 + tolerance,
                bound_text=f"{1 + tolerance:.2f}",
                rounds=_paired(r.merged_times, base.infer_times),
            )
        )
    return checks


def _memory_vs_full(by: dict[str, BenchRow]) -> list[dict[str, Any]]:
    """Peak saving against ``full`` over ``full``'s gradient + optimizer bytes (>= SAVING_TARGET), and
    activations over ``full``'s (<= :data:`ACTIVATION_TARGETS`), for the rows measured with a breakdown."""
    full = by.get("full")
    if not (full and full.activations_mb and full.gradients_mb is not None and full.optimizer_mb is not None):
        return []
    floor = full.gradients_mb + full.optimizer_mb
    checks = []
    for name, bound in ACTIVATION_TARGETS.items():
        r = by.get(name)
        if r is None or r.activations_mb is None:
            continue
        saving = (full.peak_mem_mb - r.peak_mem_mb) / floor
        checks.append(
            _check(f"{name} peak saving / full's gradients + optimizer", saving, SAVING_TARGET, ">=")
        )
        checks.append(_check(f"{name} activations / full", r.activations_mb / full.activations_mb, bound))
    return checks


def _ratio_check(
    by: dict[str, BenchRow], name: str, reference: str, field: str, bound: float, label: str
) -> list[dict[str, Any]]:
    """``name``'s ``field`` over ``reference``'s (<= bound), when both rows have it."""
    a, b = by.get(name), by.get(reference)
    if not (a and b and getattr(a, field) is not None and getattr(b, field)):
        return []
    return [_check(f"{name} {label} / {reference}", getattr(a, field) / getattr(b, field), bound)]


def _step_check(by: dict[str, BenchRow], name: str, reference: str, bound: float) -> list[dict[str, Any]]:
    """``name``'s step time over ``reference``'s (<= bound) with the per-round band."""
    a, b = by.get(name), by.get(reference)
    if not (a and b and a.train_ms and b.train_ms):
        return []
    rounds = _paired(a.train_times, b.train_times)
    ratio = a.train_ms / b.train_ms
    return [_check(f"{name} step time / {reference}", ratio, bound, bound_text=str(bound), rounds=rounds)]


def _lean_training(by: dict[str, BenchRow]) -> list[dict[str, Any]]:
    """The memory and speed goals: activations and saving against ``full``, a side network's peak against
    LoRA's, gradient checkpointing (activations and step time) and compiled step time."""
    checks = _memory_vs_full(by)
    name, reference, bound = SIDE_NETWORK_PEAK
    checks += _ratio_check(by, name, reference, "peak_mem_mb", bound, "peak memory")
    for name, reference, memory_bound, time_bound in CHECKPOINT_TARGETS:
        checks += _ratio_check(by, name, reference, "activations_mb", memory_bound, "activations")
        checks += _step_check(by, name, reference, time_bound)
    for name, reference, bound in COMPILE_TARGETS:
        checks += _step_check(by, name, reference, bound)
    return checks


def compute_checks(
    rows: Sequence[BenchRow], merged_tolerance: float = 0.03, neat_ratio: float = 1.15
) -> list[dict[str, Any]]:
    """Ratio checks (see :func:`_check` for the dict), each skipped when a row is missing.

    Every method's step time against ``full`` (< 1); ``lora_qkv`` against ``peft_lora``: method
    parameters and GMACs (== 1, exact), step time and peak memory (<= 1); ``neat`` against ``lora`` in
    step time (<= ``neat_ratio``), ``lora`` (q, v slices) against the fused-``qkv`` rows
    (:data:`LORA_STEP_TARGETS`); every merged model's inference against ``base`` (<= 1 +
    ``merged_tolerance``). Timing checks carry the min-max band of their per-round ratios and are
    ``inconclusive`` when it straddles the target.
    """
    by = {r.method: r for r in rows}
    checks = _step_vs_full(rows, by.get("full"))
    checks += _ours_vs_peft(by.get(LORA_QKV), by.get(PEFT_LORA))
    for name, reference, bound in (("neat", "lora", neat_ratio), *LORA_STEP_TARGETS):
        checks += _step_check(by, name, reference, bound)
    checks += _lean_training(by)
    return checks + _merged_vs_base(rows, by, merged_tolerance)


# (BenchRow field, header, format)
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
    ("weights_mb", "weights MB", "{:.1f}"),
    ("gradients_mb", "grads MB", "{:.1f}"),
    ("optimizer_mb", "optim MB", "{:.1f}"),
    ("activations_mb", "activ. MB", "{:.1f}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("infer_ms", "infer ms", "{:.2f}"),
    ("infer_vs_base", "infer / base", "{:.2f}"),
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
        lines += ["", "Checks:"] + [_check_line(c) for c in checks] + ["", check_summary(checks)]
    return "\n".join(lines)


def _check_line(c: dict[str, Any]) -> str:
    """``- [PASS] name: 0.786 (rounds 0.750-0.810, n=5; target < 1)``; exact checks without the band."""
    verdict = c.get("verdict") or (PASS if c["passed"] else FAIL)
    band = f"rounds {c['low']:.3f}-{c['high']:.3f}, n={c['rounds']}; " if c.get("rounds") else ""
    return f"- [{verdict}] {c['check']}: {c['value']:.3f} ({band}target {c['target']})"


def check_summary(checks: Sequence[dict[str, Any]]) -> str:
    """``3 PASS, 1 FAIL, 2 inconclusive`` plus, when any is inconclusive, what that means."""
    counts = {v: sum(1 for c in checks if c.get("verdict") == v) for v in (PASS, FAIL, INCONCLUSIVE)}
    text = ", ".join(f"{n} {v}" for v, n in counts.items())
    if counts[INCONCLUSIVE]:
        text += (
            " (inconclusive: the per-round ratios fall on both sides of the target, a difference within "
            "the timing noise; more --repeats or a quieter machine can resolve it)"
        )
    return text


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
