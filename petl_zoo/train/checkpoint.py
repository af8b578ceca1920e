"""The run folder: refusing to clobber another run; ``last.pt`` on disk; RNG states as tensors.

What ``last.pt`` holds is ``TrainState.state_dict()`` (petl_zoo/train/state.py); this module writes
that dict atomically (rank 0, after every epoch) and reads it back with ``torch.load(weights_only=True)``
only: tensors and plain python values (dict, list, tuple, str, int, float, bool, None), never code, so
a tampered file cannot run anything. A file that needs more, or is truncated or corrupt, is refused with
one line naming it. The RNG states of python and numpy are stored as int64 tensors for that reason.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_torch_save, read_json
from .args import UserError

__all__ = [
    "CHECKPOINT",
    "RUN_FILES",
    "check_out_path",
    "prepare_out_dir",
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "load_checkpoint",
    "unpickling_failure",
]

CHECKPOINT = "last.pt"
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "result.json",
    "adapter.safetensors",
    "adapter_config.json",
    CHECKPOINT,
)
CHECKPOINT_VERSION = 2  # 2: weights_only-loadable (RNG states as tensors); 1 held numpy objects


def check_out_path(out: Path) -> None:
    """``out`` can be a run folder: not a file, and no parent of it is a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot create output folder {out}: {parent} is a file, not a folder")
            return


def prepare_out_dir(
    out: Path, resume: bool, overwrite: bool, is_main: bool, config: dict[str, Any] | None = None
) -> bool:
    """Check (and with ``overwrite`` clear) the run folder; True when a checkpoint will be resumed.

    A folder holding ``config.json`` or ``result.json`` is another run: refused unless ``--resume``
    (which continues from its ``last.pt``; a run killed before its first checkpoint starts again, a
    finished one is refused) or ``--overwrite`` (which deletes the run files listed in ``RUN_FILES``
    and leftover temporary files, nothing else). With ``config`` (the new run's config.json), the
    refusal names the settings that differ from the run in the folder.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: give one")
    check_out_path(out)
    has_run = any((out / name).is_file() for name in ("config.json", "result.json"))
    has_ckpt = (out / CHECKPOINT).is_file()
    if resume:
        if (out / "result.json").is_file():
            raise UserError(
                f"--resume: the run in {out} already finished (result.json){_compared(out, config)}; "
                "use --overwrite to redo it"
            )
        if has_ckpt:
            return True
        # A run killed before its first checkpoint has nothing to continue: it starts again.
        if is_main and has_run:
            _clear(out)
        return False
    if has_run or has_ckpt:
        if not overwrite:
            raise UserError(_occupied(out, config))
        if is_main:
            _clear(out)
    return False


def _compared(out: Path, config: dict[str, Any] | None) -> str:
    """`` with other settings (a: 1 -> 2)`` / `` with these settings`` / `` (config.json ...: why)`` /
    ``""`` (nothing to compare): how the run in ``out`` compares with the new ``config``."""
    if config is None or not (out / "config.json").is_file():
        return ""
    from .spec import format_differences, run_differences

    try:
        saved = read_json(out / "config.json", "run config")
    except ValueError as err:
        return f" ({err})"
    if not isinstance(saved, dict):
        return f" ({out / 'config.json'} does not hold a dict)"
    diff = run_differences(saved, config)
    return f" with other settings ({format_differences(diff)})" if diff else " with these settings"


def _occupied(out: Path, config: dict[str, Any] | None) -> str:
    """Why a folder holding a run is refused without --resume or --overwrite, and what to do."""
    compared = _compared(out, config)
    if (out / "result.json").is_file():
        return (
            f"output folder {out} holds a finished run (result.json){compared}; pass --overwrite to "
            "replace it, or another --out"
        )
    if compared.startswith(" with other"):
        return (
            f"output folder {out} already holds an unfinished run{compared}; --resume would refuse them: "
            "pass --overwrite to replace it, or another --out"
        )
    return (
        f"output folder {out} already holds a run{compared}; pass --resume to continue it, --overwrite "
        "to replace it, or another --out"
    )


def _clear(out: Path) -> None:
    """Delete the run files (and leftover temporary files of atomic writes), nothing else."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for tmp in out.glob(".*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()


def capture_rng() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) RNG states as tensors and plain values (``weights_only``-safe)."""
    version, mt_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the RNGs to a ``capture_rng()`` state (CUDA only when the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain values) atomically, tagged with the checkpoint version."""
    atomic_torch_save(path, {"version": CHECKPOINT_VERSION, **state})


def unpickling_failure(err: BaseException) -> tuple[str | None, str]:
    """Why ``torch.load(weights_only=True)`` failed: ``(" (module.name)", reason)`` when the file holds
    code or objects it refuses (a GLOBAL), ``(None, reason)`` when it is damaged (truncated, not a torch
    file). ``reason`` is short and never torch's advice to retry with ``weights_only=False``. timm's
    loader re-raises torch's UnpicklingError as a RuntimeError: the original is read."""
    if isinstance(err.__cause__, pickle.UnpicklingError):
        err = err.__cause__
    text = str(err)
    found = re.search(r"GLOBAL (\S+)", text)
    if isinstance(err, pickle.UnpicklingError) and (found or "Unsupported global" in text):
        return (f" ({found.group(1)})" if found else ""), "objects other than tensors"
    detail = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", text, flags=re.S)
    reason = detail.group(1) if detail else text.split(". ")[0]
    return None, " ".join(reason.split())[:160] or "empty file"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a ``save_checkpoint`` file with ``weights_only=True``; anything else is a one-line UserError."""
    again = "delete it, or start the run again with --overwrite"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. torch's note on a foreign pickle protocol
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated/corrupt file fails in many ways (zip, EOF, keys)
        code, reason = unpickling_failure(err)
        if code is not None:
            raise UserError(
                f"refusing checkpoint {path}: it holds objects other than tensors and plain values{code}, "
                f"which torch.load(weights_only=True) does not run; {again}"
            ) from None
        raise UserError(
            f"cannot read checkpoint {path}: truncated or corrupt ({type(err).__name__}: {reason}); {again}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        found = ckpt.get("version") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(
            f"{path} is not a checkpoint of this version of the trainer (version {found}, "
            f"expected {CHECKPOINT_VERSION}); {again}"
        )
    return ckpt
