"""GPS: Gradient-based Parameter Selection (Zhang et al., CVPR 2024; code: FightingFighting/GPS @ 72e0c31).

**Selection** (authors' ``utils/pruning.py:L5-40``, ``train_gps.py:L483-489,L572-628``): before training,
one pass over the training loader accumulates (no ``zero_grad`` between batches) the gradient of a
loss with respect to every frozen weight; for each neuron (each output row of a Linear weight, each
output channel of the patch-embedding conv flattened to ``[out, in*kh*kw]``) the ``k`` input
connections with the largest ``|dL/dW|`` are selected (``k = --times_para``, 1 on 18 of 19 VTAB-1K
tasks, 2 on patch_camelyon). The loss is the authors' head-free supervised contrastive loss
(``utils/loss_utils.py:L6-97``: SupCon, temperature 0.07, ``'all'`` anchors, L2-normalised features)
on the pooled pre-logits features of two augmented views of each image (``TwoCropTransform``:
``data/transforms_factory.py:L17-23,L80-110``), ``loss='ce'`` uses the task loss on the logits.

**Training** (``utils/cuda.py:L20-30``): the authors mask the gradient of the full weight (masked
entries' gradients set to 0) under Adam with weight decay 0. Here the selected entries are the only
trainable tensor of each weight: a sparse delta ``delta_W = scatter(indices, values)`` (``values``
``[rows, k]`` zero at init, ``indices`` a persistent buffer), so the stored adapter is indices +
values, and the update of a step equals the masked full-weight update (SGD, Adam, AdamW without weight
decay: tested in fp64; with weight decay the authors' AdamW would also decay every frozen entry).

**Eligible tensors** (``utils/pruning.py:L9-13``): every weight but norms, ``pos_embed``, ``cls_token``
and the head: here the ``qkv``, ``proj``, ``fc1``, ``fc2`` Linears of every block and the
patch-embedding conv (``patch_embed``). The authors also train every non-norm **bias** in full (and
LayerScale ``gamma``; none in ViT-B): ``bias=True`` adds a trained shift per output channel of the same
layers (``GpsBias``, zero at init). On the patch conv it is a sequential delta that folds into the conv
bias; on a Linear slice :mod:`petl_zoo.layers` has no place for a bias shift (the Linear wrapper folds
``delta_weight`` only), so the model merges (exactly) with ``bias=False`` only.

**Counts on ViT-B/16** (head excluded, asserted by ``tests/test_gps.py``): selected weight entries
``k * (768 + 12 * (3*768 + 768 + 3072 + 768)) = 83,712 k``; biases ``768 + 12 * 6,912 = 83,712``;
the default (``k = 1``, ``bias=True``) trains 167,424, the number the authors' ``pruning.py`` prints
(trainable without head). With the head (e.g. 100 classes, 76,900) that is 0.24M.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, positive
from ..importance import row_topk
from ..layers import AdaptedLinear, AdaptedModule, Delta, DenseUpdate, adapt_child, adapt_linear
from ..registry import Method, TrainContext, register_method
from ..targets import linear_sites

__all__ = ["GpsConfig", "SparseDelta", "GpsBias", "Gps", "supcon_loss", "two_views"]

TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class GpsConfig(MethodConfig):
    """GPS options: ``k`` selected input connections per neuron (the authors' ``times_para``)."""

    renamed = {"times_para": "k"}

    k: int = positive(1)
    targets: tuple[str, ...] = TARGETS
    patch_embed: bool = True
    bias: bool = True
    loss: Literal["supcon", "ce"] = "supcon"
    temperature: float = positive(0.07)
    importance_batches: int | None = positive(None, none="the whole loader")
    seed: int = 0


class SparseDelta(Delta):
    """``delta_W = scatter(indices, values)``: ``values[r, j]`` at ``W[r, indices[r, j]]``, 0 elsewhere.

    On a Linear slice ``forward(x, W0) = x delta_W^T``; on a conv (``conv`` set) the weight is flattened
    to ``[out, in/groups * kh * kw]`` and the forward is the conv of ``x`` with ``delta_W`` (no bias).
    """

    mergeable = True

    def __init__(self, rows: int, cols: int, k: int, conv: nn.Conv2d | None = None) -> None:
        super().__init__()
        if k > cols:
            raise ValueError(f"k = {k} exceeds the {cols} inputs of a neuron")
        self.rows, self.cols, self.k = rows, cols, k
        self.values = nn.Parameter(torch.zeros(rows, k))
        self.register_buffer("indices", torch.arange(k).expand(rows, k).clone())
        self.conv_args = None
        self.kernel: tuple[int, ...] = ()
        if conv is not None:
            self.kernel = tuple(conv.weight.shape[1:])
            self.conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)

    def set_indices(self, indices: Tensor) -> None:
        if tuple(indices.shape) != (self.rows, self.k):
            raise ValueError(f"indices of shape {tuple(indices.shape)}, expected {(self.rows, self.k)}")
        with torch.no_grad():
            self.indices.copy_(indices.to(self.indices.device))
            self.values.zero_()

    def sparse_weight(self) -> Tensor:
        dense = self.values.new_zeros(self.rows, self.cols).scatter(1, self.indices, self.values)
        return dense.view(self.rows, *self.kernel) if self.kernel else dense

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        if self.conv_args is None:
            return F.linear(x, self.sparse_weight())
        stride, padding, dilation, groups = self.conv_args
        return F.conv2d(x, self.sparse_weight(), None, stride, padding, dilation, groups)

    def delta_weight(self, weight: Tensor) -> Tensor:
        return self.sparse_weight()

    def dense_update(self, weight: Tensor) -> DenseUpdate | None:
        return DenseUpdate(self.sparse_weight()) if self.conv_args is None else None


class GpsBias(Delta):
    """A trained shift of each output channel (the authors train every non-norm bias in full); on a
    conv output ``[B, C, H, W]`` with ``channel_dim=1``, sequential there, where it folds into the conv's
    bias (``affine() = (0, bias)``). On a Linear slice it has no weight-space form (see module doc)."""

    def __init__(self, channels: int, channel_dim: int = -1) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.channel_dim = channel_dim
        self.mergeable = channel_dim != -1

    def affine(self) -> tuple[Tensor, Tensor]:
        if self.channel_dim == -1:
            return super().affine()
        return torch.zeros_like(self.bias), self.bias

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        # a copy, not a view of the parameter: under no_grad a view of a leaf that requires grad still
        # requires grad but has no grad_fn, which module trackers (FlopCounterMode) refuse
        bias = self.bias.clone()
        if self.channel_dim == -1:
            return bias.expand(*x.shape[:-1], -1)
        return bias.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[0], -1, *x.shape[2:])


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al.), the authors' ``SupConLoss`` defaults: ``features``
    ``[B, V, D]`` (V views), L2-normalised, every view an anchor, base temperature = temperature."""
    b, v = features.shape[:2]
    feats = F.normalize(features.flatten(2), dim=2)
    flat = torch.cat(torch.unbind(feats, dim=1), dim=0)  # [V*B, D], view-major
    logits = flat @ flat.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    same = labels.view(-1, 1).eq(labels.view(1, -1)).to(logits.dtype).repeat(v, v)
    not_self = 1.0 - torch.eye(b * v, dtype=logits.dtype, device=logits.device)
    positive_ = same * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_pos = (positive_ * log_prob).sum(1) / positive_.sum(1)
    return -mean_pos.mean()


def two_views(x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two random views of a batch ``[B, C, H, W]``: a random resized crop (area 0.08-1, aspect 3/4-4/3,
    bilinear) and a horizontal flip with p = 0.5, per image (the geometric part of the authors'
    contrastive augmentation; its colour jitter and grayscale need unnormalised images)."""

    def view() -> Tensor:
        n = x.shape[0]
        u = torch.rand(n, 4, generator=generator).to(torch.float64)
        area = 0.08 + (1.0 - 0.08) * u[:, 0]
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
        ratio = torch.exp(log_r)
        sw = torch.sqrt(area * ratio).clamp(max=1.0)
        sh = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (1 - sw) * (2 * u[:, 2] - 1)
        cy = (1 - sh) * (2 * u[:, 3] - 1)
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2] = sw * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = sh, cy
        theta = theta.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return view(), view()


def _split_batch(batch: Any, device: torch.device) -> tuple[Any, Tensor]:
    if isinstance(batch, dict):
        x, y = batch.get("image", batch.get("x")), batch.get("label", batch.get("y"))
    else:
        x, y = batch[0], batch[1]
    x = [v.to(device) for v in x] if isinstance(x, (list, tuple)) else x.to(device)
    return x, y.to(device)


def _features(model: nn.Module, x: Tensor) -> Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@register_method(
    "gps",
    "GPS: the top-k input connections of every neuron by gradient magnitude (a head-free contrastive "
    "loss), trained as a sparse delta; biases trained in full",
)
class Gps(Method):
    """GPS (see the module docstring for what is the authors' and what is ours)."""

    config_class = GpsConfig
    identity_at_init = True
    #: The authors' Adam runs without weight decay on every VTAB-1K task (their scripts' L11).
    recipe = {"weight_decay": 0.0}

    def __init__(self, config: GpsConfig) -> None:
        super().__init__(config)
        self.selected = False
        self._indices: dict[str, list[list[int]]] = {}

    # -- structure ---------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> None:
        cfg: GpsConfig = self.config
        for target in self._targets(model):
            for site in linear_sites(model, target):
                wrapper = adapt_linear(site)
                rows = site.out_features
                wrapper.add_delta(
                    f"gps_{target}", SparseDelta(rows, site.in_features, cfg.k), site.start, site.stop
                )
                if cfg.bias:
                    wrapper.add_delta(f"gps_{target}_bias", GpsBias(rows), site.start, site.stop)
        if cfg.patch_embed:
            patch = getattr(model, "patch_embed", None)
            conv = getattr(patch, "proj", None)
            if isinstance(conv, nn.Conv2d):
                wrapper = adapt_child(patch, "proj")
                cols = conv.weight[0].numel()
                wrapper.parallel["gps"] = SparseDelta(conv.out_channels, cols, cfg.k, conv=conv)
                if cfg.bias:
                    wrapper.sequential["gps_bias"] = GpsBias(conv.out_channels, channel_dim=1)

    def _targets(self, model: nn.Module) -> list[str]:
        out = []
        for t in self.config.targets:
            if t == "qkv":
                try:
                    linear_sites(model, "qkv")
                    out.append(t)
                except ValueError:  # separate q/k/v projections
                    out.extend(["q", "k", "v"])
            else:
                out.append(t)
        return out

    def sites(self, model: nn.Module) -> dict[str, tuple[SparseDelta, Tensor, slice]]:
        """Every sparse delta by name, with the frozen weight it selects in and its rows there."""
        out: dict[str, tuple[SparseDelta, Tensor, slice]] = {}
        for target in self._targets(model):
            for site in linear_sites(model, target):
                layer = site.linear
                if isinstance(layer, AdaptedLinear) and f"gps_{target}" in layer.deltas:
                    out[site.path] = (
                        layer.deltas[f"gps_{target}"],
                        layer.base.weight,
                        slice(site.start, site.stop),
                    )
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        if isinstance(proj, AdaptedModule) and "gps" in proj.parallel:
            out["patch_embed.proj"] = (proj.parallel["gps"], proj.base.weight, slice(None))
        return out

    def apply_selection(self, model: nn.Module, indices: dict[str, Any]) -> None:
        if self.selected:
            raise ValueError("GPS entries are already selected on this model; select once")
        sites = self.sites(model)
        if set(indices) != set(sites):
            raise ValueError(
                f"selection names {sorted(set(indices) ^ set(sites))[:3]} do not match the model"
            )
        for name, (delta, _, _) in sites.items():
            delta.set_indices(torch.as_tensor(indices[name], dtype=torch.long))
        self.selected = True

    def get_state(self) -> dict[str, Any]:
        if not self.selected:
            return {}
        return {"indices": dict(self._indices)}

    def set_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        if not state:
            return
        if set(state) != {"indices"}:
            raise ValueError(f"bad GPS state keys {sorted(state)}; expected 'indices'")
        self.apply_selection(model, state["indices"])
        self._indices = {k: [list(map(int, r)) for r in v] for k, v in state["indices"].items()}

    # -- selection ---------------------------------------------------------------------------------
    def on_train_start(self, model: nn.Module, loader: Any, ctx: TrainContext) -> None:
        """Accumulate gradients over the loader, select the top-k entries per neuron (once per model)."""
        if self.selected:
            return
        grads = self.gradients(model, loader, ctx)
        indices = {name: row_topk(g, self.config.k) for name, g in grads.items()}
        self.apply_selection(model, indices)
        self._indices = {name: idx.tolist() for name, idx in indices.items()}

    def gradients(self, model: nn.Module, loader: Any, ctx: TrainContext | None = None) -> dict[str, Tensor]:
        """Per sparse delta, ``dL/dW`` of its frozen weight rows (``[rows, cols]``, fp32) summed over the
        importance batches, in train mode; leaves no gradient and restores ``requires_grad`` and mode."""
        ctx = ctx or TrainContext()
        cfg: GpsConfig = self.config
        sites = self.sites(model)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        generator = torch.Generator().manual_seed(cfg.seed)
        model.train()
        try:
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            for _, weight, _ in sites.values():
                weight.requires_grad_(True)
            batches = (
                loader if cfg.importance_batches is None else itertools.islice(loader, cfg.importance_batches)
            )
            n = 0
            for batch in batches:
                x, y = _split_batch(batch, ctx.device)
                with ctx.autocast():
                    if cfg.loss == "ce":
                        x = x[0] if isinstance(x, (list, tuple)) else x
                        loss = ctx.loss_fn(model(x), y)
                    else:
                        v1, v2 = x if isinstance(x, (list, tuple)) else two_views(x, generator)
                        feats = _features(model, torch.cat([v1, v2]))
                        f1, f2 = feats.float().split(y.shape[0])
                        loss = supcon_loss(torch.stack([f1, f2], dim=1), y, cfg.temperature)
                loss.backward()  # accumulated over batches, as the authors' calculate_gradient
                n += 1
            if n == 0:
                raise ValueError("the importance loader yielded no batch")
            out = {}
            for name, (delta, weight, rows) in sites.items():
                g = weight.grad if weight.grad is not None else torch.zeros_like(weight)
                out[name] = g.detach()[rows].reshape(delta.rows, delta.cols).float()
            return out
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None
            model.train(was_training)


def selected_count(model: nn.Module) -> int:
    """Selected weight entries (``rows * k`` summed over the sparse deltas)."""
    return sum(m.values.numel() for m in model.modules() if isinstance(m, SparseDelta))
