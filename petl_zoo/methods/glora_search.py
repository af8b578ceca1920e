"""GLoRA's evolutionary search over a trained supernet, and the export of the chosen subnet.

The authors' search (Arnav0400/ViT-Slim ``GLoRA/evolution.py``, ``evolution_utils.py``,
``EvolutionSearcher``), re-written: a candidate is one ``"A,B,C,D,E"`` choice per supernet site (the
``layers`` format); it is *legal* when it was not scored before and its parameter count
(:func:`~petl_zoo.methods.glora.subnet_parameters`, the authors' ``get_param``) divided by 1e6 lies in
``[min_budget, budget]``; every legal candidate is scored once, with the supernet's weights (no
retraining), by ``score(model)`` after :func:`~petl_zoo.methods.glora.set_subnet` and ``model.eval()``.

1. ``population`` random legal candidates (each support's form uniform over its choices);
2. per generation (``generations`` times): the top ``select`` of everything scored so far are kept;
   ``mutations`` children each copy a random top parent and redraw every support with probability
   ``mutation_prob``; ``crossovers`` children take every support from one of two random top parents
   (each with probability 1/2); at most 10 tries per child wanted (illegal tries count); random legal
   candidates fill the generation up to ``population``.

Defaults are the authors' (``evolution.py``): population 50, select 10, 25 mutations with probability
0.2, 25 crossovers, 20 generations, seed 1, ``min_budget`` 0; ``budget`` is their ``--param-limits``
(millions of trainable values, head excluded; their default 1.0). The draws come from a
``random.Random(seed)`` in the authors' order of calls (candidates drawn in batches of 10, the rest of
a batch dropped when a step has what it needs; the D/E choices in their list order), so a run draws
what their searcher draws from ``random.seed(seed)`` on a model with the same sites.

Two differences. The best subnet is taken over every scored candidate: their loop scores the last
generation's children but ranks them only at the start of the next generation, which never comes, so
their final top list ignores them; we rank them once more at the end (this can change the winner). And
a random fill that finds no new legal candidate in ``max(10000, 100 * population)`` tries stops with
what it has (theirs loops forever, e.g. under a budget no subnet meets).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..api import adapter_state_dict, create, load_adapter_weights
from .glora import (
    SUPERNET_CHOICES,
    GloraConfig,
    GloraSuperDelta,
    get_subnet,
    parse_layer_choice,
    set_subnet,
    subnet_parameters,
    supernet_deltas,
)

__all__ = ["SearchResult", "evolution_search", "accuracy_score", "subnet_state_dict", "export_subnet"]

logger = logging.getLogger(__name__)

Candidate = tuple[tuple[str, ...], ...]  # per site, the forms of A, B, C, D, E
BATCH = 10  # the authors' stack_random_cand batch size


@dataclass
class SearchResult:
    """The search's answer: ``layers`` (one ``"A,B,C,D,E"`` per site) with its ``score`` and ``params``
    (trainable values, head excluded); ``top``: the final top-``select`` as (layers, score, params);
    ``history``: per generation, the top-``select`` scores it started from; ``evaluations``: subnets
    scored."""

    layers: tuple[str, ...]
    score: float
    params: int
    top: list[tuple[tuple[str, ...], float, int]] = field(default_factory=list)
    history: list[list[float]] = field(default_factory=list)
    evaluations: int = 0


def _layers(cand: Candidate) -> tuple[str, ...]:
    return tuple(",".join(site) for site in cand)


class _Searcher:
    """The authors' ``EvolutionSearcher`` state: the scored candidates and the running top list."""

    def __init__(self, model: nn.Module, score: Callable[[nn.Module], float], opts: dict[str, Any]) -> None:
        self.model, self.score, self.opts = model, score, opts
        self.sites = len(supernet_deltas(model))
        self.rng = random.Random(opts["seed"])
        self.seen: dict[Candidate, dict[str, float]] = {}
        self.top: list[Candidate] = []
        self.candidates: list[Candidate] = []

    def legal(self, cand: Candidate) -> bool:
        """Not scored before and within the budget: then scored (the authors' ``is_legal``)."""
        info = self.seen.setdefault(cand, {})
        if "score" in info:
            return False
        params = subnet_parameters(self.model, _layers(cand))
        info["params"] = params
        if params / 1e6 > self.opts["budget"] or params / 1e6 < self.opts["min_budget"]:
            return False
        set_subnet(self.model, _layers(cand))
        info["score"] = float(self.score(self.model))
        return True

    def random_candidate(self) -> Candidate:
        choose = self.rng.choice
        return tuple(tuple(choose(SUPERNET_CHOICES[k]) for k in "ABCDE") for _ in range(self.sites))

    def mutant(self) -> Candidate:
        parent = self.rng.choice(self.top)
        prob, out = self.opts["mutation_prob"], []
        for site in parent:
            forms = []
            for key, form in zip("ABCDE", site):
                forms.append(self.rng.choice(SUPERNET_CHOICES[key]) if self.rng.random() < prob else form)
            out.append(tuple(forms))
        return tuple(out)

    def crossover(self) -> Candidate:
        one, two = self.rng.choice(self.top), self.rng.choice(self.top)
        return tuple(tuple(self.rng.choice([a, b]) for a, b in zip(s1, s2)) for s1, s2 in zip(one, two))

    def batches(self, make: Callable[[], Candidate]) -> Iterator[Candidate]:
        """Candidates drawn ``BATCH`` at a time (the authors' ``stack_random_cand``)."""
        while True:
            yield from [make() for _ in range(BATCH)]

    def children(self, make: Callable[[], Candidate], wanted: int) -> list[Candidate]:
        """Up to ``wanted`` legal children in at most ``10 * wanted`` tries."""
        found: list[Candidate] = []
        stream, tries = self.batches(make), 10 * wanted
        while len(found) < wanted and tries > 0:
            tries -= 1
            cand = next(stream)
            if self.legal(cand):
                found.append(cand)
        return found

    def fill(self) -> None:
        """Random legal candidates until the generation has ``population`` (the authors' ``get_random``)."""
        wanted = self.opts["population"]
        stream, tries = self.batches(self.random_candidate), max(10_000, 100 * wanted)
        while len(self.candidates) < wanted and tries > 0:
            tries -= 1
            cand = next(stream)
            if self.legal(cand):
                self.candidates.append(cand)
        if len(self.candidates) < wanted:
            logger.warning(
                "glora search: found %d of %d legal subnets (budget %s M)",
                len(self.candidates),
                wanted,
                self.opts["budget"],
            )

    def rank(self) -> None:
        """Top ``select`` of the kept list plus the generation (stable: earlier first among ties)."""
        merged = self.top + self.candidates
        merged.sort(key=lambda c: self.seen[c]["score"], reverse=True)
        self.top = merged[: self.opts["select"]]
        if not self.top:
            raise ValueError(
                f"glora search: no subnet within the budget [{self.opts['min_budget']}, {self.opts['budget']}] M"
            )

    def result(self, history: list[list[float]]) -> SearchResult:
        top = [(_layers(c), self.seen[c]["score"], int(self.seen[c]["params"])) for c in self.top]
        evaluations = sum("score" in info for info in self.seen.values())
        return SearchResult(*top[0], top=top, history=history, evaluations=evaluations)


def _check_options(opts: dict[str, Any]) -> None:
    for name in ("population", "select", "generations"):
        if not isinstance(opts[name], int) or opts[name] < 1:
            raise ValueError(f"glora search: {name} must be a positive integer, got {opts[name]!r}")
    for name in ("mutations", "crossovers"):
        if not isinstance(opts[name], int) or opts[name] < 0:
            raise ValueError(f"glora search: {name} must be an integer >= 0, got {opts[name]!r}")
    if not 0 <= opts["mutation_prob"] <= 1:
        raise ValueError(f"glora search: mutation_prob must be in [0, 1], got {opts['mutation_prob']!r}")
    if not 0 <= opts["min_budget"] <= opts["budget"]:
        raise ValueError(
            f"glora search: need 0 <= min_budget <= budget (millions), got {opts['min_budget']!r}, {opts['budget']!r}"
        )


def evolution_search(
    model: nn.Module,
    score: Callable[[nn.Module], float],
    budget: float,
    *,
    min_budget: float = 0.0,
    population: int = 50,
    select: int = 10,
    mutations: int = 25,
    crossovers: int = 25,
    mutation_prob: float = 0.2,
    generations: int = 20,
    seed: int = 1,
) -> SearchResult:
    """The authors' evolutionary search (module docstring) on a trained glora supernet ``model``
    (``petl_zoo.create('glora', model, supernet=True)``): ``score(model)`` scores the subnet that is
    fixed on it (higher is better, e.g. :func:`accuracy_score` on a held-out split), ``budget`` /
    ``min_budget`` bound a subnet's trainable values in millions. Leaves the best subnet fixed on the
    model, in eval mode; the tensors are not changed."""
    opts = dict(
        budget=budget,
        min_budget=min_budget,
        population=population,
        select=select,
        mutations=mutations,
        crossovers=crossovers,
        mutation_prob=mutation_prob,
        generations=generations,
        seed=seed,
    )
    _check_options(opts)
    model.eval()
    search = _Searcher(model, score, opts)
    search.fill()
    history: list[list[float]] = []
    for generation in range(generations):
        search.rank()
        history.append([search.seen[c]["score"] for c in search.top])
        logger.info("glora search: generation %d, top scores %s", generation, history[-1][:3])
        mutants = search.children(search.mutant, mutations)
        crossed = search.children(search.crossover, crossovers)
        search.candidates = mutants + crossed
        search.fill()
    search.rank()
    result = search.result(history)
    set_subnet(model, result.layers)
    return result


def accuracy_score(
    loader: Iterable[Any], device: torch.device | str | None = None
) -> Callable[[nn.Module], float]:
    """A ``score`` for :func:`evolution_search`: top-1 accuracy in percent of ``model`` over ``loader``
    (``(images, labels)`` batches), without gradients, inputs moved to ``device`` (default: the
    model's)."""

    def score(model: nn.Module) -> float:
        target = device if device is not None else next(model.parameters()).device
        correct = total = 0
        with torch.no_grad():
            for batch in loader:
                x, y = batch[0], batch[1]
                pred = model(x.to(target)).argmax(dim=-1).cpu()
                correct += int((pred == y.cpu()).sum())
                total += int(y.numel())
        if not total:
            raise ValueError("accuracy_score: the loader gave no samples")
        return 100.0 * correct / total

    return score


def _site_tensors(delta: GloraSuperDelta, choice: dict[str, str]) -> dict[str, Tensor]:
    """The fixed ``GloraDelta`` tensors of ``choice`` (by their name in it) as copies of the supernet's."""
    out: dict[str, Tensor] = {}
    keys = "ABCDE" if delta.has_bias else "AB"
    for key in keys:
        form = choice[key]
        if form == "none":
            continue
        if key in "DE":
            tensor = getattr(delta, f"glora_{key}")
            out[f"glora_{key}"] = tensor if form == "vector" else tensor[:1]
        elif form == "lora":
            out[f"glora_{key}d"] = getattr(delta, f"glora_{key}d")
            out[f"glora_{key}u"] = getattr(delta, f"glora_{key}u")
        else:
            down = getattr(delta, f"glora_{key}d")
            out[f"glora_{key}"] = down[:, :1] if form == "vector" else down[0, :1]
    return {name: t.detach().clone() for name, t in out.items()}


def subnet_state_dict(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The adapter tensors (``petl_zoo.adapter_state_dict`` names) of the fixed ``glora`` with
    ``layers=layers`` that computes what the supernet ``model`` computes with that subnet fixed: the
    used views of the supernet tensors, copied, plus the head. ``layers`` defaults to the fixed subnet."""
    deltas = supernet_deltas(model)
    layers = get_subnet(model) if layers is None else tuple(layers)
    if layers is None:
        raise ValueError("subnet_state_dict: no subnet is fixed on the model; pass layers or call set_subnet")
    if len(layers) != len(deltas):
        raise ValueError(
            f"subnet_state_dict needs one 'A,B,C,D,E' entry per site ({len(deltas)}), got {len(layers)}"
        )
    names = {id(m): n for n, m in model.named_modules()}
    owned = {id(p) for d in deltas for p in d.parameters()}
    state = {k: v.detach().clone() for k, v in adapter_state_dict(model).items() if id(v) not in owned}
    for delta, entry in zip(deltas, layers):
        prefix = names[id(delta)]
        for name, tensor in _site_tensors(delta, parse_layer_choice(entry)).items():
            state[f"{prefix}.{name}"] = tensor
    return state


def export_subnet(model: nn.Module, host: nn.Module, layers: Sequence[str] | None = None) -> nn.Module:
    """Patch ``host`` (an unpatched model with the supernet's frozen weights and head shape) with the
    fixed ``glora`` of subnet ``layers`` (default: the one fixed on the supernet ``model``) and load the
    supernet's tensors into it: its outputs equal the supernet's with that subnet fixed. Returns
    ``host``; it trains, saves and merges (without C, D, E) as any ``glora``."""
    layers = get_subnet(model) if layers is None else tuple(layers)
    state = subnet_state_dict(model, layers)
    supernet_deltas(model)  # a ValueError unless model is a glora supernet
    cfg: GloraConfig = model.petl_method.config
    create("glora", host, rank=cfg.rank, init=cfg.init, targets=tuple(cfg.targets), layers=tuple(layers))
    load_adapter_weights(host, state, strict=True, source="the glora supernet's subnet")
    return host
