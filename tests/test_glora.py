"""GLoRA: counts, identity at init, the formula, merge where mergeable, save/load, options, parity in
float64 with Hugging Face peft 0.21 (fused qkv; q, v against peft on split q/k/v Linears; every Linear
of a block) and with the authors' supernet layer (Arnav0400/ViT-Slim GLoRA/layer.py) re-hosted with a
fixed per-layer configuration."""

from __future__ import annotations

import copy
import itertools

import pytest
import timm
import torch
from conftest import perturb_, tiny_host, tiny_vit
from peft_parity import assert_same_outputs_and_grads, fp64_pair, images64, split_qkv
from torch import Tensor, nn
from torch.nn import functional as F

import petl_zoo
from petl_zoo.methods.glora import GloraConfig, GloraDelta, parse_layer_choice

#: peft's default GloraConfig (r=8, config_A_B="lora", config_C="lora", config_D_E="constant").
PEFT_DEFAULT = dict(a="lora", b="lora", c="lora", d="constant", e="constant")


def glora_deltas(model: nn.Module) -> dict[str, GloraDelta]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GloraDelta)}


def site_params(delta: GloraDelta, in_f: int, out_f: int, rank: int) -> int:
    """Trainable values of one site from the choice (the authors' ``get_param_tensor`` count)."""
    sizes = {"lora": None, "vector": None, "constant": 1, "none": 0}
    total = 0
    for key in "ABCDE":
        form = delta.choice[key]
        rows, cols = (in_f, 1) if key == "C" else (out_f, in_f)
        sizes["lora"] = rank * (rows + cols)
        sizes["vector"] = rows
        total += sizes[form]
    return total


# ---------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, 2_875_776),  # default: peft's default with config_D_E="none", every Linear of every block
        (dict(rank=4), 1_437_888),
        (dict(d="constant", e="constant"), 2_875_872),  # peft's default GloraConfig exactly: + 48 x 2
        (dict(d="vector", e="vector"), 2_875_776 + 2 * 12 * (2304 + 768 + 3072 + 768)),
        (dict(targets=("q", "v")), 24 * (2 * 8 * (768 + 768) + 8 * 769)),
        (
            dict(a="vector", b="vector", c="vector", d="vector", e="vector"),
            12 * ((4 * 2304 + 768) + (4 * 768 + 768) + (4 * 3072 + 768) + (4 * 768 + 3072)),
        ),
        (dict(a="none", b="none", c="none", d="none", e="none"), 0),
    ],
)
def test_vit_base_counts(options, expected):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    petl_zoo.create("glora", model, **options)
    assert petl_zoo.trainable_parameters(model)["method"] == expected
    deltas = glora_deltas(model)
    assert len(deltas) == (24 if "targets" in options else 48)  # 12 blocks x qkv, proj, fc1, fc2
    rank = options.get("rank", 8)
    assert expected == sum(site_params(d, d.in_features, d.out_features, rank) for d in deltas.values())


def test_defaults():
    cfg = GloraConfig()
    assert cfg.rank == 8 and cfg.targets == ("qkv", "proj", "fc1", "fc2") and cfg.init == "kaiming"
    assert cfg.choice() == dict(A="lora", B="lora", C="lora", D="none", E="none")


# ---------------------------------------------------------------------------- init, formula, merging

CONFIGS = [
    PEFT_DEFAULT,
    dict(a="vector", b="constant", c="vector", d="vector", e="none"),
    dict(a="constant", b="none", c="none", d="none", e="vector"),
    dict(a="none", b="vector", c="lora", d="vector", e="constant"),
    dict(a="lora", b="vector", c="none", d="none", e="none"),  # mergeable
]


@pytest.mark.parametrize("init", ["kaiming", "xavier"])
@pytest.mark.parametrize("choice", CONFIGS)
def test_identity_at_init(choice, init, images):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    model = petl_zoo.create("glora", copy.deepcopy(pristine), init=init, **choice).eval()
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))
    for d in glora_deltas(model).values():
        for name, p in d.named_parameters():
            assert (p.abs().sum() > 0) == name.endswith("u")  # only the Xu factors are drawn


@pytest.mark.parametrize("choice", CONFIGS)
def test_forward_follows_the_formula(choice):
    torch.manual_seed(0)
    model = petl_zoo.create("glora", tiny_vit().double(), targets=("q", "v", "fc1"), **choice).eval()
    perturb_(model, std=0.3)
    for layer in (model.blocks[0].attn.qkv, model.blocks[1].mlp.fc1):
        w0, b0 = layer.base.weight.detach(), layer.base.bias.detach()
        w, b = w0.clone(), b0.clone()
        for name, (start, stop) in layer.slices.items():
            d = layer.deltas[name]
            ws, bs = w0[start:stop], b0[start:stop]
            sup = {k: d.support(k) for k in "ABCDE"}
            zero = torch.zeros((), dtype=w.dtype)
            a, bb, c, dd, e = (zero if sup[k] is None else sup[k] for k in "ABCDE")
            w[start:stop] = ws + ws * a + bb
            c_term = zero if sup["C"] is None else (ws @ c)[:, 0]
            b[start:stop] = bs + bs * dd + e + c_term
        x = torch.randn(4, 7, 48, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, w, b), atol=1e-12, rtol=0)


def test_merge_and_unmerge_exact_where_mergeable(images):
    torch.manual_seed(0)
    pristine = tiny_vit().eval()
    model = petl_zoo.create("glora", copy.deepcopy(pristine), a="lora", b="vector", c="none").eval()
    assert petl_zoo.is_mergeable(model)
    perturb_(model)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    qkv = model.blocks[0].attn.qkv
    d = qkv.deltas["glora_qkv"]
    w0 = qkv.base.weight.detach().clone()
    expected = w0 + w0 * (d.glora_Ad @ d.glora_Au) + d.glora_B
    with torch.no_grad():
        tuned = model(images)
    petl_zoo.merge(model)
    torch.testing.assert_close(qkv.base.weight, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), tuned, atol=1e-5, rtol=1e-5)
    petl_zoo.unmerge(model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    plain = petl_zoo.merge(copy.deepcopy(model), unload=True)
    assert plain.state_dict().keys() == pristine.state_dict().keys()


@pytest.mark.parametrize("bias_support", ["c", "d", "e"])
def test_an_active_bias_support_blocks_the_merge(bias_support):
    torch.manual_seed(0)
    options = dict(c="none", d="none", e="none")
    options[bias_support] = "vector"
    model = petl_zoo.create("glora", tiny_vit(), **options)
    assert not petl_zoo.is_mergeable(model)
    with pytest.raises(ValueError, match="method 'glora' cannot be merged"):
        petl_zoo.merge(model)


def test_bias_free_linear_gets_no_bias_supports():
    """peft's rule: C, D, E are dropped on a Linear without a bias (Eva's separate k_proj)."""
    torch.manual_seed(0)
    model = petl_zoo.create("glora", tiny_host("eva_sep"), **PEFT_DEFAULT)
    k = model.blocks[0].attn.k_proj
    assert k.base.bias is None
    delta = k.deltas["glora_k"]
    assert delta.mergeable and {n for n, _ in delta.named_parameters()} == {
        "glora_Ad",
        "glora_Au",
        "glora_Bd",
        "glora_Bu",
    }
    assert not model.blocks[0].attn.q_proj.deltas["glora_q"].mergeable


def test_constant_e_before_a_layernorm_is_dead():
    """A scalar E on proj / fc2 shifts every channel of the pre-norm residual stream equally, which every
    LayerNorm after it removes: its gradient vanishes (why E is not ``constant`` by default); on qkv it
    is alive."""
    torch.manual_seed(0)
    model = petl_zoo.create("glora", tiny_vit().double(), c="none", d="none", e="constant").eval()
    perturb_(model, std=0.3)
    model(images64()).square().sum().backward()
    grads = {n: float(d.glora_E.grad.abs()) for n, d in glora_deltas(model).items()}
    for name, g in grads.items():
        if name.endswith(("glora_proj", "glora_fc2")):
            assert g < 1e-10, name
        else:
            assert g > 1e-3, name


def test_save_load_exact(tmp_path, images):
    torch.manual_seed(0)
    pristine = tiny_vit()
    layers = tuple(
        ",".join(c)
        for c in itertools.islice(
            itertools.product(
                ("lora", "vector", "constant"),
                ("none", "lora"),
                ("lora", "vector"),
                ("vector",),
                ("constant",),
            ),
            8,
        )
    )
    model = petl_zoo.create("glora", copy.deepcopy(pristine), layers=layers, init="xavier").eval()
    perturb_(model)
    petl_zoo.save_adapter(model, tmp_path / "g")
    fresh = petl_zoo.load_adapter(copy.deepcopy(pristine), tmp_path / "g").eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    assert [d.choice for d in glora_deltas(fresh).values()] == [
        d.choice for d in glora_deltas(model).values()
    ]


def test_options_validated():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        GloraConfig(rank=0)
    with pytest.raises(ValueError, match="bad value 'lora' for option 'd'"):
        petl_zoo.create("glora", tiny_vit(), d="lora")
    with pytest.raises(ValueError, match="bad choice 'constant' for support C"):
        GloraConfig(layers=("lora,lora,constant,none,none",))
    with pytest.raises(ValueError, match="five comma-separated choices"):
        parse_layer_choice("lora,lora")
    with pytest.raises(ValueError, match="layers gives 1 choices but the targets"):
        petl_zoo.create("glora", tiny_vit(), layers=("lora,lora,lora,none,none",))
    with pytest.raises(ValueError, match="unknown target 'mlp' for method 'glora'"):
        petl_zoo.create("glora", tiny_vit(), targets=("mlp",))


# ------------------------------------------------------------------------------------ peft parity


def _peft_config(peft, choice: dict[str, str], targets, rank: int = 4):
    assert choice["a"] == choice["b"] and choice["d"] == choice["e"], "peft ties A/B and D/E"
    return peft.GloraConfig(
        r=rank,
        target_modules=targets,
        config_A_B=choice["a"],
        config_C=choice["c"],
        config_D_E=choice["d"],
    )


def _tied_pairs(ours: nn.Module, peft_model: nn.Module, peft_path, seed: int = 3):
    """Perturb peft's GLoRA tensors, copy them into ours; the (ours, peft) pairs."""
    g = torch.Generator().manual_seed(seed)
    root = peft_model.base_model.model
    pairs = []
    for name, delta in glora_deltas(ours).items():
        layer = root.get_submodule(peft_path(name))
        for key in "ABCDE":
            form = delta.choice[key]
            if form == "none":
                continue
            path = getattr(layer, f"glora_{key}")["default"]
            mapping = (
                [(f"glora_{key}d", path.Xd), (f"glora_{key}u", path.Xu)]
                if form == "lora"
                else [(f"glora_{key}", path.X)]
            )
            for mine_name, theirs in mapping:
                mine = getattr(delta, mine_name)
                assert mine.shape == theirs.shape, (name, mine_name)
                with torch.no_grad():
                    theirs.add_(0.3 * torch.randn(theirs.shape, generator=g, dtype=theirs.dtype))
                    mine.copy_(theirs)
                pairs.append((mine, theirs))
    return pairs


def _fused_path(name: str) -> str:
    return name.rsplit(".deltas.", 1)[0]


def _split_path(name: str) -> str:
    layer, _, delta = name.rpartition(".deltas.")
    return f"{layer}.{delta.removeprefix('glora_')}"


PEFT_CHOICES = [
    dict(a=ab, b=ab, c=c, d=de, e=de)
    for ab, c, de in itertools.product(
        ("lora", "vector", "constant", "none"), ("lora", "vector", "none"), ("vector", "constant", "none")
    )
]


def _check_merged_like_peft(ours: nn.Module, peft_model: nn.Module, peft_path) -> None:
    """``W0 + delta_W`` and ``b0 + delta_b`` of every delta equal peft's merged weight and bias."""
    root = peft_model.base_model.model
    peft_model.merge_adapter()
    try:
        for name, delta in glora_deltas(ours).items():
            layer = ours.get_submodule(_fused_path(name))
            start, stop = layer.slices[name.rsplit(".", 1)[1]]
            w0 = layer.base.weight[start:stop].detach()
            b0 = layer.base.bias[start:stop].detach()
            with torch.no_grad():
                dw, db = delta.weight_update(w0), delta.bias_update(w0)
            theirs = root.get_submodule(peft_path(name)).get_base_layer()
            torch.testing.assert_close(w0 if dw is None else w0 + dw, theirs.weight, atol=1e-12, rtol=0)
            torch.testing.assert_close(b0 if db is None else b0 + db, theirs.bias, atol=1e-12, rtol=0)
    finally:
        peft_model.unmerge_adapter()


@pytest.mark.parametrize("choice", PEFT_CHOICES, ids=lambda c: "-".join(c[k] for k in "ace"))
def test_matches_peft_fused_qkv(choice):
    peft = pytest.importorskip("peft")
    ours, theirs = fp64_pair()
    petl_zoo.create("glora", ours, rank=4, targets=("qkv",), **choice).eval()
    peft_model = peft.get_peft_model(theirs, _peft_config(peft, choice, ["qkv"])).eval()
    pairs = _tied_pairs(ours, peft_model, _fused_path)
    assert len(pairs) == 2 * sum(
        {"lora": 2, "vector": 1, "constant": 1, "none": 0}[choice[k]] for k in "abcde"
    )
    images = images64()
    if pairs:
        assert_same_outputs_and_grads(ours, peft_model, images, pairs)
    _check_merged_like_peft(ours, peft_model, _fused_path)
    if petl_zoo.is_mergeable(ours):
        with torch.no_grad():
            tuned = ours(images)
            petl_zoo.merge(ours)
            torch.testing.assert_close(ours(images), tuned, atol=1e-10, rtol=0)
            peft_model.merge_adapter()
            for i, block in enumerate(ours.blocks):
                merged = peft_model.base_model.model.blocks[i].attn.qkv.get_base_layer().weight
                torch.testing.assert_close(block.attn.qkv.base.weight, merged, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "choice", [PEFT_DEFAULT, *PEFT_CHOICES[1::5]], ids=lambda c: "-".join(c[k] for k in "ace")
)
def test_matches_peft_on_split_q_v(choice):
    peft = pytest.importorskip("peft")
    ours, theirs = fp64_pair()
    petl_zoo.create("glora", ours, rank=4, targets=("q", "v"), **choice).eval()
    peft_model = peft.get_peft_model(split_qkv(theirs), _peft_config(peft, choice, ["q", "v"])).eval()
    pairs = _tied_pairs(ours, peft_model, _split_path)
    assert pairs
    assert_same_outputs_and_grads(ours, peft_model, images64(), pairs)
    _check_merged_like_peft(ours, peft_model, _split_path)


def test_matches_peft_on_every_linear_of_a_block():
    """The default targets (qkv, proj, fc1, fc2) against peft on the same four Linears (a regex: peft's
    suffix match on 'proj' would also take the patch embedding's Conv2d)."""
    peft = pytest.importorskip("peft")
    ours, theirs = fp64_pair()
    petl_zoo.create("glora", ours, rank=4, **PEFT_DEFAULT).eval()
    regex = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
    peft_model = peft.get_peft_model(theirs, _peft_config(peft, PEFT_DEFAULT, regex)).eval()
    pairs = _tied_pairs(ours, peft_model, _fused_path)
    assert len(pairs) == 8 * 8  # 8 Linears x (Ad, Au, Bd, Bu, Cd, Cu, D, E)
    assert_same_outputs_and_grads(ours, peft_model, images64(), pairs)
    _check_merged_like_peft(ours, peft_model, _fused_path)


def test_same_seed_draws_peft_s_factors():
    peft = pytest.importorskip("peft")
    ours, theirs = fp64_pair()
    torch.manual_seed(5)
    petl_zoo.create("glora", ours, rank=4, targets=("qkv",), **PEFT_DEFAULT)
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(theirs, _peft_config(peft, PEFT_DEFAULT, ["qkv"]))
    root = peft_model.base_model.model
    for name, delta in glora_deltas(ours).items():
        layer = root.get_submodule(_fused_path(name))
        for key in "ABC":
            assert torch.equal(getattr(delta, f"glora_{key}u"), getattr(layer, f"glora_{key}")["default"].Xu)
            assert torch.equal(getattr(delta, f"glora_{key}d"), getattr(layer, f"glora_{key}")["default"].Xd)


# ------------------------------------------------------------------ the authors' layer, re-hosted


class AuthorsGlora(nn.Module):
    """The authors' ``SuperScalableLinear`` (ViT-Slim GLoRA/layer.py) with a fixed ``eval_config``,
    re-written for this test: supernet tensors ``Ad``/``Bd`` ``[out, r]``, ``Au``/``Bu`` ``[r, in]``,
    ``Cd`` ``[in, r]``, ``Cu`` ``[r, 1]``, ``D``, ``E`` ``[out]``; a ``vector`` A/B/C is the first column
    of its ``*d`` tensor, a ``constant`` its ``[0, 0]`` entry (``D[0]`` for D/E);
    ``y = x (W + W*A + B)^T + (b + b*D + E + (W C).squeeze())``."""

    def __init__(self, linear: nn.Linear, rank: int, config: dict[str, str]) -> None:
        super().__init__()
        out_f, in_f = linear.weight.shape
        kw = dict(dtype=linear.weight.dtype)
        self.weight, self.bias = linear.weight, linear.bias
        self.Ad, self.Au = (
            nn.Parameter(torch.zeros(out_f, rank, **kw)),
            nn.Parameter(torch.zeros(rank, in_f, **kw)),
        )
        self.Bd, self.Bu = (
            nn.Parameter(torch.zeros(out_f, rank, **kw)),
            nn.Parameter(torch.zeros(rank, in_f, **kw)),
        )
        self.Cd, self.Cu = (
            nn.Parameter(torch.zeros(in_f, rank, **kw)),
            nn.Parameter(torch.zeros(rank, 1, **kw)),
        )
        self.D, self.E = nn.Parameter(torch.zeros(out_f, **kw)), nn.Parameter(torch.zeros(out_f, **kw))
        self.config = config

    def path(self, form: str, down: Tensor, up: Tensor | None = None):
        if up is not None:
            return {
                "lora": lambda: down @ up,
                "vector": lambda: down[:, :1],
                "constant": lambda: down[0, 0],
                "none": lambda: torch.zeros(down.shape[0], up.shape[1], dtype=down.dtype),
            }[form]()
        return {
            "vector": lambda: down,
            "constant": lambda: down[0],
            "none": lambda: torch.zeros(1, dtype=down.dtype),
        }[form]()

    def forward(self, x):
        cfg = self.config
        a, b = self.path(cfg["A"], self.Ad, self.Au), self.path(cfg["B"], self.Bd, self.Bu)
        c = self.path(cfg["C"], self.Cd, self.Cu)
        d, e = self.path(cfg["D"], self.D), self.path(cfg["E"], self.E)
        weight = self.weight + self.weight * a + b
        bias = self.bias + self.bias * d + e + (self.weight @ c).squeeze()
        return F.linear(x, weight, bias)


AUTHORS_LAYERS = (
    "lora,lora,lora,constant,constant",
    "vector,constant,vector,vector,none",
    "constant,none,none,none,vector",
    "none,vector,lora,vector,constant",
    "lora,none,vector,constant,vector",
    "none,none,none,none,none",
    "vector,lora,none,none,constant",
    "constant,constant,lora,vector,vector",
)


def _authors_view(layer: AuthorsGlora, key: str, form: str, suffix: str, which: str) -> Tensor:
    """The authors' tensor (or its value / gradient slice) that our ``glora_{key}{suffix}`` stands for."""
    tensors = {"A": ("Ad", "Au"), "B": ("Bd", "Bu"), "C": ("Cd", "Cu"), "D": ("D",), "E": ("E",)}[key]
    if form == "lora":
        t = getattr(layer, tensors[0] if suffix == "d" else tensors[1])
        return t if which == "value" else t.grad
    t = getattr(layer, tensors[0])
    t = t if which == "value" else t.grad
    if key in "DE":
        return t if form == "vector" else t[:1]
    return t[:, :1] if form == "vector" else t[0, :1]


def authors_sites(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The Linears the authors' ``set_glora`` wraps, in their order: per block ``qkv``, ``proj``, ``fc1``,
    ``fc2`` as ``(parent, attribute)``."""
    return [
        (parent, attr)
        for block in model.blocks
        for parent, attr in (
            (block.attn, "qkv"),
            (block.attn, "proj"),
            (block.mlp, "fc1"),
            (block.mlp, "fc2"),
        )
    ]


def test_matches_the_authors_layer_with_a_per_layer_choice():
    """Every Linear of both blocks (the authors' 4 per block, in their order) with a different choice,
    through ``layers``; the authors' supernet tensors perturbed and their used parts copied into ours."""
    ours, theirs = fp64_pair()
    petl_zoo.create("glora", ours, rank=4, layers=AUTHORS_LAYERS).eval()
    authors: list[AuthorsGlora] = []
    for parent, attr in authors_sites(theirs):
        layer = AuthorsGlora(getattr(parent, attr), 4, parse_layer_choice(AUTHORS_LAYERS[len(authors)]))
        setattr(parent, attr, layer)
        authors.append(layer)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in authors:
            for p in (layer.Ad, layer.Au, layer.Bd, layer.Bu, layer.Cd, layer.Cu, layer.D, layer.E):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    deltas = list(glora_deltas(ours).values())
    assert [d.choice for d in deltas] == [a.config for a in authors]  # the authors' layer order
    links = []
    for delta, layer in zip(deltas, authors):
        for name, mine in delta.named_parameters():
            key, suffix = name[len("glora_")], name[len("glora_") + 1 :]
            form = delta.choice[key]
            with torch.no_grad():
                mine.copy_(_authors_view(layer, key, form, suffix, "value").reshape(mine.shape))
            links.append((mine, layer, key, form, suffix))
    assert links
    images = images64()
    out_ours, out_theirs = ours(images), theirs(images)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-10, rtol=0)
    weights = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(7), dtype=out_ours.dtype)
    (out_ours * weights).sum().backward()
    (out_theirs * weights).sum().backward()
    for mine, layer, key, form, suffix in links:
        expected = _authors_view(layer, key, form, suffix, "grad").reshape(mine.shape)
        torch.testing.assert_close(mine.grad, expected, atol=1e-10, rtol=0)
