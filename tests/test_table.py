"""VTAB table: group means against hand numbers, blanks for missing runs, seeds, labels, the three formats."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from petl_zoo.fingerprint import recipe_fingerprint
from petl_zoo.results import VTAB_1K, build_rows, collect_results, compute_table, render, results_table

ROOT = Path(__file__).resolve().parents[1]
NATURAL = VTAB_1K.members("natural")
SPECIALIZED = VTAB_1K.members("specialized")
STRUCTURED = VTAB_1K.members("structured")

# Hand numbers (percent): natural 10..70 -> 40.0; specialized 80, 82, 84, 86 -> 83.0;
# structured 20..90 -> 55.0; mean of group means (40 + 83 + 55) / 3 = 59.333...; 19-task mean 1052 / 19.
HAND = dict(
    zip(
        NATURAL + SPECIALIZED + STRUCTURED,
        [10, 20, 30, 40, 50, 60, 70, 80, 82, 84, 86, 20, 30, 40, 50, 60, 70, 80, 90],
    )
)


def write_result(
    root: Path,
    method: str,
    task: str,
    best: float,
    last: float,
    seed: int = 0,
    sub: str = "",
    config: dict | None = None,
    params: int = 100_000,
    model: str = "vit_base_patch16_224",
) -> Path:
    folder = root / method / task / sub
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "method": method,
        "model": model,
        "task": task,
        "seed": seed,
        "num_classes": 10,
        "method_config": config if config is not None else {"rank": 8},
        "select_on": "test",
        "test_acc_best": best,
        "best_epoch": 3,
        "test_acc_last": last,
        "test_acc_selected": best,
        "val_acc_best": None,
        "epochs": 10,
        "trainable_params": {
            "method": params,
            "head": 7690,
            "total": params + 7690,
            "stored": params + 7690,
            "backbone": 85_800_000,
            "percent": 100 * params / 85_800_000,
        },
        "train_time_s": 1.0,
        "img_per_s": 1.0,
        "peak_mem_mb": 0.0,
        "precision": "fp32",
        "world_size": 1,
    }
    (folder / "result.json").write_text(json.dumps(result))
    return folder


def cells_of(table, method):
    return next(c for r, c in table.rows if r.name == method)


def test_group_means_match_hand_numbers(tmp_path):
    for task, acc in HAND.items():
        write_result(tmp_path, "full", task, acc / 100, (acc - 1) / 100, params=2_000_000)
    rows = build_rows(collect_results(tmp_path))
    best, last = compute_table(rows, "best"), compute_table(rows, "last")
    c = cells_of(best, "full")
    assert c["natural"].mean == pytest.approx(40.0)
    assert c["specialized"].mean == pytest.approx(83.0)
    assert c["structured"].mean == pytest.approx(55.0)
    assert c["mean_groups"].mean == pytest.approx((40 + 83 + 55) / 3)
    assert c["mean_tasks"].mean == pytest.approx(1052 / 19)
    assert c["params_m"].mean == pytest.approx(2.0)
    assert c["tasks"].mean == 19
    lc = cells_of(last, "full")
    assert lc["natural"].mean == pytest.approx(39.0) and lc["mean_tasks"].mean == pytest.approx(1052 / 19 - 1)
    md = render(best, "markdown")
    line = next(ln for ln in md.splitlines() if ln.startswith("| full "))
    assert "| 40.0 | 83.0 | 55.0 | 59.3 | 55.4 | 2.00 | 19/19 |" in line


def test_missing_tasks_are_blank_never_zero_and_means_say_what_they_cover(tmp_path):
    for task, acc in HAND.items():
        if task != "dmlab":
            write_result(tmp_path, "lora", task, acc / 100, acc / 100)
    table = compute_table(build_rows(collect_results(tmp_path)), "best")
    c = cells_of(table, "lora")
    assert c["dmlab"].mean is None
    assert c["natural"].mean == pytest.approx(40.0) and c["specialized"].mean == pytest.approx(83.0)
    # structured over the 7 tasks present (dmlab = 40 missing): (440 - 40) / 7, marked 7/8
    assert c["structured"].mean == pytest.approx(400 / 7) and c["structured"].part == (7, 8)
    assert c["mean_groups"].mean == pytest.approx((40 + 83 + 400 / 7) / 3)
    assert c["mean_tasks"].mean == pytest.approx((1052 - 40) / 18)
    assert c["tasks"].mean == 18
    md = render(table, "markdown")
    line = next(ln for ln in md.splitlines() if ln.startswith("| lora "))
    cols = [s.strip() for s in line.strip("|").split("|")]
    headers = [s.strip() for s in md.splitlines()[2].strip("|").split("|")]
    row = dict(zip(headers, cols))
    assert row["DMLab"] == "" and row["Structured"] == "57.1 (7/8)" and row["Natural"] == "40.0"
    assert row["Mean of groups"] == "60.0" and row["Mean of tasks"] == "56.2" and row["Tasks"] == "18/19"
    assert "0.0" not in cols
    assert "- lora: means over 18 task(s): the VTAB tasks but dmlab" in md
    assert "Mean of groups: the mean of the group means" in md


def test_seeds_mean_std_and_single_vs_seed_folders(tmp_path):
    # Several seeds live in <task>/seed<k>/; one seed in <task>/: both are read.
    write_result(tmp_path, "lora", "dtd", 0.70, 0.60, seed=0, sub="seed0")
    write_result(tmp_path, "lora", "dtd", 0.74, 0.64, seed=1, sub="seed1")
    write_result(tmp_path, "lora", "cifar", 0.50, 0.40, seed=0)
    table = compute_table(build_rows(collect_results(tmp_path)), "best")
    c = cells_of(table, "lora")
    assert (
        c["dtd"].mean == pytest.approx(72.0) and c["dtd"].std == pytest.approx(2 * 2**0.5) and c["dtd"].n == 2
    )
    assert c["cifar"].mean == pytest.approx(50.0) and c["cifar"].std is None
    assert "72.0 ± 2.8" in render(table, "markdown")
    assert r"72.0 $\pm$ 2.8" in render(table, "latex")


def test_group_std_over_seeds(tmp_path):
    # Two seeds on all natural tasks: seed 0 at HAND, seed 1 at HAND + 2 -> natural 40 and 42 -> 41 +- sqrt(2).
    for task in NATURAL:
        write_result(tmp_path, "m", task, HAND[task] / 100, 0.1, seed=0, sub="seed0")
        write_result(tmp_path, "m", task, (HAND[task] + 2) / 100, 0.1, seed=1, sub="seed1")
    c = cells_of(compute_table(build_rows(collect_results(tmp_path)), "best"), "m")
    assert c["natural"].mean == pytest.approx(41.0) and c["natural"].std == pytest.approx(2**0.5)


def test_rows_per_config_and_model_are_labelled(tmp_path):
    write_result(tmp_path / "a", "lora", "dtd", 0.6, 0.6, config={"rank": 4, "alpha": 8})
    write_result(tmp_path / "b", "lora", "dtd", 0.7, 0.7, config={"rank": 8, "alpha": 8})
    write_result(tmp_path / "c", "adapter", "dtd", 0.65, 0.65, config={"bottleneck": 8})
    names = sorted(r.name for r in build_rows(collect_results(tmp_path)))
    assert names == ["adapter", "lora (rank=4)", "lora (rank=8)"]


def test_custom_tasks_get_their_own_columns(tmp_path):
    write_result(tmp_path, "lora", "digits", 0.93, 0.92)
    table = compute_table(build_rows(collect_results(tmp_path)), "best")
    assert ("digits", "digits") in table.columns
    assert cells_of(table, "lora")["digits"].mean == pytest.approx(93.0)
    assert cells_of(table, "lora")["tasks"].mean == 0


def test_csv_and_cli(tmp_path):
    for task, acc in HAND.items():
        write_result(tmp_path / "runs", "full", task, acc / 100, acc / 100)
    text = results_table(tmp_path / "runs", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["metric"] for r in rows] == ["last", "best"]  # last epoch first: no selection on test
    assert float(rows[0]["mean_groups"]) == pytest.approx(59.33, abs=0.01) and rows[0]["natural_std"] == ""
    out = tmp_path / "table.tex"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "vtab_table.py"),
            str(tmp_path / "runs"),
            "--format",
            "latex",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    tex = out.read_text()
    assert r"\begin{tabular}" in tex and "vit\\_base\\_patch16\\_224" in tex and tex.count(r"\toprule") == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "vtab_table.py"), str(empty)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "no result.json" in proc.stderr


def test_catalog_is_vtabs_and_every_task_has_a_header():
    import vtab
    from petl_zoo.results.benchmarks import HEADERS, canonical_task, get_benchmark

    assert [(e.name, e.group) for e in VTAB_1K.tasks] == [(t.name, t.group) for t in vtab.tasks()]
    assert VTAB_1K.groups == vtab.GROUPS and get_benchmark("VTAB-1K") is VTAB_1K
    assert set(HEADERS) == {t.name for t in vtab.tasks()}
    assert canonical_task("CIFAR-100") == "cifar" and canonical_task("pets") == "oxford_iiit_pet"
    assert canonical_task("my_custom_task") == "my_custom_task"


def test_module_entry_point_and_prog(capsys):
    from petl_zoo.results.cli import main

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "petl_zoo.results", "--help"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m petl_zoo.results") and "--format" in proc.stdout
    with pytest.raises(SystemExit) as err:
        main(["--help"], prog="petl-zoo table")
    assert err.value.code == 0 and capsys.readouterr().out.startswith("usage: petl-zoo table")


# ------------------------------------------------------------- recipes, fingerprints and damaged files
def write_config(folder: Path, method: str, task: str, seed: int, epochs: int = 30, **extra) -> dict:
    """A train.py config.json (the keys recipe_fingerprint reads) next to the folder's result.json."""
    config = {
        "method": method,
        "method_options": {"rank": 8},
        "model": "vit_base_patch16_224",
        "model_kwargs": {},
        "task": task,
        "num_classes": 10,
        "data_root": f"/data/{task}",
        "pretrained_file": None,
        "pretrained": True,
        "recipe": {"epochs": epochs, "lr": 0.001, "batch_size": 64, "seed": seed},
        "workers": 4,
        **extra,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return config


def test_seeds_of_one_recipe_average_and_another_recipe_is_its_own_row(tmp_path):
    for seed, acc in ((0, 0.70), (1, 0.74)):
        folder = write_result(tmp_path / "e30", "lora", "dtd", acc, acc, seed=seed, sub=f"seed{seed}")
        write_config(folder, "lora", "dtd", seed)
    cifar = write_result(tmp_path / "e30", "lora", "cifar", 0.5, 0.5)  # another task, same recipe
    write_config(cifar, "lora", "cifar", 0, data_root="/elsewhere")
    short = write_result(tmp_path / "e3", "lora", "dtd", 0.40, 0.40, seed=2)  # --epochs 3
    write_config(short, "lora", "dtd", 2, epochs=3)
    write_result(tmp_path / "old", "adapter", "dtd", 0.6, 0.6)  # no config.json: as before
    table = compute_table(build_rows(collect_results(tmp_path)), "best")
    assert sorted(r.name for r, _ in table.rows) == [
        "adapter",
        "lora (recipe.epochs=3)",
        "lora (recipe.epochs=30)",
    ]
    long = cells_of(table, "lora (recipe.epochs=30)")
    assert long["dtd"].mean == pytest.approx(72.0) and long["dtd"].n == 2 and long["cifar"].n == 1
    assert cells_of(table, "lora (recipe.epochs=3)")["dtd"].mean == pytest.approx(40.0)
    assert cells_of(table, "lora (recipe.epochs=3)")["dtd"].n == 1
    assert "lora (recipe.epochs=3)" in render(table, "markdown")


def test_a_run_without_config_and_weights_files_are_told_apart(tmp_path):
    for i, content in enumerate((b"weights A", b"weights A", b"weights B")):
        weights = tmp_path / f"w{i}.bin"  # two paths, one content: one recipe
        weights.write_bytes(content)
        folder = write_result(tmp_path / "runs" / f"r{i}", "lora", "dtd", 0.5 + i / 10, 0.5, seed=i)
        write_config(folder, "lora", "dtd", i, pretrained_file=str(weights))
    write_result(tmp_path / "runs" / "bare", "lora", "dtd", 0.9, 0.9, seed=9)
    rows = build_rows(collect_results(tmp_path / "runs"))
    digest_b = hashlib.sha256(b"weights B").hexdigest()[:12]
    by = {r.name: r for r in rows}
    assert set(by) == {
        f"lora (weights.file_sha256={hashlib.sha256(b'weights A').hexdigest()[:12]})",
        f"lora (weights.file_sha256={digest_b})",
        "lora (no config.json)",
    }
    assert len(by[f"lora (weights.file_sha256={digest_b})"].runs["dtd"]) == 1
    assert sum(len(r.runs["dtd"]) for r in rows) == 4


def test_a_recorded_fingerprint_is_used_as_is(tmp_path):
    a = write_result(tmp_path / "a", "lora", "dtd", 0.5, 0.5, seed=0)
    write_config(a, "lora", "dtd", 0)
    b = write_result(tmp_path / "b", "lora", "dtd", 0.6, 0.6, seed=1)
    config = write_config(b, "lora", "dtd", 1)
    result = json.loads((b / "result.json").read_text())
    result["fingerprint"] = {"recipe": "f" * 16, "run": "e" * 16}
    (b / "result.json").write_text(json.dumps(result))
    names = sorted(r.name for r in build_rows(collect_results(tmp_path)))
    assert names == [f"lora (recipe {recipe_fingerprint(config)[:8]})", "lora (recipe ffffffff)"]


def test_damaged_json_is_one_error_line_naming_the_file(tmp_path, capsys, monkeypatch):
    from petl_zoo.results.cli import main

    folder = write_result(tmp_path / "runs", "lora", "dtd", 0.5, 0.5)
    write_config(folder, "lora", "dtd", 0)
    config = folder / "config.json"
    config.write_text(config.read_text()[:40])  # truncated
    assert main([str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"error: run config {config} is not valid JSON (") and "line 1 column" in err
    config.unlink()
    result = folder / "result.json"
    result.write_text("")
    assert main([str(tmp_path / "runs")]) == 1
    assert (
        capsys.readouterr().err
        == f"error: run result {result} is empty (a truncated write?); delete it or restore it\n"
    )
    result.write_text('{"method": "lora", "task": ')
    assert main([str(tmp_path / "runs")]) == 1
    assert capsys.readouterr().err.startswith(f"error: run result {result} is not valid JSON (")
    monkeypatch.setenv("PETL_ZOO_DEBUG", "1")
    with pytest.raises(ValueError, match="is not valid JSON"):
        main([str(tmp_path / "runs")])


def test_unwritable_out_is_one_error_line(tmp_path, capsys):
    from petl_zoo.results.cli import main

    write_result(tmp_path / "runs", "lora", "dtd", 0.5, 0.5)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([str(tmp_path / "runs"), "--out", str(blocker / "table.md")]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: cannot write --out {blocker / 'table.md'}: ") and len(err.splitlines()) == 1
    )
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "runs"), "--format", "html"], prog="table")
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: argument --format: invalid choice: 'html'") and line.endswith(
        "(see table --help)"
    )


@pytest.mark.parametrize("field", ["test_acc_last", "test_acc_best"])
@pytest.mark.parametrize("damage", ["missing", "nan", "text"])
def test_a_missing_or_nan_accuracy_is_a_line_naming_file_and_field(tmp_path, field, damage):
    folder = write_result(tmp_path, "lora", "dtd", 0.5, 0.4)
    result = json.loads((folder / "result.json").read_text())
    if damage == "missing":
        del result[field]
    else:
        result[field] = float("nan") if damage == "nan" else "n/a"
    (folder / "result.json").write_text(json.dumps(result))  # json writes NaN as the bare token NaN
    with pytest.warns(UserWarning) as caught:
        table = compute_table(
            build_rows(collect_results(tmp_path)), "last" if field == "test_acc_last" else "best"
        )
    what = "is missing" if damage == "missing" else f"is {result[field]!r}, not an accuracy"
    assert f"{folder / 'result.json'}: {field} {what}; its cell is blank" in [str(w.message) for w in caught]
    ((_, cells),) = table.rows
    assert cells["dtd"].mean is None  # blank, never a made-up number
