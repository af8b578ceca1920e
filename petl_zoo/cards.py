"""Hugging Face model cards for finished runs: ``README.md`` (YAML metadata + body), adapter files, recipe.

The card is built with ``huggingface_hub.ModelCard.from_template`` from ``ModelCardData`` and our Jinja
template (``petl_zoo/templates/model_card.md``, package data). Metadata: ``library_name: timm`` (the library the Hub knows for
these backbones; ``petl_zoo`` is a tag), tags [petl, petl_zoo, <method>, timm, <benchmark>,
image-classification] (the benchmark's name, e.g. vtab-1k, only for its tasks), ``base_model`` (the timm Hub id from timm's
pretrained_cfg, or the model name when the run used a local ``--pretrained-file`` or ``--no-pretrained``),
``datasets``, ``metrics: [accuracy]`` and a ``model-index``
with one result holding two accuracy metrics in percent: best epoch first (the papers' convention),
then last epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .api import checked_model_kwargs
from .io import atomic_write, atomic_write_text, make_dir
from .runfolder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD_CONFIG,
    CONFIG,
    METRICS,
    RESULT,
    RunFolder,
    read_record,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "METRIC_BEST",
    "METRIC_LAST",
    "read_run",
    "base_model_id",
    "build_card",
    "write_card",
    "push_card",
    "card_index",
    "write_index",
    "public_argv",
    "public_config",
    "short_run",
    "main",
]

#: The card template, shipped inside the package (package data).
DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"
METRIC_BEST = "top-1 accuracy (best epoch)"
METRIC_LAST = "top-1 accuracy (last epoch)"
#: Run file -> its name in the card folder (the config is renamed: the Hub reads ``config.json`` as a
#: timm model config).
COPIED_FILES = {
    ADAPTER_WEIGHTS: ADAPTER_WEIGHTS,
    ADAPTER_CONFIG: ADAPTER_CONFIG,
    CONFIG: CARD_CONFIG,
    RESULT: RESULT,
    METRICS: METRICS,
}
REQUIRED = (RESULT, ADAPTER_WEIGHTS, ADAPTER_CONFIG)


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{'result': ..., 'config': ... or {}, 'dir': Path}`` of a finished run; ValueError if it is not one."""
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise ValueError(f"run folder '{folder.path}' does not exist")
    missing = folder.missing(REQUIRED)
    if missing:
        hint = " (killed run: resume it with tools/train.py --resume)" if folder.has_checkpoint else ""
        raise ValueError(
            f"run folder '{folder.path}' lacks {missing}: not a finished tools/train.py run{hint}"
        )
    return {"result": folder.read_result(), "config": folder.read_config() or {}, "dir": folder.path}


def base_model_id(model: str, pretrained_file: str | None = None, pretrained: bool = True) -> str:
    """The Hub id of timm's default weights for ``model`` (e.g. timm/vit_base_patch16_224.augreg2_in21k_ft_in1k).

    A run trained from a local ``pretrained_file`` or from random weights (``pretrained=False``) has no Hub
    base: the model name is returned instead.
    """
    if pretrained_file or not pretrained:
        return model
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model)
    except Exception:  # noqa: BLE001 - unknown or tagged names: fall back to the name
        cfg = None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return hub_id or model


#: Flags that say where one machine kept its files, not how the run was made: left out of published cards.
_LOCAL_FLAGS = ("--out", "--data-root")


def public_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without machine paths: ``--out``/``--data-root`` dropped, other absolute paths by file name."""
    out: list[str] = []
    skip = False
    for arg in map(str, argv):
        if skip:
            skip = False
            continue
        flag, eq, value = arg.partition("=")
        if flag in _LOCAL_FLAGS:
            skip = not eq
            continue
        if os.path.isabs(arg):
            arg = Path(arg).name
        elif eq and os.path.isabs(value):
            arg = f"{flag}={Path(value).name}"
        out.append(arg)
    return out


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config.json as a card publishes it: the weights file by name and SHA-256, no data root,
    the command through :func:`public_argv`."""
    from .io import sha256_file

    public = {k: v for k, v in config.items() if k != "data_root"}
    weights = config.get("pretrained_file")
    if weights:
        public["pretrained_file"] = Path(weights).name
        if Path(weights).is_file():
            public["pretrained_file_sha256"] = sha256_file(weights)
    if isinstance(config.get("argv"), list):
        public["argv"] = public_argv(config["argv"])
    return public


def short_run(config: dict[str, Any], result: dict[str, Any]) -> str | None:
    """ "N of M epochs" when the run trained for fewer epochs than its recipe (a smoke test), else None."""
    from .registry import get_method
    from .train.recipe import RECIPES, resolve_recipe

    sources = config.get("recipe_sources") or {}
    names = [v.split(":", 1)[1] for v in sources.values() if str(v).startswith("recipe:")]
    epochs = result.get("epochs", (config.get("recipe") or {}).get("epochs"))
    if not names or names[0] not in RECIPES or epochs is None:
        return None
    method = str(result.get("method") or config.get("method"))
    try:
        method_recipe = get_method(method).recipe
    except ValueError:
        method_recipe = {}
    intended = resolve_recipe(names[0], method_recipe, {}, method, _preset_recipe(config))[0]["epochs"]
    return f"{epochs} of the recipe's {intended} epochs" if int(epochs) < int(intended) else None


def _preset_recipe(config: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(label, recipe values)`` of the preset a run used for its task (None: no preset, or one this
    install does not ship)."""
    label = config.get("preset")
    if not label or "/" not in str(label):
        return None
    from .presets import load_preset

    method, name = str(label).split("/", 1)
    try:
        return str(label), load_preset(method, name).for_task(str(config.get("task")))[1]
    except ValueError:
        return None


def _protocol_text(recipe: dict[str, Any]) -> str:
    """How the run's inputs were normalised, in words (the recipe's ``protocol``)."""
    protocol = recipe.get("protocol")
    if protocol == "default":
        return "`default`: the backbone's own normalisation (timm's pretrained config mean / std)"
    if protocol == "vtab":
        return "`vtab`: unnormalised [0, 1] inputs (the Lily / Binary-Adapter convention)"
    return f"`{protocol}`" if protocol else "not recorded"


def _reproduce_command(config: dict[str, Any], result: dict[str, Any]) -> str:
    argv = config.get("argv")
    if isinstance(argv, str):
        argv = shlex.split(argv)
    if argv:
        argv = public_argv(argv)
        if argv[0].endswith(".py"):
            return "python " + shlex.join(argv)
        if Path(argv[0]).name.startswith("python"):
            return shlex.join(["python", *argv[1:]])
        return "python tools/train.py " + shlex.join(argv)
    parts = [
        "python",
        "tools/train.py",
        "--method",
        str(result.get("method")),
        "--model",
        str(result.get("model")),
    ]
    parts += ["--task", str(result.get("task"))]
    return shlex.join(parts) + f"  # argv not recorded in {CONFIG}: recipe below"


def _pct(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return round(v * 100.0 if v <= 1.0 else v, 2)


def _count(n: Any) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    return f"{n / 1e6:.3f} M" if n >= 1e5 else f"{int(n):,}"


def _resolve_template(template_path: str | os.PathLike | None) -> Path:
    template = Path(template_path) if template_path else DEFAULT_TEMPLATE
    if not template.is_file():
        raise ValueError(
            f"card template '{template}' does not exist (the packaged one is {DEFAULT_TEMPLATE})"
        )
    return template


def _run_identity(run: dict[str, Any]) -> dict[str, Any]:
    """Method, model, task (its benchmark's name), the benchmark holding the task and the task's entry
    there (both None for a custom task)."""
    from .results.benchmarks import BENCHMARKS, canonical_task

    result, config = run["result"], run["config"]
    raw_task = str(result.get("task") or config.get("task"))
    found = [(b, e) for b in BENCHMARKS.values() for e in b.tasks if e.name == canonical_task(raw_task, b)]
    benchmark, entry = found[0] if found else (None, None)
    task = entry.name if entry else canonical_task(raw_task)
    return {
        "method": str(result.get("method") or config.get("method")),
        "model": str(result.get("model") or config.get("model")),
        "raw_task": raw_task,
        "task": task,
        "benchmark": benchmark,
        "entry": entry,
        "dataset": f"{benchmark.name}/{task}" if entry else raw_task,
    }


def _accuracies(run: dict[str, Any]) -> tuple[float, float]:
    result = run["result"]
    best, last = _pct(result.get("test_acc_best")), _pct(result.get("test_acc_last"))
    if best is None or last is None:
        raise ValueError(f"{RunFolder(run['dir']).result_path} lacks test_acc_best/test_acc_last")
    return best, last


def _card_data(ident: dict[str, Any], base: str, acc_best: float, acc_last: float):
    """The card's YAML metadata: tags, base model, dataset and the model-index (best, then last)."""
    from huggingface_hub import EvalResult, ModelCardData

    entry, benchmark = ident["entry"], ident["benchmark"]
    dataset_name = f"{benchmark.title} {entry.header}" if entry else ident["raw_task"]
    evals = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=ident["dataset"],
            dataset_name=dataset_name,
            metric_type="accuracy",
            metric_value=value,
            metric_name=name,
        )
        for name, value in ((METRIC_BEST, acc_best), (METRIC_LAST, acc_last))
    ]
    method = ident["method"]
    suite = [ident["benchmark"].name] if ident["entry"] else []
    tags = ["petl", "petl_zoo", method, "timm"] + suite + ["image-classification"]
    return ModelCardData(
        library_name="timm",
        tags=list(dict.fromkeys(tags)),
        base_model=base,
        datasets=[ident["dataset"]],
        metrics=["accuracy"],
        pipeline_tag="image-classification",
        license=None,
        model_name=f"{ident['model']}-{method}-{ident['task']}",
        eval_results=evals,
    )


def _weights_file_label(pretrained_file: str) -> str:
    """A local weights file by name and hash, never by its path on the training machine."""
    from .io import sha256_file

    path = Path(pretrained_file)
    digest = f", sha256 `{sha256_file(path)[:16]}...`" if path.is_file() else ""
    return f"`{path.name}`{digest}"


def _base_weights(config: dict[str, Any], base: str) -> tuple[str, str, bool]:
    """(how the card names the base weights, extra create_model/from_pretrained text, pretrained?)"""
    pretrained_file = config.get("pretrained_file")
    if pretrained_file:
        name = Path(pretrained_file).name
        return f"the local file {_weights_file_label(pretrained_file)} (not on the Hub)", name, True
    if not bool(config.get("pretrained", True)):
        return "none: the backbone was randomly initialised (`--no-pretrained`)", "", False
    return f"timm's default pretrained weights, `{base}`", "", True


def _tuning(run_dir: Path, seed: Any) -> dict[str, str] | None:
    """What the card says of a tuned run: the grid, the rule and the winner of the tuning record whose
    retrained runs include ``run_dir`` (None for a run that was not tuned)."""
    from .runfolder import TUNE_PREFIX, read_selection, selection_path

    folder = Path(run_dir).resolve()
    tune = next((p for p in folder.parents if p.name.startswith(TUNE_PREFIX)), None)
    record = read_selection(selection_path(tune)) if tune and selection_path(tune).is_file() else None
    if record is None or folder not in {f.resolve() for _, f in record.retrained}:
        return None
    grid = " x ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in record.grid.items())
    return {
        "grid": grid,
        "rule": record.rule or "not recorded",
        "winner": ", ".join(f"{k}={v}" for k, v in record.winner.items()),
        "seed": str(seed),
        "record": str(selection_path(Path(tune.name))),
        "fingerprint": record.grid_fingerprint,
    }


def _template_values(run: dict[str, Any], ident: dict[str, Any], base: str) -> dict[str, Any]:
    """Everything the Jinja template shows besides the metadata."""
    from .registry import list_methods

    result, config = run["result"], run["config"]
    entry, recipe = ident["entry"], config.get("recipe") or {}
    sources = config.get("recipe_sources") or {}
    params = result.get("trainable_params") or {}
    acc_best, acc_last = _accuracies(run)
    sel = result.get("test_acc_selected")
    base_weights, weights_file, pretrained = _base_weights(config, base)
    model_kwargs = checked_model_kwargs(
        config.get("model_kwargs"), str(RunFolder(run["dir"]).config_path), "model_kwargs"
    )
    return dict(
        method=ident["method"],
        method_description=list_methods().get(ident["method"], "method not registered in this install"),
        model=ident["model"],
        task=ident["task"],
        task_title=f"{ident['benchmark'].title} {entry.header}"
        if entry
        else f"the custom task {ident['raw_task']}",
        tuning=_tuning(run["dir"], result.get("seed")),
        task_kind=f"{ident['benchmark'].title} {entry.group}" if entry else "custom",
        num_classes=result.get("num_classes", "?"),
        epochs=result.get("epochs", recipe.get("epochs", "?")),
        best_epoch=result.get("best_epoch", "?"),
        acc_best=f"{acc_best:.2f}",
        acc_last=f"{acc_last:.2f}",
        acc_selected=None if sel is None else f"{_pct(sel):.2f}",
        select_on=result.get("select_on", recipe.get("select_on", "")),
        params_method=_count(params.get("method")),
        params_head=_count(params.get("head")),
        params_total=_count(params.get("total")),
        params_backbone=_count(params.get("backbone")),
        params_percent=f"{float(params['percent']):.3f}%" if "percent" in params else "n/a",
        method_config_text=json.dumps(
            result.get("method_config") or config.get("method_options") or {}, indent=2, sort_keys=True
        ),
        reproduce_command=_reproduce_command(config, result),
        recipe=sorted((str(k), json.dumps(v), str(sources.get(k, ""))) for k, v in recipe.items()),
        pretrained=pretrained,
        base_weights=base_weights,
        weights_file=weights_file,
        model_kwargs_py="".join(f", {k}={v!r}" for k, v in model_kwargs.items()),
        mergeable=_mergeable(run["dir"], ident["model"], model_kwargs),
        short_run=short_run(config, result),
        has_metrics=RunFolder(run["dir"]).metrics_path.is_file(),
        preset=config.get("preset"),
        protocol=_protocol_text(recipe),
    )


def build_card(run_dir: str | os.PathLike, template_path: str | os.PathLike | None = None):
    """The ``huggingface_hub.ModelCard`` of a finished run folder."""
    from huggingface_hub import ModelCard

    run = read_run(run_dir)
    template = _resolve_template(template_path)
    ident = _run_identity(run)
    config = run["config"]
    base = base_model_id(ident["model"], config.get("pretrained_file"), bool(config.get("pretrained", True)))
    card_data = _card_data(ident, base, *_accuracies(run))
    return ModelCard.from_template(
        card_data, template_path=str(template), **_template_values(run, ident, base)
    )


def _mergeable(run_dir: Path, model: str, model_kwargs: dict[str, Any]) -> bool:
    """Whether the run's adapter merges, as ``save_adapter`` recorded it in ``adapter_config.json``.

    Folders written before that was recorded: rebuild the saved structure on a meta-device ``model``
    (shapes only, no memory) and ask ``is_mergeable``; False (no merge line) when that is impossible.
    """
    import logging

    import timm
    import torch

    from .api import create, is_mergeable, method_of, read_adapter_config, saved_options

    adapter = read_adapter_config(run_dir)
    if "mergeable" in adapter:
        return bool(adapter["mergeable"])
    try:
        with torch.device("meta"):
            net = timm.create_model(model, pretrained=False, **model_kwargs)
            create(adapter["method"], net, **saved_options(adapter))
            method_of(net).set_state(net, adapter.get("state", {}))
        return is_mergeable(net)
    except Exception as err:  # noqa: BLE001 - unknown model or method, or an older format: say nothing
        logging.getLogger(__name__).warning("%s: cannot tell whether the adapter merges (%s)", run_dir, err)
        return False


def write_card(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, template_path: str | os.PathLike | None = None
) -> Path:
    """Write ``README.md`` and copy the run's adapter, config and result files to ``out_dir`` (atomically)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if run_dir.resolve() == out_dir.resolve():
        raise ValueError(f"--out '{out_dir}' is the run folder itself: give a separate card folder")
    card = build_card(run_dir, template_path)
    make_dir(out_dir)  # a folder under a file, or read-only: one WriteError line naming it
    for src_name, dst_name in COPIED_FILES.items():
        src = run_dir / src_name
        if src_name == CONFIG and src.is_file():  # published without this machine's paths
            atomic_write_text(
                out_dir / dst_name, json.dumps(public_config(read_record(src, "run config")), indent=2)
            )
        elif src.is_file():
            atomic_write(out_dir / dst_name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    atomic_write_text(out_dir / "README.md", str(card))
    return out_dir / "README.md"


def push_card(
    out_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False
) -> str:
    """Upload a card folder (card, adapter, run records) to the Hub; returns the commit URL."""
    from .hub import push_to_hub

    return push_to_hub(out_dir, repo_id, token=token, private=private, commit_message="petl_zoo card")


INDEX_BEGIN = "<!-- cards:begin (generated by tools/model_card.py --index; edit outside these markers) -->"
INDEX_END = "<!-- cards:end -->"


def _card_row(readme: Path, cards_root: Path, allow_short: bool) -> str | None:
    """One index row, or None for a README that is not a petl_zoo card; a short run is refused (or,
    with ``allow_short``, marked)."""
    from huggingface_hub import ModelCard

    data = ModelCard.load(readme).data
    if "petl_zoo" not in (data.tags or []):
        return None
    metrics = {e.metric_name: e.metric_value for e in (data.eval_results or [])}
    result, config = (_card_record(readme.parent / name) for name in (RESULT, CARD_CONFIG))
    rel = readme.parent.relative_to(cards_root).as_posix()
    short = short_run(config, result)
    if short and not allow_short:
        raise ValueError(
            f"card {rel} is a short run ({short}): the index lists recipe-length runs only; "
            "remove the card, or pass --allow-short to list it marked as such"
        )
    params = (result.get("trainable_params") or {}).get("method")
    return (
        f"| [{rel}]({rel}/README.md) | {result.get('method', '')} | {result.get('task', '')} | "
        f"{result.get('model', '')} | {metrics.get(METRIC_BEST, '')} | {metrics.get(METRIC_LAST, '')} | "
        f"{_count(params) if params is not None else ''} | {f'short run: {short}' if short else ''} |"
    )


def _card_record(path: Path) -> dict[str, Any]:
    """A run record copied into a card folder ({} when the card has none)."""
    return read_record(path, "card record") if path.is_file() else {}


def card_index(cards_root: str | os.PathLike, allow_short: bool = False) -> str:
    """A Markdown table of every card below ``cards_root`` (``<method>/<task>/README.md``), read back with
    ``ModelCard.load``: method, task, model, best and last accuracy, trainable method parameters, note.

    A card of a run shorter than its recipe (``short_run``) is a ValueError unless ``allow_short``, and
    is then marked in the note column."""
    cards_root = Path(cards_root)
    rows = [
        _card_row(readme, cards_root, allow_short) for readme in sorted(cards_root.glob("*/**/README.md"))
    ]
    rows = [row for row in rows if row is not None]
    if not rows:
        return "No cards are published yet.\n"
    head = (
        "| card | method | task | model | best (%) | last (%) | method params | note |\n"
        "|---|---|---|---|---:|---:|---:|---|\n"
    )
    return head + "\n".join(rows) + "\n"


def write_index(cards_root: str | os.PathLike, allow_short: bool = False) -> Path:
    """Rewrite the generated part of ``<cards_root>/README.md`` (between the markers) with ``card_index``."""
    path = Path(cards_root) / "README.md"
    text = path.read_text() if path.is_file() else "# Model cards\n\n" + INDEX_BEGIN + "\n" + INDEX_END + "\n"
    if INDEX_BEGIN not in text or INDEX_END not in text:
        raise ValueError(f"{path} lacks the index markers {INDEX_BEGIN!r} ... {INDEX_END!r}")
    before, rest = text.split(INDEX_BEGIN, 1)
    after = rest.split(INDEX_END, 1)[1]
    index = card_index(cards_root, allow_short)
    atomic_write_text(path, before + INDEX_BEGIN + "\n" + index + INDEX_END + after)
    return path


def _parser(prog: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write a Hugging Face model card (README.md + adapter files + recipe) for one finished run.",
        epilog="--push-to-hub uploads the card folder with huggingface_hub (needs network and a token, "
        "e.g. HF_TOKEN); petl_zoo.from_pretrained(REPO) loads it back.",
    )
    p.add_argument(
        "run_dir", nargs="?", help="a finished run folder (result.json, adapter files, config.json)"
    )
    p.add_argument("--out", help="card folder to write")
    p.add_argument("--template", default=None, help="Jinja card template (default: the packaged one)")
    p.add_argument(
        "--push-to-hub", default=None, metavar="REPO", help="upload the card folder to this Hub repo"
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    p.add_argument("--index", action="store_true", help="refresh the card list in <cards-root>/README.md")
    p.add_argument("--cards-root", default="model_cards", help="folder whose README.md lists the cards")
    p.add_argument(
        "--allow-short", action="store_true", help="with --index: list runs shorter than their recipe, marked"
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``petl-zoo card`` / ``tools/model_card.py``: returns the exit status."""
    p = _parser(prog)
    args = p.parse_args(argv)
    if args.run_dir is None and not args.index:
        p.error("give a run folder and --out, or --index")
    if args.run_dir is not None and not args.out:
        p.error("--out is required with a run folder (e.g. --out model_cards/neat/dtd)")
    if args.push_to_hub and args.run_dir is None:
        p.error("--push-to-hub needs a run folder and --out")
    try:
        if args.run_dir is not None:
            print(f"wrote {write_card(args.run_dir, args.out, args.template)}")
        if args.index:
            print(f"updated {write_index(args.cards_root, args.allow_short)}")
        if args.push_to_hub:
            print(f"pushed: {push_card(args.out, args.push_to_hub, private=args.private)}")
    except (
        ValueError,
        OSError,
    ) as e:  # a bad run folder, a card folder that cannot be written, a refused push
        if os.environ.get("PETL_ZOO_DEBUG"):
            raise
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 2  # the tool's status for a run or card folder it cannot use
    return 0


if __name__ == "__main__":
    sys.exit(main())
