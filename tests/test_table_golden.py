"""The table's text on a fixed tree of run folders, compared with the text the table printed before its
code was split into the results package (tests/golden/table/): every format, the published rows,
the tuning records and the plot's points. Regenerate only for an intended change of the output:
``PETL_ZOO_REGOLDEN=1 python -m pytest tests/test_table_golden.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import vtab
from petl_zoo.fingerprint import fingerprints

GOLDEN = Path(__file__).resolve().parent / "golden" / "table"
TASKS = [t.name for t in vtab.tasks()]


def _run(
    folder: Path,
    method: str,
    task: str,
    seed: int,
    last: float,
    best: float,
    *,
    options: dict | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    preset: str | None = None,
    protocol: str = "default",
    val: float | None = None,
    weights: Path | None = None,
    with_config: bool = True,
    params: int = 20_000,
) -> None:
    """A run folder as the trainer writes it: config.json (spec.config_json keys), result.json."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"epochs": epochs, "lr": lr, "batch_size": 64, "weight_decay": 1e-4, "protocol": protocol}
    recipe.update(seed=seed, select_on="test" if val is None else "val")
    config = {
        "method": method,
        "method_options": options or {},
        "model": "vit_base_patch16_224",
        "model_kwargs": {},
        "task": task,
        "num_classes": 10,
        "data_root": "/data/vtab",
        "pretrained_file": str(weights) if weights else None,
        "pretrained_file_sha256": None,
        "pretrained": True,
        "preset": preset,
        "recipe": recipe,
        "argv": [],
    }
    config["fingerprint"] = fingerprints(config)
    result = {
        "method": method,
        "model": "vit_base_patch16_224",
        "task": task,
        "seed": seed,
        "num_classes": 10,
        "method_config": options or {},
        "select_on": recipe["select_on"],
        "test_acc_best": best,
        "test_acc_last": last,
        "val_acc_last": val,
        "epochs": epochs,
        "trainable_params": {"method": params, "head": 7690, "total": params + 7690},
    }
    if with_config:
        result["fingerprint"] = config["fingerprint"]
        (folder / "config.json").write_text(json.dumps(config))
    (folder / "result.json").write_text(json.dumps(result))


def _tuning(root: Path, method: str, task: str, tests: list[float]) -> None:
    tune = root / method / task / "tune-0123456789abcdef"
    points = []
    for i, (lr, rank) in enumerate([(1e-3, 4), (1e-3, 8), (5e-3, 4), (5e-3, 8)]):
        rel = f"points/lr{lr}_rank{rank}"
        val = 0.80 + 0.03 * i
        _run(tune / rel, method, task, 0, 0.5, 0.5, lr=lr, options={"rank": rank}, val=val)
        points.append({"setting": {"lr": lr, "opt.rank": rank}, "folder": rel, "val_accuracy": 100 * val})
    retrained = []
    for seed, acc in enumerate(tests):
        _run(tune / f"seed{seed}", method, task, seed, acc, acc + 0.01, lr=5e-3, options={"rank": 8})
        retrained.append({"seed": seed, "folder": f"seed{seed}"})
    record = {
        "version": 1,
        "method": method,
        "task": task,
        "grid_fingerprint": "0123456789abcdef",
        "grid": {"lr": [0.001, 0.005], "opt.rank": [4, 8]},
        "rule": "highest val_accuracy; ties: the smaller lr",
        "points": points,
        "winner": {"lr": 0.005, "opt.rank": 8},
        "retrained": retrained,
    }
    (tune / "selection.json").write_text(json.dumps(record))


def build_tree(root: Path) -> None:
    """LoRA on all 19 tasks with two seeds and the custom task digits; LoRA with a shorter recipe on
    three tasks (a labelled row); an adapter without config.json on part of the natural group; VPT with
    a preset and the vtab protocol, on a local weights file; a tuned LoRA row on two tasks."""
    weights = root / "weights" / "vit_b.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not really weights, but hashed all the same")
    for i, task in enumerate(TASKS):
        for seed in (0, 1):
            acc = 0.40 + 0.025 * i + 0.01 * seed
            _run(
                root / "lora" / task / f"seed{seed}", "lora", task, seed, acc, acc + 0.02, options={"rank": 8}
            )
    _run(root / "lora" / "digits" / "seed0", "lora", "digits", 0, 0.918, 0.920, options={"rank": 8})
    for i, task in enumerate(TASKS[:3]):
        _run(
            root / "lora_short" / task,
            "lora",
            task,
            0,
            0.3 + 0.1 * i,
            0.35 + 0.1 * i,
            options={"rank": 8},
            epochs=10,
        )
    for i, task in enumerate(TASKS[:4]):
        _run(root / "adapter" / task, "adapter", task, 0, 0.5 + 0.05 * i, 0.55 + 0.05 * i, options={"dim": 8},
             with_config=False, params=156_768)  # fmt: skip
    for i, task in enumerate(TASKS[7:13]):
        _run(root / "vpt" / task, "vpt", task, 0, 0.6 + 0.03 * i, 0.62 + 0.03 * i, options={"num_prompts": 10},
             preset="vpt/paper", protocol="vtab", weights=weights, params=92_160)  # fmt: skip
    _tuning(root, "lora", "cifar", [0.70, 0.72])
    _tuning(root, "lora", "digits", [0.90, 0.91])


def _outputs(root: Path) -> dict[str, str]:
    from petl_zoo.results import collect_rows, plot_points, select_published
    from petl_zoo.results import results_table as vtab_table

    out = {
        f"table.{fmt}": vtab_table(root, fmt, published="same", selection=fmt != "csv")
        for fmt in ("markdown", "csv", "latex")
    }
    out["published_all.markdown"] = vtab_table(None, "markdown", published="all")
    rows, _ = collect_rows(root)
    points = plot_points(rows, select_published(rows, "all"), "best", "tasks")
    out["plot_points.txt"] = "".join(f"{p!r}\n" for p in points)
    return {name: text.replace(str(root), "<root>") for name, text in out.items()}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_table_text_equals_the_recorded_text(tmp_path):
    build_tree(tmp_path)
    outputs = _outputs(tmp_path)
    if os.environ.get("PETL_ZOO_REGOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name, text in outputs.items():
            (GOLDEN / name).write_text(text, encoding="utf-8")
    for name, text in outputs.items():
        assert text == (GOLDEN / name).read_text(encoding="utf-8"), name
