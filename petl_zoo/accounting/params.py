"""Parameter counts and stored bytes of a patched model (or of a foreign one, e.g. peft's)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..api import adapter_state_dict, classifier_parameters, method_of, save_adapter
from ..api import trainable_parameters as _trainable_parameters
from ..runfolder import ADAPTER_WEIGHTS

__all__ = ["stored_bytes", "param_counts"]


def stored_bytes(model: nn.Module) -> tuple[int, int]:
    """``(with_head, without_head)``: bytes of ``adapter.safetensors`` as ``save_adapter`` writes it,
    and of the same file without the classifier head's tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        if method_of(model) is not None:
            save_adapter(model, tmp)
            with_head = os.path.getsize(Path(tmp) / ADAPTER_WEIGHTS)
            state = adapter_state_dict(model)
        else:  # a foreign model (peft): its trainable tensors
            state = {n: p for n, p in model.named_parameters() if p.requires_grad}
            path = Path(tmp) / "all.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
            with_head = os.path.getsize(path)
        head_ids = {id(p) for p in classifier_parameters(model)}
        rest = {k: v.detach().contiguous().cpu() for k, v in state.items() if id(v) not in head_ids}
        method = method_of(model)
        if method is not None:
            rest = method.stored_tensors(model, rest)  # the form save_adapter writes
        path = Path(tmp) / "nohead.safetensors"
        save_file(rest, str(path))
        without_head = os.path.getsize(path)
    return with_head, without_head


def param_counts(model: nn.Module) -> dict[str, int]:
    """``{'method', 'head', 'total'}`` trainable parameters; a foreign model counts its trainable tensors."""
    if method_of(model) is not None:
        c = _trainable_parameters(model)
        return {"method": int(c["method"]), "head": int(c["head"]), "total": int(c["total"])}
    head_ids = {id(p) for p in classifier_parameters(model)}
    params = dict(model.named_parameters())
    method = sum(p.numel() for p in params.values() if p.requires_grad and id(p) not in head_ids)
    head = sum(p.numel() for p in params.values() if id(p) in head_ids)
    return {"method": method, "head": head, "total": method + head}
