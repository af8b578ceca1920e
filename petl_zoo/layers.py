"""How methods attach to timm layers without rewriting timm's forwards: one delta protocol, two wrappers.

Every method module is a :class:`Delta`: ``forward(x, weight)`` returns an **additive update**.

- On a Linear (:class:`AdaptedLinear`), ``weight`` is the frozen weight slice ``W0[start:stop]`` and the
  update is added to that output slice: ``y = x W0^T + b`` then ``y[..., start:stop] += d(x, W0[start:stop])``.
  *Input deltas* of a Linear change what it reads instead: ``x <- x + d(x, None)``, then the Linear.
- On a timm sub-module (:class:`AdaptedModule`: an ``Mlp``, ``Attention``, block, or a single Linear,
  LayerNorm or Conv2d), ``weight`` is None. Parallel deltas see the module's input,
  ``out = base(x) + d(x, None)``; sequential ones its output, ``out = m + d(m, None)`` with ``m = base(x)``.

Low-rank form. A delta on a Linear's output slice whose update is ``(x D^T) U^T`` for two small
matrices (LoRA: ``D = A``, ``U = s B``; NEAT: ``D = act(A W0)``, ``U = B``) says so through
``low_rank(W0_slice) -> LowRank(down=D, up=U)`` (None when it has no such form right now, e.g. an
active dropout). In a training step :class:`AdaptedLinear` then computes all such deltas of the layer
in one pass instead of one pass per slice: the ``D`` stacked (``[sum r_i, in]``), the ``U`` placed as
blocks of one ``[out, sum r_i]`` matrix (row block = the slice, column block = the delta's rank; zeros
elsewhere). On a plain ``nn.Linear`` the layer computes ``F.linear(x, W0 + U D, b)``, one GEMM as the
frozen layer alone, with the factors' gradients from thin products (never the ``[out, in]`` weight
gradient); otherwise (a Linear with hooks of its own, a ``base_scale``) ``y + (x D^T) U^T``, one add
and no per-slice in-place writes. A delta with forward hooks of its own is called through its forward
(the hooks run). With gradients off (inference, FLOP counting) every delta runs its own forward, so
an unmerged model counts the per-token low-rank products that the papers count.

Dense form. A delta whose forward is ``x delta_W^T (+ delta_b)`` with a full-size ``delta_W`` it builds
anyway (OFT, BOFT, FourierFT, LoHa, LoKr, GLoRA, the sparse deltas of GPS and SPT) says so through
``dense_update(W0_slice) -> DenseUpdate(weight, bias)``, drawing what its forward would draw. In a
training step on a plain ``nn.Linear`` in float32 or wider (no autocast, no ``base_scale`` on the layer)
the updates are then folded into the layer's own product, ``F.linear(x, W0 + delta_W, b + delta_b)``:
one GEMM forward and one for the input gradient, as full fine-tuning, instead of a second product with
``x`` and its two backward GEMMs; the same ``x`` is kept for ``delta_W``'s gradient. In half precision
``W0 + delta_W`` would round a small update away, so there each delta keeps its own product.

A ``LowRank`` may also carry ``base_scale`` (``g``, ``[stop-start]``): the update then also adds
``g * (x W0_slice^T)``, the layer's output without bias (a per-row rescaling of the base output, the
form of DoRA: ``g = m / ||W0 + s B A||_row - 1`` with ``U = (g + 1) s B``); it takes the added form,
whose base output is at hand for ``g``'s gradient.

Merging. A delta with a weight-space form sets ``mergeable = True`` and describes that form by where it
sits; the wrapper folds it into the weights of the layer next to it and, while merged, keeps the
originals so that unmerging is exact:

- on a Linear's output slice: ``delta_weight(W0_slice)``, added to the slice: ``W <- W0 + delta_W``;
- sequential on a Linear, Conv or LayerNorm (it reads the layer's output ``m``), or an input delta of a
  Linear (it reads ``x``): ``affine() -> (M, c)``, the update as an affine map ``d(z) = M z + c`` of what
  it reads, ``M`` per channel (``[C]``: ``M * z + c``) or a matrix (``[C, C]``), ``c`` a ``[C]`` shift or
  None. Folded into the layer that produces ``m`` (:func:`fold_output`: ``W <- (I + M) W``,
  ``b <- (I + M) b + c``) or into the Linear that consumes ``x`` (:func:`fold_input`: ``W <- W (I + M)``,
  ``b <- b + W c``). A shift needs a bias to go to: a bias-free layer blocks the merge (it would add
  a tensor that the plain timm model does not have).
- parallel on a Conv (Conv1d/2d/3d wrapped by an :class:`AdaptedModule`; :data:`FOLD_PARALLEL_TYPES`):
  ``delta_weight(W0)``, a tensor of the conv weight's shape (``[out, in/groups, *kernel]``) whose conv
  with the layer's own stride, padding, dilation and groups (no bias) is the delta's update; a conv is
  linear in its weight, so ``W <- W0 + delta_W`` (LoHa and LoKr on the patch embedding).

Other parallel deltas on a module, and deltas without a weight-space form, depend on the input and never
merge. Whether a model merges is derived from what is attached (:func:`merge_blockers`), never declared
by the method. Forward pre-hooks that a method puts on timm modules are owned by one
:class:`HookRegistry` (``Method.hooks``), which removes them all.

Every tensor that lives under a :class:`PetlModule` belongs to the method: it is saved by
``save_adapter`` and counted as the method's.

Precision. A method's tensors are kept in the *adapter dtype* (:func:`adapter_dtype_for`): float32 on a
float16/bfloat16 host by default, the host's dtype otherwise, or what ``create(..., adapter_dtype=...)``
asks for. Where it differs from the host's (:func:`place_like_host` then sets
``PetlModule.casts_to_input``), a method module computes in the dtype of the activations it is called
with: its tensors are cast to that dtype for the call (:func:`cast_method_tensors`; small tensors, the
gradient flows back to the stored ones), never the frozen weights, so outputs keep the host's dtype.
Merging computes the merged weight in float32 (or wider) and stores it in the host's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from .targets import LinearSite, ModuleSite, unfold_qkv_bias

__all__ = [
    "PetlModule",
    "Delta",
    "LowRank",
    "DenseUpdate",
    "dropped_linear",
    "dropped_low_rank",
    "LinearDelta",
    "AdaptedLinear",
    "AdaptedModule",
    "Wrapper",
    "HookRegistry",
    "FOLD_OUTPUT_TYPES",
    "FOLD_PARALLEL_TYPES",
    "Affine",
    "adapt_linear",
    "adapt_module",
    "adapt_child",
    "adapted_linears",
    "adapted_wrappers",
    "fold_output",
    "fold_input",
    "merge_blockers",
    "unmergeable_deltas",
    "unload_wrappers",
    "place_like_host",
    "adapter_dtype_for",
    "cast_method_tensors",
    "HALF_DTYPES",
    "ADAPTER_DTYPES",
]

logger = logging.getLogger(__name__)

#: Affine map ``d(z) = M z + c`` of a delta (see the module docstring): ``(M, c)``, ``c`` may be None.
Affine = tuple[Tensor, "Tensor | None"]


#: Half-precision floating dtypes: a host in one of them gets float32 method tensors by default.
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
#: The dtypes a method's tensors may be kept in (``create(..., adapter_dtype=...)``).
ADAPTER_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def adapter_dtype_for(host: torch.dtype, adapter_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a method's tensors are kept in on a host whose weights are ``host``: ``adapter_dtype``
    when given, else float32 for a float16/bfloat16 host (updates below half precision's resolution
    would be lost: peft's ``autocast_adapter_dtype``) and the host's own dtype otherwise."""
    if adapter_dtype is not None:
        if adapter_dtype not in ADAPTER_DTYPES:
            names = ", ".join(str(d) for d in ADAPTER_DTYPES)
            raise ValueError(f"adapter_dtype must be None or one of {names}, got {adapter_dtype!r}")
        return adapter_dtype
    return torch.float32 if host in HALF_DTYPES else host


@contextmanager
def cast_method_tensors(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, every floating parameter and buffer below ``module`` that is not in ``dtype``
    reads as its cast to ``dtype`` (differentiable: gradients reach the stored tensor); tied tensors are
    cast once. Modules with ``keeps_float32`` keep theirs. Restored on exit, also when the block raises.
    Only the method's small tensors are cast: the frozen weights a delta gets as arguments are not."""
    swapped: list[tuple[dict[str, Any], str, Tensor]] = []
    casts: dict[int, Tensor] = {}
    try:
        for sub in module.modules():
            if getattr(sub, "keeps_float32", False):
                continue
            for table in (sub._parameters, sub._buffers):
                for name, tensor in table.items():
                    if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                        continue
                    cast = casts.get(id(tensor))
                    if cast is None:
                        cast = casts[id(tensor)] = tensor.to(dtype)
                    swapped.append((table, name, tensor))
                    table[name] = cast
        yield
    finally:
        for table, name, tensor in reversed(swapped):
            table[name] = tensor


def _input_dtype(args: tuple, kwargs: dict[str, Any]) -> torch.dtype | None:
    """The dtype of the first floating tensor among a call's arguments (None without one)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.dtype
    return None


class PetlModule(nn.Module):
    """Marker base class: parameters and persistent buffers below it are the method's own.

    :func:`place_like_host` puts every PetlModule on the device of the weights it adapts, in the adapter
    dtype (:func:`adapter_dtype_for`: float32 on a float16/bfloat16 host by default, the host's dtype
    otherwise). When that differs from the host's dtype it sets ``casts_to_input``: a call then runs with
    the module's tensors cast to the dtype of its first floating argument (:func:`cast_method_tensors`),
    so a bf16 host computes in bf16 with float32 tensors stored and trained. A module that must keep
    float32 on purpose (e.g. accumulated statistics) sets ``keeps_float32 = True``: it is only moved to
    the device and handles its dtype itself.
    """

    keeps_float32: bool = False
    #: Set by :func:`place_like_host`: the module's tensors are kept in another dtype than the host's,
    #: so calls compute in the dtype of the input (see the class docstring).
    casts_to_input: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.casts_to_input:
            dtype = _input_dtype(args, kwargs)
            if dtype is not None:
                with cast_method_tensors(self, dtype):
                    return super().__call__(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class LowRank(NamedTuple):
    """The update ``(x down^T) up^T [+ base_scale * (x W0_slice^T)]`` of a delta on a Linear's output
    slice (see the module docstring): ``down`` ``[r, in]``, ``up`` ``[stop-start, r]``, ``base_scale``
    ``[stop-start]`` or None."""

    down: Tensor
    up: Tensor
    base_scale: Tensor | None = None


class DenseUpdate(NamedTuple):
    """The update ``x weight^T + bias`` of a delta on a Linear's output slice (see the module docstring):
    ``weight`` ``[stop-start, in]``, ``bias`` ``[stop-start]``, either None when it adds nothing."""

    weight: Tensor | None
    bias: Tensor | None = None


class Delta(PetlModule):
    """A method's trainable update; the one protocol of every method module (see the module docstring).

    ``forward(x, weight)`` returns the additive update for input ``x``: ``weight`` is the frozen weight
    slice (``[stop-start, in]``) on a Linear's output slice and None elsewhere. Deltas that live in
    weight space set ``mergeable = True`` and implement the form of their position:
    ``delta_weight(weight)`` (``[stop-start, in]``) on a Linear's output slice, ``affine()`` as a
    sequential delta on a Linear / Conv / LayerNorm or as an input delta of a Linear, and
    ``delta_weight(weight)`` of the conv weight's shape as a parallel delta on a Conv (``weight`` is then
    the conv's frozen weight ``W0``; its ``forward`` still gets None).
    """

    mergeable: bool = False

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self, weight: Tensor) -> Tensor:
        raise ValueError(f"{type(self).__name__} has no weight-space form and cannot be merged")

    def low_rank(self, weight: Tensor) -> LowRank | None:
        """The factors of this forward's update on the slice ``weight`` (``forward(x, weight) ==
        (x down^T) up^T [+ base_scale * (x weight^T)]``), or None to be called through ``forward``."""
        return None

    def dense_update(self, weight: Tensor) -> DenseUpdate | None:
        """The full-size update this forward computes on the slice ``weight`` (``forward(x, weight) ==
        F.linear(x, update.weight, update.bias)``), drawing what the forward draws, or None to be called
        through ``forward``."""
        return None

    def affine(self) -> Affine:
        """``(M, c)`` with ``forward(z, None) == M z + c`` (``M * z + c`` for a per-channel ``[C]`` M)."""
        raise ValueError(f"{type(self).__name__} has no affine form and cannot be folded into a layer")


#: The former name of :class:`Delta` (a delta on a Linear slice), kept for existing code.
LinearDelta = Delta


class HookRegistry:
    """The forward pre-hooks one method registered on timm modules, removable together.

    Handles survive ``copy.deepcopy`` of the model that holds the method (they then point at the copy).
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add_forward_pre_hook(self, module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
        handle = module.register_forward_pre_hook(hook)
        self._handles.append(handle)
        return handle

    def remove(self) -> int:
        """Remove every hook registered through this registry; returns how many there were."""
        count = len(self._handles)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return count

    def __len__(self) -> int:
        return len(self._handles)


class Wrapper(nn.Module):
    """Shared behaviour of the wrappers: the wrapped timm module is ``base`` (``targets`` unwraps it),
    attributes fall through to it."""

    _petl_wrapper = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)


#: Layers a sequential affine delta folds into: the first dim of their weight and their bias index the
#: output channels (ConvTranspose, whose weight starts with the input channels, is not among them).
FOLD_OUTPUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.LayerNorm,
    nn.GroupNorm,
)


#: Layers a mergeable *parallel* delta folds into (``W <- W0 + delta_weight(W0)``, see the module
#: docstring): a conv is linear in its weight, so the delta's conv adds to the layer's.
FOLD_PARALLEL_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _work_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype folds are computed in: float32 for half types, the tensor's own otherwise (fp64 stays)."""
    return torch.promote_types(tensor.dtype, torch.float32)


@torch.no_grad()
def fold_output(layer: nn.Module, matrix: Tensor, shift: Tensor | None) -> None:
    """Fold ``out <- out + M out + c`` into the layer that produces ``out``: ``W <- (I + M) W`` and
    ``b <- (I + M) b + c`` (``M`` per channel scales the first dim of any weight; a matrix ``M``
    only folds into a Linear)."""
    weight, bias = layer.weight, layer.bias
    work = _work_dtype(weight)
    w, m = weight.detach().to(work), matrix.detach().to(work)
    b = None if bias is None else bias.detach().to(work)
    if m.shape[0] != w.shape[0]:
        raise ValueError(
            f"an affine map of {m.shape[0]} channels cannot fold into a {type(layer).__name__} of {w.shape[0]}"
        )
    if m.dim() == 1:
        dw = w * m.view(-1, *([1] * (w.dim() - 1)))
        db = None if b is None else b * m
    elif isinstance(layer, nn.Linear):
        dw, db = m @ w, None if b is None else m @ b
    else:
        raise ValueError(f"a matrix affine map folds into a Linear, not into a {type(layer).__name__}")
    if shift is not None:
        if bias is None:
            raise ValueError(f"the {type(layer).__name__} has no bias to take the shift")
        db = db + shift.detach().to(work)
    weight.copy_((w + dw).to(weight.dtype))
    if db is not None:
        bias.copy_((b + db).to(bias.dtype))


@torch.no_grad()
def fold_input(linear: nn.Linear, affines: Iterable[Affine]) -> None:
    """Fold ``x <- x + sum_i (M_i x + c_i)`` into the Linear that reads ``x``: ``W <- W (I + sum M_i)``
    and ``b <- b + W sum c_i`` (every term from the same ``W``)."""
    weight, bias = linear.weight, linear.bias
    work = _work_dtype(weight)
    w = weight.detach().to(work)
    dw = torch.zeros_like(w)
    db = None
    for matrix, shift in affines:
        m = matrix.detach().to(work)
        dw += w * m if m.dim() == 1 else w @ m
        if shift is not None:
            if bias is None:
                raise ValueError("the Linear has no bias to take the shift")
            db = (0 if db is None else db) + w @ shift.detach().to(work)
    weight.copy_((w + dw).to(weight.dtype))
    if db is not None:
        bias.copy_((bias.detach().to(work) + db).to(bias.dtype))


def _has_shift(delta: Delta) -> bool:
    with torch.no_grad():
        return delta.affine()[1] is not None


def _output_fold_blocker(layer: nn.Module, delta: Delta) -> str | None:
    """Why ``delta``'s affine form cannot fold into the ``layer`` before it (None when it can)."""
    kind = type(layer).__name__
    if not isinstance(layer, FOLD_OUTPUT_TYPES):
        return f"a {kind} is not a layer petl_zoo folds into (Linear, Conv, LayerNorm, GroupNorm)"
    if getattr(layer, "weight", None) is None:
        return f"the {kind} has no affine weight to fold into"
    if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) != 1:
        return f"the {kind} normalises over {tuple(layer.normalized_shape)}, not over channels only"
    if layer.bias is None and _has_shift(delta):
        return f"the {kind} has no bias to take the shift"
    return None


class AdaptedLinear(Wrapper):
    """A frozen ``nn.Linear`` plus additive updates on output slices and input deltas (see module
    docstring): ``x' = x + sum d_in(x)``, ``y = base(x')``, ``y[..., start:stop] += d(x', W0[start:stop])``."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict()
        self.input_deltas = nn.ModuleDict()
        self.slices: dict[str, tuple[int, int]] = {}
        self.merged = False
        self._original_weight: Tensor | None = None
        self._original_bias: Tensor | None = None

    def add_delta(self, name: str, delta: Delta, start: int, stop: int) -> None:
        if name in self.deltas:
            raise ValueError(f"a delta named {name!r} is already attached to this layer")
        if not 0 <= start < stop <= self.base.out_features:
            raise ValueError(f"bad output slice [{start}, {stop}) for a Linear of {self.base.out_features}")
        self.deltas[name] = delta
        self.slices[name] = (start, stop)

    def add_input_delta(self, name: str, delta: Delta) -> None:
        """Attach ``delta`` on the input: the Linear then reads ``x + delta(x, None)``."""
        if name in self.input_deltas:
            raise ValueError(f"an input delta named {name!r} is already attached to this layer")
        self.input_deltas[name] = delta

    def remove_delta(self, name: str) -> Delta:
        delta = self.deltas.pop(name)
        del self.slices[name]
        return delta

    def forward(self, x: Tensor) -> Tensor:
        if len(self.input_deltas) and not self.merged:
            update = None
            for delta in self.input_deltas.values():
                d = delta(x, None)
                update = d if update is None else update + d
            x = x + update
        if self.merged or not len(self.deltas):
            return self.base(x)
        weight, bias = self.base.weight, self.base.bias
        factored: list[tuple[int, int, LowRank]] = []
        others: list[tuple[int, int, Delta]] = []
        one_pass = torch.is_grad_enabled()  # a training-step form; inference keeps the per-delta FLOPs
        for name, delta in self.deltas.items():
            start, stop = self.slices[name]
            form = None if not one_pass or _hooked(delta) else _low_rank(delta, weight[start:stop], x.dtype)
            if form is None:
                others.append((start, stop, delta))
            else:
                factored.append((start, stop, form))
        if others and one_pass and self._folds_dense(x, factored):
            others, dense = _dense_updates(others, weight, x.dtype)
            if dense:
                weight, bias = _fold_dense(weight, bias, dense)
        fused = bool(factored) and self._fusable(factored)
        if fused:
            y = _LowRankLinear.apply(x, weight, bias, *_stacked(factored, weight.shape[0]))
        else:
            folded = weight is not self.base.weight or bias is not self.base.bias
            y = F.linear(x, weight, bias) if folded else self.base(x)
            if factored:
                y = _add_low_rank(y, x, factored, bias)
        width, frozen = y.shape[-1], self.base.weight  # the other deltas read W0, not a folded weight
        for start, stop, delta in others:
            update = delta(x, frozen[start:stop])
            if start == 0 and stop == width:
                y = y + update
            elif fused:  # autograd forbids writing into a custom Function's output
                y = y + F.pad(update, (start, width - stop))
            else:
                y[..., start:stop] += update
        return y

    def _folds_dense(self, x: Tensor, forms: list[tuple[int, int, LowRank]]) -> bool:
        """Whether full-size updates (:meth:`Delta.dense_update`) go into the layer's own product,
        ``F.linear(x, W0 + delta_W, b + delta_b)``: a plain ``nn.Linear`` without hooks of its own, no
        ``base_scale`` (it needs ``x W0^T`` alone), and float32 or wider arithmetic (in half precision
        ``W0 + delta_W`` would round a small update away)."""
        return (
            type(self.base) is nn.Linear
            and not _hooked(self.base)
            and x.dtype == self.base.weight.dtype
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
            and all(form.base_scale is None for _, _, form in forms)
        )

    def _fusable(self, forms: list[tuple[int, int, LowRank]]) -> bool:
        """Whether the low-rank updates can go into one ``F.linear`` with ``W0 + U D`` (:class:`_LowRankLinear`):
        a plain ``nn.Linear`` without hooks of its own, no ``base_scale``."""
        return (
            type(self.base) is nn.Linear
            and not _hooked(self.base)
            and all(form.base_scale is None for _, _, form in forms)
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every delta into the base: ``W <- W0 + delta_W(W0)`` per output slice, then the input
        deltas (:func:`fold_input`); a no-op when merged."""
        if self.merged:
            return
        for name, delta in (*self.deltas.items(), *self.input_deltas.items()):
            if not delta.mergeable:
                raise ValueError(f"delta {name!r} ({type(delta).__name__}) cannot be merged")
        weight, bias = self.base.weight, self.base.bias
        original = weight.detach().clone()
        original_bias = bias.detach().clone() if len(self.input_deltas) and bias is not None else None
        if len(self.deltas):
            work = _work_dtype(weight)  # float32 for a half-precision weight, stored once at the end
            merged = weight if work == weight.dtype else original.to(work)
            for name, delta in self.deltas.items():
                start, stop = self.slices[name]
                with cast_method_tensors(delta, work):
                    merged[start:stop] += delta.delta_weight(original[start:stop].to(work)).to(work)
            if merged is not weight:
                weight.copy_(merged.to(weight.dtype))
        if len(self.input_deltas):
            try:
                work = _work_dtype(weight)
                affines = []
                for d in self.input_deltas.values():
                    with cast_method_tensors(d, work):
                        affines.append(d.affine())
                fold_input(self.base, affines)
            except BaseException:
                weight.copy_(original)
                if original_bias is not None:
                    bias.copy_(original_bias)
                raise
        self._original_weight = original
        self._original_bias = original_bias
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weight W0 (and bias, when input deltas were folded)."""
        if not self.merged:
            return
        self.base.weight.copy_(self._original_weight)
        if self._original_bias is not None:
            self.base.bias.copy_(self._original_bias)
        self._original_weight = None
        self._original_bias = None
        self.merged = False


def _as_called(delta: Delta, dtype: torch.dtype, form: Callable[[Tensor], Any], weight: Tensor) -> Any:
    """``form(weight)`` (one of ``delta``'s forms, ``low_rank`` or ``dense_update``), computed in
    ``dtype`` (the input's) when the delta's tensors are kept in another dtype (``casts_to_input``), as
    its forward would be."""
    if not delta.casts_to_input:
        return form(weight)
    with cast_method_tensors(delta, dtype):
        return form(weight)


def _low_rank(delta: Delta, weight: Tensor, dtype: torch.dtype) -> LowRank | None:
    return _as_called(delta, dtype, delta.low_rank, weight)


def _dense_updates(
    deltas: list[tuple[int, int, Delta]], weight: Tensor, dtype: torch.dtype
) -> tuple[list[tuple[int, int, Delta]], list[tuple[int, int, DenseUpdate]]]:
    """``(the deltas without a dense form, the dense forms on their slices)``, in the deltas' order."""
    rest: list[tuple[int, int, Delta]] = []
    dense: list[tuple[int, int, DenseUpdate]] = []
    for start, stop, delta in deltas:
        update = _as_called(delta, dtype, delta.dense_update, weight[start:stop])
        if update is None:
            rest.append((start, stop, delta))
        else:
            dense.append((start, stop, update))
    return rest, dense


def _fold_dense(
    weight: Tensor, bias: Tensor | None, dense: list[tuple[int, int, DenseUpdate]]
) -> tuple[Tensor, Tensor | None]:
    """``(W0 + sum delta_W, b + sum delta_b)``, each update placed on its rows."""
    rows, cols = weight.shape
    for start, stop, update in dense:
        if update.weight is not None:
            weight = weight + _place(update.weight.to(weight.dtype), (start, stop), (0, cols), (rows, cols))
        if update.bias is not None:
            shift = F.pad(update.bias.to(weight.dtype), (start, rows - stop))
            bias = shift if bias is None else bias + shift
    return weight, bias


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks: such a delta is called through its forward, so they run."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _place(block: Tensor, rows: tuple[int, int], cols: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """``block`` at ``[rows, cols]`` of a zero matrix of ``shape`` (the block itself when it fills it)."""
    pad = (cols[0], shape[1] - cols[1], rows[0], shape[0] - rows[1])
    return block if not any(pad) else F.pad(block, pad)


def _stacked(forms: list[tuple[int, int, LowRank]], width: int) -> tuple[Tensor, Tensor]:
    """``(D, U)`` of the updates on their slices ``[start, stop)``: the ``down`` stacked (``[sum r, in]``)
    and the ``up`` as blocks of one ``[width, sum r]`` matrix (see the module docstring)."""
    total = sum(form.down.shape[0] for _, _, form in forms)
    blocks, col = [], 0
    for start, stop, form in forms:
        rank = form.down.shape[0]
        blocks.append(_place(form.up, (start, stop), (col, col + rank), (width, total)))
        col += rank
    down = forms[0][2].down if len(forms) == 1 else torch.cat([form.down for _, _, form in forms])
    up = blocks[0] if len(blocks) == 1 else torch.stack(blocks).sum(0)
    return down, up


def _add_low_rank(y: Tensor, x: Tensor, forms: list[tuple[int, int, LowRank]], bias: Tensor | None) -> Tensor:
    """``y`` plus every factored update on its slice, in one pass: ``y + (x D^T) U^T`` (:func:`_stacked`),
    plus ``(y - bias) * g`` for the ``base_scale`` ones."""
    width = y.shape[-1]
    down, up = _stacked(forms, width)
    scaled = [(start, stop, form.base_scale) for start, stop, form in forms if form.base_scale is not None]
    out = y + F.linear(F.linear(x, down), up)
    if scaled:
        scale = torch.stack([F.pad(g, (start, width - stop)) for start, stop, g in scaled]).sum(0)
        base = y if bias is None else y - bias.to(y.dtype)
        out = out + base * scale.to(y.dtype)
    return out


class _LowRankLinear(torch.autograd.Function):
    """``F.linear(x, W0 + U D, b)``: one GEMM forward, one for the input gradient, as the frozen layer
    alone; the factors' gradients from thin products, never the ``[out, in]`` weight gradient:
    ``dU = g^T (x D^T)``, ``dD = (g U)^T x``, ``dx = g W0 + (g U) D``. Under autocast the products run
    in the output's dtype, as autocast's would."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, down, up)
        return F.linear(x, torch.addmm(weight, up, down), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, down, up = ctx.saved_tensors
        dt = grad.dtype
        g = grad.reshape(-1, grad.shape[-1])
        xs = x.reshape(-1, x.shape[-1]).to(dt)
        w, d, u = weight.to(dt), down.to(dt), up.to(dt)
        need_x, need_w, need_b, need_d, need_u = ctx.needs_input_grad
        gu_ = g @ u
        dx = torch.addmm(g @ w, gu_, d).view(x.shape).to(x.dtype) if need_x else None
        dw = (g.t() @ xs).to(weight.dtype) if need_w else None
        db = g.sum(0).to(weight.dtype) if need_b else None
        dd = (gu_.t() @ xs).to(down.dtype) if need_d else None
        du = (g.t() @ (xs @ d.t())).to(up.dtype) if need_u else None
        return dx, dw, db, dd, du


def dropped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, dropout: nn.Module) -> Tensor:
    """``F.linear(dropout(x), weight, bias)``. With an active ``nn.Dropout`` (training, ``0 < p < 1``,
    no autocast, one dtype) through :class:`_DroppedLinear`, which keeps ``x`` and the 1-byte mask
    instead of the dropped copy; the same mask, random stream and gradients as the plain form."""
    if (
        isinstance(dropout, nn.Dropout)
        and dropout.training
        and 0 < dropout.p < 1
        and x.dtype == weight.dtype
        and (bias is None or bias.dtype == x.dtype)
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return _DroppedLinear.apply(x, weight, bias, dropout.p)
    return F.linear(dropout(x), weight, bias)


def dropped_low_rank(x: Tensor, down: Tensor, up: Tensor, dropout: nn.Module) -> Tensor:
    """``(dropout(x) down^T) up^T``, the dropped input not kept (:func:`dropped_linear`)."""
    return F.linear(dropped_linear(x, down, None, dropout), up)


class _DroppedLinear(torch.autograd.Function):
    """``F.linear(dropout_p(x), W, b)`` that keeps ``x`` (a layer's input: one tensor however many deltas
    read it, and often kept anyway) and the bool mask, not the float dropped copy, which the backward
    rebuilds as ``native_dropout`` built it (``x * mask * 1/(1-p)``); the gradients are autograd's."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, p: float) -> Tensor:
        dropped, mask = torch.native_dropout(x, p, True)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(x, mask, weight)
        return F.linear(dropped, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, mask, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        dw = None
        if need_w:
            dropped = x.mul(mask).mul_(ctx.scale)
            dw = g.t() @ dropped.reshape(-1, x.shape[-1])
        db = g.sum(0) if need_b else None
        dx = (grad @ weight).mul(mask).mul_(ctx.scale) if need_x else None
        return dx, dw, db, None


class AdaptedModule(Wrapper):
    """A timm sub-module plus parallel deltas (on its input) and sequential ones (on its output).

    Mergeable parallel deltas on a Conv add ``delta_weight(W0)`` to its weight, then sequential deltas
    with an affine form (:meth:`Delta.affine`) on a Linear, Conv or LayerNorm fold into its weight and
    bias (:func:`fold_output`, in order); the originals are kept while merged."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.parallel = nn.ModuleDict()
        self.sequential = nn.ModuleDict()
        self.merged = False
        self._originals: dict[str, Tensor] | None = None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base(x, *args, **kwargs)
        if self.merged:
            return out
        for delta in self.parallel.values():
            out = out + delta(x, None)
        for delta in self.sequential.values():
            out = out + delta(out, None)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the parallel conv deltas (``W <- W0 + sum delta_W``), then the sequential ones, into the
        wrapped layer; a no-op when merged or empty."""
        if self.merged or not (len(self.parallel) or len(self.sequential)):
            return
        dependent, unfoldable = _module_blockers(type(self.base).__name__, self)
        if dependent or unfoldable:
            raise ValueError(f"cannot merge: {(dependent + unfoldable)[0]}")
        self._originals = {name: t.detach().clone() for name, t in self.base.named_parameters(recurse=False)}
        try:
            if len(self.parallel):
                weight = self.base.weight
                work = _work_dtype(weight)
                original = self._originals["weight"].to(work)
                merged = original.clone()
                for delta in self.parallel.values():
                    with cast_method_tensors(delta, work):
                        merged += delta.delta_weight(original).to(work)
                weight.copy_(merged.to(weight.dtype))
            for delta in self.sequential.values():
                weight = getattr(self.base, "weight", None)
                work = _work_dtype(weight) if isinstance(weight, Tensor) else torch.float32
                with cast_method_tensors(delta, work):
                    affine = delta.affine()
                fold_output(self.base, *affine)
        except BaseException:
            self._restore()
            raise
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the wrapped layer's exact original weight and bias (kept from :meth:`merge`)."""
        if not self.merged:
            return
        self._restore()
        self.merged = False

    def _restore(self) -> None:
        params = dict(self.base.named_parameters(recurse=False))
        for name, original in (self._originals or {}).items():
            params[name].copy_(original)
        self._originals = None


def adapt_linear(site: LinearSite) -> AdaptedLinear:
    """The :class:`AdaptedLinear` at ``site``, wrapping the Linear there on first use (after the site's
    ``before_adapt`` step, which makes the host's forward call the Linear: see :mod:`petl_zoo.targets`)."""
    current = site.linear
    if isinstance(current, AdaptedLinear):
        return current
    if site.before_adapt is not None:
        site.before_adapt()
    wrapper = AdaptedLinear(current)
    setattr(site.parent, site.attr, wrapper)
    return wrapper


def adapt_module(site: ModuleSite | LinearSite) -> AdaptedModule:
    """The :class:`AdaptedModule` at ``site``, wrapping the module there on first use. For a
    :class:`LinearSite` the whole Linear is wrapped (after the site's ``before_adapt`` step)."""
    return adapt_child(site.parent, site.attr, getattr(site, "before_adapt", None))


def adapt_child(
    parent: nn.Module, attr: str, before_adapt: Callable[[], None] | None = None
) -> AdaptedModule:
    """The :class:`AdaptedModule` at ``parent.attr`` (a patch-embedding conv, a norm ...), wrapping the
    module there on first use; ``before_adapt`` runs first when given."""
    current = getattr(parent, attr)
    if isinstance(current, AdaptedModule):
        return current
    if before_adapt is not None:
        before_adapt()
        current = getattr(parent, attr)
    wrapper = AdaptedModule(current)
    setattr(parent, attr, wrapper)
    return wrapper


def _reference_tensor(module: nn.Module) -> Tensor | None:
    """The first floating parameter (else buffer) of ``module``: what a delta attached to it should match."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def _move(module: PetlModule, like: Tensor, adapter_dtype: torch.dtype | None) -> None:
    """Put ``module`` on ``like``'s device in the adapter dtype (:func:`adapter_dtype_for`) and mark
    its method modules that keep another dtype than ``like``'s (``casts_to_input``)."""
    dtype = adapter_dtype_for(like.dtype, adapter_dtype)
    module.to(device=like.device, dtype=None if module.keeps_float32 else dtype)
    for sub in module.modules():
        if isinstance(sub, PetlModule):
            sub.casts_to_input = not sub.keeps_float32 and dtype != like.dtype


def _wrapper_deltas(module: AdaptedLinear | AdaptedModule) -> tuple[Delta, ...]:
    if isinstance(module, AdaptedLinear):
        return (*module.deltas.values(), *module.input_deltas.values())
    return (*module.parallel.values(), *module.sequential.values())


@torch.no_grad()
def place_like_host(model: nn.Module, adapter_dtype: torch.dtype | None = None) -> None:
    """Move every method module to the device of what it adapts, in the adapter dtype
    (:func:`adapter_dtype_for`: ``adapter_dtype`` when given, else float32 on a float16/bfloat16 host
    and the host's dtype otherwise). What it adapts: a Linear's weight for the deltas of an
    :class:`AdaptedLinear`, the wrapped module's weights for an :class:`AdaptedModule` (the model's
    when it has none), the model's own weights for any other PetlModule. Modules kept in another dtype
    than the host's compute in the input's dtype (``PetlModule.casts_to_input``). Shared tensors stay
    shared (``Module.to`` swaps their data in place). Idempotent; ``create`` and ``load_adapter`` call
    it."""
    placed: set[int] = set()
    for module in model.modules():
        if isinstance(module, (AdaptedLinear, AdaptedModule)):
            like = _reference_tensor(module.base)
            if like is None:  # a module without weights (an Identity norm): placed like the model below
                continue
            for delta in _wrapper_deltas(module):
                _move(delta, like, adapter_dtype)
                placed.update(id(m) for m in delta.modules())
    like = next((t for t in model.parameters() if t.is_floating_point()), None)
    for module in model.modules():
        if isinstance(module, PetlModule) and id(module) not in placed and like is not None:
            _move(module, like, adapter_dtype)
            placed.update(id(m) for m in module.modules())


def adapted_linears(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def adapted_wrappers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear | AdaptedModule]]:
    """Every wrapper in ``model`` (both kinds), in module order: what ``merge``/``unmerge`` visit."""
    for name, module in model.named_modules():
        if isinstance(module, (AdaptedLinear, AdaptedModule)):
            yield name, module


def _linear_blockers(name: str, module: AdaptedLinear) -> tuple[list[str], list[str]]:
    dependent = [
        f"{name}.deltas.{key} ({type(d).__name__})" for key, d in module.deltas.items() if not d.mergeable
    ]
    unfoldable = []
    for key, d in module.input_deltas.items():
        if not d.mergeable:
            dependent.append(f"{name}.input_deltas.{key} ({type(d).__name__} on a Linear's input)")
        elif module.base.bias is None and _has_shift(d):
            unfoldable.append(
                f"{name}.input_deltas.{key} ({type(d).__name__}: the Linear has no bias to take its shift)"
            )
    return dependent, unfoldable


def _folds_parallel(module: AdaptedModule, delta: Delta) -> bool:
    """Whether the parallel ``delta`` has a weight-space form with a place: mergeable, on a Conv."""
    return delta.mergeable and isinstance(module.base, FOLD_PARALLEL_TYPES)


def _module_blockers(name: str, module: AdaptedModule) -> tuple[list[str], list[str]]:
    dependent = [
        f"{name}.parallel.{key} ({type(d).__name__} on a module)"
        for key, d in module.parallel.items()
        if not _folds_parallel(module, d)
    ]
    unfoldable = []
    for key, d in module.sequential.items():
        if not d.mergeable:
            dependent.append(f"{name}.sequential.{key} ({type(d).__name__} on a module)")
            continue
        reason = _output_fold_blocker(module.base, d)
        if reason is not None:
            unfoldable.append(f"{name}.sequential.{key} ({type(d).__name__}: {reason})")
    return dependent, unfoldable


def merge_blockers(model: nn.Module) -> tuple[list[str], list[str]]:
    """What keeps ``model`` from merging, one entry per delta, in two kinds: deltas whose update depends
    on the input (no weight-space form: a delta on a module, or on a Linear without ``delta_weight`` /
    ``affine``), and deltas with a weight-space form that this host has no exact place for (a shift on
    a layer without a bias ...). Both empty when the model merges."""
    dependent: list[str] = []
    unfoldable: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            found = _linear_blockers(name, module)
        elif isinstance(module, AdaptedModule):
            found = _module_blockers(name, module)
        else:
            continue
        dependent += found[0]
        unfoldable += found[1]
    return dependent, unfoldable


def unmergeable_deltas(model: nn.Module) -> list[str]:
    """Every delta that blocks a merge of ``model`` (both kinds of :func:`merge_blockers`); empty when
    the model merges."""
    dependent, unfoldable = merge_blockers(model)
    return dependent + unfoldable


def unload_wrappers(model: nn.Module) -> int:
    """Replace every wrapper by the timm module it wraps (its updates must be merged first).

    Returns the number of wrappers removed.
    """
    count = 0
    # children before parents, so that nested wrappers resolve by name
    for name, module in reversed(list(model.named_modules())):
        if not isinstance(module, (AdaptedLinear, AdaptedModule)):
            continue
        if isinstance(module, AdaptedLinear) and len(_wrapper_deltas(module)) and not module.merged:
            raise ValueError(f"{name} holds unmerged updates; merge before unloading")
        if isinstance(module, AdaptedModule) and any(
            not _folds_parallel(module, d) for d in module.parallel.values()
        ):
            raise ValueError(f"{name} holds input-dependent deltas that cannot be unloaded")
        if isinstance(module, AdaptedModule) and len(_wrapper_deltas(module)) and not module.merged:
            raise ValueError(f"{name} holds unmerged updates; merge before unloading")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.base)
        count += 1
    for module in model.modules():  # separate q/v biases back where the host keeps them
        unfold_qkv_bias(module)
    _warn_unsaved_buffers(model)
    return count


def _warn_unsaved_buffers(model: nn.Module) -> None:
    """A merge that moved a key bias into a host's non-persistent ``k_bias`` buffer (Eva, BEiT, SwinV2
    keep no key-bias parameter): the model computes the merged function, its ``state_dict`` does not
    hold that buffer."""
    names = [
        f"{name}.k_bias"
        for name, module in model.named_modules()
        if "k_bias" in module._non_persistent_buffers_set
        and module._buffers.get("k_bias") is not None
        and not module._buffers["k_bias"].is_meta
        and bool(module._buffers["k_bias"].detach().abs().max() > 0)
    ]
    if names:
        logger.warning(
            "the merged key bias of %d attention(s) (e.g. %s) lives in the host's non-persistent k_bias "
            "buffer: this model computes the merged function, but model.state_dict() does not hold it "
            "(save the adapter, or the whole module, rather than the state dict)",
            len(names),
            names[0],
        )
