"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., ICCV 2023; code: ziplab/SPT @ e385f67).

**Sensitivity** (authors' ``engine.py:L101-159``): before training, ``sensitivity_batches`` (16,
``train_spt.py:L218``) training batches in train mode, each with its own backward, accumulate the
squared gradient of the task loss (cross-entropy) for every parameter:
``s_j = sum_batches (dL/dw_j)^2``. Ranked (``engine.py:L165-176``): every weight and bias of ``q``,
``k``, ``v``, ``proj``, ``fc1``, ``fc2`` and every LayerNorm weight and bias (``norm1``, ``norm2``, the
final ``norm``); the head, ``cls_token``, ``patch_embed`` and ``pos_embed`` are not.

**Budget rule** (``engine.py:L189-299``): for ``tau = i * 0.02``, ``i = 1..79`` (millions), the
``ceil(tau * 1e6)`` entries with the largest ``s`` are taken (one ``topk`` over all ranked tensors);
per tensor, ``n`` of them are top entries:

- a matrix (``[out, in]``) whose ``n >= cost / alpha`` gets **structured** tuning, with
  ``cost = r (in + out)`` for LoRA (``engine.py:L92-98``), and then no entry-wise tuning; otherwise its
  ``n`` top entries are tuned **unstructured**;
- a vector (bias, LayerNorm weight/bias) whose ``n >= len / beta`` is tuned in full
  (``--structured_vector``, on in every script), otherwise its ``n`` top entries, unstructured;
- the configuration's count is ``unstructured + structured + 768`` (768: the trained ``cls_token``),
  and the sweep keeps the ``tau`` whose count is closest to the budget (ties: the larger ``tau``).

``alpha = 10`` and ``beta = 5`` (``train_spt.py:L203-204``, every script's ``alpha=10``), rank 8
(``low_rank_dim=8`` in every script). The scripts sweep the budget over 0.2, 0.4, 0.6, 0.8, 1.0 M per
task (``configs/vtab_supervised_spt_lora.sh:L26``) and the code keeps no per-task choice, so there is
no preset; ``budget=0.4`` is the default here.

**Training** (``model/vision_transformer_timm.py:L236-288,L465-508,L1101-1360``):

- structured: LoRA ``delta_W = B A`` (scaling 1, ``A`` kaiming-uniform, ``B`` zero) in parallel with the
  frozen matrix; its input through a dropout 0.1 and its output through a drop-path 0.1
  (``StructuredTuningModule``; here ``dropout`` and ``drop_path``, both on every structured site: the
  authors' ``proj`` branch skips the input dropout);
- unstructured matrix entries: a sparse delta, ``delta_W = scatter(indices, values)`` (flat indices
  into the slice, values zero at init: :class:`FlatSparseDelta`; the authors' ``LinearSPTSparseGrad``);
- Linear-bias entries (whole slices or top entries): a trained shift of those outputs
  (:class:`BiasEntries`); :mod:`petl_zoo.layers` folds no bias shift on a Linear slice, so a model with
  bias entries does not merge (``bias=False`` drops them from training, not from the ranking, and the
  model merges exactly: LoRA + sparse are weight-space deltas);
- whole LayerNorm vectors: a per-channel sequential ``out * g + t`` on the LayerNorm's output
  (:class:`NormAffine`, folds into the LayerNorm: ``w <- (1 + g) w``, ``b <- (1 + g) b + t``); for a
  weight selected alone this also rescales the frozen bias (the authors train ``w`` itself);
- unstructured LayerNorm entries are counted by the budget and not trained, as in the authors' code
  (their sparse form replaces Linears only: ``L1315-1318``);
- ``cls_token``: the authors train it in full (the 768 of the count); a petl_zoo method trains only its
  own modules, so it is not trained here.

**Counts** (asserted by ``tests/test_spt.py``): the trained count is the budget rule's count minus 768
(``cls_token``) minus the unstructured LayerNorm entries (minus the bias entries with ``bias=False``).
On ViT-B/16 a structured ``q``/``k``/``v``/``proj`` costs 12,288 and ``fc1``/``fc2`` 30,720: all 72
matrices structured is 1,327,104, LoRA on q, v of 12 blocks 294,912.

**SPT-Adapter** (``form="adapter"``; the authors' ``--structured_type=adapter --block=BlockSPTSeq``,
``configs/vtab_*_spt_adapter.sh``): the same sensitivities and sweep, a structured matrix costing
``2 r out + r + out`` (``engine.py:L95-97``: the adapter's two weights and two biases, sized by the
matrix's output), and on it the authors' ``StructuredTuningModule(adapter)``
(``model/vision_transformer_timm.py:L258-268,L285-288``): ``DropPath_0.1(up(GELU(down(h))))``, scale 1,
``down`` kaiming-uniform (``a = sqrt 5``) with PyTorch's default bias, ``up`` weight and bias zero,
biases on both layers with ``structured_vector`` (:class:`SptAdapter`). Where it reads
(``AttentionSPTSeq`` L367-441, ``MlpSPTSeq`` L511-554):

- ``q``, ``k``, ``v``, ``fc1``, ``fc2``: sequential on the layer's output,
  ``m <- m + adapter(Dropout_0.1(m))`` with ``m = x W^T + b`` (``fc1``: before the GELU, on the hidden
  width). On timm's fused ``qkv`` the slice's output is recomputed from ``x`` inside the delta
  (:mod:`petl_zoo.layers` attaches deltas to a Linear's input, not to an output slice), with the slice's
  frozen bias and its trained bias entries (:class:`BiasEntries`);
- ``proj``: in parallel on its input, ``proj(x) + adapter(x)`` (L437-439), no input dropout.

Nothing of the adapter merges. The authors' model runs ``init_weights('')`` after building the blocks
(L1312, L1363-1374, ``_init_vit_weights`` L1458), which re-draws *every* Linear, the structured
modules' included, as ``trunc_normal(0.02)`` with zero bias; their runs therefore start with a nonzero ``up`` (LoRA's ``B``
too). Here the module's own init (as written in ``StructuredTuningModule``) is kept for both forms, so
the model is the backbone at init.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, fraction, positive
from ..layers import (
    AdaptedLinear,
    AdaptedModule,
    Delta,
    DenseUpdate,
    LowRank,
    adapt_child,
    adapt_linear,
    dropped_low_rank,
    place_like_host,
)
from ..registry import Method, TrainContext, register_method
from ..targets import iter_blocks, linear_sites
from .adapter import BottleneckAdapter
from .lora import LoraDelta

__all__ = [
    "SptConfig",
    "FlatSparseDelta",
    "BiasEntries",
    "NormAffine",
    "SptLora",
    "SptAdapter",
    "Spt",
    "select",
    "structured_cost",
]

MATRIX_TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")
#: SPT-Adapter: sequential on these layers' outputs; on ``proj`` it is parallel on the input (L437-439)
SEQUENTIAL_TARGETS = ("q", "k", "v", "fc1", "fc2")
CLS_TOKEN = 768  # engine.py:L279, the fully tuned cls_token counted by the budget


@dataclass
class SptConfig(MethodConfig):
    """SPT options (the authors' VTAB-1K scripts): budget in millions, LoRA rank, alpha, beta."""

    renamed = {"low_rank_dim": "rank", "sensitivity_batch_num": "sensitivity_batches"}

    budget: float = positive(0.4)
    rank: int = positive(8)
    alpha: float = positive(10.0)
    beta: float = positive(5.0)
    form: Literal["lora", "adapter"] = "lora"
    structured_vector: bool = True
    bias: bool = True
    dropout: float = fraction(0.1)
    drop_path: float = fraction(0.1)
    sensitivity_batches: int = positive(16)


def structured_cost(form: str, in_dim: int, out_dim: int, rank: int) -> int:
    """Parameters of the structured module on an ``[out_dim, in_dim]`` matrix (``engine.py:L92-98``)."""
    if form == "lora":
        return in_dim * rank + rank * out_dim
    if form == "adapter":
        return out_dim * rank + rank * out_dim + rank + out_dim
    raise ValueError(f"unknown structured form {form!r}")


def select(
    scores: dict[str, Tensor],
    budget: float,
    rank: int = 8,
    alpha: float = 10.0,
    beta: float = 5.0,
    structured_vector: bool = True,
    form: str = "lora",
) -> dict[str, Any]:
    """The authors' budget sweep on sensitivities ``scores`` (name -> tensor; 2-D = matrix, 1-D = vector).

    Returns ``structured`` (matrix names), ``vectors`` (vectors tuned in full), ``unstructured`` (name ->
    sorted flat indices into that tensor) and ``params`` (the rule's count, cls_token included)."""
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    flat = torch.cat([scores[n].detach().flatten().float() for n in names])
    # one descending sort instead of the authors' topk per tau (the same entries, ties aside)
    order = flat.argsort(descending=True, stable=True)
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))[order]
    best_k, best_total = 0, 0.0
    for i in range(1, 80):
        tau = i * 0.02
        k = min(math.ceil(tau * 1e6), flat.numel())
        counts = torch.bincount(owner[:k], minlength=len(names)).tolist()
        total = CLS_TOKEN
        for name, count in zip(names, counts):
            total += _form(scores[name].shape, count, rank, alpha, beta, structured_vector, form)[1]
        if abs(total / 1e6 - budget) <= abs(best_total - budget):
            best_k, best_total = k, total / 1e6
    mask = torch.zeros_like(flat)
    mask[order[:best_k]] = 1.0
    best: dict[str, Any] = {"structured": [], "vectors": [], "unstructured": {}, "params": CLS_TOKEN}
    for name, part in zip(names, mask.split(sizes)):
        count = int(part.sum().item())
        kind, cost = _form(scores[name].shape, count, rank, alpha, beta, structured_vector, form)
        best["params"] += cost
        if kind == "unstructured":
            if count:
                best["unstructured"][name] = part.nonzero().flatten().tolist()
        else:
            best[kind].append(name)
    assert best is not None
    return best


def _form(shape, count: int, rank, alpha, beta, structured_vector, form) -> tuple[str, int]:
    """How a tensor with ``count`` top entries is tuned, and its cost (``engine.py:L211-259``)."""
    if len(shape) == 1:
        if structured_vector and count >= shape[0] / beta:
            return "vectors", int(shape[0])
        return "unstructured", count
    cost = structured_cost(form, shape[1], shape[0], rank)
    if count >= cost / alpha:
        return "structured", cost
    return "unstructured", count


class FlatSparseDelta(Delta):
    """``delta_W = scatter(indices, values)`` on the flattened ``[rows, cols]`` slice; values zero at init."""

    mergeable = True

    def __init__(self, rows: int, cols: int, indices: Tensor) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long).clone())
        self.values = nn.Parameter(torch.zeros(self.indices.numel()))

    def sparse_weight(self) -> Tensor:
        flat = self.values.new_zeros(self.rows * self.cols).scatter(0, self.indices, self.values)
        return flat.view(self.rows, self.cols)

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return F.linear(x, self.sparse_weight())

    def delta_weight(self, weight: Tensor) -> Tensor:
        return self.sparse_weight()

    def dense_update(self, weight: Tensor) -> DenseUpdate:
        return DenseUpdate(self.sparse_weight())


class BiasEntries(Delta):
    """A trained shift of the slice's outputs at ``indices`` (a bias vector's selected entries)."""

    def __init__(self, width: int, indices: Tensor) -> None:
        super().__init__()
        self.width = width
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long).clone())
        self.values = nn.Parameter(torch.zeros(self.indices.numel()))

    def shift(self) -> Tensor:
        return self.values.new_zeros(self.width).scatter(0, self.indices, self.values)

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return self.shift().expand(*x.shape[:-1], -1)


class NormAffine(Delta):
    """``out * g + t`` on a LayerNorm's output (``g``: its weight tuned, ``t``: its bias); folds into it."""

    mergeable = True

    def __init__(self, channels: int, scale: bool, shift: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(channels)) if scale else None
        self.shift = nn.Parameter(torch.zeros(channels)) if shift else None

    def affine(self) -> tuple[Tensor, Tensor | None]:
        ref = self.scale if self.scale is not None else self.shift
        m = self.scale if self.scale is not None else torch.zeros_like(ref)
        return m, self.shift

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        out = x * self.scale if self.scale is not None else torch.zeros_like(x)
        return out + self.shift if self.shift is not None else out


class SptLora(LoraDelta):
    """LoRA (scaling 1) with the authors' drop-path on its output (per sample, ``1 / keep`` scaled)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, dropout: float, drop_path: float
    ) -> None:
        super().__init__(in_features, out_features, rank, 1.0, dropout)
        self.drop_path = drop_path

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        out = dropped_low_rank(x, self.lora_A, self.lora_B, self.dropout)
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = torch.rand((out.shape[0],) + (1,) * (out.dim() - 1), device=out.device, dtype=out.dtype)
            out = out * (mask + keep).floor_() / keep
        return out

    def low_rank(self, weight: Tensor) -> LowRank | None:
        if self.training and (isinstance(self.dropout, nn.Dropout) or self.drop_path > 0):
            return None
        return LowRank(self.lora_A, self.lora_B)


class SptAdapter(BottleneckAdapter):
    """The authors' adapter: ``DropPath(up(GELU(down(Dropout(h)))))``, scale 1, ``up`` zero at init.

    ``sequential``: ``h`` is the output slice's own value ``x W0_slice^T + b0_slice (+ bias entries)``,
    recomputed from the Linear's input (``linked`` by :meth:`Spt.apply_selection`); otherwise ``h = x``
    (``proj``). ``bias=False`` drops both biases (the authors' ``structured_bias``)."""

    def __init__(
        self, features: int, rank: int, bias: bool, dropout: float, drop_path: float, sequential: bool
    ) -> None:
        super().__init__(features, rank, 1.0, "gelu", 0.0, drop_path)
        self.input_dropout = nn.Dropout(dropout) if sequential and dropout > 0 else nn.Identity()
        self.sequential = sequential
        if not bias:
            self.down.register_parameter("bias", None)
            self.up.register_parameter("bias", None)
        self._source: list[Any] = []  # [base Linear, start, stop, BiasEntries | None]: not submodules

    def _init(self) -> None:  # the down bias keeps nn.Linear's default, as the authors' (L265-268)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)

    def link(self, linear: nn.Linear, start: int, stop: int, shift: BiasEntries | None) -> None:
        """Where a sequential adapter's ``h`` comes from: ``linear``'s rows ``[start, stop)`` and ``shift``."""
        self._source = [linear, start, stop, shift]

    def slice_output(self, x: Tensor, weight: Tensor) -> Tensor:
        linear, start, stop, shift = self._source
        bias = linear.bias[start:stop] if linear.bias is not None else None
        out = F.linear(x, weight, bias)
        return out if shift is None else out + shift.shift().to(out.dtype)

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        h = self.slice_output(x, weight) if self.sequential else x
        return super().forward(self.input_dropout(h), weight)


def _split_batch(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        x, y = batch.get("image", batch.get("x")), batch.get("label", batch.get("y"))
    else:
        x, y = batch[0], batch[1]
    return x.to(device), y.to(device)


@register_method(
    "spt",
    "SPT: squared-gradient sensitivity under a parameter budget; LoRA or adapters on sensitive matrices, "
    "the top entries of the others trained as a sparse delta",
)
class Spt(Method):
    """SPT-LoRA and SPT-Adapter (see the module docstring for what is the authors' and what is ours)."""

    config_class = SptConfig
    identity_at_init = True

    def __init__(self, config: SptConfig) -> None:
        super().__init__(config)
        self.selection: dict[str, Any] | None = None

    def apply(self, model: nn.Module) -> None:
        """Nothing until the selection (:meth:`on_train_start` or :meth:`set_state`)."""
        self.tensors(model)  # fails early on a host without the ranked layers

    # -- the ranked tensors ----------------------------------------------------------------------
    def tensors(self, model: nn.Module) -> dict[str, tuple[Tensor, Any]]:
        """Every ranked tensor in the authors' order: name -> (frozen tensor view, place), where place is
        ``(site, 'weight'|'bias')`` for a Linear slice and ``(parent, attr, 'weight'|'bias')`` for a norm."""
        out: dict[str, tuple[Tensor, Any]] = {}
        sites = {t: linear_sites(model, t) for t in MATRIX_TARGETS}
        for info in iter_blocks(model):
            mine = {t: [s for s in sites[t] if s.block.index == info.index] for t in MATRIX_TARGETS}

            def add_norm(attr: str, info=info) -> None:
                norm = getattr(info.module, attr, None)
                norm = norm.base if isinstance(norm, AdaptedModule) else norm
                if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
                    for kind in ("weight", "bias"):
                        if getattr(norm, kind) is not None:
                            out[f"{info.path}.{attr}.{kind}"] = (
                                getattr(norm, kind),
                                (info.module, attr, kind),
                            )

            def add_linear(target: str, mine=mine) -> None:
                for site in mine[target]:
                    base = site.linear.base if isinstance(site.linear, AdaptedLinear) else site.linear
                    key = f"{site.path}.{target}" if site.target != site.attr else site.path
                    out[f"{key}.weight"] = (base.weight[site.start : site.stop], (site, "weight"))
                    if base.bias is not None:
                        out[f"{key}.bias"] = (base.bias[site.start : site.stop], (site, "bias"))

            add_norm("norm1")
            for t in ("q", "k", "v", "proj"):
                add_linear(t)
            add_norm("norm2")
            for t in ("fc1", "fc2"):
                add_linear(t)
        final = getattr(model, "norm", None)
        final = final.base if isinstance(final, AdaptedModule) else final
        if isinstance(final, nn.LayerNorm) and final.weight is not None:
            for kind in ("weight", "bias"):
                if getattr(final, kind) is not None:
                    out[f"norm.{kind}"] = (getattr(final, kind), (model, "norm", kind))
        return out

    # -- selection -------------------------------------------------------------------------------
    def sensitivities(
        self, model: nn.Module, loader: Any, ctx: TrainContext | None = None
    ) -> dict[str, Tensor]:
        """``sum_batches (dL/dw)^2`` of every ranked tensor (fp32), over ``sensitivity_batches`` batches in
        train mode; leaves no gradient and restores ``requires_grad`` and the mode."""
        ctx = ctx or TrainContext()
        ranked = self.tensors(model)
        owners = {}
        for name, (_, place) in ranked.items():
            if len(place) == 2:
                site, kind = place
                base = site.linear.base if isinstance(site.linear, AdaptedLinear) else site.linear
                owners[name] = (getattr(base, kind), slice(site.start, site.stop))
            else:
                parent, attr, kind = place
                norm = getattr(parent, attr)
                norm = norm.base if isinstance(norm, AdaptedModule) else norm
                owners[name] = (getattr(norm, kind), slice(None))
        flags = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        totals = {name: None for name in owners}
        model.train()
        try:
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            for tensor, _ in owners.values():
                tensor.requires_grad_(True)
            n = 0
            for batch in itertools.islice(loader, self.config.sensitivity_batches):
                x, y = _split_batch(batch, ctx.device)
                model.zero_grad(set_to_none=True)
                with ctx.autocast():
                    loss = ctx.loss_fn(model(x), y)
                loss.backward()
                for name, (tensor, rows) in owners.items():
                    g = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
                    sq = g.detach()[rows].float() ** 2
                    totals[name] = sq if totals[name] is None else totals[name] + sq
                n += 1
            if n == 0:
                raise ValueError("the sensitivity loader yielded no batch")
            return {name: t for name, t in totals.items()}
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None
            model.train(was_training)

    def on_train_start(self, model: nn.Module, loader: Any, ctx: TrainContext) -> None:
        """Sensitivities, the budget sweep, then the modules (once per model)."""
        if self.selection is not None:
            return
        cfg: SptConfig = self.config
        scores = self.sensitivities(model, loader, ctx)
        chosen = select(scores, cfg.budget, cfg.rank, cfg.alpha, cfg.beta, cfg.structured_vector, cfg.form)
        self.apply_selection(model, chosen)

    def apply_selection(self, model: nn.Module, selection: dict[str, Any]) -> None:
        if self.selection is not None:
            raise ValueError("SPT is already selected on this model; select once")
        cfg: SptConfig = self.config
        ranked = self.tensors(model)
        named = set(selection["structured"]) | set(selection["vectors"]) | set(selection["unstructured"])
        unknown = sorted(named - set(ranked))
        if unknown:
            raise ValueError(f"selection names {unknown[:3]} are not ranked tensors of this model")
        norms: dict[tuple[int, str], tuple[nn.Module, str, dict[str, bool]]] = {}
        adapters: dict[str, SptAdapter] = {}
        for name, (_tensor, place) in ranked.items():
            full = name in selection["vectors"]
            entries = selection["unstructured"].get(name)
            if (
                len(place) == 3
            ):  # LayerNorm: whole vectors only (the authors' unstructured norms are untrained)
                if full:
                    parent, attr, kind = place
                    norms.setdefault((id(parent), attr), (parent, attr, {}))[2][kind] = True
                continue
            site, kind = place
            stem = name[: -len(kind) - 1].replace(".", "_")
            if kind == "weight":
                if name in selection["structured"]:
                    delta = self.structured_delta(site)
                elif entries:
                    delta = FlatSparseDelta(site.out_features, site.in_features, torch.tensor(entries))
                else:
                    continue
                wrapper = adapt_linear(site)
                wrapper.add_delta(f"spt_{stem}", delta, site.start, site.stop)
                if isinstance(delta, SptAdapter) and delta.sequential:
                    delta.link(wrapper.base, site.start, site.stop, None)
                    adapters[stem] = delta
            elif cfg.bias and (full or entries):
                idx = torch.arange(site.out_features) if full else torch.tensor(entries)
                wrapper = adapt_linear(site)
                shift = BiasEntries(site.out_features, idx)
                wrapper.add_delta(f"spt_{stem}_bias", shift, site.start, site.stop)
                if stem in adapters:  # the adapter reads the layer's output, its trained bias included
                    adapters[stem].link(wrapper.base, site.start, site.stop, shift)
        for parent, attr, kinds in norms.values():
            norm = getattr(parent, attr)
            base = norm.base if isinstance(norm, AdaptedModule) else norm
            wrapper = adapt_child(parent, attr)
            wrapper.sequential["spt"] = NormAffine(
                base.normalized_shape[0], kinds.get("weight", False), kinds.get("bias", False)
            )
        place_like_host(model, self.adapter_dtype)
        for module in model.modules():
            if isinstance(module, Delta):
                module.training = model.training
            if isinstance(module, SptAdapter):
                module.train(model.training)  # its dropout and drop-path too
        self.selection = {
            "structured": list(selection["structured"]),
            "vectors": list(selection["vectors"]),
            "unstructured": {k: [int(i) for i in v] for k, v in selection["unstructured"].items()},
            "params": int(selection["params"]),
        }

    def structured_delta(self, site: Any) -> Delta:
        """The structured module on a selected matrix: LoRA, or the authors' adapter (sequential on the
        output of q, k, v, fc1, fc2; parallel on proj's input)."""
        cfg: SptConfig = self.config
        if cfg.form == "lora":
            return SptLora(site.in_features, site.out_features, cfg.rank, cfg.dropout, cfg.drop_path)
        sequential = site.target in SEQUENTIAL_TARGETS
        if not sequential and site.in_features != site.out_features:
            raise ValueError(
                f"SPT-Adapter on {site.path} ({site.target}) needs in == out features, "
                f"got {site.in_features} -> {site.out_features}"
            )
        return SptAdapter(
            site.out_features, cfg.rank, cfg.structured_vector, cfg.dropout, cfg.drop_path, sequential
        )

    def get_state(self) -> dict[str, Any]:
        return {} if self.selection is None else {"selection": self.selection}

    def set_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        if not state:
            return
        if set(state) != {"selection"}:
            raise ValueError(f"bad SPT state keys {sorted(state)}; expected 'selection'")
        self.apply_selection(model, state["selection"])
