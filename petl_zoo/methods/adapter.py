"""Bottleneck adapters: AdaptFormer's parallel and sequential adapters, Houlsby's adapter and Adapter+.

- ``style='parallel'`` (AdaptFormer, Chen et al., 2022), on the MLP of every block::

      x <- x + DropPath(LS(Mlp(norm2(x)))) + s * up(ReLU(down(x)))

  with ``adapter_input='residual'`` (the default): the adapter reads the block's residual stream ``x``
  *before* ``norm2`` and its output joins the residual stream outside the host's drop-path ``DropPath``
  and layer scale ``LS`` (the authors' ``Block.forward``, ``models/custom_modules.py`` of
  ShoufaChen/AdaptFormer @ 6967d67, with ``ffn_adapter_layernorm_option="none"`` in ``main_image.py``:
  ``adapt_x = adaptmlp(x)`` before ``norm2``, ``x = drop_path(mlp(norm2(x))) + adapt_x``; their block has
  no layer scale, so ``LS`` stays on the MLP branch only, like the drop-path). We follow the authors
  rather than OSU's PETL_Vision (``drop_path2(ls2(mlp + adapter))``): a dropped MLP branch keeps its
  adapter, and on layer-scale hosts (DeiT-III, DINOv2, EVA, BEiT) ``s`` keeps its meaning instead of
  being multiplied by the host's learned per-channel ``gamma``. ``down``: ``Linear(d, dim)``
  (kaiming-uniform, bias 0), ``up``: ``Linear(dim, d)`` zero-initialised with its bias, so the model is
  unchanged at init; ``s = 0.1`` (AdaptFormer's VTAB value). On res-post-norm blocks (SwinV2, SwinV2-Cr,
  ``ResPostBlock``, ``EvaBlockPostNorm``) the MLP reads ``x`` itself: the adapter reads the same ``x`` and
  still joins outside the branch's post-norm and drop-path. ``targets=('attn',)`` does the same around
  attention (``norm1``, ``drop_path1``); not on windowed post-norm hosts, whose attention sees windows.
  ``adapter_input='norm'`` is the form petl_zoo shipped before: the adapter reads the MLP's input
  ``h = norm2(x)`` and is added to the MLP output, inside ``LS`` and ``DropPath``
  (``x + DropPath(LS(Mlp(h) + s * up(ReLU(down(h)))))``).
- ``style='sequential'`` (AdaptFormer's sequential variant, Chen et al., 2022), on the MLP of every
  block::

      y <- DropPath(LS(Mlp(norm2(x)))),   x <- x + y + s * up(dropout(ReLU(down(y))))

  with ``adapter_input='branch'`` (the default): the adapter reads the branch output ``y`` *after* the
  host's drop-path (the authors' ``Block.forward`` with ``ffn_option == 'sequential'``:
  ``x = drop_path(fc2(...))``, then ``x = adaptmlp(x)`` = ``x + s * up(dropout(ReLU(down(x))))``, then
  ``residual + x``; ShoufaChen/AdaptFormer @ 6967d67, ``models/custom_modules.py`` L76-94 and
  ``models/adapter.py`` L50-70). Their block has no layer scale: we keep the adapter after ``LS`` too,
  where the Houlsby placement below puts it. Their defaults as ``main_image.py`` (L185-191) sets them
  for both options: ``s = 0.1``, LoRA init (``up`` zero), no LayerNorm, ``Adapter(dropout=0.1)``.
  (Their released script runs ``ffn_option="parallel"``; the sequential branch is the paper's ablation.)
  ``adapter_input='sublayer'`` is the form petl_zoo shipped before: the adapter on the sub-layer's
  output ``m``, inside ``LS`` and ``DropPath`` (``x + DropPath(LS(m + s * up(ReLU(down(m)))))``); the
  two agree on hosts without layer scale in eval mode and differ on layer-scale hosts (DeiT-III,
  DINOv2, EVA) and under drop-path.
- ``style='houlsby'`` (Houlsby et al., 2019, as Adapter+'s authors run it), after attention and after
  the MLP of every block::

      y <- DropPath(LS(Attn(norm1(x)))),  x <- x + y + s * DropPath_a(up(GELU(down(y))))
      y <- DropPath(LS(Mlp(norm2(x)))),   x <- x + y + s * DropPath_a(up(GELU(down(y))))

  ``s = 1``, Houlsby init (as ``plus``), no LayerNorm, no dropout, the adapter's own drop-path ``0.1``.
  Checked against visinf/adapter_plus @ 191c4ab: ``AdapterBlock.forward_houlsby``
  (``adapter_plus/vit_adapter.py`` L294-298: ``y = drop_path1(ls1(attn(norm1(x))))``,
  ``x = x + adapter_attn(y, skip=y)``, the same with ``drop_path2``/``ls2``/``mlp``/``adapter``),
  ``Adapter.__init__``/``forward`` (L19-102) and ``conf/adapter/houlsby.yaml`` over
  ``base_adapter.yaml`` (``config: houlsby``, ``attn_adapter: true``, ``act_layer: true`` -> the ViT's
  GELU, ``norm_layer: false``, ``bias: true``, ``init: houlsby``, ``scaling: 1.0``, ``dim: 8``,
  ``dropout: 0``, ``drop_path: 0.1``; their ``houlsby_dim8`` experiment says the same and also trains the
  backbone's LayerNorms, ``train_ln: true``, which this method does not).
- ``style='plus'`` (Adapter+, Steitz & Roth, 2024), after every block (post-FFN, on the residual
  stream)::

      x <- x + s * DropPath_a(up(GELU(down(x))))

  ``s`` a learned per-channel scale (init 1), Houlsby init (``down`` and ``up`` weights truncated normal,
  std 0.01 cut at +-2 std; biases 0), no LayerNorm, adapter drop-path ``0.1`` (its own, not the host's).
  Not the identity at init (``up`` is not zero). Checked against ``Adapter`` and
  ``AdapterBlock.forward_post`` of visinf/adapter_plus @ 191c4ab (``adapter_plus/vit_adapter.py``,
  ``conf/adapter/adapter_plus.yaml`` and ``base_adapter.yaml``). Per-task dims: the ``paper_plus``
  preset (``petl_zoo/presets/adapter_plus.yaml``).

VTAB-1K setting: dim 8 on the MLP of every block: ``12 * (768*8 + 8 + 8*768 + 768) = 156,768``
trainable parameters on ViT-B/16 (head excluded; ``parallel`` and ``sequential``); Houlsby has two
adapters per block: 313,536; Adapter+ adds the 768 scales per block to one: 165,984.
Not mergeable: the update depends on the input.

Saved adapters record ``adapter_input``; parallel folders saved before it existed were trained with
the ``'norm'`` form and load as ``'norm'``, sequential ones (``adapter_input`` None) with the
``'sublayer'`` form and ``s = 1`` and load so (:meth:`Adapter.upgrade_options`).

Parity (``tests/test_adapter.py``): the authors' AdaptFormer adapter and block math (both options),
the Adapter+ module with ``forward_post`` and with ``forward_houlsby`` (also on a layer-scale host),
re-hosted on tiny timm ViTs with our weights copied in, give the same
logits (fp64, 1e-10), in eval and in train mode with drop-path from the same seed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from ..config import MethodConfig, fraction, positive
from ..layers import AdaptedModule, Delta, Wrapper, adapt_module
from ..registry import Method, register_method
from ..targets import BlockInfo, check_targets, family_of, module_sites
from .repadapter import POST_NORM_BLOCKS

_Tap = TypeVar("_Tap", bound=nn.Module)

__all__ = [
    "AdapterConfig",
    "BottleneckAdapter",
    "HoulsbyAdapter",
    "PlusAdapter",
    "ResidualTap",
    "BranchTap",
    "ResidualInject",
    "attach_residual_tap",
    "attach_branch_tap",
    "Adapter",
    "ACTIVATIONS",
]

logger = logging.getLogger(__name__)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
ADAPTER_TARGETS = ("mlp", "attn")
#: Per target: the index of its norm in ``HostFamily.norms`` and the drop-path after the sub-layer.
_BRANCHES = {"attn": (0, "drop_path1"), "mlp": (1, "drop_path2")}
#: Per style: the values of ``adapter_input`` it takes, the default first (``plus`` reads the block output).
_INPUTS = {
    "parallel": ("residual", "norm"),
    "sequential": ("branch", "sublayer"),
    "houlsby": ("branch", "sublayer"),
    "plus": (),
}


@dataclass
class AdapterConfig(MethodConfig):
    """Adapter options (module docstring).

    ``style``: ``'parallel'`` (AdaptFormer), ``'sequential'`` (AdaptFormer's sequential variant),
    ``'houlsby'`` (Houlsby, as Adapter+'s authors run it) or ``'plus'`` (Adapter+). ``targets=None``:
    ``('attn', 'mlp')`` for ``houlsby``, ``('mlp',)`` otherwise. ``adapter_input`` (what the adapter
    reads; None resolves to the first): ``'residual'`` or ``'norm'`` for ``parallel``, ``'branch'`` (after
    the host's layer scale and drop-path) or ``'sublayer'`` (the sub-layer output, inside them) for
    ``sequential`` and ``houlsby``, none for ``plus``. ``scale=None``: 0.1 for the AdaptFormer styles,
    1.0 for ``houlsby``, and for ``plus`` the init of its learned per-channel scale (1.0). ``act=None``:
    ReLU, GELU for ``houlsby`` and ``plus``. ``drop_path=None``: the adapter's own drop-path, 0.1 for
    ``houlsby`` and ``plus``, 0 otherwise. ``dropout=None``: 0.1 for the AdaptFormer styles (the
    authors' ``Adapter(dropout=0.1)`` in ``Block.__init__``), 0 for ``houlsby`` and ``plus`` (Adapter+'s
    ``base_adapter.yaml``: ``dropout: 0``).
    """

    dim: int = positive(8)
    scale: float | None = None
    style: Literal["parallel", "sequential", "houlsby", "plus"] = "parallel"
    targets: tuple[str, ...] | None = None
    act: Literal["relu", "gelu", "silu", "tanh"] | None = None
    dropout: float | None = fraction(None)
    adapter_input: Literal["residual", "norm", "branch", "sublayer"] | None = None
    drop_path: float | None = fraction(None)

    def validate(self) -> None:
        # resolved values are stored, so that saved configs say what ran
        if self.targets is None:
            self.targets = ("attn", "mlp") if self.style == "houlsby" else ("mlp",)
        check_targets(self.targets, ADAPTER_TARGETS, "adapter")
        if self.style == "plus" and tuple(self.targets) != ("mlp",):
            raise ValueError(
                f"style='plus' sits after the MLP only: targets must be ('mlp',), got {self.targets}"
            )
        inputs = _INPUTS[self.style]
        if self.adapter_input is not None and self.adapter_input not in inputs:
            takes = f"takes {' or '.join(map(repr, inputs))}" if inputs else "reads the block output"
            raise ValueError(
                f"adapter_input={self.adapter_input!r} does not apply to style={self.style!r}, which {takes}"
            )
        if self.adapter_input is None and inputs:
            self.adapter_input = inputs[0]
        houlsby_like = self.style in ("houlsby", "plus")
        if self.act is None:
            self.act = "gelu" if houlsby_like else "relu"
        if self.drop_path is None:
            self.drop_path = 0.1 if houlsby_like else 0.0
        if self.dropout is None:
            self.dropout = 0.0 if houlsby_like else 0.1

    @property
    def resolved_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        return 1.0 if self.style in ("houlsby", "plus") else 0.1


class _Bottleneck(Delta):
    """``s * drop_path(up(dropout(act(down(h)))))``: the layers of a bottleneck adapter, built in this
    order; ``_scale`` gives ``s`` and ``_init`` initialises ``down`` and ``up`` (per kind)."""

    def __init__(
        self, features: int, dim: int, scale: float, act: str, dropout: float, drop_path: float
    ) -> None:
        super().__init__()
        self.down = nn.Linear(features, dim)
        self.act = ACTIVATIONS[act]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(dim, features)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scale = self._scale(features, scale)
        self._init()

    def _scale(self, features: int, scale: float) -> float | nn.Parameter:
        return scale

    def _init(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, h: Tensor, weight: Tensor | None) -> Tensor:
        return self.drop_path(self.up(self.dropout(self.act(self.down(h))))) * self.scale


class BottleneckAdapter(_Bottleneck):
    """The update ``s * up(act(down(h)))`` of a bottleneck adapter; ``up`` starts at zero (AdaptFormer's
    LoRA init).

    Attached in parallel (``h`` is the module's input, or the residual stream through a
    :class:`ResidualTap`) or sequentially (``h`` is a sub-layer's output, or the branch output through a
    :class:`BranchTap`, and ``h`` is added back: ``out = h + s * up(act(down(h)))``). ``drop_path`` is
    the adapter's own, on its output. Input-dependent: not mergeable.
    """

    def __init__(
        self,
        features: int,
        dim: int,
        scale: float,
        act: str = "relu",
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__(features, dim, scale, act, dropout, drop_path)

    def _init(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)


class HoulsbyAdapter(_Bottleneck):
    """Houlsby's adapter as Adapter+'s authors build it: ``s * DropPath(up(act(down(y))))`` with a fixed
    ``s`` and Houlsby init (``down`` and ``up`` weights truncated normal, std 0.01 cut at +-0.02; biases
    0: their ``Adapter.__init__``, ``init == 'houlsby'``). Sequential: ``y`` is added back. Not the
    identity at init; input-dependent: not mergeable."""

    def _init(self) -> None:
        std = 0.01
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(layer.bias)


class PlusAdapter(HoulsbyAdapter):
    """Adapter+: ``s * DropPath(up(act(down(x))))`` with a learned per-channel ``s`` (init ``scale``),
    Houlsby init (truncated normal, std 0.01, cut at +-0.02; biases 0). A sequential delta on a block:
    the wrapper adds the block output ``x`` back. Input-dependent: not mergeable."""

    def _scale(self, features: int, scale: float) -> nn.Parameter:
        return nn.Parameter(torch.full((features,), float(scale)))


class ResidualTap(AdaptedModule):
    """Wraps the module that reads a block's residual stream ``x`` for one branch (``norm2`` before the
    MLP, or the MLP itself on res-post-norm blocks): returns its output unchanged and keeps ``x`` for
    the :class:`ResidualInject` after the branch, which adds ``sum_i d_i(x)`` there.

    The deltas live in ``parallel`` (they read this module's input), so placement, saving and the merge
    check see them as input-dependent updates on a module.
    """

    def __init__(self, base: nn.Module, where: str) -> None:
        super().__init__(base)
        self.where = where
        self.pending: Tensor | None = None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        self.pending = x
        return self.base(x, *args, **kwargs)

    def finish(self, out: Tensor) -> Tensor:
        """The branch output after its drop-path, plus ``sum_i d_i(x)`` (:class:`ResidualInject`)."""
        update = self.update()
        return out if update is None else out + update

    def update(self) -> Tensor:
        """``sum_i d_i(x)`` for the residual stream this tap saw last (consumed)."""
        x, self.pending = self.pending, None
        if x is None:
            raise RuntimeError(
                f"adapter: the branch after {self.where} ran before it (the block's forward changed)"
            )
        total = None
        for delta in self.parallel.values():
            d = delta(x, None)
            total = d if total is None else total + d
        return total


class BranchTap(AdaptedModule):
    """Wraps a block's sub-layer (attention or MLP) as the home of the sequential adapters that read the
    branch output ``y = DropPath(LS(sub-layer))`` (``adapter_input='branch'``): the sub-layer runs
    unchanged, and the :class:`ResidualInject` on the branch's drop-path returns
    ``y + sum_i d_i(y)`` (deltas applied in turn, as :class:`AdaptedModule` applies sequential ones).

    The deltas live in ``sequential`` of the sub-layer's wrapper, so placement (the sub-layer's dtype and
    device), saving and the merge check see them as input-dependent updates on a module.
    """

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.base(x, *args, **kwargs)

    def finish(self, out: Tensor) -> Tensor:
        for delta in self.sequential.values():
            out = out + delta(out, None)
        return out


class ResidualInject(Wrapper):
    """Wraps a block's drop-path after a branch: ``tap.finish(DropPath(y))``, the adapters' output
    outside the host's drop-path and layer scale: ``DropPath(y) + sum_i d_i(x)`` for a
    :class:`ResidualTap` (the authors' AdaptFormer block), ``y' + sum_i d_i(y')`` with
    ``y' = DropPath(y)`` for a :class:`BranchTap` (AdaptFormer's sequential and Adapter+'s Houlsby
    block)."""

    def __init__(self, drop_path: nn.Module, tap: ResidualTap | BranchTap) -> None:
        super().__init__()
        self.base = drop_path
        object.__setattr__(self, "tap", tap)  # not a child: the tap lives on the sub-layer or its norm

    def forward(self, x: Tensor) -> Tensor:
        return self.tap.finish(self.base(x))


def _is_post_norm(model: nn.Module, info: BlockInfo) -> bool:
    return family_of(model).post_norm or type(info.module).__name__ in POST_NORM_BLOCKS


def attach_residual_tap(model: nn.Module, info: BlockInfo, target: str) -> ResidualTap:
    """The :class:`ResidualTap` of ``target``'s branch in block ``info`` (with its inject), created on
    first use: the norm before the sub-layer, or the sub-layer itself on res-post-norm blocks."""
    family = family_of(model)
    norm_index, drop_name = _BRANCHES[target]
    block = info.module
    post_norm = _is_post_norm(model, info)
    if post_norm and target == "attn" and family.windowed:
        raise ValueError(
            f"adapter_input='residual' on attention needs the residual stream, but the res-post-norm {type(block).__name__} "
            f"of {info.path} feeds its attention windows; use targets=('mlp',) or adapter_input='norm'"
        )
    attr = (family.attn if target == "attn" else family.mlp) if post_norm else family.norms[norm_index]
    current = getattr(block, attr, None)
    if isinstance(current, ResidualTap):
        return current
    if current is None or not isinstance(getattr(block, drop_name, None), nn.Module):
        raise ValueError(
            f"adapter_input='residual' needs '{attr}' and '{drop_name}' in the {type(block).__name__} of "
            f"{info.path}; use adapter_input='norm'"
        )
    return _install_tap(block, attr, drop_name, ResidualTap(current, f"{info.path}.{attr}"))


def attach_branch_tap(model: nn.Module, info: BlockInfo, target: str) -> BranchTap:
    """The :class:`BranchTap` of ``target``'s branch in block ``info`` (with its inject on the branch's
    drop-path), created on first use."""
    family = family_of(model)
    _, drop_name = _BRANCHES[target]
    block = info.module
    attr = family.attn if target == "attn" else family.mlp
    current = getattr(block, attr, None)
    if isinstance(current, BranchTap):
        return current
    if current is None or not isinstance(getattr(block, drop_name, None), nn.Module):
        raise ValueError(
            f"adapter_input='branch' needs '{attr}' and '{drop_name}' in the {type(block).__name__} of "
            f"{info.path}; use adapter_input='sublayer'"
        )
    return _install_tap(block, attr, drop_name, BranchTap(current))


def _install_tap(block: nn.Module, attr: str, drop_name: str, tap: _Tap) -> _Tap:
    """Put ``tap`` in place of the block's ``attr`` and its inject on the branch's drop-path ``drop_name``
    (the inject adds what the tap's adapters computed to the drop-path's output)."""
    setattr(block, attr, tap)
    setattr(block, drop_name, ResidualInject(getattr(block, drop_name), tap))
    return tap


@register_method(
    "adapter",
    "Bottleneck adapters: AdaptFormer parallel (default) or sequential, Houlsby (houlsby) or Adapter+ (plus)",
)
class Adapter(Method):
    """Bottleneck adapters (module docstring). ``identity_at_init`` holds for the AdaptFormer styles
    (``parallel``, ``sequential``); ``houlsby`` and ``plus`` start from their Houlsby init, not from the
    identity."""

    config_class = AdapterConfig
    identity_at_init = True

    @classmethod
    def upgrade_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Folders saved before ``adapter_input`` existed ran the parallel adapter on ``norm2(x)``;
        sequential folders saved before it applied to them (``adapter_input`` None) ran on the sub-layer
        output with ``s = 1``."""
        style = options.get("style", "parallel")
        if style == "parallel" and "adapter_input" not in options:
            logger.info(
                "adapter: a folder without adapter_input loads as adapter_input='norm' (its saved form)"
            )
            return {**options, "adapter_input": "norm"}
        if style == "sequential" and options.get("adapter_input") is None:
            logger.info(
                "adapter: a sequential folder without adapter_input loads as adapter_input='sublayer' "
                "with scale 1.0 unless saved (its saved form)"
            )
            scale = 1.0 if options.get("scale") is None else options["scale"]
            return {**options, "adapter_input": "sublayer", "scale": scale}
        return options

    def apply(self, model: nn.Module) -> None:
        cfg: AdapterConfig = self.config
        if cfg.style == "plus":
            for site in module_sites(model, "block"):
                wrapper = adapt_module(site)
                adapter = PlusAdapter(
                    site.in_features, cfg.dim, cfg.resolved_scale, cfg.act, cfg.dropout, cfg.drop_path
                )
                wrapper.sequential["adapter"] = adapter
            return
        kind = HoulsbyAdapter if cfg.style == "houlsby" else BottleneckAdapter
        for target in cfg.targets:
            for site in module_sites(model, target):
                adapter = kind(
                    site.in_features, cfg.dim, cfg.resolved_scale, cfg.act, cfg.dropout, cfg.drop_path
                )
                if cfg.adapter_input == "branch":
                    attach_branch_tap(model, site.block, target).sequential["adapter"] = adapter
                elif cfg.adapter_input == "sublayer":
                    adapt_module(site).sequential["adapter"] = adapter
                elif cfg.adapter_input == "norm":
                    adapt_module(site).parallel["adapter"] = adapter
                else:
                    attach_residual_tap(model, site.block, target).parallel["adapter"] = adapter
