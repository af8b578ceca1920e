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


# ------------------------------------------------------------------------- run integrity and bad input
CHEAP = ["--num-classes", "5", "--batch", "2", "--warmup", "0", "--steps", "1", "--no-flops"]


def bench_argv(out: Path, methods: str = "lora,full", repeats: int = 2, memory: str = "off") -> list[str]:
    return TINY_ARGV + CHEAP + ["--methods", methods, "--repeats", str(repeats), "--memory", memory]


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def never_timed(*args, **kwargs):
    raise AssertionError("the benchmark started although --out cannot be written")


def test_out_under_a_regular_file_fails_in_one_line_before_any_timing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("petl_zoo.accounting.cli.run_benchmark", never_timed)
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    out = blocker / "bench"
    assert cli_main(bench_argv(out) + ["--out", str(out)]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"error: --out {out}: {blocker} is a file, not a folder"
    monkeypatch.setenv("PETL_ZOO_DEBUG", "1")  # the traceback on request
    with pytest.raises(accounting.OutputError, match="is a file"):
        cli_main(bench_argv(out) + ["--out", str(out)])


def test_unwritable_out_fails_in_one_line_before_any_timing(tmp_path, monkeypatch, capsys):
    # Root bypasses a chmod, so the refusal is injected where files are created (os.open).
    monkeypatch.setattr("petl_zoo.accounting.cli.run_benchmark", never_timed)
    out = tmp_path / "readonly"
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    assert cli_main(bench_argv(out) + ["--out", str(out)]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"error: --out {out} is not writable: Permission denied"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a 0o500 folder anyway")
def test_read_only_out_folder_fails_before_any_timing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("petl_zoo.accounting.cli.run_benchmark", never_timed)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert cli_main(bench_argv(out) + ["--out", str(out)]) == 1
    finally:
        out.chmod(0o700)
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: --out {out} is not writable")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_and_rounds_are_appended_as_measured_and_match_the_report(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli_main(bench_argv(out, repeats=3) + ["--out", str(out)]) == 0
    rows, rounds = read_jsonl(out / "rows.jsonl"), read_jsonl(out / "rounds.jsonl")
    assert [r["method"] for r in rows] == ["base", "lora", "full"]
    assert rows == json.loads((out / "benchmark.json").read_text())  # per-round times included
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["times"]["lora"]["train"] for r in rounds] == rows[1]["train_times"]
    assert "train_times" not in (out / "benchmark.csv").read_text().splitlines()[0]
    (check,) = [
        c
        for c in json.loads((out / "checks.json").read_text())["checks"]
        if c["check"] == "lora step time / full"
    ]
    ratios = [a / b for a, b in zip(rows[1]["train_times"], rows[2]["train_times"])]
    assert check["rounds"] == 3 and check["low"] == min(ratios) and check["high"] == max(ratios)
    assert check["verdict"] in ("PASS", "FAIL", "inconclusive")
    assert "n=3; target < 1)" in capsys.readouterr().out


def test_a_crash_mid_run_keeps_the_rows_and_rounds_done(tmp_path, monkeypatch):
    def memory(name, *args, **kwargs):
        if name == "full":
            raise RuntimeError("killed while measuring full")
        return 12.5

    monkeypatch.setattr("petl_zoo.accounting.runner.measure_memory", memory)
    out = tmp_path / "bench"
    with pytest.raises(RuntimeError, match="killed"):  # a crash, not a user error: traceback kept
        cli_main(bench_argv(out, memory="inprocess") + ["--out", str(out)])
    rows = read_jsonl(out / "rows.jsonl")
    assert [r["method"] for r in rows] == ["base", "lora"]
    assert rows[1]["peak_mem_mb"] == 12.5 and len(rows[1]["train_times"]) == 2
    assert len(read_jsonl(out / "rounds.jsonl")) == 2
    assert not (out / "benchmark.json").exists()


def test_a_full_disk_at_the_end_still_prints_the_table_and_keeps_the_rows(tmp_path, monkeypatch, capsys):
    import errno

    from petl_zoo.accounting import outputs

    real = outputs.atomic_write_text

    def full_disk(path, text):
        if Path(path).name == "benchmark.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, text)

    monkeypatch.setattr(outputs, "atomic_write_text", full_disk)
    out = tmp_path / "bench"
    assert cli_main(bench_argv(out) + ["--out", str(out)]) == 1
    captured = capsys.readouterr()
    (line,) = error_lines(captured.err)
    assert line == f"error: cannot write {out / 'benchmark.json'}: No space left on device"
    assert "| lora |" in captured.out and "Checks:" in captured.out
    assert [r["method"] for r in read_jsonl(out / "rows.jsonl")] == ["base", "lora", "full"]


def test_a_short_append_is_cut_back_and_later_rows_go_to_stdout_only(tmp_path, monkeypatch, caplog):
    log = accounting.ProgressLog(tmp_path / "bench")
    log.row(accounting.BenchRow("base", infer_ms=1.0, infer_times=[0.001]))
    real_write = os.write

    def half_write(fd, data):  # a full disk: the kernel takes only part of the line
        if os.readlink(f"/proc/self/fd/{fd}").endswith("rows.jsonl"):
            return real_write(fd, data[: len(data) // 2])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_write)
    log.row(accounting.BenchRow("lora", train_ms=2.0, train_times=[0.002]))
    monkeypatch.setattr(os, "write", real_write)
    log.row(accounting.BenchRow("full", train_ms=3.0))
    assert [r["method"] for r in read_jsonl(tmp_path / "bench" / "rows.jsonl")] == ["base"]
    assert log.failed and "cannot append" in caplog.text


def test_unknown_method_and_missing_weights_are_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        cli_main(
            bench_argv(tmp_path / "b", methods="lora,nope") + ["--out", str(tmp_path / "b")], prog="bench"
        )
    assert err.value.code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: unknown method 'nope'; valid: all,") and line.endswith(
        "(see bench --help)"
    )
    missing = tmp_path / "missing.safetensors"
    argv = bench_argv(tmp_path / "b") + ["--out", str(tmp_path / "b"), "--pretrained-file", str(missing)]
    assert cli_main(argv) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert str(missing) in line


def timed_row(method: str, train: list[float] | None = None, infer: list[float] | None = None, **kw):
    """A row as the runner leaves it: per-round seconds and their medians in ms."""
    import statistics

    row = accounting.BenchRow(method, train_times=train or [], infer_times=infer or [], **kw)
    if train:
        row.train_ms = 1e3 * statistics.median(train)
    if infer:
        row.infer_ms = 1e3 * statistics.median(infer)
    if row.merged_times:
        row.infer_ms_merged = 1e3 * statistics.median(row.merged_times)
    return row


def test_timing_checks_report_the_band_and_are_inconclusive_when_it_straddles_the_target():
    rows = [
        timed_row("base", infer=[1.0, 1.0, 1.0]),
        timed_row("full", train=[1.0, 1.0, 1.0]),
        timed_row("lora", train=[0.50, 0.60, 0.55]),
        # median ratio 0.60 / 0.55 = 1.09 passes 1.15, but round 2 (0.75 / 0.60 = 1.25) misses it
        timed_row("neat", train=[0.55, 0.75, 0.60]),
        timed_row("bitfit", train=[0.9, 0.9, 0.9], merged_times=[1.20, 1.30, 1.25]),
        # same counts, noisy step times: the count checks stay exact
        timed_row("lora_qkv", train=[0.4, 0.9, 0.5], method_params=64, gmacs=0.5, peak_mem_mb=10.0),
        timed_row("peft_lora", train=[0.6, 0.5, 0.6], method_params=64, gmacs=0.5, peak_mem_mb=11.0),
    ]
    checks = {c["check"]: c for c in accounting.compute_checks(rows)}
    lora = checks["lora step time / full"]
    assert lora["verdict"] == "PASS" and lora["passed"] is True
    assert (lora["low"], lora["high"], lora["rounds"]) == (0.5, 0.6, 3)
    neat = checks["neat step time / lora"]
    assert neat["value"] == pytest.approx(0.60 / 0.55) and neat["high"] == pytest.approx(1.25)
    assert neat["verdict"] == "inconclusive" and neat["passed"] is None
    bitfit = checks["bitfit merged inference / base"]
    assert bitfit["verdict"] == "FAIL" and bitfit["low"] == pytest.approx(1.2)
    assert checks["lora_qkv step time / peft_lora"]["verdict"] == "inconclusive"
    for name in ("method params", "GMACs", "peak mem"):
        exact = checks[f"lora_qkv {name} / peft_lora"]
        assert exact["verdict"] == "PASS" and "rounds" not in exact
    rows[-1].method_params = 65
    assert {c["check"]: c for c in accounting.compute_checks(rows)}["lora_qkv method params / peft_lora"][
        "verdict"
    ] == "FAIL"
    text = accounting.format_table(rows, list(checks.values()))
    assert "- [inconclusive] neat step time / lora: 1.091 (rounds 1.091-1.250, n=3; target <= 1.15)" in text
    assert "- [PASS] lora_qkv method params / peft_lora: 1.000 (target == 1)" in text
    # lora / lora_qkv: 0.55 / 0.5 = 1.1 (rounds 0.67-1.25), lora / peft_lora 0.92 (rounds 0.83-1.2)
    assert (
        "- [inconclusive] lora step time / lora_qkv: 1.100 (rounds 0.667-1.250, n=3; target <= 1.05)" in text
    )
    assert (
        "- [inconclusive] lora step time / peft_lora: 0.917 (rounds 0.833-1.200, n=3; target <= 0.9)" in text
    )
    assert accounting.check_summary(list(checks.values())).startswith("8 PASS, 1 FAIL, 4 inconclusive (")
