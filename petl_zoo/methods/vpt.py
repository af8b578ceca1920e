"""VPT: visual prompt tuning, learnable tokens in the input sequence of frozen blocks (Jia et al., 2022).

With ``n`` prefix tokens (class, register, distillation: ``model.num_prefix_tokens``), patch tokens
``E`` and ``p`` prompts ``P_i`` (``[p, D]``, no position embedding), block ``L_i`` (0-based)::

    shallow:  Z_0 = [prefix, drop(P_0), E]        Z_{i+1} = L_i(Z_i)
    deep:     Z_{i+1} = L_i([Z_i[:, :n], drop(P_i), Z_i[:, n+p:]])      (block 0: insert as shallow)

so a deep block's prompt inputs are fresh and the previous block's prompt outputs are discarded. After
the last block the prompt outputs are dropped, so the final norm, the pooling and the head see the
host's own tokens: the class token, or for ``gap`` / attention-pool models the patch tokens only.
``drop`` is the prompt dropout (per sample: applied after expanding over the batch, as the authors do).
Init: ``uniform(-v, v)``, ``v = sqrt(6 / (3 * patch_h * patch_w + D))`` (0.0625 for ViT-B/16).

The blocks are wrapped (:class:`PromptedBlock`), never rewritten. EVA: its rotary embedding is applied
after the attention's prefix tokens, so each EVA attention counts the prompts as prefix tokens (no
rotary position for them, like the class token). Relative-position-bias models (``vit_relpos``,
``beit``) are refused: their bias tables are built for a fixed token layout.

Swin (``swin`` family; KMnP/vpt ``src/models/vit_prompt/swin_transformer.py``, ``prepend``): timm's
Swin passes a ``(B, H, W, C)`` grid between blocks, so the prompts ``P`` (``[B, p, C_stage]``) travel
beside it (:class:`SwinPromptState`). In every block, ``norm1(P)`` is prepended to each window of the
same sample; the prompts' relative position bias and shift mask are 0 (rows and columns), so the patch
tokens attend to them and they attend to the window; their attention outputs are averaged over the
windows and they take the block's residual and MLP path like a token::

    P' = P + mean_windows(WA([norm1(P), window])[:p]),   P'' = P' + mlp(norm2(P'))

Deep: fresh prompts before every block (``p * sum_stages depth_s * C_s``: 120,320 on Swin-B for
p = 10, 60,160 for the authors' default p = 5); shallow: the first block's prompts are carried through
all blocks and through each patch merging as ``reduction(norm([P, P, P, P]))`` (``128 p``). After the
last block the final norm is applied to the prompts too and the head's average pool averages prompts
and patch tokens together (the authors' ``avgpool``); timm's ``global_pool`` must be ``'avg'``. Wrapped:
every block (:class:`PromptedSwinBlock`), its window attention (:class:`PromptedWindowAttention`, which
computes the attention from timm's ``qkv``, bias table and ``proj`` for ``N + p`` tokens), the patch
mergings (shallow), the final norm and the head's pool. Init: the bound of the stage-0 width for every
stage (the authors' ``embed_dim``). Unlike the authors' code: (1) their window expansion pairs window
``j`` with the prompts of sample ``j % B`` while timm's and their windows are sample-major, so with
``B > 1`` their samples mix; we give each sample its own prompts (equal to theirs run one sample at a
time); (2) their deep prompts after the first block get one dropout mask per batch (dropped before the
expansion), ours one per sample; (3) drop-path draws its own mask for the prompts (their backbone runs in
eval mode, so it never acts there). Gradient checkpointing of the stages is not supported. SwinV2
(post-norm, scaled cosine attention, continuous position bias) has no form in the authors' code and is
refused.

VTAB-1K setting: VPT-deep (the paper's main rows), 10 prompts, prompt dropout 0.1 (the authors' deep
commands; shallow uses 0.0): ``12 * 768 * 10 = 92,160`` trainable parameters on ViT-B/16 (head
excluded); shallow ``768 p`` (7,680 for p = 10), deep p = 50: 460,800. The paper tunes ``p`` per task
and trains with SGD (momentum 0.9, batch 128, lr and weight decay from a grid): petl_zoo's recipe has
no optimizer key, so ``Vpt.recipe`` carries only the paper's values that do not depend on it: drop-path
0 (its backbone is kept in eval mode) and the schedule ends (warmup from 0, cosine to 0). Its batch size
is tied to its SGD learning rate (``lr = base_lr * batch / 256``) and stays in the preset; the rest is
documented in ``petl_zoo/presets/vpt.yaml`` (``recipe_extra``) and ``docs/vpt.md``. Not mergeable.

Parity (``tests/test_vpt.py``): the authors' ``incorporate_prompt`` and ``forward_deep_prompt``
(KMnP/vpt ``src/models/vit_prompt/vit.py`` @ 4410440), re-hosted on timm's blocks with the same prompt
tensors, give the same logits (fp64, 1e-10) shallow and deep, in eval and in train mode (prompt dropout
0.1 from the same seed). Swin (``tests/test_vpt_swin.py``): the authors' ``PromptedWindowAttention``,
``PromptedSwinTransformerBlock``, ``PromptedPatchMerging``, ``BasicLayer`` deep prompts and
``avgpool``, re-hosted over timm's Swin modules, one sample at a time: logits and prompt gradients
within 1e-10 (fp64) shallow and deep, fused and unfused attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, bounded, positive
from ..layers import AdaptedModule, Delta
from ..registry import Method, register_method
from ..targets import family_of, iter_blocks, module_sites

__all__ = [
    "VptConfig",
    "VptPrompts",
    "PromptedBlock",
    "PromptedSwinBlock",
    "PromptedWindowAttention",
    "SwinPromptState",
    "Vpt",
    "prompt_init_bound",
]


@dataclass
class VptConfig(MethodConfig):
    """VPT options: ``num_prompts`` (``p``), ``deep`` (fresh prompts at every block) and
    ``prompt_dropout`` (None: 0.1 when deep, 0.0 when shallow, the authors' VTAB commands)."""

    num_prompts: int = positive(10)
    deep: bool = True
    prompt_dropout: float | None = bounded(
        None, low=0, high=1, high_open=True, none="0.1 when deep, 0.0 when shallow"
    )

    @property
    def resolved_dropout(self) -> float:
        if self.prompt_dropout is not None:
            return self.prompt_dropout
        return 0.1 if self.deep else 0.0


def prompt_init_bound(patch_size: tuple[int, int], width: int) -> float:
    """``sqrt(6 / (3 * patch_h * patch_w + D))``: the authors' uniform init bound (xavier on a patch)."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + width))


class VptPrompts(Delta):
    """One block's prompt tokens ``P`` (``[p, D]``). ``forward(x, None)`` returns ``drop(P)`` expanded
    over the batch of ``x`` (``[B, p, D]``, x's dtype, one dropout mask per sample);
    :class:`PromptedBlock` puts them in the sequence.
    """

    def __init__(self, num_prompts: int, width: int, bound: float, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_prompts, width))
        nn.init.uniform_(self.tokens, -bound, bound)
        self.dropout = dropout

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        # Under no_grad a view of the parameter would require grad without a grad_fn, which module hooks
        # (torch's FlopCounterMode / ModuleTracker) reject: take the detached tensor there (same values).
        source = self.tokens if torch.is_grad_enabled() else self.tokens.detach()
        tokens = source.to(x.dtype).expand(x.shape[0], -1, -1)
        return F.dropout(tokens, self.dropout, self.training) if self.dropout > 0 else tokens


class PromptedBlock(AdaptedModule):
    """A block with prompt tokens at its input, inserted after the ``prefix_tokens`` (``insert``: block
    0) or replacing the previous block's prompt outputs (a deep block); ``strip`` (the last block) drops
    them from the output. Shallow blocks between the first and the last are not wrapped.

    An :class:`~petl_zoo.layers.AdaptedModule` holding the prompts in ``parallel`` (they enter with
    the block's input), so placement, saving and the merge check see them as an input-dependent update;
    its forward places the tokens instead of adding ``d(x)``.
    """

    def __init__(
        self,
        block: nn.Module,
        prompts: VptPrompts | None,
        prefix_tokens: int,
        num_prompts: int,
        insert: bool,
        strip: bool,
    ) -> None:
        super().__init__(block)
        if prompts is not None:
            self.parallel["prompt"] = prompts
        self.prefix_tokens = prefix_tokens
        self.num_prompts = num_prompts
        self.insert = insert
        self.strip = strip

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if kwargs.get("attn_mask") is not None:
            raise ValueError("vpt: attention masks are not supported (the prompts change the token count)")
        n, p = self.prefix_tokens, self.num_prompts
        if "prompt" in self.parallel:
            rest = x[:, n:] if self.insert else x[:, n + p :]
            x = torch.cat([x[:, :n], self.parallel["prompt"](x, None), rest], dim=1)
        out = self.base(x, *args, **kwargs)
        if self.strip:
            out = torch.cat([out[:, :n], out[:, n + p :]], dim=1)
        return out


def _count_prompts_as_prefix(model: nn.Module, prefix: int, num_prompts: int) -> None:
    """EVA: rotary embeddings act on the tokens after ``attn.num_prefix_tokens``; make that the prefix
    tokens plus the prompts, so the prompts get no position (restored by ``create`` if it fails)."""
    for info in iter_blocks(model):
        attn = info.module.attn
        while getattr(attn, "_petl_wrapper", False):
            attn = attn.base
        if getattr(attn, "num_prefix_tokens", None) != prefix:
            raise ValueError(
                f"vpt: the {type(attn).__name__} of block {info.path} does not count the model's {prefix} "
                "prefix tokens (num_prefix_tokens), so its rotary embedding cannot skip the prompts"
            )
        attn.num_prefix_tokens = prefix + num_prompts


# -- Swin: prompts beside the (B, H, W, C) token grid -----------------------------------------------------


class SwinPromptState:
    """The prompt tokens of one Swin forward, passed between the wrappers (timm's Swin carries a
    ``(B, H, W, C)`` grid from block to block, with no room for extra tokens). Not a module and not
    state: a copy or a pickle of the model gets an empty one (the model keeps no tensors of a forward)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.tokens: Tensor | None = None  # [B, p, C]: the prompts entering the next block (or the norm)
        self.normed: Tensor | None = None  # norm1(tokens), for the block's window attention
        self.attn_out: Tensor | None = None  # the attention's prompt outputs, averaged over the windows
        self.final: Tensor | None = None  # norm(tokens) after the last block, for the average pool

    def take(self, name: str, where: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(
                f"vpt (swin): {where} found no prompt tokens: the prompted blocks run from the first one "
                "on, in one forward (gradient checkpointing and calling stages alone are not supported)"
            )
        setattr(self, name, None)
        return value

    def __deepcopy__(self, memo: dict) -> SwinPromptState:
        return SwinPromptState()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()


class PromptedWindowAttention(AdaptedModule):
    """timm's Swin ``WindowAttention`` with the block's (normalised) prompts prepended to every window:
    sample ``b``'s prompts join each window of sample ``b``, their relative position bias and shift mask
    are zero (rows and columns), and their outputs are averaged over the windows (KMnP/vpt's
    ``PromptedWindowAttention`` and ``PromptedSwinTransformerBlock``). The attention is computed here
    from the wrapped module's ``qkv``, bias table, ``proj`` and dropouts (timm's forward is built for
    ``window_area`` tokens), fused (``scaled_dot_product_attention``) when timm's would be."""

    def __init__(self, attn: nn.Module, state: SwinPromptState) -> None:
        super().__init__(attn)
        self._state = state

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        attn = self.base
        prompts = self._state.take("normed", "the window attention")
        batch, p, width = prompts.shape
        windows, n, _ = x.shape
        per_sample = windows // batch  # timm's window_partition: the windows of sample 0, then sample 1 ...
        x = torch.cat([prompts.unsqueeze(1).expand(-1, per_sample, -1, -1).reshape(windows, p, width), x], 1)
        t, heads = n + p, attn.num_heads
        q, k, v = attn.qkv(x).reshape(windows, t, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = F.pad(attn._get_rel_pos_bias(), (p, 0, p, 0))  # [1, heads, t, t], 0 for the prompts
        if mask is not None:  # shifted windows: [nW, n, n] (0 / -100), 0 for the prompts
            num_win = mask.shape[0]
            mask = F.pad(mask, (p, 0, p, 0)).view(1, num_win, 1, t, t)
            bias = bias + mask.expand(windows // num_win, -1, heads, -1, -1).reshape(-1, heads, t, t)
        if attn.fused_attn:
            drop = attn.attn_drop.p if attn.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop)
        else:
            out = attn.attn_drop(attn.softmax((q * attn.scale) @ k.transpose(-2, -1) + bias)) @ v
        out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(windows, t, -1)))
        self._state.attn_out = out[:, :p].reshape(batch, per_sample, p, -1).mean(1)
        return out[:, p:]


class PromptedSwinBlock(AdaptedModule):
    """A Swin block and its prompts: fresh ones (``parallel['prompt']``: block 0, every block when deep)
    or the previous block's outputs (shallow). The patch tokens run through timm's block forward, whose
    window attention (:class:`PromptedWindowAttention`) lets them attend to the prompts; the prompts
    take the same residual path as a token, ``P += drop_path1(attn_P)``, ``P += drop_path2(mlp(norm2(P)))``
    (the authors run the two through one call; drop-path draws its own mask for the prompts)."""

    def __init__(self, block: nn.Module, prompts: VptPrompts | None, state: SwinPromptState) -> None:
        super().__init__(block)
        if prompts is not None:
            self.parallel["prompt"] = prompts
        self._state = state

    def forward(self, x: Tensor) -> Tensor:
        block, state = self.base, self._state
        if "prompt" in self.parallel:
            state.clear()  # fresh prompts: the outputs of the previous block (if any) are discarded
            tokens = self.parallel["prompt"](x, None)
        else:
            tokens = state.take("tokens", "a shallow-prompted block")
        state.normed, state.attn_out = block.norm1(tokens), None
        out = block(x)
        if state.normed is not None:
            state.normed = None
            raise RuntimeError(
                f"vpt (swin): {type(block).__name__} did not call its window attention wrapper"
            )
        tokens = tokens + block.drop_path1(state.take("attn_out", "the block"))
        state.tokens = tokens + block.drop_path2(block.mlp(block.norm2(tokens)))
        return out


class PromptedPatchMerging(AdaptedModule):
    """Patch merging of shallow prompts (the authors' ``PromptedPatchMerging``): four copies of each
    prompt side by side (``[P, P, P, P]``, 4C) through the merge's norm and reduction."""

    def __init__(self, merge: nn.Module, state: SwinPromptState) -> None:
        super().__init__(merge)
        self._state = state

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        tokens = self._state.take("tokens", "the patch merging")
        self._state.tokens = self.base.reduction(self.base.norm(torch.cat([tokens] * 4, dim=-1)))
        return out


class PromptedFinalNorm(AdaptedModule):
    """The final norm, also applied to the last block's prompt outputs (kept for the average pool)."""

    def __init__(self, norm: nn.Module, state: SwinPromptState) -> None:
        super().__init__(norm)
        self._state = state

    def forward(self, x: Tensor) -> Tensor:
        self._state.final = self.base(self._state.take("tokens", "the final norm"))
        return self.base(x)


class PromptedAveragePool(AdaptedModule):
    """The head's average pool over the prompts and the patch tokens together (the authors'
    ``avgpool`` on ``norm([prompts, patches])``): ``mean(cat(P, flatten(x)))``, ``x`` in NHWC."""

    def __init__(self, pool: nn.Module, state: SwinPromptState) -> None:
        super().__init__(pool)
        self._state = state

    def forward(self, x: Tensor) -> Tensor:
        prompts = self._state.take("final", "the head's average pool (call forward_features first)")
        return torch.cat([prompts.to(x.dtype), x.flatten(1, 2)], dim=1).mean(1)


def _apply_swin(model: nn.Module, cfg: VptConfig) -> None:
    """VPT on timm's Swin (KMnP/vpt ``src/models/vit_prompt/swin_transformer.py``, ``prepend``)."""
    pool = getattr(getattr(model, "head", None), "global_pool", None)
    if getattr(pool, "pool_type", None) != "avg" or getattr(model, "output_fmt", "NHWC") != "NHWC":
        raise ValueError(
            "vpt on Swin pools the prompts with the patch tokens (the authors' average pool): it needs "
            f"timm's global_pool='avg', got {getattr(pool, 'pool_type', None)!r}"
        )
    blocks = list(iter_blocks(model))
    patch = tuple(int(s) for s in model.patch_embed.patch_size)
    bound = prompt_init_bound(patch, blocks[0].dim)  # the authors: embed_dim for every stage's prompts
    state = SwinPromptState()
    for site, attn in zip(module_sites(model, "block"), module_sites(model, "attn"), strict=True):
        prompts = None
        if site.block.index == 0 or cfg.deep:
            prompts = VptPrompts(cfg.num_prompts, site.in_features, bound, cfg.resolved_dropout)
            prompts.train(site.module.training)
        setattr(attn.parent, attn.attr, PromptedWindowAttention(attn.module, state))
        setattr(site.parent, site.attr, PromptedSwinBlock(site.module, prompts, state))
    if not cfg.deep:  # deep: the next stage's first block replaces the merged prompts, so skip the merge
        for stage in model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                stage.downsample = PromptedPatchMerging(stage.downsample, state)
    model.norm = PromptedFinalNorm(model.norm, state)
    model.head.global_pool = PromptedAveragePool(pool, state)


@register_method("vpt", "VPT: learnable prompt tokens in the input of the blocks (shallow or deep)")
class Vpt(Method):
    """Visual prompt tuning (module docstring)."""

    config_class = VptConfig
    families = ("vit", "eva", "swin")
    unsupported_reason = (
        "prompts change the token count, and its relative position bias tables are built for a fixed "
        "token layout (vit_relpos, beit) or, for SwinV2, the authors' Swin prompt code has no form for "
        "post-norm blocks with scaled cosine attention and a continuous position bias"
    )
    recipe = {"drop_path": 0.0, "warmup_lr": 0.0, "min_lr": 0.0}

    def apply(self, model: nn.Module) -> None:
        cfg: VptConfig = self.config
        family = family_of(model)
        if family.name == "swin":
            _apply_swin(model, cfg)
            return
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        patch = tuple(int(s) for s in model.patch_embed.patch_size)
        sites = module_sites(model, "block")
        last = len(sites) - 1
        for i, site in enumerate(sites):
            if i > 0 and not cfg.deep and i != last:
                continue  # a shallow block in between carries the prompts unchanged
            prompts = None
            if i == 0 or cfg.deep:
                bound = prompt_init_bound(patch, site.in_features)
                prompts = VptPrompts(cfg.num_prompts, site.in_features, bound, cfg.resolved_dropout)
                prompts.train(site.module.training)  # an eval-mode model gets eval-mode prompt dropout
            wrapper = PromptedBlock(site.module, prompts, prefix, cfg.num_prompts, i == 0, i == last)
            setattr(site.parent, site.attr, wrapper)
        if family.name == "eva":
            _count_prompts_as_prefix(model, prefix, cfg.num_prompts)
