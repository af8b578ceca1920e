"""Many task adapters on one frozen backbone, with mixed-adapter batches (docs/multi_adapter.md).

:func:`load_adapters` builds a :class:`MultiAdapterModel`; :mod:`.shared` makes the per-adapter models
that share the backbone, :mod:`.factors` decides which adapters route per sample, :mod:`.routed` runs
them in one forward, :mod:`.bench` measures the throughput.
"""

from __future__ import annotations

from .factors import ROUTABLE_DELTAS
from .model import PAD_LOGIT, MultiAdapterModel, load_adapters

__all__ = ["MultiAdapterModel", "load_adapters", "PAD_LOGIT", "ROUTABLE_DELTAS"]
