"""Command lines of ``tools/train.py`` and ``tools/eval.py`` and the parsing of their key=value options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from vtab.tasks import BENCHMARK_NAMES
from vtab.transforms import CROPS

from ..config import MethodConfig, coerce_value, parse_cli_value, parse_key_values, split_key_value
from ..io import read_json
from .errors import TrainingError, UserError
from .recipe import PRECISIONS, PROTOCOLS, RECIPES, SCHEDULES, SELECT_ON, TRAIN_SPLITS

__all__ = [
    "UserError",
    "TrainingError",
    "build_train_parser",
    "build_eval_parser",
    "parse_key_values",
    "method_options",
    "read_options_file",
]

#: torch.compile's backend when ``--compile`` names none: torch's own default, what users get.
DEFAULT_COMPILE_BACKEND = "inductor"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line ``error: ...`` message (the usage is on ``--help``); with
    ``raise_errors`` a bad command line is a UserError instead (for callers that parse a trainer
    command line in-process, e.g. the sweep)."""

    raise_errors = False

    def error(self, message: str) -> NoReturn:
        if self.raise_errors:
            raise UserError(f"trainer arguments: {message}")
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_train_parser(prog: str = "tools/train.py", raise_errors: bool = False) -> argparse.ArgumentParser:
    """The trainer's command line; ``prog`` is how usage and error lines name the command;
    ``raise_errors``: a bad command line raises UserError rather than exiting."""
    p = _Parser(
        prog=prog,
        description="Train a PETL method on a task of VTAB-1K, FGVC-5 or the full-dataset suite (single "
        "process, or under torchrun with DDP).",
    )
    _add_what_arguments(p)
    _add_recipe_arguments(p)
    _add_execution_arguments(p)
    p.raise_errors = raise_errors
    return p


def _add_what_arguments(p: argparse.ArgumentParser) -> None:
    """What is trained on what: the method and its options, the model, the task and its data."""
    g = p.add_argument_group("what to train")
    g.add_argument("--method", required=True, help="registered method name (petl_zoo.list_methods())")
    g.add_argument("--model", default="vit_base_patch16_224", help="timm model name (default %(default)s)")
    g.add_argument(
        "--task", required=True, help="task name or alias (in --benchmark), or a custom folder under the root"
    )
    g.add_argument(
        "--benchmark",
        default=None,
        choices=BENCHMARK_NAMES,
        help="the benchmark --task is in (default: inferred from the name; a VTAB-1K name means VTAB-1K's, "
        "e.g. dtd; cars needs fgvc or suite); it also picks the default --recipe",
    )
    g.add_argument("--data-root", default=None, help="VTAB-1K root (default $VTAB_ROOT, else ./data/vtab-1k)")
    g.add_argument(
        "--num-classes",
        type=int,
        default=None,
        metavar="N",
        help="a custom task's class count (default: the largest label + 1, refused when it leaves classes empty)",
    )
    g.add_argument("--out", default=None, help="run folder (default runs/<method>/<task>)")
    g.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, repeatable (e.g. --opt rank=8 --opt targets=q,v)",
    )
    g.add_argument("--method-config", default=None, metavar="FILE", help="YAML/JSON dict of method options")
    g.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="a paper's per-task option and recipe values (e.g. paper; petl_zoo.presets.available_presets)",
    )
    g.add_argument(
        "--pretrained-file", default=None, metavar="PATH", help=".npz (Google ViT), .safetensors, .pth/.bin"
    )
    g.add_argument(
        "--no-pretrained", action="store_true", help="random initialisation (no pretrained weights)"
    )
    g.add_argument(
        "--model-kwargs",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="timm.create_model options, e.g. img_size=32 patch_size=4 depth=6",
    )


def _add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """How it is trained: the recipe's values (each flag's help names the recipe's default)."""
    r = p.add_argument_group("recipe (defaults: the recipe, then the method's own values, then these flags)")
    r.add_argument(
        "--recipe",
        default=None,
        choices=sorted(RECIPES),
        help="base recipe (default: the task's benchmark's: vtab, fgvc or suite; vtab for custom tasks)",
    )
    r.add_argument("--epochs", type=int, default=None, help=_recipe_default("epochs"))
    r.add_argument("--lr", type=float, default=None, help=_recipe_default("lr"))
    r.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch (split over the processes); " + _recipe_default("batch_size"),
    )
    r.add_argument("--weight-decay", type=float, default=None, help=_recipe_default("weight_decay"))
    r.add_argument("--warmup-epochs", type=int, default=None, help=_recipe_default("warmup_epochs"))
    r.add_argument(
        "--schedule",
        default=None,
        choices=SCHEDULES,
        help="after the warmup: cosine to the recipe's min_lr, or linear to 0; "
        + _recipe_default("schedule"),
    )
    r.add_argument(
        "--accumulate",
        type=int,
        default=None,
        metavar="N",
        help="micro-batches of --batch-size per optimizer step (effective batch: batch size x N); "
        + _recipe_default("accumulate"),
    )
    r.add_argument(
        "--head-lr",
        type=float,
        default=None,
        metavar="LR",
        help="peak lr of the classifier head's own AdamW group (the schedule scaled by head-lr/lr; none: "
        "the head at --lr); " + _recipe_default("head_lr"),
    )
    r.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="evaluation period in epochs; " + _recipe_default("eval_every"),
    )
    r.add_argument("--seed", type=int, default=None, help=_recipe_default("seed"))
    r.add_argument(
        "--drop-path",
        type=float,
        default=None,
        help="stochastic depth rate of the backbone; " + _recipe_default("drop_path"),
    )
    _add_input_arguments(r)


def _add_input_arguments(r: argparse._ArgumentGroup) -> None:
    """The rest of the recipe: the inputs (protocol, crop, augmentation, the split trained on), the
    precision and what is evaluated and selected."""
    r.add_argument(
        "--protocol",
        default=None,
        choices=PROTOCOLS,
        help="image transform protocol; " + _recipe_default("protocol"),
    )
    r.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train-time random crop + flip (the --crop form's); " + _recipe_default("augment"),
    )
    r.add_argument(
        "--crop",
        default=None,
        choices=CROPS,
        help="none: resize to the input size; center: VPT's resize to 256/224 + crop; random_resized: "
        "RandomResizedCrop (eval: resize + center crop); " + _recipe_default("crop"),
    )
    r.add_argument(
        "--train-split",
        default=None,
        choices=TRAIN_SPLITS,
        help="the split trained on (none: trainval, or train with --select-on val); "
        + _recipe_default("train_split"),
    )
    r.add_argument(
        "--clip-grad",
        type=float,
        default=None,
        metavar="NORM",
        help="clip the trainable gradients' total norm; " + _recipe_default("clip_grad"),
    )
    r.add_argument("--precision", default=None, choices=PRECISIONS, help="default bf16 on GPU, fp32 on CPU")
    r.add_argument(
        "--select-on",
        default=None,
        choices=SELECT_ON,
        help="test: train on train800val200; val: train on train800, select the best val epoch; "
        + _recipe_default("select_on"),
    )
    r.add_argument(
        "--no-test",
        action="store_true",
        help="evaluate on val only, never on test (tuning grid points; needs --select-on val)",
    )


def _recipe_default(key: str) -> str:
    """``default: the recipe's <value> ...`` for a recipe flag: the ``vtab`` recipe's value, and each
    other recipe's where it differs."""

    def shown(value: object) -> str:
        return "off" if value is False else "on" if value is True else "none" if value is None else str(value)

    base = RECIPES["vtab"][key]
    others = [f"{name} {shown(r[key])}" for name, r in RECIPES.items() if name != "vtab" and r[key] != base]
    differ = f" ({', '.join(others)})" if others else ""
    return f"default: the recipe's {shown(base)}{differ} (a method's or preset's own value first)"


def _add_execution_arguments(p: argparse.ArgumentParser) -> None:
    """How the run executes (device, workers, resume ...): not part of what the run is."""
    x = p.add_argument_group("execution")
    x.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    x.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default 4 on GPU, 0 on CPU)"
    )
    x.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward (evaluation runs the plain module)",
    )
    x.add_argument(
        "--compile-backend",
        default=DEFAULT_COMPILE_BACKEND,
        metavar="NAME",
        help="torch.compile's backend for --compile (default %(default)s, torch's own; aot_eager compiles "
        "in seconds without generated code)",
    )
    x.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="timm's gradient checkpointing: the blocks' activations are recomputed in backward (less "
        "memory, more time; the same gradients)",
    )
    x.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    x.add_argument("--overwrite", action="store_true", help="delete the run files in --out first")
    x.add_argument(
        "--no-progress",
        action="store_true",
        help="no tqdm bars, one line per epoch instead (the default when stderr is not a terminal)",
    )
    x.add_argument("--keep-checkpoint", action="store_true", help="keep last.pt after the run ends")
    x.add_argument(
        "--find-unused-parameters",
        action="store_true",
        help="DDP find_unused_parameters=True (for methods with trainable tensors unused in some steps)",
    )
    # Testing aid: stop right after the checkpoint of this (1-based) epoch, as if the process were killed.
    x.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)


def build_eval_parser(prog: str = "tools/eval.py") -> argparse.ArgumentParser:
    """The evaluator's command line; ``prog`` is how usage and error lines name the command."""
    p = _Parser(
        prog=prog,
        description="Evaluate a saved adapter (a tools/train.py run folder) on a VTAB-1K split.",
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="run folder (adapter files + config.json)")
    p.add_argument("--task", default=None, help="default: the run's task")
    p.add_argument("--data-root", default=None, help="default: the run's data root")
    p.add_argument("--split", default="test", choices=("test", "val", "train", "trainval"))
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights first")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="default: the run's precision")
    p.add_argument("--model", default=None, help="default: the run's model")
    p.add_argument("--model-kwargs", nargs="+", default=None, metavar="KEY=VALUE")
    p.add_argument("--pretrained-file", default=None, metavar="PATH", help="default: the run's file")
    p.add_argument("--no-pretrained", action="store_true", default=None)
    p.add_argument("--protocol", default=None, choices=PROTOCOLS, help="default: the run's protocol")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when the accuracy differs from result.json's (exactly; by more than 1 sample with "
        "--merge); compares test, or val for runs trained with --select-on val",
    )
    return p


def read_options_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding a dict of method options."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"method config file {path} is a folder; give a YAML or JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"method config file {path} does not exist")
    if path.suffix.lower() == ".json":
        data = read_json(path, "method config file")
    else:
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception as err:  # noqa: BLE001 - any parse error is the user's file
            reason = " ".join(str(err).split())
            raise UserError(f"method config file {path} is not valid YAML: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"method config file {path} must hold a dict of options, got {type(data).__name__}")
    return data


def _coerce_option(config_class: type[MethodConfig], key: str, text: str) -> Any:
    """A command-line string as the option's type: as given first (``'q,v'`` for a tuple, ``'1'`` for a
    str), else through ``parse_cli_value`` (``'[1, 2]'``, ``'none'``); an unknown key is left as is."""
    tp = config_class.field_types().get(key)
    if tp is None:
        return text
    for candidate in (text, parse_cli_value(text)):
        try:
            return coerce_value(candidate, tp)
        except (TypeError, ValueError):
            continue
    return text  # from_options reports the bad value with the valid ones


def method_options(
    method_cls: Any, opts: list[str], config_file: str | None, preset: dict[str, Any] | None = None
) -> MethodConfig:
    """The method's validated config: its defaults < a preset's options < ``--method-config FILE`` <
    ``--opt KEY=VALUE`` (later wins)."""
    options: dict[str, Any] = dict(preset or {})
    if config_file:
        options.update(read_options_file(config_file))
    for item in opts:
        key, value = split_key_value(item, "--opt")
        options[key] = _coerce_option(method_cls.config_class, key, value)
    return method_cls.config_class.from_options(method_cls.name, **options)
