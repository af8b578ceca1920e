"""The three benchmarks end to end: task names per benchmark, the recipes' transforms, and prepare -> train
(one epoch) -> table -> card for one task of VTAB-1K, FGVC-5 and the full-dataset suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from PIL import Image
from test_fgvc_prepare import make_cub
from test_table import write_result
from torchvision import transforms as T

import vtab
from petl_zoo.cards import build_card
from petl_zoo.results import BENCHMARKS, results_table
from petl_zoo.results.cli import main as table_main
from petl_zoo.sweep import resolve_tasks
from petl_zoo.train import main as train_main
from vtab import prepare

TINY = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=32", "num_heads=2"]


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize(
    "name, bench, canonical",
    [
        ("dtd", None, "dtd"),  # a bare VTAB-1K name keeps meaning VTAB-1K's
        ("dtd", "suite", "suite_dtd"),
        ("cifar10", None, "suite_cifar10"),  # only the suite has it
        ("cub", None, "fgvc_cub"),
        ("CUB-200-2011", "fgvc", "fgvc_cub"),
        ("cars", "fgvc", "fgvc_cars"),
        ("cars", "suite", "suite_cars"),
        ("fgvc", "suite", "suite_aircraft"),  # the authors' --dataset-name, inside the suite only
        ("digits", "suite", "suite_digits"),
        ("suite_pets", None, "suite_pets"),
        ("my_task", None, "my_task"),  # a custom folder
    ],
)
def test_task_names_per_benchmark(name, bench, canonical):
    assert vtab.task_folder_name(name, bench) == canonical


@pytest.mark.parametrize(
    "name, bench, needle",
    [
        (
            "cars",
            None,
            r"'cars' is in several benchmarks; pass --benchmark fgvc \(fgvc_cars\), --benchmark suite",
        ),
        ("fgvc", None, None),  # a benchmark's name is not a task outside the suite: a custom folder
        ("dtdx", "suite", r"Unknown task 'dtdx' in benchmark suite\. Did you mean 'dtd'"),
        ("cifar", "fgvc", r"Unknown task 'cifar' in benchmark fgvc"),
    ],
)
def test_ambiguous_and_unknown_names_are_one_line(name, bench, needle):
    if needle is None:
        assert vtab.task_folder_name(name, bench) == name
        return
    with pytest.raises(ValueError, match=needle):
        vtab.task_folder_name(name, bench)


def test_registry_and_definitions_agree():
    assert [t.name for t in vtab.tasks()] == BENCHMARKS["vtab"].task_names
    assert (
        len(vtab.fgvc_tasks()) == 5 and [t.name for t in vtab.fgvc_tasks()] == BENCHMARKS["fgvc"].task_names
    )
    suite = vtab.suite_tasks()
    assert len(suite) == 10 and BENCHMARKS["suite"].task_names == [t.name for t in suite][:8]
    assert {t.group for t in suite[8:]} == {vtab.SUITE_EXTRA_GROUP}  # Flowers, Food: outside the mean
    names = [t.name for t in vtab.all_tasks()]
    assert len(names) == len(set(names))  # canonical names are folder names: unique over benchmarks
    assert resolve_tasks("all", "suite") == BENCHMARKS["suite"].task_names
    assert resolve_tasks("dtd,pets", "suite") == ["suite_dtd", "suite_pets"]
    assert resolve_tasks("fgvc", "fgvc") == BENCHMARKS["fgvc"].task_names  # the group


def test_a_suite_task_never_reads_the_vtab_folder_of_its_alias(tmp_path):
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "test.txt").write_text("")
    assert vtab.task_dir("dtd", tmp_path) == tmp_path / "dtd"
    with pytest.raises(FileNotFoundError, match=r"No folder for task 'suite_dtd' .*\(looked for suite_dtd\)"):
        vtab.task_dir("suite_dtd", tmp_path)
    assert vtab.available_tasks(tmp_path) == ["dtd"]


# ------------------------------------------------------------------------------------- transforms
def _ops(transform: T.Compose) -> list[tuple[str, object]]:
    out = []
    for op in transform.transforms:
        size = getattr(op, "size", None)
        scale = getattr(op, "scale", None)
        out.append((type(op).__name__, tuple(size) if isinstance(size, (list, tuple)) else size, scale))
    return out


def test_recipe_transforms_pinned():
    """fgvc: VPT's shorter side to 256/224 of the input then a random (train) or center crop; suite:
    RandomResizedCrop at torchvision's default scale (train), shorter side + center crop (eval)."""
    model = tiny_vit(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    fgvc_train = _ops(vtab.build_transform(model, "imagenet", augment=True, crop="center"))
    assert fgvc_train[:3] == [
        ("Resize", 256, None),
        ("RandomCrop", (224, 224), None),
        ("RandomHorizontalFlip", None, None),
    ]
    assert _ops(vtab.build_transform(model, "imagenet", crop="center"))[:2] == [
        ("Resize", 256, None),
        ("CenterCrop", (224, 224), None),
    ]
    suite_train = _ops(vtab.build_transform(model, augment=True, crop="random_resized"))
    assert suite_train[:2] == [
        ("RandomResizedCrop", (224, 224), (0.08, 1.0)),
        ("RandomHorizontalFlip", None, None),
    ]
    assert _ops(vtab.build_transform(model, crop="random_resized"))[:2] == [
        ("Resize", 224, None),
        ("CenterCrop", (224, 224), None),
    ]
    image = Image.new("RGB", (300, 200), (10, 20, 30))
    for crop in vtab.CROPS:
        for augment in (False, True):
            out = vtab.build_transform(model, augment=augment, crop=crop)(image)
            assert out.shape == (3, 224, 224)
    with pytest.raises(ValueError, match="Unknown crop 'square'; valid: 'none', 'center', 'random_resized'"):
        vtab.build_transform(model, crop="square")


# ----------------------------------------------------------------------------------------- tables
def test_table_has_one_section_per_benchmark(tmp_path):
    write_result(tmp_path, "lora", "dtd", 0.5, 0.4)
    write_result(tmp_path, "lora", "suite_dtd", 0.7, 0.7)
    write_result(tmp_path, "lora", "fgvc_cub", 0.8, 0.8)
    text = results_table(tmp_path)
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == ["## VTAB-1K", "## FGVC-5", "## Full-dataset suite (NEAT / FourierFT)"]
    suite = results_table(tmp_path, benchmark=BENCHMARKS["suite"])
    assert "## " not in suite and "OxfordPets" in suite and "CIFAR-100" not in suite and "| 70.0 |" in suite
    with pytest.raises(ValueError, match="runs of several benchmarks .* a CSV holds one: pass --benchmark"):
        results_table(tmp_path, "csv")
    only_vtab = tmp_path / "v"
    write_result(only_vtab, "lora", "dtd", 0.5, 0.4)
    assert "## " not in results_table(only_vtab)  # one benchmark: the table as before sections


# ------------------------------------------------------------------------------------ end to end
def _prepare(tmp_path: Path, benchmark: str) -> tuple[Path, str, list[str]]:
    """A tiny task of ``benchmark`` under ``tmp_path / data``: (root, task name, extra train flags)."""
    root = tmp_path / "data"
    if benchmark == "vtab":
        argv, task = ["--task", "digits"], "digits"
    elif benchmark == "fgvc":
        argv, task = ["--task", "cub", "--source", str(make_cub(tmp_path / "dl"))], "fgvc_cub"
    else:
        argv, task = ["--benchmark", "suite", "--task", "digits"], "suite_digits"
    assert prepare.main([*argv, "--out", str(root)]) == 0
    for list_file in (root / task).glob("*.txt"):  # digits: 40 images per split keep the test short
        list_file.write_text("".join(list_file.read_text().splitlines(keepends=True)[:40]))
    return root, task, ([] if benchmark == "vtab" else ["--benchmark", benchmark])


@pytest.mark.parametrize("bench", ["vtab", "fgvc", "suite"])
def test_prepare_train_table_card(tmp_path, capsys, bench):
    benchmark = bench
    """One task per benchmark: prepared, trained one epoch with its benchmark's recipe (the default),
    in its own table section, and carded with its benchmark."""
    root, task, extra = _prepare(tmp_path, benchmark)
    name = {"vtab": "digits", "fgvc": "cub", "suite": "digits"}[benchmark]
    out = tmp_path / "runs" / "lora" / task
    argv = ["--method", "lora", "--model", "vit_tiny_patch16_224", "--model-kwargs", *TINY, "--no-pretrained"]
    argv += ["--task", name, *extra, "--data-root", str(root), "--out", str(out), "--epochs", "1"]
    argv += ["--eval-every", "1", "--batch-size", "16", "--no-progress"]
    assert train_main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    recipe = {"vtab": "vtab", "fgvc": "fgvc", "suite": "suite"}[benchmark]
    assert config["task"] == task and config["recipe_sources"]["crop"] == f"recipe:{recipe}"
    if benchmark == "suite":
        assert config["recipe"]["accumulate"] == 4 and config["recipe"]["train_split"] == "train"
    capsys.readouterr()
    assert table_main([str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "| lora |" in table and "## " not in table  # one benchmark below: no section headings
    card = build_card(out)
    assert task in card.content
    if benchmark == "fgvc":  # suite_digits is the suite's demo task, outside the suite's table: no benchmark
        assert "FGVC-5" in card.content and "fgvc/fgvc_cub" in card.content


def test_table_cli_benchmark_flag_and_published(capsys):
    assert table_main(["--published", "all", "--benchmark", "fgvc", "--format", "csv"]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    assert "fgvc_cub" in head and "dtd" not in head
    assert len(rows) == 15 and all(r.startswith("published,") and "vpetl-bench-fgvc" in r for r in rows)


def test_trainer_sees_the_recipe_crop(tmp_path):
    """The eval transform of a run follows its recipe's crop (an fgvc run evaluates center crops)."""
    root, task, _ = _prepare(tmp_path, "fgvc")
    model = tiny_vit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    dataset = vtab.VtabDataset(
        task, "test", vtab.build_transform(model, "imagenet", crop="center"), root, 200
    )
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and isinstance(label, int)
    assert torch.isfinite(image).all()
