"""Training and evaluation tools: the logic behind ``tools/train.py`` and ``tools/eval.py``.

    python tools/train.py --method lora --model vit_base_patch16_224 --task dtd
    python -m petl_zoo.train --method lora --task dtd          # the same trainer
    torchrun --nproc_per_node 8 tools/train.py --method lora --task cifar
    python tools/eval.py --adapter runs/lora/dtd              # or python -m petl_zoo.train.eval

Modules: ``cli`` (the trainer's entry point and the error handling of both tools), ``args`` (command
lines), ``errors`` (``UserError``, ``TrainingError``), ``spec`` (the resolved run settings), ``recipe``
(recipes, schedule, device defaults), ``backbone`` (the timm backbone builder), ``data``, ``state``
(``TrainState``: what the checkpoint holds), ``checkpoint`` (starting in a run folder, the checkpoint
on disk), ``lock`` (one trainer per folder), ``loop`` (``run_training`` and its steps), ``engine``
(seeding, autocast, evaluation), ``report`` (the result record), ``distributed``, ``eval``
(tools/eval.py). The run folder's files are named, read and written by :mod:`petl_zoo.runfolder`.
See docs/train.md and docs/reliability.md.
"""

from .backbone import WeightsUnavailableError, build_backbone
from .cli import main
from .engine import evaluate, evaluate_counts
from .errors import TrainingError, UserError
from .loop import run_training
from .recipe import RECIPES, WarmupCosine, resolve_recipe
from .state import TrainState


def eval_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """tools/eval.py (:func:`petl_zoo.train.eval.eval_main`), imported when called: importing the
    package must not import ``eval``, which ``python -m petl_zoo.train.eval`` runs as ``__main__``."""
    from .eval import eval_main as run

    return run(argv, prog)


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
