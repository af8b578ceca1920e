"""FourierFT: parameter-efficient fine-tuning with the discrete Fourier transform (Gao et al., ICML 2024).

Torch layout, a frozen Linear ``y = x W0^T + b`` with ``W0`` of shape ``[out, in]``. Per adapted weight
(or output slice of the fused ``qkv``) FourierFT trains ``n`` spectral coefficients ``c`` at ``n`` fixed
random entries ``(rows, cols)`` of the 2-D spectrum of ``delta_W``::

    S       = zeros(out, in);  S[rows, cols] = c              (dense spectrum, zero elsewhere)
    delta_W = scaling * Re(IFFT2(S))                          ([out, in], as peft: no transpose for a Linear)
    y       = x W0^T + b + x delta_W^T

``IFFT2`` is ``torch.fft.ifft2`` (normalised by ``1 / (out * in)``). The entries are drawn as peft draws
them: ``torch.randperm(out * in, generator=torch.Generator().manual_seed(random_loc_seed))[:n]``, flat
index ``k`` at row ``k // in``, column ``k % in``. peft seeds a generator with the same
``random_loc_seed`` at every site, so sites of one shape share their entries (the authors'
``--share_entry``); we draw once per shape, which gives the same entries. The
coefficients are ``torch.randn(n)`` from the global generator (peft's default, ``init_weights=False``),
or zeros (``init_weights=True``, after the same draw, so that the global generator moves as peft's
does); sites are set up in module order (``blocks.0`` q, v, then ``blocks.1`` ...), peft's order on a
model whose ``qkv`` is split, so the same global seed gives peft's coefficients too. With the default
random coefficients the model is *not* unchanged at initialisation (as in peft and the authors' code).

A site with fewer than ``n_frequency`` entries (a narrow test model) trains all
``out * in`` of them (peft raises instead); a warning says so.

Storage: the entries are a persistent ``int32`` buffer ``indices`` (``[2, n]``: rows, cols) of each
delta, so ``save_adapter`` writes them and a reload is exact whatever the loading torch build's
``randperm`` draws; ``random_loc_seed`` only decides what ``create`` draws.

Compute and memory: the forward materialises the dense spectrum (``[out, in]`` complex) and
``delta_W`` (``[out, in]``) once per call and site, then ``x delta_W^T``: for ViT-B/16's 768 x 768 q and
v slices, about 7 MB of temporaries per site in float32 (4.7 MB complex, 2.4 MB real), of which
``delta_W`` is kept for the backward. The FFT runs in float32 at least (``torch.fft`` has no bfloat16;
float64 stays float64): on a bf16 host the coefficients (float32, trained) are cast to bf16 for the
call as every method's tensors are, the FFT runs in float32 and ``delta_W`` is cast to the input's dtype.

Defaults, the paper's vision setting (ViT-B/16 and ViT-L/16 on the full-dataset image suite): ``n = 3000``
coefficients on the query and value projections (``q``, ``v`` slices of timm's fused ``qkv``; the
authors target HF ViT's ``query`` and ``value``), ``scaling = 300`` (peft's documented value for
ViT-base and -large; ``--scale 300.0`` in every ``experiments/ViT/*-base-3000.bash``),
``random_loc_seed = 777`` (peft's default; the authors' ViT runs use ``--entry_seed`` 2024, see the
``paper`` preset). On ViT-B/16: 12 blocks x 2 x 3000 = **72,000** trainable parameters (head excluded),
the paper's 72K; ``targets=("qkv",)``, peft's ``target_modules=["qkv"]``: 36,000. peft's ``bias="none"``
(the default and the authors'): biases stay frozen; ``fan_in_fan_out`` concerns HF ``Conv1D`` only,
timm's Linears take ``delta_W`` as it is. Mergeable: ``delta_W`` is folded into the weight, unmerged
from the cached ``W0``.

Compared with peft 0.21 (``FourierFTConfig``) on a tiny timm ViT in float64, fused ``qkv`` and ``q``/``v``
on a split copy: same entries, same coefficients, outputs, gradients and merged weights within 1e-10
(``tests/test_fourierft.py``; docs/fourierft.md says how peft's float32 FFT is lifted to float64 there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, non_negative, nonzero, positive
from ..layers import Delta, DenseUpdate, adapt_linear
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, check_targets, linear_sites

__all__ = ["FourierFTConfig", "FourierFTDelta", "FourierFT", "spectral_entries"]

logger = logging.getLogger(__name__)


@dataclass
class FourierFTConfig(MethodConfig):
    """FourierFT options: ``n_frequency`` = coefficients per adapted weight, ``scaling`` of ``delta_W``,
    ``targets`` (Linear targets, as LoRA's), ``random_loc_seed`` = seed of the spectral entries (peft's),
    ``init_weights`` = zero coefficients (True) instead of standard-normal ones (False, peft's default)."""

    n_frequency: int = positive(3000)
    scaling: float = nonzero(300.0)
    targets: tuple[str, ...] = ("q", "v")
    random_loc_seed: int = non_negative(777)
    init_weights: bool = False

    def validate(self) -> None:
        check_targets(self.targets, LINEAR_TARGETS, "fourierft")


def spectral_entries(out_features: int, in_features: int, n: int, seed: int) -> Tensor:
    """The ``[2, min(n, out * in)]`` (rows, cols) of the trained spectral entries of an ``[out, in]``
    weight: peft's draw, ``randperm(out * in)`` from a CPU generator seeded with ``seed``, first ``n``;
    ``int32``: half the saved bytes of ``int64`` (peft's dtype; it re-draws them instead of saving)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator, device="cpu")[:n]
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


class FourierFTDelta(Delta):
    """``delta_W = scaling * Re(ifft2(S))`` with ``S[indices] = fourierft_spectrum`` (zero elsewhere);
    ``delta(x) = x delta_W^T``."""

    mergeable = True

    def __init__(
        self, in_features: int, out_features: int, indices: Tensor, scaling: float, init_weights: bool = False
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scaling = float(scaling)
        n = indices.shape[1]
        self.register_buffer("indices", indices.clone())  # [2, n] rows, cols (:func:`spectral_entries`)
        spectrum = torch.randn(n)  # drawn also for zeros: the global generator moves as peft's does
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n) if init_weights else spectrum)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        """``scaling * Re(ifft2(S))`` (``[out, in]``), in float32 or wider (float64 stays float64)."""
        spectrum = self.fourierft_spectrum
        work = torch.promote_types(spectrum.dtype, torch.float32)
        rows, cols = self.indices.to(device=spectrum.device, dtype=torch.long)
        dense = spectrum.new_zeros((self.out_features, self.in_features), dtype=work)
        dense = dense.index_put((rows, cols), spectrum.to(work))
        return torch.fft.ifft2(dense).real * self.scaling

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return F.linear(x, self.delta_weight(weight).to(x.dtype))

    def dense_update(self, weight: Tensor) -> DenseUpdate:
        return DenseUpdate(self.delta_weight(weight))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"n_frequency={self.fourierft_spectrum.shape[0]}, scaling={self.scaling}"
        )


@register_method(
    "fourierft",
    "FourierFT: trained coefficients at fixed random entries of delta_W's 2-D spectrum (q, v; n = 3000); "
    "mergeable",
)
class FourierFT(Method):
    config_class = FourierFTConfig
    identity_at_init = False  # standard-normal coefficients by default (init_weights=True: zeros)
    #: The authors' learning rates (Chaos96/fourierft experiments/ViT/*-base-3000.bash @ 4986a28): the
    #: spectral coefficients at --fft_lr 3e-1 (6 of the 8 datasets; 2e-1 for cifar100 and eurosat) and
    #: the head in its own group at --head_lr 1e-3 (6 of 8). At the shared 1e-3 the coefficients barely
    #: move: s / (out * in) scales each one's effect on delta_W (300 / 768^2 on ViT-B). The per-dataset
    #: values are the preset ``paper`` of the full-dataset suite.
    recipe: dict = {"lr": 0.3, "head_lr": 1e-3}

    def apply(self, model: nn.Module) -> None:
        cfg: FourierFTConfig = self.config
        sites = [site for target in cfg.targets for site in linear_sites(model, target)]
        order = {id(module): i for i, module in enumerate(model.modules())}
        sites.sort(key=lambda site: (order.get(id(site.linear), len(order)), site.start))  # peft's order
        drawn: dict[tuple[int, int], Tensor] = {}  # one seed: sites of one shape get the same entries
        for site in sites:
            shape = (site.out_features, site.in_features)
            if shape not in drawn:
                drawn[shape] = spectral_entries(*shape, cfg.n_frequency, cfg.random_loc_seed)
            layer = adapt_linear(site)
            delta = FourierFTDelta(
                site.in_features, site.out_features, drawn[shape], cfg.scaling, cfg.init_weights
            )
            layer.add_delta(f"fourierft_{site.target}", delta, site.start, site.stop)
        clamped = [f"{out}x{inp}" for out, inp in sorted(drawn) if cfg.n_frequency > out * inp]
        if clamped:
            logger.warning(
                "fourierft: n_frequency=%d exceeds the entries of the %s site(s); they train all their "
                "entries (peft would raise)",
                cfg.n_frequency,
                ", ".join(clamped),
            )
