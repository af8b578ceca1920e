"""Training and evaluation tools: the logic behind ``tools/train.py`` and ``tools/eval.py``.

    python tools/train.py --method lora --model vit_base_patch16_224 --task dtd
    torchrun --nproc_per_node 8 tools/train.py --method lora --task cifar
    python tools/eval.py --adapter runs/lora/dtd

See docs/train.md.
"""

from .args import TrainingError, UserError
from .backbone import WeightsUnavailableError, build_backbone
from .cli import eval_main, main
from .loop import evaluate, evaluate_counts, run_training
from .recipe import RECIPES, WarmupCosine, resolve_recipe

__all__ = [
    "RECIPES",
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
