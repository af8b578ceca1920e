"""Sweep: runs every task, skips finished runs, resumes killed ones, survives a failing run, prints commands."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest

from petl_zoo.sweep import plan_sweep, resolve_tasks

ROOT = Path(__file__).resolve().parents[1]
SWEEP = str(ROOT / "tools" / "sweep.py")

# A stand-in for tools/train.py with its CLI contract: logs its argv, fails for $FAIL_TASK, refuses
# --resume without last.pt, writes result.json into --out.
FAKE_TRAIN = textwrap.dedent(
    """
    import argparse, json, os, sys
    p = argparse.ArgumentParser()
    for flag in ("--method", "--model", "--task", "--out", "--data-root", "--seed", "--epochs"):
        p.add_argument(flag)
    p.add_argument("--opt", action="append", default=[])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    a, _ = p.parse_known_args()
    with open(os.environ["SWEEP_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    if a.task == os.environ.get("FAIL_TASK"):
        sys.exit(3)
    if a.resume and not any(os.path.exists(os.path.join(a.out, f)) for f in ("last.pt", "config.json")):
        sys.exit(4)
    os.makedirs(a.out, exist_ok=True)
    res = {"method": a.method, "model": a.model, "task": a.task, "seed": int(a.seed or 0),
           "test_acc_best": 0.5, "test_acc_last": 0.4, "trainable_params": {"method": 10}}
    json.dump(res, open(os.path.join(a.out, "result.json"), "w"))
    """
)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("SWEEP_LOG", str(log))
    monkeypatch.delenv("FAIL_TASK", raising=False)
    return script, log


def _load_cli():
    spec = importlib.util.spec_from_file_location("sweep_cli", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_cli()


def sweep(*args: str) -> subprocess.CompletedProcess:
    """Run tools/sweep.py's main in this process (no torch re-import per call); train runs stay subprocesses."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = CLI.main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["sweep", *args], rc, out.getvalue(), err.getvalue())


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


TINY_FLAGS = [
    "--model-kwargs", "img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3",
    "--no-pretrained", "--warmup-epochs", "0", "--batch-size", "4", "--no-progress",
]  # fmt: skip
TASKS = ("syn_a", "syn_b", "syn_c")


@pytest.fixture
def tasks(tmp_path) -> Path:
    data = tmp_path / "vtab"
    for i, name in enumerate(TASKS):
        make_synthetic_task(data, name, seed=i)
    return data


def sweep_args(tmp_path, data, script, *extra):
    return [
        "--method", "lora", "--model", "vit_tiny_patch16_224", "--tasks", ",".join(TASKS),
        "--out-root", str(tmp_path / "runs"), "--data-root", str(data), "--train-script", str(script),
        "--", *TINY_FLAGS, "--opt", "rank=2", *extra,
    ]  # fmt: skip


def write_trainer_configs(tmp_path, data, *extra):
    """What the real trainer writes next to result.json (the stand-in does not): config.json with the
    fingerprints of its command line."""
    from petl_zoo.io import atomic_write_json
    from petl_zoo.train.spec import expected_config

    extra_args = [*TINY_FLAGS, "--opt", "rank=2", *extra]
    for run in plan_sweep(
        "lora", "vit_tiny_patch16_224", TASKS, out_root=tmp_path / "runs", data_root=str(data),
        extra_args=extra_args,
    ):  # fmt: skip
        atomic_write_json(run.out / "config.json", expected_config(run.train_args))


def test_sweep_runs_then_skips(tmp_path, fake, tasks):
    script, log = fake
    args = sweep_args(tmp_path, tasks, script, "--epochs", "1")
    first = sweep(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert [c[c.index("--task") + 1] for c in calls(log)] == list(TASKS)
    assert all(c[-4:] == ["--opt", "rank=2", "--epochs", "1"] for c in calls(log))
    for t in TASKS:
        assert (tmp_path / "runs" / "lora" / t / "result.json").is_file()
    write_trainer_configs(tmp_path, tasks, "--epochs", "1")
    second = sweep(*args)
    assert second.returncode == 0 and len(calls(log)) == 3  # nothing re-ran
    assert second.stdout.count("[skip]") == 3 and "0 ran, 3 skipped" in second.stdout


def test_sweep_refuses_runs_of_other_settings_unless_overwrite(tmp_path, fake, tasks):
    script, log = fake
    assert sweep(*sweep_args(tmp_path, tasks, script, "--epochs", "1")).returncode == 0
    write_trainer_configs(tmp_path, tasks, "--epochs", "1")
    changed = sweep(*sweep_args(tmp_path, tasks, script, "--epochs", "2", "--lr", "0.01", "--opt", "rank=4"))
    assert changed.returncode == 1 and len(calls(log)) == 3  # refused, not skipped as done, not run
    assert "0 ran, 0 skipped (result.json), 0 busy, 3 refused, 0 failed" in changed.stdout
    refused = [line for line in changed.stdout.splitlines() if line.startswith("  REFUSED")]
    assert len(refused) == 3 and all(": other settings: " in line for line in refused)
    assert all(line.endswith("; --overwrite replaces it") for line in refused)
    for key in ("method_options.rank: 2 -> 4", "recipe.epochs: 1 -> 2", "recipe.lr: 0.001 -> 0.01"):
        assert all(key in line for line in refused), (key, refused[0])
    printed = sweep("--print-commands", *sweep_args(tmp_path, tasks, script, "--epochs", "2"))
    assert printed.stdout == "" and printed.stderr.count("# left out") == 3  # not commands that would fail
    seed = sweep(*sweep_args(tmp_path, tasks, script, "--epochs", "1", "--seed", "1"))
    assert seed.returncode == 1 and "recipe.seed: 0 -> 1" in seed.stdout  # a folder holds one seed
    again = sweep("--overwrite", *sweep_args(tmp_path, tasks, script, "--epochs", "2"))
    assert again.returncode == 0 and "3 ran" in again.stdout, again.stdout
    assert all("--overwrite" in c for c in calls(log)[3:]) and len(calls(log)) == 6


def test_sweep_refuses_a_finished_run_it_cannot_check(tmp_path, fake, tasks):
    script, log = fake
    done = tmp_path / "runs" / "lora" / "syn_a"
    done.mkdir(parents=True)
    (done / "result.json").write_text('{"method": "lora", "test_acc')  # truncated
    (tmp_path / "runs" / "lora" / "syn_b").mkdir()
    (tmp_path / "runs" / "lora" / "syn_b" / "result.json").write_text("{}")  # no recorded settings
    proc = sweep(*sweep_args(tmp_path, tasks, script, "--epochs", "1"))
    assert proc.returncode == 1 and [c[c.index("--task") + 1] for c in calls(log)] == ["syn_c"]
    assert (
        f"REFUSED {done}: cannot check its settings: run result {done / 'result.json'} is not valid JSON ("
        in proc.stdout
    )
    assert "cannot check its settings: no config.json nor recorded fingerprint" in proc.stdout


def test_sweep_stops_at_once_when_the_output_root_cannot_be_written(tmp_path, fake, tasks, monkeypatch):
    import errno
    import os

    import petl_zoo.io as pio

    script, log = fake
    (tmp_path / "runs").write_text("a file where the runs should go")
    proc = sweep(*sweep_args(tmp_path, tasks, script, "--epochs", "1"))
    assert proc.returncode == 1 and calls(log) == []
    runs = tmp_path / "runs"
    assert proc.stderr == (
        f"error: cannot write the output root {runs}: {runs} is a file, not a folder; nothing was run\n"
    )
    (tmp_path / "runs").unlink()

    def full(path, mode):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pio, "open_for_write", full)
    proc = sweep(*sweep_args(tmp_path, tasks, script, "--epochs", "1"))
    assert proc.returncode == 1 and calls(log) == []
    assert (
        proc.stderr
        == f"error: cannot write the output root {runs}: no space left on device; nothing was run\n"
    )


def test_killed_run_resumes_and_failures_are_reported(tmp_path, fake, monkeypatch):
    script, log = fake
    runs = tmp_path / "runs"
    (runs / "adapter" / "syn_b").mkdir(parents=True)
    (runs / "adapter" / "syn_b" / "last.pt").write_bytes(b"")
    (runs / "adapter" / "syn_d").mkdir(parents=True)
    (runs / "adapter" / "syn_d" / "config.json").write_text("{}")  # killed before its first checkpoint
    monkeypatch.setenv("FAIL_TASK", "syn_a")
    proc = sweep(
        "--method",
        "adapter",
        "--tasks",
        "syn_a,syn_b,syn_c,syn_d",
        "--out-root",
        str(runs),
        "--train-script",
        str(script),
    )
    assert proc.returncode == 1
    by_task = {c[c.index("--task") + 1]: c for c in calls(log)}
    assert "--resume" in by_task["syn_b"] and "--resume" not in by_task["syn_c"]
    assert "--resume" in by_task["syn_d"]
    assert (runs / "adapter" / "syn_c" / "result.json").is_file()  # the sweep went on after the crash
    assert "1 failed" in proc.stdout and "FAILED" in proc.stdout and "exit status 3" in proc.stdout


def test_seeds_get_folders_and_print_commands(tmp_path):
    runs = tmp_path / "runs"
    done = runs / "lora" / "dtd" / "seed1"
    done.mkdir(parents=True)
    (done / "result.json").write_text("{}")
    proc = sweep(
        "--method",
        "lora",
        "--model",
        "vit_base_patch16_224",
        "--tasks",
        "natural",
        "--seeds",
        "0",
        "1",
        "--out-root",
        str(runs),
        "--data-root",
        "/data/vtab",
        "--print-commands",
        "--launcher",
        "torchrun --nproc_per_node 8",
        "--",
        "--opt",
        "rank=8",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 7 * 2 - 1  # the finished dtd seed1 is left out
    argv = shlex.split(lines[0])
    assert argv[:5] == ["torchrun", "--nproc_per_node", "8", "-m", "petl_zoo.train"]
    assert argv[argv.index("--task") + 1] == "cifar" and argv[argv.index("--seed") + 1] == "0"
    assert argv[argv.index("--out") + 1] == str(runs / "lora" / "cifar" / "seed0")
    assert argv[argv.index("--data-root") + 1] == "/data/vtab" and argv[-2:] == ["--opt", "rank=8"]
    assert not any("dtd/seed1" in line for line in lines)


def test_single_seed_folder_and_task_specs(tmp_path):
    runs = plan_sweep("lora", "vit_base_patch16_224", ["dtd"], seeds=[3], out_root=tmp_path)
    assert runs[0].out == tmp_path / "lora" / "dtd" and runs[0].argv[-4:] == [
        "--seed",
        "3",
        "--out",
        str(runs[0].out),
    ]
    assert len(resolve_tasks("all")) == 19
    assert resolve_tasks("specialized") == ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]
    assert len(resolve_tasks("structured")) == 8
    assert resolve_tasks("dtd,cifar100,pets,dtd") == ["dtd", "cifar", "oxford_iiit_pet"]
    assert resolve_tasks("natural,my_custom_task")[-1] == "my_custom_task"
    with pytest.raises(ValueError, match="no task"):
        resolve_tasks(" , ")
    bad = sweep("--method", "no_such_method", "--tasks", "dtd", "--print-commands")
    assert bad.returncode == 2 and "valid methods" in bad.stderr
    with pytest.raises(ValueError, match="repeat"):
        plan_sweep("lora", "m", ["dtd"], seeds=[1, 1])


TRAIN = ROOT / "tools" / "train.py"


def make_synthetic_task(root: Path, name: str, classes: int = 3, seed: int = 0) -> None:
    """A custom task folder: tiny class-coloured 32x32 PNGs and the four VTAB list files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "images").mkdir(parents=True)
    lists: dict[str, list[str]] = {}
    for split, n in (("train800", 6), ("val200", 3), ("test", 6)):
        lines = []
        for i in range(n):
            label = i % classes
            img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            img[..., label] += 150
            rel = f"images/{split}_{i}.png"
            Image.fromarray(img).save(folder / rel)
            lines.append(f"{rel} {label}")
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.slow  # three real train.py subprocesses: ~20 s of CPU, more wall time on busy cores
@pytest.mark.skipif(not TRAIN.is_file(), reason="tools/train.py (the trainer) has not landed yet")
def test_real_sweep_three_synthetic_tasks_then_skip_then_table(tmp_path):
    from petl_zoo.results.aggregate import compute_table
    from petl_zoo.results.collect import build_rows, collect_results

    data = tmp_path / "vtab"
    for i, name in enumerate(("syn_a", "syn_b", "syn_c")):
        make_synthetic_task(data, name, seed=i)
    args = [
        "--method",
        "lora",
        "--model",
        "vit_tiny_patch16_224",
        "--tasks",
        "syn_a,syn_b,syn_c",
        "--out-root",
        str(tmp_path / "runs"),
        "--data-root",
        str(data),
        "--",
        "--model-kwargs",
        "img_size=32",
        "patch_size=8",
        "depth=2",
        "embed_dim=48",
        "num_heads=3",
        "--no-pretrained",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--batch-size",
        "4",
        "--no-progress",
        "--opt",
        "rank=2",
    ]
    first = sweep(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = collect_results(tmp_path / "runs")
    assert sorted(r.task for r in results) == ["syn_a", "syn_b", "syn_c"]
    assert all(
        0.0 <= r.result["test_acc_best"] <= 1.0 and r.result["trainable_params"]["method"] > 0
        for r in results
    )
    second = sweep(*args)
    assert second.returncode == 0 and "0 ran, 3 skipped" in second.stdout
    # the recorded fingerprints of the real trainer's runs: another recipe is refused, not skipped
    changed = sweep(*args, "--epochs", "2")
    assert changed.returncode == 1 and "0 ran, 0 skipped (result.json), 0 busy, 3 refused" in changed.stdout
    assert changed.stdout.count("other settings: recipe.epochs: 1 -> 2; --overwrite replaces it") == 6
    table = compute_table(build_rows(collect_results(tmp_path / "runs")), "last")
    ((row, cells),) = table.rows
    assert row.method == "lora" and all(cells[t].mean is not None for t in ("syn_a", "syn_b", "syn_c"))
    # A card from a real run folder parses back with its result, and its adapter loads.
    from huggingface_hub import ModelCard

    from petl_zoo.cards import METRIC_LAST, write_card

    run = tmp_path / "runs" / "lora" / "syn_a"
    card = ModelCard.load(write_card(run, tmp_path / "cards" / "lora" / "syn_a"))
    last = json.loads((run / "result.json").read_text())["test_acc_last"]
    assert {e.metric_name: e.metric_value for e in card.data.eval_results}[METRIC_LAST] == round(
        100 * last, 2
    )
    assert "--task syn_a" in card.text and "--no-pretrained" in card.text
