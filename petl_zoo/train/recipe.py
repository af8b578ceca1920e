"""Training recipes, one per benchmark, overridden by a method's paper values, then a preset, then flags.

The ``vtab`` recipe (NOAH / VPT / LoRA-ViT codebases): train on ``train800val200``, AdamW lr 1e-3,
weight decay 1e-4, global batch 64, 100 epochs, per-step linear warmup over 10 epochs from 1e-6, then
cosine to 1e-5, drop_path 0.1, the backbone's own normalisation, images resized to the input size, test
evaluation every 10 epochs; one micro-batch per optimizer step (``accumulate``), the head at the same lr
(``head_lr``), no gradient clipping.

The ``fgvc`` recipe (FGVC-5): VPT's schedule and transform (``configs/base-prompt.yaml``,
``src/data/transforms.py``): 100 epochs, 10 warmup, cosine; the shorter side to 256 then a random
224 crop + flip (eval: the center crop), ImageNet mean/std. The optimizer, lr, weight decay and batch are
the ``vtab`` recipe's (VPT's SGD at batch 128 with a per-task lr grid is a method's tuning, not the
benchmark's protocol; the tuned protocol picks lr and weight decay on val for every method alike).

The ``suite`` recipe (NEAT's and FourierFT's full-dataset code, ``image-classification/main.py`` and
``experiments/ViT/exec.py``, Hugging Face ``Trainer`` defaults where they set nothing): 10 epochs, AdamW
with the head in its own group, per-step linear decay to 0 without warmup, 64 images per micro-batch
with 4-step accumulation (256 per step), gradients clipped to norm 1 (the Trainer's ``max_grad_norm``),
no drop path, RandomResizedCrop + flip (eval: shorter side to 224, center crop), the backbone's own
normalisation (their image processor's), training on the 90 % train split, and the final model scored
once on the whole test split. lr / head_lr 5e-3 and weight decay 1e-4 are NEAT's ``run.sh`` values
for most datasets; the per-dataset ones are the ``neat`` preset ``paper``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from vtab.transforms import CROPS, PROTOCOLS

from ..fingerprint import NEUTRAL_RECIPE_VALUES

if TYPE_CHECKING:
    import torch

__all__ = [
    "RECIPES",
    "RECIPE_KEYS",
    "PRECISIONS",
    "PROTOCOLS",
    "SELECT_ON",
    "SCHEDULES",
    "TRAIN_SPLITS",
    "BENCHMARK_RECIPES",
    "default_recipe",
    "train_split",
    "resolve_recipe",
    "validate_recipe",
    "execution_defaults",
    "WarmupCosine",
    "WarmupLinear",
    "Schedule",
    "build_schedule",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
SELECT_ON = ("test", "val")
SCHEDULES = ("cosine", "linear")
TRAIN_SPLITS = ("train", "trainval")

RECIPES: dict[str, dict[str, Any]] = {
    "vtab": {
        "epochs": 100,
        "lr": 1e-3,
        "batch_size": 64,
        "weight_decay": 1e-4,
        "warmup_epochs": 10,
        "warmup_lr": 1e-6,
        "min_lr": 1e-5,
        "drop_path": 0.1,
        # The backbone's own input normalisation (timm's pretrained config), as a timm user expects and
        # as VPT, SSF, FacT, Convpass, RepAdapter and NOAH trained; "vtab" (unnormalised [0, 1] inputs,
        # the Lily / Binary-Adapter convention) was the default until it was measured to cost a linear
        # probe on the proxy ViT 31 points, 75.3 -> 44.5 (docs/train.md, "Input protocol").
        "protocol": "default",
        "augment": False,
        "eval_every": 10,
        "seed": 0,
        "select_on": "test",
        "precision": None,  # resolved at run time by execution_defaults: bf16 on GPU, fp32 on CPU
        # accumulate 1, head_lr None (the head at lr), schedule cosine, crop none (resize to the input
        # size), train_split None (train800val200, or train800 when selecting on val), clip_grad None:
        # the behaviour before these keys existed, so they stay out of the recipe fingerprint
        # (petl_zoo.fingerprint).
        **NEUTRAL_RECIPE_VALUES,
    }
}
RECIPES["fgvc"] = {**RECIPES["vtab"], "protocol": "imagenet", "crop": "center", "augment": True}
RECIPES["suite"] = {
    **RECIPES["vtab"],
    "epochs": 10,
    "lr": 5e-3,
    "head_lr": 5e-3,
    "batch_size": 64,
    "accumulate": 4,
    "weight_decay": 1e-4,
    "warmup_epochs": 0,
    "schedule": "linear",
    "clip_grad": 1.0,
    "drop_path": 0.0,
    "crop": "random_resized",
    "augment": True,
    "train_split": "train",
    "eval_every": 10,
}
#: The recipe a task's benchmark trains with unless ``--recipe`` says otherwise (custom tasks: ``vtab``).
BENCHMARK_RECIPES: dict[str, str] = {"vtab": "vtab", "fgvc": "fgvc", "suite": "suite"}

RECIPE_KEYS: tuple[str, ...] = tuple(RECIPES["vtab"])

_TYPES: dict[str, tuple[type, ...]] = {
    "epochs": (int,),
    "lr": (int, float),
    "batch_size": (int,),
    "weight_decay": (int, float),
    "warmup_epochs": (int,),
    "warmup_lr": (int, float),
    "min_lr": (int, float),
    "drop_path": (int, float),
    "protocol": (str,),
    "augment": (bool,),
    "eval_every": (int,),
    "seed": (int,),
    "select_on": (str,),
    "precision": (str, type(None)),
    "accumulate": (int,),
    "head_lr": (int, float, type(None)),
    "schedule": (str,),
    "crop": (str,),
    "train_split": (str, type(None)),
    "clip_grad": (int, float, type(None)),
}


def resolve_recipe(
    name: str,
    method_recipe: dict[str, Any] | None,
    flags: dict[str, Any],
    method: str = "",
    preset: tuple[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The recipe values and where each came from (``recipe:<name>``, ``method:<method>``,
    ``preset:<method>/<name>``, ``flag``, or ``scaled:epochs`` for a warmup shortened to fit a short run,
    see ``_fit_warmup``): the recipe < the method's recipe < the preset's values < flags.

    ``flags`` maps recipe keys to command-line values; ``None`` means "not given". ``preset`` is
    ``(label, values)`` of a per-task preset (``petl_zoo.presets``).
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(sorted(RECIPES))}")
    recipe = dict(RECIPES[name])
    sources = {k: f"recipe:{name}" for k in recipe}
    for key, value in (method_recipe or {}).items():
        if key not in recipe:
            raise ValueError(
                f"method '{method}' overrides unknown recipe key {key!r}; valid keys: {', '.join(RECIPE_KEYS)}"
            )
        recipe[key] = value
        sources[key] = f"method:{method}"
    planned_epochs = recipe["epochs"]  # a shorter run from the preset or a flag scales the warmup
    label, values = preset if preset is not None else ("", {})
    for key, value in values.items():
        if key not in recipe:
            raise ValueError(
                f"preset {label} sets unknown recipe key {key!r}; valid keys: {', '.join(RECIPE_KEYS)}"
            )
        recipe[key] = value
        sources[key] = f"preset:{label}"
    for key, value in flags.items():
        if key not in recipe:
            raise ValueError(f"unknown recipe key {key!r}; valid keys: {', '.join(RECIPE_KEYS)}")
        if value is not None:
            recipe[key] = value
            sources[key] = "flag"
    _fit_warmup(recipe, sources, planned_epochs)
    validate_recipe(recipe)
    if recipe["train_split"] is not None and recipe["train_split"] == train_split(
        {**recipe, "train_split": None}
    ):
        recipe["train_split"] = None  # the split select_on implies: the same run as without the key
    return recipe, sources


def _fit_warmup(recipe: dict[str, Any], sources: dict[str, str], planned_epochs: Any) -> None:
    """A short run (``--epochs 3``) with the recipe's warmup (10 epochs) that does not fit it: the
    warmup keeps its share of the recipe's run, ``warmup * epochs // planned epochs`` (10 of 100 -> 0
    of 3, 1 of 10), recorded as ``recipe_sources["warmup_epochs"] = "scaled:epochs"`` and said in one
    line. A warmup given with ``--warmup-epochs`` is never changed (too long: an error)."""
    warmup, epochs = recipe["warmup_epochs"], recipe["epochs"]
    if sources["warmup_epochs"] == "flag" or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (epochs, planned_epochs)
    ):
        return
    if not isinstance(warmup, int) or warmup <= epochs or epochs >= planned_epochs:
        return
    scaled = warmup * epochs // planned_epochs
    logger.info(
        f"warmup: {warmup} epochs ({sources['warmup_epochs']}, of {planned_epochs}) do not fit {epochs} "
        f"epochs; scaled to {scaled} (the same share of the run); choose with --warmup-epochs N"
    )
    recipe["warmup_epochs"], sources["warmup_epochs"] = scaled, "scaled:epochs"


def validate_recipe(recipe: dict[str, Any]) -> None:
    """Types and ranges of every recipe value; one ValueError naming the bad value and the valid ones."""
    for key, types in _TYPES.items():
        value = recipe[key]
        if isinstance(value, bool) and bool not in types:
            raise ValueError(f"recipe value {key}={value!r} must be {' or '.join(t.__name__ for t in types)}")
        if not isinstance(value, types):
            raise ValueError(f"recipe value {key}={value!r} must be {' or '.join(t.__name__ for t in types)}")

    def need(ok: bool, key: str, valid: str) -> None:
        if not ok:
            raise ValueError(f"{key.replace('_', '-')} {recipe[key]!r} is invalid; valid: {valid}")

    need(recipe["epochs"] >= 1, "epochs", "an integer >= 1")
    need(math.isfinite(recipe["lr"]) and recipe["lr"] > 0, "lr", "a number > 0")
    need(recipe["batch_size"] >= 1, "batch_size", "an integer >= 1")
    need(recipe["weight_decay"] >= 0, "weight_decay", "a number >= 0")
    need(0 <= recipe["warmup_epochs"] <= recipe["epochs"], "warmup_epochs", f"0..epochs ({recipe['epochs']})")
    need(recipe["warmup_lr"] >= 0, "warmup_lr", "a number >= 0")
    need(recipe["min_lr"] >= 0, "min_lr", "a number >= 0")
    need(0 <= recipe["drop_path"] < 1, "drop_path", "a rate in [0, 1)")
    need(recipe["protocol"] in PROTOCOLS, "protocol", ", ".join(PROTOCOLS))
    need(recipe["eval_every"] >= 1, "eval_every", "an integer >= 1")
    need(recipe["seed"] >= 0, "seed", "an integer >= 0")
    need(recipe["select_on"] in SELECT_ON, "select_on", ", ".join(SELECT_ON))
    need(recipe["precision"] in (None, *PRECISIONS), "precision", ", ".join(PRECISIONS))
    need(recipe["accumulate"] >= 1, "accumulate", "an integer >= 1")
    head_lr = recipe["head_lr"]
    need(head_lr is None or (math.isfinite(head_lr) and head_lr > 0), "head_lr", "a number > 0")
    need(recipe["schedule"] in SCHEDULES, "schedule", ", ".join(SCHEDULES))
    need(recipe["crop"] in CROPS, "crop", ", ".join(CROPS))
    need(recipe["train_split"] in (None, *TRAIN_SPLITS), "train_split", ", ".join(TRAIN_SPLITS))
    clip = recipe["clip_grad"]
    need(clip is None or (math.isfinite(clip) and clip > 0), "clip_grad", "a number > 0")


def train_split(recipe: dict[str, Any]) -> str:
    """The split a recipe trains on: its ``train_split``, else ``trainval`` (``train`` when selecting on
    val, so that val stays unseen)."""
    if recipe["train_split"] is not None:
        return recipe["train_split"]
    return "trainval" if recipe["select_on"] == "test" else "train"


def default_recipe(task: str) -> str:
    """The recipe of ``task``'s benchmark (``vtab`` for VTAB-1K's, custom and the demo tasks)."""
    import vtab

    info = vtab.find_task(task)
    return BENCHMARK_RECIPES[info.benchmark] if info is not None else "vtab"


def execution_defaults(device: torch.device, precision: str | None, workers: int | None) -> tuple[str, int]:
    """``(precision, workers)`` with the device's defaults where not given (``None``), validated.

    bf16 autocast and 4 DataLoader workers on GPU; fp32 and 0 workers on CPU (where decoding small PNGs
    costs less than worker processes). fp16 needs a GPU. The one place these defaults live (the trainer
    and ``tools/eval.py`` both call it).
    """
    from .errors import UserError

    on_gpu = device.type == "cuda"
    precision = precision if precision is not None else ("bf16" if on_gpu else "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is invalid; valid: {', '.join(PRECISIONS)}")
    if precision == "fp16" and not on_gpu:
        raise UserError("--precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    workers = workers if workers is not None else (4 if on_gpu else 0)
    if workers < 0:
        raise UserError(f"--workers {workers} is invalid; valid: an integer >= 0")
    return precision, workers


class WarmupCosine:
    """Per-optimizer-step learning rate: linear warmup, then half a cosine.

    ``lr(s) = warmup_lr + (lr - warmup_lr) * s / W`` for ``s < W`` (``W`` warmup steps), then
    ``lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2`` for ``T`` total steps.
    Stateless: the rate depends only on the global step, so a resumed run continues exactly.

    This is the schedule of timm's ``CosineLRScheduler(t_initial=T - W, lr_min=min_lr, warmup_t=W,
    warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False)`` stepped with ``step_update``,
    but written out because timm's rounds differently: it computes ``warmup_lr + s * ((lr - warmup_lr) / W)``
    and ``cos(pi * t / T')`` as ``(pi * t) / T'``, which differ from the above in the last bit at
    some steps (310 of the 1600 steps of the ``vtab`` recipe on 1000 images, at most 5e-15 relative;
    ``tests/test_train.py`` compares the two at every step). Switching would change the ``lr`` recorded
    in ``metrics.jsonl`` and, rarely, a float32 update, so runs would no longer repeat earlier ones
    bit for bit.
    """

    def __init__(
        self, lr: float, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float
    ) -> None:
        self.lr, self.total, self.warmup = float(lr), int(total_steps), int(warmup_steps)
        self.warmup_lr, self.min_lr = float(warmup_lr), float(min_lr)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def state_dict(self) -> dict[str, float]:
        return {
            "lr": self.lr,
            "total": self.total,
            "warmup": self.warmup,
            "warmup_lr": self.warmup_lr,
            "min_lr": self.min_lr,
        }


class WarmupLinear:
    """Per-optimizer-step learning rate: the same linear warmup as :class:`WarmupCosine`, then a linear
    decay from ``lr`` to 0 at the end of the run (``min_lr`` is not used):
    ``lr(s) = lr * (T - s) / (T - W)`` for ``W <= s <= T``. Stateless, like ``WarmupCosine``."""

    def __init__(self, lr: float, total_steps: int, warmup_steps: int, warmup_lr: float) -> None:
        self.lr, self.total, self.warmup = float(lr), int(total_steps), int(warmup_steps)
        self.warmup_lr = float(warmup_lr)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup
        span = max(1, self.total - self.warmup)
        return self.lr * max(0.0, 1.0 - (step - self.warmup) / span)

    def state_dict(self) -> dict[str, float]:
        return {"lr": self.lr, "total": self.total, "warmup": self.warmup, "warmup_lr": self.warmup_lr}


Schedule = WarmupCosine | WarmupLinear


def build_schedule(recipe: dict[str, Any], steps_per_epoch: int) -> Schedule:
    """The recipe's schedule (``recipe["schedule"]``) over ``epochs * steps_per_epoch`` optimizer steps."""
    total, warmup = recipe["epochs"] * steps_per_epoch, recipe["warmup_epochs"] * steps_per_epoch
    if recipe["schedule"] == "linear":
        return WarmupLinear(recipe["lr"], total, warmup, recipe["warmup_lr"])
    return WarmupCosine(recipe["lr"], total, warmup, recipe["warmup_lr"], recipe["min_lr"])
