"""The table's tuned rows (selection.json records of the tuning sweep), protocol/preset columns,
published rows beside ours, and the accuracy-vs-parameters plot."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path

import pytest

from petl_zoo.fingerprint import fingerprints
from petl_zoo.results import (
    build_rows,
    collect_results,
    collect_rows,
    compute_table,
    main,
    plot_points,
    render,
    results_table,
)
from petl_zoo.runfolder import read_selection, read_selections

GRID_FP = "0123456789abcdef"


def run_folder(
    folder: Path,
    method: str,
    task: str,
    seed: int,
    last: float,
    best: float | None = None,
    lr: float = 1e-3,
    options: dict | None = None,
    protocol: str = "default",
    preset: str | None = None,
    val: float | None = None,
    params: int = 20_000,
) -> Path:
    """A run folder as the trainer writes it: config.json (spec.config_json keys) and result.json
    (report.build_result keys), the recorded fingerprint included."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"epochs": 30, "lr": lr, "batch_size": 64, "weight_decay": 1e-4, "protocol": protocol}
    recipe.update(seed=seed, select_on="test" if val is None else "val")
    config = {
        "method": method,
        "method_options": options or {},
        "model": "vit_tiny_patch16_224",
        "resolved_model": "vit_tiny_patch16_224.augreg_in21k",
        "model_kwargs": {"img_size": 32, "patch_size": 4, "depth": 2},
        "task": task,
        "num_classes": 10,
        "data_root": f"/data/{task}",
        "pretrained_file": None,
        "pretrained_file_sha256": None,
        "pretrained": False,
        "recipe": recipe,
        "workers": 0,
        "argv": [],
    }
    if preset is not None:
        config["preset"] = preset
    config["fingerprint"] = fingerprints(config)
    result = {
        "method": method,
        "model": "vit_tiny_patch16_224",
        "task": task,
        "seed": seed,
        "num_classes": 10,
        "method_config": options or {},
        "select_on": recipe["select_on"],
        "test_acc_best": best if best is not None else last,
        "best_epoch": 29,
        "test_acc_last": last,
        "test_acc_selected": last,
        "selected_epoch": 29,
        "val_acc_best": val,
        "val_acc_last": val,
        "epochs": 30,
        "trainable_params": {"method": params, "head": 650, "total": params + 650},
        "fingerprint": config["fingerprint"],
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "result.json").write_text(json.dumps(result))
    return folder


def tuning(root: Path, method: str, task: str, vals: dict, winner: tuple, tests: list[float]) -> Path:
    """A finished tuning record below root/<method>/<task>/tune-<fp>/: 2 x 2 grid points (lr x
    opt.rank) with their val accuracy, the winner retrained with one folder per seed."""
    tune = root / method / task / f"tune-{GRID_FP}"
    points = []
    for (lr, rank), val in vals.items():
        rel = f"lr{lr}_rank{rank}"
        run_folder(tune / rel, method, task, 0, 0.5, lr=lr, options={"rank": rank}, val=val / 100)
        points.append({"setting": {"lr": lr, "opt.rank": rank}, "folder": rel, "val_accuracy": val})
    retrained = []
    for seed, acc in enumerate(tests):
        rel = f"retrain/seed{seed}"
        run_folder(tune / rel, method, task, seed, acc, lr=winner[0], options={"rank": winner[1]})
        retrained.append({"seed": seed, "folder": rel})
    record = {
        "version": 1,
        "method": method,
        "task": task,
        "grid_fingerprint": GRID_FP,
        "grid": {"lr": [0.001, 0.005], "opt.rank": [4, 8]},
        "rule": "highest val200 accuracy; ties: the smaller lr, then the smaller rank",
        "points": points,
        "winner": {"lr": winner[0], "opt.rank": winner[1]},
        "retrained": retrained,
    }
    (tune / "selection.json").write_text(json.dumps(record))
    return tune


VALS = {(0.001, 4): 90.0, (0.001, 8): 91.5, (0.005, 4): 92.5, (0.005, 8): 92.0}


def make_runs(root: Path) -> None:
    tuning(root, "lora", "digits", VALS, (0.005, 4), [0.90, 0.92])
    tuning(root, "lora", "syn_a", VALS, (0.005, 4), [0.60, 0.64])
    run_folder(root / "lora" / "digits" / "plain", "lora", "digits", 0, 0.80, best=0.85)
    run_folder(root / "lora_paper" / "digits", "lora", "digits", 0, 0.70, preset="lora/paper")


def test_tuned_row_from_the_retrained_runs_and_grid_points_left_out(tmp_path):
    make_runs(tmp_path)
    rows, selections = collect_rows(tmp_path)
    assert len(selections) == 2
    by = {r.name: r for r in rows}
    tuned = by["lora (tuned on val200 (lr x opt.rank))"]
    assert sorted(tuned.runs) == ["digits", "syn_a"] and sorted(tuned.runs["digits"]) == [0, 1]
    # the grid points (8 folders) are in no row; the plain and the preset run are rows of their own
    assert sum(len(seeds) for r in rows for seeds in r.runs.values()) == 4 + 2
    assert len(collect_results(tmp_path)) == 2 and len(rows) == 3
    plain = next(r for r in rows if r.preset == "-" and not r.selections)
    paper = next(r for r in rows if r.preset == "lora/paper")
    assert plain.protocol == paper.protocol == tuned.protocol == "default"
    cells = next(c for r, c in compute_table(rows, "last").rows if r is tuned)
    assert cells["digits"].mean == pytest.approx(91.0) and cells["digits"].std == pytest.approx(2**0.5)
    assert cells["mean_tasks"].mean == pytest.approx((91.0 + 62.0) / 2)
    # digits is the demo group, syn_a a custom task: two groups, mean of the two group means
    assert cells["mean_groups"].mean == pytest.approx((91.0 + 62.0) / 2)
    assert cells["tasks"].mean == 0 and cells["tasks"].n == 2


def test_selection_is_shown_with_every_point_and_the_winner(tmp_path):
    make_runs(tmp_path)
    text = results_table(tmp_path, selection=True)
    block = text[text.index("**Selection: lora on digits") :]
    assert "(grid 01234567: lr x opt.rank)" in block.splitlines()[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("| 0.0")]
    assert len(lines) >= 4
    assert "| 0.005 | 4 | 92.5 | winner |" in block and "| 0.001 | 8 | 91.5 |  |" in block
    assert "rule: highest val200 accuracy; ties: the smaller lr" in block
    assert "winner retrained with seeds 0, 1" in block
    md_last = text[: text.index("**VTAB-1K top-1 accuracy (%), ours, best-of-test")]
    assert "| lora (tuned on val200 (lr x opt.rank)) | vit_tiny_patch16_224 | default | - |" in md_last
    assert "| lora/paper |" in md_last  # the preset run is its own row, with its preset shown


def test_damaged_or_missing_records_are_one_warning_each(tmp_path, caplog):
    make_runs(tmp_path)
    bad = tmp_path / "lora" / "syn_a" / f"tune-{GRID_FP}" / "selection.json"
    bad.write_text(bad.read_text()[:50])
    (tmp_path / "vpt" / "digits" / "tune-fedcba9876543210" / "p0").mkdir(parents=True)  # no record yet
    run_folder(tmp_path / "vpt" / "digits" / "tune-fedcba9876543210" / "p0", "vpt", "digits", 0, 0.4)
    with caplog.at_level(logging.WARNING, logger="petl_zoo.runfolder"):
        selections = read_selections(tmp_path)
    assert [s.task for s in selections] == ["digits"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert any(m.startswith(f"skipping {bad}: not valid JSON") for m in messages)
    assert any("no selection.json" in m for m in messages)
    names = sorted(r.name for r in collect_rows(tmp_path)[0])
    assert not any(n.startswith("vpt") for n in names)  # grid points of an unfinished tuning: left out
    bad.write_text(json.dumps({"version": 1, "method": "lora"}))
    assert read_selection(bad) is None
    assert "lacks task, grid_fingerprint" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("folder", ["../../../../lora_paper/digits", "/elsewhere/run", "."])
def test_a_record_naming_a_folder_outside_its_tuning_is_skipped(tmp_path, caplog, folder):
    """The record is data: it cannot point the tuned row at another run (92.3 of somebody else's)."""
    make_runs(tmp_path)
    path = tmp_path / "lora" / "digits" / f"tune-{GRID_FP}" / "selection.json"
    record = json.loads(path.read_text())
    record["retrained"][0]["folder"] = folder
    path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="petl_zoo.runfolder"):
        assert read_selection(path) is None
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == f"skipping {path}: retrained[0] folder {folder!r} is not a folder inside {path.parent}"


def test_a_retrained_run_that_is_not_the_winner_is_left_out_with_a_line(tmp_path):
    """A folder inside the tuning whose run was trained with other settings (or another seed) than the
    record says does not count for the tuned row."""
    make_runs(tmp_path)
    tune = tmp_path / "lora" / "digits" / f"tune-{GRID_FP}"
    run_folder(tune / "retrain" / "seed1", "lora", "digits", 1, 0.99, lr=1e-3, options={"rank": 4})
    with pytest.warns(UserWarning) as caught:
        rows, _ = collect_rows(tmp_path)
    (tuned,) = [r for r in rows if r.selections and r.runs.get("digits")]
    assert sorted(tuned.runs["digits"]) == [0]  # seed 1 left out, seed 0 kept
    assert any(
        str(w.message) == f"{tune / 'selection.json'}: retrained seed 1 left out: it was trained with "
        "lr=0.001, the winner is lr=0.005"
        for w in caught
    )


def test_published_rows_beside_ours_same_methods_all_and_csv(tmp_path, capsys):
    make_runs(tmp_path)
    text = results_table(tmp_path, published="same")
    pub = text[text.index("**VTAB-1K top-1 accuracy (%), published**") :]
    assert "| LoRA | fact-aaai23 | best | orig_in21k | imagenet |" in pub and "| SSF |" not in pub
    assert "74.5 (groups) *" in pub and "JieShibo/PETL-ViT FacT/pdf.pdf @ e15ce8c" in pub
    everything = results_table(None, published="all")
    assert "| SSF | vpetl-bench | best | augreg_in21k | inception |" in everything
    assert "73.10 (19 tasks)" in everything and "**VTAB-1K top-1 accuracy (%), ours" not in everything
    with pytest.raises(ValueError, match=r"no published rows for \['heat'\]"):
        results_table(tmp_path, published="heat")
    rows = list(csv.DictReader(io.StringIO(results_table(tmp_path, "csv", published="ssf,convpass"))))
    assert {r["metric"] for r in rows} == {"last", "best", "published"}
    ssf = next(r for r in rows if r["label"] == "SSF")
    assert ssf["printed_average"] == "73.1" and ssf["printed_convention"] == "mean_of_19"
    assert float(ssf["mean_groups"]) == pytest.approx(75.69, abs=0.005) and ssf["digits"] == ""
    ours = next(r for r in rows if r["metric"] == "last" and r["preset"] == "lora/paper")
    assert ours["protocol"] == "default" and ours["source"] == "ours"
    assert main(["--published", "all"]) == 0 and "RepAdapter" in capsys.readouterr().out
    assert main(["--published", str(tmp_path)]) == 0  # a folder after --published is the results folder
    out = capsys.readouterr().out
    assert "| lora (tuned on val200" in out and "| LoRA | fact-aaai23 |" in out and "| SSF |" not in out
    with pytest.raises(SystemExit) as exit_:
        main([], prog="table")
    assert exit_.value.code == 2 and "give a results folder" in capsys.readouterr().err


def test_plot_writes_png_and_svg(tmp_path):
    pytest.importorskip("matplotlib")
    make_runs(tmp_path)
    assert main([str(tmp_path), "--published", "--plot", str(tmp_path / "fig" / "vtab.png")]) == 0
    png, svg = tmp_path / "fig" / "vtab.png", tmp_path / "fig" / "vtab.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    import xml.etree.ElementTree as ET

    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text()
    assert "Mean of group means" in text and "last epoch" in text and "<!-- LoRA -->" in text
    rows, _ = collect_rows(tmp_path)
    from petl_zoo.results.published import load_published

    points = plot_points(rows, load_published(), "last", "tasks")
    styles = {p.style for p in points}
    assert styles == {"ours_partial", "last", "best", "unstated"}  # our rows: 2 custom tasks, no VTAB one
    assert all("(0/19 tasks, +" in p.label for p in points if p.style == "ours_partial")
    linear = next(p for p in points if p.label.startswith("Linear"))
    assert linear.params_m == 0 and linear.accuracy == pytest.approx(52.99, abs=0.01)  # mean of 19


def test_plot_without_matplotlib_is_one_error_line(tmp_path, capsys, monkeypatch):
    make_runs(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert main([str(tmp_path), "--plot", str(tmp_path / "p")]) == 1
    assert capsys.readouterr().err == "error: --plot needs matplotlib: pip install petl-zoo[plot]\n"


def test_a_stem_with_svg_suffix_and_the_ordinary_table_is_unchanged(tmp_path):
    from petl_zoo.results.plot import output_paths

    assert output_paths("a/b.svg") == (Path("a/b.png"), Path("a/b.svg"))
    assert output_paths("a/b") == (Path("a/b.png"), Path("a/b.svg"))
    run_folder(tmp_path / "x", "lora", "digits", 0, 0.8)
    table = compute_table(build_rows(collect_results(tmp_path)), "last")
    assert "| lora | vit_tiny_patch16_224 | default | - |" in render(table)
