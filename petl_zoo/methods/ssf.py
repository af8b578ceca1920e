"""SSF: scaling and shifting the features after every operation (Lian et al., 2022).

At every site, per channel of the site's output ``m``::

    y = gamma * m + beta,      gamma ~ N(1, 0.02),  beta ~ N(0, 0.02)

Sites, in forward order (the authors' ``tuning_mode='ssf'`` models): the patch-embedding conv's output
(before the class token and position embedding) and the patch embedding's own norm when it has one
(Swin); in every block the outputs of ``norm1``, the fused ``qkv`` (``q_proj``/``k_proj``/``v_proj``
when separate), ``proj``, ``norm2``, ``fc1`` (before the activation; SwiGLU's ``fc1_g`` and ``fc1_x``)
and ``fc2``; the output of the model's ``norm``, on every token before pooling. Where ``norm`` is an
Identity and the final LayerNorm is ``fc_norm`` after pooling (``global_pool='avg'`` ViTs, EVA, BEiT),
that last site still sits after the Identity ``norm``, before pooling and ``fc_norm``, as in the
authors' ``forward_features`` (``after_fc_norm=True`` moves it after ``fc_norm``: mergeable, but not
their function). Swin's patch merging gets no SSF in the authors' code (``patch_merging=True`` adds one
after its norm, see :class:`SsfConfig`). Other norms (CLIP's ``norm_pre``, EVA's sub-LNs inside
attention and the MLP, SwinV2-Cr's stage-end ``norm3``) have no SSF in the authors' models and get
none here. Res-post-norm blocks (SwinV2, SwinV2-Cr) get the same sites: SSF follows each operation
wherever the host puts it.

**Not the identity at initialisation** (as in the paper): gamma and beta start as N(1, 0.02) and
N(0, 0.02) draws, so the initial model is a small random perturbation of the backbone
(``identity_at_init = False``; ``init_std=0`` starts at the identity).

Parameterisation: each site stores ``scale_offset = gamma - 1`` and ``shift = beta`` (same distribution
as the authors' draws, N(0, 0.02) each), so that the update ``scale_offset * m + shift`` is a
sequential :class:`~petl_zoo.layers.Delta` on the layer producing ``m`` and weight decay, which
petl_zoo's trainer applies to every trainable tensor, pulls towards the identity rather than towards
``gamma = 0``. (The authors' optimiser excludes 1-D tensors from weight decay: only the head weight is
decayed there.)

Mergeable: ``gamma * (W x + b) + beta = (gamma W) x + (gamma b + beta)`` for the Linears and the patch
conv (rows / output channels of ``W``), ``gamma * (a * x_hat + c) + beta`` into a LayerNorm's affine
``(a, c)``; the wrapper keeps the original weights while merged, so unmerging is exact. A site whose
layer has no bias blocks the merge (the shift would need a tensor the plain timm model lacks): CLIP's
patch conv, EVA's ``k_proj`` with ``qkv_fused=False``; so does the authors' last site on ``fc_norm``
hosts (an Identity has nothing to fold into, and ``fc_norm`` normalises what the site feeds it).

Trainable parameters on ViT-B/16 (head excluded): ``2 * 768`` (patch) + ``12 * 16,896`` (blocks: two
norms 2 * 1,536, qkv 4,608, proj 1,536, fc1 6,144, fc2 1,536) + ``2 * 768`` (final site) = 205,824,
token- or average-pooled. Swin-B: 267,264 (274,432 with ``patch_merging=True``).

Compared with the authors' code (``dongzelian/SSF`` @ e94e0e7). ``models/vision_transformer.py``:
``init_ssf_scale_shift`` L378-385, ``ssf_ada`` L388-395, the sites in ``PatchEmbed.forward`` L358-374,
``Attention.forward`` L196-213, ``Mlp.forward`` L157-170, ``Block.forward`` L252-255; the last one in
``forward_features`` L531-533, after ``self.norm``, which is an Identity when ``use_fc_norm`` (L436,
L468), while ``fc_norm`` (L471, applied after pooling in ``forward_head`` L537-541) gets none.
``models/swin_transformer.py``: ``PatchMerging`` creates and applies its SSF only when
``tuning_mode == 'ssf'`` (L397, L421), but ``BasicLayer`` passes it the per-block list
(``tuning_mode=tuning_mode``, L477; the list is ``tuning_mode_list[i_layer]``, L619 and L640), so the
check is false and patch merging has no SSF in the models they trained. Their forward, re-hosted on
tiny timm ViTs (token-pooled; average-pooled with ``fc_norm``; average-pooled with ``norm``) and a tiny
Swin with our gamma and beta copied in, gives the same logits in fp64 (``tests/test_ssf.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import MethodConfig, non_negative
from ..layers import Affine, Delta, adapt_child
from ..registry import Method, register_method
from ..targets import family_of, iter_blocks, linear_sites

__all__ = ["SsfConfig", "SsfDelta", "SsfSite", "Ssf", "ssf_sites"]


@dataclass
class SsfConfig(MethodConfig):
    """SSF options. ``init_std``: the std of the N(1, std) scale and N(0, std) shift draws (the authors'
    0.02; 0 starts at the identity).

    ``patch_merging``: also scale and shift after the norm of Swin's patch merging (before its
    reduction). The paper scales and shifts after every operation and the authors' ``PatchMerging`` has
    the code for it, but their ``BasicLayer`` disables it (it passes the per-block ``tuning_mode`` list,
    so ``tuning_mode == 'ssf'`` is false): off, as in the released code.

    ``after_fc_norm``: on hosts whose final LayerNorm is ``fc_norm`` after pooling (``norm`` an
    Identity), put the last scale/shift after ``fc_norm`` instead of before pooling (after the Identity
    ``norm``, the authors' place). Off by default; on, the model merges into a plain timm model, which
    the authors' place cannot (an Identity has no weights, and ``fc_norm`` normalises the shift away)."""

    init_std: float = non_negative(0.02)
    patch_merging: bool = False
    after_fc_norm: bool = False


class SsfDelta(Delta):
    """SSF at one site: ``y = (1 + scale_offset) * m + shift`` per channel of ``m``.

    The update is ``scale_offset * m + shift`` (``affine() = (scale_offset, shift)``), broadcast over
    dim ``channel_dim`` of ``m`` (-1 for tokens, 1 for a conv's NCHW output)."""

    mergeable = True

    def __init__(self, channels: int, channel_dim: int = -1, init_std: float = 0.02) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.scale_offset = nn.Parameter(torch.empty(channels))
        self.shift = nn.Parameter(torch.empty(channels))
        nn.init.normal_(self.scale_offset, mean=0.0, std=init_std)
        nn.init.normal_(self.shift, mean=0.0, std=init_std)

    @property
    def gamma(self) -> Tensor:
        """The authors' ``ssf_scale``: ``1 + scale_offset``."""
        return 1 + self.scale_offset

    @property
    def beta(self) -> Tensor:
        """The authors' ``ssf_shift``."""
        return self.shift

    def forward(self, m: Tensor, weight: Tensor | None) -> Tensor:
        scale, shift = self.scale_offset, self.shift
        if self.channel_dim != -1:
            trailing = m.dim() - 1 - self.channel_dim % m.dim()
            scale = scale.view(-1, *([1] * trailing))
            shift = shift.view(-1, *([1] * trailing))
        return m * scale + shift

    def affine(self) -> Affine:
        return self.scale_offset, self.shift


@dataclass(frozen=True)
class SsfSite:
    """One place SSF scales and shifts: the output of the module at ``parent.attr`` (``path``), with
    ``channels`` channels on dim ``channel_dim``; ``before_adapt`` is a Linear site's preparation step
    (separate q/v biases folded into ``qkv``, see :mod:`petl_zoo.targets`)."""

    path: str
    parent: nn.Module
    attr: str
    channels: int
    channel_dim: int = -1
    before_adapt: Callable[[], None] | None = None


def _is_present(module: nn.Module | None) -> bool:
    return module is not None and not isinstance(module, nn.Identity)


def _norm_site(parent: nn.Module, attr: str, path: str) -> list[SsfSite]:
    """The site after the norm ``parent.attr`` (none when it is missing or an Identity)."""
    norm = getattr(parent, attr, None)
    if not _is_present(norm):
        return []
    shape = getattr(norm, "normalized_shape", None)
    weight = getattr(norm, "weight", None)
    if shape is not None:
        channels = int(shape[-1])
    elif isinstance(weight, Tensor):
        channels = weight.shape[0]
    else:
        raise ValueError(f"cannot tell the channels of {path} ({type(norm).__name__}) for SSF")
    return [SsfSite(path, parent, attr, channels)]


def _patch_sites(model: nn.Module) -> list[SsfSite]:
    patch = getattr(model, "patch_embed", None)
    proj = getattr(patch, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ValueError(
            f"SSF expects a patch embedding with a Conv2d 'proj'; {type(model).__name__}.patch_embed has "
            f"{type(proj).__name__}"
        )
    conv = SsfSite("patch_embed.proj", patch, "proj", proj.out_channels, channel_dim=1)
    return [conv, *_norm_site(patch, "norm", "patch_embed.norm")]


def _final_norm_sites(model: nn.Module, after_fc_norm: bool) -> list[SsfSite]:
    """The site after the model's ``norm``. Where ``norm`` is an Identity and ``fc_norm`` (after pooling)
    is the final LayerNorm, the site stays on the Identity's output, every token before pooling (the
    authors' place), or moves after ``fc_norm`` with ``after_fc_norm``."""
    if _is_present(getattr(model, "norm", None)):
        return _norm_site(model, "norm", "norm")
    fc_norm = _norm_site(model, "fc_norm", "fc_norm")
    if not fc_norm or after_fc_norm or not isinstance(getattr(model, "norm", None), nn.Identity):
        return fc_norm
    return [SsfSite("norm", model, "norm", fc_norm[0].channels)]


def _downsample_sites(model: nn.Module, blocks_path: str) -> list[SsfSite]:
    """The norm of the patch merging that opens a hierarchical stage (Swin's ``downsample.norm``)."""
    stage_path = blocks_path.rpartition(".")[0]
    if not stage_path:
        return []
    downsample = getattr(model.get_submodule(stage_path), "downsample", None)
    if not _is_present(downsample):
        return []
    return _norm_site(downsample, "norm", f"{stage_path}.downsample.norm")


def _attention_targets(model: nn.Module) -> tuple[str, ...]:
    family = family_of(model)
    attn = getattr(iter_blocks(model)[0].module, family.attn)
    return ("qkv",) if getattr(attn, "qkv", None) is not None else ("q", "k", "v")


def ssf_sites(model: nn.Module, config: SsfConfig | None = None) -> list[SsfSite]:
    """Every SSF site of ``model`` in forward order (see the module docstring), for ``config`` (the
    defaults when None: the authors' sites)."""
    config = SsfConfig() if config is None else config
    family = family_of(model)
    stage_paths = family.stages(model)
    norm1, norm2 = family.norms
    linears: dict[str, dict[int, list]] = {}
    for target in (*_attention_targets(model), "proj", "fc1", "fc2"):
        by_block = linears.setdefault(target, {})
        for site in linear_sites(model, target):
            by_block.setdefault(site.block.index, []).append(site)
    sites = _patch_sites(model)
    for info in iter_blocks(model):
        if config.patch_merging and info.index_in_stage == 0:
            sites += _downsample_sites(model, stage_paths[info.stage])
        sites += _norm_site(info.module, norm1, f"{info.path}.{norm1}")
        for target in linears:
            if target == "fc1":
                sites += _norm_site(info.module, norm2, f"{info.path}.{norm2}")
            sites += [
                SsfSite(s.path, s.parent, s.attr, s.linear.out_features, before_adapt=s.before_adapt)
                for s in linears[target][info.index]
            ]
    return sites + _final_norm_sites(model, config.after_fc_norm)


@register_method(
    "ssf",
    "SSF: per-channel scale and shift after the patch embedding, every block's norms and Linears and the "
    "final norm; mergeable (not on fc_norm hosts unless after_fc_norm)",
)
class Ssf(Method):
    """SSF (see the module docstring); gamma/beta start near, not at, the identity."""

    config_class = SsfConfig
    identity_at_init = False
    #: The authors' per-task lr is 5e-3 for 11 of the 19 VTAB-1K tasks (the mode; all but caltech101
    #: use >= 2e-3, presets/ssf.yaml): the shared recipe's 1e-3 is below almost all of them.
    recipe: ClassVar[dict[str, Any]] = {"lr": 5e-3}

    def apply(self, model: nn.Module) -> None:
        cfg: SsfConfig = self.config
        for site in ssf_sites(model, cfg):
            wrapper = adapt_child(site.parent, site.attr, site.before_adapt)
            wrapper.sequential["ssf"] = SsfDelta(site.channels, site.channel_dim, cfg.init_std)
