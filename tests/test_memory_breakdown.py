"""The benchmark's memory breakdown (weights, gradients, optimizer state, activations, peak), its row
modifiers (``@gc``, ``@compile``) and the lean-training checks built on them."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from petl_zoo import accounting
from petl_zoo.accounting.memory import MB, memory_breakdown
from petl_zoo.accounting.report import compute_checks
from petl_zoo.accounting.runner import BenchRow
from petl_zoo.accounting.timing import make_train_step
from petl_zoo.accounting.variants import build_variant, is_compiled, split_variant

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


class Doubled(nn.Module):
    """``linear(2 x)``: the doubled input is a new tensor the Linear saves for its weight gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * 2)


def _breakdown(model: nn.Module, batch: int = 8, features: int = 64):
    torch.manual_seed(0)
    x, y = torch.randn(batch, features), torch.randint(0, 10, (batch,))
    return memory_breakdown(make_train_step(model, x, y, None))


def test_breakdown_counts_each_part_exactly():
    torch.manual_seed(0)
    plain, doubled = _breakdown(nn.Linear(64, 10)), _breakdown(Doubled())
    param_bytes = (64 * 10 + 10) * 4
    assert plain.weights * MB == param_bytes and plain.gradients * MB == param_bytes
    # AdamW: exp_avg and exp_avg_sq per parameter, plus one scalar step count per parameter tensor
    assert 2 * param_bytes <= plain.optimizer * MB <= 2 * param_bytes + 2 * 8
    # the only new tensor the doubled forward keeps for the backward is 2x: [8, 64] floats
    assert (doubled.activations - plain.activations) * MB == 8 * 64 * 4
    assert plain.peak >= plain.optimizer + plain.activations


def test_frozen_weights_have_no_gradient_or_optimizer_bytes():
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))
    model[0].requires_grad_(False)
    result = _breakdown(model)
    trained = (32 * 10 + 10) * 4
    assert result.weights * MB == (64 * 32 + 32) * 4 + trained
    assert result.gradients * MB == trained


def test_split_variant_and_one_line_error_for_an_unknown_modifier():
    assert split_variant("lora@gc@compile") == ("lora", ("gc", "compile"))
    assert is_compiled("base@compile") and not is_compiled("lora@gc")
    with pytest.raises(ValueError, match=r"unknown modifier 'fast' in 'lora@fast'; valid: @gc, @compile"):
        split_variant("lora@fast")
    with pytest.raises(ValueError, match="unknown method 'lorra@gc'"):
        accounting.default_methods("lora,lorra@gc")
    everything = accounting.default_methods("all")
    assert accounting.default_methods("lora@gc,all,lora") == ["lora@gc", *everything]


def _factory():
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", num_classes=5, **TINY).state_dict()

    def build() -> nn.Module:
        model = timm.create_model("vit_tiny_patch16_224", num_classes=5, **TINY)
        model.load_state_dict(state)
        return model

    return build


def test_gc_modifier_turns_on_checkpointing_and_keeps_the_method():
    factory = _factory()
    model, note = build_variant("lora@gc", factory)
    plain, _ = build_variant("lora", factory)
    assert model.grad_checkpointing and not plain.grad_checkpointing and "gradient checkpointing" in note
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and trained == [n for n, p in plain.named_parameters() if p.requires_grad]


def test_breakdown_rows_without_timings():
    rows = accounting.run_benchmark(
        "vit_tiny_patch16_224",
        ["full", "lora", "lora@gc"],
        batch=4,
        num_classes=5,
        model_kwargs=TINY,
        repeats=0,
        flops=False,
    )
    by = {r.method: r for r in rows}
    assert by["full"].gradients_mb == pytest.approx(by["full"].weights_mb)
    assert by["lora"].activations_mb < by["full"].activations_mb
    assert by["lora@gc"].activations_mb < by["lora"].activations_mb
    assert by["lora@gc"].weights_mb == by["lora"].weights_mb
    assert by["base"].activations_mb is None and by["lora"].train_ms is None


def _row(name: str, activations: float, peak: float, grads: float = 0.1, train: list[float] | None = None):
    times = train or []
    return BenchRow(
        name,
        weights_mb=10.0,
        gradients_mb=grads,
        optimizer_mb=2 * grads,
        activations_mb=activations,
        peak_mem_mb=peak,
        train_times=times,
        train_ms=1e3 * times[len(times) // 2] if times else None,
    )


def test_lean_training_checks():
    rows = [
        _row("full", 100.0, 140.0, grads=10.0, train=[1.0, 1.0, 1.0]),
        _row("lora", 104.0, 110.0, train=[0.5, 0.5, 0.5]),  # saves 30 of 30: 1.0
        _row("dora", 120.0, 125.0),  # activations 1.2x: over its 1.15
        _row("dtl", 5.0, 60.0),  # 60 / 110 of lora's peak
        _row("lora@gc", 30.0, 40.0, train=[0.6, 0.6, 0.6]),
        _row("lora@compile", 104.0, 110.0, train=[0.6, 0.6, 0.6]),
    ]
    verdicts = {c["check"]: c["verdict"] for c in compute_checks(rows)}
    assert verdicts["lora peak saving / full's gradients + optimizer"] == "PASS"
    assert verdicts["lora activations / full"] == "PASS"
    assert verdicts["dora activations / full"] == "FAIL"
    assert verdicts["dora peak saving / full's gradients + optimizer"] == "FAIL"  # 15 of 30
    assert verdicts["dtl peak memory / lora"] == "PASS"
    assert verdicts["lora@gc activations / lora"] == "PASS"
    assert verdicts["lora@gc step time / lora"] == "PASS"  # 1.2 <= 1.4
    assert verdicts["lora@compile step time / lora"] == "FAIL"  # 1.2 > 0.9
    assert not any(name.startswith("lora@gc step time / full") for name in verdicts)
