"""HEAT: head-level parameter-efficient adaptation with Taylor-expansion importance scores.

Reconstruction of "HEAT: Head-level Parameter Efficient Adaptation of Vision Transformers with
Taylor-expansion Importance Scores" (abstract only; no code or full text was available to us).

**From the paper (abstract):** a first-order Taylor expansion gives each attention head a task
importance score (TIS); three strategies compute it from different perspectives; the least important
heads get no adaptation; it works on ViT and Swin on top of LoRA / AdaptFormer-style adapters.

**Ours (each choice is an option):**

- Base (``base``): LoRA (``rank`` 8, scaling 1) on the ``q`` and ``v`` slices of the fused ``qkv``, or
  an AdaptFormer bottleneck (``s * up(ReLU(down(x)))``, dim 8, ``s = 0.1``, ``up`` zero-initialised) in
  parallel with the same slices. Head ``h`` owns the output channels ``h*dh:(h+1)*dh`` of each slice,
  i.e. the rows of LoRA's ``B`` / the adapter's ``up`` (weight and bias); ``A`` / ``down`` are shared.
- TIS of head ``h`` in block ``l``, summed over the importance batches (each batch's loss ``L``):

  * ``tis='weight'``:     ``sum_{t in q,k,v} sum_{rows of h in W_t} |W * dL/dW|`` (frozen qkv weights);
  * ``tis='activation'``: ``|sum_{o in o_h} o * dL/do|`` with ``o_h`` the head's channels of the input
    of ``attn.proj`` (``= |dL/dg_h|`` for a head gate ``g_h`` at 1; Michel et al., 2019);
  * ``tis='adapter'``:    ``sum_{theta in head's rows of B (or up)} |theta * dL/dtheta|`` after
    ``warmup_steps`` AdamW steps of the adapter and head (restored afterwards unless ``warmup_keep``).

- Selection: heads are ranked globally (``scope='global'``; per stage on Swin, whose stages differ in
  head count and width) or within each block (``scope='layer'``); the ``floor(mask_ratio * n)`` lowest of
  each group of ``n`` heads are masked (ties: lower block, then lower head first).
- A masked head gets no adaptation: its rows of ``B``/``up`` are dropped (the kept rows are stored
  compactly and scattered into zeros in weight space, so the masked slice of the delta is exactly zero
  and never trained, stored or counted). A block with no kept head loses its delta (and ``A``)
  altogether. ``mask='head'`` also gates the head's output off (zeroes its channels at the input of
  ``attn.proj`` with a forward pre-hook); ``mask='adapter'`` leaves the backbone head running.
- Mergeable with the LoRA base: ``delta_W = s * scatter(B_kept) A``. Head gates stay hooks after a merge;
  ``merge(unload=True)`` folds them into ``attn.proj`` (its masked input columns become 0) and removes them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, fraction, non_negative, positive
from ..importance import TaylorAccumulator, taylor_scores
from ..layers import AdaptedLinear, Delta, HookRegistry, adapt_linear, dropped_low_rank
from ..registry import Method, TrainContext, register_method
from ..targets import check_targets, iter_blocks, linear_sites
from .adapter import BottleneckAdapter
from .lora import LoraDelta

__all__ = ["HeatConfig", "HeadLoraDelta", "HeadAdapterDelta", "HeadGate", "Heat", "select_heads"]

HEAD_TARGETS = ("q", "k", "v")
SCOPES = ("global", "layer")


@dataclass
class HeatConfig(MethodConfig):
    """HEAT options: ``rank``, ``alpha``, ``dropout`` configure the LoRA base (``dropout`` also the adapter
    base), ``dim``, ``scale`` the adapter base; ``scope`` is the head-ranking scope."""

    renamed = {
        "lora_rank": "rank",
        "lora_alpha": "alpha",
        "lora_dropout": "dropout",
        "adapter_dim": "dim",
        "adapter_scale": "scale",
    }

    base: Literal["lora", "adapter"] = "lora"
    targets: tuple[str, ...] = ("q", "v")
    rank: int = positive(8)
    alpha: float | None = None
    dropout: float = fraction(0.0)
    dim: int = positive(8)
    scale: float = 0.1
    tis: Literal["weight", "activation", "adapter"] = "activation"
    scope: Literal["global", "layer"] = "global"
    mask_ratio: float = fraction(0.5)
    mask: Literal["adapter", "head"] = "adapter"
    importance_batches: int | None = positive(None, none="the whole loader")
    warmup_steps: int | None = positive(None, none="one pass over the loader")
    warmup_lr: float = positive(1e-3)
    warmup_weight_decay: float = non_negative(1e-4)
    warmup_keep: bool = False

    @classmethod
    def from_options(cls, method: str = "", **options: Any) -> HeatConfig:
        value = options.get("rank")
        if isinstance(value, str) and value.strip() in SCOPES:
            raise ValueError(
                f"bad value {value!r} for option 'rank' for method 'heat': 'rank' is the LoRA rank (a "
                f"positive integer); the head-ranking scope is now 'scope' ({', '.join(SCOPES)})"
            )
        return super().from_options(method, **options)

    def validate(self) -> None:
        check_targets(self.targets, HEAD_TARGETS, "heat")

    @property
    def scaling(self) -> float:
        """LoRA scaling ``alpha / rank`` (1 when ``alpha`` is None)."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class _HeadRows:
    """Bookkeeping shared by the head-masked deltas: which heads (rows of the output slice) are kept.

    ``rows`` (non-persistent buffer) maps each compact row to its row in the full slice.
    """

    head_dim: int
    num_heads: int
    out_features: int
    kept: tuple[int, ...]
    rows: Tensor

    def _init_rows(self, out_features: int, head_dim: int) -> None:
        if head_dim <= 0 or out_features % head_dim:
            raise ValueError(f"slice width {out_features} is not a multiple of head_dim {head_dim}")
        self.head_dim = head_dim
        self.num_heads = out_features // head_dim
        self.out_features = out_features
        self.kept = tuple(range(self.num_heads))
        self.register_buffer("rows", torch.arange(out_features), persistent=False)

    @property
    def full(self) -> bool:
        return len(self.kept) == self.num_heads

    def head_index(self, head: int) -> slice:
        """Rows of ``head`` in the compact (kept-rows) parameters."""
        if head not in self.kept:
            raise ValueError(f"head {head} is masked; kept heads: {list(self.kept)}")
        pos = self.kept.index(head)
        return slice(pos * self.head_dim, (pos + 1) * self.head_dim)

    def _new_rows(self, heads: Iterable[int]) -> tuple[tuple[int, ...], Tensor]:
        heads = tuple(sorted(set(int(h) for h in heads)))
        bad = [h for h in heads if h not in self.kept]
        if bad:
            raise ValueError(f"cannot keep head {bad[0]}: valid heads are {list(self.kept)}")
        positions = (
            torch.cat([torch.arange(self.head_index(h).start, self.head_index(h).stop) for h in heads])
            if heads
            else torch.zeros(0, dtype=torch.long)
        )
        return heads, positions.to(self.rows.device)

    def _scatter_rows(self, compact: Tensor) -> Tensor:
        """``compact`` rows placed at their rows of the full slice, zeros elsewhere (exact zeros)."""
        if self.full:
            return compact
        full = compact.new_zeros((self.out_features, *compact.shape[1:]))
        return full.index_copy(0, self.rows, compact)


def _compact(param: nn.Parameter, positions: Tensor) -> nn.Parameter:
    return nn.Parameter(param.detach()[positions].clone(), requires_grad=param.requires_grad)


class HeadLoraDelta(_HeadRows, LoraDelta):
    """LoRA with per-head rows of ``B``: ``delta_W = s * scatter(B_kept) A`` (masked heads' rows are 0)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, scaling: float, dropout: float, head_dim: int
    ) -> None:
        LoraDelta.__init__(self, in_features, out_features, rank, scaling, dropout)
        self._init_rows(out_features, head_dim)

    def keep_heads(self, heads: Iterable[int]) -> None:
        """Drop the ``B`` rows of every head not in ``heads`` (kept rows keep their values)."""
        kept, positions = self._new_rows(heads)
        self.lora_B = _compact(self.lora_B, positions)
        self.rows = self.rows[positions]
        self.kept = kept

    def head_params(self, head: int) -> list[tuple[Tensor, slice]]:
        return [(self.lora_B, self.head_index(head))]

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return dropped_low_rank(x, self.lora_A, self._scatter_rows(self.lora_B), self.dropout) * self.scaling

    def delta_weight(self, weight: Tensor) -> Tensor:
        return (self._scatter_rows(self.lora_B) @ self.lora_A) * self.scaling


class HeadAdapterDelta(_HeadRows, Delta):
    """AdaptFormer bottleneck beside a q/k/v slice: ``s * up(act(down(x)))``, ``up`` rows kept per head."""

    def __init__(
        self, features: int, out_features: int, dim: int, scale: float, head_dim: int, dropout: float = 0.0
    ) -> None:
        Delta.__init__(self)
        if features != out_features:
            raise ValueError(
                f"the adapter base needs a slice as wide as its input ({features}), got {out_features}"
            )
        self.adapter = BottleneckAdapter(features, dim, scale, "relu", dropout)
        self._init_rows(out_features, head_dim)

    def keep_heads(self, heads: Iterable[int]) -> None:
        kept, positions = self._new_rows(heads)
        up = self.adapter.up
        new_up = nn.Linear(up.in_features, len(positions), device=up.weight.device, dtype=up.weight.dtype)
        new_up.weight = _compact(up.weight, positions)
        new_up.bias = _compact(up.bias, positions)
        self.adapter.up = new_up
        self.rows = self.rows[positions]
        self.kept = kept

    def head_params(self, head: int) -> list[tuple[Tensor, slice]]:
        index = self.head_index(head)
        return [(self.adapter.up.weight, index), (self.adapter.up.bias, index)]

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        a = self.adapter
        if self.full:
            return a(x, weight)
        hidden = a.dropout(a.act(a.down(x)))
        return F.linear(hidden, self._scatter_rows(a.up.weight), self._scatter_rows(a.up.bias)) * a.scale


class HeadGate(nn.Module):
    """Per-channel gate on the input of ``attn.proj`` (1 for kept heads, 0 for masked ones).

    Registered as ``attn.heat_gate`` (so it follows ``.to()``) and applied by a forward pre-hook on
    ``attn.proj``; the gate is a non-persistent buffer rebuilt from the method state.
    """

    def __init__(
        self, num_heads: int, head_dim: int, kept: Sequence[int], device: torch.device | None = None
    ):
        super().__init__()
        gate = torch.zeros(num_heads, head_dim, device=device)
        gate[list(kept)] = 1.0
        self.register_buffer("gate", gate.flatten(), persistent=False)

    def hook(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x * self.gate.to(x.dtype), *args[1:])


def select_heads(
    scores: Sequence[Sequence[float]], stages: Sequence[int], ratio: float, scope: str = "global"
) -> list[list[int]]:
    """Kept heads per block: in each group (a stage for ``'global'``, a block for ``'layer'``) of ``n``
    heads, the ``floor(ratio * n)`` lowest-scoring ones are masked (ties: lower block, then head, first)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown ranking scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
    if len(scores) != len(stages):
        raise ValueError(f"got scores for {len(scores)} blocks but {len(stages)} stages")
    for b, row in enumerate(scores):
        for h, s in enumerate(row):
            if not math.isfinite(s):
                raise ValueError(f"importance score of block {b} head {h} is {s}; scores must be finite")
    groups: dict[Any, list[tuple[float, int, int]]] = {}
    for b, row in enumerate(scores):
        key = stages[b] if scope == "global" else ("block", b)
        groups.setdefault(key, []).extend((float(s), b, h) for h, s in enumerate(row))
    masked: set[tuple[int, int]] = set()
    for items in groups.values():
        n_mask = math.floor(ratio * len(items) + 1e-9)
        masked.update((b, h) for _, b, h in sorted(items)[:n_mask])
    return [[h for h in range(len(row)) if (b, h) not in masked] for b, row in enumerate(scores)]


def _split_batch(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        x, y = batch.get("image", batch.get("x")), batch.get("label", batch.get("y"))
    else:
        x, y = batch[0], batch[1]
    return x.to(device), y.to(device)


def _batch_loss(model: nn.Module, batch: Any, ctx: TrainContext) -> Tensor:
    x, y = _split_batch(batch, ctx.device)
    with ctx.autocast():
        return ctx.loss_fn(model(x), y)


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


@register_method(
    "heat",
    "HEAT: head-level LoRA (or adapter) on q,v; heads ranked by a Taylor importance score, the least "
    "important half left unadapted",
)
class Heat(Method):
    """HEAT (see the module docstring for the paper's parts and ours)."""

    config_class = HeatConfig
    identity_at_init = True

    def __init__(self, config: HeatConfig) -> None:
        super().__init__(config)
        self.kept_heads: list[list[int]] | None = None
        self.scores: list[list[float]] | None = None

    # -- structure ---------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> None:
        cfg: HeatConfig = self.config
        for target in cfg.targets:
            for site in linear_sites(model, target):
                dh = site.block.head_dim
                if cfg.base == "lora":
                    delta: Delta = HeadLoraDelta(
                        site.in_features, site.out_features, cfg.rank, cfg.scaling, cfg.dropout, dh
                    )
                else:
                    delta = HeadAdapterDelta(
                        site.in_features, site.out_features, cfg.dim, cfg.scale, dh, cfg.dropout
                    )
                adapt_linear(site).add_delta(f"heat_{target}", delta, site.start, site.stop)

    def deltas(self, model: nn.Module) -> list[dict[str, HeadLoraDelta | HeadAdapterDelta]]:
        """Per block, the method's (unremoved) deltas by target."""
        out: list[dict[str, Any]] = [{} for _ in iter_blocks(model)]
        for target in self.config.targets:
            for site in linear_sites(model, target):
                layer = site.linear
                if isinstance(layer, AdaptedLinear) and f"heat_{target}" in layer.deltas:
                    out[site.block.index][target] = layer.deltas[f"heat_{target}"]
        return out

    def apply_mask(
        self,
        model: nn.Module,
        kept_heads: Sequence[Sequence[int]],
        scores: Sequence[Sequence[float]] | None = None,
    ) -> None:
        """Keep only ``kept_heads[b]`` in block ``b``: drop the other heads' adapter rows (a block with
        none kept loses its deltas) and, with ``mask='head'``, gate the masked heads' outputs off."""
        if self.kept_heads is not None:
            raise ValueError("heads are already selected on this model; masks can be applied once")
        blocks = iter_blocks(model)
        if len(kept_heads) != len(blocks):
            raise ValueError(f"kept_heads lists {len(kept_heads)} blocks, the model has {len(blocks)}")
        kept = []
        for info, heads in zip(blocks, kept_heads):
            heads = sorted({int(h) for h in heads})
            if any(not 0 <= h < info.num_heads for h in heads):
                raise ValueError(
                    f"block {info.path} has heads 0..{info.num_heads - 1}, kept_heads names {heads}"
                )
            kept.append(heads)
        per_block = self.deltas(model)
        for info, heads, deltas in zip(blocks, kept, per_block):
            for target, delta in deltas.items():
                if heads:
                    delta.keep_heads(heads)
                else:
                    site = linear_sites(model, target, blocks=[info.index])[0]
                    site.linear.remove_delta(f"heat_{target}")
            if self.config.mask == "head" and len(heads) < info.num_heads:
                attn = info.module.attn
                while getattr(attn, "_petl_wrapper", False):
                    attn = attn.base
                device = next(attn.parameters()).device
                gate = HeadGate(info.num_heads, info.head_dim, heads, device=device)
                attn.heat_gate = gate
                self.hooks.add_forward_pre_hook(attn.proj, gate.hook)
        self.kept_heads = kept
        self.scores = [[float(s) for s in row] for row in scores] if scores is not None else None

    def get_state(self) -> dict[str, Any]:
        if self.kept_heads is None:
            return {}
        return {"kept_heads": self.kept_heads, "scores": self.scores}

    def set_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        if not state:
            return
        unknown = sorted(set(state) - {"kept_heads", "scores"})
        if unknown or "kept_heads" not in state:
            raise ValueError(
                f"bad HEAT state keys {sorted(state)}; expected 'kept_heads' and optionally 'scores'"
            )
        self.apply_mask(model, state["kept_heads"], state.get("scores"))

    def unload(self, model: nn.Module) -> None:
        """Fold every head gate into its ``attn.proj`` (the masked heads' input columns become 0), then
        drop the gates and their hooks: the merged and unloaded model is a plain timm model."""
        with torch.no_grad():
            for info in iter_blocks(model):
                attn = info.module.attn
                gate = getattr(attn, "heat_gate", None)
                if isinstance(gate, HeadGate):
                    weight = attn.proj.weight
                    weight.mul_(gate.gate.to(weight.dtype))
                    del attn.heat_gate
        super().unload(model)

    # -- importance ------------------------------------------------------------------------------
    def on_train_start(self, model: nn.Module, loader: Any, ctx: TrainContext) -> None:
        """Score every head, then mask the least important ``mask_ratio`` of them (once per model)."""
        if self.kept_heads is not None:
            return
        scores = self.importance(model, loader, ctx)
        stages = [info.stage for info in iter_blocks(model)]
        kept = select_heads(scores, stages, self.config.mask_ratio, self.config.scope)
        self.apply_mask(model, kept, scores)

    def importance(self, model: nn.Module, loader: Any, ctx: TrainContext | None = None) -> list[list[float]]:
        """TIS of every head (per block, per head) with the configured strategy; see module docstring.

        Runs in train mode, takes no optimizer step (except the ``adapter`` strategy's warmup), leaves no
        gradients and restores every ``requires_grad`` flag and the training mode.
        """
        ctx = ctx or TrainContext()
        if self.kept_heads is not None:
            raise ValueError("heads are already masked; importance scores are computed before masking")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        model.train()
        try:
            if self.config.tis == "weight":
                return self._weight_scores(model, loader, ctx)
            if self.config.tis == "activation":
                return self._activation_scores(model, loader, ctx)
            return self._adapter_scores(model, loader, ctx)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            _zero_grads(model)
            model.train(was_training)

    def _batches(self, loader: Iterable) -> Iterable:
        n = self.config.importance_batches
        return loader if n is None else itertools.islice(loader, n)

    def _accumulate(self, model: nn.Module, loader: Any, ctx: TrainContext, acc: TaylorAccumulator) -> None:
        for batch in self._batches(loader):
            _zero_grads(model)
            _batch_loss(model, batch, ctx).backward()
            acc.update()
        if acc.batches == 0:
            raise ValueError("the importance loader yielded no batch")

    def _weight_scores(self, model: nn.Module, loader: Any, ctx: TrainContext) -> list[list[float]]:
        for p in model.parameters():
            p.requires_grad_(False)
        groups: dict[str, list] = {}
        blocks = iter_blocks(model)
        for info in blocks:
            sites = [linear_sites(model, t, blocks=[info.index])[0] for t in HEAD_TARGETS]
            for s in sites:  # one fused qkv weight, or q_proj / k_proj / v_proj (Eva, qkv_fused=False)
                s.linear.weight.requires_grad_(True)
            dh = info.head_dim
            for h in range(info.num_heads):
                groups[f"{info.index}.{h}"] = [
                    (s.linear.weight, slice(s.start + h * dh, s.start + (h + 1) * dh)) for s in sites
                ]
        acc = TaylorAccumulator(groups, mode="abs")
        self._accumulate(model, loader, ctx, acc)
        totals = acc.scores()
        return [[totals[f"{info.index}.{h}"] for h in range(info.num_heads)] for info in blocks]

    def _activation_scores(self, model: nn.Module, loader: Any, ctx: TrainContext) -> list[list[float]]:
        for p in model.parameters():
            p.requires_grad_(False)
        blocks = iter_blocks(model)
        captured: dict[int, Tensor] = {}

        def capture(index: int):
            def hook(module: nn.Module, args: tuple) -> tuple:
                x = args[0]
                if x.requires_grad:
                    x.retain_grad()
                else:  # nothing upstream needs a gradient: a leaf gives dL/dx exactly
                    x = x.detach().requires_grad_(True)
                # the first call of a batch: a recomputation under gradient checkpointing calls the
                # hook again during backward, and its tensor is not the one the gradient reaches
                captured.setdefault(index, x)
                return (x, *args[1:])

            return hook

        probes = HookRegistry()
        for info in blocks:
            probes.add_forward_pre_hook(info.module.attn.proj, capture(info.index))
        totals = [[0.0] * info.num_heads for info in blocks]
        batches = 0
        try:
            for batch in self._batches(loader):
                captured.clear()
                _batch_loss(model, batch, ctx).backward()
                for info in blocks:
                    x, dh = captured[info.index], info.head_dim
                    groups = {
                        h: [(x, (Ellipsis, slice(h * dh, (h + 1) * dh)))] for h in range(info.num_heads)
                    }
                    for h, score in taylor_scores(groups, mode="group").items():
                        totals[info.index][h] += score
                batches += 1
        finally:
            probes.remove()
            captured.clear()
        if batches == 0:
            raise ValueError("the importance loader yielded no batch")
        return totals

    def _adapter_scores(self, model: nn.Module, loader: Any, ctx: TrainContext) -> list[list[float]]:
        cfg: HeatConfig = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        snapshot = None if cfg.warmup_keep else [p.detach().clone() for p in params]
        steps = cfg.warmup_steps if cfg.warmup_steps is not None else len(loader)
        optimizer = torch.optim.AdamW(params, lr=cfg.warmup_lr, weight_decay=cfg.warmup_weight_decay)
        done = 0
        while done < steps:
            progressed = False
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                _batch_loss(model, batch, ctx).backward()
                optimizer.step()
                done += 1
                progressed = True
                if done >= steps:
                    break
            if not progressed:
                raise ValueError("the warmup loader yielded no batch")
        del optimizer

        per_block = self.deltas(model)
        for p in model.parameters():
            p.requires_grad_(False)
        groups: dict[str, list] = {}
        blocks = iter_blocks(model)
        for info, deltas in zip(blocks, per_block):
            for h in range(info.num_heads):
                items = [item for d in deltas.values() for item in d.head_params(h)]
                for tensor, _ in items:
                    tensor.requires_grad_(True)
                groups[f"{info.index}.{h}"] = items
        acc = TaylorAccumulator(groups, mode="abs")
        self._accumulate(model, loader, ctx, acc)
        if snapshot is not None:
            with torch.no_grad():
                for p, value in zip(params, snapshot):
                    p.copy_(value)
        totals = acc.scores()
        return [[totals[f"{info.index}.{h}"] for h in range(info.num_heads)] for info in blocks]
