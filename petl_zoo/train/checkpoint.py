"""The run folder: refusing to clobber another run, ``last.pt`` checkpoints and RNG states.

``last.pt`` (written atomically after every epoch, by rank 0) holds the method's tensors and the head
(``adapter_state_dict``), the method's structural state (``get_state()``), the names of the trainable
parameters, the optimizer (AdamW) and grad-scaler states, the scheduler's settings, the RNG states of
python/numpy/torch (and CUDA), the number of finished epochs, the best-so-far values, the checkpoint
selected on val, and the metrics so far. It is deleted when the run ends (``--keep-checkpoint`` keeps it).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_torch_save

__all__ = [
    "CHECKPOINT",
    "RUN_FILES",
    "prepare_out_dir",
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "load_checkpoint",
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
CHECKPOINT_VERSION = 1


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, is_main: bool) -> bool:
    """Check (and with ``overwrite`` clear) the run folder; True when a checkpoint will be resumed.

    A folder holding ``config.json`` or ``result.json`` is another run: refused unless ``--resume``
    (which continues from its ``last.pt``; a run killed before its first checkpoint starts again, a
    finished one is refused) or ``--overwrite`` (which deletes the run files listed in ``RUN_FILES``
    and leftover temporary files, nothing else).
    """
    from .args import UserError

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: give one")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    has_run = any((out / name).is_file() for name in ("config.json", "result.json"))
    has_ckpt = (out / CHECKPOINT).is_file()
    if resume:
        if (out / "result.json").is_file():
            raise UserError(f"--resume: the run in {out} already finished (result.json); use --overwrite to redo it")
        if has_ckpt:
            return True
        # A run killed before its first checkpoint has nothing to continue: it starts again.
        if is_main and has_run:
            _clear(out)
        return False
    if has_run or has_ckpt:
        if not overwrite:
            raise UserError(
                f"output folder {out} already holds a run; pass --resume to continue it, --overwrite to "
                "replace it, or another --out"
            )
        if is_main:
            _clear(out)
    return False


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
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_torch_save(path, {"version": CHECKPOINT_VERSION, **state})


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Our own file (holds numpy RNG state), so not ``weights_only``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a checkpoint written by this version of tools/train.py")
    return ckpt
