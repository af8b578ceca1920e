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
``beit``) and window attention (the Swin families) are refused: their bias tables and windows are built
for a fixed token layout.

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
0.1 from the same seed).
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

__all__ = ["VptConfig", "VptPrompts", "PromptedBlock", "Vpt", "prompt_init_bound"]


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


@register_method("vpt", "VPT: learnable prompt tokens in the input of the blocks (shallow or deep)")
class Vpt(Method):
    """Visual prompt tuning (module docstring)."""

    config_class = VptConfig
    families = ("vit", "eva")
    unsupported_reason = (
        "prompts change the token count, and its relative position bias tables or window attention "
        "are built for a fixed token layout (VPT's Swin variant is not implemented)"
    )
    recipe = {"drop_path": 0.0, "warmup_lr": 0.0, "min_lr": 0.0}

    def apply(self, model: nn.Module) -> None:
        cfg: VptConfig = self.config
        family = family_of(model)
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
