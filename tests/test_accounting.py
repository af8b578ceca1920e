"""Accounting: FLOP counts against closed forms, the two counters against each other, counts and stored
bytes, and the benchmark CLI end to end on a tiny ViT (timings are not asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import petl_zoo
from petl_zoo import accounting
from petl_zoo.accounting.cli import build_parser
from petl_zoo.accounting.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=5)


def vit_macs(img: int, patch: int, dim: int, depth: int, classes: int, layernorm: bool) -> int:
    """Closed-form inference MACs of a timm ViT (cls token, MLP ratio 4) at batch 1.

    Patch conv n*D*3p^2; per block qkv+proj+fc1+fc2 = 12 N D^2 and attention 2 N^2 D (q k^T, attn v);
    head D*C; fvcore counts each LayerNorm as 5 per element (torch's counter does not count it).
    """
    n = (img // patch) ** 2
    tokens = n + 1
    macs = (
        n * dim * 3 * patch * patch
        + depth * (12 * tokens * dim * dim + 2 * tokens * tokens * dim)
        + dim * classes
    )
    if layernorm:
        macs += (2 * depth + 1) * tokens * dim * 5
    return macs


def test_fvcore_with_sdpa_handle_matches_closed_form():
    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    expected = vit_macs(32, 8, 48, 2, 5, layernorm=True)
    assert accounting.count_gmacs(model) * 1e9 == pytest.approx(expected, rel=1e-9)
    # without the handle fvcore would miss exactly the attention matmuls
    tokens = 17
    assert expected - 2 * 2 * tokens * tokens * 48 > 0


def test_torch_counter_matches_closed_form_and_batch_is_per_image():
    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    expected = vit_macs(32, 8, 48, 2, 5, layernorm=False)
    assert accounting.count_gmacs_torch(model) * 1e9 == pytest.approx(expected, rel=1e-9)
    x = torch.randn(3, 3, 32, 32)
    assert accounting.count_gmacs_torch(model, x) * 1e9 == pytest.approx(expected, rel=1e-9)


def test_fvcore_and_torch_counter_agree_within_one_percent():
    # the only difference is LayerNorm (fvcore counts 5/element): below 1% at vit_tiny's width 192
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    a, b = accounting.count_gmacs(model), accounting.count_gmacs_torch(model)
    assert abs(a - b) / a < 0.01


def test_sdpa_handle_counts_cross_attention_shapes():
    q = torch.randn(2, 3, 5, 4)
    k = torch.randn(2, 3, 7, 4)
    v = torch.randn(2, 3, 7, 6)

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(Attn(), (q, k, v))
    fca.set_op_handle("aten::scaled_dot_product_attention", accounting.sdpa_flop_jit)
    assert fca.total() == 2 * 3 * 5 * 7 * (4 + 6)


def test_merged_lora_gmacs_equal_base_and_unmerged_adds_low_rank_matmuls():
    base = timm.create_model("vit_tiny_patch16_224", **TINY)
    model = petl_zoo.create(
        "lora", timm.create_model("vit_tiny_patch16_224", **TINY), rank=4, targets=("q", "v")
    )
    tokens, dim, depth, r = 17, 48, 2, 4
    extra = depth * 2 * tokens * (dim * r + r * dim)  # two sites per block: x A^T then (.) B^T
    assert accounting.count_gmacs_torch(model) * 1e9 == pytest.approx(
        accounting.count_gmacs_torch(base) * 1e9 + extra, rel=1e-9
    )
    merged = petl_zoo.merge(model, unload=True)
    assert accounting.count_gmacs(merged) == pytest.approx(accounting.count_gmacs(base), rel=1e-12)


def test_stored_bytes_is_the_safetensors_file_and_counts_are_closed_form(tmp_path):
    model = petl_zoo.create(
        "lora", timm.create_model("vit_tiny_patch16_224", **TINY), rank=4, targets=("q", "v")
    )
    with_head, without_head = accounting.stored_bytes(model)
    petl_zoo.save_adapter(model, tmp_path)
    assert with_head == (tmp_path / petl_zoo.ADAPTER_WEIGHTS).stat().st_size
    method = 2 * 2 * (4 * 48 + 48 * 4)
    head = 48 * 5 + 5
    assert without_head < with_head
    # fp32 payload plus a JSON header
    assert 4 * method < without_head < 4 * method + 4096
    assert 4 * (method + head) < with_head < 4 * (method + head) + 4096
    counts = accounting.param_counts(model)
    assert counts == {"method": method, "head": head, "total": method + head}


def test_peft_row_counts_match_our_qkv_lora():
    arch = {k: v for k, v in TINY.items() if k != "num_classes"}
    factory = accounting.model_factory("vit_tiny_patch16_224", TINY["num_classes"], arch)
    peft_model, _ = accounting.build_variant(
        accounting.PEFT_LORA, factory, {accounting.PEFT_LORA: {"rank": 4}}
    )
    ours, _ = accounting.build_variant("lora_qkv", factory, {accounting.PEFT_LORA: {"rank": 4}})
    expected = 2 * (4 * 48 + 3 * 48 * 4)
    assert accounting.param_counts(peft_model)["method"] == expected
    assert accounting.param_counts(ours)["method"] == expected


def test_option_parsing_errors_name_the_bad_value():
    assert accounting.parse_method_options(["lora:rank=4", "lora:targets=q,v"]) == {
        "lora": {"rank": 4, "targets": "q,v"}
    }
    with pytest.raises(ValueError, match="rank=4"):
        accounting.parse_method_options(["rank=4"])
    with pytest.raises(ValueError, match="nope"):
        accounting.default_methods("lora,nope")


def test_checks_flag_misses():
    rows = [
        accounting.BenchRow("base", infer_ms=10.0),
        accounting.BenchRow("full", train_ms=10.0),
        accounting.BenchRow("lora", train_ms=5.0, infer_ms_merged=10.2),
        accounting.BenchRow("neat", train_ms=6.0),
        accounting.BenchRow("lora_qkv", train_ms=5.0, peak_mem_mb=10.0),
        accounting.BenchRow("peft_lora", train_ms=4.0, peak_mem_mb=12.0),
    ]
    result = {c["check"]: c["passed"] for c in accounting.compute_checks(rows)}
    assert result["lora step time / full"] and not result["neat step time / lora"]
    assert not result["lora_qkv step time / peft_lora"] and result["lora_qkv peak mem / peft_lora"]
    assert result["lora merged inference / base"]


def test_cli_runs_every_method_and_writes_its_files(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import benchmark

    out = tmp_path / "bench"
    argv = [
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        "img_size=32",
        "patch_size=8",
        "depth=2",
        "embed_dim=48",
        "num_heads=3",
        "--num-classes",
        "5",
        "--methods",
        "all",
        "--batch",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--steps",
        "1",
        "--memory",
        "inprocess",
        "--opt",
        "lora:rank=4",
        "--out",
        str(out),
        "--plot",
    ]
    assert benchmark.main(argv) == 0
    records = json.loads((out / "benchmark.json").read_text())
    names = [r["method"] for r in records]
    assert set(petl_zoo.method_names()) <= set(names)
    assert {"base", "peft_lora", "lora_qkv"} <= set(names)
    keys = {
        "method",
        "trainable_params",
        "stored_bytes",
        "gmacs",
        "gmacs_torch",
        "train_img_per_s",
        "peak_mem_mb",
        "infer_ms",
        "infer_ms_merged",
    }
    for r in records:
        assert keys <= set(r)
        assert r["gmacs"] > 0 and r["infer_ms"] > 0
        if r["method"] != "base":
            assert r["train_img_per_s"] > 0 and r["stored_bytes"] > 0
    by = {r["method"]: r for r in records}
    assert by["lora"]["method_params"] == 2 * 2 * (4 * 48 + 48 * 4)  # --opt reached the method
    assert by["adapter"]["infer_ms_merged"] is None and by["lora"]["infer_ms_merged"] is not None
    assert by["lora"]["gmacs_merged"] == pytest.approx(by["base"]["gmacs"], rel=1e-12)
    assert (out / "benchmark.csv").read_text().splitlines()[0].startswith("method,")
    assert (out / "benchmark.png").stat().st_size > 1000
    assert json.loads((out / "checks.json").read_text())["checks"]


ARCH = {k: v for k, v in TINY.items() if k != "num_classes"}
TINY_ARGV = ["--model", "vit_tiny_patch16_224", "--model-kwargs"] + [f"{k}={v}" for k, v in ARCH.items()]


def tiny_weights(path: Path, num_classes: int = 5, seed: int = 3) -> dict[str, torch.Tensor]:
    """A tiny ViT's state dict saved as ``path`` (.safetensors); returns the tensors."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = timm.create_model("vit_tiny_patch16_224", **ARCH, num_classes=num_classes).state_dict()
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(path))
    return state


def test_model_factory_loads_the_file_and_gives_the_same_weights_every_call(tmp_path):
    ref = tiny_weights(tmp_path / "w.safetensors")
    factory = accounting.model_factory("vit_tiny_patch16_224", 5, ARCH, tmp_path / "w.safetensors")
    a, b = factory().state_dict(), factory().state_dict()
    assert set(a) == set(ref) and all(torch.equal(a[k], b[k]) for k in a)
    body = [k for k in ref if not k.startswith("head.")]  # timm re-initialises a file's head (build_backbone)
    assert all(torch.equal(a[k], ref[k]) for k in body)
    random_a = accounting.model_factory("vit_tiny_patch16_224", 5, ARCH)().state_dict()
    random_b = accounting.model_factory("vit_tiny_patch16_224", 5, ARCH)().state_dict()
    assert all(torch.equal(random_a[k], random_b[k]) for k in random_a)  # seed 0
    assert not torch.equal(random_a["blocks.0.attn.qkv.weight"], ref["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="not in the file|cannot load"):
        accounting.model_factory("vit_tiny_patch16_224", 5, {**ARCH, "depth": 3}, tmp_path / "w.safetensors")


def test_module_entry_point_and_prog(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "petl_zoo.accounting", "--help"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.startswith("usage: python -m petl_zoo.accounting") and "--pretrained-file" in proc.stdout
    )
    assert build_parser("petl-zoo bench").format_usage().startswith("usage: petl-zoo bench")
    with pytest.raises(SystemExit) as err:
        cli_main(TINY_ARGV + ["--model-kwargs", "num_classes=3"], prog="petl-zoo bench")
    assert err.value.code == 2


def bench_neat_module():
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_neat

    return bench_neat


def test_bench_neat_builds_its_backbone_through_build_backbone(tmp_path):
    bench_neat = bench_neat_module()
    ref = tiny_weights(tmp_path / "w.safetensors", num_classes=7)
    args = bench_neat.build_parser().parse_args(
        TINY_ARGV + ["--pretrained-file", str(tmp_path / "w.safetensors")]
    )
    args.model_kwargs = ARCH
    state = bench_neat.build(args).state_dict()
    body = [k for k in ref if not k.startswith("head.")]
    assert all(torch.equal(state[k], ref[k]) for k in body)  # the file's weights
    assert state["head.weight"].shape == (10, 48)  # --num-classes 10: build_backbone drops the 7-class head
    args.model_kwargs = {**ARCH, "embed_dim": 64, "num_heads": 4}
    with pytest.raises(ValueError, match="cannot load pretrained file"):
        bench_neat.build(args)
    assert bench_neat.backbone_spec("proxy", {"depth": 2}) == (
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 4, "depth": 2},
    )


def test_bench_neat_runs_with_a_file_and_notes_random_weights_without(tmp_path, capsys):
    bench_neat = bench_neat_module()
    tiny_weights(tmp_path / "w.safetensors")
    cheap = [
        "--batch",
        "2",
        "--rank",
        "2",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--num-classes",
        "5",
    ]
    out = tmp_path / "out"
    argv = TINY_ARGV + cheap + ["--pretrained-file", str(tmp_path / "w.safetensors"), "--out", str(out)]
    assert bench_neat.main(argv) == 0
    result = json.loads((out / "bench_neat.json").read_text())
    assert result["setting"]["pretrained_file"] == str(tmp_path / "w.safetensors")
    assert set(result["median_ms"]) == set(bench_neat.VARIANTS) and result["trainable"]["neat"] > 0
    assert "random weights" not in capsys.readouterr().err
    assert bench_neat.main(TINY_ARGV + cheap) == 0
    assert "random weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_neat.main(TINY_ARGV + cheap + ["--pretrained-file", str(tmp_path / "missing.safetensors")])
    assert "does not exist" in capsys.readouterr().err
