"""Hugging Face model cards for finished runs: ``README.md`` (YAML metadata + body), adapter files, recipe.

The card is built with ``huggingface_hub.ModelCard.from_template`` from ``ModelCardData`` and our Jinja
template (``model_cards/TEMPLATE.md``). Metadata: ``library_name: timm`` (the library the Hub knows for
these backbones; ``petl_zoo`` is a tag), tags [petl, petl_zoo, <method>, timm, vtab-1k,
image-classification] (vtab-1k only for the 19 tasks), ``base_model`` (the timm Hub id from timm's
pretrained_cfg, or the model name when the run used a local ``--pretrained-file`` or ``--no-pretrained``),
``datasets``, ``metrics: [accuracy]`` and a ``model-index``
with one result holding two accuracy metrics in percent: best epoch first (the papers' convention),
then last epoch.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from .io import atomic_write, atomic_write_text

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
]

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "TEMPLATE.md"
METRIC_BEST = "top-1 accuracy (best epoch)"
METRIC_LAST = "top-1 accuracy (last epoch)"
COPIED_FILES = {
    "adapter.safetensors": "adapter.safetensors",
    "adapter_config.json": "adapter_config.json",
    "config.json": "train_config.json",  # not config.json: the Hub reads that name as a timm model config
    "result.json": "result.json",
    "metrics.jsonl": "metrics.jsonl",
}
REQUIRED = ("result.json", "adapter.safetensors", "adapter_config.json")


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{'result': ..., 'config': ... or {}, 'dir': Path}`` of a finished run; ValueError if it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder '{run_dir}' does not exist")
    missing = [f for f in REQUIRED if not (run_dir / f).is_file()]
    if missing:
        hint = (
            " (killed run: resume it with tools/train.py --resume)" if (run_dir / "last.pt").is_file() else ""
        )
        raise ValueError(f"run folder '{run_dir}' lacks {missing}: not a finished tools/train.py run{hint}")
    result = json.loads((run_dir / "result.json").read_text())
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return {"result": result, "config": config, "dir": run_dir}


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


def _reproduce_command(config: dict[str, Any], result: dict[str, Any]) -> str:
    argv = config.get("argv")
    if isinstance(argv, str):
        argv = shlex.split(argv)
    if argv:
        argv = [str(a) for a in argv]
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
    return shlex.join(parts) + "  # argv not recorded in config.json: recipe below"


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


def build_card(run_dir: str | os.PathLike, template_path: str | os.PathLike | None = None):
    """The ``huggingface_hub.ModelCard`` of a finished run folder."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .registry import list_methods
    from .table import canonical_task, vtab_catalog

    run = read_run(run_dir)
    result, config = run["result"], run["config"]
    method = str(result.get("method") or config.get("method"))
    model = str(result.get("model") or config.get("model"))
    raw_task = str(result.get("task") or config.get("task"))
    task = canonical_task(raw_task)
    catalog = {e.name: e for e in vtab_catalog()}
    entry = catalog.get(task)
    pretrained_file = config.get("pretrained_file")
    pretrained = bool(config.get("pretrained", True))
    base = base_model_id(model, pretrained_file, pretrained)
    dataset = f"vtab-1k/{task}" if entry else raw_task
    acc_best, acc_last = _pct(result.get("test_acc_best")), _pct(result.get("test_acc_last"))
    if acc_best is None or acc_last is None:
        raise ValueError(f"{run['dir'] / 'result.json'} lacks test_acc_best/test_acc_last")
    header = entry.header if entry else raw_task
    dataset_name = f"VTAB-1K {header}" if entry else raw_task
    evals = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset,
            dataset_name=dataset_name,
            metric_type="accuracy",
            metric_value=value,
            metric_name=name,
        )
        for name, value in ((METRIC_BEST, acc_best), (METRIC_LAST, acc_last))
    ]
    tags = ["petl", "petl_zoo", method, "timm"] + (["vtab-1k"] if entry else []) + ["image-classification"]
    card_data = ModelCardData(
        library_name="timm",
        tags=list(dict.fromkeys(tags)),
        base_model=base,
        datasets=[dataset],
        metrics=["accuracy"],
        pipeline_tag="image-classification",
        license=None,
        model_name=f"{model}-{method}-{task}",
        eval_results=evals,
    )
    params = result.get("trainable_params") or {}
    recipe = config.get("recipe") or {}
    sources = config.get("recipe_sources") or {}
    model_kwargs = config.get("model_kwargs") or {}
    kwargs_py = "".join(f", {k}={v!r}" for k, v in model_kwargs.items())
    if pretrained_file:
        kwargs_py += f", pretrained_cfg_overlay=dict(file={str(pretrained_file)!r})"
        base_weights = f"the local file `{pretrained_file}` (not on the Hub)"
    elif not pretrained:
        base_weights = "none: the backbone was randomly initialised (`--no-pretrained`)"
    else:
        base_weights = f"timm's default pretrained weights, `{base}`"
    method_cfg = result.get("method_config") or config.get("method_options") or {}
    sel = result.get("test_acc_selected")
    template = Path(template_path) if template_path else DEFAULT_TEMPLATE
    if not template.is_file():
        raise ValueError(
            f"card template '{template}' does not exist: pass template_path=model_cards/TEMPLATE.md"
        )
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        method=method,
        method_description=list_methods().get(method, "method not registered in this install"),
        model=model,
        task=task,
        task_header=header,
        task_kind=f"VTAB-1K {entry.group}" if entry else "custom",
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
        method_config_json=json.dumps(method_cfg, indent=2, sort_keys=True),
        reproduce_command=_reproduce_command(config, result),
        recipe=sorted((str(k), json.dumps(v), str(sources.get(k, ""))) for k, v in recipe.items()),
        pretrained=pretrained or bool(pretrained_file),
        base_weights=base_weights,
        model_kwargs_py=kwargs_py,
        mergeable=_mergeable(run["dir"], model, model_kwargs),
        has_metrics=(run["dir"] / "metrics.jsonl").is_file(),
    )


def _mergeable(run_dir: Path, model: str, model_kwargs: dict[str, Any]) -> bool:
    """Whether the run's adapter merges, as ``save_adapter`` recorded it in ``adapter_config.json``.

    Folders written before that was recorded: rebuild the saved structure on a meta-device ``model``
    (shapes only, no memory) and ask ``is_mergeable``; False (no merge line) when that is impossible.
    """
    import logging

    import timm
    import torch

    from .api import create, is_mergeable, method_of, read_adapter_config

    adapter = read_adapter_config(run_dir)
    if "mergeable" in adapter:
        return bool(adapter["mergeable"])
    try:
        with torch.device("meta"):
            net = timm.create_model(model, pretrained=False, **model_kwargs)
            create(adapter["method"], net, **adapter.get("config", {}))
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
    out_dir.mkdir(parents=True, exist_ok=True)
    for src_name, dst_name in COPIED_FILES.items():
        src = run_dir / src_name
        if src.is_file():
            atomic_write(out_dir / dst_name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    atomic_write_text(out_dir / "README.md", str(card))
    return out_dir / "README.md"


def push_card(
    out_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False
) -> str:
    """Upload a card folder to the Hub (needs network and a token); returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    info = upload_folder(
        repo_id=repo_id,
        folder_path=str(out_dir),
        token=token,
        repo_type="model",
        commit_message="petl_zoo card",
    )
    return str(getattr(info, "commit_url", info))


INDEX_BEGIN = "<!-- cards:begin (generated by tools/model_card.py --index; edit outside these markers) -->"
INDEX_END = "<!-- cards:end -->"


def card_index(cards_root: str | os.PathLike) -> str:
    """A Markdown table of every card below ``cards_root`` (``<method>/<task>/README.md``), read back with
    ``ModelCard.load``: method, task, model, best and last accuracy, trainable method parameters."""
    from huggingface_hub import ModelCard

    cards_root = Path(cards_root)
    rows = []
    for readme in sorted(cards_root.glob("*/**/README.md")):
        card = ModelCard.load(readme)
        data = card.data
        if "petl_zoo" not in (data.tags or []):
            continue
        metrics = {e.metric_name: e.metric_value for e in (data.eval_results or [])}
        result_path = readme.parent / "result.json"
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        params = (result.get("trainable_params") or {}).get("method")
        rel = readme.parent.relative_to(cards_root).as_posix()
        rows.append(
            f"| [{rel}]({rel}/README.md) | {result.get('method', '')} | {result.get('task', '')} | "
            f"{result.get('model', '')} | {metrics.get(METRIC_BEST, '')} | {metrics.get(METRIC_LAST, '')} | "
            f"{_count(params) if params is not None else ''} |"
        )
    if not rows:
        return "No cards are published yet.\n"
    head = "| card | method | task | model | best (%) | last (%) | method params |\n|---|---|---|---|---:|---:|---:|\n"
    return head + "\n".join(rows) + "\n"


def write_index(cards_root: str | os.PathLike) -> Path:
    """Rewrite the generated part of ``<cards_root>/README.md`` (between the markers) with ``card_index``."""
    path = Path(cards_root) / "README.md"
    text = path.read_text() if path.is_file() else "# Model cards\n\n" + INDEX_BEGIN + "\n" + INDEX_END + "\n"
    if INDEX_BEGIN not in text or INDEX_END not in text:
        raise ValueError(f"{path} lacks the index markers {INDEX_BEGIN!r} ... {INDEX_END!r}")
    before, rest = text.split(INDEX_BEGIN, 1)
    after = rest.split(INDEX_END, 1)[1]
    atomic_write_text(path, before + INDEX_BEGIN + "\n" + card_index(cards_root) + INDEX_END + after)
    return path
