"""The installed package, not the checkout: a wheel in a fresh venv runs every console command.

The venv reuses the dependencies of the environment running the tests (a ``.pth`` file naming its
package folders: works from a virtualenv, a conda env and a system Python) but holds its own,
non-editable petl_zoo, and every command runs from a folder outside the checkout, so nothing can come from the
source tree (the card template is package data, the sweep runs ``python -m petl_zoo.train``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    dist = base / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(ROOT),
        ],
        cwd=base,
        env=env,
    )
    (wheel,) = dist.glob("petl_zoo-*.whl")
    _run([sys.executable, "-m", "venv", str(base / "venv")], cwd=base, env=env)
    python = base / "venv" / "bin" / "python"
    _see_this_environment(python, base, env)
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=base, env=env
    )
    work = base / "elsewhere"
    work.mkdir()
    return {"python": python, "bin": python.parent, "work": work, "base": base}


def _site_dirs() -> list[str]:
    """The running interpreter's package folders (a virtualenv's, a conda env's or the system's):
    where its dependencies (torch, timm, ...) are installed."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def _see_this_environment(python: Path, base: Path, env: dict[str, str]) -> None:
    """Make the new venv see the dependencies of the environment running the tests. ``venv
    --system-site-packages`` would show the *base* interpreter's packages, which lack them when the
    tests run inside a virtualenv; a ``.pth`` file names this environment's folders instead (their own
    ``.pth`` files, such as an editable petl_zoo's, are not run: petl_zoo comes from the wheel)."""
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base, env
    )
    Path(purelib.stdout.strip(), "parent_environment.pth").write_text("\n".join(_site_dirs()) + "\n")
    found = _run([str(python), "-c", "import torch; print(torch.__file__)"], base, env).stdout.strip()
    assert found == torch.__file__, (found, torch.__file__)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


@pytest.mark.slow  # builds a wheel and a venv, prepares digits, trains one epoch: ~1 min
def test_wheel_in_fresh_venv_runs_the_console_commands(venv):
    env, work, bin_ = _env(), venv["work"], venv["bin"]
    where = _run(
        [str(venv["python"]), "-c", "import petl_zoo, vtab; print(petl_zoo.__file__, vtab.__file__)"],
        work,
        env,
    )
    assert all(str(venv["base"]) in p and str(ROOT) not in p for p in where.stdout.split()), where.stdout
    petl_zoo_cmd = str(bin_ / "petl-zoo")
    usage = _run([petl_zoo_cmd, "--help"], work, env).stdout
    assert all(name in usage for name in ("train", "eval", "sweep", "table", "card", "bench", "prepare"))

    data = work / "data"
    _run([petl_zoo_cmd, "prepare", "--task", "digits", "--out", str(data)], work, env)
    torch.manual_seed(0)
    import timm

    backbone = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, **{k: int(v) for k, v in (item.split("=") for item in TINY)}
    )
    weights = work / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    run = work / "runs" / "lora" / "digits"
    train = [
        petl_zoo_cmd,
        "train",
        "--method",
        "lora",
        "--opt",
        "rank=2",
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        *TINY,
        "--pretrained-file",
        str(weights),
        "--task",
        "digits",
        "--data-root",
        str(data),
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--batch-size",
        "100",
        "--no-progress",
        "--out",
        str(run),
    ]
    _run(train, work, env)
    result = json.loads((run / "result.json").read_text())
    assert result["method"] == "lora" and 0.0 <= result["test_acc_last"] <= 1.0

    _run([petl_zoo_cmd, "eval", "--adapter", str(run), "--check"], work, env)
    table = _run([petl_zoo_cmd, "table", str(work / "runs")], work, env).stdout
    assert "lora" in table
    published = _run([petl_zoo_cmd, "table", "--published", "all"], work, env).stdout  # package data
    assert "| RepAdapter | vpetl-bench |" in published and "JieShibo/PETL-ViT" in published
    card = work / "card"
    _run([petl_zoo_cmd, "card", str(run), "--out", str(card)], work, env)
    assert "petl_zoo.from_pretrained" in (card / "README.md").read_text()
    load = (
        "import sys, petl_zoo; m = petl_zoo.from_pretrained(sys.argv[1], pretrained_file=sys.argv[2]); "
        "print(petl_zoo.method_of(m).name)"
    )
    assert (
        _run([str(venv["python"]), "-c", load, str(card), str(weights)], work, env).stdout.strip() == "lora"
    )
    printed = _run(
        [
            petl_zoo_cmd,
            "sweep",
            "--method",
            "lora",
            "--tasks",
            "digits",
            "--out-root",
            "elsewhere",
            "--print-commands",
        ],
        work,
        env,
    )
    assert "-m petl_zoo.train" in printed.stdout
    for module in ("petl_zoo", "petl_zoo.train", "petl_zoo.train.eval"):
        _run([str(venv["python"]), "-m", module, "--help"], work, env)
