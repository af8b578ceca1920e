"""The training run behind ``tools/train.py``: build, train, evaluate, checkpoint, resume, report."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import resource
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import __version__ as petl_zoo_version
from ..api import adapter_state_dict, create, load_adapter_weights, save_adapter, trainable_parameters
from ..io import atomic_write_json, atomic_write_text
from ..registry import Method, TrainContext, get_method
from . import distributed as D
from .args import TrainingError, UserError, method_options, parse_key_values
from .backbone import build_backbone
from .checkpoint import (
    CHECKPOINT,
    capture_rng,
    load_checkpoint,
    prepare_out_dir,
    restore_rng,
    save_checkpoint,
)
from .recipe import WarmupCosine, resolve_recipe

__all__ = ["evaluate", "evaluate_counts", "run_training", "RunSpec", "seed_everything", "make_autocast"]

# Settings that must be equal for --resume to continue a run (everything that changes the numbers).
_RESUME_KEYS = ("method", "method_options", "model", "model_kwargs", "task", "pretrained_file", "pretrained", "recipe")


class SimulatedKill(Exception):
    """Raised by the ``--stop-after-epoch`` testing aid right after a checkpoint was written."""


# --------------------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """The loop's precision context factory: ``torch.autocast`` for bf16/fp16, a no-op for fp32."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_counts(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> tuple[int, int]:
    """(correct, total) of top-1 predictions over ``loader`` (model in eval mode, restored after)."""
    from tqdm import tqdm

    autocast = autocast or nullcontext
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    try:
        for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast():
                logits = model(images)
            correct += (logits.argmax(dim=-1) == labels).sum()
            total += labels.numel()
    finally:
        model.train(was_training)
    return int(correct.item()), total


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` over ``loader``."""
    correct, total = evaluate_counts(model, loader, torch.device(device), autocast)
    if total == 0:
        raise ValueError("evaluation loader yielded no samples")
    return correct / total


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _signature(model: nn.Module) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(n, id(p), tuple(p.shape)) for n, p in _trainable(model)]


def _build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, previous: torch.optim.Optimizer | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (one group, weight decay on all of them, as the VTAB
    codebases do); AdamW state of parameters that were already trained carries over."""
    params = [p for _, p in _trainable(model)]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if previous is not None:
        for p in params:
            if p in previous.state:
                opt.state[p] = previous.state[p]
    return opt


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "petl_zoo": petl_zoo_version,
    }


def _peak_mem_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors on GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _set_trainable(model: nn.Module, names: list[str]) -> None:
    wanted = set(names)
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"checkpoint names trainable parameters this model lacks, e.g. {unknown[:3]}")
    for name, p in params.items():
        p.requires_grad_(name in wanted)


# ------------------------------------------------------------------------------------------- settings
@dataclass
class RunSpec:
    """Everything a run depends on, resolved from the command line (what config.json records)."""

    method: str
    method_options: dict[str, Any]
    model: str
    model_kwargs: dict[str, Any]
    task: str
    num_classes: int
    data_root: str
    pretrained_file: str | None
    pretrained: bool
    recipe: dict[str, Any]
    recipe_sources: dict[str, str]
    out: Path
    workers: int
    device: torch.device
    compile: bool = False
    progress: bool = True
    keep_checkpoint: bool = False
    find_unused_parameters: bool = False
    resume: bool = False
    overwrite: bool = False
    stop_after_epoch: int | None = None
    argv: list[str] = field(default_factory=list)

    def config_json(self, info: D.DistInfo) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_options": self.method_options,
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "task": self.task,
            "num_classes": self.num_classes,
            "data_root": self.data_root,
            "pretrained_file": self.pretrained_file,
            "pretrained": self.pretrained,
            "recipe": self.recipe,
            "recipe_sources": self.recipe_sources,
            "world_size": info.world_size,
            "per_rank_batch_size": self.recipe["batch_size"] // info.world_size,
            "device": self.device.type,
            "workers": self.workers,
            "compile": self.compile,
            "argv": self.argv,
            "versions": _versions(),
        }


def resolve_spec(args: Any, device: torch.device, argv: list[str]) -> RunSpec:
    """Validate the command line into a RunSpec (user errors are ValueError/FileNotFoundError)."""
    import vtab

    method_cls = get_method(args.method)
    config = method_options(method_cls, args.opt, args.method_config)
    model_kwargs = parse_key_values(args.model_kwargs, "--model-kwargs")
    flags = {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "eval_every": args.eval_every,
        "seed": args.seed,
        "drop_path": args.drop_path,
        "protocol": args.protocol,
        "augment": args.augment,
        "precision": args.precision,
        "select_on": args.select_on,
    }
    recipe, sources = resolve_recipe(args.recipe, method_cls.recipe, flags, method_cls.name)
    if recipe["precision"] is None:
        recipe["precision"] = "bf16" if device.type == "cuda" else "fp32"
        sources["precision"] = f"device:{device.type}"
    if recipe["precision"] == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    if args.pretrained_file is not None and args.no_pretrained:
        raise UserError("--pretrained-file and --no-pretrained contradict each other: give one")
    pretrained_file = str(Path(args.pretrained_file).expanduser().absolute()) if args.pretrained_file else None
    if pretrained_file is not None and not Path(pretrained_file).is_file():
        raise FileNotFoundError(f"pretrained file {pretrained_file} does not exist")
    folder = vtab.task_dir(args.task, args.data_root)  # unknown task / missing root: clear errors
    info = vtab.find_task(args.task)
    task = info.name if info is not None else folder.name
    num_classes = vtab.num_classes(args.task, args.data_root)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    if workers < 0:
        raise UserError(f"--workers {workers} is invalid; valid: an integer >= 0")
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise UserError(f"--stop-after-epoch {args.stop_after_epoch} is invalid; valid: an integer >= 1")
    out = Path(args.out) if args.out else Path("runs") / method_cls.name / task
    return RunSpec(
        method=method_cls.name,
        method_options=config.to_dict(),
        model=args.model,
        model_kwargs=model_kwargs,
        task=task,
        num_classes=num_classes,
        data_root=str(vtab.resolve_root(args.data_root)),
        pretrained_file=pretrained_file,
        pretrained=not args.no_pretrained,
        recipe=recipe,
        recipe_sources=sources,
        out=out,
        workers=workers,
        device=device,
        compile=args.compile,
        progress=not args.no_progress,
        keep_checkpoint=args.keep_checkpoint,
        find_unused_parameters=args.find_unused_parameters,
        resume=args.resume,
        overwrite=args.overwrite,
        stop_after_epoch=args.stop_after_epoch,
        argv=argv,
    )


def build_patched_model(spec_like: dict[str, Any], drop_path: float) -> nn.Module:
    """Seed, build the backbone and create the method: the same frozen weights on every call (also for
    ``--no-pretrained``, whose random initialisation follows the seed)."""
    seed_everything(spec_like["recipe"]["seed"])
    model = build_backbone(
        spec_like["model"],
        spec_like["num_classes"],
        pretrained_file=spec_like["pretrained_file"],
        pretrained=spec_like["pretrained"],
        model_kwargs=spec_like["model_kwargs"],
        drop_path_rate=drop_path,
    )
    return create(spec_like["method"], model, **spec_like["method_options"])


# ------------------------------------------------------------------------------------------ the run
@dataclass
class _Best:
    test_acc: float | None = None
    test_epoch: int | None = None
    val_acc: float | None = None
    val_epoch: int | None = None
    test_at_val: float | None = None
    last_test: float | None = None
    last_val: float | None = None


def _log(info: D.DistInfo, text: str) -> None:
    if info.is_main:
        print(text, flush=True)


def run_training(spec: RunSpec, info: D.DistInfo) -> dict[str, Any]:
    """Train ``spec`` on this rank; returns result.json's dict (written by rank 0)."""
    from tqdm import tqdm

    import vtab

    wall_start = time.time()
    recipe, device = spec.recipe, spec.device
    seed = recipe["seed"]
    if recipe["batch_size"] % info.world_size:
        raise UserError(
            f"--batch-size {recipe['batch_size']} is not divisible by the {info.world_size} processes; "
            f"give a multiple of {info.world_size}"
        )
    per_rank = recipe["batch_size"] // info.world_size
    resume = prepare_out_dir(spec.out, spec.resume, spec.overwrite, info.is_main)
    D.barrier(info)
    config = spec.config_json(info)
    ckpt: dict[str, Any] | None = None
    if resume:
        ckpt = load_checkpoint(spec.out / CHECKPOINT)
        saved = ckpt["config"]
        diff = [k for k in _RESUME_KEYS if json.dumps(saved.get(k), sort_keys=True) != json.dumps(config[k], sort_keys=True)]
        if diff:
            key = diff[0]
            raise UserError(
                f"--resume: the run in {spec.out} was started with {key}={json.dumps(saved.get(key))}, "
                f"this command gives {json.dumps(config[key])}; repeat the original options or use --overwrite"
            )
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    # Model: seeded backbone + method (identical on every rank and on resume).
    model = build_patched_model(config, recipe["drop_path"])
    method: Method = model.petl_method
    if ckpt is not None:
        method.set_state(model, ckpt["method_state"])
        _set_trainable(model, ckpt["trainable"])
        load_adapter_weights(model, ckpt["model"], source=str(spec.out / CHECKPOINT))
    model.to(device)

    # Data.
    train_split = "trainval" if recipe["select_on"] == "test" else "train"
    train_tf = vtab.build_transform(model, recipe["protocol"], augment=recipe["augment"])
    eval_tf = vtab.build_transform(model, recipe["protocol"])
    root = spec.data_root
    train_set = vtab.VtabDataset(spec.task, train_split, train_tf, root, spec.num_classes)
    eval_sets = {"test": vtab.VtabDataset(spec.task, "test", eval_tf, root, spec.num_classes)}
    if recipe["select_on"] == "val":
        eval_sets["val"] = vtab.VtabDataset(spec.task, "val", eval_tf, root, spec.num_classes)
    sampler = D.train_sampler(train_set, info, seed)
    # With augmentation in worker processes the workers' RNGs must depend on the epoch only (for an
    # exact --resume), so the loader is rebuilt per epoch; otherwise one loader serves every epoch.
    rebuild_loader = recipe["augment"] and spec.workers > 0

    def train_loader(epoch: int) -> DataLoader:
        return vtab.make_loader(
            train_set, per_rank, shuffle=False, sampler=sampler, workers=spec.workers, seed=seed + 1000003 * epoch
        )

    loader = train_loader(0)
    eval_loaders = {
        name: vtab.make_loader(D.shard(ds, info), recipe["batch_size"], shuffle=False, workers=spec.workers, seed=seed)
        for name, ds in eval_sets.items()
    }
    steps_per_epoch = len(loader)
    epochs = recipe["epochs"]
    schedule = WarmupCosine(
        recipe["lr"], epochs * steps_per_epoch, recipe["warmup_epochs"] * steps_per_epoch, recipe["warmup_lr"], recipe["min_lr"]
    )
    autocast = make_autocast(device, recipe["precision"])

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), labels)

    ctx = TrainContext(
        device=device,
        loss_fn=loss_fn,
        autocast=autocast,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        epoch=0,
        step=0,
        is_main=info.is_main,
    )

    def check_state_agrees(when: str) -> None:
        if not D.same_on_all_ranks(method.get_state(), info):
            raise TrainingError(f"method '{method.name}' built different structures on the ranks {when}")

    best = _Best()
    metrics: list[dict[str, Any]] = []
    selected: dict[str, Any] | None = None
    start_epoch, global_step, train_time, images_seen = 0, 0, 0.0, 0
    resumed_from = None
    if ckpt is None:
        if info.is_main:
            spec.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(spec.out / "config.json", config)
            atomic_write_text(spec.out / "metrics.jsonl", "")
        model.train()
        if info.enabled:
            # Every rank runs the callback on the whole training set in the single-process order.
            start_set = D.DistInfo()
            start_loader = vtab.make_loader(
                train_set, recipe["batch_size"], shuffle=False, sampler=D.train_sampler(train_set, start_set, seed),
                workers=spec.workers, seed=seed,
            )
        else:
            start_loader = loader
        method.on_train_start(model, start_loader, ctx)
        check_state_agrees("in on_train_start")
        optimizer = _build_optimizer(model, schedule(0), recipe["weight_decay"])
    else:
        optimizer = _build_optimizer(model, schedule(0), recipe["weight_decay"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, global_step = ckpt["epoch"], ckpt["global_step"]
        train_time, images_seen = ckpt["train_time_s"], ckpt["images_seen"]
        best = _Best(**ckpt["best"])
        metrics = ckpt["metrics"]
        selected = ckpt["selected"]
        resumed_from = start_epoch
        restore_rng(ckpt["rng"])
        if info.is_main:
            atomic_write_text(spec.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
        _log(info, f"resuming {spec.out} after epoch {start_epoch}/{epochs}")
        del ckpt
    scaler = torch.amp.GradScaler(device.type, enabled=recipe["precision"] == "fp16")

    def wrap(m: nn.Module) -> nn.Module:
        fwd = m
        if info.enabled:
            fwd = nn.parallel.DistributedDataParallel(
                m,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=spec.find_unused_parameters,
            )
        if spec.compile:
            fwd = torch.compile(fwd)
        return fwd

    forward = wrap(model)
    signature = _signature(model)
    if info.is_main:
        counts = trainable_parameters(model)
        _log(
            info,
            f"{method.name} on {spec.model} / {spec.task}: {counts['method']:,} method + {counts['head']:,} head "
            f"trainable parameters ({counts['percent']:.3f}% of the backbone); {len(train_set)} train images, "
            f"{epochs} epochs x {steps_per_epoch} steps, global batch {recipe['batch_size']} on "
            f"{info.world_size} x {device.type}, {recipe['precision']}",
        )

    for epoch in range(start_epoch, epochs):
        ctx.epoch = epoch
        if rebuild_loader and epoch > 0:
            loader = train_loader(epoch)
        sampler.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        epoch_start = time.time()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{epochs}",
            leave=False,
            disable=not (spec.progress and info.is_main),
            dynamic_ncols=True,
        )
        lr = schedule(global_step)
        for i, (images, labels) in enumerate(bar):
            ctx.step = global_step
            lr = schedule(global_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast():
                logits = forward(images)
            loss = loss_fn(logits, labels)
            finite = bool(torch.isfinite(loss).item())
            if not D.all_true(finite, device, info):
                where = f"epoch {epoch + 1} step {i + 1}/{steps_per_epoch} (global step {global_step + 1})"
                kept = (
                    f"the last good checkpoint {spec.out / CHECKPOINT} (after epoch {epoch}) is kept"
                    if epoch > 0
                    else "no checkpoint was written yet"
                )
                raise TrainingError(f"loss is {loss.item()} at {where}; {kept}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            method.on_after_backward(model, ctx)
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            loss_sum += loss.detach().double() * labels.numel()
            count += labels.numel()
            if bar.disable is False and (i % 5 == 0 or i == steps_per_epoch - 1):
                rate = count * info.world_size / max(time.time() - epoch_start, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        bar.close()
        epoch_time = time.time() - epoch_start
        loss_total, n_total = D.all_sum([loss_sum.item(), float(count)], device, info)
        epoch_images = int(n_total)
        train_time += epoch_time
        images_seen += epoch_images
        img_per_s = epoch_images / max(epoch_time, 1e-9)

        method.on_epoch_end(model, epoch, ctx)
        new_signature = _signature(model)
        if new_signature != signature:
            check_state_agrees(f"after epoch {epoch + 1}")
            optimizer = _build_optimizer(model, lr, recipe["weight_decay"], previous=optimizer)
            forward = wrap(model)
            signature = new_signature
            _log(info, f"epoch {epoch + 1}: trainable parameters changed, optimizer rebuilt "
                 f"({sum(math.prod(s) for _, _, s in signature):,} trainable)")

        done = epoch + 1
        record: dict[str, Any] = {
            "epoch": done,
            "split": train_split,
            "train_loss": loss_total / max(n_total, 1),
            "lr": lr,
            "img_per_s": img_per_s,
            "time_s": epoch_time,
        }
        if done % recipe["eval_every"] == 0 or done == epochs:
            for name, eval_loader in eval_loaders.items():
                correct, total = evaluate_counts(model, eval_loader, device, autocast)
                correct, total = D.all_sum([float(correct), float(total)], device, info)
                record[f"{name}_acc"] = correct / total
            test = record["test_acc"]
            best.last_test = test
            if best.test_acc is None or test > best.test_acc:
                best.test_acc, best.test_epoch = test, done
            line = f"[eval] epoch {done}/{epochs}  test {test:.4f}  best {best.test_acc:.4f} @ {best.test_epoch}"
            if "val_acc" in record:
                val = record["val_acc"]
                best.last_val = val
                if best.val_acc is None or val > best.val_acc:
                    best.val_acc, best.val_epoch, best.test_at_val = val, done, test
                    selected = {
                        "epoch": done,
                        "tensors": _to_cpu(adapter_state_dict(model)),
                        "method_state": method.get_state(),
                        "trainable": [n for n, _ in _trainable(model)],
                    }
                line += f"  val {val:.4f} (best {best.val_acc:.4f} @ {best.val_epoch} -> test {best.test_at_val:.4f})"
            _log(info, line + f"  last {test:.4f}")
        elif not spec.progress:
            _log(info, f"epoch {done}/{epochs}  loss {record['train_loss']:.4f}  lr {lr:.2e}  {img_per_s:.0f} img/s")
        metrics.append(record)
        if info.is_main:
            with open(spec.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(
                spec.out / CHECKPOINT,
                {
                    "config": config,
                    "epoch": done,
                    "global_step": global_step,
                    "model": _to_cpu(adapter_state_dict(model)),
                    "method_state": method.get_state(),
                    "trainable": [n for n, _ in _trainable(model)],
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": capture_rng(),
                    "best": vars(best),
                    "selected": selected,
                    "metrics": metrics,
                    "train_time_s": train_time,
                    "images_seen": images_seen,
                },
            )
        D.barrier(info)
        if spec.stop_after_epoch is not None and done == spec.stop_after_epoch and done < epochs:
            raise SimulatedKill(f"stopped after epoch {done} (--stop-after-epoch, a testing aid that simulates a kill)")

    # Report.
    trainable = trainable_parameters(model)
    result: dict[str, Any] = {
        "method": method.name,
        "model": spec.model,
        "task": spec.task,
        "seed": seed,
        "num_classes": spec.num_classes,
        "method_config": method.config.to_dict(),
        "select_on": recipe["select_on"],
        "test_acc_best": best.test_acc,
        "best_epoch": best.test_epoch,
        "test_acc_last": best.last_test,
        "test_acc_selected": best.test_at_val if recipe["select_on"] == "val" else best.test_acc,
        "selected_epoch": best.val_epoch if recipe["select_on"] == "val" else best.test_epoch,
        "val_acc_best": best.val_acc,
        "val_acc_last": best.last_val,
        "epochs": epochs,
        "trainable_params": trainable,
        "train_time_s": train_time,
        "wall_time_s": time.time() - wall_start,
        "img_per_s": images_seen / max(train_time, 1e-9),
        "peak_mem_mb": _peak_mem_mb(device),
        "precision": recipe["precision"],
        "world_size": info.world_size,
        "device": device.type,
        "resumed_from_epoch": resumed_from,
    }
    if info.is_main:
        if recipe["select_on"] == "val" and selected is not None and selected["epoch"] != epochs:
            chosen = build_patched_model(config, 0.0)
            chosen.petl_method.set_state(chosen, selected["method_state"])
            _set_trainable(chosen, selected["trainable"])
            load_adapter_weights(chosen, selected["tensors"], source=f"epoch {selected['epoch']} (best val)")
            save_adapter(chosen, spec.out)
        else:
            save_adapter(model, spec.out)
        atomic_write_json(spec.out / "result.json", result)
        if not spec.keep_checkpoint:
            (spec.out / CHECKPOINT).unlink(missing_ok=True)
        sel = ""
        if recipe["select_on"] == "val":
            sel = f", selected on val (epoch {best.val_epoch}) {best.test_at_val:.4f}"
        print(
            f"done: test acc best {best.test_acc:.4f} (epoch {best.test_epoch}), last {best.last_test:.4f}{sel}; "
            f"train {train_time:.1f} s, {result['img_per_s']:.0f} img/s; wrote {spec.out}",
            flush=True,
        )
    D.barrier(info)
    return result


def default_argv(argv: list[str] | None) -> list[str]:
    """What config.json records as the command (``tools/train.py`` + the arguments)."""
    if argv is None:
        return [os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "tools/train.py", *sys.argv[1:]]
    return ["tools/train.py", *argv]
