"""The training run behind ``tools/train.py``, in named steps (after timm's ``train.py``)::

    with hold_run_folder(spec, info) as lock:  # the folder's lock: one trainer per folder (lock.py)
        run = build_run(spec, info, lock)    # resume check, model, data, schedule, fresh start or resume, wrap
        for epoch in range(run.state.epoch, epochs):
            record = train_one_epoch(run, epoch)       # the steps (hand-written AMP step, on_after_backward)
            end_of_epoch(run, epoch, record["lr"])     # on_epoch_end; a changed trainable set -> new optimizer
            evaluate_and_select(run, record)           # test (and val) accuracy, best so far, val selection
            save_epoch(run, record)                    # metrics.jsonl, last.pt, the lock's heartbeat
        result = finish(run)                 # the adapter, result.json, the summary line

Logs go to ``logging.getLogger("petl_zoo.train.loop")`` on rank 0 only; ``petl_zoo.train.cli.main``
shows them on stdout.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import create, save_adapter
from ..io import WriteError, make_dir
from ..registry import TrainContext
from . import distributed as D
from .backbone import build_backbone, compile_forward, enable_grad_checkpointing
from .checkpoint import check_out_path, load_checkpoint, prepare_out_dir, save_checkpoint
from .data import RunData, build_data
from .engine import evaluate_counts, make_autocast, seed_everything
from .errors import TrainingError, UserError
from .lock import RunLock
from .recipe import Schedule, build_schedule
from .report import build_result, done_line, start_line
from .spec import RunSpec, check_resume_config
from .state import TrainState, adapter_snapshot, restore_adapter, trainable_signature

__all__ = [
    "Run",
    "SimulatedKill",
    "DIVERGENCE_FACTOR",
    "hold_run_folder",
    "build_patched_model",
    "build_run",
    "optimizer_steps",
    "train_one_epoch",
    "end_of_epoch",
    "evaluate_and_select",
    "save_epoch",
    "finish",
    "run_training",
]

logger = logging.getLogger(__name__)

#: An epoch's training loss this many times a uniform guess's (or epoch 1's) is reported, once, as diverging.
DIVERGENCE_FACTOR = 100.0


class SimulatedKill(Exception):
    """Raised by the ``--stop-after-epoch`` testing aid right after a checkpoint was written."""


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss (in float32 also under autocast; float64 logits stay float64)."""
    return nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)


def _log(info: D.DistInfo, text: str) -> None:
    if info.is_main:
        logger.info(text)


def build_patched_model(config: dict[str, Any], drop_path: float) -> nn.Module:
    """Seed, build the backbone and create the method: the same frozen weights on every call (also for
    ``--no-pretrained``, whose random initialisation follows the seed)."""
    seed_everything(config["recipe"]["seed"])
    model = build_backbone(
        config["model"],
        config["num_classes"],
        pretrained_file=config["pretrained_file"],
        pretrained=config["pretrained"],
        model_kwargs=config["model_kwargs"],
        drop_path_rate=drop_path,
    )
    return create(config["method"], model, **config["method_options"])


@dataclass
class Run:
    """One run's moving parts: the settings, the state ``last.pt`` holds, the data, the schedule, the
    callbacks' context and the (DDP/compiled) forward module."""

    spec: RunSpec
    info: D.DistInfo
    state: TrainState
    data: RunData
    schedule: Schedule
    autocast: Callable[[], AbstractContextManager]
    ctx: TrainContext
    wall_start: float
    forward: Callable[..., Any] | None = None  # the model, under DDP and torch.compile when asked
    ddp: nn.parallel.DistributedDataParallel | None = None
    signature: list[tuple[str, int, tuple[int, ...]]] = field(default_factory=list)
    resumed_from: int | None = None
    folder_lock: RunLock | None = None


@contextmanager
def hold_run_folder(spec: RunSpec, info: D.DistInfo) -> Iterator[RunLock | None]:
    """Rank 0 holds the folder's lock (``spec.folder.lock_path``) while inside (every rank stops when it cannot: a live holder
    is a RunBusyError); released on the way out, also on an error or Ctrl-C. Yields the lock on rank 0,
    None on the others."""
    check_out_path(spec.out)
    lock, error = (RunLock(spec.out) if info.is_main else None), None
    if lock is not None:
        try:
            lock.acquire()
        except (UserError, WriteError) as err:
            error = err
    if not D.all_true(error is None, spec.device, info):
        if error is not None:
            raise error
        raise UserError(f"rank 0 could not take the lock of {spec.out} (see its error)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def build_run(spec: RunSpec, info: D.DistInfo, lock: RunLock | None = None) -> Run:
    """Everything before the first step: the folder (fresh, or the checkpoint to resume and its
    settings check), the seeded model, the data, the schedule, then a fresh start or the resumed
    state, and the forward wrapper. ``lock``: the folder's lock (``hold_run_folder``), refreshed
    after every epoch."""
    wall_start = time.time()
    recipe, device = spec.recipe, spec.device
    if recipe["batch_size"] % info.world_size:
        raise UserError(
            f"--batch-size {recipe['batch_size']} is not divisible by the {info.world_size} processes; "
            f"give a multiple of {info.world_size}"
        )
    config = spec.run_config(info)
    resume = prepare_out_dir(spec.out, spec.resume, spec.overwrite, info.is_main, config)
    D.barrier(info)
    ckpt = load_checkpoint(spec.folder.checkpoint_path) if resume else None
    if ckpt is not None:
        check_resume_config(ckpt["config"], config, spec.out)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    model = build_patched_model(config, recipe["drop_path"])  # identical on every rank and on resume
    if spec.grad_checkpointing:  # before on_train_start: its importance passes are checkpointed too
        enable_grad_checkpointing(model, spec.model)
    data = build_data(spec, info, model)
    steps, epochs = optimizer_steps(data.steps_per_epoch, recipe["accumulate"]), recipe["epochs"]
    schedule = build_schedule(recipe, steps)
    autocast = make_autocast(device, recipe["precision"])
    ctx = TrainContext(
        device=device, loss_fn=cross_entropy, autocast=autocast, epochs=epochs, steps_per_epoch=steps,
        epoch=0, step=0, is_main=info.is_main,
    )  # fmt: skip
    run = Run(spec, info, TrainState(config, model, device), data, schedule, autocast, ctx, wall_start)
    run.folder_lock = lock
    if ckpt is None:
        _start_fresh(run)
    else:
        _resume(run, ckpt)
    del ckpt
    run.forward = _wrap(run)
    run.signature = trainable_signature(model)
    if info.is_main:
        logger.info(start_line(spec, info, run.state, len(data.train_set), steps))
    return run


def _start_fresh(run: Run) -> None:
    """A new run: config.json and an empty metrics.jsonl, ``on_train_start``, the optimizer."""
    spec, info, state = run.spec, run.info, run.state
    if info.is_main:
        make_dir(spec.out)
        spec.folder.write_config(state.config)
        spec.folder.write_metrics([])
    state.model.to(spec.device)
    state.model.train()
    state.method.on_train_start(state.model, run.data.start_loader(info, spec.recipe["batch_size"]), run.ctx)
    _check_state_agrees(run, "in on_train_start")
    state.rebuild_optimizer(run.schedule(0))


def _resume(run: Run, ckpt: dict[str, Any]) -> None:
    """Continue from ``last.pt``: the state (model, optimizer, scaler, progress, RNG), metrics.jsonl."""
    spec, info, state = run.spec, run.info, run.state
    state.load_state_dict(ckpt, source=str(spec.folder.checkpoint_path))
    run.resumed_from = state.epoch
    if info.is_main:
        spec.folder.write_metrics(state.metrics)
    _log(info, f"resuming {spec.out} after epoch {state.epoch}/{spec.recipe['epochs']}")


def _wrap(run: Run) -> Callable[..., Any]:
    """The training forward: DDP under torchrun, then ``torch.compile`` with ``--compile``."""
    spec, model = run.spec, run.state.model
    forward: nn.Module = model
    if run.info.enabled:
        forward = run.ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[spec.device.index] if spec.device.type == "cuda" else None,
            find_unused_parameters=spec.find_unused_parameters,
        )
    if spec.compile:
        return compile_forward(forward, spec.compile_backend, spec.grad_checkpointing)
    return forward


def _check_state_agrees(run: Run, when: str) -> None:
    method = run.state.method
    if not D.same_on_all_ranks(method.get_state(), run.info):
        raise TrainingError(f"method '{method.name}' built different structures on the ranks {when}")


def optimizer_steps(micro_batches: int, accumulate: int) -> int:
    """Optimizer steps of an epoch of ``micro_batches`` loader batches, ``accumulate`` a step (the last
    step of an epoch takes what is left)."""
    return -(-micro_batches // accumulate)


def _step_groups(batches: Iterable[Any], accumulate: int) -> Iterator[list[Any]]:
    """The loader's batches in groups of ``accumulate`` (the last group of an epoch may be shorter)."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == accumulate:
            yield group
            group = []
    if group:
        yield group


def _sync_unless(run: Run, last: bool) -> AbstractContextManager:
    """DDP's ``no_sync`` for a micro-batch before the step's last one (gradients are all-reduced once,
    in the last backward); nothing without DDP."""
    if last or run.ddp is None:
        return nullcontext()
    return run.ddp.no_sync()


def _check_finite(run: Run, loss: torch.Tensor, epoch: int, i: int) -> None:
    """A non-finite loss on any rank stops the run (every rank, with one line)."""
    state, device = run.state, run.spec.device
    if D.all_true(bool(torch.isfinite(loss).item()), device, run.info):
        return
    where = f"epoch {epoch + 1} step {i + 1}/{run.ctx.steps_per_epoch} (global step {state.global_step + 1})"
    kept = (
        f"the last good checkpoint {run.spec.folder.checkpoint_path} (after epoch {epoch}) is kept"
        if epoch > 0
        else "no checkpoint was written yet"
    )
    raise TrainingError(f"loss is {loss.item()} at {where}; {kept}; try a lower --lr")


def _train_step(
    run: Run, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float, epoch: int, i: int
) -> torch.Tensor:
    """One optimizer step at ``lr`` (a head group at its ``lr_scale`` times it) over ``micro_batches``
    (``(images, labels)``, one unless ``--accumulate``): each micro-batch's loss is weighted by its share
    of the step's samples, so the gradient is the one of their concatenation; AMP by hand so that
    ``on_after_backward`` sees unscaled gradients, once, after the last backward; then the recipe's
    ``clip_grad`` (the total norm over the trainable tensors, as ``max_grad_norm``). A non-finite loss on
    any rank stops the run. Returns the step's loss (the mean over its samples, float64, detached)."""
    state, device = run.state, run.spec.device
    optimizer, scaler = state.optimizer, state.scaler
    run.ctx.step = state.global_step
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    samples = sum(labels.numel() for _, labels in micro_batches)
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    optimizer.zero_grad(set_to_none=True)
    for k, (images, labels) in enumerate(micro_batches):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        share = labels.numel() / samples
        with _sync_unless(run, last=k == len(micro_batches) - 1):
            with run.autocast():
                logits = run.forward(images)
            loss = cross_entropy(logits, labels)
            _check_finite(run, loss, epoch, i)
            scaler.scale(loss if len(micro_batches) == 1 else loss * share).backward()
        step_loss += loss.detach().double() * share
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    state.method.on_after_backward(state.model, run.ctx)
    if run.spec.recipe["clip_grad"] is not None:  # the suite's Trainer clips to norm 1
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, run.spec.recipe["clip_grad"])
    scaler.step(optimizer)
    scaler.update()
    state.global_step += 1
    return step_loss


def train_one_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass over the training set (0-based ``epoch``) in optimizer steps of ``accumulate``
    micro-batches; returns its metrics record (1-based ``epoch``, ``split``, ``train_loss`` averaged
    over every rank's images, last ``lr``, speed)."""
    from tqdm import tqdm

    spec, info, state, data = run.spec, run.info, run.state, run.data
    run.ctx.epoch = epoch
    loader = data.loader_for(epoch)
    data.sampler.set_epoch(epoch)
    state.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=spec.device)
    count = 0
    start = time.time()
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{spec.recipe['epochs']}",
        leave=False,
        disable=not (spec.progress and info.is_main),
        dynamic_ncols=True,
    )
    lr = run.schedule(state.global_step)
    for i, micro_batches in enumerate(_step_groups(bar, spec.recipe["accumulate"])):
        lr = run.schedule(state.global_step)
        loss = _train_step(run, micro_batches, lr, epoch, i)
        samples = sum(labels.numel() for _, labels in micro_batches)
        loss_sum += loss * samples
        count += samples
        if bar.disable is False and (i % 5 == 0 or i == run.ctx.steps_per_epoch - 1):
            rate = count * info.world_size / max(time.time() - start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
    bar.close()
    epoch_time = time.time() - start
    loss_total, n_total = D.all_sum([loss_sum.item(), float(count)], spec.device, info)
    state.train_time_s += epoch_time
    state.images_seen += int(n_total)
    return {
        "epoch": epoch + 1,
        "split": data.train_split,
        "train_loss": loss_total / max(n_total, 1),
        "lr": lr,
        "img_per_s": int(n_total) / max(epoch_time, 1e-9),
        "time_s": epoch_time,
    }


def end_of_epoch(run: Run, epoch: int, lr: float) -> None:
    """``on_epoch_end``; when the trainable set changed (pruning, masking): the same structure on every
    rank, a new optimizer carrying AdamW state over (at the same ``lr``), DDP re-wrapped."""
    state = run.state
    state.method.on_epoch_end(state.model, epoch, run.ctx)
    signature = trainable_signature(state.model)
    if signature == run.signature:
        return
    _check_state_agrees(run, f"after epoch {epoch + 1}")
    state.rebuild_optimizer(lr)
    run.forward = _wrap(run)
    run.signature = signature
    total = sum(math.prod(shape) for _, _, shape in signature)
    _log(
        run.info, f"epoch {epoch + 1}: trainable parameters changed, optimizer rebuilt ({total:,} trainable)"
    )


def evaluate_and_select(run: Run, record: dict[str, Any]) -> None:
    """On evaluation epochs (every ``eval_every`` and the last): each evaluation split's accuracy into
    ``record`` (counts summed over the ranks' shards), the best-so-far values, the val selection, and
    the ``[eval]`` line; on other epochs without bars, the epoch's loss line."""
    spec, info = run.spec, run.info
    done, epochs = record["epoch"], spec.recipe["epochs"]
    if done % spec.recipe["eval_every"] and done != epochs:
        if not spec.progress:
            loss, lr, speed = record["train_loss"], record["lr"], record["img_per_s"]
            _log(info, f"epoch {done}/{epochs}  loss {loss:.4f}  lr {lr:.2e}  {speed:.0f} img/s")
        return
    for name, loader in run.data.eval_loaders.items():
        correct, total = evaluate_counts(run.state.model, loader, spec.device, run.autocast)
        correct, total = D.all_sum([float(correct), float(total)], spec.device, info)
        record[f"{name}_acc"] = correct / total
    _log(info, _update_best(run.state, record, epochs))


def _update_best(state: TrainState, record: dict[str, Any], epochs: int) -> str:
    """Fold an evaluated ``record`` into ``state.best`` (and ``state.selected`` on a new best val
    accuracy; ties keep the earliest epoch); returns the ``[eval]`` line. A ``--no-test`` run's records
    hold no test accuracy: its line and its best values are val's alone."""
    best, done, test = state.best, record["epoch"], record.get("test_acc")
    line = f"[eval] epoch {done}/{epochs}"
    if test is not None:
        best.last_test = test
        if best.test_acc is None or test > best.test_acc:
            best.test_acc, best.test_epoch = test, done
        line += f"  test {test:.4f}  best {best.test_acc:.4f} @ {best.test_epoch}"
    if "val_acc" in record:
        val = record["val_acc"]
        best.last_val = val
        if best.val_acc is None or val > best.val_acc:
            best.val_acc, best.val_epoch, best.test_at_val = val, done, test
            state.selected = {"epoch": done, **adapter_snapshot(state.model)}
        at_test = f" -> test {best.test_at_val:.4f}" if test is not None else ""
        line += f"  val {val:.4f} (best {best.val_acc:.4f} @ {best.val_epoch}{at_test})"
    return line + (f"  last {test:.4f}" if test is not None else f"  last val {record['val_acc']:.4f}")


def save_epoch(run: Run, record: dict[str, Any]) -> None:
    """Record the finished epoch: metrics.jsonl and ``last.pt`` (rank 0), then the ``--stop-after-epoch``
    testing aid."""
    spec, info, state = run.spec, run.info, run.state
    done = record["epoch"]
    state.metrics.append(record)
    state.epoch = done
    if info.is_main:
        warning = divergence_warning(state.metrics, spec.num_classes, spec.recipe["lr"])
        if warning:
            logger.warning(warning)
        try:
            spec.folder.append_metrics(record)
            save_checkpoint(spec.folder.checkpoint_path, state.state_dict())
        except WriteError as err:
            raise TrainingError(f"{err}; {_kept_checkpoint(spec, done - 1)}") from None
    _refresh_lock(run)
    D.barrier(info)
    if spec.stop_after_epoch is not None and done == spec.stop_after_epoch and done < spec.recipe["epochs"]:
        raise SimulatedKill(
            f"stopped after epoch {done} (--stop-after-epoch, a testing aid that simulates a kill)"
        )


def _kept_checkpoint(spec: RunSpec, epoch: int) -> str:
    """What is kept when a write fails after ``epoch`` finished epochs."""
    if epoch > 0 and spec.folder.has_checkpoint:
        return (
            f"the previous checkpoint after epoch {epoch} is kept ({spec.folder.checkpoint_path}; --resume)"
        )
    return "no checkpoint was written yet"


def _refresh_lock(run: Run) -> None:
    """The lock's per-epoch heartbeat; every rank stops when another process took the folder."""
    error = None
    if run.folder_lock is not None:
        try:
            run.folder_lock.refresh()
        except TrainingError as err:
            error = err
    if not D.all_true(error is None, run.spec.device, run.info):
        raise error or TrainingError(f"rank 0 lost the lock of {run.spec.out} (see its error)")


def divergence_warning(metrics: list[dict[str, Any]], num_classes: int, lr: float) -> str | None:
    """The one-line warning when the last epoch's training loss is ``DIVERGENCE_FACTOR`` times the
    reference and no earlier epoch's was (so it is said once, also across a resume). The reference is
    the loss of a uniform guess, ln(classes), or the first epoch's loss when lower: a first epoch can
    itself diverge (a high --lr reached within the warmup)."""
    if not metrics:
        return None
    first = metrics[0]["train_loss"]
    uniform = math.log(num_classes) if num_classes >= 2 else first
    reference = min(uniform, first) if first > 0 else uniform
    if not reference > 0:
        return None
    limit = DIVERGENCE_FACTOR * reference
    *earlier, last = (m["train_loss"] for m in metrics)
    if not last > limit or any(loss > limit for loss in earlier):
        return None
    what = (
        f"epoch 1's ({first:.4g})"
        if reference < uniform
        else f"the loss of a uniform guess over {num_classes} classes ({uniform:.4g})"
    )
    return (
        f"warning: epoch {metrics[-1]['epoch']}: training loss {last:.4g} is {last / reference:.3g}x {what}; "
        f"the run is diverging: try a lower --lr (this run: {lr:.3g})"
    )


def finish(run: Run) -> dict[str, Any]:
    """The end (rank 0 writes): the adapter (with ``--select-on val`` the selected epoch's, rebuilt on a
    fresh model), result.json (last, so its presence means the run finished), ``last.pt`` removed
    unless ``--keep-checkpoint``, the summary line; returns result.json's dict."""
    spec, info, state = run.spec, run.info, run.state
    result = build_result(spec, info, state, time.time() - run.wall_start, run.resumed_from)
    if info.is_main:
        try:
            _write_outputs(run, result)
        except WriteError as err:
            raise TrainingError(f"{err}; {_kept_checkpoint(spec, state.epoch)}") from None
        if not spec.keep_checkpoint:
            spec.folder.checkpoint_path.unlink(missing_ok=True)
        logger.info(done_line(spec, state, result))
    D.barrier(info)
    return result


def _write_outputs(run: Run, result: dict[str, Any]) -> None:
    """The adapter (with ``--select-on val`` the selected epoch's, rebuilt on a fresh model), then
    result.json."""
    spec, state = run.spec, run.state
    selected, epochs = state.selected, spec.recipe["epochs"]
    if spec.recipe["select_on"] == "val" and selected is not None and selected["epoch"] != epochs:
        chosen = build_patched_model(state.config, 0.0)
        restore_adapter(chosen, selected, source=f"epoch {selected['epoch']} (best val)")
        save_adapter(chosen, spec.out, model_kwargs=spec.model_kwargs)
    else:
        save_adapter(state.model, spec.out, model_kwargs=spec.model_kwargs)
    spec.folder.write_result(result)


def run_training(spec: RunSpec, info: D.DistInfo) -> dict[str, Any]:
    """Train ``spec`` on this rank, holding its folder; returns result.json's dict (written by rank 0)."""
    with hold_run_folder(spec, info) as lock:
        run = build_run(spec, info, lock)
        for epoch in range(run.state.epoch, spec.recipe["epochs"]):
            record = train_one_epoch(run, epoch)
            end_of_epoch(run, epoch, record["lr"])
            evaluate_and_select(run, record)
            save_epoch(run, record)
        return finish(run)
