"""torch.compile: every method's training forward traces as one graph, and ``--compile`` trains as eager.

One ``torch._dynamo.explain`` per registered method on a tiny ViT (depth 2, 32x32 images), in train
mode, after the method's structure step (GPS/SPT/HEAT selection, Pear's pruning:
``test_contract.settle_structure``): ``model(x)`` then the cross-entropy has no graph break, except the
cases in ``EXPECTED_BREAKS`` (asserted exactly: a fix or a new break fails the test; docs/train.md
lists the same). The trainer's ``--compile`` is checked against eager step by step with the
``aot_eager`` backend (inductor, the default, generates and builds C++ for a minute on a CPU).
"""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
from conftest import perturb_, tiny_vit
from test_contract import BUILTIN, batches, settle_structure
from test_train import write_task
from test_train_options import batch, built_run, run_args, trainable
from timm.layers import DropPath
from torch import nn

import petl_zoo
from petl_zoo.train.backbone import compile_forward, enable_grad_checkpointing
from petl_zoo.train.errors import UserError
from petl_zoo.train.loop import _train_step
from petl_zoo.train.spec import expected_config

#: Options that only make the structure step short (Pear prunes after its first epoch, not its tenth).
FAST = {"pear": {"prune_epoch": 1}}
#: Cases beside every method's defaults: options with a known break.
EXTRA = {"loha[module_dropout=0.1]": ("loha", {"module_dropout": 0.1, "targets": ("patch_embed",)})}
#: case -> (text in the first break's reason, why). Every other case has no break.
EXPECTED_BREAKS = {
    "loha[module_dropout=0.1]": (
        "item()",
        "peft's module dropout skips the update on a random draw: a data-dependent branch "
        "(LoKr's is the same code); at the default 0 nothing is tested, so no break",
    ),
}
CASES = {name: (name, FAST.get(name, {})) for name in BUILTIN} | EXTRA


pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def _pristine() -> nn.Module:
    torch.manual_seed(0)
    return tiny_vit()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:pear. pruned")  # a tiny model cannot always reach prune_ratio exactly
@pytest.mark.filterwarnings("ignore:fourierft. n_frequency")
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_forward_has_no_graph_break(case):
    name, options = CASES[case]
    model = petl_zoo.create(name, copy.deepcopy(_pristine()), **options)
    data = batches()
    settle_structure(model, data)
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*data[1])
    torch._dynamo.reset()
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    if case not in EXPECTED_BREAKS:
        assert explained.graph_break_count == 0, f"{case}: {reasons[:3]}"
        return
    assert explained.graph_break_count > 0, f"{case} no longer breaks: remove it from EXPECTED_BREAKS"
    assert EXPECTED_BREAKS[case][0] in reasons[0], reasons[0]


def test_every_expected_break_is_a_case():
    assert set(EXPECTED_BREAKS) <= set(CASES)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("vtab"))


@pytest.mark.slow
def test_compiled_training_steps_match_eager(data_root, tmp_path):
    """The trainer's ``--compile`` forward (aot_eager) gives eager's losses and weights, step by step."""
    eager = built_run(data_root, tmp_path / "eager")
    compiled = built_run(data_root, tmp_path / "compiled", "--compile", "--compile-backend", "aot_eager")
    assert compiled.forward is not compiled.state.model  # the torch.compile wrapper
    assert (eager.state.config["compile_backend"], compiled.state.config["compile_backend"]) == (
        "inductor",  # the default: torch.compile's own
        "aot_eager",
    )
    assert compiled.state.config["fingerprint"] == eager.state.config["fingerprint"]
    torch._dynamo.reset()
    try:
        for i in range(3):
            images, labels = batch(eager, range(8 * i, 8 * i + 8), torch.float32)
            lr = eager.schedule(i)
            loss = _train_step(eager, [(images, labels)], lr, 0, i)
            loss_compiled = _train_step(compiled, [(images, labels)], lr, 0, i)
            torch.testing.assert_close(loss_compiled, loss, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
    weights, weights_compiled = trainable(eager), trainable(compiled)
    for key, value in weights.items():
        torch.testing.assert_close(weights_compiled[key], value, rtol=1e-4, atol=1e-6, msg=key)


#: Methods that write an attribute inside a checkpointed block: under gradient checkpointing dynamo
#: breaks the graph at every block unless ``compile_forward`` lets the write go unreplayed in the
#: recomputation. One per mechanism: the adapters' residual tap (binary_adapter and pear use the same),
#: Convpass's tap, DTL's side sum, BOFT's per-device index cache.
HANDS_ON_BY_ATTRIBUTE = ("adapter", "convpass", "dtl", "boft")


@pytest.mark.slow
@pytest.mark.parametrize("name", HANDS_ON_BY_ATTRIBUTE)
def test_compile_with_grad_checkpointing_is_one_graph_with_eager_gradients(name):
    """``compile_forward`` with checkpointing: one graph for the training forward, and the gradients of
    the eager model without checkpointing (fp64)."""
    torch.manual_seed(0)
    options = {**FAST.get(name, {}), **({"dropout": 0.0} if name == "boft" else {})}  # its own dropout
    model = petl_zoo.create(name, copy.deepcopy(_pristine()), **options).double()
    perturb_(model, std=0.05)
    for module in model.modules():  # no random masks: eager and the graph would draw different ones
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, DropPath):
            module.drop_prob = 0.0
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    reference = copy.deepcopy(model)
    nn.functional.cross_entropy(reference(x), y).backward()
    enable_grad_checkpointing(model, "vit_tiny_patch16_224")
    graphs = []

    def count(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        nn.functional.cross_entropy(compile_forward(model, count, grad_checkpointing=True)(x), y).backward()
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1, f"{name}: {len(graphs)} graphs"
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, rtol=0, atol=1e-12, msg=key)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--compile", "--compile-backend", "nope"], "'nope' is not a torch.compile backend; e.g. "),
        (["--compile-backend", "aot_eager"], "--compile-backend aot_eager needs --compile"),
    ],
)
def test_bad_compile_backends_are_refused(data_root, tmp_path, flags, needle):
    with pytest.raises(UserError, match=needle):
        expected_config(run_args(data_root, tmp_path / "run", *flags))
