"""Training and evaluation tools: the logic behind ``tools/train.py`` and ``tools/eval.py``.

    python tools/train.py --method lora --model vit_base_patch16_224 --task dtd
    python -m petl_zoo.train --method lora --task dtd          # the same trainer
    torchrun --nproc_per_node 8 tools/train.py --method lora --task cifar
    python tools/eval.py --adapter runs/lora/dtd              # or python -m petl_zoo.train.eval

Modules: ``cli`` (entry points), ``args`` (command lines), ``spec`` (the resolved run settings),
``recipe`` (recipes, schedule, device defaults), ``backbone`` (the timm backbone builder), ``data``,
``state`` (``TrainState``: what ``last.pt`` holds), ``checkpoint`` (the run folder, ``last.pt`` on
disk), ``lock`` (``run.lock``: one trainer per folder), ``loop`` (``run_training`` and its steps),
``engine`` (seeding, autocast, evaluation), ``report`` (result.json), ``distributed``, ``eval``
(tools/eval.py). See docs/train.md and docs/reliability.md.
"""

from .args import TrainingError, UserError
from .backbone import WeightsUnavailableError, build_backbone
from .cli import eval_main, main
from .engine import evaluate, evaluate_counts
from .loop import run_training
from .recipe import RECIPES, WarmupCosine, resolve_recipe
from .state import TrainState

__all__ = [
    "RECIPES",
    "TrainState",
    "TrainingError",
    "UserError",
    "WarmupCosine",
    "WeightsUnavailableError",
    "build_backbone",
    "eval_main",
    "evaluate",
    "evaluate_counts",
    "main",
    "resolve_recipe",
    "run_training",
]
