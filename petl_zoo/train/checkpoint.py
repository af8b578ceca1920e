"""Starting in a run folder (refusing to clobber another run); ``last.pt`` on disk; RNG states as tensors.

What ``last.pt`` holds is ``TrainState.state_dict()`` (petl_zoo/train/state.py); this module writes
that dict atomically (rank 0, after every epoch) and reads it back with ``torch.load(weights_only=True)``
only: tensors and plain python values (dict, list, tuple, str, int, float, bool, None), never code, so
a tampered file cannot run anything. A file that needs more, or is truncated or corrupt, is refused with
one line naming it. The RNG states of python and numpy are stored as int64 tensors for that reason.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_torch_save
from ..runfolder import RunFolder
from .errors import UserError, unpickling_failure

__all__ = [
    "check_out_path",
    "prepare_out_dir",
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "load_checkpoint",
]

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

    A folder holding a run (its config or result) is another run: refused unless ``--resume`` (which
    continues from its checkpoint; a run killed before its first checkpoint starts again, a finished
    one is refused) or ``--overwrite`` (which deletes the run files, ``RunFolder.clear``, nothing
    else). With ``config`` (the new run's config), the refusal names the settings that differ from the
    run in the folder.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: give one")
    check_out_path(out)
    folder = RunFolder(out)
    if resume:
        if folder.finished:
            raise UserError(
                f"--resume: the run in {out} already finished ({folder.result_path.name})"
                f"{_compared(folder, config)}; use --overwrite to redo it"
            )
        if folder.has_checkpoint:
            return True
        # A run killed before its first checkpoint has nothing to continue: it starts again.
        if is_main and folder.holds_run:
            folder.clear()
        return False
    if folder.holds_run or folder.has_checkpoint:
        if not overwrite:
            raise UserError(_occupied(folder, config))
        if is_main:
            folder.clear()
    return False


def _compared(folder: RunFolder, config: dict[str, Any] | None) -> str:
    """`` with other settings (a: 1 -> 2)`` / `` with these settings`` / `` (its config ...: why)`` /
    ``""`` (nothing to compare): how the run in ``folder`` compares with the new ``config``."""
    if config is None or not folder.has_config:
        return ""
    from .spec import format_differences, run_differences

    try:
        saved = folder.read_config()
    except ValueError as err:
        return f" ({err})"
    diff = run_differences(saved, config)
    return f" with other settings ({format_differences(diff)})" if diff else " with these settings"


def _occupied(folder: RunFolder, config: dict[str, Any] | None) -> str:
    """Why a folder holding a run is refused without --resume or --overwrite, and what to do."""
    out, compared = folder.path, _compared(folder, config)
    if folder.finished:
        return (
            f"output folder {out} holds a finished run ({folder.result_path.name}){compared}; pass "
            "--overwrite to replace it, or another --out"
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
