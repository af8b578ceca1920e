"""The pretrained timm backbone: from the hub cache, or from a local file through timm's own loaders."""

from __future__ import annotations

import difflib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
from torch import nn

from .args import DEFAULT_COMPILE_BACKEND
from .errors import UserError

__all__ = [
    "build_backbone",
    "compile_forward",
    "enable_grad_checkpointing",
    "resolve_model_name",
    "check_weights_file",
    "hub_offline_reason",
    "WeightsUnavailableError",
    "WEIGHT_SUFFIXES",
]

WEIGHT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin")
_HUB_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_GIVE_WEIGHTS = (
    "give a local file with --pretrained-file PATH (.npz Google ViT, .safetensors, .pth/.bin) or train "
    "from a random initialisation with --no-pretrained"
)


class WeightsUnavailableError(RuntimeError):
    """No pretrained weights could be reached (offline, no cache) and no local file was given."""


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _capture_timm_log() -> Iterator[_Capture]:
    """Collect timm's loader messages (it reports missing/unexpected keys only as log lines)."""
    logger = logging.getLogger("timm.models._builder")
    handler, level, propagate = _Capture(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _keys_in(messages: list[str], kind: str) -> list[str]:
    keys: list[str] = []
    for message in messages:
        match = re.match(rf"{kind} keys \((.*?)\) (discovered|found)", message, flags=re.S)
        if match:
            keys += [k.strip() for k in match.group(1).split(",") if k.strip()]
    return keys


def _check_model_name(model_name: str) -> None:
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown timm model {model_name!r}{hint}; see timm.list_models()")


def resolve_model_name(model_name: str) -> tuple[str, str | None]:
    """``(name.tag, note)``: the architecture and pretrained tag timm will really use for ``model_name``,
    and a one-line note when timm remaps a deprecated name (``vit_base_patch16_224_in21k`` now means the
    AugReg weights ``vit_base_patch16_224.augreg_in21k``, not the ``orig_in21k`` ones the VTAB-1K papers
    used), else None. An unknown name is returned as given (``build_backbone`` reports it)."""
    from timm.models import get_pretrained_cfg
    from timm.models._registry import get_deprecated_models, split_model_name_tag

    new = get_deprecated_models().get(model_name)
    target = new or model_name
    arch, tag = split_model_name_tag(target)
    if not tag:
        cfg = get_pretrained_cfg(arch, allow_unregistered=True) if timm.is_model(arch) else None
        tag = getattr(cfg, "tag", None) or ""
    resolved = f"{arch}.{tag}" if tag else arch
    if new is None:
        return resolved, None
    note = f"timm maps the deprecated model name {model_name} to {resolved}"
    if model_name.endswith("_in21k") and tag != "orig_in21k":
        note += f" (not the original ImageNet-21k weights of the VTAB-1K papers: {arch}.orig_in21k)"
    return resolved, note


def build_backbone(
    model_name: str,
    num_classes: int | None,
    pretrained_file: str | os.PathLike | None = None,
    pretrained: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """``timm.create_model(model_name, num_classes=..., drop_path_rate=..., **model_kwargs)`` with weights.

    ``pretrained_file`` is loaded by timm (``pretrained_cfg_overlay=dict(file=...)``): ``.safetensors``
    and ``.pth``/``.pt``/``.bin`` state dicts through timm's ``load_state_dict`` (a plain state dict or
    one under ``state_dict``/``model``; a head of another class count is dropped), ``.npz`` Google ViT
    checkpoints (``ViT-B_16.npz``) through the model's ``load_pretrained`` (timm's ``_load_weights``,
    selected by the overlay's ``custom_load=True``). A file whose keys do not fit the model is a
    ValueError listing them; a damaged file, or one holding code, is a one-line ValueError. Without a
    file, ``pretrained=True`` uses timm's hub/cache and raises WeightsUnavailableError when that fails
    (at once when offline: ``HF_HUB_OFFLINE``, or the endpoint unreachable); ``pretrained=False`` is a random initialisation (seed
    torch first for the same weights on every call). ``num_classes=None`` keeps the model's default
    head. The one backbone builder of petl_zoo (the trainer, tools/eval.py, the accounting tools).
    """
    _check_model_name(model_name)
    kwargs = dict(model_kwargs or {})
    for reserved in ("num_classes", "pretrained", "drop_path_rate", "pretrained_cfg_overlay"):
        if reserved in kwargs:
            raise ValueError(f"model option {reserved!r} is set by the trainer, not by --model-kwargs")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_file is not None:
        return _from_file(model_name, kwargs, Path(pretrained_file).expanduser())
    if not pretrained:
        return _create(model_name, kwargs, pretrained=False)
    return _from_hub(model_name, kwargs)


def enable_grad_checkpointing(model: nn.Module, model_name: str) -> None:
    """timm's gradient checkpointing (``model.set_grad_checkpointing(True)``): each block's activations
    are recomputed in backward by ``torch.utils.checkpoint`` in its non-reentrant form (timm's default),
    which calls the block again with its original input, so the methods' wrappers and hooks run once more
    and the gradients are the ones without it. A UserError when timm is set to the reentrant form
    (``TIMM_REENTRANT_CKPT``: it detaches the blocks' inputs, so nothing before a frozen block gets a
    gradient) or the model has no gradient checkpointing."""
    from timm.layers import use_reentrant_ckpt

    if use_reentrant_ckpt():
        raise UserError(
            "--grad-checkpointing needs timm's non-reentrant checkpoint, but TIMM_REENTRANT_CKPT is set "
            "(the reentrant form gives the tensors behind frozen blocks no gradient); unset it"
        )
    setter = getattr(model, "set_grad_checkpointing", None)
    try:
        if setter is None:
            raise NotImplementedError
        setter(True)
    except (AssertionError, NotImplementedError):
        raise UserError(f"--grad-checkpointing: timm's {model_name} has no gradient checkpointing") from None


#: dynamo's switch for side effects inside a checkpointed region (torch >= 2.6): see :func:`compile_forward`.
_CHECKPOINT_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def compile_forward(
    module: nn.Module,
    backend: str | Callable[..., Any] = DEFAULT_COMPILE_BACKEND,
    grad_checkpointing: bool = False,
) -> Callable[..., Any]:
    """``torch.compile(module, backend=backend)`` (a backend name or a dynamo backend callable),
    callable as the module.

    With gradient checkpointing the calls trace with dynamo's ``skip_fwd_side_effects_in_bwd_under_checkpoint``:
    the wrappers that hand a tensor from one module of a block to a later one (the adapters' residual
    tap, Convpass's, DTL's side sum) set an attribute inside the checkpointed block, a side effect dynamo
    otherwise answers with a graph break at every block. The traced graph carries the tensor itself, so
    the recomputation needs no replay of the attribute; the gradients equal eager's without
    checkpointing (``tests/test_compile.py``)."""
    import torch

    compiled = torch.compile(module, backend=backend)
    if not grad_checkpointing or not hasattr(torch._dynamo.config, _CHECKPOINT_SIDE_EFFECTS):
        return compiled

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(**{_CHECKPOINT_SIDE_EFFECTS: True}):
            return compiled(*args, **kwargs)

    return forward


def hub_reachable(timeout: float = _HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout`` seconds (name
    lookup included; behind a proxy it is not tried, and assumed to work)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, name="petl_zoo-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)  # a hanging name lookup is abandoned with the daemon thread
    return bool(outcome and outcome[0])


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used now (``HF_HUB_OFFLINE`` set, or the endpoint unreachable within
    a few seconds), None when it can: weights then come from the local cache only, at once."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline (HF_HUB_OFFLINE=1)"
    if not hub_reachable():
        host = constants.ENDPOINT.split("://")[-1].rstrip("/")
        return f"offline ({host} unreachable within {_HUB_TIMEOUT_S:.0f} s)"
    return None


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub in offline mode while inside (cached files only, no network wait)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _from_hub(model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The model with timm's pretrained weights (the hub cache, or a download when online); offline
    without them in the cache: WeightsUnavailableError at once, saying how to give weights."""
    offline = hub_offline_reason()
    try:
        with _hub_offline(offline is not None):
            return _create(model_name, kwargs, pretrained=True)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - hub/network/cache errors come in many types
        where = (
            f"{offline} and not in the local cache"
            if offline
            else f"{type(err).__name__}: " + (str(err).splitlines()[0][:200] if str(err) else "")
        )
        raise WeightsUnavailableError(
            f"no pretrained weights for {model_name} could be loaded ({where}); {_GIVE_WEIGHTS}"
        ) from None


def _weights_cached(model_name: str) -> bool:
    """Whether timm's pretrained weights of ``model_name`` are in the local Hub or torch cache (True
    for a name timm does not know: the builder reports that itself)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except Exception:  # noqa: BLE001 - an unknown or malformed name: not this check's to report
        return True
    if cfg is None:
        return True
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin")
        return any(n and isinstance(try_to_load_from_cache(hub_id, n), str) for n in names)
    url = getattr(cfg, "url", None)
    if url:
        import torch

        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name).is_file()
    return False


def weights_unavailable(model_name: str) -> str | None:
    """Why timm's pretrained weights of ``model_name`` cannot be had now (not in the local cache and
    the Hub offline), with how to give weights instead; None when they can (checked before anything
    runs, so that a first command lists every missing input at once)."""
    if _weights_cached(model_name):
        return None
    offline = hub_offline_reason()
    if offline is None:
        return None
    return f"no pretrained weights for {model_name}: {offline} and not in the local cache; {_GIVE_WEIGHTS}"


def check_weights_file(path: str | os.PathLike) -> Path:
    """``path`` as a weights file that exists and has a known suffix, else one FileNotFoundError or
    ValueError line (a folder is called a folder, and its weight files are named)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES)[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise ValueError(f"pretrained file {path} is a folder{hint}; give the weights file itself")
    if not path.is_file():
        raise FileNotFoundError(f"pretrained file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"pretrained file {path} has suffix {suffix!r}; valid: {', '.join(WEIGHT_SUFFIXES)}")
    return path


class _OptionsError(ValueError):
    """The model does not accept a ``--model-kwargs`` option."""


def _create(model_name: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    try:
        return timm.create_model(model_name, **kwargs, **extra)
    except TypeError as err:
        raise _OptionsError(
            f"model {model_name!r} does not accept these options {sorted(kwargs)}: {err}"
        ) from None


def _load_failure(
    path: Path, suffix: str, model_name: str, kwargs: dict[str, Any], err: Exception
) -> ValueError:
    """One line for a weights file timm could not load: damaged (truncated, not the format its suffix
    says), holding code (a pickle that ``torch.load(weights_only=True)`` refuses: never to be run), or
    of another layout."""
    import pickle
    import zipfile

    from safetensors import SafetensorError

    from .errors import unpickling_failure

    code, unpickled = unpickling_failure(err)
    if code is not None:
        return ValueError(
            f"refusing pretrained file {path}: it holds objects other than tensors and plain values{code}, "
            "which are never run; save a plain state dict (torch.save(model.state_dict(), ...)) or a "
            ".safetensors file"
        )
    if isinstance(err.__cause__, pickle.UnpicklingError):
        err = err.__cause__  # timm's RuntimeError around torch's
    reason = unpickled if isinstance(err, pickle.UnpicklingError) else " ".join(str(err).split())
    damaged = (SafetensorError, zipfile.BadZipFile, EOFError, pickle.UnpicklingError)
    if isinstance(err, damaged) or "zip archive" in reason:
        return ValueError(
            f"cannot read pretrained file {path}: truncated or not a {suffix} file "
            f"({type(err).__name__}: {reason[:160]}); download it again"
        )
    kind = "Google ViT .npz" if suffix == ".npz" else "state dict"
    return ValueError(
        f"cannot load pretrained file {path} ({kind}) into {model_name} {kwargs}: "
        f"{type(err).__name__}: {reason[:400]}"
    )


def _from_file(model_name: str, kwargs: dict[str, Any], path: Path) -> nn.Module:
    """The model with ``path``'s weights (timm's loaders); refuses a file that does not fit it."""
    suffix = check_weights_file(path).suffix.lower()
    overlay: dict[str, Any] = {"file": str(path.absolute()), "source": ""}
    if suffix == ".npz":
        overlay["custom_load"] = True  # timm calls the model's load_pretrained (Google's layout)
    with _capture_timm_log() as log:
        try:
            model = _create(model_name, kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
        except _OptionsError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged or foreign file fails in many ways
            raise _load_failure(path, suffix, model_name, kwargs, err) from None
    classifier = model.pretrained_cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    missing = [k for k in _keys_in(log.messages, "Missing") if k.rsplit(".", 1)[0] not in heads]
    unexpected = _keys_in(log.messages, "Unexpected")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model tensor(s) not in the file, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} file tensor(s) not in the model, e.g. {unexpected[:3]}")
        raise ValueError(
            f"pretrained file {path} does not fit {model_name} {kwargs}: "
            + "; ".join(parts)
            + " (check --model and --model-kwargs)"
        )
    return model
