"""Binary adapters: AdaptFormer and LoRA adapters with 1-bit weights (Jie, Wang & Deng, ICCV 2023,
"Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision Redundancy").

Every adapter weight matrix ``W`` (``down`` ``[dim, d]`` and ``up`` ``[d, dim]``, no biases) is trained
in full precision and used quantised: normalised by its own mean and (unbiased) standard deviation,
mapped to the nearest of ``2^bits`` levels, and scaled back::

    mu = mean(W),  sigma = std(W),  W_n = (W - mu) / (sigma + 1e-5)
    Q(W_n) = sum_i sign(W_n - t_i) * h_i          (bits = 1: Q(W_n) = 0.6745 * sign(W_n))
    W_b = Q(W_n) + W_n - sg(W_n)                 (straight-through estimator, sg = stop-gradient)
    W_q = W_b * sigma + mu

``mu`` and ``sigma`` are not detached: the gradient reaches ``W`` through them as well as through the
straight-through ``W_n``. The levels are the fixed point of the authors' Lloyd-style iteration on the
standard normal (each level the median of its cell, the thresholds ``t_i`` the midpoints of the levels,
``h_i`` the half steps): for 1 bit the two levels are ``+-Phi^-1(0.75) = +-0.6745``; levels, thresholds
and half steps are rounded to float32, as the authors' ``QLinear.quantize`` stores them. A stored 1-bit
matrix is its sign bits plus ``mu`` and ``sigma`` (two float32): ``W_q = +-0.6745 sigma + mu``.

- ``form='adaptformer'`` (Bi-AdaptFormer, the default), parallel to the MLP of every block, reading the
  residual stream ``x`` and joining outside the host's drop-path (as ``adapter``'s ``'residual'`` form)::

      x <- x + DropPath(Mlp(norm2(x))) + s * up_q(dropout(ReLU(down_q(x))))

- ``form='lora'`` (Bi-LoRA), on the ``q`` and ``v`` output slices of the fused ``qkv``::

      q <- q + s * up_q(dropout(down_q(x))),   v <- v + s * ...     (x: the attention's input)

  mergeable: ``delta_W = s * W_q(up) W_q(down)`` from the quantised factors (in eval; the dropout sits
  between the factors, so a training step with dropout runs the delta on its own).

Init (``bits < 32``): ``down`` as ``nn.Linear`` (kaiming-uniform, ``a = sqrt(5)``), ``up`` truncated
normal (std 0.001, cut at +-0.002). Quantised, ``up`` is not zero: the model is not the identity at init.
``bits=32`` is the authors' full-precision baseline (no quantisation, ``up`` zero: the identity at init).

Checked against JieShibo/PETL-ViT @ 026e4f1, folder ``binary_adapter/``: ``utils.py`` L15-90
(``QLinear``: forward, ``quantize``), ``adaptformer.py`` L7-46 (block forward, ``Adapter``,
``set_adapter``), ``lora.py`` L7-58 (attention forward, ``Adapter`` with ``nn.Identity`` act,
``set_adapter`` on q and v), ``main.py`` L56-103 (``dim`` 32, ``bit`` 1, ``scale`` per task from
``configs/<form>/<task>-bit1-dim32.yaml``; AdamW lr 1e-3, wd 1e-4, 100 epochs, cosine with 10 warmup
epochs, drop-path 0.1, unnormalised inputs). Per-task scales: preset ``paper``
(``petl_zoo/presets/binary_adapter.yaml``).

Parity (``tests/test_binary_adapter.py``): the authors' ``QLinear``, both ``Adapter`` modules and their
block / attention forwards re-hosted on a tiny timm ViT with our tensors copied in give the same
logits and the same gradients of every adapter weight (fp64, 1e-10), 1 and 2 bits.

Counts on ViT-B/16 (head excluded; the authors' modules have the same): Bi-AdaptFormer dim 32:
``12 * 2 * 768 * 32 = 589,824`` trainable; Bi-LoRA dim 32: ``12 * 2 * 2 * 768 * 32 = 1,179,648``.

Stored size. ``save_adapter`` writes the packed form (:meth:`BinaryAdapter.stored_tensors`: per
quantised matrix its level indices packed ``8 / bits`` to a byte, lowest bits first, and ``mu``,
``sigma`` as float32), the bytes of the authors' ``.bin`` (``utils.py`` L36-51, L93-141) as safetensors
tensors: Bi-AdaptFormer dim 32 on ViT-B is ``24 * (24576 / 8 + 8) = 73,920`` bytes, with a 100-class
head 381,520 bytes, the size of the authors' ``models_bin/adaptformer/cifar-bit1-dim32.bin``; Bi-LoRA
147,840 bytes. Loading unpacks them: each matrix then holds ``W_q`` and is used as it is
(``quantize = False``, as the authors' ``fake_quan``), equal to the saved model's to the bit. Training
snapshots (resume) keep the float32 latent weights. :func:`export_packed` / :func:`load_packed` write and
read the same bytes as the authors' single file.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, fraction, positive
from ..layers import Delta, LowRank, PetlModule, adapt_linear
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, check_targets, linear_sites, module_sites
from .adapter import attach_residual_tap

__all__ = [
    "BinaryAdapterConfig",
    "BinaryLinear",
    "BinaryBottleneck",
    "BinaryLoraDelta",
    "BinaryAdapter",
    "quantizer_levels",
    "export_packed",
    "load_packed",
]

FORM_TARGETS = {"adaptformer": ("mlp",), "lora": ("q", "v")}
#: ``eps`` added to the standard deviation before normalising (the authors' ``QLinear.forward``).
EPS = 1e-5
#: The stored names of a quantised matrix's packed level indices and its ``(mu, sigma)``, after the
#: weight's ``adapter_state_dict`` name.
BITS_SUFFIX, STATS_SUFFIX = "_bits", "_stats"


@cache
def quantizer_levels(bits: int) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(levels, thresholds, half_steps)`` of the ``bits``-bit quantiser of a standard normal weight:
    500 rounds of the authors' iteration (thresholds = midpoints of the levels, each level = the median
    of its cell, ``Phi^-1`` of the mean of the cell's end probabilities), from all-zero levels; each
    rounded to float32 as the authors store them (half steps computed in float32 from the rounded
    levels)."""
    n = 2**bits
    values = torch.zeros(n, dtype=torch.float64)
    ranges = torch.zeros(n - 1, dtype=torch.float64)
    edge0, edge1 = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    for _ in range(500):
        ranges = (values[1:] + values[:-1]) / 2
        pv = torch.cat([edge0, torch.special.ndtr(ranges), edge1])
        values = torch.special.ndtri((pv[1:] + pv[:-1]) / 2)
    levels = values.float()
    half = (levels[1:] - levels[:-1]) / 2
    return tuple(levels.tolist()), tuple(ranges.float().tolist()), tuple(half.tolist())


def quantize(w: Tensor, bits: int) -> Tensor:
    """``Q(w) = sum_i sign(w - t_i) h_i`` (no gradient of its own: used through the straight-through
    estimator)."""
    _, thresholds, half = quantizer_levels(bits)
    return _sign_sum(w, thresholds, half)


def _sign_sum(w: Tensor, thresholds: tuple[float, ...], half: tuple[float, ...]) -> Tensor:
    """:func:`quantize` with its thresholds and half steps given (a module's forward passes its own
    copies: ``quantizer_levels``' cached tensor loop would break a ``torch.compile`` graph)."""
    t = torch.tensor(thresholds, dtype=w.dtype, device=w.device)
    h = torch.tensor(half, dtype=w.dtype, device=w.device)
    return (torch.sign(w.unsqueeze(-1) - t) * h).sum(-1)


@dataclass
class BinaryAdapterConfig(MethodConfig):
    """Binary adapter options (module docstring). ``form``: ``'adaptformer'`` (Bi-AdaptFormer, parallel to
    the MLP) or ``'lora'`` (Bi-LoRA on ``q``, ``v``). ``bits``: 1, 2, 4 or 8 (quantised), 32 (the
    authors' full-precision baseline). ``scale`` ``s``: per task in the authors' configs (preset
    ``paper``); 1.0, their ``main.py`` default and most common value. ``dropout``: between ``down`` and
    ``up`` (0.1 in both of the authors' forms). ``targets=None``: ``('mlp',)`` for ``adaptformer``,
    ``('q', 'v')`` for ``lora``."""

    form: Literal["adaptformer", "lora"] = "adaptformer"
    dim: int = positive(32)
    bits: Literal[1, 2, 4, 8, 32] = 1
    scale: float = 1.0
    dropout: float = fraction(0.1)
    targets: tuple[str, ...] | None = None

    def validate(self) -> None:
        if self.targets is None:
            self.targets = FORM_TARGETS[self.form]
        allowed = ("mlp",) if self.form == "adaptformer" else LINEAR_TARGETS
        self.targets = check_targets(self.targets, allowed, "binary_adapter")


def _bit_shifts(bits: int) -> np.ndarray:
    """``[1, 8 / bits]``: where each of a byte's level indices sits, lowest bits first."""
    return (np.arange(8 // bits, dtype=np.uint8) * bits)[None, :]


class BinaryLinear(PetlModule):
    """A bias-free Linear whose weight is used quantised (``W_q``, module docstring), with the
    straight-through estimator. The latent weight keeps the adapter dtype (float32 on a half-precision
    host): ``W_q`` is computed there and cast to the input's dtype for the product, so the bits do not
    depend on the host's precision. ``quantize = False`` (set by :func:`load_packed`) uses the weight as
    it is."""

    keeps_float32 = True

    def __init__(self, in_features: int, out_features: int, bits: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bits = bits
        self.quantize = bits < 32
        self._steps = quantizer_levels(bits)[1:] if self.quantize else ((), ())  # thresholds, half steps
        self.stats: tuple[float, float] | None = None  # (mu, sigma) of a loaded W_q (set_packed)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def quantized_weight(self) -> Tensor:
        w = self.weight
        if not self.quantize:
            return w
        mean, std = w.mean(), w.std()
        wn = (w - mean) / (std + EPS)
        # straight-through: the value is exactly Q(W_n) (so a packed, reloaded W_q is the same bits),
        # the gradient that of W_n
        wb = _sign_sum(wn, *self._steps).detach() + (wn - wn.detach())
        return wb * std + mean

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype))

    @torch.no_grad()
    def packed(self) -> tuple[Tensor, float, float]:
        """``(bits, mu, sigma)``: the level indices packed ``8 / bits`` to a byte (lowest bits first,
        uint8) and the float32 ``mu``, ``sigma`` of ``W_q = level * sigma + mu``. A loaded layer
        (``quantize = False`` after :meth:`set_packed`) packs the same values again."""
        w = self.weight.detach()  # in its own dtype, as the forward computes the signs
        levels = torch.tensor(quantizer_levels(self.bits)[0], dtype=w.dtype, device=w.device)
        if self.quantize:
            mean, std = w.mean(), w.std()
            nearest = quantize((w - mean) / (std + EPS), self.bits).reshape(-1, 1) - levels
            mean, std = float(mean), float(std)
        elif self.stats is not None:
            mean, std = self.stats
            nearest = w.reshape(-1, 1) - (levels * std + mean)
        else:
            raise ValueError("a full-precision BinaryLinear (bits=32) has no packed form")
        index = nearest.abs().argmin(dim=1).cpu().numpy().astype(np.uint8)
        shifts = _bit_shifts(self.bits)
        if index.size % shifts.size:
            raise ValueError(f"{index.size} weights do not fill whole bytes at {self.bits} bits")
        packed = (index.reshape(-1, shifts.size) << shifts).sum(axis=1).astype(np.uint8)
        return torch.from_numpy(packed), mean, std

    def packed_bytes(self) -> int:
        """The size of the packed level indices, in bytes."""
        return self.weight.numel() * self.bits // 8

    def check_packed(self, packed: Tensor) -> None:
        """One ValueError line unless ``packed`` has :meth:`packed`'s dtype and size for this layer."""
        if self.bits == 32 or packed.dtype != torch.uint8 or packed.numel() != self.packed_bytes():
            raise ValueError(
                f"packed weights of {packed.numel()} {packed.dtype} values do not fit a {self.bits}-bit "
                f"{tuple(self.weight.shape)} matrix ({self.packed_bytes()} uint8 expected)"
            )

    @torch.no_grad()
    def set_packed(self, packed: Tensor, mean: float, std: float) -> None:
        """Set the weight to ``level * sigma + mu`` from :meth:`packed`'s values; used as it is
        afterwards (``quantize = False``, as the authors' ``fake_quan``)."""
        self.check_packed(packed)
        index = (packed.cpu().numpy()[:, None] >> _bit_shifts(self.bits)) & np.uint8(2**self.bits - 1)
        table, thresholds, half = quantizer_levels(self.bits)
        levels = _sign_sum(torch.tensor(table), thresholds, half)  # Q's float32 values, as the forward's
        values = levels[torch.from_numpy(index.reshape(-1).astype(np.int64))] * std + mean
        self.weight.copy_(values.reshape(self.weight.shape).to(self.weight))
        self.quantize, self.stats = False, (mean, std)

    def pack(self) -> bytes:
        """:meth:`packed` in the authors' byte layout: the packed indices, then ``mu``, ``sigma`` as
        float32 (their ``QLinear.dump`` and ``save_model``)."""
        packed, mean, std = self.packed()
        return packed.numpy().tobytes() + struct.pack("<ff", mean, std)

    def packed_size(self) -> int:
        return self.packed_bytes() + 8

    def unpack(self, data: bytes) -> None:
        """:meth:`set_packed` from :meth:`pack`'s bytes."""
        n = self.packed_bytes()
        mean, std = struct.unpack("<ff", data[n : n + 8])
        self.set_packed(torch.frombuffer(bytearray(data[:n]), dtype=torch.uint8), mean, std)


class BinaryBottleneck(Delta):
    """``s * up_q(dropout(act(down_q(h))))`` (Bi-AdaptFormer: ``act`` ReLU, parallel on the residual
    stream). Input-dependent: not mergeable."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dim: int,
        bits: int,
        scale: float,
        dropout: float,
        act: bool,
    ) -> None:
        super().__init__()
        self.down = BinaryLinear(in_features, dim, bits)
        self.act = nn.ReLU() if act else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = BinaryLinear(dim, out_features, bits)
        self.scale = scale
        with torch.no_grad():
            if bits == 32:
                self.up.weight.zero_()
            else:
                nn.init.trunc_normal_(self.up.weight, mean=0.0, std=0.001, a=-0.002, b=0.002)

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class BinaryLoraDelta(BinaryBottleneck):
    """Bi-LoRA on a Linear's output slice: ``s * up_q(dropout(down_q(x)))``; ``delta_W = s W_q(up)
    W_q(down)`` (mergeable; the dropout between the factors makes a training step run it alone)."""

    mergeable = True

    def __init__(
        self, in_features: int, out_features: int, dim: int, bits: int, scale: float, dropout: float
    ):
        super().__init__(in_features, out_features, dim, bits, scale, dropout, act=False)

    def delta_weight(self, weight: Tensor) -> Tensor:
        return (self.up.quantized_weight() @ self.down.quantized_weight() * self.scale).to(weight.dtype)

    def low_rank(self, weight: Tensor) -> LowRank | None:
        drop = self.dropout
        if not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and not drop.training)):
            return None  # an active (or replaced) dropout between the factors: run the forward
        up = self.up.quantized_weight() * self.scale
        return LowRank(self.down.quantized_weight().to(weight.dtype), up.to(weight.dtype))


@register_method(
    "binary_adapter",
    "Binary adapters (Bi-AdaptFormer / Bi-LoRA): 1-bit adapter weights, sign + mean/std, straight-through",
)
class BinaryAdapter(Method):
    """Bi-AdaptFormer (default) or Bi-LoRA (module docstring). The authors' recipe is the shared VTAB one
    except for the unnormalised inputs (``protocol: vtab``) and seed 42, set by the preset."""

    config_class = BinaryAdapterConfig
    identity_at_init = False  # the quantised up-projection is not zero (bits=32 aside)
    recipe: dict = {}

    def apply(self, model: nn.Module) -> None:
        cfg: BinaryAdapterConfig = self.config
        if cfg.form == "adaptformer":
            for site in module_sites(model, "mlp"):
                delta = BinaryBottleneck(
                    site.in_features, site.in_features, cfg.dim, cfg.bits, cfg.scale, cfg.dropout, act=True
                )
                attach_residual_tap(model, site.block, "mlp").parallel["binary_adapter"] = delta
            return
        for target in cfg.targets:
            for site in linear_sites(model, target):
                delta = BinaryLoraDelta(
                    site.in_features, site.out_features, cfg.dim, cfg.bits, cfg.scale, cfg.dropout
                )
                adapt_linear(site).add_delta(f"binary_{site.target}", delta, site.start, site.stop)

    def stored_tensors(self, model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each quantised matrix as ``<name>.weight_bits`` (its packed level indices, uint8) and
        ``<name>.weight_stats`` (``mu``, ``sigma``, float32) instead of its float32 latent weight: the
        bytes of the authors' ``.bin`` (module docstring). ``bits=32`` layers stay float."""
        stored = dict(state)
        for name, layer in _named_binary_linears(model):
            key = f"{name}.weight"
            if key in stored and layer.bits < 32:
                packed, mean, std = layer.packed()
                del stored[key]
                stored[key + BITS_SUFFIX] = packed
                stored[key + STATS_SUFFIX] = torch.tensor([mean, std], dtype=torch.float32)
        return stored

    def loaded_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unpack :meth:`stored_tensors`' matrices into their layers (each then holds ``W_q``, used as it
        is) and return the tensors under ``adapter_state_dict``'s names; latent weights (a training
        snapshot) pass through."""
        loaded = dict(tensors)
        for name, layer in _named_binary_linears(model):
            key = f"{name}.weight"
            if key + BITS_SUFFIX not in loaded:
                continue
            packed, stats = loaded.pop(key + BITS_SUFFIX), loaded.pop(key + STATS_SUFFIX, None)
            if stats is None or stats.numel() != 2:
                raise ValueError(f"{key + STATS_SUFFIX} (mu, sigma) is missing or not 2 values")
            if packed.is_meta or stats.is_meta:  # a shape check (petl_zoo.hub's): nothing to unpack
                layer.check_packed(packed)
                loaded[key] = torch.empty_like(layer.weight, device="meta")
                continue
            mean, std = (float(v) for v in stats.float())
            layer.set_packed(packed, mean, std)
            loaded[key] = layer.weight.detach()
        return loaded


def _named_binary_linears(model: nn.Module) -> list[tuple[str, BinaryLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BinaryLinear)]


def _binary_linears(model: nn.Module) -> list[BinaryLinear]:
    return [m for _, m in _named_binary_linears(model)]


def export_packed(model: nn.Module, head: bool = False) -> bytes:
    """The quantised adapter as bytes, in the authors' layout (module docstring): every
    :class:`BinaryLinear` in model order (packed level indices, ``mu``, ``sigma``), then with ``head``
    the classifier's weight and bias as float32."""
    out = io.BytesIO()
    for layer in _binary_linears(model):
        out.write(layer.pack())
    if head:
        classifier = model.get_classifier()
        for tensor in (classifier.weight, classifier.bias):
            out.write(tensor.detach().float().cpu().numpy().astype("<f4").tobytes())
    return out.getvalue()


def load_packed(model: nn.Module, data: bytes, head: bool = False) -> nn.Module:
    """Load :func:`export_packed`'s bytes into a model patched with the same options; every quantised
    matrix then holds ``W_q`` and is used as it is. Returns ``model``."""
    for layer in _binary_linears(model):
        n = layer.packed_size()
        layer.unpack(data[:n])
        data = data[n:]
    if head:
        classifier = model.get_classifier()
        with torch.no_grad():
            for tensor in (classifier.weight, classifier.bias):
                n = tensor.numel() * 4
                values = np.frombuffer(data[:n], dtype="<f4").copy()
                tensor.copy_(torch.from_numpy(values).reshape(tensor.shape).to(tensor))
                data = data[n:]
    if data:
        raise ValueError(f"{len(data)} bytes left over: the data does not match this model's adapters")
    return model
