"""The trainer's two kinds of errors, and what a refused ``torch.load(weights_only=True)`` means.

Both errors are reported by the command lines as one ``error: ...`` line, no traceback. The module
imports nothing of the trainer, so that any part of it (arguments, recipes, the backbone builder, the
checkpoint) can raise them without importing another.
"""

from __future__ import annotations

import pickle
import re

__all__ = ["UserError", "TrainingError", "unpickling_failure"]


class UserError(ValueError):
    """A mistake in the command line or the inputs: reported as one ``error: ...`` line, no traceback."""


class TrainingError(RuntimeError):
    """Training could not go on (a NaN loss): reported as one ``error: ...`` line, exit status 1."""


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
