"""The benchmark's report: ratio checks, a markdown table, JSON/CSV files and a bar chart."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .runner import BenchRow
from .variants import BASE, LORA_QKV, PEFT_LORA

__all__ = ["compute_checks", "format_table", "write_outputs", "plot_results", "COLUMNS"]


def _check(
    name: str, value: float, bound: float, strict: bool = False, bound_text: str = ""
) -> dict[str, Any]:
    """``value < bound`` (``strict``) or ``value <= bound`` as a ``{'check', 'value', 'target', 'passed'}`` dict."""
    op = "<" if strict else "<="
    passed = value < bound if strict else value <= bound
    return {"check": name, "value": value, "target": f"{op} {bound_text or f'{bound:g}'}", "passed": passed}


def _step_vs_full(rows: Sequence[BenchRow], full: BenchRow | None) -> list[dict[str, Any]]:
    if not (full and full.train_ms):
        return []
    return [
        _check(f"{r.method} step time / full", r.train_ms / full.train_ms, 1.0, strict=True)
        for r in rows
        if r.method not in (BASE, "full") and r.train_ms
    ]


def _ours_vs_peft(ours: BenchRow | None, peft: BenchRow | None) -> list[dict[str, Any]]:
    if not (ours and peft and ours.train_ms and peft.train_ms):
        return []
    checks = [_check(f"{LORA_QKV} step time / {PEFT_LORA}", ours.train_ms / peft.train_ms, 1.0)]
    if ours.peak_mem_mb is not None and peft.peak_mem_mb is not None and peft.peak_mem_mb > 0:
        checks.append(_check(f"{LORA_QKV} peak mem / {PEFT_LORA}", ours.peak_mem_mb / peft.peak_mem_mb, 1.0))
    return checks


def _merged_vs_base(
    rows: Sequence[BenchRow], base: BenchRow | None, tolerance: float
) -> list[dict[str, Any]]:
    if not (base and base.infer_ms):
        return []
    return [
        _check(
            f"{r.method} merged inference / base",
            r.infer_ms_merged / base.infer_ms,
            1 + tolerance,
            bound_text=f"{1 + tolerance:.2f}",
        )
        for r in rows
        if r.method != BASE and r.infer_ms_merged is not None
    ]


def compute_checks(
    rows: Sequence[BenchRow], merged_tolerance: float = 0.03, neat_ratio: float = 1.15
) -> list[dict[str, Any]]:
    """Ratio checks as ``{'check', 'value', 'target', 'passed'}`` dicts, each skipped when a row is missing.

    Every method's step time against ``full`` (< 1); ``lora_qkv`` against ``peft_lora`` in step time and
    peak memory (<= 1); ``neat`` against ``lora`` in step time (<= ``neat_ratio``); every merged model's
    inference against ``base`` (<= 1 + ``merged_tolerance``).
    """
    by = {r.method: r for r in rows}
    checks = _step_vs_full(rows, by.get("full"))
    checks += _ours_vs_peft(by.get(LORA_QKV), by.get(PEFT_LORA))
    neat, lora = by.get("neat"), by.get("lora")
    if neat and lora and neat.train_ms and lora.train_ms:
        ratio = neat.train_ms / lora.train_ms
        checks.append(_check("neat step time / lora", ratio, neat_ratio, bound_text=str(neat_ratio)))
    return checks + _merged_vs_base(rows, by.get(BASE), merged_tolerance)


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
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("infer_ms", "infer ms", "{:.2f}"),
    ("infer_ms_merged", "infer ms merged", "{:.2f}"),
    ("note", "note", "{}"),
]

_TIMING_LISTS = {"train_times", "infer_times", "merged_times"}


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


def write_outputs(
    rows: Sequence[BenchRow], checks: Sequence[dict], out: str | os.PathLike, meta: dict
) -> Path:
    """Write ``benchmark.json`` (list of rows), ``benchmark.csv`` and ``checks.json`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = [{k: v for k, v in asdict(r).items() if k not in _TIMING_LISTS} for r in rows]
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
