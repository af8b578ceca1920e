"""GLoRA: generalized LoRA (Chavan, Liu, Gupta, Xing & Shen, 2023, "One-for-All: Generalized LoRA for
Parameter-Efficient Fine-tuning", arXiv:2306.07967).

Torch layout, a frozen Linear ``y = x W0^T + b0`` with ``W0`` of shape ``[out, in]``. GLoRA trains five
*support tensors* per adapted Linear (or output slice) and replaces the weight and the bias by::

    W' = W0 + W0 * A + B                     (* elementwise, broadcast)
    b' = b0 + b0 * D + E + W0 C              (W0 C: [out, in] @ [in, 1] -> [out])
    y  = x W'^T + b'   =  x W0^T + b0  +  delta,   delta = x (W0 * A + B)^T + (b0 * D + E + W0 C)

Each support takes one of a few forms (the authors' ``layer.py`` and peft's ``tuners/glora``):

=========  ====================================================  ==================  ==================
support    ``lora`` (rank r)                                     ``vector``           ``constant``
=========  ====================================================  ==================  ==================
A, B       ``Xd Xu``: ``Xd`` ``[out, r]`` zeros, ``Xu`` ``[r, in]``  ``[out, 1]`` zeros  one scalar, 0
C          ``Xd Xu``: ``Xd`` ``[in, r]`` zeros, ``Xu`` ``[r, 1]``     ``[in, 1]`` zeros   (not offered)
D, E       (not offered)                                         ``[out]`` zeros      one scalar, 0
=========  ====================================================  ==================  ==================

and ``none`` (no tensor: the term is absent) for every support. Every ``Xd`` and every vector and
scalar starts at zero, so the model is unchanged at initialisation; ``Xu`` is kaiming-uniform
(``a = sqrt(5)``, peft's) or xavier-uniform (``init="xavier"``, the authors'). ``A`` and ``C`` read the
frozen ``W0`` (of this output slice); ``D`` reads the frozen bias ``b0``. On a Linear without a bias
``C``, ``D`` and ``E`` are left out (peft's rule; the authors' supernet would still add ``E + W0 C`` as
a new bias: no ViT Linear is bias-free, so this only matters on other hosts).

Defaults: peft 0.21's ``GloraConfig`` with ``config_D_E="none"`` (rank 8; ``A``, ``B``, ``C``:
``lora``; ``D``, ``E``: ``none``) on every Linear of every block, ``targets=("qkv", "proj", "fc1",
"fc2")``: the Linears the authors' ``set_glora`` adapts (all but the head; their search space has
12 x 4 = 48 layers on ViT-B). On ``vit_base_patch16_224``: 2,875,776 trainable parameters (head
excluded); rank 4 (the authors' supernet default): 1,437,888; peft's default ``d = e = "constant"``:
2,875,872. ``D``, ``E`` are off by default because a scalar ``E`` on ``proj``/``fc2`` is removed by the
LayerNorms that read a pre-norm residual stream (no gradient), and ``D`` multiplies the bias, which
timm initialises to zero (a dead tensor on a random host; alive on pretrained weights).

The paper's VTAB-1K rows do not come from a fixed configuration: per task, the authors train a supernet
whose every Linear samples one of 4 x 4 x 3 x 3 x 3 = 432 choices per forward, then search the
per-layer choice on the trained supernet with an evolutionary search under a parameter budget
(``supernet.py``, ``evolution.py``); no searched configuration or checkpoint is released. ``layers``
replays a searched choice: one ``"A,B,C,D,E"`` string per adapted site in the authors' order (block by
block; ``qkv``, ``proj``, ``fc1``, ``fc2`` within a block), e.g. ``"lora,vector,none,constant,none"``.

Supernet (``supernet=True``, :class:`GloraSuperDelta`): every site holds the authors' tensors (``Ad``,
``Au``, ``Bd``, ``Bu``, ``Cd``, ``Cu``, ``D``, ``E``; a ``vector`` is the first column of ``Xd``, a
``constant`` its ``[0, 0]`` entry or ``D[0]``, so one set of weights serves every subnet) and uses one
of the 432 choices per call of the model, drawn uniformly for every site by a forward pre-hook on the
model (so gradient checkpointing recomputes a block with its forward's choice), from one CPU
``torch.Generator`` shared by the model's sites and seeded with ``seed`` (default:
``torch.initial_seed()`` when ``create`` runs, i.e. the run's ``--seed``, which the trainer sets
first). The sampler's position (seed and number of draws) is the
method's state (``get_state``): saved with the adapter and in checkpoints, replayed on load and
resume. :func:`set_subnet` fixes one choice per site (None samples again); the search and the export
to a fixed ``glora`` are in :mod:`petl_zoo.methods.glora_search`. On ``vit_base_patch16_224`` at rank
4 the supernet trains 1,603,776 values (head excluded).

Merging. ``delta_W = W0 * A + B`` is a weight-space form (``delta_weight``). The bias change
``b0 * D + E + W0 C`` has no place in the Linear-slice protocol of :mod:`petl_zoo.layers` (a slice
delta folds into the weight only), so a delta with an active bias support (``C``, ``D`` or ``E`` not
``none``; ``C`` is ``lora`` by default) computes it in its forward and is not mergeable; with
``c="none"``, ``d="none"``, ``e="none"`` it merges and unmerges exactly. The delta reads ``b0`` from the
Linear it is attached to (a reference that is not a submodule: never saved, moved or counted).

Cost: the forward builds ``W0 * A + B`` (``[out, in]``) and runs one more product of the slice's width,
as peft does (a Hadamard product with ``W0`` has no low-rank shortcut).

Compared in float64 with peft 0.21 (``GloraConfig``, fused ``qkv``; ``q``, ``v`` against peft on split
q/k/v Linears; all four Linears of a block) and with the authors' ``SuperScalableLinear`` math re-hosted
with a fixed per-layer configuration: outputs and gradients agree to 1e-10 (measured: peft 8.6e-16 /
3.1e-15, the authors' layer 3.1e-15 / 1.5e-13), and ``W0 + delta_W``, ``b0 + delta_b`` equal peft's merged
weight and bias bit for bit (``tests/test_glora.py``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MethodConfig, bounded, positive
from ..layers import Delta, DenseUpdate, adapt_linear
from ..registry import Method, register_method
from ..targets import LINEAR_TARGETS, LinearSite, check_targets, linear_sites

__all__ = [
    "GloraConfig",
    "GloraDelta",
    "GloraSuperDelta",
    "Glora",
    "SubnetSampler",
    "SUPPORT_CHOICES",
    "SUPERNET_CHOICES",
    "parse_layer_choice",
    "set_subnet",
    "get_subnet",
    "supernet_deltas",
    "subnet_parameters",
]

#: The forms each support tensor may take (the authors' search space; peft's ``config_A_B``,
#: ``config_C``, ``config_D_E`` values).
SUPPORT_CHOICES: dict[str, tuple[str, ...]] = {
    "A": ("lora", "vector", "constant", "none"),
    "B": ("lora", "vector", "constant", "none"),
    "C": ("lora", "vector", "none"),
    "D": ("vector", "constant", "none"),
    "E": ("vector", "constant", "none"),
}
#: The supernet's search space in the authors' order (``layer.py``: ``config_A_B``, ``config_C``,
#: ``config_D_E``; their ``configs`` list nests A, B, C, D, E, E innermost): 4 x 4 x 3 x 3 x 3 = 432.
SUPERNET_CHOICES: dict[str, tuple[str, ...]] = {
    "A": ("lora", "vector", "constant", "none"),
    "B": ("lora", "vector", "constant", "none"),
    "C": ("lora", "vector", "none"),
    "D": ("constant", "none", "vector"),
    "E": ("constant", "none", "vector"),
}
_SUPERNET_CONFIGS = tuple(
    dict(zip("ABCDE", forms)) for forms in itertools.product(*(SUPERNET_CHOICES[k] for k in "ABCDE"))
)
_DEFAULT_CHOICE = {"A": "lora", "B": "lora", "C": "lora", "D": "none", "E": "none"}
#: Order of the Linears within a block in ``layers`` (the authors' module order).
_SITE_ORDER = ("qkv", "q", "k", "v", "proj", "fc1", "fc2")

AB = Literal["lora", "vector", "constant", "none"]
CC = Literal["lora", "vector", "none"]
DE = Literal["vector", "constant", "none"]


def parse_layer_choice(text: str) -> dict[str, str]:
    """``"lora,vector,none,constant,none"`` -> ``{"A": "lora", "B": "vector", ...}`` (a ValueError names
    the bad entry and the valid choices)."""
    parts = [p.strip().lower() for p in text.split(",")]
    if len(parts) != 5:
        raise ValueError(f"a layers entry is five comma-separated choices for A,B,C,D,E, got {text!r}")
    choice = dict(zip("ABCDE", parts))
    for key, value in choice.items():
        if value not in SUPPORT_CHOICES[key]:
            valid = ", ".join(SUPPORT_CHOICES[key])
            raise ValueError(
                f"bad choice {value!r} for support {key} in layers entry {text!r}; valid: {valid}"
            )
    return choice


@dataclass
class GloraConfig(MethodConfig):
    """GLoRA options: ``rank`` of every ``lora`` support; the form of each support (``a`` .. ``e``, the
    same on every adapted site; peft ties ``a``/``b`` as ``config_A_B`` and ``d``/``e`` as
    ``config_D_E``); ``init`` of the ``Xu`` factors (``kaiming``: peft's, ``xavier``: the authors');
    ``layers``: a per-site choice (``"A,B,C,D,E"`` per site, in the authors' order) that replaces
    ``a`` .. ``e``; ``targets``; ``supernet``: the authors' supernet (every site samples one of the 432
    choices per forward, from a generator seeded with ``seed``; see :class:`GloraSuperDelta`)."""

    rank: int = positive(8)
    a: AB = "lora"
    b: AB = "lora"
    c: CC = "lora"
    d: DE = "none"
    e: DE = "none"
    init: Literal["kaiming", "xavier"] = "kaiming"
    layers: tuple[str, ...] = ()
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    supernet: bool = False
    seed: int | None = bounded(None, low=0, none="torch.initial_seed() when create runs: the run's seed")

    def validate(self) -> None:
        check_targets(self.targets, LINEAR_TARGETS, "glora")
        for entry in self.layers:
            parse_layer_choice(entry)
        if self.supernet:
            if self.layers:
                raise ValueError(
                    "glora: supernet=True samples every subnet, layers fixes one; drop layers "
                    "(fix a subnet on the supernet with set_subnet(model, layers))"
                )
            changed = {k.lower(): v for k, v in self.choice().items() if v != _DEFAULT_CHOICE[k]}
            if changed:
                raise ValueError(
                    f"glora: supernet=True samples the form of every support, got fixed {changed}"
                )
        elif self.seed is not None:
            raise ValueError(
                f"glora: seed is the supernet's sampling seed, it needs supernet=True, got seed={self.seed}"
            )

    def choice(self) -> dict[str, str]:
        """The support forms shared by every site (``a`` .. ``e``)."""
        return {"A": self.a, "B": self.b, "C": self.c, "D": self.d, "E": self.e}


class GloraDelta(Delta):
    """GLoRA on one output slice: ``delta = x (W0 * A + B)^T + (b0 * D + E + W0 C)`` (module docstring).

    Tensors (present only for the chosen forms): ``glora_{A,B}d`` ``[out, r]`` and ``glora_{A,B}u``
    ``[r, in]`` (``lora``), ``glora_{A,B}`` ``[out, 1]`` (``vector``) or ``[1]`` (``constant``);
    ``glora_Cd`` ``[in, r]``, ``glora_Cu`` ``[r, 1]`` (``lora``) or ``glora_C`` ``[in, 1]``;
    ``glora_{D,E}`` ``[out]`` or ``[1]``. Mergeable when no bias support is active.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        choice: dict[str, str],
        has_bias: bool,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        choice = dict(choice)
        if not has_bias:  # peft: a bias-free Linear gets no C, D, E
            choice.update(C="none", D="none", E="none")
        self.choice = choice
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.mergeable = all(choice[k] == "none" for k in "CDE")
        self._host: tuple[nn.Linear, int, int] | None = None
        for key in "AB":
            self._make(key, choice[key], (out_features, in_features), init)
        self._make("C", choice["C"], (in_features, 1), init)
        for key in "DE":
            form = choice[key]
            if form != "none":
                shape = (out_features,) if form == "vector" else (1,)
                setattr(self, f"glora_{key}", nn.Parameter(torch.zeros(shape)))

    def _make(self, key: str, form: str, shape: tuple[int, int], init: str) -> None:
        rows, cols = shape
        if form == "lora":
            down = nn.Parameter(torch.zeros(rows, self.rank))
            up = nn.Parameter(torch.empty(self.rank, cols))
            if init == "xavier":
                nn.init.xavier_uniform_(up)
            else:
                nn.init.kaiming_uniform_(up, a=math.sqrt(5))
            setattr(self, f"glora_{key}d", down)
            setattr(self, f"glora_{key}u", up)
        elif form == "vector":
            setattr(self, f"glora_{key}", nn.Parameter(torch.zeros(rows, 1)))
        elif form == "constant":
            setattr(self, f"glora_{key}", nn.Parameter(torch.zeros(1)))

    def bind(self, linear: nn.Linear, start: int, stop: int) -> None:
        """Remember the Linear (for its bias ``b0``) and this delta's output slice. A plain tuple: the
        Linear is not a submodule of the delta (not saved, moved or counted twice)."""
        self._host = (linear, start, stop)

    def support(self, key: str) -> Tensor | None:
        """Support ``key`` as it enters the formula: ``[out, in]`` / ``[in, 1]`` (``lora``), the vector,
        a 0-dim scalar (``constant``), or None (``none``)."""
        form = self.choice[key]
        if form == "none":
            return None
        if form == "lora":
            return getattr(self, f"glora_{key}d") @ getattr(self, f"glora_{key}u")
        tensor = getattr(self, f"glora_{key}")
        return tensor[0] if form == "constant" else tensor

    def weight_update(self, weight: Tensor) -> Tensor | None:
        """``W0 * A + B`` on this slice (``[out, in]``), None when ``A`` and ``B`` are both ``none``."""
        a, b = self.support("A"), self.support("B")
        update = None if a is None else weight * a
        if b is not None:
            update = b.expand_as(weight) if update is None else update + b
        return update

    def bias_update(self, weight: Tensor) -> Tensor | None:
        """``b0 * D + E + W0 C`` on this slice (``[out]``), None without an active bias support."""
        if self.mergeable:
            return None
        c, d, e = self.support("C"), self.support("D"), self.support("E")
        terms = []
        if d is not None:
            terms.append(self._bias() * d)
        if e is not None:
            terms.append(e.expand(weight.shape[0]))
        if c is not None:
            terms.append((weight @ c).squeeze(-1))
        if not terms:  # a supernet site whose drawn choice has no bias support
            return None
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return out

    def _bias(self) -> Tensor:
        if self._host is None:
            raise RuntimeError("GloraDelta.bind(linear, start, stop) must be called before a forward")
        linear, start, stop = self._host
        return linear.bias[start:stop]

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        dw, db = self.weight_update(weight), self.bias_update(weight)
        if dw is not None:
            return F.linear(x, dw, db)
        out = x.new_zeros(*x.shape[:-1], weight.shape[0])
        return out if db is None else out + db

    def dense_update(self, weight: Tensor) -> DenseUpdate:
        return DenseUpdate(self.weight_update(weight), self.bias_update(weight))

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``W0 * A + B`` (``[out, in]``); only with no active bias support (else it cannot merge)."""
        if not self.mergeable:
            raise ValueError(
                "GloraDelta with an active bias support (C, D or E) has no weight-only form and cannot be merged"
            )
        dw = self.weight_update(weight)
        return torch.zeros_like(weight) if dw is None else dw

    def extra_repr(self) -> str:
        forms = ",".join(self.choice[k] for k in "ABCDE")
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, A,B,C,D,E={forms}"


class SubnetSampler:
    """The supernet's draws: one of the 432 choices (:data:`SUPERNET_CHOICES`, uniform, as the authors'
    ``random.choice(self.configs)``) per site and call of the model, from a CPU ``torch.Generator``
    seeded with ``seed``. :meth:`step`, a forward pre-hook on the model, draws every sampling site's
    choice in the ``layers`` order before the model runs, so a block that gradient checkpointing
    recomputes in backward reuses the choice of its forward. ``draws`` counts the draws, so ``{"seed",
    "draws"}`` replays the generator to where it was (:meth:`restore`: a resumed run or a loaded adapter
    continues the same sequence)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.draws = 0
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.sites: list[GloraSuperDelta] = []

    def draw(self) -> dict[str, str]:
        index = int(torch.randint(len(_SUPERNET_CONFIGS), (1,), generator=self.generator))
        self.draws += 1
        return _SUPERNET_CONFIGS[index]

    def step(self, *_: Any) -> None:
        """A new choice for every site that has no fixed subnet (the model's forward pre-hook)."""
        for site in self.sites:
            if site.fixed is None:
                site.sampled = self.draw()

    def state(self) -> dict[str, int]:
        return {"seed": self.seed, "draws": self.draws}

    def restore(self, seed: int, draws: int) -> None:
        """Re-seed with ``seed`` and replay ``draws`` draws."""
        self.seed, self.draws = int(seed), 0
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        for _ in range(int(draws)):
            self.draw()


class GloraSuperDelta(GloraDelta):
    """One site of the authors' supernet (``SuperScalableLinear``): one set of tensors serves every
    subnet. ``glora_{A,B}d`` ``[out, r]``, ``glora_{A,B}u`` ``[r, in]``, ``glora_Cd`` ``[in, r]``,
    ``glora_Cu`` ``[r, 1]``, ``glora_D``, ``glora_E`` ``[out]``; a ``vector`` A/B/C is the first column of
    its ``*d`` tensor, a ``constant`` A/B its ``[0, 0]`` entry, a ``constant`` D/E its first entry.

    The forward uses the fixed subnet (``fixed``, :func:`set_subnet`) or else ``sampled``, the choice the
    shared :class:`SubnetSampler` drew when the model was called (in train and in eval mode, as the
    authors' layer draws); ``choice`` is the choice of the last forward. A site without a bias has no C,
    D, E (as :class:`GloraDelta`; it still takes its draw). Never mergeable: export the subnet as a fixed
    ``glora`` to merge it.
    """

    mergeable = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        has_bias: bool,
        sampler: SubnetSampler,
        init: str = "kaiming",
    ) -> None:
        Delta.__init__(self)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.has_bias = has_bias
        self.sampler = sampler  # shared by every site of the model (a plain attribute)
        self.fixed: dict[str, str] | None = None
        self.sampled: dict[str, str] | None = None
        self.choice = {k: "none" for k in "ABCDE"}
        self._host = None
        for key in "AB":
            self._make(key, "lora", (out_features, in_features), init)
        if has_bias:
            self._make("C", "lora", (in_features, 1), init)
            self.glora_D = nn.Parameter(torch.zeros(out_features))
            self.glora_E = nn.Parameter(torch.zeros(out_features))

    def support(self, key: str) -> Tensor | None:
        """Support ``key`` of the current choice, as a view of the supernet tensors."""
        form = self.choice[key]
        if form == "none":
            return None
        if key in "DE":
            tensor = getattr(self, f"glora_{key}")
            return tensor if form == "vector" else tensor[0]
        down = getattr(self, f"glora_{key}d")
        if form == "lora":
            return down @ getattr(self, f"glora_{key}u")
        return down[:, :1] if form == "vector" else down[0, 0]

    def _choose(self) -> None:
        """Take this forward's subnet: the fixed one, else the one the sampler drew for the step."""
        if self.fixed is None and self.sampled is None:  # called before the model ever was
            self.sampler.step()
        choice = self.fixed if self.fixed is not None else self.sampled
        if not self.has_bias:
            choice = {**choice, "C": "none", "D": "none", "E": "none"}
        self.choice = choice

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        self._choose()
        return super().forward(x, weight)

    def dense_update(self, weight: Tensor) -> DenseUpdate:
        self._choose()
        return super().dense_update(weight)

    def delta_weight(self, weight: Tensor) -> Tensor:
        raise ValueError(
            "a glora supernet site has no single weight; fix a subnet and export it as a fixed glora "
            "(petl_zoo.methods.glora_search.export_subnet) to merge"
        )

    def extra_repr(self) -> str:
        subnet = "sampled" if self.fixed is None else ",".join(self.fixed[k] for k in "ABCDE")
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, supernet, subnet={subnet}"


def supernet_deltas(model: nn.Module) -> list[GloraSuperDelta]:
    """The supernet sites of ``model`` in the ``layers`` order (a ValueError on any other model)."""
    method = getattr(model, "petl_method", None)
    if not isinstance(method, Glora) or not method.config.supernet:
        name = "no method" if method is None else f"method {method.name!r} ({method.config})"
        raise ValueError(f"model has {name}; expected petl_zoo.create('glora', model, supernet=True)")
    return list(method.sampler.sites)


def set_subnet(model: nn.Module, layers: Sequence[str] | None) -> None:
    """Fix one subnet of a glora supernet: ``layers`` is one ``"A,B,C,D,E"`` entry per site, in the order
    of the ``layers`` option; None goes back to sampling a choice per forward."""
    deltas = supernet_deltas(model)
    if layers is None:
        for delta in deltas:
            delta.fixed = None
        return
    if isinstance(layers, str) or len(layers) != len(deltas):
        got = repr(layers) if isinstance(layers, str) else f"{len(layers)} entries"
        raise ValueError(f"set_subnet needs one 'A,B,C,D,E' entry per site ({len(deltas)}), got {got}")
    choices = [parse_layer_choice(entry) for entry in layers]
    for delta, choice in zip(deltas, choices):
        delta.fixed = choice


def get_subnet(model: nn.Module) -> tuple[str, ...] | None:
    """The fixed subnet of a glora supernet (``layers`` entries), None while it samples."""
    deltas = supernet_deltas(model)
    if any(d.fixed is None for d in deltas):
        return None
    return tuple(",".join(d.fixed[k] for k in "ABCDE") for d in deltas)


def support_parameters(key: str, form: str, in_features: int, out_features: int, rank: int) -> int:
    """Trainable values of support ``key`` in ``form`` on a site (the authors' ``get_param_tensor``):
    ``lora`` ``r (rows + cols)``, ``vector`` ``rows``, ``constant`` 1, ``none`` 0, with ``rows x cols``
    ``out x in`` for A, B; ``in x 1`` for C; ``out`` for D, E."""
    rows, cols = (in_features, 1) if key == "C" else (out_features, in_features)
    sizes = {"lora": rank * (rows + cols), "vector": rows, "constant": 1, "none": 0}
    if form not in sizes or form not in SUPPORT_CHOICES[key]:
        raise ValueError(f"bad form {form!r} for support {key}; valid: {', '.join(SUPPORT_CHOICES[key])}")
    return sizes[form]


def subnet_parameters(model: nn.Module, layers: Sequence[str]) -> int:
    """Trainable values of the subnet ``layers`` of a glora supernet: the authors' count (per site, the
    sum of :func:`support_parameters`; the head excluded), which is also what the exported fixed
    ``glora`` trains. A site without a bias counts no C, D, E (it has none; the authors count them)."""
    deltas = supernet_deltas(model)
    if isinstance(layers, str) or len(layers) != len(deltas):
        raise ValueError(
            f"subnet_parameters needs one 'A,B,C,D,E' entry per site ({len(deltas)}), got {layers!r}"
        )
    total = 0
    for delta, entry in zip(deltas, layers):
        choice = parse_layer_choice(entry)
        keys = "ABCDE" if delta.has_bias else "AB"
        total += sum(
            support_parameters(k, choice[k], delta.in_features, delta.out_features, delta.rank) for k in keys
        )
    return total


def _sites(model: nn.Module, target: str) -> list[LinearSite]:
    """``linear_sites(model, target)``; ``qkv`` on a host with separate ``q_proj``/``k_proj``/``v_proj``
    (Eva with ``qkv_fused=False``) is the three of them: the same weights as a fused ``qkv``."""
    if target == "qkv":
        try:
            return linear_sites(model, "qkv")
        except ValueError as err:
            if "separate q_proj/k_proj/v_proj" not in str(err):
                raise
            return [site for part in ("q", "k", "v") for site in linear_sites(model, part)]
    return linear_sites(model, target)


def ordered_sites(model: nn.Module, targets: tuple[str, ...]) -> list[LinearSite]:
    """The sites of ``targets`` in the authors' order: block by block, within a block ``qkv`` (``q``,
    ``k``, ``v``), ``proj``, ``fc1``, ``fc2`` (their ``named_modules`` order of the Linears)."""
    sites = [site for target in targets for site in _sites(model, target)]
    return sorted(sites, key=lambda s: (s.block.index, _SITE_ORDER.index(s.target), s.start))


@register_method(
    "glora",
    "GLoRA: W' = W0 + W0*A + B, b' = b0 + b0*D + E + W0 C on every Linear; mergeable without C, D, E",
)
class Glora(Method):
    config_class = GloraConfig
    identity_at_init = True

    def apply(self, model: nn.Module) -> None:
        cfg: GloraConfig = self.config
        sites = ordered_sites(model, cfg.targets)
        if cfg.supernet:
            self._apply_supernet(model, sites)
            return
        if cfg.layers and len(cfg.layers) != len(sites):
            raise ValueError(
                f"layers gives {len(cfg.layers)} choices but the targets {cfg.targets} have {len(sites)} sites"
            )
        choices = [parse_layer_choice(t) for t in cfg.layers] if cfg.layers else [cfg.choice()] * len(sites)
        for site, choice in zip(sites, choices):
            layer = adapt_linear(site)
            has_bias = layer.base.bias is not None
            delta = GloraDelta(site.in_features, site.out_features, cfg.rank, choice, has_bias, cfg.init)
            delta.bind(layer.base, site.start, site.stop)
            layer.add_delta(f"glora_{site.target}", delta, site.start, site.stop)

    def _apply_supernet(self, model: nn.Module, sites: list[LinearSite]) -> None:
        cfg: GloraConfig = self.config
        self.sampler = SubnetSampler(torch.initial_seed() if cfg.seed is None else cfg.seed)
        for site in sites:
            layer = adapt_linear(site)
            has_bias = layer.base.bias is not None
            delta = GloraSuperDelta(
                site.in_features, site.out_features, cfg.rank, has_bias, self.sampler, cfg.init
            )
            delta.bind(layer.base, site.start, site.stop)
            layer.add_delta(f"glora_{site.target}", delta, site.start, site.stop)
            self.sampler.sites.append(delta)
        self.hooks.add_forward_pre_hook(model, self.sampler.step)

    def get_state(self) -> dict[str, Any]:
        """A supernet's sampler position (``seed``, ``draws``) and its fixed subnet, if any; {} otherwise."""
        if not self.config.supernet:
            return {}
        state: dict[str, Any] = {"sampler": self.sampler.state()}
        fixed = [d.fixed for d in self.sampler.sites]
        if all(f is not None for f in fixed):
            state["subnet"] = [",".join(f[k] for k in "ABCDE") for f in fixed]
        return state

    def set_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        if not self.config.supernet or not state:
            super().set_state(model, state)
            return
        unknown = sorted(set(state) - {"sampler", "subnet"})
        if unknown:
            raise ValueError(f"glora supernet state has unknown keys {unknown}; valid: sampler, subnet")
        self.sampler.restore(**state["sampler"])
        set_subnet(model, state.get("subnet"))
