"""The one-pass low-rank path of AdaptedLinear (LowRank): same outputs, gradients, merges and state
dicts as adding each delta's own forward to its slice."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_, tiny_vit
from torch import Tensor, nn
from torch.nn import functional as F

import petl_zoo
from petl_zoo.layers import AdaptedLinear, Delta, DenseUpdate, LowRank, dropped_linear
from petl_zoo.methods.heat import HeadLoraDelta
from petl_zoo.methods.lora import LoraDelta
from petl_zoo.methods.spt import SptLora


def per_delta(layer: AdaptedLinear, x: Tensor) -> Tensor:
    """The reference: the base output plus every delta's own forward on its slice, one at a time."""
    y = layer.base(x)
    width = y.shape[-1]
    for name, delta in layer.deltas.items():
        start, stop = layer.slices[name]
        y = y + F.pad(delta(x, layer.base.weight[start:stop]), (start, width - stop))
    return y


def qkv_layer(method: str, dtype: torch.dtype = torch.float64, **options) -> AdaptedLinear:
    model = tiny_vit()
    petl_zoo.create(method, model, **options)
    perturb_(model, std=0.3)
    return model.blocks[0].attn.qkv.to(dtype)


@pytest.mark.parametrize(
    "method, options",
    [
        ("lora", dict(targets=("q", "v"))),
        ("lora", dict(targets=("q", "k", "v", "qkv"), alpha=3.0)),  # overlapping slices, scaling != 1
        ("lora", dict(targets=("k",))),
        ("neat", dict(targets=("q", "v"), depth=1, act="gelu", scale=0.5)),
        ("neat", dict(targets=("v", "q"), rank=3)),
    ],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "added"])
def test_one_pass_matches_per_delta_outputs_and_gradients(method, options, fused):
    """Both one-pass forms: ``F.linear(x, W0 + U D, b)`` on a plain Linear and ``y + (x D^T) U^T``
    (taken when the Linear has hooks of its own)."""
    layer = qkv_layer(method, **options)
    if not fused:
        layer.base.register_forward_hook(lambda module, args, out: None)
    assert layer._fusable([]) is fused
    assert all(
        d.low_rank(layer.base.weight[s:e]) is not None
        for d, (s, e) in zip(layer.deltas.values(), layer.slices.values())
    )
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 144, dtype=torch.float64)
    params = [x, *layer.deltas.parameters()]
    ours = layer(x)
    ours_grads = torch.autograd.grad(ours, params, grad)
    ref = per_delta(layer, x)
    ref_grads = torch.autograd.grad(ref, params, grad)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    layer32 = layer.float()  # fp32: the same to 1e-6 of the output's scale (round-off of the summation order)
    ref32 = per_delta(layer32, x.float()).detach()
    scale = float(ref32.abs().max())
    torch.testing.assert_close(layer32(x.float()).detach(), ref32, atol=1e-6 * scale, rtol=0)
    with torch.no_grad():  # inference: every delta through its own forward, as before
        assert torch.equal(layer32(x.float()), per_delta(layer32, x.float()))


def test_trainable_base_weight_and_bias_get_their_gradients_in_the_fused_form():
    layer = qkv_layer("lora")
    layer.base.requires_grad_(True)
    x = torch.randn(4, 48, dtype=torch.float64, requires_grad=True)
    params = [x, layer.base.weight, layer.base.bias, *layer.deltas.parameters()]
    for a, b in zip(
        torch.autograd.grad(layer(x).sum(), params), torch.autograd.grad(per_delta(layer, x).sum(), params)
    ):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_fused_form_under_autocast_matches_the_added_form():
    layer = qkv_layer("lora", dtype=torch.float32)
    x = torch.randn(2, 6, 48)
    outs, grads = [], []
    for hooked in (False, True):
        if hooked:
            layer.base.register_forward_hook(lambda module, args, out: None)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(xi)
        out.float().square().sum().backward()
        outs.append(out)
        grads.append([xi.grad, *(p.grad.clone() for p in layer.deltas.parameters())])
        layer.zero_grad(set_to_none=True)
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], outs[1], atol=0.1, rtol=0.02)
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.05 * float(b.abs().max()), rtol=0)


def test_merge_of_one_pass_layer_is_exact_and_unmerge_restores_w0():
    layer = qkv_layer("lora")
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(3, 48, dtype=torch.float64)
    unmerged = layer(x).detach()  # gradients on: the one-pass form
    with torch.no_grad():
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-12, rtol=0)
        layer.unmerge()
    assert torch.equal(layer.base.weight, w0)
    assert torch.equal(layer(x).detach(), unmerged)


def test_state_dict_keys_and_shapes_are_the_per_slice_ones():
    def keys(method: str) -> dict[str, tuple[int, ...]]:
        model = tiny_vit()
        petl_zoo.create(method, model, rank=4)
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if "blocks.0.attn.qkv.deltas" in k}

    prefix = "blocks.0.attn.qkv.deltas"
    assert keys("lora") == {
        f"{prefix}.lora_q.lora_A": (4, 48),
        f"{prefix}.lora_q.lora_B": (48, 4),
        f"{prefix}.lora_v.lora_A": (4, 48),
        f"{prefix}.lora_v.lora_B": (48, 4),
    }
    assert keys("neat") == {
        f"{prefix}.neat_q.A": (4, 48),
        f"{prefix}.neat_q.B": (48, 4),
        f"{prefix}.neat_v.A": (4, 48),
        f"{prefix}.neat_v.B": (48, 4),
    }


def test_active_dropout_and_changed_forwards_keep_their_own_pass():
    delta = LoraDelta(8, 8, 2, 1.0, dropout=0.5)
    w = torch.zeros(8, 8)
    assert delta.train().low_rank(w) is None  # each slice draws its own mask, as before
    assert isinstance(delta.eval().low_rank(w), LowRank)
    assert LoraDelta(8, 8, 2, 1.0, dropout=0.0).train().low_rank(w) is not None
    assert HeadLoraDelta(8, 8, 2, 1.0, 0.0, 4).low_rank(w) is None  # its B rows are scattered per head
    scaled = LoraDelta(8, 8, 2, 2.5, dropout=0.0)
    perturb_(scaled)
    form = scaled.low_rank(w)
    torch.testing.assert_close(form.up, scaled.lora_B * 2.5)


def test_a_delta_with_forward_hooks_is_called_through_its_forward():
    layer = qkv_layer("lora", dtype=torch.float32)
    seen = []
    layer.deltas["lora_v"].register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(3, 48)
    out = layer(x)
    torch.testing.assert_close(out, per_delta(layer, x), atol=1e-6, rtol=1e-6)
    assert len(seen) == 2 and seen[0].shape == (3, 48)  # our forward, then the reference's


class RowScaled(Delta):
    """A DoRA-like delta: ``g * (x W0^T) + (x D^T) U^T`` with its own forward as the reference."""

    def __init__(self, features: int, out: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, features))
        self.up = nn.Parameter(torch.randn(out, rank))
        self.g = nn.Parameter(torch.randn(out))

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return self.g * F.linear(x, weight) + F.linear(F.linear(x, self.down), self.up)

    def low_rank(self, weight: Tensor) -> LowRank:
        return LowRank(self.down, self.up, self.g)


class Opaque(Delta):
    """A delta without a low-rank form (called through its forward)."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(out))

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return torch.tanh(x[..., : self.shift.shape[0]]) * self.shift


@pytest.mark.parametrize("bias", [True, False])
def test_base_scale_and_deltas_without_low_rank_form_mix(bias):
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(6, 12, bias=bias).double())
    layer.add_delta("a", RowScaled(6, 4, 2).double(), 0, 4)
    layer.add_delta("b", Opaque(4).double(), 2, 6)
    layer.add_delta("c", RowScaled(6, 6, 3).double(), 6, 12)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.deltas.parameters()]
    ours, ref = layer(x), per_delta(layer, x)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(ours.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_fused_form_on_a_bias_free_linear_with_a_delta_without_the_form():
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(6, 12, bias=False).double())
    layer.add_delta("a", LoraDelta(6, 4, 2, 0.5, 0.0).double(), 0, 4)
    layer.add_delta("b", Opaque(4).double(), 2, 6)
    layer.add_delta("c", LoraDelta(6, 6, 3, 1.0, 0.0).double(), 6, 12)
    perturb_(layer, std=0.5)
    assert layer._fusable([])
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.deltas.parameters()]
    ours, ref = layer(x), per_delta(layer, x)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(ours.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# -- the dense form: full-size updates folded into the layer's own product ------------------------------


class ReadsFrozenWeight(Delta):
    """``x (0.1 W0_slice)^T``: a delta that reads the frozen weight it is handed (as OFT with COFT)."""

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return F.linear(x, 0.1 * weight)


class CountingDense(Delta):
    """``x dW^T + db`` with ``dW``, ``db`` trained; counts how often its own forward runs."""

    def __init__(self, rows: int, cols: int, bias: bool) -> None:
        super().__init__()
        self.dw = nn.Parameter(torch.randn(rows, cols, dtype=torch.float64) * 0.1)
        self.db = nn.Parameter(torch.randn(rows, dtype=torch.float64) * 0.1) if bias else None
        self.calls = 0

    def forward(self, x: Tensor, weight: Tensor | None) -> Tensor:
        self.calls += 1
        return F.linear(x, self.dw.to(x.dtype), None if self.db is None else self.db.to(x.dtype))

    def dense_update(self, weight: Tensor):
        return DenseUpdate(self.dw, self.db)


def dense_layer(dtype: torch.dtype = torch.float64) -> AdaptedLinear:
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(6, 9, dtype=torch.float64))
    layer.add_delta("a", CountingDense(3, 6, bias=True), 0, 3)  # bias updates too (GLoRA's form)
    layer.add_delta("b", CountingDense(9, 6, bias=False), 0, 9)
    layer.add_delta("lora", LoraDelta(6, 3, rank=2, scaling=2.0, dropout=0.0), 6, 9)  # low-rank path
    layer.add_delta("frozen", ReadsFrozenWeight(), 0, 9)  # still handed W0 after the fold
    perturb_(layer, std=0.3)
    return layer.to(dtype)


@pytest.mark.parametrize("hooked_base", [False, True], ids=["folded", "separate"])
def test_dense_updates_fold_into_the_layer_product(hooked_base):
    """A training step folds ``dense_update`` into ``F.linear(x, W0 + dW, b + db)`` (the deltas' own
    forwards do not run) with the per-delta outputs and gradients; a hooked Linear keeps the forwards."""
    layer = dense_layer()
    if hooked_base:
        layer.base.register_forward_hook(lambda module, args, out: None)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 4, 9, dtype=torch.float64)
    params = [x, *layer.deltas.parameters()]
    ours = layer(x)
    ours_grads = torch.autograd.grad(ours, params, grad)
    calls = [d.calls for d in layer.deltas.values() if isinstance(d, CountingDense)]
    assert calls == ([1, 1] if hooked_base else [0, 0])
    with torch.no_grad():  # inference: every delta through its own forward
        torch.testing.assert_close(layer(x), ours, atol=1e-12, rtol=0)
    reference = per_delta(layer, x)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=0)
    for got, want in zip(ours_grads, torch.autograd.grad(reference, params, grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_half_precision_keeps_each_dense_update_apart():
    """In bf16, ``W0 + dW`` would round a small update away: each delta keeps its own product."""
    layer = dense_layer(torch.bfloat16)
    layer(torch.randn(2, 4, 6, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
    assert [d.calls for d in layer.deltas.values() if isinstance(d, CountingDense)] == [1, 1]


# -- LoRA with dropout: the dropped copy is rebuilt in backward, not kept -------------------------------


@pytest.mark.parametrize("method", ["lora", "spt_lora"])
def test_dropped_low_rank_equals_the_plain_form_and_keeps_no_dropped_copy(method):
    """Same outputs and gradients as ``(dropout(x) A^T) B^T`` under the same seed, and what the graph
    keeps: ``x`` and a bool mask, no float tensor of ``x``'s shape besides ``x`` itself."""
    torch.manual_seed(0)
    if method == "lora":
        delta = LoraDelta(48, 16, rank=4, scaling=2.0, dropout=0.1).double()
    else:
        delta = SptLora(48, 16, rank=4, dropout=0.1, drop_path=0.0).double()
    perturb_(delta, std=0.3)
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 16, dtype=torch.float64)
    params = [x, delta.lora_A, delta.lora_B]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        torch.manual_seed(1)
        ours = delta(x, None)
    torch.manual_seed(1)
    scaling = delta.scaling
    plain = F.linear(F.linear(F.dropout(x, 0.1), delta.lora_A), delta.lora_B) * scaling
    torch.testing.assert_close(ours, plain, atol=0, rtol=0)
    for got, want in zip(
        torch.autograd.grad(ours, params, grad), torch.autograd.grad(plain, params, grad), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-14, rtol=0)
    full_size = [t for t in kept if t.shape == x.shape]
    assert [t.dtype for t in full_size] == [torch.float64, torch.bool] and full_size[0] is x


def test_dropped_linear_with_a_bias_equals_the_plain_form():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    drop = nn.Dropout(0.3).train()
    torch.manual_seed(1)
    ours = dropped_linear(x, weight, bias, drop)
    torch.manual_seed(1)
    plain = F.linear(F.dropout(x, 0.3), weight, bias)
    assert torch.equal(ours, plain)
    grad = torch.randn_like(plain)
    for got, want in zip(
        torch.autograd.grad(ours, (x, weight, bias), grad),
        torch.autograd.grad(plain, (x, weight, bias), grad),
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=1e-14, rtol=0)
