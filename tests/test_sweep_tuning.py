"""Sweep tuning: grids, default lr grids, the selection rule, the tuned protocol end to end (points on
val200, winner retrained over seeds), rerun / resume, --print-commands, and submitit jobs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from test_sweep import FAKE_TRAIN, TINY_FLAGS, calls, make_synthetic_task, sweep

from petl_zoo.sweep.tuning import (
    DEFAULT_LR_GRID,
    LR_GRIDS,
    RULE,
    build_grid,
    choose_winner,
    edge_axes,
    grid_fingerprint,
    grid_settings,
    lr_grid,
    parse_grid,
    setting_flags,
    setting_name,
)

MODEL = "vit_tiny_patch16_224"


# ------------------------------------------------------------------------------------ grids
def test_grid_items_parse_with_types_aliases_and_clear_errors():
    grid = parse_grid(["lr=1e-3,5e-3", "wd=1e-4", "batch-size=8,16"], ["rank=4,8", "targets=q,v|qkv"])
    assert grid == {
        "lr": [0.001, 0.005],
        "weight_decay": [0.0001],
        "batch_size": [8, 16],
        "opt.rank": [4, 8],
        "opt.targets": ["q,v", "qkv"],
    }
    assert len(grid_settings(grid)) == 2 * 1 * 2 * 2 * 2
    setting = {"lr": 0.001, "weight_decay": 0.0001, "opt.rank": 4, "opt.targets": "q,v"}
    assert setting_flags(setting) == ["--lr", "0.001", "--weight-decay", "0.0001", "--opt", "rank=4", "--opt", "targets=q,v"]  # fmt: skip
    assert setting_name(setting) == "lr0.001_weight_decay0.0001_rank4_targetsq-v"
    from petl_zoo.sweep.cli import _parser

    repeated = _parser(None).parse_args(
        ["--method", "x", "--grid", "lr=1", "--grid", "wd=2", "--grid-opt", "r=1"]
    )
    assert repeated.grid == ["lr=1", "wd=2"] and repeated.grid_opt == ["r=1"]  # repeated flags add up
    for bad, match in [
        (["momentum=0.9"], "--grid key 'momentum' is invalid; valid: lr, weight_decay"),
        (["lr"], "--grid 'lr' is invalid; valid: KEY=VALUE"),
        (["lr=1e-3,1e-3"], r"repeats a value \(1e-3 and 1e-3 are the same\)"),
        (["lr=1e-3,"], "has an empty value"),
        (["batch_size=8.5"], "batch_size takes int values"),
        (["lr=1e-3", "lr=1e-2"], "given twice"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_grid(bad)


def test_default_lr_axis_and_conflicts_with_the_trainer_flags():
    assert build_grid("neat", {}, []) == {"lr": list(LR_GRIDS["neat"])}
    assert build_grid("lora", {"opt.rank": [4]}, []) == {"lr": list(DEFAULT_LR_GRID), "opt.rank": [4]}
    assert build_grid("lora", {"opt.rank": [4]}, ["--lr", "2e-3"]) == {"opt.rank": [4]}  # lr fixed by hand
    assert build_grid("lora", {"lr": [1e-2]}, []) == {"lr": [1e-2]}
    with pytest.raises(ValueError, match="grid key 'lr' is also set by the trainer flags"):
        build_grid("lora", {"lr": [1e-2]}, ["--lr=1e-3"])
    with pytest.raises(ValueError, match="grid key 'opt.rank' is also set"):
        build_grid("lora", {"opt.rank": [4]}, ["--opt", "rank=8"])
    for flag in ("--seed", "--select-on", "--out", "--no-test"):
        with pytest.raises(
            ValueError, match=f"{flag} in the trainer flags after --: a tuning sets it itself"
        ):
            build_grid("lora", {}, [flag, "1"])


def test_lr_grids_span_the_published_ranges():
    from petl_zoo.presets import load_preset
    from petl_zoo.registry import list_methods

    assert set(LR_GRIDS) <= set(list_methods())
    for method, grid in LR_GRIDS.items():
        assert list(grid) == sorted(set(grid)) and set(DEFAULT_LR_GRID) <= set(grid), method
    ssf = load_preset("ssf")
    lrs = {ssf.for_task(task)[1]["lr"] for task in ssf.tasks}  # the authors' per-task lrs
    assert min(LR_GRIDS["ssf"]) <= min(lrs) and max(lrs) <= max(LR_GRIDS["ssf"])
    assert {5e-3, 1e-2} <= set(LR_GRIDS["neat"])  # the NEAT authors' vision range
    vpt = lr_grid("vpt")  # the default grid; docs/vpt.md: 82.3 at 1e-3, 88.2 at 1e-2
    assert "vpt" not in LR_GRIDS and {1e-3, 1e-2} <= set(vpt)
    assert max(DEFAULT_LR_GRID) >= max(LR_GRIDS["neat"])  # no method gets larger steps than the others


def test_grid_fingerprint_follows_the_base_recipe_not_how_runs_run(tmp_path):
    grid = {"lr": [1e-3, 1e-2]}
    fp = grid_fingerprint("lora", MODEL, grid, ["--epochs", "2"])
    assert len(fp) == 16 and fp == grid_fingerprint("lora", MODEL, grid, ["--epochs=2", "--workers", "3", "--no-progress"])  # fmt: skip
    others = [
        grid_fingerprint("neat", MODEL, grid, ["--epochs", "2"]),
        grid_fingerprint("lora", "vit_small_patch16_224", grid, ["--epochs", "2"]),
        grid_fingerprint("lora", MODEL, {"lr": [1e-3]}, ["--epochs", "2"]),
        grid_fingerprint("lora", MODEL, grid, ["--epochs", "3"]),
        grid_fingerprint("lora", MODEL, grid, ["--epochs", "2", "--protocol", "vtab"]),
    ]
    assert len({fp, *others}) == 6
    weights = tmp_path / "a.safetensors"
    weights.write_bytes(b"x")
    moved = tmp_path / "b.safetensors"
    moved.write_bytes(b"x")
    same = [grid_fingerprint("lora", MODEL, grid, ["--pretrained-file", str(f)]) for f in (weights, moved)]
    assert same[0] == same[1]  # the weights by content, not by path


def test_winner_rule_and_its_ties():
    def pts(*rows):
        return [{"setting": s, "val_accuracy": v} for s, v in rows]

    rows = pts(({"lr": 0.01, "opt.rank": 4}, 90.0), ({"lr": 0.001, "opt.rank": 8}, 91.0))
    assert choose_winner(rows) == {"lr": 0.001, "opt.rank": 8}  # the highest val accuracy
    tie = pts(
        ({"lr": 0.01, "opt.rank": 4}, 91.0),
        ({"lr": 0.001, "opt.rank": 8}, 91.0),
        ({"lr": 0.001, "opt.rank": 4}, 91.0),
        ({"lr": 0.0001, "opt.rank": 2}, 90.5),
    )
    assert choose_winner(tie) == {"lr": 0.001, "opt.rank": 4}  # the smaller lr, then the smaller rank
    # lr first even when the grid lists it later; text values alphabetically after numbers
    later = pts(({"opt.rank": 2, "lr": 0.01}, 80.0), ({"opt.rank": 8, "lr": 0.001}, 80.0))
    assert choose_winner(later) == {"opt.rank": 8, "lr": 0.001}
    text = pts(({"opt.targets": "qkv"}, 70.0), ({"opt.targets": "q,v"}, 70.0))
    assert choose_winner(text) == {"opt.targets": "q,v"}
    assert "ties: the smaller lr" in RULE
    grid = {"lr": [1e-3, 3e-3, 1e-2], "opt.rank": [4, 8], "wd": [1e-4], "opt.targets": ["q", "qkv"]}
    assert edge_axes(grid, {"lr": 1e-2, "opt.rank": 4, "wd": 1e-4, "opt.targets": "q"}) == [
        "lr=0.01 (largest)", "opt.rank=4 (smallest)",
    ]  # fmt: skip
    assert edge_axes(grid, {"lr": 3e-3, "opt.rank": 8}) == ["opt.rank=8 (largest)"]


# ------------------------------------------------------------------------------ end to end
def make_digits_like(root: Path, per_class: tuple[int, int, int] = (3, 2, 1)) -> None:
    """A tiny ``digits`` folder (the catalog's 10-class demo task): scikit-learn digits as 32x32 PNGs,
    ``per_class`` images per class in train800 / val200 / test."""
    from sklearn.datasets import load_digits

    from vtab.sources import digits_image

    data = load_digits()
    folder = root / "digits"
    (folder / "images").mkdir(parents=True)
    lists: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    taken = {c: 0 for c in range(10)}
    bounds = [per_class[0], per_class[0] + per_class[1], sum(per_class)]
    for i, label in enumerate(data.target.tolist()):
        k = taken[label]
        if k >= bounds[-1]:
            continue
        split = "train800" if k < bounds[0] else "val200" if k < bounds[1] else "test"
        taken[label] += 1
        rel = f"images/{split}_{i}.png"
        digits_image(data.images[i]).convert("RGB").save(folder / rel)
        lists[split].append(f"{rel} {label}")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")


TASKS = ("digits", "syn_a", "syn_b")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    make_digits_like(root)
    make_synthetic_task(root, "syn_a", seed=1)
    make_synthetic_task(root, "syn_b", seed=2)
    return root


def tuned_args(out_root: Path, data: Path, *more: str) -> list[str]:
    return [
        "--methods", "lora,neat", "--model", MODEL, "--tasks", ",".join(TASKS), "--seeds", "0", "1",
        "--out-root", str(out_root), "--data-root", str(data), "--grid", "lr=1e-3,3e-2", "--grid-opt",
        "rank=2,4", *more, "--", *TINY_FLAGS, "--epochs", "2",
    ]  # fmt: skip


def records(out_root: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(out_root).parent.parent): json.loads(p.read_text())
        for p in sorted(out_root.glob("*/*/tune-*/selection.json"))
    }


def check_records(out_root: Path) -> None:
    """Every selection record follows the rule on the val accuracies the points recorded, and the
    retrained runs are the winner's, one per seed, tested (select_on test)."""
    recs = records(out_root)
    assert sorted(recs) == [f"{m}/{t}" for m in ("lora", "neat") for t in sorted(TASKS)]
    for key, rec in recs.items():
        folder = next((out_root / key).glob("tune-*"))
        assert rec["version"] == 1 and rec["grid_fingerprint"] == folder.name[len("tune-") :]
        assert (rec["method"], rec["task"]) == tuple(key.split("/")) and rec["rule"] == RULE
        assert rec["grid"] == {"lr": [0.001, 0.03], "opt.rank": [2, 4]} and len(rec["points"]) == 4
        for point in rec["points"]:
            result = json.loads((folder / point["folder"] / "result.json").read_text())
            assert result["select_on"] == "val" and result["seed"] == 0
            assert result["test_acc_last"] is None and result["test_acc_best"] is None  # --no-test
            assert point["val_accuracy"] == round(100 * result["val_acc_last"], 4)
        best = max(p["val_accuracy"] for p in rec["points"])
        tied = [p["setting"] for p in rec["points"] if p["val_accuracy"] == best]
        assert rec["winner"] == min(tied, key=lambda s: (s["lr"], s["opt.rank"]))
        assert rec["retrained"] == [{"seed": 0, "folder": "seed0"}, {"seed": 1, "folder": "seed1"}]
        for entry in rec["retrained"]:
            config = json.loads((folder / entry["folder"] / "config.json").read_text())
            result = json.loads((folder / entry["folder"] / "result.json").read_text())
            assert result["select_on"] == "test" and result["seed"] == entry["seed"]
            assert config["recipe"]["lr"] == rec["winner"]["lr"]
            assert config["method_options"]["rank"] == rec["winner"]["opt.rank"]


def check_table_and_plot(runs: Path, plot: Path) -> None:
    """The table of a tuned sweep: one tuned row per method over the three tasks (grid points left
    out), both averaging conventions labelled, the selection shown; the plot written as PNG and SVG
    (with the published rows: these rows over demo tasks are not plotted)."""
    import contextlib
    import io

    from petl_zoo.results.cli import main as table

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        # --published: the plot sets rows over the 19 tasks only against each other, and these rows are
        # over demo tasks (left out of the plot); the published rows are drawn
        assert table([str(runs), "--selection", "--published", "all", "--plot", str(plot)]) == 0
    out = text.getvalue()
    assert "Mean of groups" in out and "Mean of tasks" in out
    tables, selections = out.split("**Selection", 1)[0], out.count("**Selection: ")
    rows = [line for line in tables.splitlines() if line.startswith(("| lora", "| neat"))]
    assert len(rows) == 4 and rows == [r for r in rows if "tuned on val200" in r]  # last + best, no points
    assert selections == 6 and out.count("| winner |") == 6
    assert plot.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in plot.with_suffix(".svg").read_bytes()[:2000]


@pytest.mark.slow  # 36 tiny runs in-process, twice (about 15 s on 2 busy cores)
def test_tuned_protocol_end_to_end_rerun_and_resume(tmp_path, data):
    from petl_zoo.train import main as train

    runs = tmp_path / "runs"
    first = sweep(*tuned_args(runs, data, "--in-process"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert "sweep: 36 ran, 0 skipped" in first.stdout and "(36/36 runs done)" in first.stdout
    assert first.stdout.count("[selected]") == 6 and "ETA" in first.stdout
    check_records(runs)
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("selection.json")}
    again = sweep(*tuned_args(runs, data, "--in-process"))
    assert again.returncode == 0 and "sweep: 0 ran, 36 skipped" in again.stdout  # a rerun runs nothing
    assert "[start]" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("selection.json")} == stamps  # nor writes
    check_table_and_plot(runs, tmp_path / "plot")

    # Killed mid-way: stopped after 7 runs, and the next point killed during its first epoch.
    other = tmp_path / "killed"
    stopped = sweep(*tuned_args(other, data, "--in-process", "--stop-after-runs", "7"))
    assert stopped.returncode == 1 and "STOPPED: stopped after 7 runs" in stopped.stdout
    assert not list(other.rglob("selection.json"))  # the points of other tunings are still to run
    printed = sweep("--print-commands", *tuned_args(other, data))
    nxt = shlex.split(printed.stdout.splitlines()[0])
    assert train([*nxt[nxt.index("--method") :], "--stop-after-epoch", "1"]) == 137  # killed after epoch 1
    killed = Path(nxt[nxt.index("--out") + 1])
    assert (killed / "last.pt").is_file() and not (killed / "result.json").exists()
    resumed = sweep(*tuned_args(other, data, "--in-process"))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "sweep: 29 ran, 7 skipped" in resumed.stdout and f"[start] resume {killed}" in resumed.stdout
    check_records(other)
    assert records(other) == records(runs)  # the same selection, val accuracies and winners


def test_print_commands_show_the_points_then_the_retrained_runs(tmp_path, data):
    runs = tmp_path / "runs"
    args = [
        "--method", "lora", "--model", MODEL, "--tasks", "syn_a", "--out-root", str(runs), "--data-root",
        str(data), "--grid", "lr=1e-3,3e-2", "--seeds", "3", "4", "--launcher", "torchrun --nproc_per_node 2",
        "--print-commands", "--", *TINY_FLAGS, "--epochs", "1",
    ]  # fmt: skip
    printed = sweep(*args)
    assert printed.returncode == 0, printed.stderr
    lines = [shlex.split(line) for line in printed.stdout.splitlines()]
    assert len(lines) == 2 and all(
        a[:5] == ["torchrun", "--nproc_per_node", "2", "-m", "petl_zoo.train"] for a in lines
    )
    assert [a[a.index("--lr") + 1] for a in lines] == ["0.001", "0.03"]
    assert all(
        a[a.index("--seed") + 1] == "3" and a[-3:] == ["--select-on", "val", "--no-test"] for a in lines
    )
    outs = [Path(a[a.index("--out") + 1]) for a in lines]
    assert [o.name for o in outs] == ["lr0.001", "lr0.03"] and outs[
        0
    ].parent.parent.parent == runs / "lora" / "syn_a"
    # --preset goes to every trainer run and is part of the grid fingerprint: its own tune- folder
    preset = [
        "--method",
        "ssf",
        "--tasks",
        "syn_a",
        "--out-root",
        str(runs),
        "--grid",
        "lr=1e-3",
        "--print-commands",
    ]
    plain_cmd, preset_cmd = (
        shlex.split(sweep(*preset, *more).stdout) for more in ([], ["--preset", "paper"])
    )
    assert "--preset" not in plain_cmd and preset_cmd[preset_cmd.index("--preset") + 1] == "paper"
    tune_dirs = {Path(c[c.index("--out") + 1]).parent.parent.name for c in (plain_cmd, preset_cmd)}
    assert len(tune_dirs) == 2
    bad = sweep(
        "--method", "lora", "--tasks", "syn_a", "--grid", "lr=1e-3", "--print-commands", "--", "--lr", "1e-3"
    )
    assert bad.returncode == 2 and "grid key 'lr' is also set by the trainer flags" in bad.stderr


@pytest.mark.slow  # three real trainer subprocesses as submitit jobs (about 15 s)
def test_submitit_local_jobs_tune_then_retrain_then_skip(tmp_path, data):
    pytest.importorskip("submitit")
    runs = tmp_path / "runs"
    args = [
        "--method", "lora", "--model", MODEL, "--tasks", "syn_a", "--out-root", str(runs), "--data-root",
        str(data), "--grid", "lr=1e-3,3e-2", "--seeds", "0", "--launcher", "submitit", "--submitit-cluster",
        "local", "--slurm-time", "10", "--", *TINY_FLAGS, "--epochs", "1", "--opt", "rank=2",
    ]  # fmt: skip
    first = sweep(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert first.stdout.count("[submit] fresh") == 3 and first.stdout.count("  job ") == 3
    assert "sweep: 3 ran, 0 skipped" in first.stdout
    (rec,) = records(runs).values()
    assert rec["retrained"] == [{"seed": 0, "folder": "seed0"}] and rec["grid"] == {"lr": [0.001, 0.03]}
    assert (runs / ".submitit").is_dir()
    again = sweep(*args)
    assert (
        again.returncode == 0 and "sweep: 0 ran, 3 skipped" in again.stdout and "[submit]" not in again.stdout
    )


def test_several_methods_one_line_per_run_start_and_end_with_progress(tmp_path, monkeypatch):
    script, log = tmp_path / "fake_train.py", tmp_path / "calls.jsonl"
    script.write_text(FAKE_TRAIN)  # a stand-in trainer: logs its argv, writes result.json
    monkeypatch.setenv("SWEEP_LOG", str(log))
    runs = tmp_path / "runs"
    proc = sweep(
        "--methods", "lora,adapter", "--tasks", "syn_a,syn_b", "--out-root", str(runs), "--train-script",
        str(script), "--", "--epochs", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(c[c.index("--method") + 1], c[c.index("--task") + 1]) for c in calls(log)] == [
        ("lora", "syn_a"), ("lora", "syn_b"), ("adapter", "syn_a"), ("adapter", "syn_b"),
    ]  # fmt: skip
    starts = [line for line in proc.stdout.splitlines() if line.startswith("[start]")]
    ends = [line for line in proc.stdout.splitlines() if line.startswith("[done]")]
    assert len(starts) == len(ends) == 4
    assert starts[0] == f"[start] fresh {runs / 'lora' / 'syn_a'} (0/4 runs done)"
    assert ends[1].startswith(f"[done] {runs / 'lora' / 'syn_b'} in ") and "(2/4 runs done, ETA " in ends[1]
    assert ends[3].endswith("(4/4 runs done)")
    bad = sweep("--methods", "lora,,neat", "--tasks", "syn_a", "--print-commands")
    assert bad.returncode == 2 and "empty or repeated name" in bad.stderr


def test_the_docs_lr_table_is_the_code_table():
    text = (Path(__file__).resolve().parents[1] / "docs" / "sweep.md").read_text()
    rows = dict(re.findall(r"^\| (\(others\)|\w+) \| ([0-9e., -]+) \|", text, flags=re.M))
    assert {k: tuple(float(v) for v in vals.split(",")) for k, vals in rows.items()} == {
        "(others)": DEFAULT_LR_GRID,
        **LR_GRIDS,
    }
