"""Gradient checkpointing (``--grad-checkpointing``: timm's ``set_grad_checkpointing``) with every method.

timm recomputes each block in backward with ``torch.utils.checkpoint`` (non-reentrant): the block is
called again with its original input, so the methods' wrappers and hooks run once more. For every
registered method on a tiny float64 ViT (and Lily's per-image count and HEAT's head scores on a Swin),
the structure the training callbacks build (GPS/SPT/HEAT selection, Pear's pruning), the loss and the
gradient of every trainable tensor are the ones of the same model without checkpointing, and the
blocks really were recomputed. The trainer's flag reaches the model and leaves the run's identity alone.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import perturb_, tiny_swin, tiny_vit
from test_contract import BUILTIN, batches, settle_structure, supported
from test_train import write_task
from test_train_options import built_run, run_args
from torch import nn

import petl_zoo
from petl_zoo.train.backbone import enable_grad_checkpointing
from petl_zoo.train.errors import UserError
from petl_zoo.train.spec import expected_config

#: Options that only make the structure step short (Pear prunes after its first epoch, not its tenth).
FAST = {"pear": {"prune_epoch": 1}}
CASES = [("vit", name) for name in BUILTIN] + [("swin", "lily"), ("swin", "heat")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str, name: str, checkpointing: bool) -> nn.Module:
    """The method on a tiny float64 host, perturbed, its structure built (callbacks on two batches)."""
    torch.manual_seed(0)
    model = (tiny_vit if family == "vit" else tiny_swin)()
    petl_zoo.create(name, model, **FAST.get(name, {}))
    model.double().set_grad_checkpointing(checkpointing)
    perturb_(model)
    settle_structure(model, [(x.double(), y) for x, y in batches()])
    perturb_(model, seed=2)
    return model.train()


def _step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, gradients of the trainable tensors, calls of the first block) of one forward + backward."""
    x, y = batches(1, seed=5)[0]
    calls = []
    first = model.blocks[0] if hasattr(model, "blocks") else model.layers[0].blocks[0]  # what timm calls
    handle = first.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # dropouts draw the same masks (the recomputation restores the RNG state)
        loss = nn.functional.cross_entropy(model(x.double()), y)
        loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls)


@pytest.mark.filterwarnings("ignore:pear. pruned")  # a tiny model cannot always reach prune_ratio exactly
@pytest.mark.filterwarnings("ignore:fourierft. n_frequency")
@pytest.mark.parametrize("family,name", CASES)
def test_checkpointing_gives_the_same_structure_loss_and_gradients(family, name):
    if not supported(name, tiny_vit() if family == "vit" else tiny_swin()):
        pytest.skip(f"{name} does not support {family}")
    plain, checkpointed = _model(family, name, False), _model(family, name, True)
    assert checkpointed.petl_method.get_state() == plain.petl_method.get_state()
    loss, grads, plain_calls = _step(plain)
    loss_ck, grads_ck, calls = _step(checkpointed)
    recomputed = 2 if petl_zoo.trainable_parameters(plain)["method"] else 1  # linear: nothing to recompute
    assert (plain_calls, calls) == (1, recomputed), "the first block was not recomputed in backward"
    torch.testing.assert_close(loss_ck, loss, atol=1e-12, rtol=0)
    assert grads_ck.keys() == grads.keys()
    for key, grad in grads.items():
        assert (grad is None) == (grads_ck[key] is None), f"{key}: a gradient with one and not the other"
        if grad is not None:
            torch.testing.assert_close(grads_ck[key], grad, atol=1e-12, rtol=0, msg=key)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("vtab"))


def test_the_trainer_flag_reaches_the_model_and_not_the_fingerprint(data_root, tmp_path):
    run = built_run(data_root, tmp_path / "ck", "--grad-checkpointing")
    assert run.state.model.grad_checkpointing is True
    assert run.state.config["grad_checkpointing"] is True
    plain = expected_config(run_args(data_root, tmp_path / "plain"))
    assert plain["grad_checkpointing"] is False
    assert run.state.config["fingerprint"] == plain["fingerprint"]


def test_the_reentrant_checkpoint_and_models_without_one_are_refused():
    before = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(True)
    try:
        with pytest.raises(UserError, match="needs timm's non-reentrant checkpoint.*TIMM_REENTRANT_CKPT"):
            enable_grad_checkpointing(tiny_vit(), "vit_tiny_patch16_224")
    finally:
        timm.layers.set_reentrant_ckpt(before)
    with pytest.raises(UserError, match="timm's toy has no gradient checkpointing"):
        enable_grad_checkpointing(nn.Linear(2, 2), "toy")
