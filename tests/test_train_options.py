"""The trainer's accumulate, head_lr, schedule, clip_grad and train_split options (issue 26), the
benchmark recipes built from them, and their recipe fingerprints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_train import TINY, read, write_task
from torch import nn

from petl_zoo.api import classifier_parameters
from petl_zoo.fingerprint import NEUTRAL_RECIPE_VALUES, recipe_fingerprint
from petl_zoo.train import main, resolve_recipe
from petl_zoo.train.args import build_train_parser
from petl_zoo.train.distributed import DistInfo
from petl_zoo.train.errors import UserError
from petl_zoo.train.loop import Run, _train_step, build_run
from petl_zoo.train.recipe import RECIPES, WarmupCosine, WarmupLinear, build_schedule
from petl_zoo.train.spec import resolve_spec
from petl_zoo.train.state import build_optimizer


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("vtab"))


def run_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    """One epoch, no warmup, no randomness in the data or the model (no augmentation, drop_path 0)."""
    return [
        "--method", "lora",
        "--model", "vit_tiny_patch16_224",
        "--model-kwargs", *TINY,
        "--no-pretrained",
        "--task", "synth",
        "--data-root", str(data_root),
        "--out", str(out),
        "--epochs", "1",
        "--batch-size", "8",
        "--warmup-epochs", "0",
        "--lr", "3e-3",
        "--drop-path", "0",
        "--precision", "fp32",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def built_run(data_root: Path, out: Path, *extra: str) -> Run:
    args = build_train_parser(raise_errors=True).parse_args(run_args(data_root, out, *extra))
    return build_run(resolve_spec(args, torch.device("cpu"), []), DistInfo())


def batch(run: Run, indices: range, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [run.data.train_set[i] for i in indices]
    return torch.stack([s[0] for s in samples]).to(dtype), torch.tensor([int(s[1]) for s in samples])


def trainable(run: Run) -> dict[str, nn.Parameter]:
    return {n: p for n, p in run.state.model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------- accumulate
def test_accumulated_step_equals_one_step_over_the_concatenation(data_root, tmp_path):
    """fp64: one step over micro-batches A (5 images) and B (3) is the step over A+B (8): each loss is
    weighted by its share of the samples (5/8, 3/8), so unequal micro-batches are exact too."""
    acc = built_run(data_root, tmp_path / "acc", "--accumulate", "2")
    one = built_run(data_root, tmp_path / "one")
    for run in (acc, one):
        run.state.model.double()
    before = {n: p.detach().clone() for n, p in trainable(one).items()}
    assert all(torch.equal(before[n], p) for n, p in trainable(acc).items())
    a, b = batch(acc, range(0, 5), torch.float64), batch(acc, range(5, 8), torch.float64)
    both = (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
    lr = acc.schedule(0)
    loss_acc = _train_step(acc, [a, b], lr, 0, 0)
    loss_one = _train_step(one, [both], lr, 0, 0)
    assert acc.state.global_step == one.state.global_step == 1
    assert abs(loss_acc.item() - loss_one.item()) <= 1e-12
    p_acc, p_one = trainable(acc), trainable(one)
    param_diff = max((p_acc[n] - p_one[n]).abs().max().item() for n in p_one)
    grad_diff = max((p_acc[n].grad - p_one[n].grad).abs().max().item() for n in p_one)
    assert all(torch.allclose(p_acc[n], p_one[n], rtol=0, atol=1e-12) for n in p_one), param_diff
    assert all(torch.allclose(p_acc[n].grad, p_one[n].grad, rtol=0, atol=1e-12) for n in p_one), grad_diff
    assert any(not torch.equal(before[n], p_one[n]) for n in p_one)  # the step moved the parameters


def test_trainer_with_accumulate_counts_optimizer_steps(data_root, tmp_path, capsys):
    """24 training images in micro-batches of 8: 3 micro-batches, 2 optimizer steps (2 + the 1 left)."""
    out = tmp_path / "run"
    assert main(run_args(data_root, out, "--accumulate", "2", "--eval-every", "1")) == 0
    assert "1 epochs x 2 steps" in capsys.readouterr().out
    config = read(out, "config.json")
    assert config["recipe"]["accumulate"] == 2 and config["recipe_sources"]["accumulate"] == "flag"
    (record,) = read(out, "metrics.jsonl")
    assert record["lr"] == WarmupCosine(3e-3, 2, 0, 1e-6, 1e-5)(1)  # the last of 2 steps' rate
    assert math.isfinite(record["train_loss"]) and "test_acc" in record
    assert (out / "result.json").is_file()


def test_torchrun_two_processes_with_accumulate_match_one_process(tmp_path):
    """``--accumulate 2`` under DDP (gloo, 2 processes; ``no_sync`` for the micro-batches before a step's
    last) trains the weights of one process with the same global batch and ``--accumulate 2``."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_train_ddp import REPO
    from test_train_ddp import args as ddp_args

    data_root = write_task(tmp_path / "vtab")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = [*ddp_args(data_root, tmp_path / "ddp"), "--accumulate", "2"]
    proc = subprocess.run(
        [*launcher, str(REPO / "tools" / "train.py"), *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*ddp_args(data_root, tmp_path / "single"), "--accumulate", "2"]) == 0
    assert json.loads((tmp_path / "ddp" / "result.json").read_text())["world_size"] == 2
    a = load_file(str(tmp_path / "ddp" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "single" / "adapter.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
    assert a["blocks.1.attn.qkv.deltas.lora_v.lora_B"].abs().max() > 1e-4  # trained, not trivially equal


# ---------------------------------------------------------------------------------------- head_lr
def test_head_lr_puts_the_head_in_its_own_group_at_its_own_lr(data_root, tmp_path):
    run = built_run(data_root, tmp_path / "head", "--head-lr", "0.03")
    groups = run.state.optimizer.param_groups
    assert len(groups) == 2
    head = [p for p in classifier_parameters(run.state.model) if p.requires_grad]
    assert head and [id(p) for p in groups[1]["params"]] == [id(p) for p in head]
    head_ids = {id(p) for p in head}
    assert all(id(p) not in head_ids for p in groups[0]["params"])
    peak = run.schedule(0)  # no warmup: the schedule's peak
    assert peak == pytest.approx(3e-3, rel=1e-12)
    _train_step(run, [batch(run, range(8), torch.float32)], peak, 0, 0)
    assert groups[0]["lr"] == peak and groups[1]["lr"] == pytest.approx(0.03, rel=1e-12)
    later = run.schedule(1)
    _train_step(run, [batch(run, range(8), torch.float32)], later, 0, 1)
    assert groups[1]["lr"] == pytest.approx(later * 0.03 / 3e-3, rel=1e-12)  # the same shape, scaled


def test_head_lr_groups_of_a_probe_and_of_a_frozen_head():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    model.requires_grad_(False)
    model.head.requires_grad_(True)  # a linear probe: the head's group alone
    (group,) = build_optimizer(model, 1e-3, 1e-4, head_scale=10.0).param_groups
    assert group["lr"] == pytest.approx(1e-2) and len(group["params"]) == 2
    model.head.requires_grad_(False)
    model.cls_token.requires_grad_(True)
    with pytest.raises(UserError, match="--head-lr"):
        build_optimizer(model, 1e-3, 1e-4, head_scale=10.0)


# --------------------------------------------------------------------------------------- schedule
def test_schedules_pinned():
    linear = WarmupLinear(lr=1.0, total_steps=10, warmup_steps=2, warmup_lr=0.0)
    assert [linear(s) for s in range(11)] == [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    no_warmup = WarmupLinear(lr=2e-3, total_steps=4, warmup_steps=0, warmup_lr=1e-6)
    assert [no_warmup(s) for s in range(4)] == pytest.approx([2e-3, 1.5e-3, 1e-3, 5e-4], rel=1e-12)
    cosine = WarmupCosine(lr=1.0, total_steps=10, warmup_steps=2, warmup_lr=0.0, min_lr=0.0)
    assert [cosine(s) for s in (0, 1, 2, 6)] == pytest.approx([0.0, 0.5, 1.0, 0.5], abs=1e-15)
    assert cosine(4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), rel=1e-15)
    recipe = dict(RECIPES["vtab"], epochs=10, warmup_epochs=1)
    assert type(build_schedule(recipe, 5)) is WarmupCosine
    s = build_schedule(dict(recipe, schedule="linear"), 5)
    assert type(s) is WarmupLinear and (s.total, s.warmup, s(5), s(50)) == (50, 5, 1e-3, 0.0)


@pytest.mark.parametrize(
    "flags, needle",
    [
        ({"accumulate": 0}, "accumulate 0 is invalid; valid: an integer >= 1"),
        ({"head_lr": -1.0}, "head-lr -1.0 is invalid; valid: a number > 0"),
        ({"schedule": "step"}, "schedule 'step' is invalid; valid: cosine, linear"),
        ({"clip_grad": 0.0}, "clip-grad 0.0 is invalid; valid: a number > 0"),
        ({"crop": "square"}, "crop 'square' is invalid; valid: none, center, random_resized"),
        ({"train_split": "test"}, "train-split 'test' is invalid; valid: train, trainval"),
    ],
)
def test_bad_option_values_are_one_line(flags, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_recipe("vtab", None, flags)


# ----------------------------------------------------------------------------------- fingerprints
def test_neutral_values_keep_the_recipe_fingerprint():
    old_recipe = {k: v for k, v in RECIPES["vtab"].items() if k not in NEUTRAL_RECIPE_VALUES}
    old = {"method": "lora", "model": "vit_tiny_patch16_224", "recipe": old_recipe}
    neutral = dict(old, recipe={**old_recipe, "accumulate": 1, "head_lr": None, "schedule": "cosine"})
    assert recipe_fingerprint(old) == recipe_fingerprint(neutral)
    assert recipe_fingerprint(dict(old, recipe=RECIPES["vtab"])) == recipe_fingerprint(old)
    changes = ({"accumulate": 2}, {"head_lr": 1e-2}, {"schedule": "linear"}, {"crop": "center"})
    changes += ({"train_split": "train"}, {"clip_grad": 1.0})
    changed = [recipe_fingerprint(dict(old, recipe={**neutral["recipe"], **change})) for change in changes]
    assert len({recipe_fingerprint(old), *changed}) == 1 + len(changes)
    # the split select_on implies, given explicitly, is the run without the key
    assert resolve_recipe("vtab", None, {"train_split": "trainval"})[0]["train_split"] is None


# -------------------------------------------------------------------------------- benchmark recipes
def test_benchmark_recipes_pinned():
    """fgvc: VTAB's optimizer with VPT's schedule and transform; suite: NEAT's / FourierFT's Trainer
    setup (10 epochs, 64 x 4 accumulation, head group, linear decay to 0 from step 0, clip 1)."""
    vtab_recipe, fgvc, suite = RECIPES["vtab"], RECIPES["fgvc"], RECIPES["suite"]
    assert {k: v for k, v in fgvc.items() if vtab_recipe[k] != v} == {
        "protocol": "imagenet",
        "crop": "center",
        "augment": True,
    }
    assert {k: v for k, v in suite.items() if vtab_recipe[k] != v} == {
        "epochs": 10,
        "lr": 5e-3,
        "head_lr": 5e-3,
        "accumulate": 4,
        "warmup_epochs": 0,
        "schedule": "linear",
        "clip_grad": 1.0,
        "drop_path": 0.0,
        "crop": "random_resized",
        "augment": True,
        "train_split": "train",
    }
    # suite on 45,000 images (CIFAR's 90 %): 704 micro-batches of 64 -> 176 steps per epoch
    schedule = build_schedule(suite, 176)
    assert (schedule.total, schedule.warmup) == (1760, 0)
    assert [schedule(s) for s in (0, 880, 1759, 1760)] == pytest.approx([5e-3, 2.5e-3, 5e-3 / 1760, 0.0])
    fgvc_schedule = build_schedule(fgvc, 10)
    assert type(fgvc_schedule) is WarmupCosine and (fgvc_schedule.total, fgvc_schedule.warmup) == (1000, 100)


@pytest.mark.parametrize(
    "task, bench, recipe",
    [("synth", None, "vtab"), ("fgvc_cub", None, "fgvc"), ("cub", None, "fgvc"), ("dtd", "suite", "suite")],
)
def test_the_task_benchmark_picks_the_default_recipe(tmp_path, task, bench, recipe):
    """A task's benchmark gives the recipe (a custom task: vtab); --benchmark scopes the name; the
    missing folder is named by its canonical name."""
    extra = ["--benchmark", bench] if bench else []
    argv = [a if a != "synth" else task for a in run_args(tmp_path, tmp_path / "out", *extra)]
    args = build_train_parser(raise_errors=True).parse_args(argv)
    if task == "synth":
        write_task(tmp_path)
        spec = resolve_spec(args, torch.device("cpu"), [])
        assert spec.recipe_sources["crop"] == "recipe:vtab"
        return
    import vtab
    from petl_zoo.train.recipe import default_recipe

    name = vtab.task_folder_name(task, bench)
    assert default_recipe(name) == recipe
    (tmp_path / "dtd").mkdir()  # VTAB-1K's folder is never the suite's
    with pytest.raises(UserError, match=f"No folder for task '{name}' under .* \\(looked for {name}\\)"):
        resolve_spec(args, torch.device("cpu"), [])


# ------------------------------------------------------------------------------------ clip_grad
def test_clip_grad_bounds_the_step_gradient_norm(data_root, tmp_path):
    """--clip-grad N: after the step, the trainable gradients' total norm is N (it was larger), the
    direction unchanged, as the Hugging Face Trainer's max_grad_norm."""
    clipped = built_run(data_root, tmp_path / "clip", "--clip-grad", "0.01")
    free = built_run(data_root, tmp_path / "free")
    images = batch(free, range(8), torch.float32)
    for run in (clipped, free):
        _train_step(run, [images], 1e-3, 0, 0)
    grads = [torch.cat([p.grad.flatten() for p in trainable(r).values()]) for r in (clipped, free)]
    assert grads[1].norm() > 0.01 and grads[0].norm() == pytest.approx(0.01, rel=1e-4)
    assert torch.allclose(grads[0] / grads[0].norm(), grads[1] / grads[1].norm(), atol=1e-6)
